//! The relay as a blind MLS delivery service: the rules an MLS carriage passes before it is
//! routed (docs/PROTOCOL.md §9). The relay keeps, per group, the epoch and members the last
//! accepted commit set (in the identity store, so every node of a cluster agrees) and nothing
//! else; it never reads an MLS message.
//!
//! The rules, each refused with its own code:
//!
//! - **One commit per epoch.** A commit made in epoch `e` is accepted only if the group is at
//!   `e` now (a group no commit named yet starts at 0); the store moves the group to `e + 1`
//!   atomically, so of two commits for one epoch exactly one wins, on any node. The loser gets
//!   `commit_conflict` and its author processes the winning commit (it is on its way, in order)
//!   and commits again. The winning commit sent again (the same message id, to a member it did
//!   not reach the first time) is routed, not refused.
//! - **Members only.** Every carriage's sender must be a member as the last commit declared
//!   (`not_a_member`), and its recipients too: an MLS message goes to members; a commit may
//!   also go to those it removes, so they learn they are out.
//! - **The current epoch only.** An application message, proposal or Welcome made in another
//!   epoch than the group's is refused (`wrong_epoch`): members keep no keys of left epochs, so
//!   such a message could not be read — its sender processes the commit it missed and encrypts
//!   again, and nothing typed is lost. The exception is a rejoin request: a member whose copy
//!   of the group fell behind for good asks the others to let it back in, from the epoch it
//!   is stuck in (at most the group's).
//!
//! **Where the group comes from.** Reading the store for every carriage costs a round trip
//! per message (measured: 11 000 against 348 000 carriages a second on one node), so a node
//! keeps what it read or set per group in a [`GroupCache`]:
//!
//! - A node **alone on its broker** (the in-process broker, the embedded default) is the only
//!   one that moves its groups — every accepted commit passes through [`admit`] here — so what
//!   it keeps is exact and never expires. A store that stalls stops commits only, not
//!   conversations already known.
//! - A node of a **cluster** keeps a group for [`CLUSTER_GROUP_TTL`] from when it asked the
//!   store; another node may move the group meanwhile. So an accepted commit is held for
//!   [`COMMIT_HOLD`] (longer) before it is routed: a message any node lets through in the epoch
//!   the commit ends was let through — and routed — before the commit leaves, so its members
//!   read it in that epoch, before they process the commit. After the hold no node still holds
//!   the left epoch; the rule "current epoch only" then refuses it as before.
//!
//! On a node of a cluster a carriage from a later epoch than the one kept asks the store; a
//! commit always does (it claims its epoch there).

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use syncra_core::UserId;
use syncra_core::carriage::{CarriageHeader, CarriageKind, GroupId};
use syncra_core::error::StoreError;
use syncra_core::store::{EpochAdvance, GroupState};
use syncra_core::wire::ErrorCode;

use crate::NodeState;
use crate::session::with_store_timeout;

/// Why a carriage was refused: the code and a message for its sender.
pub type Refusal = (ErrorCode, String);

/// The most groups a [`GroupCache`] keeps; beyond, an arbitrary one is dropped (and read from
/// the store again when next used). On the order of 150 bytes for a group of two (estimated
/// from the types: the state, its `Arc`, the map's entry, the members' allocation).
pub const CACHED_GROUPS_MAX: usize = 100_000;

/// The most member ids a [`GroupCache`] keeps, all groups together (32 MiB of ids): a commit
/// may declare up to 513 members, and any user can name a new group, so a bound on the number
/// of groups alone let a flood of commits for new groups of 513 take gigabytes of a node.
pub const CACHED_MEMBERS_MAX: usize = 1_000_000;

/// How long a node of a cluster keeps a group it read, from when it asked the store.
pub const CLUSTER_GROUP_TTL: Duration = Duration::from_millis(250);

/// How long a node of a cluster holds a commit it won before routing it: longer than
/// [`CLUSTER_GROUP_TTL`], so every node's copy of the epoch it ends has expired by then.
pub const COMMIT_HOLD: Duration = Duration::from_millis(350);

/// A group as a node knows it, and until when (never, on a node alone).
struct Known {
    state: GroupState,
    until: Option<Instant>,
}

/// What a node knows of its groups (the module docs): the state the last accepted commit set,
/// as read from the store or set by a commit this node won.
pub struct GroupCache {
    groups: DashMap<GroupId, Arc<Known>>,
    /// `None` on a node alone on its broker; else [`CLUSTER_GROUP_TTL`].
    ttl: Option<Duration>,
    /// Member ids kept, all groups together (approximate under concurrent offers).
    members: std::sync::atomic::AtomicUsize,
    /// [`CACHED_GROUPS_MAX`] and [`CACHED_MEMBERS_MAX`] (tests lower them).
    groups_max: usize,
    members_max: usize,
}

impl GroupCache {
    /// A cache for a node `alone` on its broker (exact, kept) or one of a cluster (kept for
    /// [`CLUSTER_GROUP_TTL`]).
    pub fn new(alone: bool) -> Self {
        Self::with_limits(alone, CACHED_GROUPS_MAX, CACHED_MEMBERS_MAX)
    }

    fn with_limits(alone: bool, groups_max: usize, members_max: usize) -> Self {
        GroupCache {
            groups: DashMap::new(),
            ttl: (!alone).then_some(CLUSTER_GROUP_TTL),
            members: std::sync::atomic::AtomicUsize::new(0),
            groups_max,
            members_max,
        }
    }

    /// Drops arbitrary other groups (read from the store again when next used) until one more
    /// with `adding` members fits both bounds.
    fn make_room(&self, group: &GroupId, adding: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        loop {
            let full = self.groups.len() >= self.groups_max && !self.groups.contains_key(group);
            let crowded = self.members.load(Relaxed).saturating_add(adding) > self.members_max;
            if !full && !crowded {
                return;
            }
            let victim = self.groups.iter().map(|e| *e.key()).find(|k| k != group);
            let Some(victim) = victim else { return };
            if let Some((_, gone)) = self.groups.remove(&victim) {
                self.members.fetch_sub(gone.state.members.len(), Relaxed);
            }
        }
    }

    /// Whether another node may move groups (then commits are held: [`COMMIT_HOLD`]).
    fn clustered(&self) -> bool {
        self.ttl.is_some()
    }

    /// What is kept of `group`, unless it expired. Shared, not copied: this is on every
    /// carriage's path.
    fn get(&self, group: &GroupId, now: Instant) -> Option<Arc<Known>> {
        let known = self.groups.get(group)?.clone();
        match known.until {
            Some(until) if until <= now => None,
            _ => Some(known),
        }
    }

    /// Keeps `state` for `group`, as the store held it at some point after `asked` (when the
    /// read started, or when a commit of this node was accepted). A read that raced a commit
    /// must not put a group back in an epoch it left: a later epoch still kept wins, and a
    /// read that took longer than the time it may be kept is not kept at all.
    fn offer(&self, group: GroupId, state: GroupState, asked: Instant, now: Instant) {
        let until = self.ttl.map(|ttl| asked + ttl);
        if until.is_some_and(|until| until <= now) {
            return;
        }
        use std::sync::atomic::Ordering::Relaxed;
        let adding = state.members.len();
        self.make_room(&group, adding);
        let known = Arc::new(Known { state, until });
        match self.groups.entry(group) {
            Entry::Vacant(v) => {
                v.insert(known);
                self.members.fetch_add(adding, Relaxed);
            }
            Entry::Occupied(mut o) => {
                let old = o.get();
                let expired = old.until.is_some_and(|u| u <= now);
                if expired || known.state.epoch >= old.state.epoch {
                    let replaced = old.state.members.len();
                    o.insert(known);
                    self.members.fetch_add(adding, Relaxed);
                    self.members.fetch_sub(replaced, Relaxed);
                }
            }
        }
    }
}

/// Checks a carriage from `sender` against its group and, for a commit, claims the epoch.
pub async fn admit(state: &NodeState, sender: UserId, h: &CarriageHeader) -> Result<(), Refusal> {
    if let Some(decided) = admit_known(state, sender, h) {
        return decided;
    }
    let asked = Instant::now();
    let group = with_store_timeout(state.store.group(&h.group_id))
        .await
        .map_err(unavailable)?;
    if let Some(g) = &group {
        state
            .groups
            .offer(h.group_id, g.clone(), asked, Instant::now());
    }
    match h.kind {
        CarriageKind::Commit => commit(state, sender, h, group).await,
        _ => {
            let group = group.ok_or_else(|| {
                (
                    ErrorCode::NotAMember,
                    format!("no commit created group {} at this relay", h.group_id),
                )
            })?;
            current(&group, sender, h)
        }
    }
}

/// [`admit`] without waiting, when the node knows the group ([`GroupCache`]), the carriage is
/// not a commit (a commit claims its epoch in the store) and not from a later epoch than the
/// one known; `None` when the store must be asked.
pub fn admit_known(
    state: &NodeState,
    sender: UserId,
    h: &CarriageHeader,
) -> Option<Result<(), Refusal>> {
    // On a node that was alone: a broker another node joined since (only a hub shared
    // in-process can) may have let it move a group. Ask the store.
    if h.kind == CarriageKind::Commit || (!state.groups.clustered() && !state.broker.alone()) {
        return None;
    }
    let known = state.groups.get(&h.group_id, Instant::now())?;
    let group = &known.state;
    // On a node of a cluster, a carriage from an epoch later than the one kept: the group may
    // have moved since; ask the store. (A node alone knows it did not.)
    if h.epoch > group.epoch && state.groups.clustered() {
        return None;
    }
    Some(current(group, sender, h))
}

/// The rules for a carriage that is not a commit: from a member, in the group's epoch (a
/// rejoin request: at most the group's), to members.
fn current(group: &GroupState, sender: UserId, h: &CarriageHeader) -> Result<(), Refusal> {
    member(group, sender, h)?;
    // A member asking to be let back in is behind by definition: its copy is stuck in an epoch
    // the group left. One from an epoch the group never reached is nonsense.
    let stale = match h.kind {
        CarriageKind::Rejoin => h.epoch > group.epoch,
        _ => h.epoch != group.epoch,
    };
    if stale {
        return Err((
            ErrorCode::WrongEpoch,
            format!(
                "this {} was made in epoch {}; group {} is at epoch {}",
                h.kind.name(),
                h.epoch,
                h.group_id,
                group.epoch
            ),
        ));
    }
    outsiders(&h.recipients, &group.members, &[], h)
}

async fn commit(
    state: &NodeState,
    sender: UserId,
    h: &CarriageHeader,
    group: Option<GroupState>,
) -> Result<(), Refusal> {
    if !h.members.contains(&sender) {
        return Err((
            ErrorCode::NotAMember,
            "a commit's members must include its sender (a member cannot commit its own \
             removal; it proposes to leave)"
                .into(),
        ));
    }
    let before: &[UserId] = match &group {
        Some(g) => {
            member(g, sender, h)?;
            // The same commit again: it won this epoch already; route it to whom it names.
            if g.last_commit == h.message_id && g.epoch == h.epoch.saturating_add(1) {
                return outsiders(&h.recipients, &g.members, &[], h);
            }
            &g.members
        }
        None => &[],
    };
    outsiders(&h.recipients, &h.members, before, h)?;
    let advanced = with_store_timeout(state.store.advance_group(
        &h.group_id,
        h.epoch,
        &h.members,
        &h.message_id,
    ))
    .await
    .map_err(unavailable)?;
    match advanced {
        EpochAdvance::Advanced => {
            let now = Instant::now();
            let moved = GroupState {
                epoch: h.epoch.saturating_add(1),
                members: h.members.clone(),
                last_commit: h.message_id,
            };
            state.groups.offer(h.group_id, moved, now, now);
            if state.groups.clustered() {
                // Every node's copy of the epoch this commit ends expires first (module docs).
                tokio::time::sleep(COMMIT_HOLD).await;
            }
            Ok(())
        }
        EpochAdvance::Conflict { current } => Err((
            ErrorCode::CommitConflict,
            match current {
                Some(now) => format!(
                    "another commit won epoch {} of group {}; it is at epoch {now}: process \
                     the winning commit, then commit again",
                    h.epoch, h.group_id
                ),
                None => format!(
                    "group {} is new here, so its first commit must be made in epoch 0, not {}",
                    h.group_id, h.epoch
                ),
            },
        )),
    }
}

/// The sender must be a member of the group.
fn member(group: &GroupState, sender: UserId, h: &CarriageHeader) -> Result<(), Refusal> {
    if group.members.contains(&sender) {
        Ok(())
    } else {
        Err((
            ErrorCode::NotAMember,
            format!(
                "you are not a member of group {} (a {} from outside is refused)",
                h.group_id,
                h.kind.name()
            ),
        ))
    }
}

/// Every recipient must be in `members` or `also`.
fn outsiders(
    recipients: &[UserId],
    members: &[UserId],
    also: &[UserId],
    h: &CarriageHeader,
) -> Result<(), Refusal> {
    match recipients
        .iter()
        .find(|r| !members.contains(r) && !also.contains(r))
    {
        None => Ok(()),
        Some(r) => Err((
            ErrorCode::NotAMember,
            format!(
                "recipient {r} is not a member of group {}; a {} goes to members only",
                h.group_id,
                h.kind.name()
            ),
        )),
    }
}

fn unavailable(e: StoreError) -> Refusal {
    (ErrorCode::StoreUnavailable, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(epoch: u64) -> GroupState {
        GroupState {
            epoch,
            members: Vec::new(),
            last_commit: [epoch as u8; 16],
        }
    }

    const G: GroupId = GroupId([7; 16]);

    #[test]
    fn a_node_alone_keeps_the_latest_epoch_for_good() {
        let cache = GroupCache::new(true);
        let t0 = Instant::now();
        cache.offer(G, state(3), t0, t0);
        // A read that started before the commit to 3 (it saw 2) does not undo it.
        cache.offer(G, state(2), t0, t0);
        let much_later = t0 + Duration::from_secs(86_400);
        assert_eq!(cache.get(&G, much_later).map(|k| k.state.epoch), Some(3));
        cache.offer(G, state(4), much_later, much_later);
        assert_eq!(cache.get(&G, much_later).map(|k| k.state.epoch), Some(4));
    }

    /// Commits for new groups each declaring many members take a node no more than its bound on
    /// member ids, and no more than its bound on groups; the group just offered is kept.
    #[test]
    fn the_cache_keeps_at_most_its_bounds_of_groups_and_members() {
        use std::sync::atomic::Ordering::Relaxed;
        let cache = GroupCache::with_limits(true, 50, 2_000);
        let t0 = Instant::now();
        let big = |epoch: u64, n: usize| GroupState {
            members: (0..n)
                .map(|i| UserId::from_identity_key(&[(i % 251) as u8; 32]))
                .collect(),
            ..state(epoch)
        };
        for i in 0..200u8 {
            let group = GroupId([i; 16]);
            cache.offer(group, big(1, 513), t0, t0);
            assert!(cache.get(&group, t0).is_some(), "the group offered is kept");
            let kept: usize = cache.groups.iter().map(|e| e.state.members.len()).sum();
            assert_eq!(kept, cache.members.load(Relaxed));
            assert!(kept <= 2_000, "{kept} member ids");
        }
        for i in 0..200u8 {
            cache.offer(GroupId([i; 16]), state(1), t0, t0);
            assert!(cache.groups.len() <= 50);
        }
        // A group replaced by a later epoch counts its new members only.
        cache.offer(G, big(2, 10), t0, t0);
        cache.offer(G, big(3, 20), t0, t0);
        let kept: usize = cache.groups.iter().map(|e| e.state.members.len()).sum();
        assert_eq!((kept, cache.members.load(Relaxed)), (20, 20));
    }

    #[test]
    fn a_cluster_node_keeps_a_group_for_its_ttl_from_when_it_asked() {
        let cache = GroupCache::new(false);
        let t0 = Instant::now();
        cache.offer(G, state(3), t0, t0 + Duration::from_millis(10));
        let before = t0 + CLUSTER_GROUP_TTL - Duration::from_millis(1);
        assert_eq!(cache.get(&G, before).map(|k| k.state.epoch), Some(3));
        assert!(cache.get(&G, t0 + CLUSTER_GROUP_TTL).is_none(), "expired");
        // A read slower than the TTL is not kept at all.
        let late = t0 + CLUSTER_GROUP_TTL + Duration::from_millis(1);
        cache.offer(G, state(3), t0, late);
        assert!(cache.get(&G, late).is_none());
        // Once expired, a fresh read replaces what was kept, whatever its epoch.
        cache.offer(G, state(2), late, late);
        assert_eq!(cache.get(&G, late).map(|k| k.state.epoch), Some(2));
        // A stale read does not undo a later epoch still kept.
        cache.offer(G, state(5), late, late);
        cache.offer(G, state(4), late, late);
        assert_eq!(cache.get(&G, late).map(|k| k.state.epoch), Some(5));
        // The hold outlasts every copy: what was read just before a commit is gone by then.
        assert!(COMMIT_HOLD > CLUSTER_GROUP_TTL);
        assert!(cache.get(&G, late + COMMIT_HOLD).is_none());
    }
}

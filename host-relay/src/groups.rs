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
//! **Where the group comes from.** A node that is alone on its broker (the in-process broker,
//! the embedded default) is the only one that moves its groups: every accepted commit passes
//! through [`admit`] here. It keeps what it read or set per group in a [`GroupCache`] and
//! checks carriages against it without asking the store — a message costs no store round trip,
//! and a store that stalls stops commits only, not conversations already known. A node of a
//! cluster reads the store for every carriage: another node may have moved the group, and a
//! message admitted in an epoch the group left would be unreadable for its members.

use std::sync::Arc;

use dashmap::DashMap;
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
/// the store again when next used). About 100 bytes plus 20 per member each.
pub const CACHED_GROUPS_MAX: usize = 100_000;

/// What a node alone on its broker knows of its groups (the module docs): the state the last
/// accepted commit set, as read from the store or set by the commit. Disabled on a node of a
/// cluster.
pub struct GroupCache {
    groups: Option<DashMap<GroupId, Arc<GroupState>>>,
}

impl GroupCache {
    /// A cache that keeps groups when `alone`, and nothing otherwise.
    pub fn new(alone: bool) -> Self {
        GroupCache {
            groups: alone.then(DashMap::new),
        }
    }

    fn get(&self, group: &GroupId) -> Option<Arc<GroupState>> {
        self.groups.as_ref()?.get(group).map(|g| g.clone())
    }

    /// Keeps `state` for `group` unless the cache holds a later epoch already: a read from
    /// the store that raced a commit must not put the group back in the epoch it left.
    fn offer(&self, group: GroupId, state: GroupState) {
        let Some(groups) = &self.groups else { return };
        if groups.len() >= CACHED_GROUPS_MAX && !groups.contains_key(&group) {
            let victim = groups.iter().next().map(|e| *e.key());
            if let Some(victim) = victim {
                groups.remove(&victim);
            }
        }
        let mut entry = groups
            .entry(group)
            .or_insert_with(|| Arc::new(state.clone()));
        if entry.epoch < state.epoch {
            *entry = Arc::new(state);
        }
    }
}

/// Checks a carriage from `sender` against its group and, for a commit, claims the epoch.
pub async fn admit(state: &NodeState, sender: UserId, h: &CarriageHeader) -> Result<(), Refusal> {
    if let Some(decided) = admit_known(state, sender, h) {
        return decided;
    }
    let group = with_store_timeout(state.store.group(&h.group_id))
        .await
        .map_err(unavailable)?;
    if let Some(g) = &group {
        state.groups.offer(h.group_id, g.clone());
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

/// [`admit`] without waiting, when the node knows the group ([`GroupCache`]) and the carriage
/// is not a commit (a commit claims its epoch in the store); `None` when the store must be
/// asked.
pub fn admit_known(
    state: &NodeState,
    sender: UserId,
    h: &CarriageHeader,
) -> Option<Result<(), Refusal>> {
    // A broker another node joined since (only a hub shared in-process can) may have let it
    // move a group: ask the store.
    if h.kind == CarriageKind::Commit || !state.broker.alone() {
        return None;
    }
    let group = state.groups.get(&h.group_id)?;
    Some(current(&group, sender, h))
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
            state.groups.offer(
                h.group_id,
                GroupState {
                    epoch: h.epoch.saturating_add(1),
                    members: h.members.clone(),
                    last_commit: h.message_id,
                },
            );
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

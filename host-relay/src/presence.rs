//! Presence: which *other* nodes of the cluster hold a session of which user, learned through
//! the broker, so that a node publishes a delivery only where it is needed.
//!
//! # Why
//!
//! With one broker topic per user, a node published every envelope in case another node held
//! the recipient, even when sender and recipient sat on the same node: on NATS that cost five
//! times the CPU of a local delivery (docs/BENCHMARKS.md, issue 19). Now each node subscribes
//! to two topics only: its own delivery topic (`syncra.n.<node id>`) and the presence topic
//! (`syncra.presence`), and keeps a table *user → other nodes holding a session of theirs*,
//! fed by the other nodes' announcements on the presence topic. A delivery goes to the nodes
//! the table names, and nowhere when it names none.
//!
//! # The table is a hint; outcomes stay truthful
//!
//! The table only decides *whom to ask*. `delivered` still needs a taker: a local session, or
//! the answer of the node the payload was published to (NATS: that node's sink took it; Redis:
//! that node is subscribed, the one approximation, `docs/SCALING.md`). A stale table can
//! therefore only make the relay ask a node that no longer holds the user (answer "no",
//! then the mailbox: `stored`) or not ask a node that just gained the user (`stored`, and the
//! recipient picks the entry up at its next ping). When the node cannot trust its table —
//! its link to the broker failed and it has not resynchronised since — a recipient that is
//! neither here nor in the table is `rejected: broker_unavailable`, as before.
//!
//! # The announcements
//!
//! Every announcement is a broker payload MAC'd with the cluster key (`router`) whose body is
//! sealed with AES-256-GCM under a key derived from it ([`presence_key`], bound to the sending
//! node): the broker carries who is online where, and must not read it. Opened, the body is
//! `seq (u64, big-endian) || op (u8) || data`. A node numbers the announcements that change
//! its set (`Held`, `Released`, `SnapshotFirst`, `SnapshotMore`) 1, 2, 3, … and sends them from
//! one task, in order; the others carry the last number used:
//!
//! | op | data | meaning |
//! |---|---|---|
//! | 1 `Held` | user ids (20 bytes each) | the sender now holds these users |
//! | 2 `Released` | user ids | the sender no longer holds these users |
//! | 3 `SnapshotFirst` | user ids | the sender holds exactly these (more may follow) |
//! | 4 `SnapshotMore` | user ids | … and these |
//! | 5 `Heartbeat` | — | the sender is alive; its last number is `seq` |
//! | 6 `Hello` | empty, or a node id | send your snapshot (everyone, or only that node) |
//! | 7 `Bye` | — | the sender is leaving: forget it |
//!
//! A receiver that sees a gap in a node's numbers (a lost announcement, an outage on either
//! side), or a heartbeat with another number than the last it applied, asks that node for a
//! snapshot (`Hello` naming it, at most once per [`ASK_INTERVAL`]). A node not heard from for
//! [`PEER_TIMEOUT`] is forgotten. A node whose own publishes failed sends `Hello` to everyone
//! and its snapshot once the broker takes publishes again.
//!
//! # Departed nodes stay departed
//!
//! A broker publisher without the cluster key can record authentic announcements and publish
//! them again (docs/THREAT_MODEL.md §2.2). Numbers only grow, so a node ignores a numbered
//! announcement not above the last one it applied from that node; but forgetting a node would
//! forget that number too, and a replayed `Held` would then bring a dead node back as the
//! holder of real users (their senders wait for an answer that never comes) and into the set
//! every `Held` waits for. So a node remembers the nodes that left its table, the last
//! [`REMEMBERED_DEPARTURES`] of them:
//!
//! - a node that said `Bye` is *retired*: a node id is drawn at random each time a relay
//!   process starts (`Relay::start`) and `Bye` is the last thing its presence task sends, so
//!   nothing from that id is genuine any more, and every announcement from it is ignored;
//! - a node forgotten after [`PEER_TIMEOUT`] may only have been cut off, and must be able to
//!   come back: its last number is kept, and if it is heard from again its entry starts from
//!   that number, so that only announcements it sent since (higher numbers) are applied.
//!
//! # A first login waits until the other nodes applied its `Held`
//!
//! A user's first session on a node completes its login (gets `AuthOk`) only once every other
//! node this node knows of applied the `Held` that names it, or after [`CONFIRM_TIMEOUT`]: then
//! a sender on another node that writes after that `AuthOk` reaches this session, as it would
//! reach a session on its own node.
//!
//! Neither broker's own receipt says that. Redis counts the subscribed connections it handed
//! the payload to, which may not have read it yet; a NATS request counts the nodes that
//! answered within its reply window, and a node slower than the window is left out. So each
//! node that applies a `Held` *acknowledges* it, on the same brokers and the same way: a
//! payload on the announcing node's own topic, `announcer node id || seq`, MAC'd like every
//! payload. The announcing node waits until every node in its table when it published (every
//! node heard from within [`PEER_TIMEOUT`] that has not said `Bye`) acknowledged it, or was
//! forgotten meanwhile. A node that starts meanwhile is not waited for: it asked everyone for a
//! snapshot, which names the user. A node that crashed without its `Bye`, or is cut off, makes
//! the logins on the others wait the full [`CONFIRM_TIMEOUT`] until it is forgotten, at most
//! [`PEER_TIMEOUT`] after it was last heard.
//!
//! Snapshots are not awaited: a login that falls into a resynchronisation round is covered by
//! the snapshot, which the others apply when it arrives.
//!
//! Must never: apply an announcement whose MAC did not verify (the router checks it first),
//! trust a length it has not checked, or block the broker's delivery task (applying is a few
//! map operations; publishing is the presence task's job).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use smallvec::SmallVec;
use syncra_core::crypto::local_box::LocalKey;
use syncra_core::error::BrokerError;
use syncra_core::id::USER_ID_LEN;
use syncra_core::{Broker, Confirm, PublishReceipt, UserId};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::router::{NODE_ID_LEN, NodeId, PRESENCE_TOPIC, Router};

/// How often a node sends a heartbeat and looks at its peers.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// A peer not heard from for this long is forgotten (with every user it held).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// A node asks one peer for a snapshot at most this often.
pub const ASK_INTERVAL: Duration = Duration::from_secs(1);
/// How long a first session waits for its `Held` to be announced.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the link must have worked, after a failure or at start, before the table is
/// trusted to say "nobody else holds this user".
pub const SETTLE: Duration = Duration::from_millis(250);
/// A node sends the snapshot others ask for at most this often (a request in between is
/// answered when the interval has passed, at the next heartbeat).
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_millis(200);
/// Users per announcement: 20 KiB of ids, far below any broker's payload limit.
pub const USERS_PER_ANNOUNCEMENT: usize = 1_000;
/// How many nodes that left the table (said `Bye` or were forgotten) a node remembers, the
/// oldest dropped first: under half a MiB.
///
/// Bounded by count, not by age: a recording does not age, so forgetting a node after an hour
/// would only tell a replaying publisher how long to wait. Nor can a broker publisher add
/// entries at will: each is the id of a real node (announcements are sealed to their sender),
/// and an id already remembered keeps its place, so replaying remembered nodes pushes nothing
/// out. Only that many later departures of other real nodes (over a year of daily restarts of
/// a cluster of ten) push a node out.
pub const REMEMBERED_DEPARTURES: usize = 4096;

/// One presence announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announcement {
    /// The sender now holds these users.
    Held(Vec<UserId>),
    /// The sender no longer holds these users.
    Released(Vec<UserId>),
    /// The sender holds exactly these users (the first part of a snapshot).
    SnapshotFirst(Vec<UserId>),
    /// More users of the snapshot begun by the last `SnapshotFirst`.
    SnapshotMore(Vec<UserId>),
    /// The sender is alive.
    Heartbeat,
    /// Send your snapshot: everyone (`None`) or only the named node.
    Hello(Option<NodeId>),
    /// The sender is leaving.
    Bye,
}

mod op {
    pub const HELD: u8 = 1;
    pub const RELEASED: u8 = 2;
    pub const SNAPSHOT_FIRST: u8 = 3;
    pub const SNAPSHOT_MORE: u8 = 4;
    pub const HEARTBEAT: u8 = 5;
    pub const HELLO: u8 = 6;
    pub const BYE: u8 = 7;
}

impl Announcement {
    /// Whether it changes the sender's set, and so takes the next number.
    fn numbered(&self) -> bool {
        matches!(
            self,
            Announcement::Held(_)
                | Announcement::Released(_)
                | Announcement::SnapshotFirst(_)
                | Announcement::SnapshotMore(_)
        )
    }

    /// The body: `seq || op || data`.
    pub fn encode(&self, seq: u64) -> Vec<u8> {
        let (op, users, node): (u8, &[UserId], Option<&NodeId>) = match self {
            Announcement::Held(u) => (op::HELD, u, None),
            Announcement::Released(u) => (op::RELEASED, u, None),
            Announcement::SnapshotFirst(u) => (op::SNAPSHOT_FIRST, u, None),
            Announcement::SnapshotMore(u) => (op::SNAPSHOT_MORE, u, None),
            Announcement::Heartbeat => (op::HEARTBEAT, &[], None),
            Announcement::Hello(target) => (op::HELLO, &[], target.as_ref()),
            Announcement::Bye => (op::BYE, &[], None),
        };
        let mut out = Vec::with_capacity(9 + users.len() * USER_ID_LEN + NODE_ID_LEN);
        out.extend_from_slice(&seq.to_be_bytes());
        out.push(op);
        for user in users {
            out.extend_from_slice(user.as_bytes());
        }
        if let Some(node) = node {
            out.extend_from_slice(node);
        }
        out
    }

    /// Parses a body from another node; every length is checked. `Err` for anything that is
    /// not exactly one announcement.
    pub fn parse(body: &[u8]) -> Result<(u64, Announcement), ()> {
        let (seq, rest) = body.split_first_chunk::<8>().ok_or(())?;
        let seq = u64::from_be_bytes(*seq);
        let (&op, data) = rest.split_first().ok_or(())?;
        let users = || -> Result<Vec<UserId>, ()> {
            let chunks = data.chunks_exact(USER_ID_LEN);
            if !chunks.remainder().is_empty() {
                return Err(());
            }
            Ok(chunks
                .filter_map(|c| <[u8; USER_ID_LEN]>::try_from(c).ok())
                .map(UserId::from_bytes)
                .collect())
        };
        let announcement = match op {
            op::HELD => Announcement::Held(users()?),
            op::RELEASED => Announcement::Released(users()?),
            op::SNAPSHOT_FIRST => Announcement::SnapshotFirst(users()?),
            op::SNAPSHOT_MORE => Announcement::SnapshotMore(users()?),
            op::HEARTBEAT if data.is_empty() => Announcement::Heartbeat,
            op::HELLO if data.is_empty() => Announcement::Hello(None),
            op::HELLO => Announcement::Hello(Some(NodeId::try_from(data).map_err(drop)?)),
            op::BYE if data.is_empty() => Announcement::Bye,
            _ => return Err(()),
        };
        Ok((seq, announcement))
    }
}

/// What this node knows of another node.
#[derive(Debug)]
struct Peer {
    /// The last number applied.
    seq: u64,
    /// Whether every numbered announcement since a snapshot was applied.
    synced: bool,
    heard: Instant,
    /// When this node last asked it for a snapshot.
    asked: Option<Instant>,
    users: HashSet<UserId>,
    /// Back in the table after it was forgotten, and nothing newer than what it sent before
    /// was applied since: perhaps only a replayed heartbeat. Until it sends a higher number, a
    /// `Held` does not wait for its acknowledgement ([`Presence::awaited`]).
    returned: bool,
}

/// How a node left this node's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gone {
    /// It said `Bye`: its id never speaks again.
    Retired,
    /// It was not heard from for [`PEER_TIMEOUT`]; the last number applied from it.
    Expired(u64),
}

/// The nodes that left the table, so that their recorded announcements cannot bring them back
/// (see the module docs). At most [`REMEMBERED_DEPARTURES`], the oldest dropped first.
#[derive(Debug, Default)]
struct Departed {
    gone: HashMap<NodeId, Gone>,
    /// The keys of `gone`, in the order they were first added.
    order: VecDeque<NodeId>,
}

impl Departed {
    fn retired(&self, node: &NodeId) -> bool {
        self.gone.get(node) == Some(&Gone::Retired)
    }

    fn expired(&self, node: &NodeId) -> bool {
        matches!(self.gone.get(node), Some(Gone::Expired(_)))
    }

    /// The number a node's entry starts from when it is heard from: the last one applied
    /// before it was forgotten, or 0 for a node never seen.
    fn last_seq(&self, node: &NodeId) -> u64 {
        match self.gone.get(node) {
            Some(Gone::Expired(seq)) => *seq,
            Some(Gone::Retired) | None => 0,
        }
    }

    /// Notes that `node` left. A node remembered already keeps its place (a replaying
    /// publisher can make it come and go, and push nothing out by that); retiring wins over
    /// expiring, and of two numbers the higher is kept.
    fn note(&mut self, node: NodeId, how: Gone) {
        match self.gone.entry(node) {
            Entry::Occupied(mut known) => {
                let merged = match (*known.get(), how) {
                    (Gone::Expired(a), Gone::Expired(b)) => Gone::Expired(a.max(b)),
                    _ => Gone::Retired,
                };
                known.insert(merged);
            }
            Entry::Vacant(new) => {
                new.insert(how);
                self.order.push_back(node);
                if self.order.len() > REMEMBERED_DEPARTURES
                    && let Some(oldest) = self.order.pop_front()
                {
                    self.gone.remove(&oldest);
                }
            }
        }
    }
}

/// The key presence announcements are sealed under, derived from the cluster key.
pub fn presence_key(cluster_key: &[u8; 32]) -> LocalKey {
    use hmac::{KeyInit, Mac};
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(cluster_key)
        .expect("HMAC takes keys of any length");
    mac.update(b"syncra/v1/presence-box");
    let key = zeroize::Zeroizing::new(<[u8; 32]>::from(mac.finalize().into_bytes()));
    LocalKey::from_bytes(key.as_ref()).expect("32 bytes")
}

/// What a sealed announcement is bound to: the protocol's label and the sending node.
fn label(node: &NodeId) -> Vec<u8> {
    [&b"syncra/v1/presence"[..], node].concat()
}

/// The other nodes holding one user.
pub type Holders = SmallVec<[NodeId; 1]>;

/// The presence table of one node and the state of its announcements.
#[derive(Debug)]
pub struct Presence {
    me: NodeId,
    /// Encrypts the announcements: the broker carries them, and they say who is online where.
    key: LocalKey,
    /// user → the other nodes holding them. Read on every send; inline for the usual one node,
    /// so reading it allocates nothing.
    holders: DashMap<UserId, Holders>,
    peers: Mutex<HashMap<NodeId, Peer>>,
    /// The nodes that left `peers`. Locked only while `peers` is.
    departed: Mutex<Departed>,
    /// Users whose state here changed since the last announcement, and the number of rounds the
    /// task has begun (under the same lock, so a waiter knows which round covers it).
    changed: Mutex<(HashSet<UserId>, u64)>,
    wake: Notify,
    /// A peer asked for this node's snapshot.
    snapshot_wanted: AtomicBool,
    /// Peers to ask for a snapshot.
    ask: Mutex<HashSet<NodeId>>,
    trusted: AtomicBool,
    /// Rounds done (announced, or failed and given up on).
    done: watch::Sender<u64>,
    /// The last number used.
    seq: AtomicU64,
    /// The nodes that acknowledged each of this node's `Held` announcements the presence task
    /// waits for, by number. Only the numbers being waited for are kept.
    acks: Mutex<HashMap<u64, HashSet<NodeId>>>,
    /// Bumped with every acknowledgement kept and every peer forgotten, to wake the presence
    /// task while it waits.
    acks_seen: watch::Sender<u64>,
}

impl Presence {
    /// An empty table for node `me`, whose announcements are sealed under `key` (the same on
    /// every node of the cluster: [`presence_key`]).
    pub fn new(me: NodeId, key: LocalKey) -> Self {
        Presence {
            me,
            key,
            holders: DashMap::new(),
            peers: Mutex::default(),
            departed: Mutex::default(),
            changed: Mutex::default(),
            wake: Notify::new(),
            snapshot_wanted: AtomicBool::new(false),
            ask: Mutex::default(),
            trusted: AtomicBool::new(false),
            done: watch::Sender::new(0),
            seq: AtomicU64::new(0),
            acks: Mutex::default(),
            acks_seen: watch::Sender::new(0),
        }
    }

    /// The body of the acknowledgement of `announcer`'s `Held` number `seq`.
    pub fn ack_body(announcer: &NodeId, seq: u64) -> Vec<u8> {
        [&announcer[..], &seq.to_be_bytes()].concat()
    }

    /// Takes an acknowledgement from node `from` (its MAC already verified). `Err` if it does
    /// not parse or acknowledges another node's announcement; one for a number nobody waits
    /// for (late, or a replay) changes nothing.
    pub fn ack(&self, from: NodeId, body: &[u8]) -> Result<(), ()> {
        let (announcer, seq) = body.split_first_chunk::<NODE_ID_LEN>().ok_or(())?;
        let seq: [u8; 8] = seq.try_into().map_err(drop)?;
        if *announcer != self.me {
            return Err(());
        }
        let mut acks = self.acks.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(nodes) = acks.get_mut(&u64::from_be_bytes(seq))
            && nodes.insert(from)
        {
            drop(acks);
            self.acks_seen.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(())
    }

    /// Starts keeping the acknowledgements of number `seq` (before it is published: an
    /// acknowledgement may come back before the broker's receipt does).
    fn expect_acks(&self, seq: u64) {
        self.acks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(seq, HashSet::new());
    }

    /// How many other nodes the table knows.
    pub fn peer_count(&self) -> usize {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The nodes in the table now.
    fn peer_ids(&self) -> HashSet<NodeId> {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .collect()
    }

    /// The nodes a `Held` waits for: those in the table, except a node back after it was
    /// forgotten that has sent nothing newer since (a broker publisher replaying a dead node's
    /// heartbeat would otherwise make every first login wait [`CONFIRM_TIMEOUT`]; a node that
    /// was only cut off is asked for a snapshot when heard from, and counts again once that
    /// arrives).
    fn awaited(&self) -> HashSet<NodeId> {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, p)| !p.returned)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Waits until each node of `want` acknowledged number `seq` or was forgotten, or until
    /// `deadline`; then stops keeping its acknowledgements. Returns whether they all came.
    async fn wait_acks(&self, seq: u64, want: &HashSet<NodeId>, deadline: Instant) -> bool {
        let mut seen = self.acks_seen.subscribe();
        let all = loop {
            if self.acked_by_all(seq, want) {
                break true;
            }
            if tokio::time::timeout_at(deadline, seen.changed())
                .await
                .is_err()
            {
                break false;
            }
        };
        self.stop_acks(seq);
        all
    }

    /// Whether each node of `want` still in the table acknowledged number `seq`.
    fn acked_by_all(&self, seq: u64, want: &HashSet<NodeId>) -> bool {
        let peers = self.peer_ids();
        let acks = self.acks.lock().unwrap_or_else(PoisonError::into_inner);
        let got = acks.get(&seq);
        want.iter()
            .all(|n| !peers.contains(n) || got.is_some_and(|g| g.contains(n)))
    }

    /// Stops keeping the acknowledgements of number `seq`.
    fn stop_acks(&self, seq: u64) {
        self.acks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&seq);
    }

    /// The other nodes believed to hold a session of `user` (`None`: none).
    pub fn others(&self, user: &UserId) -> Option<Holders> {
        self.holders.get(user).map(|nodes| nodes.clone())
    }

    /// Whether the table can be trusted to say that nobody else holds a user: the link to the
    /// broker has worked for [`SETTLE`] since the last failure.
    pub fn trusted(&self) -> bool {
        self.trusted.load(Ordering::Acquire)
    }

    /// Waits (up to `limit`) until the table is trusted: a starting node has said hello and
    /// the others have had [`SETTLE`] to send their snapshots.
    pub async fn wait_trusted(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut done = self.done.subscribe();
        while !self.trusted() {
            if tokio::time::timeout_at(deadline, done.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }

    /// Notes that this node's set changed for `user` (a first session began or a last one
    /// ended); the task announces the user's state as the router has it when it gets there.
    /// Returns the round that will cover it.
    pub fn changed(&self, user: UserId) -> u64 {
        let mut changed = self.changed.lock().unwrap_or_else(PoisonError::into_inner);
        changed.0.insert(user);
        let round = changed.1 + 1;
        drop(changed);
        self.wake.notify_one();
        round
    }

    /// [`Presence::changed`] for a first session, waiting (up to [`CONFIRM_TIMEOUT`]) until it
    /// is announced.
    pub async fn held(&self, user: UserId) {
        let round = self.changed(user);
        let mut done = self.done.subscribe();
        let announced = tokio::time::timeout(CONFIRM_TIMEOUT, done.wait_for(|d| *d >= round));
        if announced.await.is_err() {
            debug!(user = %user.short(), "presence not confirmed in time; logging in anyway");
        }
    }

    /// Applies an announcement from node `from` (its MAC already verified). `Err` if the body
    /// does not parse; `Ok(Some(seq))` for a `Held` applied, which the caller acknowledges
    /// (see the module docs).
    pub fn apply(&self, from: NodeId, sealed: &[u8]) -> Result<Option<u64>, ()> {
        if from == self.me {
            return Ok(None);
        }
        let body = self.key.open(&label(&from), sealed).map_err(drop)?;
        let (seq, announcement) = Announcement::parse(&body)?;
        let now = Instant::now();
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let mut departed = self.departed.lock().unwrap_or_else(PoisonError::into_inner);
        if departed.retired(&from) {
            // It said `Bye`, and its id is not used again: a replay by a broker publisher,
            // ignored like an old number (nothing to count: it is authentic).
            return Ok(None);
        }
        if announcement == Announcement::Bye {
            departed.note(from, Gone::Retired);
            if let Some(peer) = peers.remove(&from) {
                self.forget(&from, peer.users);
                self.acks_seen.send_modify(|n| *n = n.wrapping_add(1));
            }
            return Ok(None);
        }
        // A node forgotten after PEER_TIMEOUT starts again from the last number applied, so
        // that its recorded announcements stay old.
        let peer = peers.entry(from).or_insert_with(|| Peer {
            seq: departed.last_seq(&from),
            synced: false,
            heard: now,
            asked: None,
            users: HashSet::new(),
            returned: departed.expired(&from),
        });
        peer.heard = now;
        let in_order = peer.synced && seq == peer.seq.wrapping_add(1);
        let numbered = announcement.numbered();
        if numbered && seq <= peer.seq {
            // Numbers only grow (a node's id is new each time it starts): this is an old
            // announcement again, which a broker publisher could replay. Ignored.
            return Ok(None);
        }
        drop(departed);
        let mut lost = false;
        let mut applied_held = None;
        match announcement {
            Announcement::Held(users) => {
                lost = !in_order;
                applied_held = Some(seq);
                for user in users {
                    if peer.users.insert(user) {
                        self.holders.entry(user).or_default().push(from);
                    }
                }
            }
            Announcement::Released(users) => {
                lost = !in_order;
                for user in users {
                    if peer.users.remove(&user) {
                        self.drop_holder(&user, &from);
                    }
                }
            }
            Announcement::SnapshotFirst(users) => {
                let old = std::mem::take(&mut peer.users);
                self.forget(&from, old);
                for user in users {
                    if peer.users.insert(user) {
                        self.holders.entry(user).or_default().push(from);
                    }
                }
                peer.synced = true;
            }
            Announcement::SnapshotMore(users) => {
                lost = !in_order;
                for user in users {
                    if peer.users.insert(user) {
                        self.holders.entry(user).or_default().push(from);
                    }
                }
            }
            Announcement::Heartbeat => lost = !peer.synced || seq != peer.seq,
            Announcement::Hello(target) => {
                if target.is_none_or(|t| t == self.me) {
                    self.snapshot_wanted.store(true, Ordering::Release);
                    self.wake.notify_one();
                }
                // A node says hello when it starts or resynchronises, and its snapshot follows.
            }
            Announcement::Bye => {}
        }
        if numbered {
            peer.seq = seq;
            peer.returned = false;
        }
        if lost {
            peer.synced = false;
            if peer
                .asked
                .is_none_or(|at| now.duration_since(at) >= ASK_INTERVAL)
            {
                peer.asked = Some(now);
                self.ask
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(from);
                self.wake.notify_one();
            }
        }
        Ok(applied_held)
    }

    fn drop_holder(&self, user: &UserId, node: &NodeId) {
        self.holders.remove_if_mut(user, |_, nodes| {
            nodes.retain(|n| n != node);
            nodes.is_empty()
        });
    }

    fn forget(&self, node: &NodeId, users: HashSet<UserId>) {
        for user in users {
            self.drop_holder(&user, node);
        }
    }

    /// Forgets peers not heard from for [`PEER_TIMEOUT`], keeping their last numbers.
    fn expire(&self, now: Instant) {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let mut departed = self.departed.lock().unwrap_or_else(PoisonError::into_inner);
        let silent: Vec<NodeId> = peers
            .iter()
            .filter(|(_, p)| now.duration_since(p.heard) >= PEER_TIMEOUT)
            .map(|(n, _)| *n)
            .collect();
        for node in silent {
            if let Some(peer) = peers.remove(&node) {
                debug!("presence: a node was silent for {PEER_TIMEOUT:?}; forgetting it");
                departed.note(node, Gone::Expired(peer.seq));
                self.forget(&node, peer.users);
            }
        }
    }

    /// The number of an announcement: the next one if it changes this node's set, else the
    /// last one used.
    fn number(&self, announcement: &Announcement) -> u64 {
        if announcement.numbered() {
            self.seq.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.seq.load(Ordering::Acquire)
        }
    }

    /// Takes the users changed since the last round and begins a round.
    fn begin_round(&self) -> (u64, Vec<UserId>) {
        let mut changed = self.changed.lock().unwrap_or_else(PoisonError::into_inner);
        changed.1 += 1;
        let users = changed.0.drain().collect();
        (changed.1, users)
    }
}

/// Publishes one announcement; false if the broker did not take it.
async fn announce(
    presence: &Presence,
    router: &Router,
    broker: &dyn Broker,
    announcement: Announcement,
    confirm: Confirm,
) -> bool {
    let seq = presence.number(&announcement);
    publish(presence, router, broker, seq, &announcement, confirm)
        .await
        .is_ok()
}

/// Publishes one announcement with number `seq`.
async fn publish(
    presence: &Presence,
    router: &Router,
    broker: &dyn Broker,
    seq: u64,
    announcement: &Announcement,
    confirm: Confirm,
) -> Result<PublishReceipt, BrokerError> {
    let sealed = presence
        .key
        .seal(&label(&presence.me), &announcement.encode(seq));
    let payload = router.presence_payload(&sealed);
    broker
        .publish_confirm(PRESENCE_TOPIC, payload, confirm)
        .await
}

/// Publishes `Held` for `users`; returns its number, whose acknowledgements are now kept.
/// `Err` if the broker did not take it.
async fn announce_held(
    presence: &Presence,
    router: &Router,
    broker: &dyn Broker,
    users: Vec<UserId>,
) -> Result<u64, ()> {
    let held = Announcement::Held(users);
    let seq = presence.number(&held);
    presence.expect_acks(seq);
    // Nothing to count: the acknowledgements say who applied it.
    match publish(presence, router, broker, seq, &held, Confirm::Nothing).await {
        Ok(_) => Ok(seq),
        Err(_) => {
            presence.stop_acks(seq);
            Err(())
        }
    }
}

/// Publishes this node's snapshot: what the router holds now.
async fn snapshot(presence: &Presence, router: &Router, broker: &dyn Broker) -> bool {
    let users = router.users();
    let mut parts = users.chunks(USERS_PER_ANNOUNCEMENT);
    let first = parts.next().unwrap_or(&[]).to_vec();
    let mut ok = announce(
        presence,
        router,
        broker,
        Announcement::SnapshotFirst(first),
        Confirm::Nothing,
    )
    .await;
    for part in parts {
        ok &= announce(
            presence,
            router,
            broker,
            Announcement::SnapshotMore(part.to_vec()),
            Confirm::Nothing,
        )
        .await;
    }
    ok
}

/// Sleeps until `at`, or for ever.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The presence task of a node: announces its changes, answers snapshot requests, asks peers
/// whose announcements it missed, sends heartbeats and forgets silent peers, until `stop`;
/// then says `Bye`.
pub async fn run(
    presence: Arc<Presence>,
    router: Arc<Router>,
    broker: Arc<dyn Broker>,
    mut stop: watch::Receiver<bool>,
) {
    let broker = broker.as_ref();
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Start as after an outage: everyone sends their snapshot, this node sends its own.
    let mut resync = true;
    let mut link_ok_since: Option<Instant> = None;
    let mut last_snapshot: Option<Instant> = None;
    loop {
        let settle_at = link_ok_since
            .filter(|_| !presence.trusted())
            .map(|since| since + SETTLE);
        let ticked = tokio::select! {
            _ = stop.changed() => break,
            () = presence.wake.notified() => false,
            _ = tick.tick() => true,
            () = sleep_until_some(settle_at) => false,
        };
        let (round, users) = presence.begin_round();
        let round_began = Instant::now();
        let mut ok = true;
        // The numbers of the `Held` announcements whose acknowledgements are awaited, and the
        // nodes to hear from.
        let mut awaited = Vec::new();
        let mut want = HashSet::new();
        if resync {
            ok &= announce(
                &presence,
                &router,
                broker,
                Announcement::Hello(None),
                Confirm::Nothing,
            )
            .await;
        }
        // Snapshots asked for by others are sent at most every SNAPSHOT_INTERVAL, so replayed
        // or repeated hellos cannot make a node publish its whole set in a loop.
        let snapshot_due = last_snapshot.is_none_or(|at| at.elapsed() >= SNAPSHOT_INTERVAL);
        if resync || (snapshot_due && presence.snapshot_wanted.swap(false, Ordering::AcqRel)) {
            last_snapshot = Some(Instant::now());
            // The snapshot covers the changed users too.
            ok &= snapshot(&presence, &router, broker).await;
        } else if !users.is_empty() {
            let (held, released): (Vec<UserId>, Vec<UserId>) =
                users.into_iter().partition(|u| router.holds(u));
            if !held.is_empty() {
                want = presence.awaited();
            }
            for part in held.chunks(USERS_PER_ANNOUNCEMENT) {
                match announce_held(&presence, &router, broker, part.to_vec()).await {
                    Ok(seq) => awaited.push(seq),
                    Err(()) => ok = false,
                }
            }
            for part in released.chunks(USERS_PER_ANNOUNCEMENT) {
                ok &= announce(
                    &presence,
                    &router,
                    broker,
                    Announcement::Released(part.to_vec()),
                    Confirm::Nothing,
                )
                .await;
            }
        }
        let ask: Vec<NodeId> = presence
            .ask
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect();
        for node in ask {
            ok &= announce(
                &presence,
                &router,
                broker,
                Announcement::Hello(Some(node)),
                Confirm::Nothing,
            )
            .await;
        }
        let now = Instant::now();
        if ticked {
            ok &= announce(
                &presence,
                &router,
                broker,
                Announcement::Heartbeat,
                Confirm::Nothing,
            )
            .await;
            presence.expire(now);
        }
        if ok {
            resync = false;
            let since = *link_ok_since.get_or_insert(now);
            if now.duration_since(since) >= SETTLE && !presence.trusted() {
                presence.trusted.store(true, Ordering::Release);
            }
        } else {
            if presence.trusted.swap(false, Ordering::AcqRel) {
                warn!(
                    "presence: the broker did not take an announcement; resynchronising when it is back"
                );
            }
            resync = true;
            link_ok_since = None;
        }
        // The first sessions this round announced log in once the others applied it (or the
        // waiting ends with the waiters' own timeout).
        for seq in awaited {
            if !presence
                .wait_acks(seq, &want, round_began + CONFIRM_TIMEOUT)
                .await
            {
                debug!("presence: not every node acknowledged a `Held` in time");
            }
        }
        presence.done.send_replace(round);
    }
    presence.trusted.store(false, Ordering::Release);
    let _ = announce(
        &presence,
        &router,
        broker,
        Announcement::Bye,
        Confirm::Nothing,
    )
    .await;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn user(n: u8) -> UserId {
        UserId::from_bytes([n; USER_ID_LEN])
    }

    #[test]
    fn announcements_round_trip_and_refuse_what_is_not_one() {
        let node = [9u8; NODE_ID_LEN];
        for (seq, a) in [
            (1, Announcement::Held(vec![user(1), user(2)])),
            (2, Announcement::Released(vec![user(1)])),
            (3, Announcement::SnapshotFirst(vec![])),
            (4, Announcement::SnapshotMore(vec![user(3)])),
            (4, Announcement::Heartbeat),
            (4, Announcement::Hello(None)),
            (4, Announcement::Hello(Some(node))),
            (u64::MAX, Announcement::Bye),
        ] {
            assert_eq!(Announcement::parse(&a.encode(seq)), Ok((seq, a.clone())));
        }
        let held = Announcement::Held(vec![user(1)]).encode(1);
        let bad: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("short seq", vec![0; 7]),
            ("no op", vec![0; 8]),
            ("unknown op", [&[0u8; 8][..], &[99]].concat()),
            ("a user cut short", held[..held.len() - 1].to_vec()),
            (
                "heartbeat with data",
                [&[0u8; 8][..], &[op::HEARTBEAT, 1]].concat(),
            ),
            ("bye with data", [&[0u8; 8][..], &[op::BYE, 1]].concat()),
            (
                "hello with a short node id",
                [&[0u8; 8][..], &[op::HELLO, 1, 2]].concat(),
            ),
        ];
        for (name, body) in bad {
            assert_eq!(Announcement::parse(&body), Err(()), "{name}");
        }
    }

    fn key() -> LocalKey {
        presence_key(&[5; 32])
    }

    /// An announcement from `node` as the broker carries it.
    pub(crate) fn sealed(node: NodeId, seq: u64, a: &Announcement) -> Vec<u8> {
        key().seal(&label(&node), &a.encode(seq))
    }

    fn apply(p: &Presence, from: u8, seq: u64, a: Announcement) {
        p.apply([from; NODE_ID_LEN], &sealed([from; NODE_ID_LEN], seq, &a))
            .unwrap();
    }

    fn asked(p: &Presence) -> Vec<NodeId> {
        p.ask.lock().unwrap().drain().collect()
    }

    /// The other nodes `p` believes hold `user`, as a plain list.
    fn held_by(p: &Presence, user: &UserId) -> Option<Vec<NodeId>> {
        p.others(user).map(|nodes| nodes.to_vec())
    }

    #[tokio::test]
    async fn the_table_follows_announcements_and_asks_after_a_gap() {
        let p = Presence::new([0; NODE_ID_LEN], key());
        let (a, b) = (user(1), user(2));
        // Node 1 starts: snapshot, then deltas in order.
        apply(&p, 1, 1, Announcement::SnapshotFirst(vec![a]));
        apply(&p, 1, 2, Announcement::Held(vec![b]));
        assert_eq!(held_by(&p, &a), Some(vec![[1; NODE_ID_LEN]]));
        assert_eq!(held_by(&p, &b), Some(vec![[1; NODE_ID_LEN]]));
        apply(&p, 2, 1, Announcement::SnapshotFirst(vec![a]));
        assert_eq!(p.others(&a).map(|n| n.len()), Some(2));
        assert!(asked(&p).is_empty(), "nothing missed yet");
        apply(&p, 1, 3, Announcement::Released(vec![a]));
        assert_eq!(held_by(&p, &a), Some(vec![[2; NODE_ID_LEN]]));
        apply(&p, 1, 3, Announcement::Heartbeat);
        assert!(asked(&p).is_empty());

        // Number 4 is lost: 5 is applied (best knowledge) and node 1 is asked for a snapshot.
        apply(&p, 1, 5, Announcement::Released(vec![b]));
        assert_eq!(p.others(&b), None);
        assert_eq!(asked(&p), vec![[1; NODE_ID_LEN]]);
        // A heartbeat with a number never seen (the last announcement was lost) asks too, but
        // not more often than ASK_INTERVAL.
        apply(&p, 1, 6, Announcement::Heartbeat);
        assert!(asked(&p).is_empty(), "asked a moment ago");
        // The snapshot replaces whatever node 1 was believed to hold.
        apply(&p, 1, 6, Announcement::SnapshotFirst(vec![b]));
        assert_eq!(held_by(&p, &b), Some(vec![[1; NODE_ID_LEN]]));
        assert_eq!(held_by(&p, &a), Some(vec![[2; NODE_ID_LEN]]));

        // An old announcement again (a replay by a broker publisher) changes nothing.
        apply(&p, 1, 2, Announcement::Held(vec![a]));
        apply(&p, 1, 3, Announcement::Released(vec![b]));
        apply(&p, 1, 1, Announcement::SnapshotFirst(vec![]));
        assert_eq!(held_by(&p, &b), Some(vec![[1; NODE_ID_LEN]]));
        assert_eq!(held_by(&p, &a), Some(vec![[2; NODE_ID_LEN]]));
        assert!(asked(&p).is_empty(), "a replay is not a gap");

        // A hello for someone else asks nothing of us; one for us or everyone does.
        apply(&p, 2, 1, Announcement::Hello(Some([7; NODE_ID_LEN])));
        assert!(!p.snapshot_wanted.load(Ordering::Acquire));
        apply(&p, 2, 1, Announcement::Hello(Some([0; NODE_ID_LEN])));
        assert!(p.snapshot_wanted.swap(false, Ordering::AcqRel));

        // Bye forgets a node and everything it held.
        apply(&p, 2, 1, Announcement::Bye);
        assert_eq!(p.others(&a), None);
        // This node's own announcements change nothing.
        p.apply(
            [0; NODE_ID_LEN],
            &sealed([0; NODE_ID_LEN], 1, &Announcement::Held(vec![a])),
        )
        .unwrap();
        assert_eq!(p.others(&a), None);
    }

    #[test]
    fn announcements_are_sealed_to_the_cluster_and_their_sender() {
        let p = Presence::new([0; NODE_ID_LEN], key());
        let held = Announcement::Held(vec![user(1)]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("in the clear", held.encode(1)),
            (
                "under another cluster's key",
                presence_key(&[6; 32]).seal(&label(&[1; NODE_ID_LEN]), &held.encode(1)),
            ),
            ("sealed by another node", sealed([2; NODE_ID_LEN], 1, &held)),
            (
                "cut short",
                sealed([1; NODE_ID_LEN], 1, &held)[..20].to_vec(),
            ),
        ];
        for (name, body) in cases {
            assert_eq!(p.apply([1; NODE_ID_LEN], &body), Err(()), "{name}");
        }
        assert_eq!(p.others(&user(1)), None);
        assert_eq!(
            p.apply([1; NODE_ID_LEN], &sealed([1; NODE_ID_LEN], 1, &held)),
            Ok(Some(1))
        );
        assert_eq!(held_by(&p, &user(1)), Some(vec![[1; NODE_ID_LEN]]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_waits_for_every_node_known_when_it_was_sent() {
        const N: usize = NODE_ID_LEN;
        let p = Arc::new(Presence::new([0; N], key()));
        apply(&p, 1, 1, Announcement::SnapshotFirst(vec![]));
        apply(&p, 2, 1, Announcement::SnapshotFirst(vec![]));
        let want = p.peer_ids();
        // Applying a `Held` asks the caller to acknowledge it; nothing else does.
        assert_eq!(
            p.apply(
                [1; N],
                &sealed([1; N], 2, &Announcement::Held(vec![user(1)]))
            ),
            Ok(Some(2))
        );
        assert_eq!(
            p.apply([1; N], &sealed([1; N], 3, &Announcement::Released(vec![]))),
            Ok(None)
        );

        p.expect_acks(5);
        // An acknowledgement of another node's announcement, or one that does not parse, is
        // refused.
        assert_eq!(p.ack([1; N], &Presence::ack_body(&[9; N], 5)), Err(()));
        assert_eq!(p.ack([1; N], &[0; N]), Err(()));
        assert_eq!(p.ack([1; N], &[0; N + 9]), Err(()));
        assert!(!p.acked_by_all(5, &want));
        assert_eq!(p.ack([1; N], &Presence::ack_body(&[0; N], 5)), Ok(()));
        assert!(!p.acked_by_all(5, &want), "node 2 has not acknowledged it");
        // A node that leaves is not waited for any more.
        apply(&p, 2, 1, Announcement::Bye);
        assert!(p.acked_by_all(5, &want));
        p.stop_acks(5);

        // A node that never acknowledges: the wait ends at its deadline.
        p.expect_acks(6);
        let want = p.peer_ids();
        let deadline = Instant::now() + CONFIRM_TIMEOUT;
        assert!(!p.wait_acks(6, &want, deadline).await);
        assert_eq!(Instant::now(), deadline);

        // An acknowledgement that comes during the wait ends it.
        p.expect_acks(7);
        let waiter = tokio::spawn({
            let (p, want) = (Arc::clone(&p), want.clone());
            async move {
                p.wait_acks(7, &want, Instant::now() + CONFIRM_TIMEOUT)
                    .await
            }
        });
        tokio::task::yield_now().await;
        p.ack([1; N], &Presence::ack_body(&[0; N], 7)).unwrap();
        assert!(waiter.await.unwrap());
        // Once the wait is over, an acknowledgement (late, or replayed) keeps nothing.
        p.ack([1; N], &Presence::ack_body(&[0; N], 7)).unwrap();
        assert!(p.acks.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn silent_nodes_are_forgotten() {
        let p = Presence::new([0; NODE_ID_LEN], key());
        apply(&p, 1, 1, Announcement::SnapshotFirst(vec![user(1)]));
        tokio::time::advance(PEER_TIMEOUT / 2).await;
        apply(&p, 2, 1, Announcement::SnapshotFirst(vec![user(1)]));
        tokio::time::advance(PEER_TIMEOUT / 2).await;
        p.expire(Instant::now());
        assert_eq!(held_by(&p, &user(1)), Some(vec![[2; NODE_ID_LEN]]));
    }

    /// What a broker publisher recorded of node 1 while it lived: its snapshot naming user 1,
    /// a `Held` naming user 2 and a heartbeat.
    fn node_1_lived(p: &Presence) -> Vec<(u64, Announcement)> {
        let recorded = vec![
            (1, Announcement::SnapshotFirst(vec![user(1)])),
            (2, Announcement::Held(vec![user(2)])),
            (2, Announcement::Heartbeat),
        ];
        for (seq, a) in recorded.clone() {
            apply(p, 1, seq, a);
        }
        assert_eq!(held_by(p, &user(2)), Some(vec![[1; NODE_ID_LEN]]));
        recorded
    }

    /// Replays `recorded` heartbeat first (so that the node is in the table again when its
    /// numbered announcements come), and returns what `apply` answered for each.
    fn replay(p: &Presence, recorded: &[(u64, Announcement)]) -> Vec<Option<u64>> {
        let mut order: Vec<&(u64, Announcement)> = recorded.iter().collect();
        order.sort_by_key(|(_, a)| a.numbered());
        order
            .into_iter()
            .map(|(seq, a)| {
                p.apply([1; NODE_ID_LEN], &sealed([1; NODE_ID_LEN], *seq, a))
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn a_replay_cannot_bring_back_a_node_that_said_bye() {
        let p = Presence::new([0; NODE_ID_LEN], key());
        let recorded = node_1_lived(&p);
        apply(&p, 1, 2, Announcement::Bye);
        assert_eq!(p.peer_count(), 0);

        // Its id was new when it started and it said it left: nothing more from it is applied,
        // not even the hello or the heartbeat that would put it back in the table.
        let mut recorded = recorded;
        recorded.push((2, Announcement::Hello(None)));
        assert!(
            replay(&p, &recorded).iter().all(Option::is_none),
            "nothing to acknowledge"
        );
        assert_eq!(p.others(&user(1)), None);
        assert_eq!(p.others(&user(2)), None);
        assert_eq!(p.peer_count(), 0, "a `Held` would wait for it");
        assert!(p.peer_ids().is_empty());
        assert!(!p.snapshot_wanted.load(Ordering::Acquire));
        assert!(asked(&p).is_empty());
        // Its goodbye again changes nothing either.
        apply(&p, 1, 2, Announcement::Bye);
        assert_eq!(p.peer_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replay_cannot_bring_back_the_users_of_an_expired_node() {
        let p = Presence::new([0; NODE_ID_LEN], key());
        let recorded = node_1_lived(&p);
        tokio::time::advance(PEER_TIMEOUT).await;
        p.expire(Instant::now());
        assert_eq!(p.peer_count(), 0);

        // Its numbered announcements are older than the last number applied before it was
        // forgotten: ignored, nothing to acknowledge, nobody held. (The heartbeat puts it back
        // in the table, without users: the residual risk in docs/THREAT_MODEL.md §2.2.)
        assert!(replay(&p, &recorded).iter().all(Option::is_none));
        assert_eq!(p.others(&user(1)), None);
        assert_eq!(p.others(&user(2)), None);
        assert_eq!(p.peer_count(), 1, "the replayed heartbeat");
        assert!(
            p.awaited().is_empty(),
            "a login does not wait for a node back on a replayed heartbeat"
        );
        // Forgotten again, and replayed again: the number it reached is still remembered.
        tokio::time::advance(PEER_TIMEOUT).await;
        p.expire(Instant::now());
        assert!(replay(&p, &recorded).iter().all(Option::is_none));
        assert_eq!(p.others(&user(1)), None);
        assert_eq!(p.others(&user(2)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_back_after_expiry_is_taken_with_its_new_numbers() {
        let p = Presence::new([0; NODE_ID_LEN], key());
        node_1_lived(&p);
        tokio::time::advance(PEER_TIMEOUT).await;
        p.expire(Instant::now());
        assert_eq!(p.peer_count(), 0);

        // Heard again (a heartbeat): in the table, but a `Held` does not wait for it yet.
        apply(&p, 1, 2, Announcement::Heartbeat);
        assert_eq!(p.peer_count(), 1);
        assert!(p.awaited().is_empty());
        // It was only cut off: its next `Held` (number 3) is applied and acknowledged, and,
        // since what it did meanwhile is unknown, it is asked for a snapshot.
        assert_eq!(
            p.apply(
                [1; NODE_ID_LEN],
                &sealed([1; NODE_ID_LEN], 3, &Announcement::Held(vec![user(3)]))
            ),
            Ok(Some(3))
        );
        assert_eq!(held_by(&p, &user(3)), Some(vec![[1; NODE_ID_LEN]]));
        assert_eq!(asked(&p), vec![[1; NODE_ID_LEN]]);
        assert_eq!(
            p.awaited(),
            HashSet::from([[1; NODE_ID_LEN]]),
            "a higher number: waited for again"
        );
        apply(
            &p,
            1,
            4,
            Announcement::SnapshotFirst(vec![user(1), user(3)]),
        );
        assert_eq!(held_by(&p, &user(1)), Some(vec![[1; NODE_ID_LEN]]));
        assert_eq!(held_by(&p, &user(3)), Some(vec![[1; NODE_ID_LEN]]));
        assert_eq!(p.others(&user(2)), None);
        assert_eq!(p.peer_ids(), HashSet::from([[1; NODE_ID_LEN]]));
        // In order again: nothing more to ask.
        apply(&p, 1, 5, Announcement::Released(vec![user(1)]));
        apply(&p, 1, 5, Announcement::Heartbeat);
        assert_eq!(p.others(&user(1)), None);
        assert!(asked(&p).is_empty());
    }

    #[test]
    fn departed_nodes_are_remembered_up_to_a_bound() {
        fn node(n: usize) -> NodeId {
            let mut id = [0; NODE_ID_LEN];
            id[..8].copy_from_slice(&(n as u64).to_be_bytes());
            id
        }
        let mut d = Departed::default();
        d.note(node(0), Gone::Expired(7));
        d.note(node(1), Gone::Retired);
        // Coming and going again neither lowers a number, nor un-retires, nor moves a node.
        d.note(node(0), Gone::Expired(3));
        d.note(node(1), Gone::Expired(9));
        assert_eq!(d.last_seq(&node(0)), 7);
        assert!(d.retired(&node(1)) && !d.retired(&node(0)));
        d.note(node(0), Gone::Retired);
        assert!(d.retired(&node(0)));
        for n in 2..REMEMBERED_DEPARTURES {
            d.note(node(n), Gone::Expired(n as u64));
        }
        assert_eq!(d.gone.len(), REMEMBERED_DEPARTURES);
        assert!(d.retired(&node(0)));
        // One more departure: the oldest is forgotten, and only it.
        d.note(node(REMEMBERED_DEPARTURES), Gone::Expired(1));
        assert_eq!(d.gone.len(), REMEMBERED_DEPARTURES);
        assert_eq!(d.order.len(), REMEMBERED_DEPARTURES);
        assert!(!d.retired(&node(0)));
        assert_eq!(d.last_seq(&node(0)), 0);
        assert!(d.retired(&node(1)));
        assert_eq!(d.last_seq(&node(2)), 2);
    }
}

//! Routing: which live sessions of which users this node holds, and delivery to them.
//!
//! A user may be connected more than once (several devices, or a reconnect overlapping the old
//! session). Each session has a bounded queue drained by its own writer; delivery only
//! ever *tries* to enqueue, so a slow consumer never slows the sender or anyone else.
//!
//! The queue is a `VecDeque` under a lock, not a tokio channel: a bounded tokio `mpsc`
//! allocates its shared state and a first block of 32 slots when it is made, about 1.5 KiB for
//! every session, idle or not. This one holds no buffer until a frame arrives, and gives it back
//! whenever its writer finds it empty, so an idle session pays for a few words
//! (docs/BENCHMARKS.md, issue 19).
//!
//! A queued frame is either a **reply** to the session's own request or a **delivery** pushed
//! to it. They share one queue, in the order they came, except while the writer sends the
//! login's mailbox backlog: deliveries must wait until the backlog's `PendingEnd`, replies need
//! not, so replies are then held apart and the writer takes them between pages of the backlog
//! ([`SessionOutbox::take_replies`]). Without that, a reconnecting client's every answer waited
//! behind up to the whole mailbox (10 000 entries), and once the queue filled with them, its
//! reader stopped and live deliveries to it were refused.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use dashmap::DashMap;
use syncra_core::UserId;
use syncra_core::broker::BrokerSink;
use syncra_core::transport::CloseReason;
use syncra_core::wire::ErrorCode;
use tokio::sync::Notify;

use crate::config::OverflowPolicy;

/// Bytes of the node id that follows the MAC in every broker payload.
pub const NODE_ID_LEN: usize = 16;
/// Bytes of the MAC at the start of every broker payload.
pub const MAC_LEN: usize = 32;
/// Bytes before the kind in a broker payload: the MAC, then the node id.
pub const PAYLOAD_PREFIX: usize = MAC_LEN + NODE_ID_LEN;

/// The context the MAC key is derived under from the cluster key: the version of the payload
/// format, so that a payload of an earlier format never verifies.
const MAC_CONTEXT: &str = "syncra/v4/cluster-payload";

/// Authenticates payloads between the nodes of a cluster: BLAKE3 in its keyed mode, under a key
/// derived from the cluster key, over everything after the MAC (node id, kind, body). The
/// broker is a trust boundary: anyone who can publish on NATS or Redis could otherwise hand any
/// frame to any user's sessions.
///
/// BLAKE3 rather than HMAC-SHA256 (the format before, `syncra/v2`): the MAC covers every byte
/// of every cross-node batch twice (made by the sender, checked by the receiver) and HMAC-SHA256
/// was the largest single item in a two-node run's profile; keyed BLAKE3 is a PRF like HMAC,
/// needs no nonce, and hashes a batch of many deliveries several times faster
/// (docs/BENCHMARKS.md).
///
/// What it covers is one contiguous slice of the payload, hashed in one call (`syncra/v4`):
/// BLAKE3 hashes up to sixteen 1 KiB chunks at once only from a chunk boundary, and the
/// `syncra/v3` layout (node id, then MAC, with a label and the node id hashed before the body)
/// made it hash a batch's first chunks one block at a time: 10.0 against 5.5 µs for 18 KB on
/// the 2026-12-07 Intel Xeon (docs/BENCHMARKS.md).
#[derive(Clone)]
pub struct ClusterMac {
    /// The key derived for this payload format.
    key: zeroize::Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for ClusterMac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterMac(..)")
    }
}

impl ClusterMac {
    /// A MAC under the cluster key `key`.
    pub fn new(key: &[u8; 32]) -> Self {
        // The payload format's version is in the key: a payload of another format (the
        // per-user topics', the HMAC-SHA256 one, `syncra/v3`'s) never verifies as one of this.
        ClusterMac {
            key: zeroize::Zeroizing::new(blake3::derive_key(MAC_CONTEXT, key)),
        }
    }

    /// The MAC of `covered`: everything after the MAC in a payload, in one call.
    fn mac(&self, covered: &[u8]) -> blake3::Hash {
        blake3::keyed_hash(&self.key, covered)
    }

    /// Whether `tag` authenticates `covered` (compared in constant time).
    fn verify(&self, covered: &[u8], tag: &[u8]) -> bool {
        let Ok(tag) = <[u8; MAC_LEN]>::try_from(tag) else {
            return false;
        };
        // `Hash`'s equality with bytes is constant-time.
        self.mac(covered) == tag
    }
}

/// A node's id: random per process, at the start of every broker payload the node sends.
pub type NodeId = [u8; NODE_ID_LEN];

/// What a broker payload carries after the node id and the MAC: its first byte.
mod kind {
    /// Deliveries for users held by the node the payload is addressed to (`crate::links`).
    pub const BATCH: u8 = 1;
    /// A presence announcement (`crate::presence`).
    pub const PRESENCE: u8 = 2;
    /// The answer to a batch (`crate::links`).
    pub const ANSWER: u8 = 3;
    /// The acknowledgement of a presence `Held` (`crate::presence`, on brokers that need it).
    pub const PRESENCE_ACK: u8 = 4;
}

/// The topic every node subscribes to for presence announcements.
pub const PRESENCE_TOPIC: &str = "syncra.presence";

const NODE_TOPIC_PREFIX: &str = "syncra.n.";

/// The topic that carries deliveries to one node: one subscription per node, whatever the
/// number of users it holds.
pub fn node_topic(node: &NodeId) -> String {
    let mut topic = String::with_capacity(NODE_TOPIC_PREFIX.len() + 2 * NODE_ID_LEN);
    topic.push_str(NODE_TOPIC_PREFIX);
    topic.push_str(&data_encoding::HEXLOWER.encode(node));
    topic
}

/// The sending side of one session: its queue and the means to close it.
#[derive(Debug)]
pub struct SessionQueue {
    /// Unique per node, for removal.
    pub id: u64,
    /// Frames waiting at most.
    capacity: usize,
    frames: Mutex<Frames>,
    /// Wakes the writer: frames arrived, or the session was asked to close.
    filled: Notify,
    /// Wakes a reply waiting for room: the writer took frames, or went away.
    drained: Notify,
    dropped: AtomicU64,
    close: Mutex<Option<CloseReason>>,
    /// The node's idle sweep during which the peer last sent a frame ([`Router::sweep_idle`]).
    heard: AtomicU32,
}

/// The frames waiting for a session's writer, and whether more may come.
#[derive(Debug, Default)]
struct Frames {
    waiting: VecDeque<Bytes>,
    /// While the login's mailbox backlog is written: the replies, held apart from the
    /// deliveries in `waiting` so that they can overtake the backlog (which deliveries must
    /// not). `None` otherwise, and then replies wait in `waiting` with the deliveries.
    replies: Option<VecDeque<Bytes>>,
    /// The writer closed the queue (it is flushing before it ends): nothing more is taken.
    shut: bool,
    /// The writer is gone: nothing will be written any more.
    gone: bool,
}

/// What a queued frame is, which decides whether it may overtake the mailbox backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// A frame pushed to the session (a `Deliver`): after the backlog's `PendingEnd`.
    Delivery,
    /// The answer to the session's own request: may overtake the backlog.
    Reply,
}

/// The receiving side, owned by the session's writer.
#[derive(Debug)]
pub struct SessionOutbox {
    /// The shared half.
    pub queue: Arc<SessionQueue>,
}

impl SessionQueue {
    /// A queue holding up to `capacity` frames, with its receiving side.
    pub fn channel(id: u64, capacity: usize) -> SessionOutbox {
        SessionOutbox {
            queue: Arc::new(SessionQueue {
                id,
                capacity,
                frames: Mutex::default(),
                filled: Notify::new(),
                drained: Notify::new(),
                dropped: AtomicU64::new(0),
                close: Mutex::new(None),
                heard: AtomicU32::new(0),
            }),
        }
    }

    /// Notes that the peer sent a frame during idle sweep `sweep` ([`Router::sweep`]).
    pub fn heard(&self, sweep: u32) {
        self.heard.store(sweep, Ordering::Relaxed);
    }

    fn frames(&self) -> std::sync::MutexGuard<'_, Frames> {
        self.frames.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `frame` if there is room: `Ok`, or why not (full, or the writer is gone) and
    /// the frame back. While the backlog is written, replies and deliveries wait apart and
    /// each may fill `capacity`: deliveries that cannot leave yet never hold up a reply, and a
    /// reply never takes a delivery's room. (Replies are few at a time: the session's reader
    /// waits for room before it reads on.)
    fn push(&self, frame: Bytes, lane: Lane) -> Result<(), (Offer, Bytes)> {
        let mut frames = self.frames();
        if frames.gone || frames.shut {
            return Err((Offer::Gone, frame));
        }
        let Frames {
            waiting, replies, ..
        } = &mut *frames;
        let queue = match (lane, replies) {
            (Lane::Reply, Some(replies)) => replies,
            _ => waiting,
        };
        if queue.len() >= self.capacity {
            return Err((Offer::Full, frame));
        }
        queue.push_back(frame);
        drop(frames);
        self.filled.notify_one();
        Ok(())
    }

    /// Tries to enqueue a delivery. Returns whether the session took it.
    pub fn offer(&self, frame: Bytes, policy: OverflowPolicy) -> Offer {
        match self.push(frame, Lane::Delivery) {
            Ok(()) => Offer::Taken,
            Err((Offer::Full, _)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                if policy == OverflowPolicy::Disconnect {
                    self.close(CloseReason::error(
                        ErrorCode::QueueOverflow,
                        "this session could not keep up and was closed; reconnect",
                    ));
                }
                Offer::Full
            }
            Err((other, _)) => other,
        }
    }

    /// Enqueues a reply to this session's own request if there is room; if not, gives it back
    /// (`Some`) to wait with [`SessionQueue::reply`], or says the session is gone (`None`).
    pub fn try_reply(&self, frame: Bytes) -> Result<(), Option<Bytes>> {
        match self.push(frame, Lane::Reply) {
            Ok(()) => Ok(()),
            Err((Offer::Full, frame)) => Err(Some(frame)),
            Err(_) => Err(None),
        }
    }

    /// Enqueues a reply to this session's own request, waiting for room: the client that
    /// asked is the one whose reader is slowed, nobody else.
    pub async fn reply(&self, frame: Bytes) -> bool {
        let mut frame = frame;
        loop {
            // Registered before the check, so room made in between is not missed.
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            match self.push(frame, Lane::Reply) {
                Ok(()) => return true,
                Err((Offer::Full, back)) => {
                    frame = back;
                    drained.await;
                }
                Err(_) => return false,
            }
        }
    }

    /// How many deliveries were refused since the last call, resetting the count.
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }

    /// Asks the writer to flush what is queued, send a close frame with `reason` and stop.
    /// False if it was asked before (the first reason stands).
    pub fn close(&self, reason: CloseReason) -> bool {
        let mut slot = self.close.lock().unwrap_or_else(|e| e.into_inner());
        let first = slot.is_none();
        if first {
            *slot = Some(reason);
        }
        drop(slot);
        // The writer learns it from `next_batch`; a permit is kept if it is not waiting yet.
        self.filled.notify_one();
        first
    }

    /// The reason the session was asked to close with, once it was.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What [`SessionOutbox::next_batch`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Frames, swapped into the batch.
    Batch,
    /// Nothing waiting, and the session was asked to close, for this reason.
    Closed(CloseReason),
    /// Nothing waiting, and the queue is shut: the end.
    Shut,
}

impl SessionOutbox {
    /// Waits for frames and swaps every waiting one into `batch`, which must be empty (its
    /// buffer becomes the queue's). Frames waiting are taken before a close is reported, and a
    /// shut queue reports only what it still holds. Before it waits, it gives back the memory
    /// of both buffers: an idle session holds none.
    pub async fn next_batch(&mut self, batch: &mut VecDeque<Bytes>) -> Next {
        debug_assert!(batch.is_empty());
        loop {
            {
                let mut frames = self.queue.frames();
                if !frames.waiting.is_empty() {
                    std::mem::swap(&mut frames.waiting, batch);
                    drop(frames);
                    self.queue.drained.notify_one();
                    return Next::Batch;
                }
                if frames.shut {
                    return Next::Shut;
                }
                frames.waiting = VecDeque::new();
            }
            if let Some(reason) = self.queue.close_reason() {
                return Next::Closed(reason);
            }
            *batch = VecDeque::new();
            self.queue.filled.notified().await;
        }
    }

    /// From now until [`SessionOutbox::end_backlog`], replies are held apart from deliveries
    /// for [`SessionOutbox::take_replies`]. Called before the session's reader starts, so
    /// that every reply can overtake the backlog.
    pub fn begin_backlog(&mut self) {
        let mut frames = self.queue.frames();
        // Allocates nothing until a reply comes.
        frames.replies.get_or_insert_with(VecDeque::new);
    }

    /// Swaps the replies queued so far into `batch`, which must be empty, without waiting and
    /// leaving the deliveries queued: between pages of the backlog. Takes nothing outside
    /// the backlog.
    pub fn take_replies(&mut self, batch: &mut VecDeque<Bytes>) {
        debug_assert!(batch.is_empty());
        let mut frames = self.queue.frames();
        match frames.replies.as_mut() {
            Some(replies) if !replies.is_empty() => {
                std::mem::swap(replies, batch);
                drop(frames);
                // A reply waiting for room has it now.
                self.queue.drained.notify_one();
            }
            _ => {}
        }
    }

    /// The backlog's `PendingEnd` is written: replies and deliveries share the queue again.
    /// Replies still held leave first (each kind keeps its own order; a reply queued now comes
    /// after them all).
    pub fn end_backlog(&mut self) {
        let mut frames = self.queue.frames();
        let Some(mut replies) = frames.replies.take() else {
            return;
        };
        if replies.is_empty() {
            return;
        }
        replies.append(&mut frames.waiting);
        frames.waiting = replies;
        drop(frames);
        self.queue.filled.notify_one();
    }

    /// Takes the oldest waiting frame, if any.
    #[cfg(test)]
    pub fn try_recv(&mut self) -> Option<Bytes> {
        self.queue.frames().waiting.pop_front()
    }

    /// Whether the queue holds a buffer now.
    #[cfg(test)]
    fn holds_buffer(&self) -> bool {
        self.queue.frames().waiting.capacity() > 0
    }

    /// Stops taking frames; what is queued can still be taken with
    /// [`SessionOutbox::next_batch`].
    pub fn shut(&self) {
        self.queue.frames().shut = true;
        // A reply waiting for room sees the queue closed.
        self.queue.drained.notify_one();
    }
}

impl Drop for SessionOutbox {
    fn drop(&mut self) {
        let mut frames = self.queue.frames();
        frames.gone = true;
        frames.waiting = VecDeque::new();
        frames.replies = None;
        drop(frames);
        self.queue.drained.notify_one();
    }
}

/// The result of offering a frame to one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Enqueued.
    Taken,
    /// The queue was full.
    Full,
    /// The session is gone.
    Gone,
}

/// Local delivery to all sessions of a user.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalDelivery {
    /// Sessions that took it.
    pub taken: usize,
    /// Sessions whose queue was full.
    pub full: usize,
}

/// The sessions this node holds, by user.
#[derive(Debug)]
pub struct Router {
    node_id: [u8; NODE_ID_LEN],
    policy: OverflowPolicy,
    mac: ClusterMac,
    max_frame: usize,
    sessions: DashMap<UserId, Vec<Arc<SessionQueue>>>,
    next_id: AtomicU64,
    /// Idle sweeps so far ([`Router::sweep_idle`]).
    sweeps: AtomicU32,
}

/// Sweeps without a frame after which a session is idle: with a sweep every quarter of the
/// idle timeout, the close comes between 1 and 1.25 × the timeout after the last frame.
pub const IDLE_SWEEPS: u32 = 4;

impl Router {
    /// An empty router for a node; `mac` authenticates what it sends to and takes from other
    /// nodes, `max_frame` bounds what it takes.
    pub fn new(
        node_id: [u8; NODE_ID_LEN],
        policy: OverflowPolicy,
        mac: ClusterMac,
        max_frame: usize,
    ) -> Self {
        Router {
            node_id,
            policy,
            mac,
            max_frame,
            sessions: DashMap::new(),
            next_id: AtomicU64::new(1),
            sweeps: AtomicU32::new(0),
        }
    }

    /// A fresh session id.
    pub fn next_session_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds a session, heard from now. Returns true if it is the user's first on this node
    /// (subscribe).
    pub fn add(&self, user: UserId, queue: Arc<SessionQueue>) -> bool {
        queue.heard(self.sweep());
        let mut entry = self.sessions.entry(user).or_default();
        entry.push(queue);
        entry.len() == 1
    }

    /// Removes a session. Returns true if it was the user's last on this node (unsubscribe).
    pub fn remove(&self, user: &UserId, id: u64) -> bool {
        let mut last = false;
        self.sessions.remove_if_mut(user, |_, list| {
            list.retain(|q| q.id != id);
            last = list.is_empty();
            last
        });
        last
    }

    /// Whether this node holds a session of the user.
    pub fn holds(&self, user: &UserId) -> bool {
        self.sessions.contains_key(user)
    }

    /// Offers an encoded `Deliver` frame to every session of a user on this node.
    pub fn deliver_local(&self, user: &UserId, frame: &Bytes) -> LocalDelivery {
        let mut result = LocalDelivery::default();
        if let Some(list) = self.sessions.get(user) {
            for q in list.iter() {
                match q.offer(frame.clone(), self.policy) {
                    Offer::Taken => result.taken += 1,
                    Offer::Full => result.full += 1,
                    Offer::Gone => {}
                }
            }
        }
        result
    }

    /// This node's id.
    #[cfg(test)]
    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    /// The users this node holds a session of, for a presence snapshot.
    pub fn users(&self) -> Vec<UserId> {
        self.sessions.iter().map(|e| *e.key()).collect()
    }

    /// The `Deliver` frame of an envelope, encoded once for every local session and every
    /// broker payload.
    pub fn deliver_frame(&self, envelope: &[u8]) -> Bytes {
        syncra_core::wire::encode_deliver_after(&[], envelope)
    }

    /// A batch of deliveries (`crate::links`) as a broker payload.
    #[cfg(test)]
    pub fn batch_payload(&self, body: &[u8]) -> Bytes {
        self.seal(kind::BATCH, body)
    }

    /// [`Router::batch_payload`] with the body written by `write` (about `len` bytes).
    pub fn batch_payload_with(
        &self,
        len: usize,
        write: impl FnOnce(&mut bytes::BytesMut),
    ) -> Bytes {
        self.seal_with(kind::BATCH, len, write)
    }

    /// The answer to a batch as a broker payload.
    pub fn answer_payload(&self, body: &[u8]) -> Bytes {
        self.seal(kind::ANSWER, body)
    }

    /// The acknowledgement of a presence announcement as a broker payload (body:
    /// `crate::presence::Presence::ack_body`).
    pub fn presence_ack_payload(&self, body: &[u8]) -> Bytes {
        self.seal(kind::PRESENCE_ACK, body)
    }

    /// A presence payload with `body` (see `crate::presence`).
    pub fn presence_payload(&self, body: &[u8]) -> Bytes {
        self.seal(kind::PRESENCE, body)
    }

    /// MAC over everything after it, node id, then the kind and the body.
    fn seal(&self, kind: u8, body: &[u8]) -> Bytes {
        self.seal_with(kind, body.len(), |out| out.extend_from_slice(body))
    }

    /// [`Router::seal`] with the body written by `write` straight into the payload (about
    /// `len` bytes), so a batch is not copied twice.
    pub fn seal_with(
        &self,
        kind: u8,
        len: usize,
        write: impl FnOnce(&mut bytes::BytesMut),
    ) -> Bytes {
        let mut payload = bytes::BytesMut::with_capacity(PAYLOAD_PREFIX + 1 + len);
        payload.extend_from_slice(&[0u8; MAC_LEN]);
        payload.extend_from_slice(&self.node_id);
        payload.extend_from_slice(&[kind]);
        write(&mut payload);
        let tag = self.mac.mac(&payload[MAC_LEN..]);
        payload[..MAC_LEN].copy_from_slice(tag.as_bytes());
        payload.freeze()
    }

    /// The current idle sweep, for a session to note when it last heard its peer
    /// ([`SessionQueue::heard`]).
    pub fn sweep(&self) -> u32 {
        self.sweeps.load(Ordering::Relaxed)
    }

    /// One idle sweep, made every quarter of the idle timeout: closes with `reason` every
    /// session whose peer sent no frame during the last [`IDLE_SWEEPS`] sweeps. One pass over
    /// the node instead of a timer per session, which would cost every session its memory for
    /// its whole life and, re-armed on each frame, CPU on every message. Returns how many
    /// sessions it asked to close.
    pub fn sweep_idle(&self, reason: impl Fn() -> CloseReason) -> usize {
        let now = self.sweeps.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let mut closed = 0;
        for entry in &self.sessions {
            for queue in entry.value() {
                let heard = queue.heard.load(Ordering::Relaxed);
                if now.wrapping_sub(heard) > IDLE_SWEEPS && queue.close(reason()) {
                    closed += 1;
                }
            }
        }
        closed
    }

    /// Every session, for shutdown.
    pub fn all_sessions(&self) -> Vec<Arc<SessionQueue>> {
        self.sessions
            .iter()
            .flat_map(|e| e.value().clone())
            .collect()
    }
}

/// Receives payloads from other nodes: deliveries go to local sessions, presence
/// announcements to the presence table.
///
/// The broker is a trust boundary: whoever can publish on it (a compromised broker account, a
/// misconfigured ACL, another tenant) is hostile. A payload is looked at only if its MAC
/// verifies under the cluster key. A delivery reaches a session only if it came on this node's
/// own topic and is exactly one well-formed `Deliver` frame within the frame limit whose
/// envelope names the payload's user as a recipient; a presence announcement is applied only
/// if it came on the presence topic and parses exactly. Everything else is dropped and counted
/// by reason (`syncra_relay_broker_dropped_total`).
#[derive(Debug)]
pub struct RouterSink {
    /// The router to deliver into.
    pub router: Arc<Router>,
    /// Where presence announcements go.
    pub presence: Arc<crate::presence::Presence>,
    /// Where answers to this node's batches go, and answers to other nodes' batches leave.
    pub links: Arc<crate::links::Links>,
    /// Where drops are counted and logged.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// This node's delivery topic.
    pub topic: String,
}

/// Why a broker payload was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Not this node's topic or the presence topic, or a payload on the wrong one of the two.
    Topic,
    /// Shorter than a node id, a MAC and a kind.
    Short,
    /// The MAC does not verify under the cluster key.
    Mac,
    /// A batch that does not parse, or a delivery in it that is not one well-formed `Deliver`
    /// frame.
    NotDeliver,
    /// The envelope's header is malformed or does not name the payload's user.
    NotRecipient,
    /// A presence announcement that does not parse.
    NotPresence,
    /// An answer that does not parse or answers nothing this node sent to its sender.
    NotAnswer,
}

impl Dropped {
    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Dropped::Topic => "bad_topic",
            Dropped::Short => "truncated",
            Dropped::Mac => "bad_mac",
            Dropped::NotDeliver => "not_a_delivery",
            Dropped::NotRecipient => "not_a_recipient",
            Dropped::NotPresence => "not_presence",
            Dropped::NotAnswer => "not_an_answer",
        }
    }
}

/// An authentic payload from another node, by kind, not yet parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum Remote {
    /// This node's own payload come back (nothing is done with it, so a forgery naming this
    /// node achieves nothing).
    Own,
    /// Deliveries for this node's sessions (`crate::links::parse_batch`).
    Batch {
        /// The node that sent it.
        from: NodeId,
        /// Everything after the kind byte.
        body: Bytes,
    },
    /// The answer to one of this node's batches (`crate::links::Links::answer`).
    Answer {
        /// The node that sent it.
        from: NodeId,
        /// Everything after the kind byte.
        body: Bytes,
    },
    /// A presence announcement (`crate::presence::Announcement::parse`).
    Presence {
        /// The node that sent it.
        from: NodeId,
        /// Everything after the kind byte.
        body: Bytes,
    },
    /// The acknowledgement of one of this node's presence announcements
    /// (`crate::presence::Presence::ack`).
    PresenceAck {
        /// The node that sent it.
        from: NodeId,
        /// Everything after the kind byte.
        body: Bytes,
    },
}

impl Router {
    /// Checks a payload from the broker that came on `topic`: its MAC, and that its kind
    /// belongs on that topic; `node_topic` is this node's own delivery topic.
    pub fn accept_remote(
        &self,
        topic: &str,
        node_topic: &str,
        payload: &Bytes,
    ) -> Result<Remote, Dropped> {
        let on_presence = topic == PRESENCE_TOPIC;
        if !on_presence && topic != node_topic {
            return Err(Dropped::Topic);
        }
        if payload.len() <= PAYLOAD_PREFIX {
            return Err(Dropped::Short);
        }
        let (tag, covered) = payload.split_at(MAC_LEN);
        let (node_id, signed) = covered.split_at(NODE_ID_LEN);
        if node_id == self.node_id {
            return Ok(Remote::Own);
        }
        if !self.mac.verify(covered, tag) {
            return Err(Dropped::Mac);
        }
        let mut from = [0u8; NODE_ID_LEN];
        from.copy_from_slice(node_id);
        let body = payload.slice(PAYLOAD_PREFIX + 1..);
        match (signed[0], on_presence) {
            (kind::PRESENCE, true) => Ok(Remote::Presence { from, body }),
            (kind::BATCH, false) => Ok(Remote::Batch { from, body }),
            (kind::ANSWER, false) => Ok(Remote::Answer { from, body }),
            (kind::PRESENCE_ACK, false) => Ok(Remote::PresenceAck { from, body }),
            _ => Err(Dropped::Topic),
        }
    }

    /// Checks one delivery of a batch: exactly one well-formed `Deliver` frame within the frame
    /// limit whose envelope names `user` as a recipient.
    pub fn check_delivery(&self, user: &UserId, frame: &Bytes) -> Result<(), Dropped> {
        let Ok(syncra_core::wire::Frame::Deliver { envelope }) =
            syncra_core::wire::Frame::decode(frame, self.max_frame)
        else {
            return Err(Dropped::NotDeliver);
        };
        // A sealed envelope or an MLS carriage, well-formed and naming this user.
        match syncra_core::carriage::Routed::parse(&envelope) {
            Ok(header) if header.recipient_ids().any(|r| r == *user) => Ok(()),
            _ => Err(Dropped::NotRecipient),
        }
    }

    /// The frame limit.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

impl BrokerSink for RouterSink {
    fn deliver(&self, topic: &str, payload: Bytes) -> bool {
        let dropped = match self.router.accept_remote(topic, &self.topic, &payload) {
            Ok(Remote::Batch { from, body }) => {
                match crate::links::parse_batch(&body, self.router.max_frame()) {
                    Ok((batch, items)) => {
                        self.metrics.broker_batches_in.inc();
                        let taken: Vec<bool> = items
                            .iter()
                            .map(
                                |(user, frame)| match self.router.check_delivery(user, frame) {
                                    Ok(()) => {
                                        self.metrics.broker_in.inc();
                                        self.router.deliver_local(user, frame).taken > 0
                                    }
                                    Err(dropped) => {
                                        self.metrics.broker_drop(dropped.reason());
                                        false
                                    }
                                },
                            )
                            .collect();
                        self.links.reply(from, batch, &taken);
                        return taken.iter().any(|t| *t);
                    }
                    Err(()) => Dropped::NotDeliver,
                }
            }
            Ok(Remote::Answer { from, body }) => match self.links.answer(from, &body) {
                Ok(()) => return false,
                Err(()) => Dropped::NotAnswer,
            },
            Ok(Remote::Presence { from, body }) => match self.presence.apply(from, &body) {
                Ok(held) => {
                    if let Some(seq) = held {
                        self.links.ack_presence(from, seq);
                    }
                    return true;
                }
                Err(()) => Dropped::NotPresence,
            },
            Ok(Remote::PresenceAck { from, body }) => match self.presence.ack(from, &body) {
                Ok(()) => return false,
                Err(()) => Dropped::NotPresence,
            },
            Ok(Remote::Own) => return false,
            Err(dropped) => dropped,
        };
        self.metrics.broker_drop(dropped.reason());
        false
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::presence::Presence;

    type HmacSha256 = hmac::Hmac<sha2::Sha256>;

    #[test]
    fn node_topics_are_distinct_literal_subjects() {
        let (a, b) = (node_topic(&[1; NODE_ID_LEN]), node_topic(&[2; NODE_ID_LEN]));
        assert_ne!(a, b);
        assert_eq!(a, format!("syncra.n.{}", "01".repeat(NODE_ID_LEN)));
        assert_ne!(a, PRESENCE_TOPIC);
    }

    #[tokio::test]
    async fn full_queue_refuses_and_counts_without_blocking() {
        let router = router(1, OverflowPolicy::Reject);
        let user = UserId::from_identity_key(&[1; 32]);
        let out = SessionQueue::channel(router.next_session_id(), 2);
        assert!(router.add(user, out.queue.clone()));
        let frame = Bytes::from_static(b"x");
        assert_eq!(router.deliver_local(&user, &frame).taken, 1);
        assert_eq!(router.deliver_local(&user, &frame).taken, 1);
        let third = router.deliver_local(&user, &frame);
        assert_eq!((third.taken, third.full), (0, 1));
        assert_eq!(out.queue.take_dropped(), 1);
        assert!(out.queue.close_reason().is_none());
        assert!(router.remove(&user, out.queue.id));
        assert!(!router.holds(&user));
    }

    #[tokio::test]
    async fn a_queue_holds_memory_only_while_frames_wait_and_a_reply_waits_for_room() {
        let mut out = SessionQueue::channel(1, 2);
        let queue = out.queue.clone();
        assert!(!out.holds_buffer(), "a new session holds no buffer");
        let frame = Bytes::from_static(b"x");
        assert_eq!(
            queue.offer(frame.clone(), OverflowPolicy::Reject),
            Offer::Taken
        );
        assert!(queue.reply(frame.clone()).await);
        assert_eq!(
            queue.offer(frame.clone(), OverflowPolicy::Reject),
            Offer::Full
        );
        // A reply waits for room, which the writer makes by taking the batch.
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { queue.reply(Bytes::from_static(b"r")).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let mut batch = VecDeque::new();
        assert_eq!(out.next_batch(&mut batch).await, Next::Batch);
        assert_eq!(batch.len(), 2);
        assert!(waiting.await.unwrap());
        batch.clear();
        assert_eq!(out.next_batch(&mut batch).await, Next::Batch);
        assert_eq!(batch, [Bytes::from_static(b"r")]);
        batch.clear();
        // Found empty, the writer gives both buffers back before it waits.
        assert!(
            tokio::time::timeout(Duration::from_millis(20), out.next_batch(&mut batch))
                .await
                .is_err()
        );
        assert!(!out.holds_buffer() && batch.capacity() == 0);
        // Shut: nothing more is taken, what waits is still written, then the end.
        assert_eq!(
            queue.offer(frame.clone(), OverflowPolicy::Reject),
            Offer::Taken
        );
        out.shut();
        assert_eq!(
            queue.offer(frame.clone(), OverflowPolicy::Reject),
            Offer::Gone
        );
        assert_eq!(out.next_batch(&mut batch).await, Next::Batch);
        batch.clear();
        assert_eq!(out.next_batch(&mut batch).await, Next::Shut);
        // The writer gone: a reply says so instead of waiting.
        drop(out);
        assert!(!queue.reply(frame).await);
    }

    /// While the backlog is written, replies are taken apart from deliveries, which stay
    /// queued in their order; each kind has its own room; afterwards, replies still held
    /// leave first and the queue is one again.
    #[tokio::test]
    async fn during_the_backlog_replies_are_taken_apart_and_deliveries_stay() {
        tokio::time::timeout(Duration::from_secs(10), replies_apart())
            .await
            .expect("nothing here waits for room");
    }

    async fn replies_apart() {
        let mut out = SessionQueue::channel(1, 2);
        out.begin_backlog();
        let queue = out.queue.clone();
        let b = Bytes::from_static;
        let offer = |f| queue.offer(b(f), OverflowPolicy::Reject);
        assert_eq!(offer(b"d1"), Offer::Taken);
        assert!(queue.reply(b(b"r1")).await);
        assert_eq!(offer(b"d2"), Offer::Taken);
        assert!(queue.reply(b(b"r2")).await);
        // Deliveries that cannot leave yet take no room from replies, nor replies from them.
        assert_eq!(offer(b"d3"), Offer::Full);
        assert_eq!(queue.try_reply(b(b"r3")), Err(Some(b(b"r3"))));
        let mut batch = VecDeque::new();
        out.take_replies(&mut batch);
        assert_eq!(batch, [b(b"r1"), b(b"r2")]);
        batch.clear();
        out.take_replies(&mut batch);
        assert!(batch.is_empty(), "nothing but replies is taken");
        assert!(queue.reply(b(b"r3")).await);
        out.end_backlog();
        // One queue again: the replies still held first, then the deliveries, each in order.
        assert_eq!(out.next_batch(&mut batch).await, Next::Batch);
        assert_eq!(batch, [b(b"r3"), b(b"d1"), b(b"d2")]);
        batch.clear();
        assert_eq!(offer(b"d4"), Offer::Taken);
        assert!(queue.reply(b(b"r4")).await);
        assert_eq!(out.next_batch(&mut batch).await, Next::Batch);
        assert_eq!(batch, [b(b"d4"), b(b"r4")]);
        batch.clear();
        out.take_replies(&mut batch);
        assert!(
            batch.is_empty(),
            "outside the backlog nothing is taken apart"
        );
        assert_eq!(queue.take_dropped(), 1);
    }

    #[tokio::test]
    async fn disconnect_policy_closes_the_slow_session() {
        let router = router(1, OverflowPolicy::Disconnect);
        let user = UserId::from_identity_key(&[1; 32]);
        let out = SessionQueue::channel(1, 1);
        router.add(user, out.queue.clone());
        let frame = Bytes::from_static(b"x");
        router.deliver_local(&user, &frame);
        router.deliver_local(&user, &frame);
        let mut out = out;
        let mut batch = VecDeque::new();
        assert_eq!(out.next_batch(&mut batch).await, Next::Batch);
        batch.clear();
        match out.next_batch(&mut batch).await {
            Next::Closed(reason) => assert_eq!(reason.code, Some(ErrorCode::QueueOverflow)),
            other => panic!("expected the session closed, got {other:?}"),
        }
    }

    #[test]
    fn the_idle_sweep_closes_only_sessions_not_heard_for_four_sweeps() {
        let router = router(1, OverflowPolicy::Reject);
        let timeout = || CloseReason::error(ErrorCode::Timeout, "idle");
        let (quiet, chatty) = (SessionQueue::channel(1, 4), SessionQueue::channel(2, 4));
        router.sweep_idle(timeout);
        // Added during sweep 1: heard then, though nothing was read yet.
        router.add(UserId::from_identity_key(&[1; 32]), quiet.queue.clone());
        router.add(UserId::from_identity_key(&[2; 32]), chatty.queue.clone());
        for _ in 0..IDLE_SWEEPS {
            chatty.queue.heard(router.sweep());
            assert_eq!(router.sweep_idle(timeout), 0);
        }
        assert!(quiet.queue.close_reason().is_none());
        chatty.queue.heard(router.sweep());
        // The fifth sweep since it was last heard: the quiet one is closed, with the reason.
        assert_eq!(router.sweep_idle(timeout), 1);
        let reason = quiet
            .queue
            .close_reason()
            .expect("the quiet session is closed");
        assert_eq!(reason.code, Some(ErrorCode::Timeout));
        assert!(chatty.queue.close_reason().is_none());
        // Asked once: a session still flushing is not counted again.
        assert_eq!(router.sweep_idle(timeout), 0);
    }

    fn mac(key: u8) -> ClusterMac {
        ClusterMac::new(&[key; 32])
    }

    fn router(node: u8, policy: OverflowPolicy) -> Router {
        Router::new([node; 16], policy, mac(9), 1 << 20)
    }

    /// A sealed envelope for `to` (the relay reads only its header).
    fn envelope_for(to: &[UserId]) -> Vec<u8> {
        use syncra_core::crypto::envelope::{Recipient, seal};
        use syncra_core::crypto::keys::{IdentityKeyPair, PrekeySecret};
        let sender = IdentityKeyPair::generate();
        let recipients: Vec<Recipient> = to
            .iter()
            .map(|id| Recipient {
                user_id: *id,
                prekey: PrekeySecret::generate(&IdentityKeyPair::generate(), 1)
                    .signed()
                    .public,
            })
            .collect();
        seal(&sender, &recipients, b"hi", syncra_core::now_ms())
            .unwrap()
            .bytes
    }

    fn sink(router: &Arc<Router>) -> (RouterSink, Arc<crate::metrics::Metrics>) {
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let sink = RouterSink {
            router: router.clone(),
            presence: Arc::new(Presence::new(
                *router.node_id(),
                crate::presence::presence_key(&[5; 32]),
            )),
            links: Arc::new(crate::links::Links::new(router.clone())),
            metrics: metrics.clone(),
            topic: node_topic(router.node_id()),
        };
        (sink, metrics)
    }

    /// One delivery of `frame` to `user` in a batch from `from`.
    fn batch(from: &Router, user: &UserId, frame: &[u8]) -> Bytes {
        from.batch_payload(&crate::links::encode_batch(1, [(user, frame)].into_iter()))
    }

    /// A payload of an earlier format from node `[2; 16]`: its id, HMAC-SHA256 under the test
    /// cluster key over `label ‖ node id ‖ signed`, then `signed`.
    fn hmac_payload(label: &[u8], signed: &[u8]) -> Bytes {
        use hmac::{KeyInit, Mac};
        let node = [2u8; NODE_ID_LEN];
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&[9; 32]).unwrap();
        mac.update(label);
        mac.update(&node);
        mac.update(signed);
        Bytes::from([&node[..], &mac.finalize().into_bytes(), signed].concat())
    }

    /// A payload of the `syncra/v3` format from node `[2; 16]`: its id, keyed BLAKE3 under the
    /// test cluster key itself over the label, the node id and `signed`, then `signed`.
    fn v3_payload(signed: &[u8]) -> Bytes {
        let node = [2u8; NODE_ID_LEN];
        let mut mac = blake3::Hasher::new_keyed(&[9; 32]);
        mac.update(b"syncra/v3/cluster-payload");
        mac.update(&node);
        mac.update(signed);
        Bytes::from([&node[..], mac.finalize().as_bytes(), signed].concat())
    }

    /// The layout PROTOCOL.md §2.5 gives, computed here on its own: the MAC, keyed BLAKE3
    /// under `derive_key("syncra/v4/cluster-payload", cluster key)` over everything after it,
    /// then the node id, the kind and the body.
    #[test]
    fn a_payload_is_the_documented_mac_node_id_kind_and_body() {
        let node = router(2, OverflowPolicy::Reject);
        let payload = node.presence_payload(b"body");
        let (tag, covered) = payload.split_at(MAC_LEN);
        assert_eq!(
            covered,
            &[&[2u8; NODE_ID_LEN][..], &[kind::PRESENCE], b"body"].concat()
        );
        let key = blake3::derive_key("syncra/v4/cluster-payload", &[9; 32]);
        assert_eq!(tag, blake3::keyed_hash(&key, covered).as_bytes());
    }

    #[test]
    fn sink_ignores_own_payloads_and_delivers_authentic_deliveries() {
        let here = Arc::new(router(1, OverflowPolicy::Reject));
        let there = router(2, OverflowPolicy::Reject);
        let user = UserId::from_identity_key(&[1; 32]);
        let mut out = SessionQueue::channel(1, 4);
        here.add(user, out.queue.clone());
        let (sink, metrics) = sink(&here);
        let topic = node_topic(here.node_id());
        let envelope = envelope_for(&[user]);
        let frame = here.deliver_frame(&envelope);
        assert!(!sink.deliver(&topic, batch(&here, &user, &frame)));
        assert!(sink.deliver(
            &topic,
            batch(&there, &user, &there.deliver_frame(&envelope))
        ));
        assert_eq!(out.try_recv().unwrap(), frame);
        assert!(out.try_recv().is_none());
        // An authentic presence announcement on the presence topic is applied.
        let held = crate::presence::tests::sealed(
            [2; NODE_ID_LEN],
            1,
            &crate::presence::Announcement::Held(vec![user]),
        );
        assert!(sink.deliver(PRESENCE_TOPIC, there.presence_payload(&held)));
        assert_eq!(
            sink.presence.others(&user).map(|n| n.to_vec()),
            Some(vec![[2; NODE_ID_LEN]])
        );
        assert!(!metrics.render().contains("broker_dropped_total{"));
    }

    /// What a broker publisher without the cluster key (or a node with it, sending what is not
    /// a delivery) can send: each refused with its reason, nothing reaching the session or the
    /// presence table.
    #[test]
    fn sink_drops_what_is_not_an_authentic_payload_for_the_topic() {
        let here = Arc::new(router(1, OverflowPolicy::Reject));
        let user = UserId::from_identity_key(&[1; 32]);
        let other = UserId::from_identity_key(&[2; 32]);
        let mut out = SessionQueue::channel(1, 64);
        here.add(user, out.queue.clone());
        let topic = node_topic(here.node_id());
        // A node with the cluster key, for the cases that get past the MAC.
        let peer = router(2, OverflowPolicy::Reject);
        let forged_record = syncra_core::wire::Frame::SendResult {
            request_id: 1,
            message_id: [0; 16],
            outcomes: vec![],
        }
        .encode();
        let keyless = router(2, OverflowPolicy::Reject);
        let keyless = Router {
            mac: mac(3),
            ..keyless
        };
        let frame = |to: &[UserId]| peer.deliver_frame(&envelope_for(to));
        let held = crate::presence::Announcement::Held(vec![other]).encode(1);
        let one = crate::links::encode_batch(1, [(&user, &frame(&[user])[..])].into_iter());
        // A genuine batch from the peer, changed by `change`.
        let altered = |change: fn(&mut Vec<u8>)| {
            let mut p = batch(&peer, &user, &frame(&[user])).to_vec();
            change(&mut p);
            Bytes::from(p)
        };
        let cases: Vec<(&str, &str, Bytes, Dropped)> = vec![
            (
                "a user topic of the old scheme",
                "syncra.u.x",
                batch(&peer, &user, &frame(&[user])),
                Dropped::Topic,
            ),
            (
                "another node's topic",
                "syncra.n.00",
                batch(&peer, &user, &frame(&[user])),
                Dropped::Topic,
            ),
            (
                "short",
                &topic,
                Bytes::from_static(b"0123456789abcdef0123"),
                Dropped::Short,
            ),
            (
                "unauthenticated deliveries",
                &topic,
                batch(&keyless, &user, &frame(&[user])),
                Dropped::Mac,
            ),
            (
                "unauthenticated presence",
                PRESENCE_TOPIC,
                keyless.presence_payload(&held),
                Dropped::Mac,
            ),
            (
                "unauthenticated answer",
                &topic,
                keyless.answer_payload(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1]),
                Dropped::Mac,
            ),
            (
                "old-format payload (node id + MAC + frame)",
                &topic,
                // The earliest format's MAC: over node id and frame, without a label.
                hmac_payload(b"", &frame(&[user])),
                Dropped::Mac,
            ),
            (
                "a genuine batch with one byte of a delivery changed",
                &topic,
                altered(|p| *p.last_mut().unwrap() ^= 1),
                Dropped::Mac,
            ),
            (
                "a genuine batch with one bit of its MAC changed",
                &topic,
                altered(|p| p[0] ^= 0x80),
                Dropped::Mac,
            ),
            (
                "a genuine batch cut short by one byte",
                &topic,
                altered(|p| {
                    p.pop();
                }),
                Dropped::Mac,
            ),
            (
                "the HMAC-SHA256 format before BLAKE3 (syncra/v2)",
                &topic,
                hmac_payload(
                    b"syncra/v2/cluster-payload",
                    &[&[kind::BATCH][..], &[0; 10]].concat(),
                ),
                Dropped::Mac,
            ),
            (
                "the BLAKE3 format before a contiguous MAC (syncra/v3)",
                &topic,
                v3_payload(&[&[kind::BATCH][..], &one[..]].concat()),
                Dropped::Mac,
            ),
            (
                "deliveries on the presence topic",
                PRESENCE_TOPIC,
                batch(&peer, &user, &frame(&[user])),
                Dropped::Topic,
            ),
            (
                "presence on the node topic",
                &topic,
                peer.presence_payload(&held),
                Dropped::Topic,
            ),
            (
                "unknown kind",
                &topic,
                peer.seal(9, b"whatever"),
                Dropped::Topic,
            ),
            (
                "a batch cut short",
                &topic,
                peer.batch_payload(&one[..one.len() - 1]),
                Dropped::NotDeliver,
            ),
            (
                "a batch with bytes after its last delivery",
                &topic,
                peer.batch_payload(&[&one[..], b"x"].concat()),
                Dropped::NotDeliver,
            ),
            (
                "authentic but not a deliver",
                &topic,
                batch(&peer, &user, &forged_record),
                Dropped::NotDeliver,
            ),
            (
                "authentic garbage",
                &topic,
                batch(&peer, &user, b"\x02\x06garbage"),
                Dropped::NotDeliver,
            ),
            (
                "deliver for someone else",
                &topic,
                batch(&peer, &user, &frame(&[other])),
                Dropped::NotRecipient,
            ),
            (
                "authentic presence that does not parse",
                PRESENCE_TOPIC,
                peer.presence_payload(&held[..held.len() - 3]),
                Dropped::NotPresence,
            ),
            (
                "unauthenticated presence acknowledgement",
                &topic,
                keyless.presence_ack_payload(&Presence::ack_body(here.node_id(), 1)),
                Dropped::Mac,
            ),
            (
                "a presence acknowledgement on the presence topic",
                PRESENCE_TOPIC,
                peer.presence_ack_payload(&Presence::ack_body(here.node_id(), 1)),
                Dropped::Topic,
            ),
            (
                "an acknowledgement of another node's announcement",
                &topic,
                peer.presence_ack_payload(&Presence::ack_body(&[7; NODE_ID_LEN], 1)),
                Dropped::NotPresence,
            ),
            (
                "an answer to a batch never sent there",
                &topic,
                peer.answer_payload(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 1]),
                Dropped::NotAnswer,
            ),
        ];
        for (name, topic, payload, expected) in cases {
            let (sink, metrics) = sink(&here);
            assert!(!sink.deliver(topic, payload), "{name}");
            let text = metrics.render();
            let series = format!(
                "syncra_relay_broker_dropped_total{{reason=\"{}\"}} 1",
                expected.reason()
            );
            assert!(text.contains(&series), "{name}: {series}\n{text}");
            assert_eq!(sink.presence.others(&other), None, "{name}: presence");
        }
        assert!(out.try_recv().is_none(), "nothing reached the session");
    }
}

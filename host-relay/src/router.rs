//! Routing: which live sessions of which users this node holds, and delivery to them.
//!
//! A user may be connected more than once (several devices, or a reconnect overlapping the old
//! session). Each session has a bounded queue drained by its own writer task; delivery only
//! ever *tries* to enqueue, so a slow consumer never slows the sender or anyone else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use dashmap::DashMap;
use syncra_core::UserId;
use syncra_core::broker::BrokerSink;
use syncra_core::transport::CloseReason;
use syncra_core::wire::ErrorCode;
use tokio::sync::{Notify, mpsc};

use crate::config::OverflowPolicy;

/// Bytes of node id at the start of every broker payload.
pub const NODE_ID_LEN: usize = 16;
/// Bytes of the MAC that follows the node id.
pub const MAC_LEN: usize = 32;
/// Bytes before the frame in a broker payload.
pub const PAYLOAD_PREFIX: usize = NODE_ID_LEN + MAC_LEN;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Authenticates payloads between the nodes of a cluster: HMAC-SHA256 under the cluster key
/// over the node id and the frame. The broker is a trust boundary: anyone who can publish on
/// NATS or Redis could otherwise hand any frame to any user's sessions.
#[derive(Clone)]
pub struct ClusterMac {
    /// The MAC with the key already absorbed; cloned per message.
    keyed: HmacSha256,
}

impl std::fmt::Debug for ClusterMac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterMac(..)")
    }
}

impl ClusterMac {
    /// A MAC under `key`.
    pub fn new(key: &[u8; 32]) -> Self {
        use hmac::KeyInit;
        ClusterMac {
            keyed: <HmacSha256 as KeyInit>::new_from_slice(key)
                .expect("HMAC takes keys of any length"),
        }
    }

    fn mac(&self, node_id: &[u8], frame: &[u8]) -> HmacSha256 {
        use hmac::Mac;
        let mut mac = self.keyed.clone();
        mac.update(node_id);
        mac.update(frame);
        mac
    }

    /// The tag of a payload.
    fn tag(&self, node_id: &[u8], frame: &[u8]) -> [u8; MAC_LEN] {
        use hmac::Mac;
        self.mac(node_id, frame).finalize().into_bytes().into()
    }

    /// Whether `tag` authenticates the payload (compared in constant time).
    fn verify(&self, node_id: &[u8], frame: &[u8], tag: &[u8]) -> bool {
        use hmac::Mac;
        self.mac(node_id, frame).verify_slice(tag).is_ok()
    }
}

/// The broker topic that carries a user's deliveries.
pub fn user_topic(user: &UserId) -> String {
    const PREFIX: &str = "syncra.u.";
    let mut topic = String::with_capacity(PREFIX.len() + 32);
    topic.push_str(PREFIX);
    user.push_to(&mut topic);
    topic
}

fn user_from_topic(topic: &str) -> Option<UserId> {
    topic.strip_prefix("syncra.u.")?.parse().ok()
}

/// The sending side of one session: its queue and the means to close it.
#[derive(Debug)]
pub struct SessionQueue {
    /// Unique per node, for removal.
    pub id: u64,
    tx: mpsc::Sender<Bytes>,
    dropped: AtomicU64,
    close: Mutex<Option<CloseReason>>,
    kill: Notify,
}

/// The receiving side, owned by the session's writer task.
#[derive(Debug)]
pub struct SessionOutbox {
    /// Frames to write.
    pub rx: mpsc::Receiver<Bytes>,
    /// The shared half.
    pub queue: Arc<SessionQueue>,
}

impl SessionQueue {
    /// A queue holding up to `capacity` frames, with its receiving side.
    pub fn channel(id: u64, capacity: usize) -> SessionOutbox {
        let (tx, rx) = mpsc::channel(capacity);
        SessionOutbox {
            rx,
            queue: Arc::new(SessionQueue {
                id,
                tx,
                dropped: AtomicU64::new(0),
                close: Mutex::new(None),
                kill: Notify::new(),
            }),
        }
    }

    /// Tries to enqueue a delivery. Returns whether the session took it.
    pub fn offer(&self, frame: Bytes, policy: OverflowPolicy) -> Offer {
        match self.tx.try_send(frame) {
            Ok(()) => Offer::Taken,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                if policy == OverflowPolicy::Disconnect {
                    self.close(CloseReason::error(
                        ErrorCode::QueueOverflow,
                        "this session could not keep up and was closed; reconnect",
                    ));
                }
                Offer::Full
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Offer::Gone,
        }
    }

    /// Enqueues a reply to this session's own request, waiting for room: the client that
    /// asked is the one whose reader is slowed, nobody else.
    pub async fn reply(&self, frame: Bytes) -> bool {
        self.tx.send(frame).await.is_ok()
    }

    /// How many deliveries were refused since the last call, resetting the count.
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }

    /// Asks the writer to flush what is queued, send a close frame with `reason` and stop.
    pub fn close(&self, reason: CloseReason) {
        let mut slot = self.close.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        // Both the reader and the writer of a session wait for this.
        self.kill.notify_waiters();
    }

    /// Waits until [`SessionQueue::close`] is called; returns the reason.
    pub async fn closed(&self) -> CloseReason {
        loop {
            // Register interest before checking, so a close between the check and the wait is
            // not missed (notify_waiters stores no permit).
            let notified = self.kill.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(reason) = self.close.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                return reason;
            }
            notified.await;
        }
    }

    /// Whether close was requested.
    #[cfg(test)]
    pub fn is_closing(&self) -> bool {
        self.close
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
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

/// One envelope encoded for delivery; see [`Router::delivery`].
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The `Deliver` frame, for local sessions.
    pub frame: Bytes,
    /// Node id, MAC and frame, for the broker (empty when made for local sessions only).
    pub payload: Bytes,
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
}

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
        }
    }

    /// A fresh session id.
    pub fn next_session_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds a session. Returns true if it is the user's first on this node (subscribe).
    pub fn add(&self, user: UserId, queue: Arc<SessionQueue>) -> bool {
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

    /// Encodes an envelope for delivery, once: the broker payload (this node's id, the MAC,
    /// then the `Deliver` frame) and the frame for local sessions, which shares the payload's
    /// bytes. With `for_broker` false (a node alone on its broker) no MAC is computed and the
    /// payload is empty.
    pub fn delivery(&self, envelope: &[u8], for_broker: bool) -> Delivery {
        if !for_broker {
            let frame = syncra_core::wire::encode_deliver_after(&[], envelope);
            return Delivery {
                frame,
                payload: Bytes::new(),
            };
        }
        let mut prefix = [0u8; PAYLOAD_PREFIX];
        prefix[..NODE_ID_LEN].copy_from_slice(&self.node_id);
        let unsigned = syncra_core::wire::encode_deliver_after(&prefix, envelope);
        let tag = self.mac.tag(&self.node_id, &unsigned[PAYLOAD_PREFIX..]);
        let mut payload = bytes::BytesMut::from(unsigned);
        payload[NODE_ID_LEN..PAYLOAD_PREFIX].copy_from_slice(&tag);
        let payload = payload.freeze();
        Delivery {
            frame: payload.slice(PAYLOAD_PREFIX..),
            payload,
        }
    }

    /// Every session, for shutdown.
    pub fn all_sessions(&self) -> Vec<Arc<SessionQueue>> {
        self.sessions
            .iter()
            .flat_map(|e| e.value().clone())
            .collect()
    }
}

/// Receives payloads from other nodes and hands them to local sessions.
///
/// The broker is a trust boundary: whoever can publish on it (a compromised broker account, a
/// misconfigured ACL, another tenant) is hostile. A payload reaches a session only if its MAC
/// verifies under the cluster key, it is exactly one well-formed `Deliver` frame within the
/// frame limit, and the envelope's header names the topic's user as a recipient. Everything
/// else is dropped and counted by reason (`syncra_relay_broker_dropped_total`).
#[derive(Debug)]
pub struct RouterSink {
    /// The router to deliver into.
    pub router: Arc<Router>,
    /// Where drops are counted and logged.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Why a broker payload was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The topic is not a user topic.
    Topic,
    /// Shorter than a node id and a MAC.
    Short,
    /// The MAC does not verify under the cluster key.
    Mac,
    /// Not one well-formed `Deliver` frame.
    NotDeliver,
    /// The envelope's header is malformed or does not name the topic's user.
    NotRecipient,
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
        }
    }
}

impl Router {
    /// Checks a payload from the broker. `Ok(None)` is this node's own publish coming back
    /// (its local sessions were served directly); `Ok(Some)` the user and the frame to hand
    /// to that user's sessions.
    pub fn accept_remote(
        &self,
        topic: &str,
        payload: &Bytes,
    ) -> Result<Option<(UserId, Bytes)>, Dropped> {
        let user = user_from_topic(topic).ok_or(Dropped::Topic)?;
        if payload.len() <= PAYLOAD_PREFIX {
            return Err(Dropped::Short);
        }
        let (node_id, rest) = payload.split_at(NODE_ID_LEN);
        if node_id == self.node_id {
            // Nothing is delivered for it, so a forgery naming this node achieves nothing.
            return Ok(None);
        }
        let (tag, frame) = rest.split_at(MAC_LEN);
        if !self.mac.verify(node_id, frame, tag) {
            return Err(Dropped::Mac);
        }
        let frame = payload.slice(PAYLOAD_PREFIX..);
        let Ok(syncra_core::wire::Frame::Deliver { envelope }) =
            syncra_core::wire::Frame::decode(&frame, self.max_frame)
        else {
            return Err(Dropped::NotDeliver);
        };
        // A sealed envelope or an MLS carriage, well-formed and naming this user.
        match syncra_core::carriage::Routed::parse(&envelope) {
            Ok(header) if header.recipients().contains(&user) => Ok(Some((user, frame))),
            _ => Err(Dropped::NotRecipient),
        }
    }
}

impl BrokerSink for RouterSink {
    fn deliver(&self, topic: &str, payload: Bytes) -> bool {
        match self.router.accept_remote(topic, &payload) {
            Ok(Some((user, frame))) => {
                self.metrics.broker_in.inc();
                self.router.deliver_local(&user, &frame).taken > 0
            }
            Ok(None) => false,
            Err(dropped) => {
                self.metrics.broker_drop(dropped.reason());
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        let u = UserId::from_identity_key(&[3; 32]);
        assert_eq!(user_from_topic(&user_topic(&u)), Some(u));
        assert_eq!(user_from_topic("other.topic"), None);
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
        assert!(!out.queue.is_closing());
        assert!(router.remove(&user, out.queue.id));
        assert!(!router.holds(&user));
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
        assert_eq!(
            out.queue.closed().await.code,
            Some(ErrorCode::QueueOverflow)
        );
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

    #[test]
    fn sink_ignores_own_payloads_and_delivers_authentic_deliveries() {
        let here = Arc::new(router(1, OverflowPolicy::Reject));
        let there = router(2, OverflowPolicy::Reject);
        let user = UserId::from_identity_key(&[1; 32]);
        let mut out = SessionQueue::channel(1, 4);
        here.add(user, out.queue.clone());
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let sink = RouterSink {
            router: here.clone(),
            metrics: metrics.clone(),
        };
        let envelope = envelope_for(&[user]);
        let own = here.delivery(&envelope, true);
        assert!(!sink.deliver(&user_topic(&user), own.payload.clone()));
        let remote = there.delivery(&envelope, true);
        assert!(sink.deliver(&user_topic(&user), remote.payload.clone()));
        assert_eq!(out.rx.try_recv().unwrap(), remote.frame);
        assert_eq!(own.frame, remote.frame);
        assert_eq!(here.delivery(&envelope, false).frame, own.frame);
        assert!(out.rx.try_recv().is_err());
        assert!(!metrics.render().contains("broker_dropped_total{"));
    }

    /// What a broker publisher without the cluster key can send, each refused with its reason
    /// and nothing reaching the session.
    #[test]
    fn sink_drops_what_is_not_an_authentic_delivery_for_the_topic() {
        let here = Arc::new(router(1, OverflowPolicy::Reject));
        let user = UserId::from_identity_key(&[1; 32]);
        let other = UserId::from_identity_key(&[2; 32]);
        let mut out = SessionQueue::channel(1, 64);
        here.add(user, out.queue.clone());
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let sink = RouterSink {
            router: here.clone(),
            metrics: metrics.clone(),
        };
        let topic = user_topic(&user);
        // A node with the cluster key, for the cases that get past the MAC.
        let peer = router(2, OverflowPolicy::Reject);
        let signed = |frame: &[u8]| {
            let mut payload = vec![2u8; NODE_ID_LEN];
            payload.extend_from_slice(&peer.mac.tag(&[2u8; NODE_ID_LEN], frame));
            payload.extend_from_slice(frame);
            Bytes::from(payload)
        };
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
        let cases: Vec<(&str, Bytes, Dropped)> = vec![
            (
                "not a user topic",
                signed(&here.delivery(&envelope_for(&[user]), false).frame),
                Dropped::Topic,
            ),
            (
                "short",
                Bytes::from_static(b"0123456789abcdef0123"),
                Dropped::Short,
            ),
            (
                "unauthenticated deliver",
                keyless.delivery(&envelope_for(&[user]), true).payload,
                Dropped::Mac,
            ),
            (
                "old-format payload (node id + frame)",
                {
                    let mut p = vec![2u8; NODE_ID_LEN];
                    p.extend_from_slice(&here.delivery(&envelope_for(&[user]), false).frame);
                    Bytes::from(p)
                },
                Dropped::Mac,
            ),
            (
                "authentic but not a deliver",
                signed(&forged_record),
                Dropped::NotDeliver,
            ),
            (
                "authentic garbage",
                signed(b"\x02\x06garbage"),
                Dropped::NotDeliver,
            ),
            (
                "deliver for someone else",
                peer.delivery(&envelope_for(&[other]), true).payload,
                Dropped::NotRecipient,
            ),
        ];
        for (name, payload, expected) in cases {
            let topic = if expected == Dropped::Topic {
                "syncra.x.y"
            } else {
                topic.as_str()
            };
            assert_eq!(
                here.accept_remote(topic, &payload).err(),
                Some(expected),
                "{name}"
            );
            assert!(!sink.deliver(topic, payload), "{name}");
        }
        assert!(out.rx.try_recv().is_err(), "nothing reached the session");
        let text = metrics.render();
        for reason in [
            "bad_topic",
            "truncated",
            "bad_mac",
            "not_a_delivery",
            "not_a_recipient",
        ] {
            assert!(
                text.contains(&format!(
                    "syncra_relay_broker_dropped_total{{reason=\"{reason}\"}}"
                )),
                "{reason} counted:\n{text}"
            );
        }
    }
}

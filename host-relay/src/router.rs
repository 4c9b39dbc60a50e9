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
    /// Node id and frame, for the broker.
    pub payload: Bytes,
}

/// The sessions this node holds, by user.
#[derive(Debug)]
pub struct Router {
    node_id: [u8; NODE_ID_LEN],
    policy: OverflowPolicy,
    sessions: DashMap<UserId, Vec<Arc<SessionQueue>>>,
    next_id: AtomicU64,
}

impl Router {
    /// An empty router for a node.
    pub fn new(node_id: [u8; NODE_ID_LEN], policy: OverflowPolicy) -> Self {
        Router {
            node_id,
            policy,
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

    /// Encodes an envelope for delivery, once: the broker payload (this node's id, then the
    /// `Deliver` frame) and the frame for local sessions, which shares the payload's bytes.
    pub fn delivery(&self, envelope: &[u8]) -> Delivery {
        let payload = syncra_core::wire::encode_deliver_after(&self.node_id, envelope);
        Delivery {
            frame: payload.slice(NODE_ID_LEN..),
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
#[derive(Debug)]
pub struct RouterSink {
    /// The router to deliver into.
    pub router: Arc<Router>,
    /// Counts payloads received.
    pub received: prometheus_client::metrics::counter::Counter,
}

impl BrokerSink for RouterSink {
    fn deliver(&self, topic: &str, payload: Bytes) -> bool {
        if payload.len() <= NODE_ID_LEN || payload[..NODE_ID_LEN] == self.router.node_id {
            // Our own publish coming back: the local sessions were served directly.
            return false;
        }
        let Some(user) = user_from_topic(topic) else {
            return false;
        };
        self.received.inc();
        let frame = payload.slice(NODE_ID_LEN..);
        self.router.deliver_local(&user, &frame).taken > 0
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
        let router = Router::new([1; 16], OverflowPolicy::Reject);
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
        let router = Router::new([1; 16], OverflowPolicy::Disconnect);
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

    #[test]
    fn sink_ignores_own_payloads_and_delivers_others() {
        let router = Arc::new(Router::new([1; 16], OverflowPolicy::Reject));
        let user = UserId::from_identity_key(&[1; 32]);
        let mut out = SessionQueue::channel(1, 4);
        router.add(user, out.queue.clone());
        let sink = RouterSink {
            router: router.clone(),
            received: Default::default(),
        };
        let own = router.delivery(b"envelope");
        assert!(!sink.deliver(&user_topic(&user), own.payload.clone()));
        let mut other = vec![2u8; 16];
        other.extend_from_slice(&own.frame);
        assert!(sink.deliver(&user_topic(&user), Bytes::from(other)));
        assert_eq!(out.rx.try_recv().unwrap(), own.frame);
        assert_eq!(
            syncra_core::wire::Frame::decode(&own.frame, 1 << 20).unwrap(),
            syncra_core::wire::Frame::Deliver {
                envelope: Bytes::from_static(b"envelope")
            }
        );
        assert!(out.rx.try_recv().is_err());
    }
}

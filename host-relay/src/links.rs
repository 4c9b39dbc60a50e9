//! Deliveries to other nodes, batched per destination node, with one answer per batch.
//!
//! # Why
//!
//! A delivery to another node used to be one broker request and one answer per recipient per
//! message: on NATS four client-side hops and two server-side routings per message, which made
//! two nodes deliver a third of what one node does (docs/BENCHMARKS.md, issue 19). Now every
//! node keeps one *link* per node it sends to: a queue that a sender fills without waiting,
//! and one task that publishes what is queued as one batch on the destination's topic and
//! then the next. While the task publishes one batch, the next fills, so batches grow with
//! the load and cost nothing at low load (a lone message goes out at once, as a batch of one).
//!
//! # Answers, truthfully
//!
//! The destination node offers each delivery of a batch to its sessions and publishes one
//! *answer* on the sender's node topic: the batch's number and one bit per delivery, set when
//! a session took it. The sender waits for that bit before it says `delivered`, on every
//! broker (so Redis, whose `PUBLISH` only counts subscribers, now reports takers too). A batch
//! the broker did not take settles its deliveries as unknown (`broker_unavailable`), and so
//! does an answer that does not come within [`ANSWER_TIMEOUT`] (the destination crashed
//! without its `Bye`: until the presence table forgets it, after
//! `presence::PEER_TIMEOUT`, its users' senders hear `broker_unavailable` and their outboxes
//! retry). An answer is MAC'd like every payload, and is accepted only from the node the batch
//! was sent to and only for as many deliveries as it held.
//!
//! # Bounds
//!
//! A publish that blocks (a broker that stopped reading) holds its link's queue. A sender still
//! hears within about [`ANSWER_TIMEOUT`]: deliveries queued for [`STALE_SWEEPS`] sweeps are
//! settled as unknown without being published, and a link holds at most [`MAX_QUEUED`]
//! deliveries (beyond, one is settled as unknown at once), so memory stays bounded too
//! (`a_stuck_publish_neither_holds_senders_nor_grows_its_queue`).
//!
//! # Order
//!
//! A sender's deliveries enter the link's queue in the order the session routes them, and a
//! link publishes its batches one after the other, so deliveries from one node to another keep
//! their order (the broker keeps one publisher's order on one topic).
//!
//! Must never: report a delivery taken without the destination's bit, block a sender on the
//! broker, or let an answer settle a batch it was not for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use dashmap::DashMap;
use syncra_core::id::USER_ID_LEN;
use syncra_core::{Broker, Confirm, UserId};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tracing::debug;

use crate::router::{NodeId, Router, node_topic};

/// Deliveries per batch at most.
pub const MAX_BATCH: usize = 256;
/// Bytes of frames per batch at most: a batch stays far below NATS's default 1 MiB payload
/// limit. A single larger frame still goes out, alone.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;
/// How long a sender waits for the destination's answer before it reports "unknown" (give or
/// take a quarter: batches are swept four times per this period).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Deliveries a link holds unpublished at most; beyond, a delivery is settled as unknown at
/// once (its sender hears `broker_unavailable`). Only a destination the broker cannot keep up
/// with fills it: 64 batches' worth.
pub const MAX_QUEUED: usize = 64 * MAX_BATCH;
/// Sweeps (each [`ANSWER_TIMEOUT`] / 4) after which a delivery still queued behind a slow
/// publish is settled as unknown instead of published: a sender waits about
/// [`ANSWER_TIMEOUT`] for a delivery in a queue as for one in flight.
const STALE_SWEEPS: u32 = 4;
/// A link with nothing to send for this long ends its task (a new one starts with the next
/// delivery), so links to nodes that left do not accumulate.
const IDLE: Duration = Duration::from_secs(60);

/// What the destination said about one delivery: taken by a session, not taken, or unknown.
pub type Taken = Result<bool, ()>;

struct Item {
    user: UserId,
    frame: Bytes,
    answer: Option<oneshot::Sender<Taken>>,
    /// The sweep count when it was queued (a clock read per delivery would cost more).
    queued: u32,
}

#[derive(Default)]
struct Link {
    queue: Mutex<Vec<Item>>,
    wake: Notify,
}

/// A batch published and waiting for its answer.
struct Waiting {
    node: NodeId,
    sent: Instant,
    answers: Vec<Option<oneshot::Sender<Taken>>>,
}

/// The links of one node.
pub struct Links {
    router: Arc<Router>,
    broker: OnceLock<Arc<dyn Broker>>,
    links: DashMap<NodeId, Arc<Link>>,
    waiting: Mutex<HashMap<u64, Waiting>>,
    next_batch: AtomicU64,
    /// Sweeps so far: the age of queued deliveries, in [`ANSWER_TIMEOUT`] / 4.
    sweeps: AtomicU32,
    /// Answers the sink made, for the task that publishes them.
    answers: mpsc::UnboundedSender<(NodeId, Reply)>,
    answers_rx: Mutex<Option<mpsc::UnboundedReceiver<(NodeId, Reply)>>>,
}

/// What the sink asks the answer task to publish to another node.
enum Reply {
    /// The answer to a batch (its body).
    Batch(Bytes),
    /// The acknowledgement of a presence `Held` (its body).
    PresenceAck(Bytes),
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("links", &self.links.len())
            .finish_non_exhaustive()
    }
}

impl Links {
    /// Links of the node `router` serves; [`Links::start`] gives them the broker.
    pub fn new(router: Arc<Router>) -> Links {
        let (answers, answers_rx) = mpsc::unbounded_channel();
        Links {
            router,
            broker: OnceLock::new(),
            links: DashMap::new(),
            waiting: Mutex::default(),
            next_batch: AtomicU64::new(1),
            sweeps: AtomicU32::new(0),
            answers,
            answers_rx: Mutex::new(Some(answers_rx)),
        }
    }

    /// Gives the links their broker (created after them: its sink needs them) and starts the
    /// task that publishes answers.
    pub fn start(self: &Arc<Self>, broker: Arc<dyn Broker>) {
        let _ = self.broker.set(broker);
        let rx = self
            .answers_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(rx) = rx {
            tokio::spawn(publish_answers(Arc::clone(self), rx));
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
    }

    /// Queues a delivery of `frame` to `user`'s sessions on `node`. With `answer`, returns
    /// where the destination's answer will come.
    pub fn send(
        self: &Arc<Self>,
        node: NodeId,
        user: UserId,
        frame: Bytes,
        answer: bool,
    ) -> Option<oneshot::Receiver<Taken>> {
        let (tx, rx) = if answer {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let item = Item {
            user,
            frame,
            answer: tx,
            queued: self.sweeps.load(Ordering::Relaxed),
        };
        // Pushed while the map's guard is held, so an idle link cannot be removed between
        // finding it and pushing (see `flush`).
        if let Some(link) = self.links.get(&node) {
            Self::queue(&link, item);
            return rx;
        }
        let link = self.links.entry(node).or_insert_with(|| {
            let link = Arc::new(Link::default());
            tokio::spawn(flush(Arc::clone(self), node, Arc::clone(&link)));
            link
        });
        Self::queue(&link, item);
        rx
    }

    /// Queues `item` on `link`, or settles it as unknown if the link holds [`MAX_QUEUED`].
    fn queue(link: &Link, item: Item) {
        let mut queue = link.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.len() >= MAX_QUEUED {
            drop(queue);
            debug!("a link to another node is full; a delivery is settled as unknown");
            if let Some(tx) = item.answer {
                let _ = tx.send(Err(()));
            }
            return;
        }
        queue.push(item);
        drop(queue);
        link.wake.notify_one();
    }

    /// Settles a batch with an answer from `from` (MAC verified): `body` is
    /// `batch u64 || count u16 || bitmap`. `Err` if it does not parse or is not an answer to a
    /// batch this node sent to `from` with that many deliveries.
    pub fn answer(&self, from: NodeId, body: &[u8]) -> Result<(), ()> {
        let (batch, rest) = body.split_first_chunk::<8>().ok_or(())?;
        let (count, bitmap) = rest.split_first_chunk::<2>().ok_or(())?;
        let (batch, count) = (
            u64::from_be_bytes(*batch),
            usize::from(u16::from_be_bytes(*count)),
        );
        if bitmap.len() != count.div_ceil(8) {
            return Err(());
        }
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        match waiting.get(&batch) {
            Some(w) if w.node == from && w.answers.len() == count => {}
            // Not an answer to what this node sent there.
            Some(_) => return Err(()),
            // Late: the senders gave up (or the broker's receipt settled the batch).
            None => return Ok(()),
        }
        let Some(w) = waiting.remove(&batch) else {
            return Ok(());
        };
        drop(waiting);
        for (i, answer) in w.answers.into_iter().enumerate() {
            if let Some(tx) = answer {
                let _ = tx.send(Ok(bitmap[i / 8] & (1 << (i % 8)) != 0));
            }
        }
        Ok(())
    }

    /// Queues the answer to a batch from `to` for publishing.
    pub fn reply(&self, to: NodeId, batch: u64, taken: &[bool]) {
        let mut body = BytesMut::with_capacity(10 + taken.len().div_ceil(8));
        body.put_u64(batch);
        body.put_u16(u16::try_from(taken.len()).unwrap_or(u16::MAX));
        let mut bitmap = vec![0u8; taken.len().div_ceil(8)];
        for (i, _) in taken.iter().enumerate().filter(|(_, t)| **t) {
            bitmap[i / 8] |= 1 << (i % 8);
        }
        body.put_slice(&bitmap);
        let _ = self.answers.send((to, Reply::Batch(body.freeze())));
    }

    /// Queues the acknowledgement of `to`'s presence `Held` number `seq` for publishing
    /// (`crate::presence`).
    pub fn ack_presence(&self, to: NodeId, seq: u64) {
        let body = crate::presence::Presence::ack_body(&to, seq);
        let _ = self.answers.send((to, Reply::PresenceAck(body.into())));
    }

    fn settle(answers: Vec<Option<oneshot::Sender<Taken>>>, taken: Taken) {
        for tx in answers.into_iter().flatten() {
            let _ = tx.send(taken);
        }
    }

    /// Forgets batches sent more than [`ANSWER_TIMEOUT`] ago, and settles deliveries queued
    /// for [`STALE_SWEEPS`] sweeps and still not published (a publish that blocks holds its
    /// link's queue): their senders hear "unknown" (the answer channel is dropped).
    fn sweep(&self, now: Instant) {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, w| now.duration_since(w.sent) < ANSWER_TIMEOUT);
        let sweeps = self.sweeps.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        for link in self.links.iter() {
            let mut queue = link.queue.lock().unwrap_or_else(PoisonError::into_inner);
            // Queued in order, so the stale ones are a prefix.
            let stale = queue
                .iter()
                .take_while(|i| sweeps.wrapping_sub(i.queued) >= STALE_SWEEPS)
                .count();
            if stale > 0 {
                let answers: Vec<_> = queue.drain(..stale).map(|i| i.answer).collect();
                drop(queue);
                debug!("{stale} deliveries to another node were not published in time");
                Self::settle(answers, Err(()));
            }
        }
    }
}

/// The body of a batch: `batch u64 || count u16 || count × (user 20 || length u32 || frame)`.
#[cfg(test)]
pub fn encode_batch<'a>(
    batch: u64,
    items: impl ExactSizeIterator<Item = (&'a UserId, &'a [u8])>,
) -> Vec<u8> {
    let mut out = BytesMut::new();
    write_batch(&mut out, batch, items);
    out.to_vec()
}

/// The bytes [`write_batch`] writes for `items`.
fn batch_len(items: &[Item]) -> usize {
    10 + items
        .iter()
        .map(|i| USER_ID_LEN + 4 + i.frame.len())
        .sum::<usize>()
}

/// Writes a batch's body (the layout of `encode_batch`).
fn write_batch<'a>(
    out: &mut BytesMut,
    batch: u64,
    items: impl ExactSizeIterator<Item = (&'a UserId, &'a [u8])>,
) {
    out.put_u64(batch);
    out.put_u16(u16::try_from(items.len()).unwrap_or(u16::MAX));
    for (user, frame) in items {
        out.put_slice(user.as_bytes());
        out.put_u32(u32::try_from(frame.len()).unwrap_or(u32::MAX));
        out.put_slice(frame);
    }
}

/// A batch from another node, split: its number and each delivery's user and frame (slices of
/// the payload). `Err` unless the body is exactly a batch of at most [`MAX_BATCH`] deliveries
/// with frames of at most `max_frame` bytes.
pub fn parse_batch(body: &Bytes, max_frame: usize) -> Result<(u64, Vec<(UserId, Bytes)>), ()> {
    let (batch, rest) = body.split_first_chunk::<8>().ok_or(())?;
    let (count, mut rest) = rest.split_first_chunk::<2>().ok_or(())?;
    let count = usize::from(u16::from_be_bytes(*count));
    if count == 0 || count > MAX_BATCH {
        return Err(());
    }
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        let (user, after) = rest.split_first_chunk::<USER_ID_LEN>().ok_or(())?;
        let (len, after) = after.split_first_chunk::<4>().ok_or(())?;
        let len = usize::try_from(u32::from_be_bytes(*len)).map_err(drop)?;
        if len > max_frame || len > after.len() {
            return Err(());
        }
        let start = body.len() - after.len();
        items.push((UserId::from_bytes(*user), body.slice(start..start + len)));
        rest = &after[len..];
    }
    if !rest.is_empty() {
        return Err(());
    }
    Ok((u64::from_be_bytes(*batch), items))
}

/// Moves what a link has queued into the empty `out`, up to one batch's worth; the rest stays
/// for the next. When everything goes, the two vectors trade places, so the queue keeps the
/// capacity of the batch before and does not grow again from nothing for every batch.
fn take_batch(link: &Link, out: &mut Vec<Item>) {
    debug_assert!(out.is_empty());
    let mut queue = link.queue.lock().unwrap_or_else(PoisonError::into_inner);
    let mut bytes = 0;
    let mut n = 0;
    for item in queue.iter() {
        if n == MAX_BATCH || (n > 0 && bytes + item.frame.len() > MAX_BATCH_BYTES) {
            break;
        }
        bytes += item.frame.len();
        n += 1;
    }
    if n == queue.len() {
        std::mem::swap(&mut *queue, out);
    } else {
        out.extend(queue.drain(..n));
    }
}

/// The task of one link: publishes batches to `node` one after the other.
async fn flush(links: Arc<Links>, node: NodeId, link: Arc<Link>) {
    let topic = node_topic(&node);
    // The batch being published; its capacity goes back to the queue with the next one.
    let mut items = Vec::new();
    loop {
        if tokio::time::timeout(IDLE, link.wake.notified())
            .await
            .is_err()
        {
            let removed = links.links.remove_if(&node, |_, l| {
                l.queue
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .is_empty()
            });
            if removed.is_some() {
                return;
            }
            continue;
        }
        loop {
            take_batch(&link, &mut items);
            if items.is_empty() {
                break;
            }
            let Some(broker) = links.broker.get() else {
                Links::settle(items.drain(..).map(|i| i.answer).collect(), Err(()));
                continue;
            };
            let batch = links.next_batch.fetch_add(1, Ordering::Relaxed);
            let payload = links.router.batch_payload_with(batch_len(&items), |out| {
                write_batch(out, batch, items.iter().map(|i| (&i.user, &i.frame[..])));
            });
            let answers: Vec<_> = items.drain(..).map(|i| i.answer).collect();
            let wants_answer = answers.iter().any(Option::is_some);
            let now = Instant::now();
            if wants_answer {
                // Registered before the publish: the answer can come before the broker's
                // receipt does.
                links
                    .waiting
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(
                        batch,
                        Waiting {
                            node,
                            sent: now,
                            answers,
                        },
                    );
            }
            // Handed over without waiting for a receipt: the answer is what counts, and not
            // waiting lets the next batch follow at once (one batch in flight per link made
            // the link's round trip the cluster's limit).
            let settled = match broker
                .publish_confirm(&topic, payload, Confirm::Nothing)
                .await
            {
                Ok(_) => None,
                Err(e) => {
                    debug!("a batch to another node failed: {e}");
                    Some(Err(()))
                }
            };
            if let Some(taken) = settled {
                let gone = links
                    .waiting
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&batch);
                if let Some(w) = gone {
                    Links::settle(w.answers, taken);
                }
            }
        }
    }
}

/// Forgets, every [`ANSWER_TIMEOUT`] / 4, the batches whose answers did not come in time and
/// the deliveries queued too long (their senders then hear "unknown"). A task of its own, so
/// that a publish that blocks (of answers or of batches) cannot hold it up; it ends with the
/// links.
async fn sweep(links: std::sync::Weak<Links>) {
    let mut tick = tokio::time::interval(ANSWER_TIMEOUT / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(links) = links.upgrade() else {
            return;
        };
        links.sweep(Instant::now());
    }
}

/// Publishes the answers the sink made, in order.
async fn publish_answers(links: Arc<Links>, mut rx: mpsc::UnboundedReceiver<(NodeId, Reply)>) {
    loop {
        let Some((to, reply)) = rx.recv().await else {
            return;
        };
        let Some(broker) = links.broker.get() else {
            continue;
        };
        let payload = match reply {
            Reply::Batch(body) => links.router.answer_payload(&body),
            Reply::PresenceAck(body) => links.router.presence_ack_payload(&body),
        };
        if let Err(e) = broker
            .publish_confirm(&node_topic(&to), payload, Confirm::Nothing)
            .await
        {
            debug!("an answer to another node failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OverflowPolicy;
    use crate::router::{ClusterMac, NODE_ID_LEN};

    fn links() -> Arc<Links> {
        let router = Router::new(
            [1; NODE_ID_LEN],
            OverflowPolicy::Reject,
            ClusterMac::new(&[9; 32]),
            1 << 20,
        );
        Arc::new(Links::new(Arc::new(router)))
    }

    /// A batch of `n` deliveries sent to `node`, all waiting for their bits.
    fn waiting(links: &Links, batch: u64, node: NodeId, n: usize) -> Vec<oneshot::Receiver<Taken>> {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..n)
            .map(|_| {
                let (tx, rx) = oneshot::channel();
                (Some(tx), rx)
            })
            .unzip();
        links.waiting.lock().unwrap().insert(
            batch,
            Waiting {
                node,
                sent: Instant::now(),
                answers: txs,
            },
        );
        rxs
    }

    fn answer(batch: u64, taken: &[bool]) -> Vec<u8> {
        let links = links();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let links = Links {
            answers: tx,
            ..Arc::into_inner(links).unwrap()
        };
        links.reply([0; NODE_ID_LEN], batch, taken);
        match rx.try_recv().unwrap().1 {
            Reply::Batch(body) => body.to_vec(),
            Reply::PresenceAck(_) => panic!("a batch's answer, not an acknowledgement"),
        }
    }

    #[tokio::test]
    async fn an_answer_settles_its_batch_bit_by_bit() {
        let l = links();
        let there = [2; NODE_ID_LEN];
        let rxs = waiting(&l, 7, there, 10);
        let taken = [
            true, false, true, true, false, false, false, false, true, false,
        ];
        assert_eq!(l.answer(there, &answer(7, &taken)), Ok(()));
        for (rx, want) in rxs.into_iter().zip(taken) {
            assert_eq!(rx.await.unwrap(), Ok(want));
        }
        assert!(l.waiting.lock().unwrap().is_empty());
        // A late or repeated answer finds nothing to settle.
        assert_eq!(l.answer(there, &answer(7, &taken)), Ok(()));
    }

    #[tokio::test]
    async fn an_answer_from_another_node_or_for_another_size_settles_nothing() {
        let l = links();
        let there = [2; NODE_ID_LEN];
        let mut rxs = waiting(&l, 7, there, 3);
        let cases: Vec<(&str, NodeId, Vec<u8>)> = vec![
            (
                "from a node the batch did not go to",
                [3; NODE_ID_LEN],
                answer(7, &[true; 3]),
            ),
            (
                "for more deliveries than the batch held",
                there,
                answer(7, &[true; 9]),
            ),
            ("for fewer", there, answer(7, &[true; 2])),
            (
                "a bitmap cut short",
                there,
                answer(7, &[true; 9])[..10].to_vec(),
            ),
            ("no count", there, 7u64.to_be_bytes().to_vec()),
            ("empty", there, vec![]),
        ];
        for (name, from, body) in cases {
            assert_eq!(l.answer(from, &body), Err(()), "{name}");
            for rx in &mut rxs {
                assert!(rx.try_recv().is_err(), "{name}: settled nothing");
            }
        }
        // The sweep gives up on it: its senders hear "unknown".
        l.sweep(Instant::now() + ANSWER_TIMEOUT);
        for rx in rxs {
            assert!(rx.await.is_err());
        }
    }

    /// A broker whose publishes never complete (a server that stopped reading).
    struct Stuck;

    #[async_trait::async_trait]
    impl Broker for Stuck {
        fn kind(&self) -> &'static str {
            "stuck"
        }

        async fn publish(
            &self,
            _: &str,
            _: Bytes,
        ) -> Result<syncra_core::PublishReceipt, syncra_core::error::BrokerError> {
            std::future::pending().await
        }

        async fn subscribe(&self, _: &str) -> Result<(), syncra_core::error::BrokerError> {
            Ok(())
        }

        async fn unsubscribe(&self, _: &str) -> Result<(), syncra_core::error::BrokerError> {
            Ok(())
        }
    }

    /// Behind a publish that never completes, a link holds at most [`MAX_QUEUED`] deliveries
    /// (the next one is settled as unknown at once), and what it holds is settled as unknown
    /// after [`STALE_SWEEPS`] sweeps — about [`ANSWER_TIMEOUT`], as for the batch in flight —
    /// not when the publish ends (never, here).
    #[tokio::test(start_paused = true)]
    async fn a_stuck_publish_neither_holds_senders_nor_grows_its_queue() {
        let l = links();
        assert!(l.broker.set(Arc::new(Stuck)).is_ok());
        let there = [2; NODE_ID_LEN];
        let send = || {
            l.send(
                there,
                UserId::from_bytes([1; USER_ID_LEN]),
                Bytes::from_static(b"frame"),
                true,
            )
            .unwrap()
        };
        let in_flight = send();
        // The link's task takes it and waits in the publish.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(l.waiting.lock().unwrap().len(), 1);
        let mut queued: Vec<_> = (0..MAX_QUEUED).map(|_| send()).collect();
        let mut over = send();
        assert_eq!(over.try_recv(), Ok(Err(())), "a full link refuses at once");
        for _ in 1..STALE_SWEEPS {
            tokio::time::advance(ANSWER_TIMEOUT / 4).await;
            l.sweep(Instant::now());
        }
        assert!(
            queued.iter_mut().all(|rx| rx.try_recv().is_err()),
            "still waiting"
        );
        tokio::time::advance(ANSWER_TIMEOUT / 4).await;
        l.sweep(Instant::now());
        for rx in &mut queued {
            assert_eq!(rx.try_recv(), Ok(Err(())));
        }
        assert!(in_flight.await.is_err(), "the batch in flight, swept too");
        // Room again.
        let mut next = send();
        assert!(next.try_recv().is_err(), "queued, not refused");
    }

    /// A link's queue is taken in send order, at most [`MAX_BATCH`] deliveries and (unless a
    /// single frame is larger) [`MAX_BATCH_BYTES`] at a time; taking everything hands the
    /// queue the previous batch's capacity.
    #[test]
    fn batches_are_taken_in_order_within_their_limits() {
        let link = Link::default();
        let item = |i: usize, len: usize| Item {
            user: UserId::from_bytes([u8::try_from(i % 251).unwrap(); USER_ID_LEN]),
            frame: Bytes::from(vec![0; len]),
            answer: None,
            queued: 0,
        };
        let taken_users = |items: &[Item]| items.iter().map(|i| i.user).collect::<Vec<_>>();
        link.queue
            .lock()
            .unwrap()
            .extend((0..MAX_BATCH + 44).map(|i| item(i, 10)));
        let mut out = Vec::new();
        take_batch(&link, &mut out);
        let first: Vec<_> = (0..MAX_BATCH).map(|i| item(i, 10).user).collect();
        assert_eq!(taken_users(&out), first);
        out.clear();
        take_batch(&link, &mut out);
        let rest: Vec<_> = (MAX_BATCH..MAX_BATCH + 44)
            .map(|i| item(i, 10).user)
            .collect();
        assert_eq!(taken_users(&out), rest);
        assert!(link.queue.lock().unwrap().is_empty());
        assert!(
            link.queue.lock().unwrap().capacity() >= MAX_BATCH,
            "the queue kept the first batch's capacity"
        );
        // By bytes: three frames of half the limit go as two batches; a frame over the limit
        // goes alone.
        let half = MAX_BATCH_BYTES / 2;
        link.queue.lock().unwrap().extend([
            item(1, half),
            item(2, half),
            item(3, half),
            item(4, 2 * MAX_BATCH_BYTES),
        ]);
        let mut sizes = Vec::new();
        loop {
            out.clear();
            take_batch(&link, &mut out);
            if out.is_empty() {
                break;
            }
            sizes.push(out.iter().map(|i| i.frame.len()).collect::<Vec<_>>());
        }
        assert_eq!(
            sizes,
            vec![vec![half, half], vec![half], vec![2 * MAX_BATCH_BYTES]]
        );
    }

    #[test]
    fn batches_round_trip_and_refuse_what_is_not_one() {
        let (a, b) = (
            UserId::from_bytes([1; USER_ID_LEN]),
            UserId::from_bytes([2; USER_ID_LEN]),
        );
        let body = Bytes::from(encode_batch(
            5,
            [(&a, &b"first"[..]), (&b, &b"second"[..])].into_iter(),
        ));
        let (batch, items) = parse_batch(&body, 64).unwrap();
        assert_eq!(batch, 5);
        assert_eq!(
            items,
            vec![
                (a, Bytes::from_static(b"first")),
                (b, Bytes::from_static(b"second"))
            ]
        );
        let none = encode_batch(5, std::iter::empty());
        let bad: Vec<(&str, Vec<u8>, usize)> = vec![
            ("no deliveries", none, 64),
            ("a frame over the limit", body.to_vec(), 5),
            ("cut short", body[..body.len() - 1].to_vec(), 64),
            ("trailing bytes", [&body[..], b"!"].concat(), 64),
            (
                "a count beyond the deliveries",
                {
                    let mut v = body.to_vec();
                    v[9] = 3;
                    v
                },
                64,
            ),
            (
                "a length beyond the payload",
                {
                    let mut v = body.to_vec();
                    v[10 + USER_ID_LEN..10 + USER_ID_LEN + 4]
                        .copy_from_slice(&u32::MAX.to_be_bytes());
                    v
                },
                usize::MAX,
            ),
            (
                "more than MAX_BATCH",
                {
                    let mut v = body.to_vec();
                    v[8..10].copy_from_slice(&u16::try_from(MAX_BATCH + 1).unwrap().to_be_bytes());
                    v
                },
                64,
            ),
        ];
        for (name, body, max) in bad {
            assert!(parse_batch(&Bytes::from(body), max).is_err(), "{name}");
        }
    }
}

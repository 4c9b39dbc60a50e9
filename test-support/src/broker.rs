//! The [`Broker`] conformance suite and a recording [`BrokerSink`].
//!
//! The suite sees a broker the way a relay cluster does: two nodes on one backend, each with its
//! own sink. It never sleeps to wait for something. Deliveries are awaited with a deadline, and
//! the absence of a delivery is shown with a *fence*: after the publish that must not arrive,
//! the same node publishes a marker on a topic the receiver does hear, and everything the
//! receiver got before the marker is checked. That relies on one ordering property that every
//! supported backend has (memory: synchronous; Redis and NATS: per connection): two publishes
//! from one node reach one receiving node in the order they were made.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use syncra_core::{Broker, BrokerSink, Confirm, Health, PublishReceipt};
use tokio::sync::mpsc;

use crate::DEADLINE;
use crate::fixtures::unique_name;

/// One payload as a sink saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The topic it came on.
    pub topic: String,
    /// The payload.
    pub payload: Bytes,
}

/// A [`BrokerSink`] that records every delivery into a channel and reports it taken.
#[derive(Debug)]
pub struct RecordingSink {
    tx: mpsc::UnboundedSender<Delivery>,
}

impl RecordingSink {
    /// A sink and the receiving end of what it records.
    pub fn new() -> (Arc<Self>, Deliveries) {
        // Unbounded because `deliver` must not block; a test's traffic is bounded anyway.
        let (tx, rx) = mpsc::unbounded_channel();
        (Arc::new(RecordingSink { tx }), Deliveries { rx })
    }
}

impl BrokerSink for RecordingSink {
    fn deliver(&self, topic: &str, payload: Bytes) -> bool {
        self.tx
            .send(Delivery {
                topic: topic.to_owned(),
                payload,
            })
            .is_ok()
    }
}

/// A sink like the relay's for its own payloads: called, but takes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Refusing;

impl BrokerSink for Refusing {
    fn deliver(&self, _topic: &str, _payload: Bytes) -> bool {
        false
    }
}

/// What a [`RecordingSink`] received, in order.
#[derive(Debug)]
pub struct Deliveries {
    rx: mpsc::UnboundedReceiver<Delivery>,
}

impl Deliveries {
    /// The next delivery, waiting at most [`DEADLINE`].
    ///
    /// # Panics
    ///
    /// If nothing arrives in time; `what` says what was expected.
    pub async fn next(&mut self, what: &str) -> Delivery {
        match tokio::time::timeout(DEADLINE, self.rx.recv()).await {
            Ok(Some(delivery)) => delivery,
            Ok(None) => panic!("{what}: the sink was dropped"),
            Err(_) => panic!("{what}: nothing delivered within {DEADLINE:?}"),
        }
    }

    /// Everything delivered before the first delivery of `payload` on `topic`, waiting at most
    /// [`DEADLINE`] for it. The marker itself is consumed.
    ///
    /// # Panics
    ///
    /// If the marker does not arrive in time.
    pub async fn until_marker(
        &mut self,
        topic: &str,
        payload: &Bytes,
        what: &str,
    ) -> Vec<Delivery> {
        let mut before = Vec::new();
        loop {
            let delivery = self.next(what).await;
            if delivery.topic == topic && delivery.payload == *payload {
                return before;
            }
            before.push(delivery);
        }
    }

    /// A delivery that has already arrived, if any.
    pub fn try_next(&mut self) -> Option<Delivery> {
        self.rx.try_recv().ok()
    }
}

/// One node of the pair a case runs on.
struct Node {
    broker: Arc<dyn Broker>,
    inbox: Deliveries,
}

/// Runs every broker rule against node pairs made by `make_nodes`.
///
/// `make_nodes(sink_a, sink_b)` must return two brokers attached to the same backend (two relay
/// nodes of one cluster), the first delivering to `sink_a` and the second to `sink_b`. It is
/// called once per case. Topics are made unique per case, so the backend may be shared between
/// cases and tests. A `subscribe` that has returned must be in effect: the relay relies on that
/// when it tells a sender that a recipient who just connected is online.
///
/// # Panics
///
/// On the first rule the broker breaks, naming the case. A broker must count the receivers of
/// a publish (`Confirm::Count` and `Confirm::Any`); one that answers "cannot tell" fails.
pub async fn broker_conformance<F, Fut>(make_nodes: F)
where
    F: Fn(Arc<dyn BrokerSink>, Arc<dyn BrokerSink>) -> Fut,
    Fut: Future<Output = (Arc<dyn Broker>, Arc<dyn Broker>)>,
{
    let pair = || async {
        let (sink_a, inbox_a) = RecordingSink::new();
        let (sink_b, inbox_b) = RecordingSink::new();
        let (a, b) = make_nodes(sink_a, sink_b).await;
        (
            Node {
                broker: a,
                inbox: inbox_a,
            },
            Node {
                broker: b,
                inbox: inbox_b,
            },
        )
    };
    publish_reaches_a_subscriber_on_another_node(pair().await).await;
    publish_to_nobody_counts_zero(pair().await).await;
    subscribing_twice_delivers_once(pair().await).await;
    unsubscribe_stops_delivery(pair().await).await;
    both_nodes_receive(pair().await).await;
    order_is_preserved(pair().await).await;
    confirm_levels(pair().await).await;
    large_binary_payload_is_intact(pair().await).await;
    health_is_up(pair().await).await;
}

async fn subscribe(node: &Node, topic: &str, case: &str) {
    node.broker
        .subscribe(topic)
        .await
        .unwrap_or_else(|e| panic!("{case}: subscribe({topic}) failed: {e}"));
}

async fn unsubscribe(node: &Node, topic: &str, case: &str) {
    node.broker
        .unsubscribe(topic)
        .await
        .unwrap_or_else(|e| panic!("{case}: unsubscribe({topic}) failed: {e}"));
}

async fn publish(node: &Node, topic: &str, payload: &Bytes, case: &str) -> PublishReceipt {
    node.broker
        .publish(topic, payload.clone())
        .await
        .unwrap_or_else(|e| panic!("{case}: publish({topic}) failed: {e}"))
}

/// Asserts a receipt reports exactly `expected` receivers. The contract lets a broker answer
/// "cannot tell" (`None`); every broker this suite runs on counts, so "cannot tell" from one of
/// them is a defect, not a pass (before, a broker that never counted passed every count).
fn assert_receivers(receipt: PublishReceipt, expected: u64, case: &str) {
    assert_eq!(
        receipt.receivers,
        Some(expected),
        "{case}: expected the broker to count {expected} receivers"
    );
}

/// Subscribes `receiver` to a fresh marker topic, publishes the marker from `sender` and returns
/// what arrived in `inbox` (the receiver's) before it. Leaves the marker subscription in place.
async fn fence(
    sender: &dyn Broker,
    receiver: &dyn Broker,
    inbox: &mut Deliveries,
    case: &str,
) -> Vec<Delivery> {
    let topic = unique_name("conformance.marker");
    let marker = Bytes::from(unique_name("marker"));
    receiver
        .subscribe(&topic)
        .await
        .unwrap_or_else(|e| panic!("{case}: subscribe({topic}) for the fence failed: {e}"));
    sender
        .publish(&topic, marker.clone())
        .await
        .unwrap_or_else(|e| panic!("{case}: publishing the fence marker failed: {e}"));
    inbox
        .until_marker(
            &topic,
            &marker,
            &format!("{case}: waiting for the fence marker"),
        )
        .await
}

async fn publish_reaches_a_subscriber_on_another_node((mut a, mut b): (Node, Node)) {
    let case = "publish reaches another node";
    let topic = unique_name("conformance.user");
    let payload = Bytes::from_static(b"sealed envelope");
    subscribe(&b, &topic, case).await;
    let receipt = publish(&a, &topic, &payload, case).await;
    assert_receivers(receipt, 1, case);
    let got = b.inbox.next(case).await;
    assert_eq!(
        got,
        Delivery {
            topic: topic.clone(),
            payload
        },
        "{case}: the subscriber must get the exact topic and payload"
    );
    let stray = fence(&*a.broker, &*b.broker, &mut b.inbox, case).await;
    assert_eq!(stray, [], "{case}: one publish must be delivered once");
    let stray = fence(&*a.broker, &*a.broker, &mut a.inbox, case).await;
    assert_eq!(
        stray,
        [],
        "{case}: the publishing node did not subscribe and must get nothing"
    );
}

async fn publish_to_nobody_counts_zero((a, _b): (Node, Node)) {
    let case = "publish to nobody";
    let topic = unique_name("conformance.nobody");
    let receipt = publish(&a, &topic, &Bytes::from_static(b"anyone?"), case).await;
    assert_receivers(receipt, 0, case);
}

async fn subscribing_twice_delivers_once((a, mut b): (Node, Node)) {
    let case = "subscribe twice";
    let topic = unique_name("conformance.twice");
    let payload = Bytes::from_static(b"once");
    subscribe(&b, &topic, case).await;
    subscribe(&b, &topic, case).await;
    let receipt = publish(&a, &topic, &payload, case).await;
    assert_receivers(receipt, 1, case);
    let got = fence(&*a.broker, &*b.broker, &mut b.inbox, case).await;
    assert_eq!(
        got,
        [Delivery { topic, payload }],
        "{case}: a node subscribed twice must get each payload once"
    );
}

async fn unsubscribe_stops_delivery((a, mut b): (Node, Node)) {
    let case = "unsubscribe";
    let topic = unique_name("conformance.leaving");
    unsubscribe(
        &b,
        &unique_name("conformance.never"),
        &format!("{case} (unknown topic)"),
    )
    .await;

    subscribe(&b, &topic, case).await;
    let before = Bytes::from_static(b"before");
    publish(&a, &topic, &before, case).await;
    let got = b.inbox.next(case).await;
    assert_eq!(got.payload, before, "{case}: delivery before unsubscribing");

    unsubscribe(&b, &topic, case).await;
    let receipt = publish(&a, &topic, &Bytes::from_static(b"after"), case).await;
    assert_receivers(receipt, 0, case);
    let stray = fence(&*a.broker, &*b.broker, &mut b.inbox, case).await;
    assert_eq!(
        stray,
        [],
        "{case}: nothing may be delivered after unsubscribe returned"
    );
}

async fn both_nodes_receive((mut a, mut b): (Node, Node)) {
    let case = "both nodes subscribed";
    let topic = unique_name("conformance.shared");
    let payload = Bytes::from_static(b"to both");
    subscribe(&a, &topic, case).await;
    subscribe(&b, &topic, case).await;
    let receipt = publish(&a, &topic, &payload, case).await;
    assert_receivers(receipt, 2, case);
    let expected = Delivery { topic, payload };
    assert_eq!(
        a.inbox.next(case).await,
        expected,
        "{case}: the publishing node is subscribed too and must receive"
    );
    assert_eq!(b.inbox.next(case).await, expected, "{case}: the other node");
}

async fn order_is_preserved((a, mut b): (Node, Node)) {
    let case = "ordering";
    let topic = unique_name("conformance.ordered");
    subscribe(&b, &topic, case).await;
    for i in 0..100u32 {
        publish(&a, &topic, &Bytes::from(i.to_be_bytes().to_vec()), case).await;
    }
    for i in 0..100u32 {
        let got = b.inbox.next(&format!("{case}: payload {i}")).await;
        assert_eq!(got.topic, topic, "{case}: payload {i} topic");
        assert_eq!(
            got.payload.as_ref(),
            i.to_be_bytes(),
            "{case}: payloads on one topic must arrive in publish order"
        );
    }
}

/// `publish_confirm`: `Any` may stop counting at the first receiver but never says "nobody"
/// when somebody took it; `Nothing` still delivers everywhere; mixing the levels keeps the
/// publish order (the relay switches between them message by message).
async fn confirm_levels((mut a, mut b): (Node, Node)) {
    let case = "confirm levels";
    let topic = unique_name("conformance.confirm");
    subscribe(&a, &topic, case).await;
    subscribe(&b, &topic, case).await;
    let levels = [Confirm::Any, Confirm::Nothing, Confirm::Count];
    for (i, level) in levels.iter().cycle().take(30).enumerate() {
        let payload = Bytes::from(format!("level {i}"));
        let receipt = a
            .broker
            .publish_confirm(&topic, payload, *level)
            .await
            .unwrap_or_else(|e| panic!("{case}: publish {i} ({level:?}) failed: {e}"));
        match (level, receipt.receivers) {
            (Confirm::Any, n) => assert!(
                matches!(n, Some(1..=2)),
                "{case}: Any must report at least one of the two receivers, got {n:?}"
            ),
            (Confirm::Count, _) => assert_receivers(receipt, 2, case),
            // Nothing asked, nothing owed: a count, if the broker gives one, is the truth.
            (Confirm::Nothing, n) => assert!(
                matches!(n, None | Some(2)),
                "{case}: Nothing may report no count, or the true one, got {n:?}"
            ),
        }
    }
    for inbox in [&mut a.inbox, &mut b.inbox] {
        for i in 0..30 {
            let got = inbox.next(&format!("{case}: payload {i}")).await;
            assert_eq!(
                got.payload,
                format!("level {i}"),
                "{case}: every level delivers, in publish order"
            );
        }
    }
    let nobody = unique_name("conformance.confirm.nobody");
    for level in levels {
        let receipt = a
            .broker
            .publish_confirm(&nobody, Bytes::from_static(b"anyone?"), level)
            .await
            .unwrap_or_else(|e| panic!("{case}: publish to nobody ({level:?}) failed: {e}"));
        let fine = match level {
            Confirm::Nothing => matches!(receipt.receivers, Some(0) | None),
            Confirm::Any | Confirm::Count => receipt.receivers == Some(0),
        };
        assert!(
            fine,
            "{case}: {level:?} to nobody must report nobody: {:?}",
            receipt.receivers
        );
    }
}

async fn large_binary_payload_is_intact((a, mut b): (Node, Node)) {
    let case = "64 KiB binary payload";
    let topic = unique_name("conformance.large");
    // Every byte value, NULs and invalid UTF-8 included, in a pattern that is not periodic at a
    // power of two, so a truncation or a dropped chunk cannot go unnoticed.
    let payload: Bytes = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect::<Vec<u8>>()
        .into();
    subscribe(&b, &topic, case).await;
    publish(&a, &topic, &payload, case).await;
    let got = b.inbox.next(case).await;
    assert_eq!(got.payload.len(), payload.len(), "{case}: length");
    assert!(
        got.payload == payload,
        "{case}: the bytes must arrive unchanged"
    );
}

async fn health_is_up((a, b): (Node, Node)) {
    for (name, node) in [("a", &a), ("b", &b)] {
        assert_eq!(
            node.broker.health().await,
            Health::Up,
            "health: node {name} of a fresh broker must be up"
        );
        assert!(!node.broker.kind().is_empty(), "kind: must not be empty");
    }
}

/// How long a broker call may take while its backend is down before it counts as hanging. The
/// relay answers a sender with "broker unavailable" rather than keep them waiting, so an
/// outage must surface as an error within seconds; this is a bound on hanging, not a
/// performance figure.
pub const OUTAGE_ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the outage rules: a broker whose backend goes away fails fast and reports it, and once
/// the backend is back it recovers by itself, with the subscriptions its node wants.
///
/// `make_nodes` is as for [`broker_conformance`] (called once); `server` is the backend both
/// nodes use, stopped and restarted on the same address in the middle of the case. The rules:
///
/// - while the backend is down, `publish` fails with [`BrokerError::Unavailable`] within
///   [`OUTAGE_ANSWER_WITHIN`] (it never hangs and never claims a delivery) and `health` turns
///   `Down`;
/// - `subscribe` and `unsubscribe` during the outage answer within the same bound (`Ok` or
///   `Unavailable`), and are honoured once the backend is back;
/// - after the restart, `health` turns `Up` within [`DEADLINE`] without any call from the test,
///   and a publish from one node reaches the other node's subscription made *before* the outage,
///   with nobody subscribing again by hand.
///
/// A payload whose publish failed during the outage may still arrive after the recovery (a
/// client library may have sent it just as the connection broke); nothing else may.
///
/// # Panics
///
/// On the first rule the broker breaks.
///
/// [`BrokerError::Unavailable`]: syncra_core::error::BrokerError::Unavailable
pub async fn broker_outage_recovery<F, Fut>(
    server: &mut dyn crate::servers::Restartable,
    make_nodes: F,
) where
    F: FnOnce(Arc<dyn BrokerSink>, Arc<dyn BrokerSink>) -> Fut,
    Fut: Future<Output = (Arc<dyn Broker>, Arc<dyn Broker>)>,
{
    use syncra_core::error::BrokerError;

    let case = "outage";
    let (sink_a, _inbox_a) = RecordingSink::new();
    let (sink_b, mut inbox_b) = RecordingSink::new();
    let (a, b) = make_nodes(sink_a, sink_b).await;
    let kept = unique_name("outage.kept");
    let dropped = unique_name("outage.dropped");
    let late = unique_name("outage.late");

    // Before: an ordinary working pair.
    for topic in [&kept, &dropped] {
        b.subscribe(topic)
            .await
            .unwrap_or_else(|e| panic!("{case}: subscribe({topic}) before the outage: {e}"));
    }
    let before = Bytes::from_static(b"before the outage");
    let receipt = a
        .publish(&kept, before.clone())
        .await
        .unwrap_or_else(|e| panic!("{case}: publish before the outage: {e}"));
    assert_receivers(receipt, 1, case);
    assert_eq!(
        inbox_b.next(case).await.payload,
        before,
        "{case}: delivery before the outage"
    );

    // Blocking here is brief (a kill, or waiting for the server's listener) and nothing the
    // brokers do can speed it up, so it needs no blocking-task dance.
    server.stop();

    // During: every publish fails, fast; health follows.
    let mut sent_during = Vec::new();
    for i in 0..2u8 {
        let payload = Bytes::from(vec![b'd', i]);
        sent_during.push(payload.clone());
        let result = tokio::time::timeout(OUTAGE_ANSWER_WITHIN, a.publish(&kept, payload))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{case}: publish {i} with the backend down hung for {OUTAGE_ANSWER_WITHIN:?}"
                )
            });
        assert!(
            matches!(result, Err(BrokerError::Unavailable(_))),
            "{case}: publish {i} with the backend down must fail with Unavailable, got {result:?}"
        );
        if i == 0 {
            for (name, node) in [("a", &a), ("b", &b)] {
                wait_for_health(
                    &**node,
                    false,
                    &format!("{case}: node {name} after the stop"),
                )
                .await;
            }
        }
    }
    let unsubscribed = tokio::time::timeout(OUTAGE_ANSWER_WITHIN, b.unsubscribe(&dropped))
        .await
        .unwrap_or_else(|_| panic!("{case}: unsubscribe with the backend down hung"));
    assert!(
        matches!(unsubscribed, Ok(()) | Err(BrokerError::Unavailable(_))),
        "{case}: unsubscribe with the backend down: {unsubscribed:?}"
    );
    let subscribed = tokio::time::timeout(OUTAGE_ANSWER_WITHIN, b.subscribe(&late))
        .await
        .unwrap_or_else(|_| panic!("{case}: subscribe with the backend down hung"));
    assert!(
        matches!(subscribed, Ok(()) | Err(BrokerError::Unavailable(_))),
        "{case}: subscribe with the backend down: {subscribed:?}"
    );

    server.restart();

    // After: both nodes come back by themselves, with node b's subscriptions as it wants them.
    for (name, node) in [("a", &a), ("b", &b)] {
        wait_for_health(
            &**node,
            true,
            &format!("{case}: node {name} after the restart"),
        )
        .await;
    }
    let after = Bytes::from_static(b"after the outage");
    let receipt = a
        .publish(&kept, after.clone())
        .await
        .unwrap_or_else(|e| panic!("{case}: publish after the recovery: {e}"));
    assert_receivers(receipt, 1, &format!("{case}: after the recovery"));
    let stray = inbox_b
        .until_marker(
            &kept,
            &after,
            &format!("{case}: the subscription made before the outage must work again"),
        )
        .await;
    for delivery in stray {
        assert!(
            delivery.topic == kept && sent_during.contains(&delivery.payload),
            "{case}: unexpected delivery after the recovery: {delivery:?}"
        );
    }

    let late_payload = Bytes::from_static(b"subscribed during the outage");
    let receipt = a
        .publish(&late, late_payload.clone())
        .await
        .unwrap_or_else(|e| panic!("{case}: publish on the late topic: {e}"));
    assert_receivers(receipt, 1, &format!("{case}: subscribed during the outage"));
    let stray = inbox_b
        .until_marker(
            &late,
            &late_payload,
            &format!("{case}: a subscribe made during the outage must take effect"),
        )
        .await;
    assert_eq!(stray, [], "{case}: nothing else before the late delivery");

    let receipt = a
        .publish(
            &dropped,
            Bytes::from_static(b"unsubscribed during the outage"),
        )
        .await
        .unwrap_or_else(|e| panic!("{case}: publish on the dropped topic: {e}"));
    assert_receivers(
        receipt,
        0,
        &format!("{case}: unsubscribed during the outage"),
    );
    let stray = fence(&*a, &*b, &mut inbox_b, case).await;
    assert_eq!(
        stray,
        [],
        "{case}: an unsubscribe made during the outage must stay in effect"
    );
}

/// Polls `health` until it is up (`want_up`) or down, or panics after [`DEADLINE`].
pub async fn wait_for_health(broker: &dyn Broker, want_up: bool, what: &str) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let health = broker.health().await;
        let reached = if want_up {
            health == Health::Up
        } else {
            !health.is_up()
        };
        if reached {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: health must become {} within {DEADLINE:?}, still {health:?}",
            if want_up { "up" } else { "down" }
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A server that stops answering without closing its connections (a partition, a hung host):
/// health turns down, a publish fails within [`OUTAGE_ANSWER_WITHIN`] instead of waiting for
/// the client to give up on the connection, and both nodes recover when the server answers
/// again. `a` publishes (its sink refuses), `b` (recording into `inbox_b`) subscribes to
/// `topic`; `set_frozen(true)` freezes the server, `set_frozen(false)` thaws it. Both nodes
/// must be configured with short timeouts and ping intervals (a few hundred ms).
///
/// # Panics
///
/// On any broken rule.
pub async fn frozen_server_is_survived(
    a: &dyn Broker,
    b: &dyn Broker,
    mut inbox_b: Deliveries,
    topic: &str,
    mut set_frozen: impl FnMut(bool),
) {
    b.subscribe(topic).await.expect("subscribe");
    set_frozen(true);
    wait_for_health(b, false, "the receiving node notices through its pings").await;
    let result = tokio::time::timeout(
        OUTAGE_ANSWER_WITHIN,
        a.publish(topic, Bytes::from_static(b"lost?")),
    )
    .await
    .expect("a publish to a frozen server must not hang");
    assert!(
        matches!(result, Err(syncra_core::error::BrokerError::Unavailable(_))),
        "{result:?}"
    );

    set_frozen(false);
    wait_for_health(a, true, "node a after the thaw").await;
    wait_for_health(b, true, "node b after the thaw").await;
    let after = Bytes::from_static(b"after the thaw");
    let receipt = a
        .publish(topic, after.clone())
        .await
        .expect("publish after the thaw");
    assert_eq!(receipt.receivers, Some(1));
    let before = inbox_b
        .until_marker(topic, &after, "delivery after the thaw")
        .await;
    assert!(before.iter().all(|d| d.payload == "lost?"), "{before:?}");
}

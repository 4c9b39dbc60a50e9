//! What is particular to the NATS broker, on a real `nats-server` this test starts: how
//! `receivers` is counted from the nodes' answers, registration by kind, and size and topic
//! rules.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::sync::Arc;

use bytes::Bytes;
use syncra_broker_nats::{NatsBroker, NatsConfig};
use syncra_core::error::BrokerError;
use syncra_core::registry::Kinds;
use syncra_core::{Broker, BrokerSink, Health};
use syncra_test_support::broker::OUTAGE_ANSWER_WITHIN;
use syncra_test_support::servers::NatsServer;
use syncra_test_support::{DEADLINE, RecordingSink, unique_name};

/// A sink like the relay's for its own payloads: called, but takes nothing.
struct Refusing;

impl BrokerSink for Refusing {
    fn deliver(&self, _topic: &str, _payload: Bytes) -> bool {
        false
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_counts_only_nodes_whose_sink_took_the_payload() {
    let server = NatsServer::start();
    let config = NatsConfig::new(server.url());
    let (sink_b, mut inbox_b) = RecordingSink::new();
    let a = NatsBroker::connect(&config, Arc::new(Refusing))
        .await
        .unwrap();
    let b = NatsBroker::connect(&config, sink_b).await.unwrap();
    let topic = unique_name("nats.own");

    // Only the publisher is subscribed and its sink refuses: it answers "not taken", so the
    // publish learns "nobody" from that answer, not from a timeout (which would be an error).
    a.subscribe(&topic).await.unwrap();
    let receipt = a.publish(&topic, Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(receipt.receivers, Some(0));

    // Another node takes it: counted once; the publisher's own refusal is not counted.
    b.subscribe(&topic).await.unwrap();
    let receipt = a.publish(&topic, Bytes::from_static(b"y")).await.unwrap();
    assert_eq!(receipt.receivers, Some(1));
    assert_eq!(inbox_b.next("b's delivery").await.payload, "y");

    // Nobody subscribed: the server's "no responders".
    let receipt = a
        .publish(&unique_name("nats.nobody"), Bytes::from_static(b"z"))
        .await
        .unwrap();
    assert_eq!(receipt.receivers, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_kind_nats_and_refuses_unknown_keys() {
    let server = NatsServer::start();
    let mut kinds = Kinds::new("broker", &[]);
    syncra_broker_nats::register(&mut kinds).unwrap();
    let (sink, mut inbox) = RecordingSink::new();
    let broker = kinds
        .create(
            serde_json::json!({ "kind": "nats", "url": server.url(), "reply_window_ms": 5 }),
            sink,
        )
        .await
        .unwrap();
    assert_eq!(broker.kind(), "nats");
    assert_eq!(broker.health().await, Health::Up);
    let topic = unique_name("nats.registered");
    broker.subscribe(&topic).await.unwrap();
    let receipt = broker
        .publish(&topic, Bytes::from_static(b"p"))
        .await
        .unwrap();
    assert_eq!(receipt.receivers, Some(1));
    assert_eq!(inbox.next("delivery").await.payload, "p");

    let Err(err) = kinds
        .create(
            serde_json::json!({ "kind": "nats", "url": server.url(), "jetstream": true }),
            Arc::new(Refusing),
        )
        .await
    else {
        panic!("an unknown key must be refused");
    };
    assert!(err.to_string().contains("jetstream"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payloads_and_wildcard_topics_are_refused() {
    let server = NatsServer::start();
    let broker = NatsBroker::connect(&NatsConfig::new(server.url()), Arc::new(Refusing))
        .await
        .unwrap();
    // nats-server's default max_payload is 1 MiB.
    let result = broker
        .publish(
            &unique_name("nats.big"),
            Bytes::from(vec![0u8; 1024 * 1024 + 1]),
        )
        .await;
    assert!(
        matches!(result, Err(BrokerError::TooLarge { max: 1_048_576, .. })),
        "{result:?}"
    );
    for topic in ["syncra.u.*", "syncra.>", "has space", ""] {
        assert!(
            matches!(broker.subscribe(topic).await, Err(BrokerError::BadTopic(_))),
            "{topic:?}"
        );
        assert!(
            matches!(
                broker.publish(topic, Bytes::new()).await,
                Err(BrokerError::BadTopic(_))
            ),
            "{topic:?}"
        );
    }
}

/// A server that stops answering without closing its connections (a partition, a hung host):
/// health turns down, a publish fails within the request timeout instead of waiting for the
/// client to give up on the connection, and both nodes recover when the server answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_is_noticed_and_survived() {
    let mut server = NatsServer::start();
    let mut config = NatsConfig::new(server.url());
    config.command_timeout_ms = 300;
    config.request_timeout_ms = 300;
    config.connect_timeout_ms = 300;
    config.ping_interval_ms = 100;
    let (sink_b, mut inbox_b) = RecordingSink::new();
    let a = NatsBroker::connect(&config, Arc::new(Refusing))
        .await
        .unwrap();
    let b = NatsBroker::connect(&config, sink_b).await.unwrap();
    let topic = unique_name("nats.frozen");
    b.subscribe(&topic).await.unwrap();

    server.freeze();
    wait_for(&b, false, "node b while the server is frozen").await;
    let result = tokio::time::timeout(
        OUTAGE_ANSWER_WITHIN,
        a.publish(&topic, Bytes::from_static(b"lost?")),
    )
    .await
    .expect("a publish to a frozen server must not hang");
    assert!(
        matches!(result, Err(BrokerError::Unavailable(_))),
        "{result:?}"
    );

    server.thaw();
    wait_for(&a, true, "node a after the thaw").await;
    wait_for(&b, true, "node b after the thaw").await;
    let after = Bytes::from_static(b"after the thaw");
    let receipt = a.publish(&topic, after.clone()).await.unwrap();
    assert_eq!(receipt.receivers, Some(1));
    let before = inbox_b
        .until_marker(&topic, &after, "delivery after the thaw")
        .await;
    assert!(before.iter().all(|d| d.payload == "lost?"), "{before:?}");
}

async fn wait_for(broker: &NatsBroker, up: bool, what: &str) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let health = broker.health().await;
        if (health == Health::Up) == up {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: still {health:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

//! What is particular to the NATS broker, on a real `nats-server` this test starts: how
//! `receivers` is counted from the nodes' answers, registration by kind, and size and topic
//! rules.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::sync::Arc;

use bytes::Bytes;
use syncra_broker_nats::{NatsBroker, NatsConfig};
use syncra_core::error::BrokerError;
use syncra_core::registry::Kinds;
use syncra_core::{Broker, Health};
use syncra_test_support::broker::{Refusing, frozen_server_is_survived};
use syncra_test_support::servers::NatsServer;
use syncra_test_support::{RecordingSink, unique_name};

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

/// A server that stops answering without closing its connections: the shared suite
/// (`syncra_test_support::broker::frozen_server_is_survived`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_is_noticed_and_survived() {
    let mut server = NatsServer::start();
    let mut config = NatsConfig::new(server.url());
    config.command_timeout_ms = 300;
    config.request_timeout_ms = 300;
    config.connect_timeout_ms = 300;
    config.ping_interval_ms = 100;
    let (sink_b, inbox_b) = RecordingSink::new();
    let a = NatsBroker::connect(&config, Arc::new(Refusing))
        .await
        .unwrap();
    let b = NatsBroker::connect(&config, sink_b).await.unwrap();
    let topic = unique_name("nats.frozen");
    frozen_server_is_survived(&a, &b, inbox_b, &topic, |frozen| {
        if frozen {
            server.freeze()
        } else {
            server.thaw()
        }
    })
    .await;
}

/// A publisher chooses the reply subject of what it publishes: a node answers only a broker's
/// answer inbox, so nobody can make every node publish on a subject of its choice (another
/// node's delivery topic, a JetStream API subject). Deterministic: the outsider's publishes are
/// served in order, so once the answer to its last one (on an inbox) arrives, an answer to the
/// first would have arrived before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_answer_inboxes_are_answered() {
    use futures_util::StreamExt;
    let server = NatsServer::start();
    let (sink, mut inbox) = RecordingSink::new();
    let node = NatsBroker::connect(&NatsConfig::new(server.url()), sink)
        .await
        .unwrap();
    let topic = unique_name("nats.served");
    node.subscribe(&topic).await.unwrap();
    let outsider = async_nats::connect(server.url()).await.unwrap();
    let mut chosen = outsider.subscribe("victim.>").await.unwrap();
    let mut answers = outsider.subscribe("_INBOX.>").await.unwrap();
    outsider.flush().await.unwrap();
    for reply in ["victim.topic", "victim.x.1"] {
        outsider
            .publish_with_reply(topic.clone(), reply, Bytes::from_static(b"x"))
            .await
            .unwrap();
    }
    let last = format!("{}.1", outsider.new_inbox());
    outsider
        .publish_with_reply(topic.clone(), last.clone(), Bytes::from_static(b"y"))
        .await
        .unwrap();
    let answer = tokio::time::timeout(syncra_test_support::DEADLINE, answers.next())
        .await
        .expect("the inbox is answered")
        .unwrap();
    assert_eq!(answer.subject.as_str(), last);
    for _ in 0..3 {
        inbox.next("the node's sink got every publish").await;
    }
    assert!(
        futures_util::FutureExt::now_or_never(chosen.next()).is_none(),
        "a subject the publisher chose was answered"
    );
}

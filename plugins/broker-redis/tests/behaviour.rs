//! What is particular to the Redis broker, on a real `redis-server` this test starts: what
//! `receivers` counts, registration by kind, topic rules, and resubscribing many topics.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::sync::Arc;

use bytes::Bytes;
use syncra_broker_redis::{RedisBroker, RedisConfig};
use syncra_core::error::BrokerError;
use syncra_core::registry::Kinds;
use syncra_core::{Broker, Health};
use syncra_test_support::broker::{Refusing, frozen_server_is_survived};
use syncra_test_support::servers::RedisServer;
use syncra_test_support::{DEADLINE, RecordingSink, unique_name};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_counts_subscribed_nodes_including_the_publisher() {
    let server = RedisServer::start();
    let config = RedisConfig::new(server.url());
    let (sink_b, mut inbox_b) = RecordingSink::new();
    let a = RedisBroker::connect(&config, Arc::new(Refusing))
        .await
        .unwrap();
    let b = RedisBroker::connect(&config, sink_b).await.unwrap();
    let topic = unique_name("redis.own");

    // Only the publisher is subscribed, and its sink refuses: Redis still counts it. This is
    // why the relay must subtract its own subscription.
    a.subscribe(&topic).await.unwrap();
    let receipt = a.publish(&topic, Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(receipt.receivers, Some(1));

    b.subscribe(&topic).await.unwrap();
    let receipt = a.publish(&topic, Bytes::from_static(b"y")).await.unwrap();
    assert_eq!(receipt.receivers, Some(2));
    assert_eq!(inbox_b.next("b's delivery").await.payload, "y");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_kind_redis_and_refuses_unknown_keys() {
    let server = RedisServer::start();
    let mut kinds = Kinds::new("broker", &[]);
    syncra_broker_redis::register(&mut kinds).unwrap();
    let (sink, mut inbox) = RecordingSink::new();
    let broker = kinds
        .create(
            serde_json::json!({ "kind": "redis", "url": server.url(), "command_timeout_ms": 1500 }),
            sink,
        )
        .await
        .unwrap();
    assert_eq!(broker.kind(), "redis");
    assert_eq!(broker.health().await, Health::Up);
    let topic = unique_name("redis.registered");
    broker.subscribe(&topic).await.unwrap();
    broker
        .publish(&topic, Bytes::from_static(b"p"))
        .await
        .unwrap();
    assert_eq!(inbox.next("delivery").await.payload, "p");

    let Err(err) = kinds
        .create(
            serde_json::json!({ "kind": "redis", "url": server.url(), "urls": [] }),
            Arc::new(Refusing),
        )
        .await
    else {
        panic!("an unknown key must be refused");
    };
    assert!(err.to_string().contains("urls"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_topic_is_refused() {
    let server = RedisServer::start();
    let broker = RedisBroker::connect(&RedisConfig::new(server.url()), Arc::new(Refusing))
        .await
        .unwrap();
    assert!(matches!(
        broker.publish("", Bytes::new()).await,
        Err(BrokerError::BadTopic(_))
    ));
    assert!(matches!(
        broker.subscribe("").await,
        Err(BrokerError::BadTopic(_))
    ));
}

/// A node holding thousands of users gets all of them back, in several `SUBSCRIBE` chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_topics_are_subscribed_again_after_a_restart() {
    let mut server = RedisServer::start();
    let config = RedisConfig::new(server.url());
    let (sink_b, mut inbox_b) = RecordingSink::new();
    let a = RedisBroker::connect(&config, Arc::new(Refusing))
        .await
        .unwrap();
    let b = RedisBroker::connect(&config, sink_b).await.unwrap();
    let prefix = unique_name("redis.many");
    let topics: Vec<String> = (0..2500).map(|i| format!("{prefix}.{i}")).collect();
    for topic in &topics {
        b.subscribe(topic).await.unwrap();
    }

    server.stop();
    server.restart();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while b.health().await != Health::Up || a.health().await != Health::Up {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not up again in time"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for topic in [&topics[0], &topics[1234], &topics[2499]] {
        let receipt = a.publish(topic, Bytes::from(topic.clone())).await.unwrap();
        assert_eq!(receipt.receivers, Some(1), "{topic}");
        let got = inbox_b.next(topic).await;
        assert_eq!(got.topic, *topic);
    }
}

/// A server that stops answering without closing its connections: the shared suite
/// (`syncra_test_support::broker::frozen_server_is_survived`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_is_noticed_and_survived() {
    let mut server = RedisServer::start();
    let mut config = RedisConfig::new(server.url());
    config.command_timeout_ms = 300;
    config.connect_timeout_ms = 300;
    config.ping_interval_ms = 100;
    let (sink_b, inbox_b) = RecordingSink::new();
    let a = RedisBroker::connect(&config, Arc::new(Refusing))
        .await
        .unwrap();
    let b = RedisBroker::connect(&config, sink_b).await.unwrap();
    let topic = unique_name("redis.frozen");
    frozen_server_is_survived(&a, &b, inbox_b, &topic, |frozen| {
        if frozen {
            server.freeze()
        } else {
            server.thaw()
        }
    })
    .await;
}

/// `rediss://` goes through rustls (with ring as the crypto provider); against a plain server
/// the handshake fails, and that must be a start error naming the server, not a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_against_a_plain_server_is_a_clean_start_error() {
    let server = RedisServer::start();
    let mut config = RedisConfig::new(format!("rediss://127.0.0.1:{}/", server.port()));
    config.connect_timeout_ms = 1_000;
    let err = RedisBroker::connect(&config, Arc::new(Refusing))
        .await
        .unwrap_err();
    assert!(
        matches!(err, syncra_core::error::PluginError::Start { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains(&format!("127.0.0.1:{}", server.port())),
        "{err}"
    );
}

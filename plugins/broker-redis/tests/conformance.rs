//! The broker conformance suite on a real `redis-server` that this test starts: two broker
//! nodes on one server, as two relay nodes of a cluster would be.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::sync::Arc;

use syncra_broker_redis::{RedisBroker, RedisConfig};
use syncra_core::Broker;
use syncra_test_support::servers::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_broker_conforms() {
    let server = RedisServer::start();
    let config = RedisConfig::new(server.url());
    syncra_test_support::broker_conformance(|sink_a, sink_b| {
        let config = config.clone();
        async move {
            let a: Arc<dyn Broker> = Arc::new(RedisBroker::connect(&config, sink_a).await.unwrap());
            let b: Arc<dyn Broker> = Arc::new(RedisBroker::connect(&config, sink_b).await.unwrap());
            (a, b)
        }
    })
    .await;
}

/// The mailbox conformance suite on a real `redis-server` (Redis Streams), every case on one
/// server as a cluster shares one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_mailbox_conforms() {
    let server = RedisServer::start();
    let config = RedisConfig::new(server.url());
    syncra_test_support::mailbox_conformance(|limits| {
        let config = config.clone();
        async move {
            Arc::new(
                syncra_broker_redis::mailbox::RedisMailbox::connect(&config, limits)
                    .await
                    .unwrap(),
            ) as Arc<dyn syncra_core::Mailbox>
        }
    })
    .await;
}

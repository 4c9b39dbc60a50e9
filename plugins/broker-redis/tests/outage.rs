//! A Redis outage: the server is killed under two connected nodes and started again on the
//! same port. The brokers must fail fast while it is gone and recover by themselves.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::sync::Arc;

use syncra_broker_redis::{RedisBroker, RedisConfig};
use syncra_core::Broker;
use syncra_test_support::broker::broker_outage_recovery;
use syncra_test_support::servers::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_broker_recovers_from_an_outage() {
    let mut server = RedisServer::start();
    let config = RedisConfig::new(server.url());
    broker_outage_recovery(&mut server, |sink_a, sink_b| async move {
        let a: Arc<dyn Broker> = Arc::new(RedisBroker::connect(&config, sink_a).await.unwrap());
        let b: Arc<dyn Broker> = Arc::new(RedisBroker::connect(&config, sink_b).await.unwrap());
        (a, b)
    })
    .await;
}

//! The broker conformance suite on a real `nats-server` that this test starts: two broker
//! nodes on one server, as two relay nodes of a cluster would be.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::sync::Arc;

use syncra_broker_nats::{NatsBroker, NatsConfig};
use syncra_core::Broker;
use syncra_test_support::servers::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_broker_conforms() {
    let server = NatsServer::start();
    let config = NatsConfig::new(server.url());
    syncra_test_support::broker_conformance(|sink_a, sink_b| {
        let config = config.clone();
        async move {
            let a: Arc<dyn Broker> = Arc::new(NatsBroker::connect(&config, sink_a).await.unwrap());
            let b: Arc<dyn Broker> = Arc::new(NatsBroker::connect(&config, sink_b).await.unwrap());
            (a, b)
        }
    })
    .await;
}

/// The mailbox conformance suite on real `nats-server`s with JetStream. Every case gets a
/// server of its own: the stream is one per server, and the expiry case needs a stream whose
/// front is what it stored (expiry walks the stream from its oldest entry, see
/// `syncra_broker_nats::mailbox`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_mailbox_conforms() {
    let servers = std::sync::Mutex::new(Vec::new());
    syncra_test_support::mailbox_conformance(|limits| {
        let server = NatsServer::start_jetstream();
        let config = syncra_broker_nats::mailbox::NatsMailboxConfig::new(server.url());
        servers.lock().unwrap().push(server);
        async move {
            Arc::new(
                syncra_broker_nats::mailbox::NatsMailbox::connect(&config, limits)
                    .await
                    .unwrap(),
            ) as Arc<dyn syncra_core::Mailbox>
        }
    })
    .await;
}

//! The broker conformance suite on in-process brokers: two nodes on one hub.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::sync::Arc;

use syncra_broker_memory::MemoryHub;
use syncra_core::Broker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_broker_conforms() {
    syncra_test_support::broker_conformance(|sink_a, sink_b| async move {
        let hub = MemoryHub::new();
        let a: Arc<dyn Broker> = Arc::new(hub.connect(sink_a));
        let b: Arc<dyn Broker> = Arc::new(hub.connect(sink_b));
        (a, b)
    })
    .await;
}

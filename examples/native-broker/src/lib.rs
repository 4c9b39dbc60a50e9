//! `syncra-example-native-broker`: an example native broker plugin, kind `"memory-native"`.
//!
//! It is `syncra-broker-memory` behind the C ABI: every broker the host creates from this
//! library connects to one process-global [`MemoryHub`], so two relay "nodes" in one process
//! that load the same library share a backend, as two nodes share a Redis. That makes it the
//! fixture the SDK's tests run the broker conformance suite through, and a template for real
//! plugins: a config type, an async constructor, one macro call, no `unsafe`.
//!
//! It must never be used as a cluster transport: like `kind = "memory"`, nothing leaves the
//! process.

use std::sync::{Arc, LazyLock};

use syncra_broker_memory::{MemoryBroker, MemoryHub};
use syncra_core::BrokerSink;
use syncra_core::error::PluginError;

/// The hub every broker of this library connects to.
static HUB: LazyLock<MemoryHub> = LazyLock::new(MemoryHub::new);

/// The configuration of `kind = "memory-native"`: nothing to set, and unknown keys are refused.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryNativeConfig {}

/// Connects a new node to the library's hub. Runs on the plugin's own runtime.
async fn connect(
    MemoryNativeConfig {}: MemoryNativeConfig,
    sink: Arc<dyn BrokerSink>,
) -> Result<MemoryBroker, PluginError> {
    Ok(HUB.connect(sink))
}

syncra_plugin_sdk::export_broker_plugin!("memory-native", MemoryNativeConfig, connect);

//! The ABI end to end inside one process: the plugin-side vtable functions driven by the host's
//! `NativeBroker`, without a library in between, so that every error code, health state, panic
//! and ownership rule can be exercised by a broker scripted for it. `tests/native.rs` does the
//! same through a real `cdylib`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use syncra_core::error::{BrokerError, PluginError};
use syncra_core::{Broker, BrokerSink, Health, PublishReceipt};
use syncra_test_support::{DEADLINE, RecordingSink};

use crate::abi::BrokerVTable;
use crate::host::{LoadedPlugin, NativeBroker};
use crate::plugin::{BrokerPlugin, broker_vtable, share};

/// How a [`Scripted`] broker behaves, from its config.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptedConfig {
    #[serde(default)]
    health: Option<String>,
    #[serde(default)]
    start: Option<String>,
}

/// A broker whose answer depends on the topic.
struct Scripted {
    sink: Arc<dyn BrokerSink>,
    health: Option<String>,
    subscribed: Mutex<Vec<String>>,
}

/// How many `"hang"` publishes were cancelled (their task dropped before finishing).
static HANGS_CANCELLED: AtomicU32 = AtomicU32::new(0);

struct CountOnDrop;

impl Drop for CountOnDrop {
    fn drop(&mut self) {
        HANGS_CANCELLED.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Broker for Scripted {
    fn kind(&self) -> &'static str {
        "scripted"
    }

    async fn publish(&self, topic: &str, payload: Bytes) -> Result<PublishReceipt, BrokerError> {
        match topic {
            "unavailable" => Err(BrokerError::Unavailable("down for maintenance".into())),
            "too-large" => Err(BrokerError::TooLarge {
                size: 70_000,
                max: 65_536,
            }),
            "bad" => Err(BrokerError::BadTopic("bad".into())),
            "unknown" => Ok(PublishReceipt { receivers: None }),
            "panic" => panic!("boom in publish"),
            "hang" => {
                let _count = CountOnDrop;
                std::future::pending().await
            }
            // Echo to our own sink; count whether it took the payload.
            _ => {
                let took = self.sink.deliver(topic, payload);
                Ok(PublishReceipt {
                    receivers: Some(u64::from(took)),
                })
            }
        }
    }

    async fn subscribe(&self, topic: &str) -> Result<(), BrokerError> {
        self.subscribed
            .lock()
            .expect("not poisoned")
            .push(topic.to_owned());
        Ok(())
    }

    async fn unsubscribe(&self, topic: &str) -> Result<(), BrokerError> {
        match topic {
            "panic" => panic!("boom in unsubscribe"),
            _ => Ok(()),
        }
    }

    async fn health(&self) -> Health {
        match self.health.as_deref() {
            None => Health::Up,
            Some("panic") => panic!("boom in health"),
            Some(why) if why.starts_with("degraded:") => Health::Degraded(why[9..].to_owned()),
            Some(why) => Health::Down(why.to_owned()),
        }
    }
}

async fn start(config: ScriptedConfig, sink: Arc<dyn BrokerSink>) -> Result<Scripted, PluginError> {
    match config.start.as_deref() {
        Some("panic") => panic!("boom in the constructor"),
        Some(why) => Err(PluginError::Start {
            category: "broker",
            kind: "scripted".into(),
            message: why.to_owned(),
        }),
        None => Ok(Scripted {
            sink,
            health: config.health,
            subscribed: Mutex::default(),
        }),
    }
}

struct ScriptedPlugin;

impl BrokerPlugin for ScriptedPlugin {
    const NAME: &'static str = "scripted";
    type Config = ScriptedConfig;

    fn create(
        config: ScriptedConfig,
        sink: Arc<dyn BrokerSink>,
    ) -> impl Future<Output = Result<Arc<dyn Broker>, PluginError>> + Send + 'static {
        share(start(config, sink))
    }
}

static VTABLE: BrokerVTable = broker_vtable::<ScriptedPlugin>();

fn plugin() -> LoadedPlugin {
    LoadedPlugin::in_process("scripted", &VTABLE)
}

async fn scripted(config: serde_json::Value) -> (NativeBroker, syncra_test_support::Deliveries) {
    let (sink, inbox) = RecordingSink::new();
    let broker = plugin().create(config, sink).await.expect("create");
    (broker, inbox)
}

#[tokio::test]
async fn publish_receipts_and_deliveries_cross() {
    let (broker, mut inbox) = scripted(serde_json::json!({})).await;
    assert_eq!(broker.kind(), "scripted");
    let receipt = broker
        .publish("echo", Bytes::from_static(b"\0\xffbytes"))
        .await
        .expect("publish");
    assert_eq!(receipt.receivers, Some(1), "the host's sink took it");
    let delivery = inbox.next("echo").await;
    assert_eq!(delivery.topic, "echo");
    assert_eq!(delivery.payload, Bytes::from_static(b"\0\xffbytes"));

    let receipt = broker
        .publish("unknown", Bytes::new())
        .await
        .expect("publish");
    assert_eq!(
        receipt.receivers, None,
        "\"cannot know\" stays distinct from 0"
    );
}

#[tokio::test]
async fn each_broker_error_keeps_its_variant() {
    let (broker, _inbox) = scripted(serde_json::json!({})).await;
    let err = broker
        .publish("unavailable", Bytes::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BrokerError::Unavailable(why) if why == "down for maintenance"),
        "{err:?}"
    );
    let err = broker.publish("too-large", Bytes::new()).await.unwrap_err();
    assert!(
        matches!(
            err,
            BrokerError::TooLarge {
                size: 70_000,
                max: 65_536
            }
        ),
        "{err:?}"
    );
    let err = broker.publish("bad", Bytes::new()).await.unwrap_err();
    assert!(
        matches!(&err, BrokerError::BadTopic(t) if t == "bad"),
        "{err:?}"
    );
    broker.subscribe("t").await.expect("subscribe");
    broker.unsubscribe("t").await.expect("unsubscribe");
}

#[tokio::test]
async fn health_states_cross() {
    let check = |health: Option<&'static str>, expected: Health| async move {
        let (broker, _inbox) = scripted(serde_json::json!({ "health": health })).await;
        assert_eq!(broker.health().await, expected, "{health:?}");
    };
    check(None, Health::Up).await;
    check(
        Some("degraded:one replica down"),
        Health::Degraded("one replica down".into()),
    )
    .await;
    check(
        Some("no route to host"),
        Health::Down("no route to host".into()),
    )
    .await;
}

#[tokio::test]
async fn config_errors_name_the_key_and_the_kind() {
    let (sink, _inbox) = RecordingSink::new();
    let err = plugin()
        .create(serde_json::json!({ "helth": "up" }), sink)
        .await
        .unwrap_err();
    assert!(matches!(err, PluginError::Config { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("helth") && message.contains("scripted"),
        "{message}"
    );
}

#[tokio::test]
async fn a_failing_constructor_is_a_start_error() {
    let (sink, _inbox) = RecordingSink::new();
    let err = plugin()
        .create(
            serde_json::json!({ "start": "cannot reach the cluster" }),
            sink,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PluginError::Start { message, .. } if message == "cannot reach the cluster"),
        "{err:?}"
    );
}

#[tokio::test]
async fn panics_inside_the_plugin_become_errors() {
    let (sink, _inbox) = RecordingSink::new();
    let err = plugin()
        .create(serde_json::json!({ "start": "panic" }), sink)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PluginError::Start { message, .. }
            if message.contains("panicked") && message.contains("boom in the constructor")),
        "{err:?}"
    );

    let (broker, mut inbox) = scripted(serde_json::json!({})).await;
    let err = broker.publish("panic", Bytes::new()).await.unwrap_err();
    assert!(
        matches!(&err, BrokerError::Unavailable(why)
            if why.contains("panicked") && why.contains("boom in publish")),
        "{err:?}"
    );
    let err = broker.unsubscribe("panic").await.unwrap_err();
    assert!(err.to_string().contains("boom in unsubscribe"), "{err}");
    // The broker goes on working after a panic.
    broker
        .publish("echo", Bytes::from_static(b"still here"))
        .await
        .expect("publish after a panic");
    assert_eq!(inbox.next("after a panic").await.payload, "still here");

    let (broker, _inbox) = scripted(serde_json::json!({ "health": "panic" })).await;
    assert!(
        matches!(broker.health().await, Health::Down(why) if why.contains("boom in health")),
        "a panicking health check reports down"
    );
}

/// A host sink that panics: the panic must stop at the C boundary, counting as "not taken".
struct PanickingSink;

impl BrokerSink for PanickingSink {
    fn deliver(&self, _topic: &str, _payload: Bytes) -> bool {
        panic!("boom in the host's sink")
    }
}

#[tokio::test]
async fn a_panicking_host_sink_counts_as_not_taken() {
    let broker = plugin()
        .create(serde_json::json!({}), Arc::new(PanickingSink))
        .await
        .expect("create");
    let receipt = broker
        .publish("echo", Bytes::from_static(b"x"))
        .await
        .expect("publish survives the sink's panic");
    assert_eq!(receipt.receivers, Some(0));
}

#[tokio::test]
async fn the_host_sink_is_released_once_the_plugin_lets_go() {
    let (sink, _inbox) = RecordingSink::new();
    let broker = plugin()
        .create(serde_json::json!({}), sink.clone())
        .await
        .expect("create");
    assert_eq!(Arc::strong_count(&sink), 2, "the plugin holds the sink");
    broker.subscribe("t").await.expect("subscribe");
    drop(broker);
    // The last spawned task may drop its clone of the broker just after its join completes.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while Arc::strong_count(&sink) != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sink was not released after destroy"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // A failed creation releases it too.
    let _ = plugin()
        .create(serde_json::json!({ "start": "no" }), sink.clone())
        .await
        .unwrap_err();
    let _ = plugin()
        .create(serde_json::json!({ "bogus": 1 }), sink.clone())
        .await
        .unwrap_err();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while Arc::strong_count(&sink) != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sink was not released after a failed create"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn dropping_a_call_cancels_the_plugin_task() {
    let (broker, _inbox) = scripted(serde_json::json!({})).await;
    let before = HANGS_CANCELLED.load(Ordering::SeqCst);
    let timed_out = tokio::time::timeout(
        Duration::from_millis(50),
        broker.publish("hang", Bytes::new()),
    )
    .await;
    assert!(timed_out.is_err(), "the publish hangs by design");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while HANGS_CANCELLED.load(Ordering::SeqCst) == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the plugin's task went on after the host dropped its future"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

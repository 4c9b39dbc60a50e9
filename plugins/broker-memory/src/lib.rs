//! `syncra-broker-memory`: the in-process `Broker` used by a single relay node (the default).
//!
//! A [`MemoryHub`] is the "backend": a topic table shared by every [`MemoryBroker`] connected to
//! it. A relay makes one hub and one broker, and gets the same publish/subscribe behaviour a
//! cluster gets from Redis or NATS, with exact receiver counts. Tests connect several brokers to
//! one hub to stand in for several nodes without any server.
//!
//! This crate must never be mistaken for a cluster transport: nothing leaves the process, so two
//! relay processes configured with `kind = "memory"` do not see each other. It must also never
//! call a sink while holding its own lock, so a sink that publishes or subscribes in turn cannot
//! deadlock the hub.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;
use bytes::Bytes;
use syncra_core::error::{BrokerError, PluginError};
use syncra_core::registry::{Kinds, typed_config};
use syncra_core::{Broker, BrokerSink, Health, PublishReceipt};

/// The kind name this broker registers under.
pub const KIND: &str = "memory";

/// Identifies one connected [`MemoryBroker`] within its hub.
type NodeId = u64;

/// The subscribers of one topic. Shared copy-on-write so that a publish only clones an `Arc`
/// under the lock and delivers after releasing it.
type Subscribers = Arc<Vec<(NodeId, Arc<dyn BrokerSink>)>>;

/// The state behind one hub's lock.
#[derive(Default)]
struct Table {
    /// Topic → the nodes subscribed to it, each with its sink.
    topics: HashMap<String, Subscribers>,
    /// Node → the topics it is subscribed to, so that a dropped node can be removed without
    /// scanning every topic.
    nodes: HashMap<NodeId, HashSet<String>>,
}

#[derive(Default)]
struct Hub {
    table: RwLock<Table>,
    next_node: AtomicU64,
    /// Brokers connected now.
    connected: std::sync::atomic::AtomicUsize,
}

impl Hub {
    // The lock is never held across a call into foreign code (sinks are called after it is
    // released) and nothing under it can panic halfway through an update, so a poisoned lock
    // still guards a consistent table: recover it rather than fail every later call.
    fn read(&self) -> RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The shared backend of in-process brokers. Cheap to clone; clones are the same hub.
#[derive(Clone, Default)]
pub struct MemoryHub {
    hub: Arc<Hub>,
}

impl MemoryHub {
    /// An empty hub.
    pub fn new() -> Self {
        MemoryHub::default()
    }

    /// Connects a new node to this hub. Payloads on the topics it subscribes to go to `sink`.
    pub fn connect(&self, sink: Arc<dyn BrokerSink>) -> MemoryBroker {
        let node = self.hub.next_node.fetch_add(1, Ordering::Relaxed);
        self.hub.connected.fetch_add(1, Ordering::AcqRel);
        MemoryBroker {
            hub: Arc::clone(&self.hub),
            node,
            sink,
        }
    }

    /// How many nodes are subscribed to `topic`.
    pub fn subscribers(&self, topic: &str) -> usize {
        self.hub.read().topics.get(topic).map_or(0, |s| s.len())
    }

    /// How many topics have at least one subscriber.
    pub fn topics(&self) -> usize {
        self.hub.read().topics.len()
    }
}

impl fmt::Debug for MemoryHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = self.hub.read();
        f.debug_struct("MemoryHub")
            .field("topics", &table.topics.len())
            .field("nodes", &table.nodes.len())
            .finish()
    }
}

/// One node's broker on a [`MemoryHub`]. Dropping it unsubscribes all of its topics.
pub struct MemoryBroker {
    hub: Arc<Hub>,
    node: NodeId,
    sink: Arc<dyn BrokerSink>,
}

impl MemoryBroker {
    /// A broker on a hub of its own: the single-node default.
    pub fn standalone(sink: Arc<dyn BrokerSink>) -> Self {
        MemoryHub::new().connect(sink)
    }
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

// Every operation completes without waiting for anything, so the work is done by these plain
// methods and the async trait methods only wrap them.
impl MemoryBroker {
    fn publish_now(&self, topic: &str, payload: Bytes) -> PublishReceipt {
        let subscribers = self.hub.read().topics.get(topic).cloned();
        let mut receivers = 0;
        // The guard is gone here: a sink may publish, subscribe or unsubscribe from `deliver`.
        for (_, sink) in subscribers.iter().flat_map(|s| s.iter()) {
            if sink.deliver(topic, payload.clone()) {
                receivers += 1;
            }
        }
        PublishReceipt {
            receivers: Some(receivers),
        }
    }

    fn subscribe_now(&self, topic: &str) {
        let mut table = self.hub.write();
        if table
            .nodes
            .entry(self.node)
            .or_default()
            .insert(topic.to_owned())
        {
            let subscribers = table.topics.entry(topic.to_owned()).or_default();
            Arc::make_mut(subscribers).push((self.node, Arc::clone(&self.sink)));
        }
    }

    fn unsubscribe_now(&self, topic: &str) {
        let mut table = self.hub.write();
        let was_subscribed = table
            .nodes
            .get_mut(&self.node)
            .is_some_and(|topics| topics.remove(topic));
        if was_subscribed {
            remove_subscriber(&mut table, topic, self.node);
        }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn publish(&self, topic: &str, payload: Bytes) -> Result<PublishReceipt, BrokerError> {
        Ok(self.publish_now(topic, payload))
    }

    async fn subscribe(&self, topic: &str) -> Result<(), BrokerError> {
        self.subscribe_now(topic);
        Ok(())
    }

    async fn unsubscribe(&self, topic: &str) -> Result<(), BrokerError> {
        self.unsubscribe_now(topic);
        Ok(())
    }

    async fn health(&self) -> Health {
        Health::Up
    }

    fn alone(&self) -> bool {
        self.hub.connected.load(Ordering::Acquire) == 1
    }
}

impl Drop for MemoryBroker {
    fn drop(&mut self) {
        self.hub.connected.fetch_sub(1, Ordering::AcqRel);
        let mut table = self.hub.write();
        if let Some(topics) = table.nodes.remove(&self.node) {
            for topic in topics {
                remove_subscriber(&mut table, &topic, self.node);
            }
        }
    }
}

/// Removes `node` from `topic`'s subscribers, and the topic once nobody is left, so the table
/// does not grow with every user who ever connected.
fn remove_subscriber(table: &mut Table, topic: &str, node: NodeId) {
    if let Some(subscribers) = table.topics.get_mut(topic) {
        Arc::make_mut(subscribers).retain(|(n, _)| *n != node);
        if subscribers.is_empty() {
            table.topics.remove(topic);
        }
    }
}

/// The configuration of `kind = "memory"`: nothing to set, but unknown keys are still refused so
/// that a typo (or a Redis setting under the wrong kind) is an error, not silently ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {}

/// Registers kind `"memory"`. Each broker it creates has a hub of its own: a single node.
pub fn register(
    kinds: &mut Kinds<Arc<dyn Broker>, Arc<dyn BrokerSink>>,
) -> Result<(), PluginError> {
    kinds.register(KIND, |config, sink| async move {
        let MemoryConfig {} = typed_config("broker", KIND, config)?;
        Ok(Arc::new(MemoryBroker::standalone(sink)) as Arc<dyn Broker>)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A sink that records payloads and answers with a fixed "taken".
    #[derive(Default)]
    struct Counting {
        taken: bool,
        seen: Mutex<Vec<(String, Bytes)>>,
    }

    impl Counting {
        fn new(taken: bool) -> Arc<Self> {
            Arc::new(Counting {
                taken,
                ..Counting::default()
            })
        }

        fn seen(&self) -> Vec<(String, Bytes)> {
            self.seen.lock().unwrap().clone()
        }
    }

    impl BrokerSink for Counting {
        fn deliver(&self, topic: &str, payload: Bytes) -> bool {
            self.seen.lock().unwrap().push((topic.to_owned(), payload));
            self.taken
        }
    }

    #[tokio::test]
    async fn receivers_counts_only_sinks_that_took_the_payload() {
        let hub = MemoryHub::new();
        let (taking, refusing) = (Counting::new(true), Counting::new(false));
        let a = hub.connect(taking.clone());
        let b = hub.connect(refusing.clone());
        a.subscribe("t").await.unwrap();
        b.subscribe("t").await.unwrap();
        let receipt = a.publish("t", Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(receipt.receivers, Some(1));
        assert_eq!(taking.seen().len(), 1);
        assert_eq!(refusing.seen().len(), 1, "a refusing sink is still called");
        let receipt = a.publish("other", Bytes::new()).await.unwrap();
        assert_eq!(receipt.receivers, Some(0));
    }

    #[test]
    fn a_node_is_alone_only_while_no_other_is_on_its_hub() {
        let hub = MemoryHub::new();
        let a = hub.connect(Counting::new(true));
        assert!(a.alone());
        let b = hub.connect(Counting::new(true));
        assert!(!a.alone() && !b.alone());
        drop(b);
        assert!(a.alone());
        assert!(MemoryBroker::standalone(Counting::new(true)).alone());
    }

    #[tokio::test]
    async fn dropping_a_node_removes_its_subscriptions() {
        let hub = MemoryHub::new();
        let sink = Counting::new(true);
        let a = hub.connect(sink.clone());
        let b = hub.connect(sink.clone());
        for topic in ["x", "y"] {
            a.subscribe(topic).await.unwrap();
        }
        b.subscribe("x").await.unwrap();
        assert_eq!(hub.subscribers("x"), 2);
        drop(a);
        assert_eq!(hub.subscribers("x"), 1);
        assert_eq!(hub.topics(), 1, "topic y had only the dropped node");
        b.unsubscribe("x").await.unwrap();
        assert_eq!(hub.topics(), 0, "an empty topic is forgotten");
        let receipt = b.publish("x", Bytes::new()).await.unwrap();
        assert_eq!(receipt.receivers, Some(0));
    }

    /// A sink that publishes and unsubscribes from inside `deliver`, which would deadlock if the
    /// hub called sinks under its lock.
    struct Reentrant {
        broker: Mutex<Option<Arc<MemoryBroker>>>,
        echoes: Arc<Counting>,
    }

    impl BrokerSink for Reentrant {
        fn deliver(&self, topic: &str, payload: Bytes) -> bool {
            let broker = self.broker.lock().unwrap().clone();
            if let (Some(broker), "ping") = (broker, topic) {
                broker.publish_now("pong", payload);
                broker.unsubscribe_now("ping");
                broker.subscribe_now("late");
            }
            true
        }
    }

    #[tokio::test]
    async fn a_sink_may_use_the_broker_from_deliver() {
        let hub = MemoryHub::new();
        let echoes = Counting::new(true);
        let sink = Arc::new(Reentrant {
            broker: Mutex::new(None),
            echoes: echoes.clone(),
        });
        let node = Arc::new(hub.connect(sink.clone()));
        *sink.broker.lock().unwrap() = Some(node.clone());
        let listener = hub.connect(sink.echoes.clone());
        listener.subscribe("pong").await.unwrap();
        node.subscribe("ping").await.unwrap();

        let receipt = listener
            .publish("ping", Bytes::from_static(b"hi"))
            .await
            .unwrap();
        assert_eq!(receipt.receivers, Some(1));
        assert_eq!(
            echoes.seen(),
            [("pong".to_owned(), Bytes::from_static(b"hi"))]
        );
        assert_eq!(hub.subscribers("ping"), 0, "the sink unsubscribed itself");
        assert_eq!(hub.subscribers("late"), 1, "the sink subscribed");
        // Break the cycle node → sink → node so both are freed.
        sink.broker.lock().unwrap().take();
    }

    #[tokio::test]
    async fn registers_kind_memory_with_strict_config() {
        let mut kinds = Kinds::new("broker", &[]);
        register(&mut kinds).unwrap();
        let sink = Counting::new(true);
        let broker = kinds
            .create(serde_json::json!({ "kind": "memory" }), sink.clone())
            .await
            .unwrap();
        assert_eq!(broker.kind(), KIND);
        broker.subscribe("t").await.unwrap();
        let receipt = broker.publish("t", Bytes::from_static(b"p")).await.unwrap();
        assert_eq!(receipt.receivers, Some(1));

        let Err(err) = kinds
            .create(
                serde_json::json!({ "kind": "memory", "url": "redis://x" }),
                sink,
            )
            .await
        else {
            panic!("an unknown key must be refused");
        };
        assert!(matches!(err, PluginError::Config { .. }), "{err}");
        assert!(err.to_string().contains("url"), "{err}");
    }
}

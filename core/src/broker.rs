//! The `Broker` contract: publish/subscribe between relay nodes.
//!
//! Why this shape: deliveries come through one [`BrokerSink`] given at construction rather
//! than one stream per subscription (a relay node once subscribed to one topic per user it
//! held; since issue 19 it subscribes to its own delivery topic and the presence topic). `publish` answers how many receivers took the
//! payload where the broker can know (Redis counts subscribers, NATS can use request/reply),
//! because the relay promises senders a truthful "delivered" or "offline". Failures are errors,
//! never silent drops, so the relay can answer "broker unavailable".

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::BrokerError;
use crate::health::Health;

/// Receives payloads for subscribed topics.
pub trait BrokerSink: Send + Sync {
    /// Called for each payload on a subscribed topic. Returns whether something local took it
    /// (for brokers that report delivery back to the publisher). Must not block.
    fn deliver(&self, topic: &str, payload: Bytes) -> bool;
}

/// What the broker knows about a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishReceipt {
    /// How many receivers took the payload, if the broker can tell. `Some(0)` means nobody.
    /// Every broker shipped counts for [`Confirm::Count`] and [`Confirm::Any`], and the
    /// conformance suite (`syncra_test_support::broker_conformance`) requires it of the
    /// brokers it runs on; `None` is what [`Confirm::Nothing`] may answer.
    pub receivers: Option<u64>,
}

/// How much a publisher needs to learn about who took a payload.
///
/// Counting every receiver can cost a broker a wait (NATS collects answers for a window), while
/// the relay only ever needs "anyone or nobody", and nothing at all when a local session
/// already took the message. Brokers that learn the count for free ignore the difference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confirm {
    /// The exact number of receivers (what [`Broker::publish`] reports).
    Count,
    /// Whether at least one receiver took it: `Some(n)` with `n >= 1` as soon as one did, so
    /// the count may be lower than the true number; `Some(0)` still means nobody.
    Any,
    /// Nothing: the publish is fire-and-forget and `receivers` may be `None`. Failures to hand
    /// the payload to the broker are still errors.
    Nothing,
}

/// Pub/sub between relay nodes.
#[async_trait]
pub trait Broker: Send + Sync {
    /// The kind name this broker registered under.
    fn kind(&self) -> &'static str;
    /// Publishes a payload to a topic.
    async fn publish(&self, topic: &str, payload: Bytes) -> Result<PublishReceipt, BrokerError>;
    /// Publishes, learning only as much about the receivers as `confirm` asks for (see
    /// [`Confirm`]). The default asks for the full count.
    async fn publish_confirm(
        &self,
        topic: &str,
        payload: Bytes,
        confirm: Confirm,
    ) -> Result<PublishReceipt, BrokerError> {
        let _ = confirm;
        self.publish(topic, payload).await
    }
    /// Starts delivering a topic's payloads to this broker's sink. Subscribing twice is a no-op.
    async fn subscribe(&self, topic: &str) -> Result<(), BrokerError>;
    /// Stops delivering a topic. Unsubscribing an unknown topic is a no-op.
    async fn unsubscribe(&self, topic: &str) -> Result<(), BrokerError>;
    /// Whether the broker is reachable.
    async fn health(&self) -> Health {
        Health::Up
    }

    /// Whether this node is the only one the broker connects (the in-process broker with one
    /// node on its hub). Then nothing published can reach another node, and the relay skips
    /// publishing deliveries it already made locally. Brokers to a server leave the default,
    /// `false`: another node may connect at any time.
    fn alone(&self) -> bool {
        false
    }

    /// Whether [`PublishReceipt::receivers`] counts the publishing node's own subscription to
    /// the topic (Redis counts every subscribed connection). Brokers whose count comes from
    /// sinks that accepted the payload (the relay's own sink never accepts its own payloads)
    /// leave the default, `false`. The relay subtracts one when this is true and it holds the
    /// recipient itself, so "delivered" is never claimed on the strength of its own echo.
    fn counts_own_subscription(&self) -> bool {
        false
    }
}

/// A handle to a broker as hosts hold it.
pub type SharedBroker = Arc<dyn Broker>;

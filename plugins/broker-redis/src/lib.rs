//! `syncra-broker-redis`: a [`Broker`] on Redis pub/sub, so that the nodes of a relay cluster
//! reach each other's users.
//!
//! Each node keeps two connections to Redis: a multiplexed one for `PUBLISH`, and a dedicated
//! pub/sub connection whose messages a driver task hands to the node's [`BrokerSink`]. The
//! broker remembers which topics its node wants; when the pub/sub connection drops it
//! reconnects by itself, with backoff, and subscribes every one of them again before it reports
//! itself up. While it is down, `health` is `Down` and `publish` fails at once with
//! [`BrokerError::Unavailable`]; every command has a timeout, so nothing waits on a dead
//! server.
//!
//! # What `receivers` means here
//!
//! `PUBLISH` answers how many *subscribed connections* the server handed the message to. That
//! is what [`PublishReceipt::receivers`] reports, and it differs from "sessions that took it" in
//! two ways the relay must handle:
//!
//! - **The publishing node's own subscription counts.** A node that holds a user is subscribed
//!   to that user's topic, so its own publish to the topic comes back to it and is counted
//!   (its sink then ignores it). The relay must subtract one when it holds the recipient
//!   locally (its router knows), or a recipient whose only sessions are on the sending node
//!   and refused the message would be reported delivered.
//! - **A subscribed node is not a taking session.** Redis counts nodes that are subscribed, not
//!   sessions that accepted the frame; a node whose recipient just left, or whose session
//!   queue was full, still counts. Within that race the count can only be too high by the
//!   nodes in it, never too low.
//!
//! # Must never
//!
//! This crate must never drop a payload silently: a publish the server did not confirm is an
//! error, and a message the server delivered goes to the sink (or is discarded only because
//! its topic was unsubscribed before it was handed over, which `unsubscribe` promises). It must
//! never report a delivery it cannot know: `receivers` is exactly the server's count, and a
//! publish whose answer did not come back is `Unavailable`, never `Some(0)`. It must never hang
//! a caller on a dead server, and never print the password of the configured URL.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex as StdMutex, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::{AsyncConnectionConfig, Client, ErrorKind, Msg, RedisError};
use serde::Deserialize;
use syncra_core::error::{BrokerError, PluginError};
use syncra_core::redact::redact_url;
use syncra_core::registry::{Kinds, typed_config};
use syncra_core::{Broker, BrokerSink, Health, PublishReceipt};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// The kind name this broker registers under.
pub const KIND: &str = "redis";

/// How many topics one `SUBSCRIBE` carries when a reconnected node subscribes again: large
/// enough that tens of thousands of users take a few round trips, small enough that one
/// command's confirmations stay well within the command timeout.
const RESUBSCRIBE_CHUNK: usize = 1000;

/// The first pause before reconnecting; it doubles with every failed attempt up to
/// [`RedisConfig::reconnect_max_ms`].
const RECONNECT_FIRST: Duration = Duration::from_millis(50);

/// The configuration of `kind = "redis"`.
///
/// ```toml
/// [broker]
/// kind = "redis"
/// url = "redis://:password@redis.internal:6379/"
/// ```
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user[:password]@]host[:port][/db]`, or `rediss://` for TLS (rustls, the
    /// system's root certificates).
    pub url: String,
    /// How long one command (publish, subscribe, ping) may take before the broker reports
    /// itself unavailable and reconnects.
    #[serde(default = "default_command_timeout_ms")]
    pub command_timeout_ms: u64,
    /// How long one connection attempt may take.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// The longest pause between two reconnection attempts (the pause starts short and
    /// doubles, with jitter so that the nodes of a cluster do not reconnect in lockstep).
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// How often the pub/sub connection is checked with `PING`, so that a server that vanished
    /// without closing the connection (a network partition) is noticed by a node that only
    /// receives.
    #[serde(default = "default_ping_interval_ms")]
    pub ping_interval_ms: u64,
}

fn default_command_timeout_ms() -> u64 {
    2_000
}

fn default_connect_timeout_ms() -> u64 {
    2_000
}

fn default_reconnect_max_ms() -> u64 {
    2_000
}

fn default_ping_interval_ms() -> u64 {
    5_000
}

impl RedisConfig {
    /// A configuration for `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            command_timeout_ms: default_command_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
            ping_interval_ms: default_ping_interval_ms(),
        }
    }
}

// The URL may carry a password: never print it.
impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("command_timeout_ms", &self.command_timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("reconnect_max_ms", &self.reconnect_max_ms)
            .field("ping_interval_ms", &self.ping_interval_ms)
            .finish()
    }
}

pub mod mailbox;

/// The timeouts of one broker, from its config.
#[derive(Clone, Copy, Debug)]
struct Timeouts {
    command: Duration,
    connect: Duration,
    reconnect_max: Duration,
    ping_interval: Duration,
}

impl Timeouts {
    fn from_config(config: &RedisConfig) -> Result<Timeouts, String> {
        let positive = syncra_core::registry::positive_ms;
        Ok(Timeouts {
            command: positive("command_timeout_ms", config.command_timeout_ms)?,
            connect: positive("connect_timeout_ms", config.connect_timeout_ms)?,
            reconnect_max: positive("reconnect_max_ms", config.reconnect_max_ms)?,
            ping_interval: positive("ping_interval_ms", config.ping_interval_ms)?,
        })
    }
}

/// The state of the connections, as publishers and `health` see it.
struct Link {
    /// Counts connection sessions; a failure report for an older session is stale.
    epoch: u64,
    /// The publishing connection while up.
    publisher: Option<MultiplexedConnection>,
    /// Why the broker is down (meaningful while `publisher` is `None`).
    down: String,
}

/// What the broker methods and the driver task share.
struct Shared {
    client: Client,
    /// `host:port` of the server, for messages (never the URL: it may hold a password).
    server: String,
    timeouts: Timeouts,
    sink: Arc<dyn BrokerSink>,
    /// Topics this node wants. Written only under `subscriber`'s lock, so that the set and the
    /// server's subscriptions change in the same order; read (without that lock) to drop a
    /// message whose topic was unsubscribed while it was on its way.
    wanted: RwLock<HashSet<String>>,
    /// The live pub/sub connection's command half, with its epoch. The lock serialises
    /// subscribe, unsubscribe and the resubscription after a reconnect.
    subscriber: Mutex<Option<(u64, PubSubSink)>>,
    link: StdMutex<Link>,
    /// The newest epoch reported broken; the driver of that epoch reconnects.
    broken: watch::Sender<u64>,
}

/// A freshly opened pair of connections.
struct Connected {
    publisher: MultiplexedConnection,
    subscriber: PubSubSink,
    messages: PubSubStream,
}

impl Shared {
    fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        // Nothing under this lock can panic halfway through an update.
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wanted_contains(&self, topic: &str) -> bool {
        self.wanted
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(topic)
    }

    fn want(&self, topic: &str, yes: bool) {
        let mut wanted = self.wanted.write().unwrap_or_else(PoisonError::into_inner);
        if yes {
            wanted.insert(topic.to_owned());
        } else {
            wanted.remove(topic);
        }
    }

    fn unavailable(&self, what: impl fmt::Display) -> BrokerError {
        BrokerError::Unavailable(format!("redis at {}: {what}", self.server))
    }

    /// The error for a call made while down.
    fn down_error(&self) -> BrokerError {
        let why = self.link().down.clone();
        self.unavailable(format!("{why}; reconnecting"))
    }

    /// Marks the connections of `epoch` broken: publishes fail at once from now on, and the
    /// driver reconnects. A report about an older session is ignored.
    fn connection_failed(&self, epoch: u64, why: &str) {
        let mut link = self.link();
        if link.epoch != epoch || link.publisher.is_none() {
            return;
        }
        warn!("redis broker: connection to {} failed: {why}", self.server);
        link.publisher = None;
        link.down = why.to_owned();
        drop(link);
        self.broken.send_if_modified(|broken| {
            let newer = *broken < epoch;
            *broken = (*broken).max(epoch);
            newer
        });
    }

    /// Handles a failed command: an error the server answered leaves the connection alone;
    /// anything else (I/O, a timeout, a garbled reply) means the connection cannot be trusted.
    fn command_failed(&self, epoch: u64, command: &str, error: CommandError) -> BrokerError {
        let why = match &error {
            CommandError::Redis(e) if error.is_refusal() => {
                return self.unavailable(format!("{command} refused: {e}"));
            }
            CommandError::Redis(e) => format!("{command} failed: {e}"),
            CommandError::TimedOut(after) => format!("{command} got no answer within {after:?}"),
        };
        self.connection_failed(epoch, &why);
        self.unavailable(why)
    }

    async fn connect(&self) -> Result<Connected, String> {
        install_tls_provider(&self.client);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeouts.connect))
            .set_response_timeout(Some(self.timeouts.command));
        let publisher = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        // The pub/sub connection has no config of its own; bound the whole handshake.
        let pubsub = tokio::time::timeout(self.timeouts.connect, self.client.get_async_pubsub())
            .await
            .map_err(|_| {
                format!(
                    "cannot connect the subscription connection within {:?}",
                    self.timeouts.connect
                )
            })?
            .map_err(|e| format!("cannot connect the subscription connection: {e}"))?;
        let (subscriber, messages) = pubsub.split();
        Ok(Connected {
            publisher,
            subscriber,
            messages,
        })
    }

    /// Subscribes every wanted topic on a new connection, then publishes it as the live one.
    /// Holds the subscriber lock throughout, so no subscribe or unsubscribe interleaves.
    async fn go_live(
        &self,
        epoch: u64,
        publisher: MultiplexedConnection,
        mut subscriber: PubSubSink,
    ) -> Result<(), String> {
        let mut slot = self.subscriber.lock().await;
        let topics: Vec<String> = self
            .wanted
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect();
        for chunk in topics.chunks(RESUBSCRIBE_CHUNK) {
            match tokio::time::timeout(self.timeouts.command, subscriber.subscribe(chunk)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("subscribing again failed: {e}")),
                Err(_) => {
                    return Err(format!(
                        "subscribing again got no answer within {:?}",
                        self.timeouts.command
                    ));
                }
            }
        }
        *slot = Some((epoch, subscriber));
        let mut link = self.link();
        link.epoch = epoch;
        link.publisher = Some(publisher);
        link.down.clear();
        drop(link);
        drop(slot);
        if !topics.is_empty() || epoch > 1 {
            info!(
                "redis broker: connected to {}; subscribed {} topics again",
                self.server,
                topics.len()
            );
        }
        Ok(())
    }

    /// Takes the connections of `epoch` out of service after its session ended.
    async fn go_down(&self, epoch: u64, why: &str) {
        let mut slot = self.subscriber.lock().await;
        if slot.as_ref().is_some_and(|(e, _)| *e == epoch) {
            *slot = None;
        }
        drop(slot);
        let mut link = self.link();
        if link.epoch == epoch && link.publisher.is_some() {
            warn!("redis broker: lost {}: {why}; reconnecting", self.server);
            link.publisher = None;
            link.down = why.to_owned();
        }
    }

    /// Records why a reconnection attempt failed.
    fn still_down(&self, why: &str) {
        debug!(
            "redis broker: reconnecting to {} failed: {why}",
            self.server
        );
        let mut link = self.link();
        link.publisher = None;
        link.down = why.to_owned();
    }

    /// Hands one message to the sink unless its topic was unsubscribed meanwhile.
    fn forward(&self, msg: &Msg) {
        let topic = msg.get_channel_name();
        if self.wanted_contains(topic) {
            let payload = Bytes::copy_from_slice(msg.get_payload_bytes());
            self.sink.deliver(topic, payload);
        }
    }
}

enum CommandError {
    Redis(RedisError),
    TimedOut(Duration),
}

impl CommandError {
    /// Whether the server answered with an error: the connection itself is fine.
    fn is_refusal(&self) -> bool {
        matches!(self, CommandError::Redis(e) if matches!(e.kind(), ErrorKind::Server(_)))
    }
}

/// Runs `command` with a timeout.
async fn bounded<T>(
    timeout: Duration,
    command: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, CommandError> {
    match tokio::time::timeout(timeout, command).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(CommandError::Redis(e)),
        Err(_) => Err(CommandError::TimedOut(timeout)),
    }
}

/// `rediss://` needs a rustls crypto provider; this workspace uses ring. Installing the process
/// default fails harmlessly when one is already installed.
fn install_tls_provider(client: &Client) {
    if matches!(
        client.get_connection_info().addr(),
        redis::ConnectionAddr::TcpTls { .. }
    ) {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// A task that is aborted when this handle is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Owns the connections after [`RedisBroker::connect`] made the first pair live as epoch 1:
/// forwards messages while up, reconnects with backoff while down.
async fn drive(shared: Arc<Shared>, subscriber: PubSubSink, messages: PubSubStream) {
    let mut broken = shared.broken.subscribe();
    let mut epoch = 1;
    let why = run(&shared, epoch, subscriber, messages, &mut broken).await;
    shared.go_down(epoch, &why).await;
    let mut failures = 1u32;
    loop {
        tokio::time::sleep(backoff(failures, shared.timeouts.reconnect_max)).await;
        let Connected {
            publisher,
            subscriber,
            messages,
        } = match shared.connect().await {
            Ok(connected) => connected,
            Err(why) => {
                shared.still_down(&why);
                failures = failures.saturating_add(1);
                continue;
            }
        };
        epoch += 1;
        if let Err(why) = shared.go_live(epoch, publisher, subscriber.clone()).await {
            shared.still_down(&why);
            failures = failures.saturating_add(1);
            continue;
        }
        let why = run(&shared, epoch, subscriber, messages, &mut broken).await;
        shared.go_down(epoch, &why).await;
        failures = 1;
    }
}

/// Forwards messages until the connection ends or is reported broken; returns why it ended.
async fn run(
    shared: &Arc<Shared>,
    epoch: u64,
    subscriber: PubSubSink,
    mut messages: PubSubStream,
    broken: &mut watch::Receiver<u64>,
) -> String {
    let _pinger = AbortOnDrop(tokio::spawn(ping(
        Arc::downgrade(shared),
        epoch,
        subscriber,
    )));
    loop {
        tokio::select! {
            msg = messages.next() => match msg {
                Some(msg) => shared.forward(&msg),
                None => return "the server closed the connection".to_owned(),
            },
            _ = broken.wait_for(|b| *b >= epoch) => {
                return shared.link().down.clone();
            }
        }
    }
}

/// Pings the pub/sub connection of `epoch` until it fails to answer.
async fn ping(shared: std::sync::Weak<Shared>, epoch: u64, mut subscriber: PubSubSink) {
    loop {
        let Some(interval) = shared.upgrade().map(|s| s.timeouts.ping_interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let timeout = shared.timeouts.command;
        if let Err(e) = bounded(timeout, subscriber.ping::<redis::Value>()).await {
            shared.command_failed(epoch, "PING", e);
            return;
        }
    }
}

/// The pause before reconnection attempt `failures` (1-based): doubling from
/// [`RECONNECT_FIRST`] up to `max`, then scaled by a random factor in [0.5, 1].
fn backoff(failures: u32, max: Duration) -> Duration {
    syncra_core::time::backoff(failures.saturating_sub(1), RECONNECT_FIRST, max)
}

/// A node's broker on a Redis server.
pub struct RedisBroker {
    shared: Arc<Shared>,
    _driver: AbortOnDrop,
}

impl fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBroker")
            .field("server", &self.shared.server)
            .finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// Connects to the server of `config` and starts delivering to `sink`.
    ///
    /// Fails if the URL or a setting is invalid ([`PluginError::Config`]) or if the server
    /// cannot be reached now ([`PluginError::Start`]): a relay that starts against a wrong
    /// address or password should say so, not come up and report itself down. Once started,
    /// the broker rides out outages by itself.
    ///
    /// Must be called within a tokio runtime; the broker's driver task runs on it.
    pub async fn connect(
        config: &RedisConfig,
        sink: Arc<dyn BrokerSink>,
    ) -> Result<RedisBroker, PluginError> {
        let config_error = |message: String| PluginError::Config {
            category: "broker",
            kind: KIND.to_owned(),
            message,
        };
        let timeouts = Timeouts::from_config(config).map_err(config_error)?;
        let client = Client::open(config.url.as_str()).map_err(|e| {
            config_error(format!(
                "`url` {:?} is not a Redis URL ({e}); expected redis://host:port/ or rediss://",
                redact_url(&config.url)
            ))
        })?;
        let server = client.get_connection_info().addr().to_string();
        let (broken, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            client,
            server,
            timeouts,
            sink,
            wanted: RwLock::new(HashSet::new()),
            subscriber: Mutex::new(None),
            link: StdMutex::new(Link {
                epoch: 0,
                publisher: None,
                down: "not connected yet".to_owned(),
            }),
            broken,
        });
        let first = shared.connect().await.map_err(|why| PluginError::Start {
            category: "broker",
            kind: KIND.to_owned(),
            message: format!(
                "redis at {}: {why}; check that the server runs and that `url` in [broker] is right",
                shared.server
            ),
        })?;
        // Live before returning, so that a subscribe right after `connect` is in effect.
        shared
            .go_live(1, first.publisher, first.subscriber.clone())
            .await
            .map_err(|why| PluginError::Start {
                category: "broker",
                kind: KIND.to_owned(),
                message: format!("redis at {}: {why}", shared.server),
            })?;
        let driver = tokio::spawn(drive(Arc::clone(&shared), first.subscriber, first.messages));
        Ok(RedisBroker {
            shared,
            _driver: AbortOnDrop(driver),
        })
    }
}

fn check_topic(topic: &str) -> Result<(), BrokerError> {
    if topic.is_empty() {
        return Err(BrokerError::BadTopic(topic.to_owned()));
    }
    Ok(())
}

#[async_trait]
impl Broker for RedisBroker {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn publish(&self, topic: &str, payload: Bytes) -> Result<PublishReceipt, BrokerError> {
        check_topic(topic)?;
        let (epoch, mut publisher) = {
            let link = self.shared.link();
            match &link.publisher {
                Some(publisher) => (link.epoch, publisher.clone()),
                None => {
                    drop(link);
                    return Err(self.shared.down_error());
                }
            }
        };
        let mut command = redis::cmd("PUBLISH");
        command.arg(topic).arg(payload.as_ref());
        let publish = command.query_async::<u64>(&mut publisher);
        match bounded(self.shared.timeouts.command, publish).await {
            Ok(receivers) => Ok(PublishReceipt {
                receivers: Some(receivers),
            }),
            Err(e) => Err(self.shared.command_failed(epoch, "PUBLISH", e)),
        }
    }

    async fn subscribe(&self, topic: &str) -> Result<(), BrokerError> {
        check_topic(topic)?;
        let mut slot = self.shared.subscriber.lock().await;
        // Remembered even when the command cannot be sent now: the reconnection subscribes it.
        self.shared.want(topic, true);
        let Some((epoch, subscriber)) = slot.as_mut() else {
            drop(slot);
            return Err(self.shared.down_error());
        };
        let epoch = *epoch;
        match bounded(self.shared.timeouts.command, subscriber.subscribe(topic)).await {
            Ok(()) => Ok(()),
            Err(e) => {
                if !e.is_refusal() {
                    *slot = None;
                }
                Err(self.shared.command_failed(epoch, "SUBSCRIBE", e))
            }
        }
    }

    async fn unsubscribe(&self, topic: &str) -> Result<(), BrokerError> {
        check_topic(topic)?;
        let mut slot = self.shared.subscriber.lock().await;
        // From here on nothing on this topic reaches the sink, whatever the server does.
        self.shared.want(topic, false);
        let Some((epoch, subscriber)) = slot.as_mut() else {
            // No live connection means no subscription, and the reconnection will not make one.
            return Ok(());
        };
        let epoch = *epoch;
        if let Err(e) = bounded(self.shared.timeouts.command, subscriber.unsubscribe(topic)).await {
            // A server that refused keeps the subscription, and would count this node as a
            // receiver: report it. A dead connection takes the subscription with it.
            if e.is_refusal() {
                return Err(self.shared.command_failed(epoch, "UNSUBSCRIBE", e));
            }
            self.shared.command_failed(epoch, "UNSUBSCRIBE", e);
            *slot = None;
        }
        Ok(())
    }

    async fn health(&self) -> Health {
        let link = self.shared.link();
        if link.publisher.is_some() {
            Health::Up
        } else {
            Health::Down(format!(
                "redis at {}: {}; reconnecting",
                self.shared.server, link.down
            ))
        }
    }

    /// `PUBLISH` counts every subscribed connection, the publisher's own included.
    fn counts_own_subscription(&self) -> bool {
        true
    }
}

/// Registers kind `"redis"`.
pub fn register(
    kinds: &mut Kinds<Arc<dyn Broker>, Arc<dyn BrokerSink>>,
) -> Result<(), PluginError> {
    kinds.register(KIND, |config, sink| async move {
        let config: RedisConfig = typed_config("broker", KIND, config)?;
        Ok(Arc::new(RedisBroker::connect(&config, sink).await?) as Arc<dyn Broker>)
    })
}

#[cfg(test)]
mod tests {

    use syncra_test_support::broker::Refusing;

    use super::*;

    fn kinds() -> Kinds<Arc<dyn Broker>, Arc<dyn BrokerSink>> {
        let mut kinds = Kinds::new("broker", &[]);
        register(&mut kinds).unwrap();
        kinds
    }

    async fn create_error(section: serde_json::Value) -> PluginError {
        match kinds().create(section, Arc::new(Refusing)).await {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    #[test]
    fn config_has_safe_defaults_and_refuses_unknown_keys() {
        let config: RedisConfig =
            serde_json::from_value(serde_json::json!({ "url": "redis://h:1/" })).unwrap();
        assert_eq!(config, RedisConfig::new("redis://h:1/"));
        assert_eq!(config.command_timeout_ms, 2_000);
        let err = serde_json::from_value::<RedisConfig>(
            serde_json::json!({ "url": "redis://h:1/", "comand_timeout_ms": 5 }),
        )
        .unwrap_err();
        assert!(err.to_string().contains("comand_timeout_ms"), "{err}");
        assert!(serde_json::from_value::<RedisConfig>(serde_json::json!({})).is_err());
    }

    #[test]
    fn passwords_are_never_printed() {
        // What is redacted, and how, is tested once, in `syncra_core::redact`.
        for url in [
            "redis://user:s3cret@h:6379/0",
            "rediss://s3cret@h:6380/",
            "redis://:s3cret@h/",
            "redis://h:6379/",
        ] {
            let debug = format!("{:?}", RedisConfig::new(url));
            assert!(!debug.contains("s3cret"), "{debug}");
        }
    }

    #[tokio::test]
    async fn a_bad_url_or_setting_is_a_config_error() {
        let err = create_error(serde_json::json!({ "kind": "redis", "url": "http://h/" })).await;
        assert!(matches!(err, PluginError::Config { .. }), "{err}");
        assert!(err.to_string().contains("url"), "{err}");
        let err = create_error(serde_json::json!({
            "kind": "redis", "url": "redis://127.0.0.1:1/", "command_timeout_ms": 0
        }))
        .await;
        assert!(err.to_string().contains("command_timeout_ms"), "{err}");
        let err =
            create_error(serde_json::json!({ "kind": "redis", "url": "redis://h/", "x": 1 })).await;
        assert!(err.to_string().contains('x'), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_server_fails_the_start_naming_it_without_the_password() {
        // Nothing listens on a port just released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("redis://:s3cret@127.0.0.1:{port}/");
        let err = create_error(serde_json::json!({ "kind": "redis", "url": url })).await;
        assert!(matches!(err, PluginError::Start { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
        assert!(!message.contains("s3cret"), "{message}");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let max = Duration::from_secs(2);
        for failures in 1..40 {
            let pause = backoff(failures, max);
            let full = RECONNECT_FIRST
                .saturating_mul(1 << (failures - 1).min(16))
                .min(max);
            assert!(pause >= full / 2 && pause <= full, "{failures}: {pause:?}");
        }
    }
}

//! `syncra-broker-nats`: a [`Broker`] on core NATS (async-nats), so that the nodes of a relay
//! cluster reach each other's users, and the `nats` mailbox ([`mailbox`]), which holds sealed
//! deliveries for recipients who are away in a JetStream stream. The broker itself uses no
//! JetStream: what passes between nodes is never stored.
//!
//! # Delivery truthfulness: publish is a request, every node answers
//!
//! A plain NATS publish tells the publisher nothing, and the relay must tell a sender whether a
//! live session took the message. So a publish here is a request. Every node subscribed to the
//! topic hands the payload to its [`BrokerSink`] and answers on the request's reply subject
//! with one byte: `1` if the sink reported that a local session took it, `0` if not. The
//! publisher counts the `1`s:
//!
//! - no subscriber at all: the server answers "no responders" at once, and the receipt is
//!   `Some(0)`;
//! - otherwise the publisher waits up to [`NatsConfig::request_timeout_ms`] for the first
//!   answer, then [`NatsConfig::reply_window_ms`] more for the answers of other nodes, and
//!   reports `Some(number of 1s)`; with [`Confirm::Any`] (what the relay asks for) the first
//!   `1` ends the wait, and the window is waited out only while every answer so far is `0`;
//! - with [`Confirm::Nothing`] the publish is a plain NATS publish: no reply subject, no
//!   answers, nothing to wait for (the relay uses it when a local session already took the
//!   message and other nodes only need a copy for the user's other devices);
//! - no answer at all within the timeout: [`BrokerError::Unavailable`]. Some node is subscribed
//!   but did not answer (it is stuck, or cut off), so whether anyone took the payload is
//!   unknown, and this broker does not guess in either direction.
//!
//! Why every node answers, not only those that took the payload: the publishing node is
//! usually subscribed to the topic itself (it holds the recipient, or another session of
//! them), and its own sink refuses its own payload. If only takers answered, that subscription
//! would stop the server's "no responders" shortcut, and every publish to a user held only
//! locally would wait out the whole timeout before learning "nobody".
//!
//! The count is exact when the answers of all subscribed nodes arrive within the reply window
//! of each other, which on one LAN is the normal case; a node answering later than that is
//! not counted, so the count is a lower bound and can never claim a delivery that did not
//! happen. The relay only needs "any" versus "none", which the first `1` settles. Unlike
//! Redis, the count does not include the publishing node unless its own sink took the payload,
//! so the relay must not subtract anything for its own subscription.
//!
//! # Connection
//!
//! async-nats reconnects by itself (with backoff, for ever) and subscribes again; `health` is
//! `Up` only when the client is connected *and* a round trip to the server just succeeded, so
//! that "up" also means the subscriptions are back in effect. While disconnected, `publish`
//! fails at once with [`BrokerError::Unavailable`] instead of letting the client buffer it
//! until some later reconnection.
//!
//! # Must never
//!
//! This crate must never drop a payload silently (a subscription that overflows is logged
//! loudly, and its publisher sees no answer and reports "unavailable"), never report a
//! delivery it cannot know (only a node's own "1" counts), never hang a caller on an
//! unreachable server, and never print the credentials of the configured URL.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::Duration;

pub mod mailbox;

use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Event, ServerAddr, StatusCode, Subscriber};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use syncra_core::error::{BrokerError, PluginError};
use syncra_core::redact::redact_url;
use syncra_core::registry::{Kinds, typed_config};
use syncra_core::{Broker, BrokerSink, Confirm, Health, PublishReceipt};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

/// The kind name this broker registers under.
pub const KIND: &str = "nats";

/// The answer of a node whose sink took the payload.
const TAKEN: &[u8] = b"1";
/// The answer of a node whose sink did not.
const NOT_TAKEN: &[u8] = b"0";

/// The first pause before reconnecting; it doubles with every failed attempt up to
/// [`NatsConfig::reconnect_max_ms`].
const RECONNECT_FIRST: Duration = Duration::from_millis(50);

/// The configuration of `kind = "nats"`.
///
/// ```toml
/// [broker]
/// kind = "nats"
/// url = "nats://nats-1.internal:4222,nats://nats-2.internal:4222"
/// ```
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// `nats://[user:password@|token@]host[:port]`, or `tls://` for TLS; several servers of
    /// one cluster may be given, separated by commas.
    pub url: String,
    /// How long a publish waits for the first answer of a subscribed node.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// After the first answer, how long a publish waits for the answers of other subscribed
    /// nodes. Only the exact count depends on it, not "delivered or not" (see the crate docs).
    #[serde(default = "default_reply_window_ms")]
    pub reply_window_ms: u64,
    /// How long subscribe, unsubscribe and a health check wait for the server.
    #[serde(default = "default_command_timeout_ms")]
    pub command_timeout_ms: u64,
    /// How long one connection attempt may take.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// The longest pause between two reconnection attempts.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// How often the client pings the server, so that a server that vanished without closing
    /// the connection (a network partition) is noticed.
    #[serde(default = "default_ping_interval_ms")]
    pub ping_interval_ms: u64,
}

fn default_request_timeout_ms() -> u64 {
    1_000
}

fn default_reply_window_ms() -> u64 {
    20
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

impl NatsConfig {
    /// A configuration for `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        NatsConfig {
            url: url.into(),
            request_timeout_ms: default_request_timeout_ms(),
            reply_window_ms: default_reply_window_ms(),
            command_timeout_ms: default_command_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
            ping_interval_ms: default_ping_interval_ms(),
        }
    }
}

// The URL may carry a password or a token: never print it.
impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &redact_url(&self.url))
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("reply_window_ms", &self.reply_window_ms)
            .field("command_timeout_ms", &self.command_timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("reconnect_max_ms", &self.reconnect_max_ms)
            .field("ping_interval_ms", &self.ping_interval_ms)
            .finish()
    }
}

/// The timeouts of one broker, from its config.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    request: Duration,
    reply_window: Duration,
    command: Duration,
    connect: Duration,
    reconnect_max: Duration,
    ping_interval: Duration,
}

impl Timeouts {
    fn from_config(config: &NatsConfig) -> Result<Timeouts, String> {
        let positive = syncra_core::registry::positive_ms;
        Ok(Timeouts {
            request: positive("request_timeout_ms", config.request_timeout_ms)?,
            // Zero is allowed: count only the first answer.
            reply_window: Duration::from_millis(config.reply_window_ms),
            command: positive("command_timeout_ms", config.command_timeout_ms)?,
            connect: positive("connect_timeout_ms", config.connect_timeout_ms)?,
            reconnect_max: positive("reconnect_max_ms", config.reconnect_max_ms)?,
            ping_interval: positive("ping_interval_ms", config.ping_interval_ms)?,
        })
    }
}

/// One node's answer to a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// A subscribed node answered; whether its sink took the payload.
    Node { taken: bool },
    /// The server says nobody is subscribed.
    NoResponders,
}

/// Publishes waiting for answers, by the token at the end of their reply subject.
type Pending = StdMutex<HashMap<u64, mpsc::UnboundedSender<Answer>>>;

/// One subscribed topic: the task that serves it and the way to stop it.
struct Subscription {
    stop: oneshot::Sender<()>,
    task: AbortOnDrop,
}

/// A task that is aborted when this handle is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A node's broker on a NATS server or cluster.
pub struct NatsBroker {
    client: Client,
    /// The servers, for messages (credentials redacted).
    server: String,
    timeouts: Timeouts,
    sink: Arc<dyn BrokerSink>,
    /// `<inbox>.` : every publish's reply subject is this plus a token.
    reply_prefix: String,
    next_token: AtomicU64,
    pending: Arc<Pending>,
    /// The subscribed topics. The lock serialises subscribe and unsubscribe.
    topics: Mutex<HashMap<String, Subscription>>,
    _answers: AbortOnDrop,
}

impl fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBroker")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// A client connected with the settings of a [`NatsConfig`], and what its users need to know.
pub(crate) struct Connected {
    pub(crate) client: Client,
    /// The servers, for messages (credentials redacted).
    pub(crate) server: String,
    pub(crate) timeouts: Timeouts,
}

/// Connects a client for `category` (`"broker"` or `"mailbox"`, the config section it came
/// from) the way every part of this crate does: the URL and timeouts checked
/// ([`PluginError::Config`]), a server reached now ([`PluginError::Start`]), reconnections for
/// ever with jittered backoff, and connection events logged under the section's name. One
/// home for it, so the broker and the mailbox cannot drift apart in how they treat a server.
pub(crate) async fn connect_client(
    config: &NatsConfig,
    category: &'static str,
) -> Result<Connected, PluginError> {
    let config_error = |message: String| PluginError::Config {
        category,
        kind: KIND.to_owned(),
        message,
    };
    let timeouts = Timeouts::from_config(config).map_err(config_error)?;
    let server = redact_url(&config.url);
    let addrs = config
        .url
        .split(',')
        .map(|url| {
            url.trim().parse::<ServerAddr>().map_err(|e| {
                config_error(format!(
                    "`url` {:?} is not a NATS URL ({e}); expected nats://host:port",
                    redact_url(url.trim())
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let reconnect_max = timeouts.reconnect_max;
    let events_server = server.clone();
    let client = ConnectOptions::new()
        .name("syncra-relay")
        .connection_timeout(timeouts.connect)
        .ping_interval(timeouts.ping_interval)
        .max_reconnects(None)
        .reconnect_delay_callback(move |attempts| backoff(attempts, reconnect_max))
        .event_callback(move |event| {
            let server = events_server.clone();
            async move { log_event(category, &server, event) }
        })
        .connect(addrs)
        .await
        .map_err(|e| PluginError::Start {
            category,
            kind: KIND.to_owned(),
            message: format!(
                "nats at {server}: cannot connect: {e}; check that the server runs and that \
                 `url` in [{category}] is right"
            ),
        })?;
    Ok(Connected {
        client,
        server,
        timeouts,
    })
}

impl NatsBroker {
    /// Connects to the server(s) of `config` and starts delivering to `sink`.
    ///
    /// Fails if the URL or a setting is invalid ([`PluginError::Config`]) or if no server can
    /// be reached now ([`PluginError::Start`]): a relay that starts against a wrong address or
    /// credentials should say so, not come up and report itself down. Once started, the broker
    /// rides out outages by itself.
    ///
    /// Must be called within a tokio runtime.
    pub async fn connect(
        config: &NatsConfig,
        sink: Arc<dyn BrokerSink>,
    ) -> Result<NatsBroker, PluginError> {
        let Connected {
            client,
            server,
            timeouts,
        } = connect_client(config, "broker").await?;
        let start_error = |why: String| PluginError::Start {
            category: "broker",
            kind: KIND.to_owned(),
            message: format!("nats at {server}: {why}"),
        };

        let inbox = client.new_inbox();
        let answers = client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|e| start_error(format!("cannot subscribe to the reply inbox: {e}")))?;
        let reply_prefix = format!("{inbox}.");
        let pending: Arc<Pending> = Arc::default();
        let answers = AbortOnDrop(tokio::spawn(route_answers(
            answers,
            reply_prefix.clone(),
            Arc::clone(&pending),
        )));
        let broker = NatsBroker {
            client,
            server,
            timeouts,
            sink,
            reply_prefix,
            next_token: AtomicU64::new(1),
            pending,
            topics: Mutex::new(HashMap::new()),
            _answers: answers,
        };
        // The server has the inbox subscription, and answers, before this broker is used.
        if let Err(e) = broker.round_trip().await {
            return Err(PluginError::Start {
                category: "broker",
                kind: KIND.to_owned(),
                message: e.to_string(),
            });
        }
        Ok(broker)
    }

    fn unavailable(&self, what: impl fmt::Display) -> BrokerError {
        BrokerError::Unavailable(format!("nats at {}: {what}", self.server))
    }

    /// `Ok` when connected; otherwise the error a call made now should return.
    fn connected(&self) -> Result<(), BrokerError> {
        match self.client.connection_state() {
            State::Connected => Ok(()),
            State::Disconnected => Err(self.unavailable("disconnected; reconnecting")),
            State::Pending => Err(self.unavailable("connecting")),
        }
    }

    /// Registers a wait for answers on a fresh reply subject; the guard forgets it.
    fn expect_answers(&self) -> (String, mpsc::UnboundedReceiver<Answer>, PendingGuard<'_>) {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, answers) = mpsc::unbounded_channel();
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(token, tx);
        let guard = PendingGuard {
            pending: &self.pending,
            token,
        };
        (format!("{}{token}", self.reply_prefix), answers, guard)
    }

    /// One round trip through the server: once it returns, the server has processed
    /// everything this client sent before (a SUB, an UNSUB, the subscriptions made again after
    /// a reconnection). `Client::flush` only flushes the socket, so this sends a message to
    /// this broker's own reply inbox and waits for the server to hand it back: the server
    /// handles one connection's operations in order.
    async fn round_trip(&self) -> Result<(), BrokerError> {
        let (subject, mut echo, _guard) = self.expect_answers();
        let trip = async {
            self.client
                .publish(subject, Bytes::from_static(b"ping"))
                .await
                .map_err(|e| e.to_string())?;
            echo.recv()
                .await
                .map(drop)
                .ok_or_else(|| "the reply router stopped".to_owned())
        };
        match tokio::time::timeout(self.timeouts.command, trip).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.unavailable(format!("no answer from the server: {e}"))),
            Err(_) => Err(self.unavailable(format!(
                "no answer from the server within {:?}",
                self.timeouts.command
            ))),
        }
    }

    /// Waits, within the command timeout, for the client to take a publish.
    async fn hand_over<E: fmt::Display>(
        &self,
        publish: impl Future<Output = Result<(), E>>,
    ) -> Result<(), BrokerError> {
        match tokio::time::timeout(self.timeouts.command, publish).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.unavailable(format!("publish failed: {e}"))),
            Err(_) => Err(self.unavailable("publish could not be queued in time")),
        }
    }

    /// Collects the answers to one publish. With `any`, the first `1` settles it: the answer
    /// is then `1` without waiting for the other nodes.
    async fn count_answers(
        &self,
        answers: &mut mpsc::UnboundedReceiver<Answer>,
        any: bool,
    ) -> Result<u64, BrokerError> {
        let first = tokio::time::timeout(self.timeouts.request, answers.recv()).await;
        let mut taken = match first {
            Ok(Some(Answer::NoResponders)) => return Ok(0),
            Ok(Some(Answer::Node { taken })) => u64::from(taken),
            Ok(None) => return Err(self.unavailable("the reply router stopped")),
            Err(_) => {
                self.connected()?;
                return Err(self.unavailable(format!(
                    "a node is subscribed but none answered within {:?}, so whether anyone \
                     took the payload is unknown",
                    self.timeouts.request
                )));
            }
        };
        let window_end = tokio::time::Instant::now() + self.timeouts.reply_window;
        while !(any && taken > 0) {
            match tokio::time::timeout_at(window_end, answers.recv()).await {
                Ok(Some(Answer::Node { taken: true })) => taken += 1,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        Ok(taken)
    }
}

/// Removes a publish's entry from the pending table however the publish ends.
struct PendingGuard<'a> {
    pending: &'a Pending,
    token: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.token);
    }
}

/// Hands each answer on the reply inbox to the publish waiting for it.
async fn route_answers(mut answers: Subscriber, prefix: String, pending: Arc<Pending>) {
    while let Some(message) = answers.next().await {
        let Some(token) = message
            .subject
            .strip_prefix(prefix.as_str())
            .and_then(|t| t.parse::<u64>().ok())
        else {
            continue;
        };
        let answer = if message.status == Some(StatusCode::NO_RESPONDERS) {
            Answer::NoResponders
        } else {
            Answer::Node {
                taken: message.payload.as_ref() == TAKEN,
            }
        };
        let waiting = pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&token)
            .cloned();
        // An answer after its publish gave up has nobody to go to; that publish already
        // reported what it knew.
        if let Some(waiting) = waiting {
            let _ = waiting.send(answer);
        }
    }
}

/// Serves one subscribed topic: hands each payload to the sink and answers the publisher.
async fn serve(
    topic: String,
    mut subscriber: Subscriber,
    mut stop: oneshot::Receiver<()>,
    client: Client,
    sink: Arc<dyn BrokerSink>,
    command_timeout: Duration,
) {
    loop {
        tokio::select! {
            // Stop first, so that nothing reaches the sink once unsubscribe asked to stop.
            biased;
            _ = &mut stop => return,
            message = subscriber.next() => {
                let Some(message) = message else { return };
                let taken = sink.deliver(&topic, message.payload);
                // Anyone who can publish chooses the reply subject: only a broker's own answer
                // inbox is answered, so that a publisher cannot make every node publish on a
                // subject of its choice (another node's topic, a JetStream API subject).
                if let Some(reply) = message.reply.filter(|r| is_answer_inbox(r)) {
                    let answer = Bytes::from_static(if taken { TAKEN } else { NOT_TAKEN });
                    // Bounded: while disconnected the client's queue can fill, and a stuck
                    // answer must not keep this topic from being served or stopped.
                    let sent =
                        tokio::time::timeout(command_timeout, client.publish(reply, answer)).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        warn!("nats broker: could not answer a publish on {topic}");
                    }
                }
            }
        }
    }
}

/// Whether `reply` has the form of a broker's answer inbox, `_INBOX.<id>.<token>` (see
/// `NatsBroker::expect_answers`): the only reply subjects a node answers.
fn is_answer_inbox(reply: &str) -> bool {
    let mut parts = reply.split('.');
    parts.next() == Some("_INBOX")
        && parts
            .next()
            .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        && parts.next().is_some_and(|t| {
            !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit())
        })
        && parts.next().is_none()
}

/// Logs a connection event of the client serving `category` (`broker` or `mailbox`).
fn log_event(category: &str, server: &str, event: Event) {
    match event {
        Event::Connected => info!("nats {category}: connected to {server}"),
        Event::Disconnected => warn!("nats {category}: lost {server}; reconnecting"),
        // The client dropped messages for a subscription that could not keep up: say so
        // loudly. Their publishers get no answer from this node and report "unavailable".
        Event::SlowConsumer(sid) => {
            error!(
                "nats {category}: subscription {sid} could not keep up and messages were dropped"
            )
        }
        other => warn!("nats {category}: {server}: {other}"),
    }
}

/// The pause before reconnection attempt `attempts` (1-based): none for the first, then
/// doubling from [`RECONNECT_FIRST`] up to `max`, scaled by a random factor in [0.5, 1] so that
/// the nodes of a cluster do not reconnect in lockstep.
fn backoff(attempts: usize, max: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let step = u32::try_from(attempts - 2).unwrap_or(u32::MAX);
    syncra_core::time::backoff(step, RECONNECT_FIRST, max)
}

/// Accepts topics that are literal NATS subjects: non-empty dot-separated tokens without
/// whitespace, and no wildcard token (a topic names one user, never a pattern).
fn check_topic(topic: &str) -> Result<(), BrokerError> {
    let valid = !topic.is_empty()
        && !topic.contains(char::is_whitespace)
        && topic
            .split('.')
            .all(|token| !token.is_empty() && token != "*" && token != ">");
    if valid {
        Ok(())
    } else {
        Err(BrokerError::BadTopic(topic.to_owned()))
    }
}

#[async_trait]
impl Broker for NatsBroker {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn publish(&self, topic: &str, payload: Bytes) -> Result<PublishReceipt, BrokerError> {
        self.publish_confirm(topic, payload, Confirm::Count).await
    }

    async fn publish_confirm(
        &self,
        topic: &str,
        payload: Bytes,
        confirm: Confirm,
    ) -> Result<PublishReceipt, BrokerError> {
        check_topic(topic)?;
        let max = self.client.server_info().max_payload;
        if payload.len() > max {
            return Err(BrokerError::TooLarge {
                size: payload.len(),
                max,
            });
        }
        // Never hand the client a publish while it is disconnected: it would hold it until
        // some later reconnection, long after the sender was told anything.
        self.connected()?;
        if confirm == Confirm::Nothing {
            // A plain publish: subscribed nodes see no reply subject and send no answer.
            self.hand_over(self.client.publish(topic.to_owned(), payload))
                .await?;
            return Ok(PublishReceipt { receivers: None });
        }
        let (reply, mut answers, _guard) = self.expect_answers();
        self.hand_over(
            self.client
                .publish_with_reply(topic.to_owned(), reply, payload),
        )
        .await?;
        let receivers = self
            .count_answers(&mut answers, confirm == Confirm::Any)
            .await?;
        Ok(PublishReceipt {
            receivers: Some(receivers),
        })
    }

    async fn subscribe(&self, topic: &str) -> Result<(), BrokerError> {
        check_topic(topic)?;
        let mut topics = self.topics.lock().await;
        if !topics.contains_key(topic) {
            // The client remembers the subscription and makes it again after every
            // reconnection, so it is kept even if the server cannot confirm it now.
            let subscriber = tokio::time::timeout(
                self.timeouts.command,
                self.client.subscribe(topic.to_owned()),
            )
            .await
            .map_err(|_| self.unavailable("subscribe could not be queued in time"))?
            .map_err(|e| self.unavailable(format!("subscribe failed: {e}")))?;
            let (stop, stopped) = oneshot::channel();
            let task = tokio::spawn(serve(
                topic.to_owned(),
                subscriber,
                stopped,
                self.client.clone(),
                Arc::clone(&self.sink),
                self.timeouts.command,
            ));
            topics.insert(
                topic.to_owned(),
                Subscription {
                    stop,
                    task: AbortOnDrop(task),
                },
            );
        }
        drop(topics);
        self.connected().map_err(|_| {
            self.unavailable(
                "disconnected; the subscription takes effect when the connection is back",
            )
        })?;
        // In effect once the server has processed the SUB, as the contract requires.
        self.round_trip().await
    }

    async fn unsubscribe(&self, topic: &str) -> Result<(), BrokerError> {
        check_topic(topic)?;
        let Some(Subscription { stop, mut task }) = self.topics.lock().await.remove(topic) else {
            return Ok(());
        };
        let _ = stop.send(());
        // Wait for the task to end, so nothing reaches the sink after this returns. It ends at
        // its next step; a step is bounded by the command timeout, and abort is the backstop.
        if tokio::time::timeout(self.timeouts.command, &mut task.0)
            .await
            .is_err()
        {
            task.0.abort();
            let _ = (&mut task.0).await;
        }
        // Dropping the subscriber sent the UNSUB; while connected, make sure the server has it,
        // so other nodes' publishes stop counting this one. While disconnected there is no
        // subscription to remove and the client will not make it again.
        // A failed round trip changes nothing for this node (its deliveries have stopped), and
        // the client sends the UNSUB when it can.
        if self.connected().is_ok() {
            let _ = self.round_trip().await;
        }
        Ok(())
    }

    async fn health(&self) -> Health {
        match self.connected() {
            Ok(()) => match self.round_trip().await {
                Ok(()) => Health::Up,
                Err(e) => Health::Down(e.to_string()),
            },
            Err(e) => Health::Down(e.to_string()),
        }
    }
}

/// Registers kind `"nats"`.
pub fn register(
    kinds: &mut Kinds<Arc<dyn Broker>, Arc<dyn BrokerSink>>,
) -> Result<(), PluginError> {
    kinds.register(KIND, |config, sink| async move {
        let config: NatsConfig = typed_config("broker", KIND, config)?;
        Ok(Arc::new(NatsBroker::connect(&config, sink).await?) as Arc<dyn Broker>)
    })
}

#[cfg(test)]
mod tests {

    use syncra_test_support::broker::Refusing;

    use super::*;

    #[test]
    fn only_a_brokers_answer_inbox_is_answered() {
        // `Client::new_inbox`: `_INBOX.` and a 22-character NUID.
        assert!(is_answer_inbox("_INBOX.x6KDn3TqnCBNodt3eC2Djk.17"));
        for other in [
            "syncra.n.0123456789abcdef0123456789abcdef",
            "syncra.presence",
            "$JS.API.STREAM.DELETE.SYNCRA_MAILBOX",
            "_INBOX",
            "_INBOX.abc",
            "_INBOX.abc.",
            "_INBOX..1",
            "_INBOX.abc.1.2",
            "_INBOX.abc.x1",
            "_INBOX.a-b.1",
            "_INBOX.abc.123456789012345678901",
            "_inbox.abc.1",
        ] {
            assert!(!is_answer_inbox(other), "{other}");
        }
    }

    async fn create_error(section: serde_json::Value) -> PluginError {
        let mut kinds = Kinds::new("broker", &[]);
        register(&mut kinds).unwrap();
        match kinds.create(section, Arc::new(Refusing)).await {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    #[test]
    fn config_has_safe_defaults_and_refuses_unknown_keys() {
        let config: NatsConfig =
            serde_json::from_value(serde_json::json!({ "url": "nats://h:4222" })).unwrap();
        assert_eq!(config, NatsConfig::new("nats://h:4222"));
        assert_eq!(config.request_timeout_ms, 1_000);
        let err = serde_json::from_value::<NatsConfig>(
            serde_json::json!({ "url": "nats://h", "reply_windw_ms": 5 }),
        )
        .unwrap_err();
        assert!(err.to_string().contains("reply_windw_ms"), "{err}");
        assert!(serde_json::from_value::<NatsConfig>(serde_json::json!({})).is_err());
    }

    #[test]
    fn credentials_are_never_printed() {
        // What is redacted, and how, is tested once, in `syncra_core::redact`.
        for url in [
            "nats://u:s3cret@h:4222",
            "tls://s3cret@h:4222",
            "nats://a:s3cret@h1:4222, nats://h2:4222",
            "nats://h:4222",
        ] {
            let debug = format!("{:?}", NatsConfig::new(url));
            assert!(!debug.contains("s3cret"), "{debug}");
        }
    }

    #[test]
    fn topics_are_literal_subjects() {
        for good in ["syncra.u.abc", "x", "conformance.user_0a1b"] {
            assert!(check_topic(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a..b", ".a", "a.", "a.*", "a.>", ">", "a\tb"] {
            assert!(
                matches!(check_topic(bad), Err(BrokerError::BadTopic(_))),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_bad_url_or_setting_is_a_config_error() {
        let err =
            create_error(serde_json::json!({ "kind": "nats", "url": "nats://h:notaport" })).await;
        assert!(matches!(err, PluginError::Config { .. }), "{err}");
        let err = create_error(serde_json::json!({
            "kind": "nats", "url": "nats://127.0.0.1:1", "request_timeout_ms": 0
        }))
        .await;
        assert!(err.to_string().contains("request_timeout_ms"), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_server_fails_the_start_without_the_password() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("nats://u:s3cret@127.0.0.1:{port}");
        let err = create_error(serde_json::json!({ "kind": "nats", "url": url })).await;
        assert!(matches!(err, PluginError::Start { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
        assert!(!message.contains("s3cret"), "{message}");
    }

    #[test]
    fn backoff_starts_at_once_then_doubles_up_to_the_cap() {
        let max = Duration::from_secs(2);
        assert_eq!(backoff(1, max), Duration::ZERO);
        for attempts in 2..40usize {
            let pause = backoff(attempts, max);
            let full = RECONNECT_FIRST
                .saturating_mul(1 << (attempts - 2).min(16))
                .min(max);
            assert!(pause >= full / 2 && pause <= full, "{attempts}: {pause:?}");
        }
    }
}

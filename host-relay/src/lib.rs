//! `syncra-relay`: the blind relay host.
//!
//! It authenticates sessions (challenge–response over the identity key, short-lived resume
//! tokens), looks up public identity records, and forwards sealed envelopes to the live
//! sessions of their recipients — on this node directly, on other nodes through the broker. It
//! reads only envelope headers (recipient ids); it never holds a private key, never sees a
//! plaintext and stores no message.
//!
//! What it must never do: log or store envelope contents, tokens or proofs; let one slow or
//! hostile client slow anyone else; report "delivered" for a message no session took.
//!
//! One entry point with injected shutdown ([`run`]) serves both the binary and the tests, which
//! use [`Relay::start`] to run a real relay on `127.0.0.1:0`.

pub mod config;
mod delivery;
mod groups;
pub mod kinds;
mod limits;
mod links;
mod metrics;
pub mod plugins;
mod presence;
mod router;
mod sealed_mailbox;
mod session;
mod tokens;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use syncra_core::broker::{Broker, BrokerSink};
use syncra_core::crypto::keyfile::create_private_dir;
use syncra_core::registry::PluginRegistry;
use syncra_core::transport::{CloseReason, Listener};
use syncra_core::wire::ErrorCode;
use syncra_core::{Health, IdentityStore, Mailbox};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

pub use config::RelayConfig;
use limits::{LimitSettings, Limits};
use links::Links;
use metrics::Metrics;
use presence::Presence;
use router::{Router, RouterSink};
use tokens::TokenKeys;

/// The plugins compiled into this build.
pub fn plugin_registry() -> anyhow::Result<PluginRegistry> {
    #[allow(unused_mut)]
    let mut registry = PluginRegistry::new(kinds::KNOWN);
    #[cfg(feature = "transport-ws")]
    syncra_transport_ws::register(&mut registry.transports)?;
    #[cfg(feature = "broker-memory")]
    syncra_broker_memory::register(&mut registry.brokers)?;
    #[cfg(feature = "broker-redis")]
    syncra_broker_redis::register(&mut registry.brokers)?;
    #[cfg(feature = "broker-nats")]
    syncra_broker_nats::register(&mut registry.brokers)?;
    #[cfg(feature = "store-sqlite")]
    syncra_store_sqlite::register(&mut registry.stores)?;
    #[cfg(feature = "store-postgres")]
    syncra_store_postgres::register(&mut registry.stores)?;
    // The strict stateless relay of the blueprint: no mailbox, `offline` for the absent.
    registry
        .mailboxes
        .register("none", |config, _limits| async move {
            let _: NoneConfig = syncra_core::registry::typed_config("mailbox", "none", config)?;
            Ok(Arc::new(syncra_core::mailbox::NoMailbox) as Arc<dyn Mailbox>)
        })?;
    #[cfg(feature = "store-sqlite")]
    syncra_store_sqlite::mailbox::register(&mut registry.mailboxes)?;
    #[cfg(feature = "store-postgres")]
    syncra_store_postgres::mailbox::register(&mut registry.mailboxes)?;
    #[cfg(feature = "broker-redis")]
    syncra_broker_redis::mailbox::register(&mut registry.mailboxes)?;
    #[cfg(feature = "broker-nats")]
    syncra_broker_nats::mailbox::register(&mut registry.mailboxes)?;
    Ok(registry)
}

/// `[mailbox] kind = "none"` takes no keys of its own.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NoneConfig {}

/// How often expired mailbox entries are purged.
const MAILBOX_EXPIRY_INTERVAL: Duration = Duration::from_secs(60);

/// Everything a node's sessions share.
pub(crate) struct NodeState {
    pub(crate) config: RelayConfig,
    pub(crate) store: Arc<dyn IdentityStore>,
    pub(crate) broker: Arc<dyn Broker>,
    /// Sealed deliveries for recipients with no live session (`none`: nothing is held).
    pub(crate) mailbox: Arc<dyn Mailbox>,
    pub(crate) tokens: TokenKeys,
    pub(crate) limits: Limits,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) router: Arc<Router>,
    /// Which other nodes hold which users (`presence`).
    pub(crate) presence: Arc<Presence>,
    /// Deliveries to other nodes, batched per node (`links`).
    pub(crate) links: Arc<Links>,
    /// Set when shutdown starts, so sessions that log in during the drain are closed too.
    pub(crate) draining: std::sync::atomic::AtomicBool,
    /// Relay hooks, asked about every session and envelope.
    pub(crate) hooks: Vec<Arc<dyn plugins::RelayHook>>,
    /// The MLS groups this node knows without asking the store (only when it is alone on its
    /// broker: `groups`).
    pub(crate) groups: groups::GroupCache,
}

/// A running relay node.
pub struct Relay {
    url: String,
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    state: Arc<NodeState>,
    stop: watch::Sender<bool>,
    accept_task: tokio::task::JoinHandle<JoinSet<()>>,
    admin_task: Option<tokio::task::JoinHandle<()>>,
    /// Announces this node's users to the others (a node alone on its broker has none).
    presence_task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("url", &self.url)
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

/// Health of the node's dependencies, as `/healthz` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HealthReport {
    /// `ok` when broker and store are up and no relay hook is disabled, `degraded` otherwise.
    /// A disabled hook degrades the node because its policy is no longer applied: every call
    /// gets the hook's fail-open answer (the policy is off) or fail-closed one (everything is
    /// refused), and only a restart brings it back.
    pub status: &'static str,
    /// The broker's health.
    pub broker: Health,
    /// The identity store's health.
    pub store: Health,
    /// The mailbox's health (`none` is always up).
    pub mailbox: Health,
    /// Authenticated sessions on this node.
    pub sessions: i64,
    /// The other nodes of the cluster this node knows of: heard from within
    /// `presence::PEER_TIMEOUT`, and not gone with a `Bye`.
    pub nodes: usize,
    /// Each relay hook, in `[[plugins]]` order.
    pub hooks: Vec<plugins::HookHealth>,
}

impl Relay {
    /// Creates the plugins, binds the listener and the admin endpoint and starts accepting.
    /// Returns once the relay is reachable.
    pub async fn start(config: RelayConfig) -> anyhow::Result<Relay> {
        let registry = plugin_registry()?;
        Self::start_with(config, registry).await
    }

    /// Like [`Relay::start`] with an explicit plugin registry; the `[[plugins]]` entries are
    /// loaded into it.
    pub async fn start_with(
        config: RelayConfig,
        mut registry: PluginRegistry,
    ) -> anyhow::Result<Relay> {
        let base = config.source.as_deref().and_then(std::path::Path::parent);
        let hooks = plugins::load(&config.plugins, base, &mut registry)
            .with_context(|| format!("loading [[plugins]] from {}", config.describe_source()))?;
        create_private_dir(&config.data_dir)
            .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
        let tokens = TokenKeys::load_or_create(
            &config.token_key_path(),
            &config.relay_id,
            config.auth.token_ttl_secs,
        )?;
        let store = open_store(&registry, &config).await?;
        let metrics = Arc::new(Metrics::default());
        let (mailbox_section, mailbox_limits) = config.mailbox_settings()?;
        let mailbox = registry
            .mailboxes
            .create(mailbox_section, mailbox_limits)
            .await
            .with_context(|| {
                format!(
                    "starting the mailbox ([mailbox] in {})",
                    config.describe_source()
                )
            })?;
        // Entries carry a MAC under the cluster key, so what someone else wrote into a shared
        // backend never reaches a session (sealed_mailbox.rs).
        let mailbox: Arc<dyn Mailbox> = if sealed_mailbox::SealedMailbox::wanted(mailbox.as_ref()) {
            Arc::new(sealed_mailbox::SealedMailbox::new(
                mailbox,
                &tokens.cluster_key(),
                metrics.clone(),
            ))
        } else {
            mailbox
        };
        let transport = registry
            .transports
            .create(config.transport_section(), ())
            .await
            .with_context(|| {
                format!(
                    "starting the transport ([transport] in {})",
                    config.describe_source()
                )
            })?;

        let mut node_id = [0u8; router::NODE_ID_LEN];
        syncra_core::crypto::fill_random(&mut node_id);
        let router = Arc::new(Router::new(
            node_id,
            config.limits.overflow,
            router::ClusterMac::new(&tokens.cluster_key()),
            config.limits.max_frame,
        ));
        let presence = Arc::new(Presence::new(
            node_id,
            presence::presence_key(&tokens.cluster_key()),
        ));
        let links = Arc::new(Links::new(router.clone()));
        let topic = router::node_topic(&node_id);
        let sink: Arc<dyn BrokerSink> = Arc::new(RouterSink {
            router: router.clone(),
            presence: presence.clone(),
            links: links.clone(),
            metrics: metrics.clone(),
            topic: topic.clone(),
        });
        let broker = registry
            .brokers
            .create(config.broker.clone(), sink)
            .await
            .with_context(|| {
                format!(
                    "starting the broker ([broker] in {})",
                    config.describe_source()
                )
            })?;

        links.start(broker.clone());
        if !broker.alone() {
            // Two subscriptions for the node's life, whatever the number of users it holds.
            // Both brokers remember a subscription they could not confirm and make it when the
            // connection is back, so a failure here is logged, not fatal.
            for topic in [topic.as_str(), router::PRESENCE_TOPIC] {
                if let Err(e) = broker.subscribe(topic).await {
                    warn!("broker subscribe to {topic} failed: {e}");
                }
            }
        }

        let listener = transport.bind(&config.listen).await.map_err(|e| {
            let hint = match &e {
                syncra_core::error::TransportError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::AddrInUse =>
                {
                    "; another program is using that port: choose another with `listen` in the \
                     config file or SYNCRA_LISTEN=127.0.0.1:PORT"
                }
                _ => "",
            };
            anyhow::anyhow!("listening on {}: {e}{hint}", config.listen)
        })?;
        let url = listener.url();
        let local_addr = listener.local_addr();

        let l = &config.limits;
        let limits = Limits::new(LimitSettings {
            user_rate: l.messages_per_second_per_user,
            user_burst: l.message_burst_per_user,
            address_rate: l.messages_per_second_per_address,
            address_burst: l.message_burst_per_address,
            connections_per_address: l.connections_per_address,
            auth_per_minute: config.auth.attempts_per_minute_per_address,
            lookups_per_minute: config.auth.lookups_per_minute_per_address,
            fanout_rate: l.fanout_bytes_per_second_per_user,
            fanout_burst: l.fanout_burst_bytes_per_user,
        });
        let groups = groups::GroupCache::new(broker.alone());
        let state = Arc::new(NodeState {
            config,
            store,
            broker,
            mailbox,
            tokens,
            limits,
            metrics,
            router,
            presence,
            links,
            draining: std::sync::atomic::AtomicBool::new(false),
            hooks,
            groups,
        });

        let (stop, stop_rx) = watch::channel(false);
        let (admin_addr, admin_task) = if state.config.admin_listen.is_empty() {
            (None, None)
        } else {
            let (addr, task) = start_admin(state.clone(), stop_rx.clone()).await?;
            (Some(addr), Some(task))
        };
        if state.mailbox.stores() {
            tokio::spawn(expire_mailbox(state.clone(), stop_rx.clone()));
        }
        tokio::spawn(idle_sweep(state.clone(), stop_rx.clone()));
        let presence_task = (!state.broker.alone()).then(|| {
            tokio::spawn(presence::run(
                state.presence.clone(),
                state.router.clone(),
                state.broker.clone(),
                stop_rx.clone(),
            ))
        });
        // A node serves once it knows who holds whom (or the broker is down: then it serves
        // local traffic and answers `broker_unavailable` for the rest until it can resync).
        if presence_task.is_some() && !state.presence.wait_trusted(Duration::from_secs(3)).await {
            warn!("the broker did not take this node's presence announcements; starting anyway");
        }
        let accept_task = tokio::spawn(accept_loop(state.clone(), listener, stop_rx));
        Ok(Relay {
            url,
            local_addr,
            admin_addr,
            state,
            stop,
            accept_task,
            admin_task,
            presence_task,
        })
    }

    /// The URL clients connect to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The bound client address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound admin address, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The effective configuration.
    pub fn config(&self) -> &RelayConfig {
        &self.state.config
    }

    /// The Prometheus exposition of this node's metrics.
    pub fn metrics_text(&self) -> String {
        self.state.metrics.render()
    }

    /// The node's health.
    pub async fn health(&self) -> HealthReport {
        health(&self.state).await
    }

    /// Stops accepting, closes every session with `shutting_down` after flushing what is
    /// queued for it, and waits (up to the drain timeout) for the sessions to end.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.state
            .draining
            .store(true, std::sync::atomic::Ordering::Release);
        let _ = self.stop.send(true);
        let mut sessions = self.accept_task.await.context("the accept loop panicked")?;
        for queue in self.state.router.all_sessions() {
            queue.close(CloseReason::error(
                ErrorCode::ShuttingDown,
                "the relay is restarting; reconnect shortly",
            ));
        }
        let drain = Duration::from_secs(self.state.config.limits.drain_timeout_secs);
        let drained = tokio::time::timeout(drain, async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                remaining = sessions.len(),
                "drain timeout passed; closing the remaining sessions"
            );
            sessions.abort_all();
        }
        if let Some(task) = self.admin_task {
            let _ = task.await;
        }
        // The presence task says `Bye` (other nodes stop sending here) and ends; its publish is
        // bounded by the broker's own timeouts.
        if let Some(task) = self.presence_task {
            let _ = task.await;
        }
        Ok(())
    }
}

async fn health(state: &NodeState) -> HealthReport {
    let broker = state.broker.health().await;
    let store = state.store.health().await;
    let mailbox = state.mailbox.health().await;
    let hooks: Vec<plugins::HookHealth> = state.hooks.iter().map(|h| h.health()).collect();
    let status = if broker.is_up()
        && store.is_up()
        && mailbox.is_up()
        && !hooks.iter().any(|h| h.is_disabled())
    {
        "ok"
    } else {
        "degraded"
    };
    HealthReport {
        status,
        broker,
        store,
        mailbox,
        sessions: state.metrics.sessions.get(),
        nodes: state.presence.peer_count(),
        hooks,
    }
}

/// Purges expired mailbox entries every [`MAILBOX_EXPIRY_INTERVAL`] until shutdown.
async fn expire_mailbox(state: Arc<NodeState>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(MAILBOX_EXPIRY_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        match state.mailbox.expire(syncra_core::now_ms()).await {
            Ok(0) => {}
            Ok(n) => info!(entries = n, "purged expired mailbox entries"),
            Err(e) => warn!("purging expired mailbox entries failed (will retry): {e}"),
        }
    }
}

/// Closes, with `timeout`, the sessions that sent no frame (not even a ping) for the idle
/// timeout: one pass over the node every quarter of it ([`router::Router::sweep_idle`]), so a
/// session is closed between 1 and 1.25 × the timeout after its last frame.
async fn idle_sweep(state: Arc<NodeState>, mut stop: watch::Receiver<bool>) {
    let quarter = Duration::from_secs(state.config.limits.idle_timeout_secs) / 4;
    loop {
        tokio::select! {
            () = tokio::time::sleep(quarter) => {}
            _ = stop.changed() => return,
        }
        let closed = state.router.sweep_idle(|| {
            CloseReason::error(
                ErrorCode::Timeout,
                "idle for too long; send pings to keep a session open",
            )
        });
        if closed > 0 {
            debug!(sessions = closed, "closed idle sessions");
        }
    }
}

async fn accept_loop(
    state: Arc<NodeState>,
    mut listener: Box<dyn Listener>,
    mut stop: watch::Receiver<bool>,
) -> JoinSet<()> {
    let mut sessions = JoinSet::new();
    let pending = Arc::new(Semaphore::new(state.config.limits.pending_handshakes));
    loop {
        let incoming = tokio::select! {
            _ = stop.changed() => break,
            r = listener.accept() => r,
            // Reap finished sessions so the set does not grow with history.
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
        };
        let incoming = match incoming {
            Ok(i) => i,
            Err(e) => {
                // Usually EMFILE or a reset during accept; back off briefly, keep serving.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        state.metrics.connections.inc();
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            state.metrics.refuse("too_many_handshakes");
            continue;
        };
        let state = state.clone();
        // Boxed: a task's memory is rounded up to 128 bytes (tokio aligns it to a cache line,
        // which the allocator pays for too); the session's state in a box of its own costs
        // what it is, plus a small task, for as long as the session lives.
        sessions.spawn(Box::pin(session::serve(state, incoming, permit)));
    }
    sessions
}

async fn start_admin(
    state: Arc<NodeState>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    use axum::http::{StatusCode, header};
    use axum::routing::get;

    let addr = state.config.admin_listen.clone();
    let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            "; another program is using that port: choose another with `admin_listen` in the \
             config file or SYNCRA_ADMIN_LISTEN=127.0.0.1:PORT (empty turns it off)"
        } else {
            ""
        };
        anyhow::anyhow!("admin endpoint: binding {addr}: {e}{hint}")
    })?;
    let local = listener.local_addr()?;
    let health_state = state.clone();
    let app = axum::Router::new()
        .route(
            "/healthz",
            get(move || {
                let state = health_state.clone();
                async move {
                    let report = health(&state).await;
                    let code = if report.status == "ok" {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (code, axum::Json(report))
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let state = state.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        state.metrics.render(),
                    )
                }
            }),
        );
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        });
        if let Err(e) = serve.await {
            warn!("admin endpoint stopped: {e}");
        }
    });
    Ok((local, task))
}

/// The configured identity store, created through the registry.
async fn open_store(
    registry: &PluginRegistry,
    config: &RelayConfig,
) -> anyhow::Result<Arc<dyn IdentityStore>> {
    registry
        .stores
        .create(config.store_section(), ())
        .await
        .with_context(|| {
            format!(
                "opening the identity store ([store] in {})",
                config.describe_source()
            )
        })
}

/// Deletes a user by handle or user id from the configured identity store; returns its id.
/// Deleting revokes its resume tokens: they name the user's registration generation, which a
/// deleted user no longer has.
pub async fn delete_user(config: &RelayConfig, who: &str) -> anyhow::Result<syncra_core::UserId> {
    let store = open_store(&plugin_registry()?, config).await?;
    let id = match who.parse::<syncra_core::UserId>() {
        Ok(id) => id,
        Err(_) => {
            let handle = syncra_core::Handle::parse(who)
                .map_err(|e| anyhow::anyhow!("{who:?} is neither a user id nor a handle: {e}"))?;
            store
                .by_handle(&handle)
                .await?
                .with_context(|| format!("nobody is registered as {:?}", handle.as_str()))?
                .user_id
        }
    };
    if !store.delete(&id).await? {
        anyhow::bail!("user {id} is not registered");
    }
    Ok(id)
}

/// Runs the identity store's migrations alone (`syncra-relay migrate`).
pub async fn migrate(config: &RelayConfig) -> anyhow::Result<()> {
    let section = config.store_section();
    match section.get("kind").and_then(|k| k.as_str()) {
        #[cfg(feature = "store-postgres")]
        Some("postgres") => {
            let mut rest = section.clone();
            if let Some(map) = rest.as_object_mut() {
                map.remove("kind");
            }
            let pg: syncra_store_postgres::PostgresConfig =
                syncra_core::registry::typed_config("store", "postgres", rest)?;
            syncra_store_postgres::migrate(&pg)
                .await
                .map_err(|e| anyhow::anyhow!("migrating the Postgres store: {e}"))?;
            println!("the Postgres identity store is migrated");
            Ok(())
        }
        Some("sqlite") => {
            create_private_dir(&config.data_dir).with_context(|| {
                format!("creating data directory {}", config.data_dir.display())
            })?;
            // Opening the store runs its embedded migrations.
            let registry = plugin_registry()?;
            registry.stores.create(section, ()).await?;
            println!("the SQLite identity store is migrated");
            Ok(())
        }
        other => anyhow::bail!("store kind {other:?} has no migrations to run here"),
    }
}

/// Runs a relay until `shutdown` completes, then drains it. Used by the binary.
pub async fn run(config: RelayConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let broker_kind = config.broker["kind"].as_str().unwrap_or("?").to_owned();
    let store = config.store_section();
    let store_kind = store["kind"].as_str().unwrap_or("?").to_owned();
    let relay = Relay::start(config).await?;
    let cfg = relay.config();
    info!(
        "syncra-relay listening on {} (relay id {:?})",
        relay.url(),
        cfg.relay_id
    );
    match relay.admin_addr() {
        Some(a) => info!("admin endpoint on http://{a} (/healthz, /metrics)"),
        None => info!("admin endpoint disabled"),
    }
    info!("data directory {}", cfg.data_dir.display());
    match store.get("path").and_then(|p| p.as_str()) {
        Some(path) => info!("identity store: {store_kind} ({path}); broker: {broker_kind}"),
        None => info!("identity store: {store_kind}; broker: {broker_kind}"),
    }
    shutdown.await;
    info!("shutting down: draining sessions");
    relay.shutdown().await?;
    info!("stopped");
    Ok(())
}

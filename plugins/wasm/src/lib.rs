//! `syncra-plugin-wasm`: the Wasmtime host that runs sandboxed WebAssembly plugins — bots and
//! client extensions (world `bot`) and relay hooks (world `relay-hook`), typed by the WIT
//! package in `plugin-sdk/wit`.
//!
//! The sandbox: a plugin gets no filesystem and no network unless its configuration grants
//! them; the linear memory of its whole store (all memories together) is capped, as are its
//! tables and instances; every call runs on a fuel budget (CPU) and under a wall-clock deadline
//! that also stops a guest sleeping or waiting in a WASI call (see `runner`). A plugin runs in a
//! small pool of long-lived instances that keep their state between calls; after a failure the
//! instance is thrown away and a fresh one made; a plugin whose calls of one kind fail
//! `max_failures` times in a row is disabled with one clear log line, and the host keeps
//! serving.
//!
//! What it must never do: give a plugin a key, a plaintext it was not addressed with, or any
//! capability its configuration did not grant; let a plugin's failure or slowness take the host
//! down or hold a caller longer than the plugin's deadline.

mod kv;
mod limits;
mod runner;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};

use kv::SharedKv;
use limits::Limiter;
use runner::{CallKind, Runner, World};

pub use kv::{KvStore, StoreKey};

mod bot_bindings {
    wasmtime::component::bindgen!({
        path: "../../plugin-sdk/wit",
        world: "bot",
        // Exports are called with `call_async`, so a deadline can stop a guest that waits in
        // WASI (see `runner`); our own imports are quick and stay synchronous.
        exports: { default: async },
        additional_derives: [PartialEq, Eq],
    });
}

mod hook_bindings {
    wasmtime::component::bindgen!({
        path: "../../plugin-sdk/wit",
        world: "relay-hook",
        exports: { default: async },
        additional_derives: [PartialEq, Eq],
    });
}

use bot_bindings::syncra::plugin::types as bt;
use hook_bindings::syncra::plugin::relay_types as ht;

/// Errors of the WASM host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WasmError {
    /// The plugin file could not be read or is not a component of the expected world.
    #[error("plugin {name:?} ({path}): {why}")]
    Load {
        /// The plugin's name.
        name: String,
        /// Its file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// The configuration is invalid.
    #[error("plugin {name:?}: {why}")]
    Config {
        /// The plugin's name.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// A call failed (trap, fuel exhausted, deadline passed, memory cap); the instance was
    /// thrown away and the next call gets a fresh one.
    #[error("plugin {name:?} failed: {why}")]
    Call {
        /// The plugin's name.
        name: String,
        /// What stopped it.
        reason: CallFailure,
        /// The same, in words.
        why: String,
    },
    /// Every instance of the plugin was busy for (part of) the caller's deadline: the call was
    /// not made, or ran in what was left and passed it. Not the plugin's failure.
    #[error(
        "plugin {name:?} is busy: all {instances} of its instances were serving other calls for \
         much or all of the call's deadline"
    )]
    Busy {
        /// The plugin's name.
        name: String,
        /// Its pool size.
        instances: u32,
    },
    /// The plugin failed too often and is disabled.
    #[error("plugin {name:?} is disabled after {failures} failures in a row")]
    Disabled {
        /// The plugin's name.
        name: String,
        /// How many.
        failures: u32,
    },
}

/// What stopped a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallFailure {
    /// It ran out of fuel (`fuel_per_call`): too much computation.
    Fuel,
    /// Its wall-clock deadline (`deadline_ms`) passed: it computed, slept or waited too long.
    Deadline,
    /// It hit its memory cap (`memory_mib`) and could not go on.
    MemoryCap,
    /// It trapped (a panic, an invalid operation) or a host call failed.
    Trap,
}

/// How a plugin is doing, for health reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct PluginHealth {
    /// Disabled after `max_failures` failures of one call kind in a row.
    pub disabled: bool,
    /// The longest current run of failures of one call kind (0 when the last call of every
    /// kind succeeded).
    pub failures: u32,
    /// The last failure, in words.
    pub last_error: Option<String>,
    /// Calls being served right now.
    pub busy: u32,
}

/// What a plugin may touch outside its sandbox.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Grants {
    /// Directories the plugin may read and write, mounted at the same path inside.
    pub dirs: Vec<PathBuf>,
    /// Outgoing network access (TCP/UDP and name lookups) to public addresses: connecting and
    /// sending only, never binding a chosen address, listening or accepting.
    pub network: bool,
    /// With `network`, also loopback, private, link-local and other non-public addresses: the
    /// host's own services (a broker, a database, the admin endpoint) and a cloud's metadata
    /// endpoint are reachable from there, so this is a grant of its own.
    pub network_local: bool,
    /// The host's stderr for the plugin's own prints (its `log` import always works).
    pub stderr: bool,
}

/// One plugin's configuration (`[[plugins]]` with `kind = "wasm"`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct WasmPluginConfig {
    /// A name for logs and commands; defaults to the file name.
    #[serde(default)]
    pub name: Option<String>,
    /// The component file.
    pub path: PathBuf,
    /// What it may touch.
    #[serde(default)]
    pub grants: Grants,
    /// Cap on the linear memory of one instance's whole store, all its memories together, in
    /// MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Fuel per call (roughly WebAssembly instructions): the CPU budget. Waiting does not burn
    /// fuel; `deadline_ms` bounds that.
    #[serde(default = "default_fuel")]
    pub fuel_per_call: u64,
    /// Wall-clock deadline of one call (and of making an instance), in milliseconds: stops a
    /// guest that computes, sleeps or waits in a WASI call for longer. Granularity 10 ms.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// How many instances may serve calls at the same time. Each has its own memory (up to
    /// `memory_mib`) and its own in-memory state; shared state belongs in the kv store.
    #[serde(default = "default_instances")]
    pub instances: u32,
    /// Consecutive failures of one call kind after which the plugin is disabled.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// Where its key-value store is kept (in memory only if absent).
    #[serde(default)]
    pub kv_file: Option<PathBuf>,
    /// The key that seals the store file (never from a config file: the client sets it from
    /// the identity's storage key). Without one the file is plaintext.
    #[serde(skip)]
    pub kv_key: Option<StoreKey>,
    /// Plugin-specific settings, passed to nobody yet (reserved for a `configure` export).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

fn default_memory_mib() -> u32 {
    64
}

fn default_fuel() -> u64 {
    // About 100 ms of guest work on this class of machine: ample for a bot, a hard stop for a
    // loop.
    200_000_000
}

fn default_deadline_ms() -> u64 {
    // Ten times the default fuel budget's worth of computing: generous for work, a hard stop
    // for a guest that sleeps or waits on the network.
    1_000
}

fn default_instances() -> u32 {
    // A bot answers one message at a time and keeps its state in one instance.
    1
}

fn default_max_failures() -> u32 {
    3
}

impl WasmPluginConfig {
    /// A config for a file with defaults.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        WasmPluginConfig {
            name: None,
            path: path.into(),
            grants: Grants::default(),
            memory_mib: default_memory_mib(),
            fuel_per_call: default_fuel(),
            deadline_ms: default_deadline_ms(),
            instances: default_instances(),
            max_failures: default_max_failures(),
            kv_file: None,
            kv_key: None,
            config: BTreeMap::new(),
        }
    }

    /// The plugin's name.
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "plugin".into())
        })
    }
}

/// The shared Wasmtime engine (compilation settings, cache). One per process.
#[derive(Clone)]
pub struct WasmHost {
    engine: Engine,
}

impl std::fmt::Debug for WasmHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WasmHost")
    }
}

impl WasmHost {
    /// An engine with fuel metering and epoch interruption on, and a thread that advances the
    /// epoch every 10 ms for as long as the engine lives (it ends when the last `WasmHost`
    /// clone is dropped).
    pub fn new() -> Result<Self, WasmError> {
        let mut config = Config::new();
        config.consume_fuel(true);
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        // 64-bit memories and tables are of no use to a plugin built for wasm32-wasip2, and a
        // 64-bit table lets `table.grow` overflow, a path the limiter must not be the only
        // guard of.
        config.wasm_memory64(false);
        // Compiled code is cached on disk (wasmtime's default cache directory), so a large
        // component compiles once per machine, not once per start. Without a usable cache
        // directory it simply compiles every time.
        if let Ok(cache) = wasmtime::Cache::from_file(None) {
            config.cache(Some(cache));
        }
        let engine = Engine::new(&config).map_err(|e| WasmError::Config {
            name: "engine".into(),
            why: e.to_string(),
        })?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                // A ticking clock, not a wait for readiness: every deadline is counted in ticks.
                loop {
                    std::thread::sleep(runner::EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|e| WasmError::Config {
                name: "engine".into(),
                why: format!("starting the epoch thread: {e}"),
            })?;
        Ok(WasmHost { engine })
    }
}

/// Per-instance state: WASI (with only the granted capabilities), limits, the kv store.
struct HostState {
    name: String,
    wasi: WasiCtx,
    table: ResourceTable,
    limits: Limiter,
    kv: Arc<SharedKv>,
    log: LogBudget,
}

/// Log lines a plugin instance may write in a burst, and then per second: a host call costs
/// the guest no fuel, so without a budget one call could write the disk full before its
/// deadline. What is over budget is counted and said in the next line that is written.
const LOG_BURST: f64 = 100.0;
const LOG_PER_SECOND: f64 = 10.0;

/// A token bucket of log lines.
#[derive(Debug)]
struct LogBudget {
    tokens: f64,
    last: std::time::Instant,
    suppressed: u64,
}

impl LogBudget {
    fn new() -> Self {
        LogBudget {
            tokens: LOG_BURST,
            last: std::time::Instant::now(),
            suppressed: 0,
        }
    }

    /// Whether a line may be written at `now`, and how many were suppressed before it.
    fn allow(&mut self, now: std::time::Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * LOG_PER_SECOND).min(LOG_BURST);
        if self.tokens < 1.0 {
            self.suppressed += 1;
            return None;
        }
        self.tokens -= 1.0;
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// What a plugin's log message becomes in the host's log: cut at 1 000 characters, with every
/// control, line break and bidi override written as a visible escape (plugin output is
/// untrusted: it must neither forge log lines nor reach a terminal raw).
fn log_text(message: &str, suppressed: u64) -> String {
    let cut: String = message.chars().take(1000).collect();
    let text = syncra_core::text::escape_untrusted(&cut).into_owned();
    if suppressed > 0 {
        format!(
            "{text} ({suppressed} earlier lines of this plugin were over its log budget and not written)"
        )
    } else {
        text
    }
}

fn log_line(name: &str, level: &str, message: &str, budget: &mut LogBudget) {
    let Some(suppressed) = budget.allow(std::time::Instant::now()) else {
        return;
    };
    let m = log_text(message, suppressed);
    match level {
        "error" => tracing::error!(plugin = name, "{m}"),
        "warn" => tracing::warn!(plugin = name, "{m}"),
        "debug" => tracing::debug!(plugin = name, "{m}"),
        _ => tracing::info!(plugin = name, "{m}"),
    }
}

macro_rules! host_impl {
    ($module:ident) => {
        impl $module::syncra::plugin::host::Host for HostState {
            fn log(&mut self, level: $module::syncra::plugin::types::Level, message: String) {
                use $module::syncra::plugin::types::Level;
                let level = match level {
                    Level::Debug => "debug",
                    Level::Info => "info",
                    Level::Warn => "warn",
                    Level::Error => "error",
                };
                log_line(&self.name, level, &message, &mut self.log);
            }

            fn now_ms(&mut self) -> u64 {
                syncra_core::now_ms()
            }

            fn kv_get(&mut self, key: String) -> Option<Vec<u8>> {
                self.kv.lock().get(&key)
            }

            // Changes the map only; the runner writes the store once after the call (`kv`).
            fn kv_set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
                self.kv.lock().set(key, value)
            }

            fn kv_delete(&mut self, key: String) {
                self.kv.lock().delete(&key)
            }
        }

        impl $module::syncra::plugin::types::Host for HostState {}
    };
}

host_impl!(bot_bindings);
host_impl!(hook_bindings);
impl hook_bindings::syncra::plugin::relay_types::Host for HostState {}

/// Whether a plugin granted the network may use `addr` so: connect and send to public
/// addresses (or, with `local`, to any), bind only the ephemeral wildcard (what a connection or
/// a datagram binds implicitly), never listen or accept.
fn socket_allowed(
    addr: std::net::SocketAddr,
    used: wasmtime_wasi::sockets::SocketAddrUse,
    local: bool,
) -> bool {
    use wasmtime_wasi::sockets::SocketAddrUse;
    match used {
        SocketAddrUse::TcpBind | SocketAddrUse::UdpBind => {
            addr.ip().is_unspecified() && addr.port() == 0
        }
        SocketAddrUse::TcpListen | SocketAddrUse::TcpAccept => false,
        SocketAddrUse::TcpConnect | SocketAddrUse::UdpSend | SocketAddrUse::UdpReceive => {
            local || is_public(addr.ip())
        }
    }
}

/// Whether `ip` is an address on the internet rather than this host, its networks or a
/// special range (loopback, private, shared, link-local, unique-local, multicast,
/// documentation, unspecified; an IPv4-mapped IPv6 address as its IPv4 address).
fn is_public(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 192 && b == 0) // IETF protocol assignments
                || a >= 240) // reserved
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let [first, second, ..] = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first == 0x2001 && second == 0xdb8) // documentation
                // NAT64 (64:ff9b::/96, 64:ff9b:1::/48) and 6to4 (2002::/16) carry an IPv4
                // address, which may be a private one: refused rather than decoded.
                || (first == 0x64 && (second == 0xff9b))
                || first == 0x2002)
        }
    }
}

/// Resources (pollables, streams, sockets) one plugin instance may hold at once.
pub(crate) const MAX_RESOURCES: usize = 4096;
/// Bytes of randomness one `get-random-bytes` call may ask for: the host allocates them, and
/// WASI's default (64 MiB) is more than a plugin's whole memory cap.
pub(crate) const MAX_RANDOM_BYTES: u64 = 64 * 1024;

fn build_wasi(name: &str, grants: &Grants) -> Result<WasiCtx, WasmError> {
    let mut b = WasiCtx::builder();
    b.max_random_size(MAX_RANDOM_BYTES);
    // Nothing is inherited: no environment, no arguments, no stdin. Network only if granted.
    b.allow_tcp(grants.network)
        .allow_udp(grants.network)
        .allow_ip_name_lookup(grants.network);
    if grants.network {
        b.inherit_network();
        let local = grants.network_local;
        b.socket_addr_check(move |addr, used| {
            let allowed = socket_allowed(addr, used, local);
            Box::pin(async move { allowed })
        });
    }
    if grants.stderr {
        b.inherit_stderr();
    }
    for dir in &grants.dirs {
        let guest = dir.to_string_lossy().into_owned();
        b.preopened_dir(dir, &guest, FsPerms::ReadWrite)
            .map_err(|e| WasmError::Config {
                name: name.to_owned(),
                why: format!("granting {}: {e}", dir.display()),
            })?;
    }
    Ok(b.build())
}

/// A message for a bot, as the host opened it.
pub type BotMessage = bt::Message;
/// What a bot asks the host to do.
pub type BotAction = bt::Action;
/// A command a plugin offers.
pub type BotCommand = bt::CommandInfo;
/// Envelope metadata for a relay hook.
pub type EnvelopeMeta = ht::EnvelopeMeta;
/// Session metadata for a relay hook.
pub type ConnectInfo = ht::ConnectInfo;
/// A relay hook's answer.
pub type Verdict = ht::Verdict;

impl World for bot_bindings::Bot {
    fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
        bot_bindings::Bot::add_to_linker::<_, wasmtime::component::HasSelf<_>>(linker, |s| s)
    }

    fn instantiate(
        store: &mut Store<HostState>,
        component: &Component,
        linker: &Linker<HostState>,
    ) -> impl Future<Output = wasmtime::Result<Self>> {
        bot_bindings::Bot::instantiate_async(store, component, linker)
    }
}

impl World for hook_bindings::RelayHook {
    fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
        hook_bindings::RelayHook::add_to_linker::<_, wasmtime::component::HasSelf<_>>(linker, |s| s)
    }

    fn instantiate(
        store: &mut Store<HostState>,
        component: &Component,
        linker: &Linker<HostState>,
    ) -> impl Future<Output = wasmtime::Result<Self>> {
        hook_bindings::RelayHook::instantiate_async(store, component, linker)
    }
}

/// What a bot and a relay hook have alike: loading (instantiated once, so a component of the
/// wrong world fails at load, not at its first call), its name, its health, `Debug`.
macro_rules! plugin_basics {
    ($plugin:ident) => {
        impl std::fmt::Debug for $plugin {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({})", stringify!($plugin), self.runner.name)
            }
        }

        impl $plugin {
            /// Loads and checks the component.
            pub fn load(host: &WasmHost, config: WasmPluginConfig) -> Result<Self, WasmError> {
                Ok($plugin {
                    runner: Runner::load(host, config)?,
                })
            }

            /// The plugin's name.
            pub fn name(&self) -> &str {
                &self.runner.name
            }

            /// Whether it was disabled after repeated failures.
            pub fn is_disabled(&self) -> bool {
                self.runner.health().disabled
            }

            /// How it is doing.
            pub fn health(&self) -> PluginHealth {
                self.runner.health()
            }

            /// How many times its key-value store was written to its file: at most once per
            /// call, however many keys the call set.
            pub fn store_writes(&self) -> u64 {
                self.runner.store_writes()
            }
        }
    };
}

/// A bot or client extension (world `bot`).
///
/// Its calls block the calling thread until the guest answers or its deadline passes: make them
/// from a blocking thread (`tokio::task::spawn_blocking`), never from async code.
pub struct BotPlugin {
    runner: Runner<bot_bindings::Bot>,
}

plugin_basics!(BotPlugin);

impl BotPlugin {
    /// The commands it offers.
    pub fn commands(&self) -> Result<Vec<BotCommand>, WasmError> {
        self.runner.call(CallKind::Commands, async |store, bot| {
            bot.syncra_plugin_handler().call_commands(store).await
        })
    }

    /// A message for the bot.
    pub fn on_message(&self, msg: &BotMessage) -> Result<Vec<BotAction>, WasmError> {
        self.runner.call(CallKind::OnMessage, async |store, bot| {
            bot.syncra_plugin_handler()
                .call_on_message(store, msg)
                .await
        })
    }

    /// The person ran one of its commands in `conversation`.
    pub fn on_command(
        &self,
        name: &str,
        args: &str,
        conversation: &str,
    ) -> Result<Vec<BotAction>, WasmError> {
        self.runner.call(CallKind::OnCommand, async |store, bot| {
            bot.syncra_plugin_handler()
                .call_on_command(store, name, args, conversation)
                .await
        })
    }
}

/// A relay hook (world `relay-hook`). Calls may come from several threads at once; each runs
/// in one of the plugin's `instances`. Like a bot's, its calls block until the guest answers or
/// its deadline passes: make them from a blocking thread, never from async code.
pub struct HookPlugin {
    runner: Runner<hook_bindings::RelayHook>,
}

plugin_basics!(HookPlugin);

impl HookPlugin {
    /// A session authenticated.
    pub fn on_connect(&self, info: &ConnectInfo) -> Result<Verdict, WasmError> {
        self.runner.call(CallKind::OnConnect, async |store, hook| {
            hook.syncra_plugin_hook().call_on_connect(store, info).await
        })
    }

    /// An envelope is about to be routed.
    pub fn on_envelope(&self, meta: &EnvelopeMeta) -> Result<Verdict, WasmError> {
        self.runner.call(CallKind::OnEnvelope, async |store, hook| {
            hook.syncra_plugin_hook()
                .call_on_envelope(store, meta)
                .await
        })
    }
}

/// Resolves a relative plugin path against the directory of the config that named it.
pub fn resolve_path(base: Option<&Path>, path: &Path) -> PathBuf {
    match base {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the network granted, a plugin connects and sends to public addresses only (the
    /// host's own services and a cloud's metadata endpoint need `network_local`), binds only
    /// the ephemeral wildcard, and never listens or accepts.
    #[test]
    fn the_network_grant_reaches_public_addresses_only() {
        use wasmtime_wasi::sockets::SocketAddrUse as U;
        let at = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        for public in [
            "1.1.1.1:443",
            "[2606:4700::1111]:443",
            "[::ffff:8.8.8.8]:53",
        ] {
            assert!(socket_allowed(at(public), U::TcpConnect, false), "{public}");
            assert!(socket_allowed(at(public), U::UdpSend, false), "{public}");
        }
        for local in [
            "127.0.0.1:6379",
            "10.1.2.3:4222",
            "172.16.0.1:5432",
            "192.168.1.1:80",
            "169.254.169.254:80",
            "100.64.0.1:80",
            "0.0.0.0:80",
            "224.0.0.1:5353",
            "255.255.255.255:9",
            "[::1]:7444",
            "[fe80::1]:80",
            "[fd00::1]:80",
            "[::ffff:127.0.0.1]:6379",
            "[::]:80",
            "[64:ff9b::a00:1]:80",
            "[64:ff9b:1::a00:1]:80",
            "[2002:a00:1::1]:80",
        ] {
            assert!(!socket_allowed(at(local), U::TcpConnect, false), "{local}");
            assert!(!socket_allowed(at(local), U::UdpSend, false), "{local}");
            assert!(socket_allowed(at(local), U::TcpConnect, true), "{local}");
        }
        assert!(socket_allowed(at("0.0.0.0:0"), U::TcpBind, false));
        assert!(socket_allowed(at("[::]:0"), U::UdpBind, false));
        assert!(!socket_allowed(at("0.0.0.0:8080"), U::TcpBind, true));
        assert!(!socket_allowed(at("127.0.0.1:0"), U::UdpBind, true));
        assert!(!socket_allowed(at("0.0.0.0:0"), U::TcpListen, true));
        assert!(!socket_allowed(at("1.1.1.1:1234"), U::TcpAccept, true));
    }

    /// A plugin writes at most a burst of lines and then ten a second, and the next line it
    /// may write says how many were not; every line is escaped and cut.
    #[test]
    fn plugin_log_lines_are_budgeted_escaped_and_cut() {
        let start = std::time::Instant::now();
        let mut budget = LogBudget::new();
        let written = (0..10_000)
            .filter(|_| budget.allow(start).is_some())
            .count();
        assert_eq!(written, LOG_BURST as usize);
        let later = start + std::time::Duration::from_millis(1000);
        assert_eq!(budget.allow(later), Some(10_000 - LOG_BURST as u64));
        assert_eq!(budget.allow(later), Some(0));
        let text = log_text("a\nforged: line\u{1b}[2J\u{202e}", 3);
        assert!(
            !text.chars().any(syncra_core::text::is_unsafe_char),
            "{text}"
        );
        assert!(
            text.starts_with("a\\nforged: line\\u{1b}[2J\\u{202e} (3 earlier"),
            "{text}"
        );
        assert_eq!(log_text(&"x".repeat(5000), 0).len(), 1000);
    }

    /// 64-bit memories and tables are refused when a plugin is compiled: a 64-bit table let
    /// `table.grow` by an amount that overflows reach the limiter as a failure report without
    /// a request before it (see `limits.rs`).
    #[test]
    fn sixty_four_bit_memories_and_tables_are_refused() {
        let host = WasmHost::new().unwrap();
        for wat in ["(module (memory i64 1))", "(module (table i64 1 funcref))"] {
            assert!(
                wasmtime::Module::new(&host.engine, wat).is_err(),
                "{wat} compiled"
            );
        }
        assert!(
            wasmtime::Module::new(&host.engine, "(module (memory 1) (table 1 funcref))").is_ok()
        );
    }
}

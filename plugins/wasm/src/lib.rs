//! `syncra-plugin-wasm`: the Wasmtime host that runs sandboxed WebAssembly plugins — bots and
//! client extensions (world `bot`) and relay hooks (world `relay-hook`), typed by the WIT
//! package in `plugin-sdk/wit`.
//!
//! The sandbox: a plugin gets no filesystem and no network unless its configuration grants
//! them; its linear memory is capped; every call runs on a fuel budget, so an infinite loop ends
//! in a trap instead of a hung host. One long-lived instance per plugin keeps its state between
//! calls; after a trap the instance is thrown away and a fresh one made; a plugin that fails
//! `max_failures` times in a row is disabled with one clear log line, and the host keeps serving.
//!
//! What it must never do: give a plugin a key, a plaintext it was not addressed with, or any
//! capability its configuration did not grant; let a plugin's failure take the host down.

mod kv;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};

pub use kv::KvStore;

mod bot_bindings {
    wasmtime::component::bindgen!({
        path: "../../plugin-sdk/wit",
        world: "bot",
        additional_derives: [PartialEq, Eq],
    });
}

mod hook_bindings {
    wasmtime::component::bindgen!({
        path: "../../plugin-sdk/wit",
        world: "relay-hook",
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
    /// A call failed (trap, fuel exhausted, memory cap); the instance was restarted.
    #[error("plugin {name:?} failed: {why}")]
    Call {
        /// The plugin's name.
        name: String,
        /// The trap.
        why: String,
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

/// What a plugin may touch outside its sandbox.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Grants {
    /// Directories the plugin may read and write, mounted at the same path inside.
    pub dirs: Vec<PathBuf>,
    /// Outgoing network access (TCP/UDP and name lookups).
    pub network: bool,
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
    /// Linear memory cap in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Fuel per call (roughly WebAssembly instructions): the time budget.
    #[serde(default = "default_fuel")]
    pub fuel_per_call: u64,
    /// Consecutive failures after which the plugin is disabled.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// Where its key-value store is kept (in memory only if absent).
    #[serde(default)]
    pub kv_file: Option<PathBuf>,
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
            max_failures: default_max_failures(),
            kv_file: None,
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
    /// An engine with fuel metering on.
    pub fn new() -> Result<Self, WasmError> {
        let mut config = Config::new();
        config.consume_fuel(true);
        config.wasm_component_model(true);
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
        Ok(WasmHost { engine })
    }
}

/// Per-instance state: WASI (with only the granted capabilities), limits, the kv store.
struct HostState {
    name: String,
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    kv: Arc<Mutex<KvStore>>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn log_line(name: &str, level: &str, message: &str) {
    // Plugin output is untrusted: cut it and never let it forge extra log lines.
    let mut m: String = message.chars().take(1000).collect();
    m.retain(|c| c != '\n' && c != '\r');
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
                log_line(&self.name, level, &message);
            }

            fn now_ms(&mut self) -> u64 {
                syncra_core::now_ms()
            }

            fn kv_get(&mut self, key: String) -> Option<Vec<u8>> {
                self.kv.lock().unwrap_or_else(|e| e.into_inner()).get(&key)
            }

            fn kv_set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
                self.kv
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .set(key, value)
            }

            fn kv_delete(&mut self, key: String) {
                self.kv
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .delete(&key)
            }
        }

        impl $module::syncra::plugin::types::Host for HostState {}
    };
}

host_impl!(bot_bindings);
host_impl!(hook_bindings);
impl hook_bindings::syncra::plugin::relay_types::Host for HostState {}

fn build_wasi(name: &str, grants: &Grants) -> Result<WasiCtx, WasmError> {
    let mut b = WasiCtx::builder();
    // Nothing is inherited: no environment, no arguments, no stdin. Network only if granted.
    b.allow_tcp(grants.network)
        .allow_udp(grants.network)
        .allow_ip_name_lookup(grants.network);
    if grants.network {
        b.inherit_network();
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

/// The common machinery of both worlds: load, instantiate, call with budget, restart on trap,
/// disable after repeated failures.
struct Runner<I> {
    name: String,
    config: WasmPluginConfig,
    engine: Engine,
    linker: Linker<HostState>,
    component: Component,
    kv: Arc<Mutex<KvStore>>,
    live: Option<(Store<HostState>, I)>,
    failures: u32,
    disabled: bool,
}

type Instantiate<I> =
    fn(&mut Store<HostState>, &Component, &Linker<HostState>) -> wasmtime::Result<I>;

impl<I> Runner<I> {
    fn load(
        host: &WasmHost,
        config: WasmPluginConfig,
        add_world: fn(&mut Linker<HostState>) -> wasmtime::Result<()>,
    ) -> Result<Self, WasmError> {
        let name = config.name();
        let load_err = |why: String| WasmError::Load {
            name: name.clone(),
            path: config.path.clone(),
            why,
        };
        if config.memory_mib == 0 || config.fuel_per_call == 0 {
            return Err(WasmError::Config {
                name,
                why: "memory_mib and fuel_per_call must be above 0".into(),
            });
        }
        let bytes = std::fs::read(&config.path).map_err(|e| load_err(e.to_string()))?;
        let component = Component::new(&host.engine, &bytes)
            .map_err(|e| load_err(format!("not a WebAssembly component: {e}")))?;
        let mut linker = Linker::new(&host.engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| load_err(e.to_string()))?;
        add_world(&mut linker).map_err(|e| load_err(e.to_string()))?;
        let kv = Arc::new(Mutex::new(
            KvStore::open(config.kv_file.as_deref()).map_err(|e| load_err(e.to_string()))?,
        ));
        Ok(Runner {
            name,
            config,
            engine: host.engine.clone(),
            linker,
            component,
            kv,
            live: None,
            failures: 0,
            disabled: false,
        })
    }

    fn fresh(&mut self, instantiate: Instantiate<I>) -> Result<(Store<HostState>, I), WasmError> {
        let wasi = build_wasi(&self.name, &self.config.grants)?;
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.config.memory_mib as usize * 1024 * 1024)
            // Interpreted guests (Python) are made of several core instances and memories.
            .instances(64)
            .tables(64)
            .memories(16)
            .build();
        let mut store = Store::new(
            &self.engine,
            HostState {
                name: self.name.clone(),
                wasi,
                table: ResourceTable::new(),
                limits,
                kv: self.kv.clone(),
            },
        );
        store.limiter(|s| &mut s.limits);
        store
            .set_fuel(self.config.fuel_per_call)
            .map_err(|e| self.call_err(e.to_string()))?;
        let instance = instantiate(&mut store, &self.component, &self.linker).map_err(|e| {
            WasmError::Load {
                name: self.name.clone(),
                path: self.config.path.clone(),
                why: format!("instantiating: {e:#}"),
            }
        })?;
        Ok((store, instance))
    }

    fn call_err(&self, why: String) -> WasmError {
        WasmError::Call {
            name: self.name.clone(),
            why,
        }
    }

    /// Runs `f` against the live instance with a fresh fuel budget. A failure discards the
    /// instance (the next call gets a new one) and counts towards disabling.
    fn call<R>(
        &mut self,
        instantiate: Instantiate<I>,
        f: impl FnOnce(&mut Store<HostState>, &I) -> wasmtime::Result<R>,
    ) -> Result<R, WasmError> {
        if self.disabled {
            return Err(WasmError::Disabled {
                name: self.name.clone(),
                failures: self.failures,
            });
        }
        if self.live.is_none() {
            match self.fresh(instantiate) {
                Ok(live) => self.live = Some(live),
                Err(e) => return Err(self.failed(e)),
            }
        }
        let Some((store, instance)) = self.live.as_mut() else {
            return Err(self.call_err("no instance".into()));
        };
        if let Err(e) = store.set_fuel(self.config.fuel_per_call) {
            return Err(self.call_err(e.to_string()));
        }
        match f(store, instance) {
            Ok(r) => {
                self.failures = 0;
                Ok(r)
            }
            Err(e) => {
                self.live = None;
                let why = describe_trap(&e);
                let err = self.call_err(why);
                Err(self.failed(err))
            }
        }
    }

    fn failed(&mut self, err: WasmError) -> WasmError {
        self.failures += 1;
        if self.failures >= self.config.max_failures {
            self.disabled = true;
            tracing::error!(
                plugin = %self.name,
                failures = self.failures,
                "plugin disabled after {} failures in a row (last: {err}); the host keeps serving without it",
                self.failures
            );
        } else {
            tracing::warn!(plugin = %self.name, "{err}; restarting it");
        }
        err
    }
}

fn describe_trap(e: &wasmtime::Error) -> String {
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        return match trap {
            wasmtime::Trap::OutOfFuel => "ran out of its time budget (fuel) and was stopped".into(),
            other => format!("trapped: {other}"),
        };
    }
    format!("{e:#}")
        .lines()
        .next()
        .unwrap_or("failed")
        .to_owned()
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

/// A bot or client extension (world `bot`).
pub struct BotPlugin {
    runner: Mutex<Runner<bot_bindings::Bot>>,
    name: String,
}

impl std::fmt::Debug for BotPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BotPlugin({})", self.name)
    }
}

fn instantiate_bot(
    store: &mut Store<HostState>,
    component: &Component,
    linker: &Linker<HostState>,
) -> wasmtime::Result<bot_bindings::Bot> {
    bot_bindings::Bot::instantiate(store, component, linker)
}

fn add_bot(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    bot_bindings::Bot::add_to_linker::<_, wasmtime::component::HasSelf<_>>(linker, |s| s)
}

impl BotPlugin {
    /// Loads and checks a bot component.
    pub fn load(host: &WasmHost, config: WasmPluginConfig) -> Result<Self, WasmError> {
        let name = config.name();
        let mut runner = Runner::load(host, config, add_bot)?;
        // Instantiate once now, so a component of the wrong world fails at start, not later.
        let live = runner.fresh(instantiate_bot)?;
        runner.live = Some(live);
        Ok(BotPlugin {
            runner: Mutex::new(runner),
            name,
        })
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn runner(&self) -> std::sync::MutexGuard<'_, Runner<bot_bindings::Bot>> {
        self.runner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether it was disabled after repeated failures.
    pub fn is_disabled(&self) -> bool {
        self.runner().disabled
    }

    /// The commands it offers.
    pub fn commands(&self) -> Result<Vec<BotCommand>, WasmError> {
        self.runner().call(instantiate_bot, |store, bot| {
            bot.syncra_plugin_handler().call_commands(store)
        })
    }

    /// A message for the bot.
    pub fn on_message(&self, msg: &BotMessage) -> Result<Vec<BotAction>, WasmError> {
        self.runner().call(instantiate_bot, |store, bot| {
            bot.syncra_plugin_handler().call_on_message(store, msg)
        })
    }

    /// The person ran one of its commands in `conversation`.
    pub fn on_command(
        &self,
        name: &str,
        args: &str,
        conversation: &str,
    ) -> Result<Vec<BotAction>, WasmError> {
        self.runner().call(instantiate_bot, |store, bot| {
            bot.syncra_plugin_handler()
                .call_on_command(store, name, args, conversation)
        })
    }
}

/// A relay hook (world `relay-hook`).
pub struct HookPlugin {
    runner: Mutex<Runner<hook_bindings::RelayHook>>,
    name: String,
}

impl std::fmt::Debug for HookPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HookPlugin({})", self.name)
    }
}

fn instantiate_hook(
    store: &mut Store<HostState>,
    component: &Component,
    linker: &Linker<HostState>,
) -> wasmtime::Result<hook_bindings::RelayHook> {
    hook_bindings::RelayHook::instantiate(store, component, linker)
}

fn add_hook(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    hook_bindings::RelayHook::add_to_linker::<_, wasmtime::component::HasSelf<_>>(linker, |s| s)
}

impl HookPlugin {
    /// Loads and checks a relay-hook component.
    pub fn load(host: &WasmHost, config: WasmPluginConfig) -> Result<Self, WasmError> {
        let name = config.name();
        let mut runner = Runner::load(host, config, add_hook)?;
        let live = runner.fresh(instantiate_hook)?;
        runner.live = Some(live);
        Ok(HookPlugin {
            runner: Mutex::new(runner),
            name,
        })
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn runner(&self) -> std::sync::MutexGuard<'_, Runner<hook_bindings::RelayHook>> {
        self.runner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether it was disabled after repeated failures.
    pub fn is_disabled(&self) -> bool {
        self.runner().disabled
    }

    /// A session authenticated.
    pub fn on_connect(&self, info: &ConnectInfo) -> Result<Verdict, WasmError> {
        self.runner().call(instantiate_hook, |store, hook| {
            hook.syncra_plugin_hook().call_on_connect(store, info)
        })
    }

    /// An envelope is about to be routed.
    pub fn on_envelope(&self, meta: &EnvelopeMeta) -> Result<Verdict, WasmError> {
        self.runner().call(instantiate_hook, |store, hook| {
            hook.syncra_plugin_hook().call_on_envelope(store, meta)
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

//! The machinery both worlds share: a small pool of instances per plugin, each call run with a
//! fuel budget and a wall-clock deadline, a failed instance thrown away (the next call gets a
//! fresh one), failures counted per call kind, and the plugin disabled when one kind fails
//! `max_failures` times in a row.
//!
//! # How a call is bounded
//!
//! Two limits, because they stop different things. Fuel counts WebAssembly instructions, so it
//! stops a guest that computes too long, deterministically, whatever the machine's speed; it
//! does not move while the guest waits inside a host call. The deadline is wall-clock time and
//! stops everything else: epoch interruption (the engine's epoch ticks every [`EPOCH_TICK`], and
//! each store traps once its deadline in ticks has passed) stops guest code, and a
//! `tokio::time::timeout_at` around the call stops a guest blocked in an asynchronous host call —
//! a WASI `poll` on a `subscribe-duration` pollable (`std::thread::sleep`), a socket read. The
//! WASI imports are linked asynchronously for exactly this: the synchronous bindings block their
//! thread inside `block_on`, where neither an epoch nor a timeout can reach them. When the
//! timeout fires, the call's future is dropped, which unwinds the guest's fiber; the store is
//! then thrown away like after any failure.
//!
//! The deadline is the caller's: it starts when the call is asked for, and waiting for a free
//! instance, making a fresh one and the call itself all spend the same one, so a caller is held
//! for one deadline (by a guest that computes, up to two epoch ticks more), never one per step.
//! A caller that finds no time left before the guest would run gets [`WasmError::Busy`], which
//! is not the plugin's failure; a guest that runs and passes what is left is stopped, and
//! counted like any other unless its caller had waited more than half the deadline for an
//! instance (then it is `Busy` too: see `Runner::shortened`).
//!
//! # Why a pool
//!
//! An instance serves one call at a time. With one instance, one slow call (up to its deadline)
//! would hold up every other caller; with `instances` of them, that many calls run at once and a
//! caller waits for a free one within its deadline, then gets [`WasmError::Busy`].
//! Instances are made on demand and reused most-recent-first, so a lightly used plugin runs in
//! one instance and keeps its in-memory state; state that must be shared by all instances
//! belongs in the plugin's key-value store.

use std::future::Future;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};

use crate::kv::SharedKv;
use crate::limits::Limiter;
use crate::{CallFailure, HostState, KvStore, PluginHealth, WasmError, WasmHost, WasmPluginConfig};

/// How often the engine's epoch advances: the granularity of every deadline.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(10);

/// One world's glue: how to link its imports and instantiate it.
pub(crate) trait World: Sized + Send + Sync + 'static {
    fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()>;
    fn instantiate(
        store: &mut Store<HostState>,
        component: &Component,
        linker: &Linker<HostState>,
    ) -> impl Future<Output = wasmtime::Result<Self>>;
}

/// Which export a call went to. Failures are counted per kind, so a plugin whose `on-envelope`
/// always fails is disabled even though its `on-connect` keeps succeeding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CallKind {
    Commands,
    OnMessage,
    OnCommand,
    OnConnect,
    OnEnvelope,
}

impl CallKind {
    const COUNT: usize = 5;

    fn index(self) -> usize {
        self as usize
    }
}

/// Consecutive failures per call kind, and whether the plugin is disabled.
#[derive(Debug, Default)]
pub(crate) struct Failures {
    in_a_row: [u32; CallKind::COUNT],
    disabled: bool,
    last_error: Option<String>,
}

impl Failures {
    /// A call of `kind` succeeded: only that kind's count starts again.
    pub(crate) fn succeeded(&mut self, kind: CallKind) {
        self.in_a_row[kind.index()] = 0;
    }

    /// A call of `kind` failed; returns whether this disabled the plugin.
    pub(crate) fn failed(&mut self, kind: CallKind, max: u32, why: &str) -> bool {
        let count = &mut self.in_a_row[kind.index()];
        *count = count.saturating_add(1);
        self.last_error = Some(why.to_owned());
        let disable = !self.disabled && *count >= max;
        self.disabled |= disable;
        disable
    }

    /// The longest run of failures of any kind.
    pub(crate) fn worst(&self) -> u32 {
        self.in_a_row.iter().copied().max().unwrap_or(0)
    }

    pub(crate) fn is_disabled(&self) -> bool {
        self.disabled
    }
}

/// A live instance and its store.
struct Live<W> {
    store: Store<HostState>,
    instance: W,
}

/// The pool: idle instances, and how many are out serving a call.
struct Pool<W> {
    idle: Vec<Live<W>>,
    busy: usize,
}

pub(crate) struct Runner<W> {
    pub(crate) name: String,
    config: WasmPluginConfig,
    engine: Engine,
    linker: Linker<HostState>,
    component: Component,
    kv: Arc<SharedKv>,
    pool: Mutex<Pool<W>>,
    freed: Condvar,
    failures: Mutex<Failures>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<W: World> Runner<W> {
    /// Compiles the component and instantiates it once, so a component of the wrong world
    /// fails at load, not at its first call.
    pub(crate) fn load(host: &WasmHost, config: WasmPluginConfig) -> Result<Self, WasmError> {
        let name = config.name();
        let load_err = |why: String| WasmError::Load {
            name: name.clone(),
            path: config.path.clone(),
            why,
        };
        if config.memory_mib == 0
            || config.fuel_per_call == 0
            || config.deadline_ms == 0
            || config.instances == 0
        {
            return Err(WasmError::Config {
                name,
                why: "memory_mib, fuel_per_call, deadline_ms and instances must be above 0".into(),
            });
        }
        let bytes = std::fs::read(&config.path).map_err(|e| load_err(e.to_string()))?;
        let component = Component::new(&host.engine, &bytes)
            .map_err(|e| load_err(format!("not a WebAssembly component: {e}")))?;
        let mut linker = Linker::new(&host.engine);
        // Asynchronous WASI, so that a guest blocked in `poll` can be stopped (see above).
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| load_err(e.to_string()))?;
        W::add_to_linker(&mut linker).map_err(|e| load_err(e.to_string()))?;
        let kv = Arc::new(SharedKv::new(
            KvStore::open_as(config.kv_file.as_deref(), config.kv_key.as_ref(), &name)
                .map_err(|e| load_err(e.to_string()))?,
        ));
        let runner = Runner {
            name,
            config,
            engine: host.engine.clone(),
            linker,
            component,
            kv,
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                busy: 0,
            }),
            freed: Condvar::new(),
            failures: Mutex::new(Failures::default()),
        };
        // Instantiating blocks its thread on an async runtime, which panics on a thread that
        // is running async code already. A fresh thread has no runtime context, so `load` may be
        // called from async code (the relay's start, `syncra bot run`). Calls, like every
        // blocking function, belong on a blocking thread (`spawn_blocking`).
        let make = || runner.fresh(Instant::now() + runner.deadline(), false);
        let first =
            std::thread::scope(|s| s.spawn(make).join()).map_err(|_| WasmError::Load {
                name: runner.name.clone(),
                path: runner.config.path.clone(),
                why: "instantiating panicked".into(),
            })??;
        lock(&runner.pool).idle.push(first);
        Ok(runner)
    }

    fn deadline(&self) -> Duration {
        Duration::from_millis(self.config.deadline_ms)
    }

    /// Arms a store for one call (or an instantiation): a full fuel budget and an epoch
    /// deadline of `ticks` (see [`ticks_left`]).
    fn arm(&self, store: &mut Store<HostState>, ticks: u64) -> wasmtime::Result<()> {
        store.set_fuel(self.config.fuel_per_call)?;
        store.set_epoch_deadline(ticks);
        store.data_mut().limits.take_refusal();
        Ok(())
    }

    fn busy(&self) -> WasmError {
        WasmError::Busy {
            name: self.name.clone(),
            instances: self.config.instances,
        }
    }

    /// A fresh instance, made within the deadline `until`; [`WasmError::Busy`] if none of it
    /// is left.
    fn fresh(&self, until: Instant, shortened: bool) -> Result<Live<W>, WasmError> {
        let Some(ticks) = ticks_left(until) else {
            return Err(self.busy());
        };
        let wasi = crate::build_wasi(&self.name, &self.config.grants)?;
        let mut store = Store::new(
            &self.engine,
            HostState {
                name: self.name.clone(),
                wasi,
                table: {
                    // Handles a guest holds at once (pollables, streams): not the default
                    // million, whose host memory the memory cap does not see.
                    let mut table = ResourceTable::new();
                    table.set_max_capacity(crate::MAX_RESOURCES);
                    table
                },
                limits: Limiter::new(self.config.memory_mib),
                kv: self.kv.clone(),
                log: crate::LogBudget::new(),
            },
        );
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        let load_err = |why: String| WasmError::Load {
            name: self.name.clone(),
            path: self.config.path.clone(),
            why: format!("instantiating: {why}"),
        };
        self.arm(&mut store, ticks)
            .map_err(|e| load_err(e.to_string()))?;
        let made = wasmtime_wasi::runtime::in_tokio(async {
            tokio::time::timeout_at(
                until.into(),
                W::instantiate(&mut store, &self.component, &self.linker),
            )
            .await
        });
        match made {
            Ok(Ok(instance)) => Ok(Live { store, instance }),
            Ok(Err(e)) => {
                let refused = store.data_mut().limits.take_refusal();
                let (reason, why) = self.describe(&e, refused);
                if reason == CallFailure::Deadline && shortened {
                    return Err(self.busy());
                }
                Err(load_err(why))
            }
            Err(_) if shortened => Err(self.busy()),
            Err(_) => Err(load_err(self.deadline_passed())),
        }
    }

    /// Whether a caller that must be answered by `until` has just waited for an instance for
    /// more than half its deadline. Passing what is left then is not the plugin's failure
    /// (anyone who floods the host with calls could otherwise get a well-behaved plugin
    /// disabled): the caller gets [`WasmError::Busy`] and nothing is counted. A call with half
    /// its deadline or more still counts, so a plugin that hangs is disabled even under steady
    /// load, by the calls that found an instance soon enough. Making an instance does not
    /// shorten a deadline: a plugin whose failures discard its instances is still counted.
    fn shortened(&self, until: Instant) -> bool {
        until.saturating_duration_since(Instant::now()) < self.deadline() / 2
    }

    /// Takes an idle instance, or the right to make one (`None`), waiting for one to be freed
    /// until the call's deadline.
    fn take(&self, until: Instant) -> Result<Option<Live<W>>, WasmError> {
        let mut pool = lock(&self.pool);
        loop {
            if let Some(live) = pool.idle.pop() {
                pool.busy += 1;
                return Ok(Some(live));
            }
            if pool.busy < self.config.instances as usize {
                pool.busy += 1;
                return Ok(None);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.busy());
            }
            pool = self
                .freed
                .wait_timeout(pool, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Gives a slot back, with its instance if it is still good.
    fn give_back(&self, live: Option<Live<W>>) {
        let mut pool = lock(&self.pool);
        pool.busy -= 1;
        if let Some(live) = live
            && !lock(&self.failures).is_disabled()
        {
            pool.idle.push(live);
        }
        drop(pool);
        self.freed.notify_one();
    }

    /// Runs `f` on an instance with a fresh fuel budget, within one deadline that starts now
    /// (see the module's comment). A failure discards the instance and counts towards
    /// disabling the plugin. Afterwards, whatever the outcome, the plugin's key-value store is
    /// written once if the call changed it (see `kv`).
    pub(crate) fn call<R>(
        &self,
        kind: CallKind,
        f: impl AsyncFnOnce(&mut Store<HostState>, &W) -> wasmtime::Result<R>,
    ) -> Result<R, WasmError> {
        let until = Instant::now() + self.deadline();
        let mut ran = false;
        let outcome = self.call_until(kind, until, &mut ran, f);
        // A call that never reached the guest changed nothing, and its caller (told at once
        // that the plugin is busy or disabled) does not wait for other calls' writes.
        if !ran {
            return outcome;
        }
        if let Err(why) = self.kv.flush() {
            tracing::error!(
                plugin = %self.name,
                "writing its key-value store failed: {why}; the changes are kept in memory and \
                 written again after its next call"
            );
        }
        outcome
    }

    /// The call itself; `ran` is set once it has an instance slot (guest code may run).
    fn call_until<R>(
        &self,
        kind: CallKind,
        until: Instant,
        ran: &mut bool,
        f: impl AsyncFnOnce(&mut Store<HostState>, &W) -> wasmtime::Result<R>,
    ) -> Result<R, WasmError> {
        {
            let failures = lock(&self.failures);
            if failures.is_disabled() {
                return Err(WasmError::Disabled {
                    name: self.name.clone(),
                    failures: failures.worst(),
                });
            }
        }
        let taken = self.take(until)?;
        // From here guest code may run (instantiating one runs its start code).
        *ran = true;
        let shortened = self.shortened(until);
        let mut live = match taken {
            Some(live) => live,
            None => match self.fresh(until, shortened) {
                Ok(live) => live,
                Err(e @ WasmError::Busy { .. }) => {
                    self.give_back(None);
                    return Err(e);
                }
                Err(e) => {
                    self.give_back(None);
                    return Err(self.failed(kind, e));
                }
            },
        };
        let Some(ticks) = ticks_left(until) else {
            // Waiting and instantiating used the whole deadline: the guest is not called, and
            // its instance is still good.
            self.give_back(Some(live));
            return Err(self.busy());
        };
        if let Err(e) = self.arm(&mut live.store, ticks) {
            self.give_back(None);
            return Err(self.failed(kind, self.call_err(CallFailure::Trap, e.to_string())));
        }
        let outcome = wasmtime_wasi::runtime::in_tokio(async {
            tokio::time::timeout_at(until.into(), f(&mut live.store, &live.instance)).await
        });
        match outcome {
            Ok(Ok(r)) => {
                lock(&self.failures).succeeded(kind);
                self.give_back(Some(live));
                Ok(r)
            }
            Ok(Err(e)) => {
                let refused = live.store.data_mut().limits.take_refusal();
                self.give_back(None);
                let (reason, why) = self.describe(&e, refused);
                if reason == CallFailure::Deadline && shortened {
                    return Err(self.busy());
                }
                Err(self.failed(kind, self.call_err(reason, why)))
            }
            // Stopped: its instance goes (the guest was unwound mid-call).
            Err(_) if shortened => {
                self.give_back(None);
                Err(self.busy())
            }
            Err(_) => {
                self.give_back(None);
                let why = self.deadline_passed();
                Err(self.failed(kind, self.call_err(CallFailure::Deadline, why)))
            }
        }
    }

    fn call_err(&self, reason: CallFailure, why: String) -> WasmError {
        WasmError::Call {
            name: self.name.clone(),
            reason,
            why,
        }
    }

    fn deadline_passed(&self) -> String {
        format!(
            "passed its deadline of {} ms (deadline_ms) and was stopped",
            self.config.deadline_ms
        )
    }

    fn describe(&self, e: &wasmtime::Error, memory_refused: bool) -> (CallFailure, String) {
        match e.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::OutOfFuel) => (
                CallFailure::Fuel,
                format!(
                    "ran out of fuel, its CPU budget of {} per call (fuel_per_call), and was \
                     stopped",
                    self.config.fuel_per_call
                ),
            ),
            Some(wasmtime::Trap::Interrupt) => (CallFailure::Deadline, self.deadline_passed()),
            // A guest whose allocator got no memory aborts; the trap itself says only
            // `unreachable`, the limiter knows why.
            _ if memory_refused => (
                CallFailure::MemoryCap,
                format!(
                    "exceeded its memory cap of {} MiB (memory_mib) and was stopped",
                    self.config.memory_mib
                ),
            ),
            Some(other) => (CallFailure::Trap, format!("trapped: {other}")),
            None => (
                CallFailure::Trap,
                format!("{e:#}")
                    .lines()
                    .next()
                    .unwrap_or("failed")
                    .to_owned(),
            ),
        }
    }

    fn failed(&self, kind: CallKind, err: WasmError) -> WasmError {
        let mut failures = lock(&self.failures);
        let disabled = failures.failed(kind, self.config.max_failures, &err.to_string());
        let worst = failures.worst();
        drop(failures);
        if disabled {
            // Free the memory of instances that will never run again.
            lock(&self.pool).idle.clear();
            tracing::error!(
                plugin = %self.name,
                failures = worst,
                "plugin disabled after {worst} failures in a row (last: {err}); the host keeps \
                 serving without it"
            );
        } else {
            tracing::warn!(plugin = %self.name, "{err}; restarting it");
        }
        err
    }

    pub(crate) fn store_writes(&self) -> u64 {
        self.kv.lock().writes()
    }

    pub(crate) fn health(&self) -> PluginHealth {
        // The pool's lock first, alone: `give_back` takes the pool's, then the failures'.
        let busy = u32::try_from(lock(&self.pool).busy).unwrap_or(u32::MAX);
        let failures = lock(&self.failures);
        PluginHealth {
            busy,
            disabled: failures.is_disabled(),
            failures: failures.worst(),
            last_error: failures.last_error.clone(),
        }
    }
}

/// The epoch deadline, in ticks from now, of a guest that must stop at `until`; `None` once it
/// has passed. Rounded up, and one tick added because the next tick may come at once: epoch
/// interruption may stop a computing guest up to two ticks late, never early (a guest waiting in
/// WASI is stopped at `until` by the timeout).
fn ticks_left(until: Instant) -> Option<u64> {
    let left = until.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return None;
    }
    let ticks = left.as_nanos().div_ceil(EPOCH_TICK.as_nanos());
    Some(u64::try_from(ticks).unwrap_or(u64::MAX - 1) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_count_per_call_kind() {
        let mut f = Failures::default();
        // on-envelope keeps failing while on-connect keeps succeeding: the successes of the
        // other kind do not hide the failures.
        for _ in 0..2 {
            assert!(!f.failed(CallKind::OnEnvelope, 3, "trapped"));
            f.succeeded(CallKind::OnConnect);
        }
        assert_eq!(f.worst(), 2);
        assert!(f.failed(CallKind::OnEnvelope, 3, "trapped"));
        assert!(f.is_disabled());
        assert_eq!(f.last_error.as_deref(), Some("trapped"));
        // Disabling is reported once.
        assert!(!f.failed(CallKind::OnEnvelope, 3, "trapped"));
    }

    #[test]
    fn a_success_of_the_same_kind_starts_the_count_again() {
        let mut f = Failures::default();
        f.failed(CallKind::OnMessage, 3, "x");
        f.failed(CallKind::OnMessage, 3, "x");
        f.succeeded(CallKind::OnMessage);
        assert_eq!(f.worst(), 0);
        f.failed(CallKind::OnMessage, 3, "x");
        f.failed(CallKind::OnCommand, 3, "x");
        assert!(!f.is_disabled());
    }
}

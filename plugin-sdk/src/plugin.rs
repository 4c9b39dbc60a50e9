//! The plugin side of the ABI: what [`export_broker_plugin!`](crate::export_broker_plugin)
//! expands to, so that a plugin crate writes no `unsafe` and no `extern "C"` itself.
//!
//! # The plugin's own runtime
//!
//! The library runs every call on a tokio runtime of its own (multi-threaded, threads named
//! `syncra-plugin`), started on the first `create` and kept for the life of the process. Each
//! vtable call copies its arguments, spawns the work onto that runtime and returns an
//! [`FfiFuture`] that only awaits the task's `JoinHandle`. So the host's executor polls nothing
//! but that join (waking through async-ffi's FFI-safe waker), the host's tokio never drives the
//! plugin's sockets or timers, and no tokio handle crosses the boundary in either direction.
//! Dropping the host's future aborts the task, so cancellation behaves as in-process.
//!
//! Deliveries run the other way: the broker calls its `Arc<dyn BrokerSink>` on a plugin thread,
//! which calls the host's C callback. The host's sink therefore runs on a thread that has no
//! host tokio context; `BrokerSink::deliver` must not block anyway.
//!
//! # Panics
//!
//! Every `extern "C"` function here catches panics (`catch_unwind`, and tokio catches panics in
//! spawned tasks) and reports them as [`ResultCode::PANICKED`], so a panic never unwinds into
//! the host. That needs the plugin built with `panic = "unwind"` (the default); with
//! `panic = "abort"` a panic ends the host process.

use std::any::Any;
use std::ffi::{CStr, c_void};
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, OnceLock};

use async_ffi::{FfiFuture, FutureExt as _};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use syncra_core::error::{BrokerError, PluginError};
use syncra_core::registry::typed_config;
use syncra_core::{Broker, BrokerSink, Health, PublishReceipt};
use tokio::runtime::Runtime;
use tokio::task::{JoinError, JoinHandle};

use crate::abi::{
    ABI_VERSION, BrokerHandle, BrokerVTable, CreateResult, FfiBuffer, FfiResult, FfiSlice,
    HealthState, PluginDescriptor, PluginKind, ResultCode, SDK_VERSION_C, SinkCallback,
};

/// A broker plugin, as [`export_broker_plugin!`](crate::export_broker_plugin) describes it. Use
/// the macro rather than implementing this by hand.
pub trait BrokerPlugin: 'static {
    /// The `kind` name the plugin registers under.
    const NAME: &'static str;
    /// The plugin's own configuration, deserialized from its config section (without `kind`).
    /// Use `#[serde(deny_unknown_fields)]` so a typo is an error.
    type Config: DeserializeOwned + Send + 'static;
    /// Creates a broker that delivers to `sink`.
    fn create(
        config: Self::Config,
        sink: Arc<dyn BrokerSink>,
    ) -> impl Future<Output = Result<Arc<dyn Broker>, PluginError>> + Send + 'static;
}

/// Adapts a constructor's future to [`BrokerPlugin::create`]'s type. Used by the macro.
pub async fn share<B, F>(constructor: F) -> Result<Arc<dyn Broker>, PluginError>
where
    B: Broker + 'static,
    F: Future<Output = Result<B, PluginError>>,
{
    Ok(Arc::new(constructor.await?))
}

/// The function table of plugin `P`. Used by the macro.
pub const fn broker_vtable<P: BrokerPlugin>() -> BrokerVTable {
    BrokerVTable {
        create: create::<P>,
        publish,
        subscribe,
        unsubscribe,
        health,
        destroy,
        free_bytes,
    }
}

/// The descriptor of a broker plugin named `name` with functions `vtable`. Used by the macro.
pub const fn broker_descriptor(
    name: &'static CStr,
    vtable: &'static BrokerVTable,
) -> PluginDescriptor {
    PluginDescriptor {
        abi_version: ABI_VERSION,
        sdk_version: SDK_VERSION_C.as_ptr(),
        kind: PluginKind::BROKER,
        name: name.as_ptr(),
        vtable,
    }
}

/// The plugin's runtime, started on first use. This static is per library: each cdylib links
/// its own copy of this crate.
fn runtime() -> Result<&'static Runtime, String> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .thread_name("syncra-plugin")
                .enable_all()
                .build()
                .map_err(|e| format!("the plugin could not start its runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Aborts the task when the host drops the future awaiting it.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a spawned call has no output.
enum Failure {
    /// The work panicked; the panic's message.
    Panicked(String),
    /// The runtime could not be started, or dropped the task.
    NoRuntime(String),
}

/// Runs `work` on the plugin's runtime; the returned future awaits it and converts its output
/// (or the reason it has none) with `finish`.
fn spawn<T, R>(
    work: impl Future<Output = T> + Send + 'static,
    finish: fn(Result<T, Failure>) -> R,
) -> FfiFuture<R>
where
    T: Send + 'static,
    R: 'static,
{
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return async move { finish(Err(Failure::NoRuntime(e))) }.into_ffi(),
    };
    let mut task = AbortOnDrop(rt.spawn(work));
    async move { finish((&mut task.0).await.map_err(join_failure)) }.into_ffi()
}

fn join_failure(e: JoinError) -> Failure {
    match e.try_into_panic() {
        Ok(payload) => Failure::Panicked(panic_message(payload)),
        Err(e) => Failure::NoRuntime(format!("the plugin's runtime dropped the call: {e}")),
    }
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    }
}

/// Runs the synchronous part of a vtable call, turning a panic into `on_panic(message)`.
fn guard<R>(call: impl FnOnce() -> FfiFuture<R>, on_panic: fn(String) -> R) -> FfiFuture<R>
where
    R: 'static,
{
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(future) => future,
        Err(payload) => {
            let message = panic_message(payload);
            async move { on_panic(message) }.into_ffi()
        }
    }
}

impl FfiResult {
    fn ok(known: bool, value: u64, message: String) -> FfiResult {
        FfiResult {
            code: ResultCode::OK,
            known,
            value,
            limit: 0,
            message: FfiBuffer::new(message.into_bytes()),
        }
    }

    fn error(code: ResultCode, message: String) -> FfiResult {
        FfiResult {
            code,
            known: false,
            value: 0,
            limit: 0,
            message: FfiBuffer::new(message.into_bytes()),
        }
    }

    fn panicked(message: String) -> FfiResult {
        FfiResult::error(ResultCode::PANICKED, message)
    }

    fn failure(failure: Failure) -> FfiResult {
        match failure {
            Failure::Panicked(message) => FfiResult::panicked(message),
            Failure::NoRuntime(message) => FfiResult::error(ResultCode::UNAVAILABLE, message),
        }
    }

    fn broker_error(e: BrokerError) -> FfiResult {
        match e {
            BrokerError::Unavailable(why) => FfiResult::error(ResultCode::UNAVAILABLE, why),
            BrokerError::BadTopic(topic) => FfiResult::error(ResultCode::BAD_TOPIC, topic),
            BrokerError::TooLarge { size, max } => FfiResult {
                code: ResultCode::TOO_LARGE,
                known: false,
                value: size as u64,
                limit: max as u64,
                message: FfiBuffer::EMPTY,
            },
            // A variant added to `BrokerError` after this SDK: keep its words.
            other => FfiResult::error(ResultCode::UNAVAILABLE, other.to_string()),
        }
    }

    fn unit(result: Result<Result<(), BrokerError>, Failure>) -> FfiResult {
        match result {
            Ok(Ok(())) => FfiResult::ok(false, 0, String::new()),
            Ok(Err(e)) => FfiResult::broker_error(e),
            Err(failure) => FfiResult::failure(failure),
        }
    }

    fn receipt(result: Result<Result<PublishReceipt, BrokerError>, Failure>) -> FfiResult {
        match result {
            Ok(Ok(PublishReceipt { receivers })) => {
                FfiResult::ok(receivers.is_some(), receivers.unwrap_or(0), String::new())
            }
            Ok(Err(e)) => FfiResult::broker_error(e),
            Err(failure) => FfiResult::failure(failure),
        }
    }

    fn health(result: Result<Health, Failure>) -> FfiResult {
        let (state, detail) = match result {
            Ok(Health::Up) => (HealthState::UP, String::new()),
            Ok(Health::Degraded(why)) => (HealthState::DEGRADED, why),
            Ok(Health::Down(why)) => (HealthState::DOWN, why),
            Err(failure) => return FfiResult::failure(failure),
        };
        FfiResult::ok(false, u64::from(state.0), detail)
    }
}

impl CreateResult {
    fn error(code: ResultCode, message: String) -> CreateResult {
        CreateResult {
            code,
            handle: BrokerHandle(std::ptr::null_mut()),
            message: FfiBuffer::new(message.into_bytes()),
        }
    }

    fn panicked(message: String) -> CreateResult {
        CreateResult::error(ResultCode::PANICKED, message)
    }

    fn finish(result: Result<Result<Box<Instance>, PluginError>, Failure>) -> CreateResult {
        match result {
            Ok(Ok(instance)) => CreateResult {
                code: ResultCode::OK,
                handle: BrokerHandle(Box::into_raw(instance).cast::<c_void>()),
                message: FfiBuffer::EMPTY,
            },
            Ok(Err(PluginError::Config { message, .. })) => {
                CreateResult::error(ResultCode::CONFIG, message)
            }
            Ok(Err(PluginError::Start { message, .. })) => {
                CreateResult::error(ResultCode::START, message)
            }
            Ok(Err(other)) => CreateResult::error(ResultCode::START, other.to_string()),
            Err(Failure::Panicked(message)) => CreateResult::panicked(message),
            Err(Failure::NoRuntime(message)) => CreateResult::error(ResultCode::START, message),
        }
    }
}

/// What a [`BrokerHandle`] points to.
struct Instance {
    broker: Arc<dyn Broker>,
}

/// The host's sink as the plugin's broker sees it.
struct HostSink(SinkCallback);

// SAFETY: the ABI requires the host's `deliver` and `release` to be callable from any thread
// with this `ctx` (the host's side is a `Send + Sync` sink), until `release`.
unsafe impl Send for HostSink {}
// SAFETY: as above; `deliver` may be called concurrently.
unsafe impl Sync for HostSink {}

impl BrokerSink for HostSink {
    fn deliver(&self, topic: &str, payload: Bytes) -> bool {
        // SAFETY: `ctx` is live until `release`, which only `Drop` calls; the slices are valid
        // for the call and the host copies what it keeps.
        unsafe {
            (self.0.deliver)(
                self.0.ctx,
                topic.as_ptr(),
                topic.len(),
                payload.as_ptr(),
                payload.len(),
            )
        }
    }
}

impl Drop for HostSink {
    fn drop(&mut self) {
        // SAFETY: called exactly once (this is the only owner of the callback, made once in
        // `create`), after the last `deliver` (which needs `&self`).
        unsafe { (self.0.release)(self.0.ctx) }
    }
}

/// The broker behind a handle.
///
/// # Safety
///
/// `handle` must come from a successful `create` of this library and not be destroyed yet.
unsafe fn broker(handle: BrokerHandle) -> Arc<dyn Broker> {
    // SAFETY: by this function's contract the handle is a live `Box<Instance>` pointer.
    let instance = unsafe { &*handle.0.cast::<Instance>() };
    Arc::clone(&instance.broker)
}

/// A topic from the host, owned.
///
/// # Safety
///
/// As [`FfiSlice::as_slice`].
unsafe fn topic(topic: FfiSlice) -> Result<String, BrokerError> {
    // SAFETY: forwarded to the caller.
    let bytes = unsafe { topic.as_slice() };
    String::from_utf8(bytes.to_vec())
        .map_err(|e| BrokerError::BadTopic(String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

unsafe extern "C" fn create<P: BrokerPlugin>(
    config: FfiSlice,
    sink: SinkCallback,
) -> FfiFuture<CreateResult> {
    // Taken first, so that `release` runs exactly once whatever happens next: when the broker
    // is dropped, or right away if anything below fails or panics.
    let sink = HostSink(sink);
    guard(
        move || {
            // SAFETY: the host passes the config bytes valid for this call; they are copied
            // before returning.
            let config = unsafe { config.as_slice() }.to_vec();
            let sink: Arc<dyn BrokerSink> = Arc::new(sink);
            spawn(
                async move {
                    let value: serde_json::Value =
                        serde_json::from_slice(&config).map_err(|e| PluginError::Config {
                            category: "broker",
                            kind: P::NAME.to_owned(),
                            message: format!("the host sent configuration that is not JSON: {e}"),
                        })?;
                    let config: P::Config = typed_config("broker", P::NAME, value)?;
                    let broker = P::create(config, sink).await?;
                    Ok(Box::new(Instance { broker }))
                },
                CreateResult::finish,
            )
        },
        CreateResult::panicked,
    )
}

unsafe extern "C" fn publish(
    handle: BrokerHandle,
    topic_bytes: FfiSlice,
    payload: FfiSlice,
) -> FfiFuture<FfiResult> {
    guard(
        || {
            // SAFETY: the host passes a live handle and slices valid for this call; everything
            // is copied or cloned before returning.
            let (broker, topic, payload) = unsafe {
                (
                    broker(handle),
                    topic(topic_bytes),
                    Bytes::copy_from_slice(payload.as_slice()),
                )
            };
            spawn(
                async move { broker.publish(&topic?, payload).await },
                FfiResult::receipt,
            )
        },
        FfiResult::panicked,
    )
}

unsafe extern "C" fn subscribe(
    handle: BrokerHandle,
    topic_bytes: FfiSlice,
) -> FfiFuture<FfiResult> {
    guard(
        || {
            // SAFETY: as in `publish`.
            let (broker, topic) = unsafe { (broker(handle), topic(topic_bytes)) };
            spawn(
                async move { broker.subscribe(&topic?).await },
                FfiResult::unit,
            )
        },
        FfiResult::panicked,
    )
}

unsafe extern "C" fn unsubscribe(
    handle: BrokerHandle,
    topic_bytes: FfiSlice,
) -> FfiFuture<FfiResult> {
    guard(
        || {
            // SAFETY: as in `publish`.
            let (broker, topic) = unsafe { (broker(handle), topic(topic_bytes)) };
            spawn(
                async move { broker.unsubscribe(&topic?).await },
                FfiResult::unit,
            )
        },
        FfiResult::panicked,
    )
}

unsafe extern "C" fn health(handle: BrokerHandle) -> FfiFuture<FfiResult> {
    guard(
        || {
            // SAFETY: as in `publish`.
            let broker = unsafe { broker(handle) };
            spawn(async move { broker.health().await }, FfiResult::health)
        },
        FfiResult::panicked,
    )
}

unsafe extern "C" fn destroy(handle: BrokerHandle) {
    // There is nobody to report a panic to; the broker is gone either way.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the host passes a handle from a successful `create`, exactly once, after its
        // last call with it; nothing else owns the box.
        let instance = unsafe { Box::from_raw(handle.0.cast::<Instance>()) };
        // A broker may need its runtime to drop (deregistering sockets, aborting tasks), and this
        // runs on a host thread: enter the plugin's runtime for the drop.
        let _context = runtime().ok().map(Runtime::enter);
        drop(instance);
    }));
}

unsafe extern "C" fn free_bytes(buffer: FfiBuffer) {
    // SAFETY: the host hands back, once, a buffer this library returned.
    drop(unsafe { buffer.into_boxed() });
}

/// Makes the current crate a loadable native broker plugin.
///
/// `export_broker_plugin!(NAME, Config, constructor)`:
///
/// - `NAME`, a string literal: the `kind` the plugin registers under in the host (for example
///   `"redis-native"`);
/// - `Config`: the plugin's config type (`serde::Deserialize`, ideally with
///   `#[serde(deny_unknown_fields)]`), deserialized from the config section without `kind`;
/// - `constructor`: a path to an `async fn(Config, Arc<dyn BrokerSink>) -> Result<B,
///   PluginError>` where `B: syncra_core::Broker`. It runs on the plugin's own runtime.
///
/// The crate must be built as a `cdylib` and invoke the macro once. It generates the
/// `SYNCRA_PLUGIN_ABI_VERSION` static and the `syncra_plugin_descriptor` symbol, the vtable functions, the sink adapter and the runtime;
/// the crate itself needs no `unsafe`.
///
/// ```
/// use std::sync::Arc;
///
/// use syncra_broker_memory::MemoryBroker;
/// use syncra_core::BrokerSink;
/// use syncra_core::error::PluginError;
///
/// /// `kind = "my-memory"` takes no settings, and refuses unknown ones.
/// #[derive(serde::Deserialize)]
/// #[serde(deny_unknown_fields)]
/// pub struct Config {}
///
/// async fn connect(_: Config, sink: Arc<dyn BrokerSink>) -> Result<MemoryBroker, PluginError> {
///     Ok(MemoryBroker::standalone(sink))
/// }
///
/// syncra_plugin_sdk::export_broker_plugin!("my-memory", Config, connect);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! export_broker_plugin {
    ($name:literal, $config:ty, $constructor:path $(,)?) => {
        const _: () = {
            struct SyncraNativeBroker;

            impl $crate::plugin::BrokerPlugin for SyncraNativeBroker {
                const NAME: &'static str = $name;
                type Config = $config;

                fn create(
                    config: $config,
                    sink: ::std::sync::Arc<dyn $crate::__private::BrokerSink>,
                ) -> impl ::std::future::Future<
                    Output = ::std::result::Result<
                        ::std::sync::Arc<dyn $crate::__private::Broker>,
                        $crate::__private::PluginError,
                    >,
                > + ::std::marker::Send
                + 'static {
                    $crate::plugin::share($constructor(config, sink))
                }
            }

            static VTABLE: $crate::abi::BrokerVTable =
                $crate::plugin::broker_vtable::<SyncraNativeBroker>();

            static DESCRIPTOR: $crate::abi::PluginDescriptor = $crate::plugin::broker_descriptor(
                match ::std::ffi::CStr::from_bytes_with_nul(::std::concat!($name, "\0").as_bytes())
                {
                    ::std::result::Result::Ok(name) => name,
                    ::std::result::Result::Err(_) => {
                        ::std::panic!("a plugin name must not contain a NUL byte")
                    }
                },
                &VTABLE,
            );

            /// The ABI version, read by the host as data before it calls anything here.
            #[unsafe(no_mangle)]
            pub static SYNCRA_PLUGIN_ABI_VERSION: u32 = $crate::abi::ABI_VERSION;

            /// The entry point the host calls once the version matched.
            #[unsafe(no_mangle)]
            pub extern "C" fn syncra_plugin_descriptor() -> *const $crate::abi::PluginDescriptor {
                &DESCRIPTOR
            }
        };
    };
}

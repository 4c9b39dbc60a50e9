//! The host side of the ABI: loading a native plugin library and using its brokers as
//! `Arc<dyn Broker>` through the registry.
//!
//! [`load_broker_plugin`] opens the library, reads its `SYNCRA_PLUGIN_ABI_VERSION` static and
//! compares it with [`ABI_VERSION`] before it calls anything in the library; a library built
//! against another version is refused with [`LoadError::AbiMismatch`] and unloaded, and only then
//! is the descriptor function called. Opening the library runs its ELF constructors anyway (the
//! dynamic loader does that, not us): the check guards against accidents, not malice. An accepted library
//! is never unloaded: its runtime threads run its code for the rest of the process.
//! [`register_native`] then registers the plugin's kind name, and each broker the registry
//! creates is a [`NativeBroker`] that forwards every call through the vtable.

use std::ffi::{CStr, c_void};
use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use async_trait::async_trait;
use bytes::Bytes;
use libloading::Library;
use syncra_core::error::{BrokerError, PluginError};
use syncra_core::registry::Kinds;
use syncra_core::{Broker, BrokerSink, Health, PublishReceipt};

use crate::abi::{
    ABI_VERSION, ABI_VERSION_SYMBOL, BrokerHandle, BrokerVTable, DESCRIPTOR_SYMBOL, DescriptorFn,
    FfiBuffer, FfiFuture, FfiResult, FfiSlice, HealthState, PluginDescriptor, PluginKind,
    ResultCode, SDK_VERSION, SinkCallback,
};

/// Why a native plugin library was refused. Each variant says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file cannot be read (most often: it does not exist).
    #[error("cannot read native plugin {}: {source}", path.display())]
    Io {
        /// The path as configured.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file exists but the dynamic loader refused it.
    #[error(
        "native plugin {} is not a loadable library (not a shared library for this platform, \
         built for another architecture, or missing one of its own dependencies): {reason}",
        path.display()
    )]
    NotALibrary {
        /// The file.
        path: PathBuf,
        /// The loader's words.
        reason: String,
    },
    /// The library does not export a symbol every plugin has (the version static, or the
    /// descriptor function): it is not a Syncra native plugin, or one built before plugin ABI 2.
    /// Nothing in it was called.
    #[error(
        "{} is a library but not a Syncra native plugin: it does not export `{symbol}` \
         (libraries built with a syncra-plugin-sdk older than plugin ABI 2 lack the version \
         static); build plugins with syncra_plugin_sdk::export_broker_plugin! from \
         syncra-plugin-sdk {sdk}",
        path.display(),
        sdk = SDK_VERSION
    )]
    MissingSymbol {
        /// The file.
        path: PathBuf,
        /// The symbol looked for.
        symbol: &'static str,
    },
    /// The plugin was built against another ABI version; nothing in it was called.
    #[error(
        "native plugin {} was built against Syncra plugin ABI {found}, this host speaks ABI \
         {expected}; rebuild the plugin with syncra-plugin-sdk {sdk}",
        path.display(),
        sdk = SDK_VERSION
    )]
    AbiMismatch {
        /// The file.
        path: PathBuf,
        /// The plugin's ABI version.
        found: u32,
        /// This host's ABI version.
        expected: u32,
    },
    /// The plugin provides something other than a broker.
    #[error(
        "native plugin {} provides plugin kind {kind}, but this host loads only broker plugins \
         (kind {})",
        path.display(),
        PluginKind::BROKER.0
    )]
    UnsupportedKind {
        /// The file.
        path: PathBuf,
        /// The descriptor's kind.
        kind: u32,
    },
    /// The descriptor breaks the ABI's rules (a null pointer, a name that is not UTF-8).
    #[error(
        "native plugin {} has a malformed descriptor ({why}); rebuild it with syncra-plugin-sdk {}",
        path.display(),
        SDK_VERSION
    )]
    BadDescriptor {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
}

/// A native broker plugin whose library is loaded (for good) and whose ABI version matches.
/// Cheap to clone.
#[derive(Clone)]
pub struct LoadedPlugin {
    path: Arc<Path>,
    name: &'static str,
    sdk_version: &'static str,
    vtable: &'static BrokerVTable,
}

impl fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("sdk_version", &self.sdk_version)
            .finish_non_exhaustive()
    }
}

/// Loads the native broker plugin at `path`.
///
/// Checks, in order: the file can be read ([`LoadError::Io`]), the loader accepts it
/// ([`LoadError::NotALibrary`]), it exports the `SYNCRA_PLUGIN_ABI_VERSION` static
/// ([`LoadError::MissingSymbol`]), and that static holds [`ABI_VERSION`]
/// ([`LoadError::AbiMismatch`]). Up to that last check only the static is read (data, through
/// its address) and no plugin function is called; a refused library is unloaded again. Then the
/// descriptor function is called and the descriptor checked. An accepted library stays loaded
/// for the life of the process.
///
/// # Trust
///
/// Opening a library runs its initializers before any check here can look at it: ELF
/// constructors (`.init_array`, which is where C/C++ static constructors and Rust crates such as
/// `ctor` put code) run inside `dlopen`, and libloading cannot prevent that. Its functions then
/// run inside this process with all of its privileges. Load only files you trust as much as the
/// host binary itself, from a directory only the operator can write to. The version check
/// guards against honest mistakes (a plugin built with another SDK), not against a hostile
/// library; a library that claims this ABI without following it is undefined behaviour.
pub fn load_broker_plugin(path: &Path) -> Result<LoadedPlugin, LoadError> {
    // An absolute path: the loader searches system directories for a bare file name.
    let path = std::fs::canonicalize(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })?;
    // SAFETY: loading runs the library's initializers; the operator vouches for the file (see
    // "Trust" above). Rust plugins built with the SDK have no initializers of their own.
    let library = unsafe { Library::new(&path) }.map_err(|e| LoadError::NotALibrary {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    // SAFETY: looking a symbol up runs nothing in the library. From ABI 2 on the symbol is a
    // `u32` static in every version, so its address is a `*const u32`.
    let version = unsafe { library.get::<*const u32>(ABI_VERSION_SYMBOL) }
        .map(|symbol| *symbol)
        .map_err(|_| LoadError::MissingSymbol {
            path: path.clone(),
            symbol: "SYNCRA_PLUGIN_ABI_VERSION",
        })?;
    let bad = |why| LoadError::BadDescriptor {
        path: path.clone(),
        why,
    };
    if version.is_null() {
        return Err(bad("the version symbol has a null address"));
    }
    // SAFETY: the address of a `u32` static in a loaded library; reading data runs no code.
    // Unaligned, because nothing of a foreign library's layout is assumed.
    let found = unsafe { version.read_unaligned() };
    if found != ABI_VERSION {
        // `library` is dropped, unloading it; no function in it was called.
        return Err(LoadError::AbiMismatch {
            path,
            found,
            expected: ABI_VERSION,
        });
    }
    // SAFETY: the plugin speaks this ABI version, which fixes the symbol's type.
    let describe = unsafe { library.get::<DescriptorFn>(DESCRIPTOR_SYMBOL) }
        .map(|symbol| *symbol)
        .map_err(|_| LoadError::MissingSymbol {
            path: path.clone(),
            symbol: "syncra_plugin_descriptor",
        })?;
    // SAFETY: in this ABI version the descriptor function takes nothing and returns a pointer to
    // static data; the library is loaded.
    let descriptor = unsafe { describe() };
    if descriptor.is_null() {
        return Err(bad("the descriptor function returned null"));
    }
    // SAFETY: the plugin speaks this ABI version, so the pointer is to a static
    // `PluginDescriptor` of this layout, alive while the library is loaded, which from here on
    // is forever.
    let descriptor: &'static PluginDescriptor = unsafe { &*descriptor };
    if descriptor.abi_version != ABI_VERSION {
        return Err(bad(
            "the descriptor's ABI version differs from SYNCRA_PLUGIN_ABI_VERSION",
        ));
    }
    if descriptor.kind != PluginKind::BROKER {
        return Err(LoadError::UnsupportedKind {
            path,
            kind: descriptor.kind.0,
        });
    }
    if descriptor.vtable.is_null() || descriptor.name.is_null() {
        return Err(bad("a null name or vtable"));
    }
    // SAFETY: per the ABI, `name` is a static NUL-terminated string (checked non-null above).
    let name = unsafe { CStr::from_ptr(descriptor.name) }
        .to_str()
        .map_err(|_| bad("the name is not UTF-8"))?;
    if name.is_empty() {
        return Err(bad("an empty name"));
    }
    let sdk_version = if descriptor.sdk_version.is_null() {
        "unknown"
    } else {
        // SAFETY: per the ABI, `sdk_version` is a static NUL-terminated string.
        unsafe { CStr::from_ptr(descriptor.sdk_version) }
            .to_str()
            .unwrap_or("unknown")
    };
    // SAFETY: per the ABI, `vtable` points to a static `BrokerVTable` (checked non-null above).
    let vtable: &'static BrokerVTable = unsafe { &*descriptor.vtable };
    // Never unloaded: the `'static` references above point into the library, and once a broker
    // exists the plugin's runtime threads run its code until the process ends.
    std::mem::forget(library);
    Ok(LoadedPlugin {
        path: path.into(),
        name,
        sdk_version,
        vtable,
    })
}

/// Registers a loaded plugin's kind name in the broker registry. Its brokers are
/// [`NativeBroker`]s; the library stays loaded for the process lifetime.
///
/// Fails with `PluginError::Duplicate` if the name is taken (a built-in kind, or the same
/// plugin loaded twice).
pub fn register_native(
    kinds: &mut Kinds<Arc<dyn Broker>, Arc<dyn BrokerSink>>,
    plugin: LoadedPlugin,
) -> Result<(), PluginError> {
    let name = plugin.name;
    kinds.register(name, move |config, sink| {
        let plugin = plugin.clone();
        async move { Ok(Arc::new(plugin.create(config, sink).await?) as Arc<dyn Broker>) }
    })
}

impl LoadedPlugin {
    /// The `kind` name the plugin registers under.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The SDK version the plugin was built with.
    pub fn sdk_version(&self) -> &'static str {
        self.sdk_version
    }

    /// Where the library was loaded from (canonical).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A plugin over a vtable in this very process, for the SDK's own tests.
    #[cfg(test)]
    pub(crate) fn in_process(name: &'static str, vtable: &'static BrokerVTable) -> LoadedPlugin {
        LoadedPlugin {
            path: Path::new("(in process)").into(),
            name,
            sdk_version: SDK_VERSION,
            vtable,
        }
    }

    /// Creates a broker from its config section (without `kind`), delivering to `sink`. The
    /// plugin deserializes the config into its own type.
    pub async fn create(
        &self,
        config: serde_json::Value,
        sink: Arc<dyn BrokerSink>,
    ) -> Result<NativeBroker, PluginError> {
        let config = serde_json::to_vec(&config).map_err(|e| PluginError::Config {
            category: "broker",
            kind: self.name.to_owned(),
            message: e.to_string(),
        })?;
        let future = {
            let sink = SinkCallback {
                ctx: Box::into_raw(Box::new(sink)).cast_const().cast::<c_void>(),
                deliver: deliver_to_host,
                release: release_host_sink,
            };
            // SAFETY: the vtable is of this ABI version; `config` outlives the call (the plugin
            // copies it before returning); `sink.ctx` is a live `Box<Arc<dyn BrokerSink>>`
            // whose ownership passes to the plugin here, which gives it back exactly once
            // through `release_host_sink`.
            unsafe { (self.vtable.create)(FfiSlice::new(&config), sink) }
        };
        let start_error = |message| PluginError::Start {
            category: "broker",
            kind: self.name.to_owned(),
            message,
        };
        let result = poll_guarded(future)
            .await
            .map_err(|panic| start_error(format!("the plugin panicked while starting: {panic}")))?;
        let message = self.take(result.message);
        match result.code {
            ResultCode::OK if !result.handle.0.is_null() => Ok(NativeBroker {
                plugin: self.clone(),
                handle: result.handle,
            }),
            ResultCode::OK => Err(start_error("the plugin returned no broker".to_owned())),
            ResultCode::CONFIG => Err(PluginError::Config {
                category: "broker",
                kind: self.name.to_owned(),
                message,
            }),
            ResultCode::PANICKED => Err(start_error(format!(
                "the plugin panicked while starting: {message}"
            ))),
            _ => Err(start_error(message)),
        }
    }

    /// Copies a buffer the plugin returned and gives it back.
    fn take(&self, buffer: FfiBuffer) -> String {
        if buffer.ptr.is_null() {
            return String::new();
        }
        let bytes = FfiSlice {
            ptr: buffer.ptr,
            len: buffer.len,
        };
        // SAFETY: the plugin returned the buffer, so it is valid until handed back, which
        // happens right after this copy, once.
        let text = String::from_utf8_lossy(unsafe { bytes.as_slice() }).into_owned();
        // SAFETY: a buffer this plugin returned, handed back once.
        unsafe { (self.vtable.free_bytes)(buffer) };
        text
    }
}

/// Awaits a plugin's future, turning a panic that escaped its poll function (async-ffi reports
/// it to this side as a panic) into an error instead of a panic in the host's task.
async fn poll_guarded<T>(mut future: FfiFuture<T>) -> Result<T, String> {
    std::future::poll_fn(move |cx| {
        match catch_unwind(AssertUnwindSafe(|| Pin::new(&mut future).poll(cx))) {
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(Err("its future panicked while being polled".to_owned())),
        }
    })
    .await
}

/// The host's `deliver` for [`SinkCallback`]: calls the `Arc<dyn BrokerSink>` behind `ctx`.
unsafe extern "C" fn deliver_to_host(
    ctx: *const c_void,
    topic_ptr: *const u8,
    topic_len: usize,
    payload_ptr: *const u8,
    payload_len: usize,
) -> bool {
    // A panicking sink must not unwind into the plugin: it counts as "not taken".
    catch_unwind(AssertUnwindSafe(|| {
        let topic = FfiSlice {
            ptr: topic_ptr,
            len: topic_len,
        };
        let payload = FfiSlice {
            ptr: payload_ptr,
            len: payload_len,
        };
        // SAFETY: `ctx` is the `Box<Arc<dyn BrokerSink>>` made in `LoadedPlugin::create`, live
        // until the plugin calls `release_host_sink`, which per the ABI comes after its last
        // `deliver`; the slices are valid for this call and copied before it returns.
        let (sink, topic, payload) = unsafe {
            (
                &*ctx.cast::<Arc<dyn BrokerSink>>(),
                topic.as_slice(),
                payload.as_slice(),
            )
        };
        match std::str::from_utf8(topic) {
            Ok(topic) => sink.deliver(topic, Bytes::copy_from_slice(payload)),
            Err(_) => false,
        }
    }))
    .unwrap_or(false)
}

/// The host's `release` for [`SinkCallback`]: drops the `Arc<dyn BrokerSink>` behind `ctx`.
unsafe extern "C" fn release_host_sink(ctx: *const c_void) {
    // A sink whose drop panics must not unwind into the plugin; there is nobody to tell.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `ctx` is the `Box<Arc<dyn BrokerSink>>` made in `LoadedPlugin::create`, which
        // the plugin hands back exactly once.
        drop(unsafe { Box::from_raw(ctx.cast_mut().cast::<Arc<dyn BrokerSink>>()) });
    }));
}

/// A broker living in a native plugin, used through the C ABI. Dropping it destroys the
/// plugin's instance.
pub struct NativeBroker {
    plugin: LoadedPlugin,
    handle: BrokerHandle,
}

impl fmt::Debug for NativeBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NativeBroker")
            .field("kind", &self.plugin.name)
            .field("path", &self.plugin.path)
            .finish_non_exhaustive()
    }
}

/// A decoded [`FfiResult`], its buffer given back.
struct Answer {
    code: ResultCode,
    known: bool,
    value: u64,
    limit: u64,
    message: String,
}

impl NativeBroker {
    /// Awaits a call's future and decodes its result.
    async fn call(&self, future: FfiFuture<FfiResult>) -> Answer {
        match poll_guarded(future).await {
            Ok(result) => Answer {
                code: result.code,
                known: result.known,
                value: result.value,
                limit: result.limit,
                message: self.plugin.take(result.message),
            },
            Err(panic) => Answer {
                code: ResultCode::PANICKED,
                known: false,
                value: 0,
                limit: 0,
                message: panic,
            },
        }
    }

    fn error(&self, answer: Answer) -> BrokerError {
        let name = self.plugin.name;
        match answer.code {
            ResultCode::UNAVAILABLE => BrokerError::Unavailable(answer.message),
            ResultCode::BAD_TOPIC => BrokerError::BadTopic(answer.message),
            ResultCode::TOO_LARGE => BrokerError::TooLarge {
                size: usize::try_from(answer.value).unwrap_or(usize::MAX),
                max: usize::try_from(answer.limit).unwrap_or(usize::MAX),
            },
            ResultCode::PANICKED => BrokerError::Unavailable(format!(
                "native plugin {name:?} panicked: {}",
                answer.message
            )),
            ResultCode(code) => BrokerError::Unavailable(format!(
                "native plugin {name:?} answered with unknown result code {code}: {}",
                answer.message
            )),
        }
    }

    fn unit(&self, answer: Answer) -> Result<(), BrokerError> {
        match answer.code {
            ResultCode::OK => Ok(()),
            _ => Err(self.error(answer)),
        }
    }
}

// Every `unsafe` call below has the same justification, spelled out once here: the handle came
// from a successful `create` and is destroyed only in `Drop`, which cannot run while `&self`
// is borrowed by a call; the slices point into arguments that outlive the call, and the
// plugin copies them before returning its future.
#[async_trait]
impl Broker for NativeBroker {
    fn kind(&self) -> &'static str {
        self.plugin.name
    }

    async fn publish(&self, topic: &str, payload: Bytes) -> Result<PublishReceipt, BrokerError> {
        // SAFETY: see above the impl.
        let future = unsafe {
            (self.plugin.vtable.publish)(
                self.handle,
                FfiSlice::new(topic.as_bytes()),
                FfiSlice::new(&payload),
            )
        };
        let answer = self.call(future).await;
        match answer.code {
            ResultCode::OK => Ok(PublishReceipt {
                receivers: answer.known.then_some(answer.value),
            }),
            _ => Err(self.error(answer)),
        }
    }

    async fn subscribe(&self, topic: &str) -> Result<(), BrokerError> {
        // SAFETY: see above the impl.
        let future =
            unsafe { (self.plugin.vtable.subscribe)(self.handle, FfiSlice::new(topic.as_bytes())) };
        let answer = self.call(future).await;
        self.unit(answer)
    }

    async fn unsubscribe(&self, topic: &str) -> Result<(), BrokerError> {
        // SAFETY: see above the impl.
        let future = unsafe {
            (self.plugin.vtable.unsubscribe)(self.handle, FfiSlice::new(topic.as_bytes()))
        };
        let answer = self.call(future).await;
        self.unit(answer)
    }

    async fn health(&self) -> Health {
        // SAFETY: see above the impl.
        let future = unsafe { (self.plugin.vtable.health)(self.handle) };
        let answer = self.call(future).await;
        match (
            answer.code,
            HealthState(u32::try_from(answer.value).unwrap_or(u32::MAX)),
        ) {
            (ResultCode::OK, HealthState::UP) => Health::Up,
            (ResultCode::OK, HealthState::DEGRADED) => Health::Degraded(answer.message),
            (ResultCode::OK, HealthState::DOWN) => Health::Down(answer.message),
            (ResultCode::OK, HealthState(state)) => Health::Down(format!(
                "native plugin {:?} reported unknown health state {state}",
                self.plugin.name
            )),
            _ => Health::Down(self.error(answer).to_string()),
        }
    }
}

impl Drop for NativeBroker {
    fn drop(&mut self) {
        // SAFETY: the handle came from a successful `create` and is destroyed here, once; no
        // call's future is alive, since each borrows `self`.
        unsafe { (self.plugin.vtable.destroy)(self.handle) }
    }
}

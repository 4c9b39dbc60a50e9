//! The C ABI between a Syncra host and a native plugin library: layouts and the rules of use,
//! no behaviour.
//!
//! A native plugin is a `cdylib` exporting two symbols:
//!
//! - [`ABI_VERSION_SYMBOL`] (`SYNCRA_PLUGIN_ABI_VERSION`), a `static u32` holding the
//!   [`ABI_VERSION`] the plugin was built against. It is data, not code: a host reads it through
//!   the symbol's address without running anything in the library.
//! - [`DESCRIPTOR_SYMBOL`] (`syncra_plugin_descriptor`), an `extern "C" fn() -> *const
//!   PluginDescriptor` that returns a pointer to static data. A host calls it only after the
//!   version static matched its own; everything else is reached through the descriptor.
//!
//! # Versioning
//!
//! [`ABI_VERSION`] names the layout of every type in this module and the contract of every
//! function in [`BrokerVTable`]. Any change a plugin built by an older SDK could observe — a field
//! added, removed, reordered or retyped, a code given a new meaning, a rule below relaxed or
//! tightened, a different `async-ffi` future layout — bumps it. Only one thing is frozen across
//! every version from 2 on, so that any host can read any plugin's version and refuse it: the
//! version static, a `u32` named [`ABI_VERSION_SYMBOL`]. A host reads that static, compares it with
//! its own [`ABI_VERSION`], and on a mismatch calls nothing and reads nothing else. (Version 1
//! had no static and was read by calling the descriptor function; a host of version 2 or later
//! refuses such a library as lacking the version symbol, without calling it.)
//!
//! The version check protects against accidents — a plugin built with another SDK — not against
//! malice: loading a library runs its ELF constructors (`.init_array`) before any check, and a
//! library can claim any version. Native plugins are fully trusted code.
//!
//! # What crosses, and what never does
//!
//! Only plain data crosses: integers, `bool`, pointers to bytes with their lengths, `extern "C"`
//! function pointers, and [`FfiFuture`]s (an `async-ffi` future: a boxed future plus `extern
//! "C"` poll and drop functions, polled with an FFI-safe waker). Arguments and results are
//! serialized: configuration as JSON bytes, topics as UTF-8 bytes, payloads as bytes, errors as a
//! [`ResultCode`] plus a UTF-8 message. Rust trait objects, `Arc`s, `String`s, `Bytes` and tokio
//! handles never cross: the two sides may be built by different compilers, with different
//! allocators and each with its own copy of tokio (a tokio in a dylib is a second tokio).
//!
//! # Ownership rules
//!
//! - A [`FfiSlice`] argument is borrowed for the duration of the call only: the plugin copies
//!   what it needs before the function returns (in particular before returning a future).
//! - A [`FfiBuffer`] in a result is owned by the plugin's allocator; the host copies it and hands
//!   it back through [`BrokerVTable::free_bytes`], exactly once.
//! - The [`SinkCallback`] given to [`BrokerVTable::create`] is owned by the plugin from that call
//!   on, whatever the outcome: the plugin may call `deliver` from any thread until it calls
//!   `release`, exactly once, after its last `deliver`.
//! - A [`BrokerHandle`] from a successful `create` is valid until the host passes it to
//!   [`BrokerVTable::destroy`], which the host does exactly once, after every future it got for
//!   that handle has completed or been dropped.
//! - Dropping a future cancels the work behind it, as with any Rust future.

use std::ffi::{CStr, c_char, c_void};

pub use async_ffi::FfiFuture;

/// The version of this ABI. A host refuses, without calling anything in it, a plugin whose
/// [`ABI_VERSION_SYMBOL`] static holds another number.
///
/// 2: the version moved from the descriptor (read by calling plugin code) to a static symbol.
pub const ABI_VERSION: u32 = 2;

/// The version of this SDK, as plugins built with it report it.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// [`SDK_VERSION`] NUL-terminated, for [`PluginDescriptor::sdk_version`].
pub const SDK_VERSION_C: &CStr =
    match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(version) => version,
        Err(_) => panic!("the package version contains a NUL byte"),
    };

/// The static every native plugin exports: a `u32` holding the [`ABI_VERSION`] it was built
/// against. Frozen from ABI 2 on (name and type), so any host can read any plugin's version.
pub const ABI_VERSION_SYMBOL: &CStr = c"SYNCRA_PLUGIN_ABI_VERSION";

/// The function every native plugin exports; its type is [`DescriptorFn`]. Called only after
/// [`ABI_VERSION_SYMBOL`] matched.
pub const DESCRIPTOR_SYMBOL: &CStr = c"syncra_plugin_descriptor";

/// The type of [`DESCRIPTOR_SYMBOL`]. The pointer it returns must point to static data that
/// lives as long as the library is loaded.
pub type DescriptorFn = unsafe extern "C" fn() -> *const PluginDescriptor;

// `FfiFuture`'s layout is part of this ABI. If async-ffi ever changes it (it bumps its own
// ABI_VERSION when it does), this stops compiling as a reminder to bump ours.
const _: () = assert!(
    async_ffi::ABI_VERSION == 2,
    "async-ffi changed the layout of FfiFuture: bump syncra's plugin ABI_VERSION"
);

/// What a plugin provides. A `u32`, not a Rust enum, because a value outside the known set from
/// a foreign library must be representable (a Rust enum with an unknown discriminant is
/// undefined behaviour).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PluginKind(pub u32);

impl PluginKind {
    /// A `syncra_core::Broker`; [`PluginDescriptor::vtable`] is a [`BrokerVTable`].
    pub const BROKER: PluginKind = PluginKind(1);
}

/// What [`DESCRIPTOR_SYMBOL`] points at.
#[repr(C)]
#[derive(Debug)]
pub struct PluginDescriptor {
    /// The [`ABI_VERSION`] the plugin was built against, the same number as its
    /// [`ABI_VERSION_SYMBOL`] static (the host checks that they agree).
    pub abi_version: u32,
    /// The SDK version the plugin was built with: static, NUL-terminated UTF-8.
    pub sdk_version: *const c_char,
    /// What the plugin provides.
    pub kind: PluginKind,
    /// The `kind` name the plugin registers under in the host's registry (for example
    /// `"redis-native"`): static, NUL-terminated UTF-8, not empty.
    pub name: *const c_char,
    /// The functions, static. A [`BrokerVTable`] for [`PluginKind::BROKER`].
    pub vtable: *const BrokerVTable,
}

// SAFETY: a descriptor is immutable once built and its pointers point to immutable static data
// (C strings and a table of function pointers), so sharing references to it between threads
// cannot race.
unsafe impl Sync for PluginDescriptor {}

/// Bytes borrowed from the caller for the duration of one call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FfiSlice {
    /// The first byte; may dangle (but not be null) when `len` is 0.
    pub ptr: *const u8,
    /// How many bytes.
    pub len: usize,
}

impl FfiSlice {
    /// Borrows `bytes` for a call.
    pub fn new(bytes: &[u8]) -> FfiSlice {
        FfiSlice {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }

    /// The bytes.
    ///
    /// # Safety
    ///
    /// Unless `len` is 0, `ptr` must point to `len` initialized bytes that stay valid and
    /// unchanged for `'a`.
    pub unsafe fn as_slice<'a>(self) -> &'a [u8] {
        if self.len == 0 || self.ptr.is_null() {
            return &[];
        }
        // SAFETY: non-null and, by this function's contract, valid for `len` bytes for `'a`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// Bytes allocated by the plugin and handed to the host, which gives them back through
/// [`BrokerVTable::free_bytes`]. Null with length 0 when empty.
#[repr(C)]
#[derive(Debug)]
pub struct FfiBuffer {
    /// The first byte, or null when empty.
    pub ptr: *mut u8,
    /// How many bytes.
    pub len: usize,
}

impl FfiBuffer {
    /// No bytes; freeing it is a no-op.
    pub const EMPTY: FfiBuffer = FfiBuffer {
        ptr: std::ptr::null_mut(),
        len: 0,
    };

    /// Hands `bytes` over; only [`FfiBuffer::into_boxed`] in the same library may take them back.
    pub fn new(bytes: Vec<u8>) -> FfiBuffer {
        if bytes.is_empty() {
            return FfiBuffer::EMPTY;
        }
        let boxed = bytes.into_boxed_slice();
        let len = boxed.len();
        FfiBuffer {
            ptr: Box::into_raw(boxed).cast::<u8>(),
            len,
        }
    }

    /// Takes the bytes back.
    ///
    /// # Safety
    ///
    /// `self` must come from [`FfiBuffer::new`] in this same library (this copy of the SDK, so
    /// this allocator), and must not have been taken back before.
    pub unsafe fn into_boxed(self) -> Box<[u8]> {
        if self.ptr.is_null() {
            return Box::default();
        }
        let slice = std::ptr::slice_from_raw_parts_mut(self.ptr, self.len);
        // SAFETY: by this function's contract the pointer and length are those of a
        // `Box<[u8]>` leaked by `FfiBuffer::new` with this allocator, taken back once.
        unsafe { Box::from_raw(slice) }
    }
}

/// The host's end of a broker's deliveries: a context pointer and the functions that use it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SinkCallback {
    /// The host's state; opaque to the plugin.
    pub ctx: *const c_void,
    /// Delivers one payload on a topic (UTF-8). Returns whether something local took it. The
    /// slices are borrowed for the call. Callable from any thread, must not block, never
    /// unwinds.
    pub deliver: unsafe extern "C" fn(
        ctx: *const c_void,
        topic_ptr: *const u8,
        topic_len: usize,
        payload_ptr: *const u8,
        payload_len: usize,
    ) -> bool,
    /// Frees `ctx`. The plugin calls it exactly once, after its last `deliver`, from any thread.
    pub release: unsafe extern "C" fn(ctx: *const c_void),
}

/// One broker instance inside the plugin; opaque to the host.
#[repr(transparent)]
#[derive(Clone, Copy, Debug)]
pub struct BrokerHandle(pub *mut c_void);

// SAFETY: a handle is an opaque token that the host only passes back to the plugin, which
// requires its instances to be usable from any thread (`syncra_core::Broker: Send + Sync`).
unsafe impl Send for BrokerHandle {}
// SAFETY: as above; the host never dereferences it.
unsafe impl Sync for BrokerHandle {}

/// The outcome of a call. A `u32`, not a Rust enum, for the same reason as [`PluginKind`]: a
/// host must be able to hold a code it does not know.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResultCode(pub u32);

impl ResultCode {
    /// Success.
    pub const OK: ResultCode = ResultCode(0);
    /// `BrokerError::Unavailable`; the message says why.
    pub const UNAVAILABLE: ResultCode = ResultCode(1);
    /// `BrokerError::BadTopic`; the message is the topic.
    pub const BAD_TOPIC: ResultCode = ResultCode(2);
    /// `BrokerError::TooLarge`; [`FfiResult::value`] is the size, [`FfiResult::limit`] the
    /// maximum.
    pub const TOO_LARGE: ResultCode = ResultCode(3);
    /// `create` only: `PluginError::Config`; the message says what is wrong, naming the key.
    pub const CONFIG: ResultCode = ResultCode(4);
    /// `create` only: `PluginError::Start`; the message says what went wrong.
    pub const START: ResultCode = ResultCode(5);
    /// The plugin panicked (the panic was caught inside it); the message is the panic's.
    pub const PANICKED: ResultCode = ResultCode(6);
}

/// The health of a broker, in [`FfiResult::value`] of a `health` call.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthState(pub u32);

impl HealthState {
    /// `Health::Up`.
    pub const UP: HealthState = HealthState(0);
    /// `Health::Degraded`; the message says what is wrong.
    pub const DEGRADED: HealthState = HealthState(1);
    /// `Health::Down`; the message says why.
    pub const DOWN: HealthState = HealthState(2);
}

/// The result of `publish`, `subscribe`, `unsubscribe` and `health`.
///
/// | call | `code` | `known` | `value` | `limit` | `message` |
/// |---|---|---|---|---|---|
/// | `publish` | `OK` | receivers are known | receivers | 0 | empty |
/// | `subscribe`, `unsubscribe` | `OK` | false | 0 | 0 | empty |
/// | `health` | `OK` | false | a [`HealthState`] | 0 | the detail |
/// | any | `TOO_LARGE` | false | size | maximum | empty |
/// | any | other errors | false | 0 | 0 | see [`ResultCode`] |
#[repr(C)]
#[derive(Debug)]
pub struct FfiResult {
    /// Success or which error.
    pub code: ResultCode,
    /// Whether `value` holds a receiver count (`publish`).
    pub known: bool,
    /// Per the table above.
    pub value: u64,
    /// Per the table above.
    pub limit: u64,
    /// UTF-8, per the table above.
    pub message: FfiBuffer,
}

/// The result of `create`.
#[repr(C)]
#[derive(Debug)]
pub struct CreateResult {
    /// [`ResultCode::OK`], or `CONFIG`, `START` or `PANICKED`.
    pub code: ResultCode,
    /// The new instance when `code` is `OK`; null otherwise.
    pub handle: BrokerHandle,
    /// UTF-8: why creation failed; empty on success.
    pub message: FfiBuffer,
}

/// A broker plugin's functions. Every function catches panics inside the plugin and reports
/// them as [`ResultCode::PANICKED`]; none unwinds into the host.
#[repr(C)]
#[derive(Debug)]
pub struct BrokerVTable {
    /// Creates an instance from its configuration (JSON, the plugin's config section without
    /// `kind`). Takes ownership of `sink` in every case (see the module's ownership rules).
    pub create:
        unsafe extern "C" fn(config: FfiSlice, sink: SinkCallback) -> FfiFuture<CreateResult>,
    /// `Broker::publish`.
    pub publish: unsafe extern "C" fn(
        handle: BrokerHandle,
        topic: FfiSlice,
        payload: FfiSlice,
    ) -> FfiFuture<FfiResult>,
    /// `Broker::subscribe`.
    pub subscribe:
        unsafe extern "C" fn(handle: BrokerHandle, topic: FfiSlice) -> FfiFuture<FfiResult>,
    /// `Broker::unsubscribe`.
    pub unsubscribe:
        unsafe extern "C" fn(handle: BrokerHandle, topic: FfiSlice) -> FfiFuture<FfiResult>,
    /// `Broker::health`.
    pub health: unsafe extern "C" fn(handle: BrokerHandle) -> FfiFuture<FfiResult>,
    /// Drops the instance. The handle is invalid afterwards.
    pub destroy: unsafe extern "C" fn(handle: BrokerHandle),
    /// Frees a buffer this plugin returned.
    pub free_bytes: unsafe extern "C" fn(buffer: FfiBuffer),
}

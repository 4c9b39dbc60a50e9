//! `syncra-example-native-bad-abi`: a test fixture, a native plugin library that claims plugin
//! ABI 999. A host must refuse it after reading the version and call nothing else in it.
//!
//! To catch a host that would call it anyway, the descriptor is otherwise a well-formed ABI 1
//! broker descriptor whose every vtable function is a tripwire: it counts the call (readable
//! through `syncra_fixture_vtable_calls`) and aborts the process. `syncra_fixture_descriptor_calls`
//! counts how often the host asked for the descriptor.
//!
//! It must never be built into anything but tests.

// Exporting symbols needs `#[unsafe(no_mangle)]`, which the workspace's `deny(unsafe_code)`
// forbids; this fixture exists to export hand-made symbols, and does nothing else unsafe.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU32, Ordering};

use syncra_plugin_sdk::abi::{
    BrokerHandle, BrokerVTable, CreateResult, FfiBuffer, FfiFuture, FfiResult, FfiSlice,
    PluginDescriptor, PluginKind, SDK_VERSION_C, SinkCallback,
};

/// The ABI version this fixture claims.
pub const FIXTURE_ABI_VERSION: u32 = 999;

static DESCRIPTOR_CALLS: AtomicU32 = AtomicU32::new(0);
static VTABLE_CALLS: AtomicU32 = AtomicU32::new(0);

fn tripwire() -> ! {
    VTABLE_CALLS.fetch_add(1, Ordering::SeqCst);
    eprintln!("syncra-example-native-bad-abi: a host called into a plugin of another ABI version");
    std::process::abort()
}

extern "C" fn create(_: FfiSlice, _: SinkCallback) -> FfiFuture<CreateResult> {
    tripwire()
}
extern "C" fn publish(_: BrokerHandle, _: FfiSlice, _: FfiSlice) -> FfiFuture<FfiResult> {
    tripwire()
}
extern "C" fn subscribe(_: BrokerHandle, _: FfiSlice) -> FfiFuture<FfiResult> {
    tripwire()
}
extern "C" fn unsubscribe(_: BrokerHandle, _: FfiSlice) -> FfiFuture<FfiResult> {
    tripwire()
}
extern "C" fn health(_: BrokerHandle) -> FfiFuture<FfiResult> {
    tripwire()
}
extern "C" fn destroy(_: BrokerHandle) {
    tripwire()
}
extern "C" fn free_bytes(_: FfiBuffer) {
    tripwire()
}

static VTABLE: BrokerVTable = BrokerVTable {
    create,
    publish,
    subscribe,
    unsubscribe,
    health,
    destroy,
    free_bytes,
};

static DESCRIPTOR: PluginDescriptor = PluginDescriptor {
    abi_version: FIXTURE_ABI_VERSION,
    sdk_version: SDK_VERSION_C.as_ptr(),
    kind: PluginKind::BROKER,
    name: c"bad-abi".as_ptr(),
    vtable: &VTABLE,
};

/// The descriptor, claiming ABI 999.
#[unsafe(no_mangle)]
pub extern "C" fn syncra_plugin_descriptor() -> *const PluginDescriptor {
    DESCRIPTOR_CALLS.fetch_add(1, Ordering::SeqCst);
    &DESCRIPTOR
}

/// How often the descriptor was asked for.
#[unsafe(no_mangle)]
pub extern "C" fn syncra_fixture_descriptor_calls() -> u32 {
    DESCRIPTOR_CALLS.load(Ordering::SeqCst)
}

/// How many vtable functions were called (each call also aborts the process).
#[unsafe(no_mangle)]
pub extern "C" fn syncra_fixture_vtable_calls() -> u32 {
    VTABLE_CALLS.load(Ordering::SeqCst)
}

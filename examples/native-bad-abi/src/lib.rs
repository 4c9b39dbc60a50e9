//! `syncra-example-native-bad-abi`: a test fixture, a native plugin library that claims plugin
//! ABI 999. A host must refuse it after reading its `SYNCRA_PLUGIN_ABI_VERSION` static, without
//! calling anything in it.
//!
//! To catch a host that would call it anyway, its descriptor function is a tripwire: it counts
//! the call (readable through `syncra_fixture_descriptor_calls`) and aborts the process, so a
//! host that runs plugin code before checking the version fails its test loudly.
//!
//! It must never be built into anything but tests.

// Exporting symbols needs `#[unsafe(no_mangle)]`, which the workspace's `deny(unsafe_code)`
// forbids; this fixture exists to export hand-made symbols, and does nothing else unsafe.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU32, Ordering};

use syncra_plugin_sdk::abi::PluginDescriptor;

/// The ABI version this fixture claims, as data the host reads without calling anything.
#[unsafe(no_mangle)]
pub static SYNCRA_PLUGIN_ABI_VERSION: u32 = 999;

static DESCRIPTOR_CALLS: AtomicU32 = AtomicU32::new(0);

/// The tripwire: a host must never call this in a library of another ABI version.
#[unsafe(no_mangle)]
pub extern "C" fn syncra_plugin_descriptor() -> *const PluginDescriptor {
    DESCRIPTOR_CALLS.fetch_add(1, Ordering::SeqCst);
    eprintln!("syncra-example-native-bad-abi: a host called into a plugin of another ABI version");
    std::process::abort()
}

/// How often the descriptor function was called (each call also aborts the process).
#[unsafe(no_mangle)]
pub extern "C" fn syncra_fixture_descriptor_calls() -> u32 {
    DESCRIPTOR_CALLS.load(Ordering::SeqCst)
}

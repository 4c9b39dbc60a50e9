//! `syncra-example-native-no-symbol`: a test fixture, a loadable shared library that does not
//! export `SYNCRA_PLUGIN_ABI_VERSION`, as when someone points the relay at the wrong `.so` or at
//! a plugin built before plugin ABI 2 (which exported only the descriptor function). A host must
//! refuse it as "not a Syncra native plugin" without calling anything in it.
//!
//! Like a pre-ABI-2 plugin it exports `syncra_plugin_descriptor`, here a tripwire that counts the
//! call (`syncra_fixture_descriptor_calls`) and aborts the process. It must never export the
//! version static.

// Exporting symbols needs `#[unsafe(no_mangle)]`, which the workspace's `deny(unsafe_code)`
// forbids; this fixture exists to export hand-made symbols, and does nothing else unsafe.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU32, Ordering};

static DESCRIPTOR_CALLS: AtomicU32 = AtomicU32::new(0);

/// The tripwire: a host must not call a descriptor function before it has read a version.
#[unsafe(no_mangle)]
pub extern "C" fn syncra_plugin_descriptor() -> *const u8 {
    DESCRIPTOR_CALLS.fetch_add(1, Ordering::SeqCst);
    eprintln!("syncra-example-native-no-symbol: a host called a plugin without a version symbol");
    std::process::abort()
}

/// How often the descriptor function was called (each call also aborts the process).
#[unsafe(no_mangle)]
pub extern "C" fn syncra_fixture_descriptor_calls() -> u32 {
    DESCRIPTOR_CALLS.load(Ordering::SeqCst)
}

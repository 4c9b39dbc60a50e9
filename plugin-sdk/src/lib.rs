//! `syncra-plugin-sdk`: the narrow, versioned C ABI for native plugins ([`abi`]), the
//! [`export_broker_plugin!`] macro that makes a crate a loadable plugin ([`plugin`]), the loader
//! hosts use (`host`, behind the `host` feature) and the WIT package (`wit/`) that WASM bots and
//! relay hooks are written against.
//!
//! It must never let a Rust trait object or a tokio handle cross the library boundary: only
//! `repr(C)` data, `extern "C"` functions and FFI-safe futures do, and a library built against
//! another ABI version is refused before anything in it is called. See `README.md`, "Native
//! plugins".

// This crate is the one place where Syncra crosses a C ABI: exporting and calling `extern "C"`
// functions, `#[unsafe(no_mangle)]` in the export macro, raw pointers to bytes owned by the
// other side, and loading libraries. That cannot be done without `unsafe`, so the workspace's
// `deny(unsafe_code)` is lifted here, and only here; every block is small and carries a
// `// SAFETY:` comment. Plugin crates that use the macro need no `unsafe` of their own.
#![allow(unsafe_code)]

pub mod abi;
#[cfg(feature = "host")]
pub mod host;
pub mod plugin;

#[cfg(all(test, feature = "host"))]
mod tests;

/// What the macros name, re-exported so plugin crates need not depend on these crates for them.
#[doc(hidden)]
pub mod __private {
    pub use syncra_core::error::PluginError;
    pub use syncra_core::{Broker, BrokerSink};
}

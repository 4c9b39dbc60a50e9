//! `syncra-plugin-sdk`: the narrow, versioned C ABI for native plugins, the `export_plugin!`
//! macro and the WIT package (`wit/`) that WASM bots and relay hooks are written against.
//!
//! It must never let a Rust trait object or a tokio handle cross the library boundary.
//!
//! Status: not built yet; the plugin platform issue fills this crate.

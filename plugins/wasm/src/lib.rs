//! `syncra-plugin-wasm`: the Wasmtime host that runs sandboxed WebAssembly bots and relay hooks.
//!
//! Status: not built yet; the plugin platform issue fills this crate.

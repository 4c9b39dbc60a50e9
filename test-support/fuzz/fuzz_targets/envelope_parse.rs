//! Fuzzes the routing-header parser a relay runs on every send — a sealed envelope's (version
//! 1) or an MLS carriage's (version 2), picked by the first byte: it must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use syncra_core::carriage::Routed;

fuzz_target!(|data: &[u8]| {
    let _ = Routed::parse(data);
});

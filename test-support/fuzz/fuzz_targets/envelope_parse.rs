//! Fuzzes the envelope header parser a relay runs on every send: it must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use syncra_core::crypto::envelope::parse_header;

fuzz_target!(|data: &[u8]| {
    let _ = parse_header(data);
});

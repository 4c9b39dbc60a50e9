//! Fuzzes the frame decoder: it must never panic, and whatever it accepts must re-encode to the
//! same bytes (the encoding is canonical).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use syncra_core::wire::{DEFAULT_MAX_FRAME, Frame};

fuzz_target!(|data: &[u8]| {
    let input = Bytes::copy_from_slice(data);
    if let Ok(frame) = Frame::decode(&input, DEFAULT_MAX_FRAME) {
        assert_eq!(frame.encode(), input, "decoded frame does not re-encode canonically");
    }
});

//! Fuzzes the relay's connection state machine end to end: a sequence of actions (fuzzed
//! frames, raw bytes, oversized frames, and valid logins, registrations, resumes, rotations and
//! sends signed by the harness) played against a real relay over its WebSocket. One relay lives
//! for the whole run; see `src/relay.rs` for the oracles (no panic or hang, no auth_ok without
//! a valid proof, deliveries only to their recipients, a pong after every input).
#![no_main]

use libfuzzer_sys::fuzz_target;
use syncra_fuzz::relay::{Action, Harness};

fuzz_target!(|actions: Vec<Action>| {
    Harness::get().run(&actions);
});

//! `syncra-bench`: criterion benchmarks of the cryptography (see `benches/`) and the
//! `syncra-load` load generator (`src/bin/syncra-load.rs`, scenarios in `scenarios/`).
//!
//! The load generator speaks the client side of the wire protocol itself (register, log in,
//! send sealed envelopes, receive deliveries) and, as the reference peer, the NATS text protocol
//! over WebSocket. It measures what the relay does under load: delivered messages per second,
//! latency percentiles, lost messages, and the relay's CPU time and memory read from `/proc`.
//!
//! What it must never do: send load anywhere but the URLs it is given (the scenarios only ever
//! start servers on loopback), run unbounded (every phase has a deadline), or assert timing —
//! it reports numbers; people judge them (`docs/BENCHMARKS.md`).

pub mod idle;
pub mod load;
pub mod mailbox;
pub mod nats;
pub mod procstat;
pub mod report;
pub mod soak;
pub mod syncra;
pub mod ws;

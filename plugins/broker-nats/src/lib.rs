//! `syncra-broker-nats`: a `Broker` on NATS (async-nats) for multi-node relays.
//!
//! Status: not built yet; the scale-out issue fills this crate.

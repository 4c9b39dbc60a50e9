//! `syncra-broker-redis`: a `Broker` on Redis pub/sub for multi-node relays.
//!
//! Status: not built yet; the scale-out issue fills this crate.

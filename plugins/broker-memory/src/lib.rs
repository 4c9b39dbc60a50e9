//! `syncra-broker-memory`: the in-process `Broker` used by a single relay node (the default).
//!
//! Status: not built yet; the relay issue fills this crate.

//! `syncra-relay`: the blind relay host.
//!
//! Status: not built yet; the relay issue fills this crate.

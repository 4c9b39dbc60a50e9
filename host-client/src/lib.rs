//! `syncra-client`: the client library and the `syncra` binary.
//!
//! Status: not built yet; the client issue fills this crate.

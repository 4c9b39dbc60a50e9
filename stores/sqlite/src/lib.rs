//! `syncra-store-sqlite`: the embedded default `IdentityStore` on SQLite.
//!
//! Status: not built yet; the relay issue fills this crate.

//! `syncra-store-postgres`: an `IdentityStore` on Postgres (and Neon, which is Postgres over TLS).
//!
//! Status: not built yet; the Postgres issue fills this crate.

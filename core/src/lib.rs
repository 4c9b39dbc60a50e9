//! `syncra-core`: the contracts, domain types, wire protocol, end-to-end cryptography and plugin
//! registry that every other Syncra crate builds on.
//!
//! The rule this crate exists to keep: *assume the relay is malicious*. Everything that needs
//! plaintext or a private key lives in [`crypto`] and runs in clients; the relay uses this crate
//! only to decode frames, read envelope headers and verify public signatures.
//!
//! This crate must never depend on an implementation: no sqlx, tungstenite, redis, nats,
//! ratatui, wasmtime or libloading. Implementations live in their own crates and plug in through
//! the traits here ([`Transport`], [`Broker`], [`IdentityStore`], [`UiFrontend`]) and the
//! [`registry`]. CI checks this with `cargo tree`.

pub mod broker;
pub mod carriage;
pub mod crypto;
pub mod error;
pub mod health;
pub mod id;
pub mod mailbox;
pub mod record;
pub mod redact;
pub mod registry;
mod serde_b64;
pub mod store;
pub mod text;
pub mod time;
pub mod transport;
pub mod ui;
pub mod wire;

pub use broker::{Broker, BrokerSink, Confirm, PublishReceipt};
pub use error::Error;
pub use health::Health;
pub use id::{Handle, UserId};
pub use mailbox::Mailbox;
pub use record::IdentityRecord;
pub use store::IdentityStore;
pub use transport::Transport;
pub use ui::UiFrontend;

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

//! `syncra-client`: the Syncra client library and the `syncra` binary.
//!
//! Everything that needs a private key or a plaintext lives here and in `syncra-core`: the key
//! file, pinned contacts, client-side groups, encrypted local history, the outbox and the
//! relay connection. The terminal UI, the headless commands and the bot runner all drive the
//! same [`Client`]; the binary is a thin shell around it.
//!
//! What it must never do: send to a contact whose key changed before the person re-verified,
//! lose a message someone typed (the outbox is written before anything is sent), write a secret
//! or a plaintext to disk unencrypted, or trust the relay's word for a key.

pub mod app;
pub mod bot;
pub mod client;
pub mod contacts;
pub mod history;
pub mod home;
pub mod keystore;
pub mod message;
pub mod mls;
pub mod net;
pub mod outbox;
pub mod replay;
pub mod serve;

pub use client::{Client, Incoming, InitOptions, SendReport, SendState, Target};
pub use home::Home;

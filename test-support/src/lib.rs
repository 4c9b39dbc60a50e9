//! `syncra-test-support`: the trait conformance suites, helpers that spawn real servers on free
//! ports, and fixtures shared by Syncra's tests. It depends on `syncra-core` only; the in-process
//! relay and its raw protocol client live apart, in `syncra-test-relay` (`test-support/relay`).
//!
//! Why it exists: every implementation of a core contract (an identity store, a broker) must
//! behave the same way, so the rules are tested once, here, and each implementation's
//! `tests/conformance.rs` runs the same suite against itself. A suite that passes for SQLite and
//! fails for Postgres is a bug in one of them, never a difference in the tests.
//!
//! This crate is for tests only: it must never be a normal dependency of a library or binary,
//! and nothing in it may be used to make keys that protect real messages. Its helpers panic on
//! failure, because a panic is how a test reports one.

pub mod broker;
pub mod fixtures;
pub mod latency;
pub mod mailbox;
pub mod postgres;
pub mod process;
pub mod servers;
pub mod store;

pub use broker::{Deliveries, Delivery, RecordingSink, broker_conformance};
pub use fixtures::{FIXTURE_PREKEY_CREATED_AT, test_identity, unique_name};
pub use mailbox::mailbox_conformance;
pub use store::identity_store_conformance;

use std::time::Duration;

/// How long a suite waits for something that should happen. Generous on purpose: it is a
/// deadline for a hung implementation, not a performance assertion, and CI machines are slow.
pub const DEADLINE: Duration = Duration::from_secs(10);

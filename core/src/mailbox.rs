//! The `Mailbox` contract: sealed deliveries held for recipients who are not connected.
//!
//! Why this shape: the relay stays blind — a mailbox holds the same sealed `Deliver` bytes a
//! live session would have received, keyed by recipient, and nothing else — and stores differ
//! only in how they persist (SQLite, Postgres, Redis Streams, NATS JetStream, or nothing at
//! all), not in the rules. The rules every implementation keeps, checked by one conformance
//! suite in `syncra-test-support`:
//!
//! - **Order.** Entry ids increase per recipient in the order [`Mailbox::put`] returned; `take`
//!   returns entries in that order. MLS handshakes depend on it.
//! - **At least once.** An entry leaves the mailbox only when the recipient acknowledges it (all
//!   entries up to an id) or it expires. A crash between sending an entry and its
//!   acknowledgement sends it again; clients show a message id once.
//! - **Durability.** `put` returns only once the entry survives the mailbox's process (and, for
//!   a database, the database server) being killed.
//! - **Bounds.** Each recipient's entries are bounded in count and bytes ([`MailboxLimits`]);
//!   a put beyond them is refused with [`PutOutcome::Full`], never silently dropped. Entries
//!   older than the TTL are neither returned nor kept.

use async_trait::async_trait;
use bytes::Bytes;

use crate::health::Health;
use crate::id::UserId;

/// Why a mailbox call failed. A failure is never a silent loss: the relay answers the sender
/// `rejected: mailbox_unavailable` and the sender's outbox retries.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MailboxError {
    /// The backend is down, refused, or did not answer in time; the text says which.
    #[error("mailbox unavailable: {0}")]
    Unavailable(String),
    /// The backend returned something that is not a valid entry (a corrupt row).
    #[error("mailbox entry is corrupt: {0}")]
    Corrupt(String),
}

/// Per-recipient bounds and retention, the same for every backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MailboxLimits {
    /// How long an entry is kept, in milliseconds.
    pub ttl_ms: u64,
    /// Most entries held for one recipient.
    pub max_entries: u64,
    /// Most bytes (of deliveries) held for one recipient.
    pub max_bytes: u64,
}

impl Default for MailboxLimits {
    fn default() -> Self {
        MailboxLimits {
            ttl_ms: 7 * 24 * 3600 * 1000,
            max_entries: 10_000,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// What a put did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// Stored durably under this entry id.
    Stored(u64),
    /// Refused: the recipient's mailbox is at its count or byte quota.
    Full,
}

/// One held delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailboxEntry {
    /// Increasing per recipient.
    pub id: u64,
    /// When it was stored (milliseconds since the epoch).
    pub stored_at_ms: u64,
    /// The sealed delivery (the envelope bytes).
    pub delivery: Bytes,
}

/// Where a relay holds sealed deliveries for recipients with no live session.
#[async_trait]
pub trait Mailbox: Send + Sync {
    /// The kind name this mailbox registered under.
    fn kind(&self) -> &'static str;

    /// Whether this mailbox stores anything. `false` only for `none`, the strict stateless
    /// relay: the sender is then told `offline` instead of `stored`.
    fn stores(&self) -> bool {
        true
    }

    /// Whether only the relays (or writers as strong as a relay, such as the identity store's
    /// database) can write to this mailbox's backend. `false` (the default) for a backend other
    /// clients can reach, such as a broker's server: the relay then MACs every entry and hands
    /// out only those that verify (`host-relay/src/sealed_mailbox.rs`).
    fn relays_only(&self) -> bool {
        false
    }

    /// Stores a delivery for `recipient`, durably, unless its quota is reached.
    async fn put(
        &self,
        recipient: &UserId,
        delivery: Bytes,
        now_ms: u64,
    ) -> Result<PutOutcome, MailboxError>;

    /// Up to `max` unexpired entries of `recipient` with an id above `after`, in order.
    async fn take(
        &self,
        recipient: &UserId,
        after: u64,
        max: usize,
        now_ms: u64,
    ) -> Result<Vec<MailboxEntry>, MailboxError>;

    /// Deletes `recipient`'s entries up to and including `up_to`.
    async fn ack(&self, recipient: &UserId, up_to: u64) -> Result<(), MailboxError>;

    /// Deletes every entry of `recipient`; returns how many there were.
    async fn clear(&self, recipient: &UserId) -> Result<u64, MailboxError>;

    /// Deletes every entry older than the TTL; returns how many.
    async fn expire(&self, now_ms: u64) -> Result<u64, MailboxError>;

    /// Whether the backend is reachable.
    async fn health(&self) -> Health {
        Health::Up
    }
}

/// The `none` mailbox: the blueprint's strict stateless relay. It stores nothing; a message to
/// someone who is not connected is answered `offline`.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoMailbox;

#[async_trait]
impl Mailbox for NoMailbox {
    fn kind(&self) -> &'static str {
        "none"
    }

    fn stores(&self) -> bool {
        false
    }

    async fn put(&self, _: &UserId, _: Bytes, _: u64) -> Result<PutOutcome, MailboxError> {
        Err(MailboxError::Unavailable(
            "this relay keeps no mailbox ([mailbox] kind = \"none\")".into(),
        ))
    }

    async fn take(
        &self,
        _: &UserId,
        _: u64,
        _: usize,
        _: u64,
    ) -> Result<Vec<MailboxEntry>, MailboxError> {
        Ok(Vec::new())
    }

    async fn ack(&self, _: &UserId, _: u64) -> Result<(), MailboxError> {
        Ok(())
    }

    async fn clear(&self, _: &UserId) -> Result<u64, MailboxError> {
        Ok(0)
    }

    async fn expire(&self, _: u64) -> Result<u64, MailboxError> {
        Ok(0)
    }
}

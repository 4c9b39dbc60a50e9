//! Mailbox entries that a relay of this cluster stored, told apart from everything else.
//!
//! # Why
//!
//! The mailbox backends a cluster shares (NATS JetStream, Redis Streams) live on the broker's
//! servers, which are a trust boundary (docs/THREAT_MODEL.md §2.2): anyone who can connect to
//! them can append to a recipient's stream, not only the relays. Before this, such an entry
//! was handed to the recipient's sessions as a `Pending` frame like any other — a keyless
//! broker user reaching a user's sessions, which the threat model says cannot happen.
//!
//! So every entry is stored as `MAC (16 bytes) || delivery`, the MAC being keyed BLAKE3 over
//! the recipient's id and the delivery, under a key derived from the cluster key (which every
//! node has and the broker does not). A take returns only entries whose MAC verifies, without
//! it; the others are skipped, counted (`syncra_relay_mailbox_foreign_total`) and logged once
//! per window, and the take goes on past them, so a genuine entry behind a foreign one is still
//! delivered. The recipient's id is covered so that an entry copied into another user's stream
//! does not verify there. What the MAC does not stop, because a backend's writer can do it
//! anyway: deleting entries, reordering or copying them within one recipient's stream (the
//! client shows a message id once), or filling a recipient's quota (an availability attack,
//! like dropping broker traffic; keep the backend's credentials to the relays, DEPLOY.md).
//!
//! Applied to the mailboxes whose backend is shared with other clients: Redis and NATS (and any
//! kind that does not say otherwise, [`Mailbox::relays_only`]). Not to SQLite (a file of the
//! relay's own) or Postgres (the identity store's database, whose writers are as strong as the
//! relay, THREAT_MODEL.md §2.3):
//! there the MAC would guard against no one, and it would drop every held entry when the token
//! key is rotated or the relay is upgraded across this change. With the MAC, the byte quota
//! counts what is stored — each delivery and its 16-byte MAC — and rotating the token key (the
//! cluster key's seed) or upgrading from a relay without the MAC leaves the entries held then
//! unreadable: drain the mailbox first (docs/DEPLOY.md).
//!
//! Must never: hand out an entry whose MAC does not verify, or stop at a foreign entry while
//! genuine ones follow it.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use subtle::ConstantTimeEq;
use syncra_core::mailbox::{Mailbox, MailboxEntry, MailboxError, PutOutcome};
use syncra_core::{Health, UserId};
use zeroize::Zeroizing;

use crate::metrics::Metrics;

/// Bytes of MAC in front of every stored delivery (BLAKE3's output, truncated: 128 bits).
pub const MAC_LEN: usize = 16;

/// The key derivation's context: a key for this purpose only.
const CONTEXT: &str = "syncra 2026-12-07 mailbox entry MAC v1";

/// Foreign entries one take skips at most before it gives up with `Corrupt` (the genuine
/// entries after them wait in the mailbox for the next take; memory and time stay bounded
/// whatever a backend's writer appended).
pub const MAX_FOREIGN_PER_TAKE: usize = 65_536;

/// A [`Mailbox`] whose entries carry a MAC under the cluster's key.
pub struct SealedMailbox {
    inner: Arc<dyn Mailbox>,
    key: Zeroizing<[u8; 32]>,
    metrics: Arc<Metrics>,
    /// [`MAX_FOREIGN_PER_TAKE`] (smaller in tests).
    max_foreign: usize,
}

impl std::fmt::Debug for SealedMailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedMailbox")
            .field("inner", &self.inner.kind())
            .finish_non_exhaustive()
    }
}

impl SealedMailbox {
    /// Whether `inner`'s entries get a MAC: it stores, and others than the relays can write
    /// to its backend ([`Mailbox::relays_only`]).
    pub fn wanted(inner: &dyn Mailbox) -> bool {
        inner.stores() && !inner.relays_only()
    }

    /// `inner`, with entries MAC'd under a key derived from `cluster_key`.
    pub fn new(inner: Arc<dyn Mailbox>, cluster_key: &[u8; 32], metrics: Arc<Metrics>) -> Self {
        SealedMailbox {
            inner,
            key: Zeroizing::new(blake3::derive_key(CONTEXT, cluster_key)),
            metrics,
            max_foreign: MAX_FOREIGN_PER_TAKE,
        }
    }

    fn mac(&self, recipient: &UserId, delivery: &[u8]) -> [u8; MAC_LEN] {
        let mut hasher = blake3::Hasher::new_keyed(&self.key);
        hasher.update(recipient.as_bytes());
        hasher.update(delivery);
        let mut mac = [0u8; MAC_LEN];
        hasher.finalize_xof().fill(&mut mac);
        mac
    }

    /// The delivery of a stored entry, if its MAC verifies (compared in constant time).
    fn open(&self, recipient: &UserId, stored: &Bytes) -> Option<Bytes> {
        let (mac, delivery) = stored.split_first_chunk::<MAC_LEN>()?;
        bool::from(mac.ct_eq(&self.mac(recipient, delivery))).then(|| stored.slice(MAC_LEN..))
    }
}

#[async_trait]
impl Mailbox for SealedMailbox {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn stores(&self) -> bool {
        self.inner.stores()
    }

    async fn put(
        &self,
        recipient: &UserId,
        delivery: Bytes,
        now_ms: u64,
    ) -> Result<PutOutcome, MailboxError> {
        let mut stored = BytesMut::with_capacity(MAC_LEN + delivery.len());
        stored.put_slice(&self.mac(recipient, &delivery));
        stored.put_slice(&delivery);
        self.inner.put(recipient, stored.freeze(), now_ms).await
    }

    /// Reads on past foreign entries until `max` genuine ones are found or the mailbox has no
    /// more, so that a caller which stops at a short page (the login backlog does) misses
    /// nothing.
    async fn take(
        &self,
        recipient: &UserId,
        after: u64,
        max: usize,
        now_ms: u64,
    ) -> Result<Vec<MailboxEntry>, MailboxError> {
        let mut out = Vec::new();
        let mut from = after;
        let mut foreign = 0usize;
        let result = loop {
            let want = max - out.len();
            if want == 0 {
                break Ok(());
            }
            let page = match self.inner.take(recipient, from, want, now_ms).await {
                Ok(page) => page,
                Err(e) => break Err(e),
            };
            let short = page.len() < want;
            for entry in page {
                from = entry.id;
                match self.open(recipient, &entry.delivery) {
                    Some(delivery) => out.push(MailboxEntry { delivery, ..entry }),
                    None => foreign += 1,
                }
            }
            if short {
                break Ok(());
            }
            if foreign > self.max_foreign {
                break Err(MailboxError::Corrupt(format!(
                    "more than {} entries in a row in this recipient's mailbox were not stored \
                     by a relay of this cluster (their MAC is missing or wrong); the entries \
                     after them cannot be read until those are gone (acknowledged, expired or \
                     cleared)",
                    self.max_foreign
                )));
            }
        };
        if foreign > 0 {
            self.metrics.mailbox_foreign(foreign as u64);
        }
        // What was read before a failure is handed out: the caller's cursor moves past it, and
        // the rest is read again next time.
        match result {
            Err(e) if out.is_empty() => Err(e),
            _ => Ok(out),
        }
    }

    async fn ack(&self, recipient: &UserId, up_to: u64) -> Result<(), MailboxError> {
        self.inner.ack(recipient, up_to).await
    }

    async fn clear(&self, recipient: &UserId) -> Result<u64, MailboxError> {
        self.inner.clear(recipient).await
    }

    async fn expire(&self, now_ms: u64) -> Result<u64, MailboxError> {
        self.inner.expire(now_ms).await
    }

    async fn health(&self) -> Health {
        self.inner.health().await
    }
}

#[cfg(test)]
#[cfg(feature = "store-sqlite")]
mod tests {
    use super::*;
    use syncra_core::mailbox::MailboxLimits;

    const NOW: u64 = 1_800_000_000_000;

    fn user(n: u8) -> UserId {
        UserId::from_identity_key(&[n; 32])
    }

    async fn sqlite(dir: &std::path::Path) -> Arc<dyn Mailbox> {
        let limits = MailboxLimits {
            max_entries: 20_000,
            ..MailboxLimits::default()
        };
        Arc::new(
            syncra_store_sqlite::mailbox::SqliteMailbox::open(&dir.join("m.db"), limits)
                .await
                .unwrap(),
        )
    }

    fn sealed(inner: &Arc<dyn Mailbox>, key: u8) -> (SealedMailbox, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        (
            SealedMailbox::new(inner.clone(), &[key; 32], metrics.clone()),
            metrics,
        )
    }

    async fn bodies(m: &dyn Mailbox, to: &UserId, max: usize) -> Vec<Vec<u8>> {
        m.take(to, 0, max, NOW)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.delivery.to_vec())
            .collect()
    }

    /// The relay's own SQLite file and the identity store's Postgres get no MAC (their writers
    /// are the relay or as strong as it; a MAC there would only drop held entries at a token
    /// key rotation), nor does `none`; a shared backend does (`redis_…`/`nats_foreign_entries_…`
    /// in `host-relay/tests/mailbox.rs`).
    #[tokio::test]
    async fn only_shared_backends_get_the_mac() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!SealedMailbox::wanted(sqlite(dir.path()).await.as_ref()));
        assert!(!SealedMailbox::wanted(&syncra_core::mailbox::NoMailbox));
    }

    /// What the backend holds is the MAC and the delivery; a take gives the delivery back.
    #[tokio::test]
    async fn an_entry_is_stored_with_its_mac_and_taken_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let inner = sqlite(dir.path()).await;
        let (m, metrics) = sealed(&inner, 1);
        m.put(&user(1), Bytes::from_static(b"hello"), NOW)
            .await
            .unwrap();
        let raw = inner.take(&user(1), 0, 10, NOW).await.unwrap();
        assert_eq!(raw.len(), 1);
        assert_eq!(raw[0].delivery.len(), MAC_LEN + 5);
        assert_eq!(&raw[0].delivery[MAC_LEN..], b"hello");
        assert_eq!(bodies(&m, &user(1), 10).await, vec![b"hello".to_vec()]);
        assert_eq!(metrics.mailbox_foreign.get(), 0);
    }

    /// Entries appended by someone else — no MAC, a made-up one, another cluster's, one MAC'd
    /// for another recipient, a genuine entry with a byte changed — are skipped and counted;
    /// the genuine entries around them come out in order.
    #[tokio::test]
    async fn foreign_entries_are_skipped_and_counted_and_genuine_ones_still_come_out() {
        let dir = tempfile::tempdir().unwrap();
        let inner = sqlite(dir.path()).await;
        let (m, metrics) = sealed(&inner, 1);
        let (other_cluster, _) = sealed(&inner, 2);
        let to = user(1);
        m.put(&to, Bytes::from_static(b"first"), NOW).await.unwrap();
        inner
            .put(&to, Bytes::from_static(b"no mac at all"), NOW)
            .await
            .unwrap();
        inner
            .put(&to, Bytes::from(vec![0u8; MAC_LEN + 10]), NOW)
            .await
            .unwrap();
        inner.put(&to, Bytes::new(), NOW).await.unwrap();
        other_cluster
            .put(&to, Bytes::from_static(b"other cluster"), NOW)
            .await
            .unwrap();
        let mut moved = BytesMut::new();
        moved.put_slice(&m.mac(&user(2), b"for someone else"));
        moved.put_slice(b"for someone else");
        inner.put(&to, moved.freeze(), NOW).await.unwrap();
        let mut altered = BytesMut::new();
        altered.put_slice(&m.mac(&to, b"genuine"));
        altered.put_slice(b"genuinE");
        inner.put(&to, altered.freeze(), NOW).await.unwrap();
        m.put(&to, Bytes::from_static(b"second"), NOW)
            .await
            .unwrap();
        assert_eq!(
            bodies(&m, &to, 10).await,
            vec![b"first".to_vec(), b"second".to_vec()]
        );
        assert_eq!(metrics.mailbox_foreign.get(), 6);
    }

    /// A page full of foreign entries does not end the read: a caller that stops at a short
    /// page (the login backlog) still gets the genuine entries behind them.
    #[tokio::test]
    async fn a_page_of_foreign_entries_does_not_hide_what_follows() {
        let dir = tempfile::tempdir().unwrap();
        let inner = sqlite(dir.path()).await;
        let (m, _) = sealed(&inner, 1);
        let to = user(1);
        for _ in 0..25 {
            inner
                .put(&to, Bytes::from_static(b"junk"), NOW)
                .await
                .unwrap();
        }
        for body in [b"a", b"b", b"c"] {
            m.put(&to, Bytes::from_static(body), NOW).await.unwrap();
        }
        let first = m.take(&to, 0, 2, NOW).await.unwrap();
        assert_eq!(
            first.iter().map(|e| &e.delivery[..]).collect::<Vec<_>>(),
            [b"a", b"b"]
        );
        let rest = m.take(&to, first[1].id, 2, NOW).await.unwrap();
        assert_eq!(
            rest.iter().map(|e| &e.delivery[..]).collect::<Vec<_>>(),
            [b"c"]
        );
    }

    /// More foreign entries in a row than one take skips: a clear error, nothing handed out,
    /// the genuine entry still there for a later read.
    #[tokio::test]
    async fn a_flood_of_foreign_entries_is_an_error_not_an_endless_read() {
        let dir = tempfile::tempdir().unwrap();
        let inner = sqlite(dir.path()).await;
        let (mut m, metrics) = sealed(&inner, 1);
        m.max_foreign = 1000;
        let to = user(1);
        for _ in 0..=1300 {
            inner.put(&to, Bytes::from_static(b"x"), NOW).await.unwrap();
        }
        m.put(&to, Bytes::from_static(b"real"), NOW).await.unwrap();
        let err = m.take(&to, 0, 256, NOW).await.unwrap_err();
        assert!(
            matches!(&err, MailboxError::Corrupt(why) if why.contains("not stored by a relay")),
            "{err}"
        );
        assert!(metrics.mailbox_foreign.get() > 1000);
        let raw = inner.take(&to, 0, 10_000, NOW).await.unwrap();
        assert_eq!(&raw.last().unwrap().delivery[MAC_LEN..], b"real");
    }
}

//! `[mailbox] kind = "postgres"`: sealed deliveries for recipients who are not connected, in
//! the same Postgres (or Neon) database as the identities, shared by every node of a cluster.
//!
//! Each put is one transaction with one statement that locks the recipient's usage row, checks
//! the quota, counts the usage up and adds the entry under the next id: entries of one recipient
//! get ids in commit order, and a put is answered only once committed (with
//! `synchronous_commit = on`, whatever the server's default). It holds sealed bytes only.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::Row;
use syncra_core::error::{PluginError, StoreError};
use syncra_core::mailbox::{Mailbox, MailboxEntry, MailboxError, MailboxLimits, PutOutcome};
use syncra_core::registry::{Kinds, typed_config};
use syncra_core::{Health, IdentityStore, UserId};

use crate::{KIND, PostgresConfig, PostgresStore};

/// A [`Mailbox`] in Postgres.
#[derive(Clone, Debug)]
pub struct PostgresMailbox {
    db: PostgresStore,
    limits: MailboxLimits,
}

fn unavailable(e: StoreError) -> MailboxError {
    MailboxError::Unavailable(e.to_string())
}

impl PostgresMailbox {
    /// Connects (running the migrations, which include the mailbox tables).
    pub async fn connect(
        config: &PostgresConfig,
        limits: MailboxLimits,
    ) -> Result<Self, MailboxError> {
        let db = PostgresStore::connect(config).await.map_err(unavailable)?;
        Ok(PostgresMailbox { db, limits })
    }

    async fn delete_up_to(&self, recipient: &UserId, up_to: u64) -> Result<u64, MailboxError> {
        let action = "acknowledging mailbox entries";
        let db = &self.db;
        let up_to = up_to.min(i64::MAX as u64) as i64;
        db.bounded(action, async {
            let mut tx = db.begin(&db.begin_write, action).await?;
            let row = sqlx::query(
                "WITH gone AS (DELETE FROM mailbox WHERE recipient = $1 AND id <= $2 \
                 RETURNING octet_length(delivery) AS size) \
                 SELECT count(*)::BIGINT, coalesce(sum(size), 0)::BIGINT FROM gone",
            )
            .persistent(db.persistent)
            .bind(recipient.as_bytes().as_slice())
            .bind(up_to)
            .fetch_one(&mut *tx)
            .await
            .map_err(db.failed(action))?;
            let (entries, bytes): (i64, i64) = (
                row.try_get(0).map_err(db.failed(action))?,
                row.try_get(1).map_err(db.failed(action))?,
            );
            if entries > 0 {
                sqlx::query(
                    "UPDATE mailbox_usage SET entries = greatest(entries - $2, 0), \
                     bytes = greatest(bytes - $3, 0) WHERE recipient = $1",
                )
                .persistent(db.persistent)
                .bind(recipient.as_bytes().as_slice())
                .bind(entries)
                .bind(bytes)
                .execute(&mut *tx)
                .await
                .map_err(db.failed(action))?;
            }
            tx.commit().await.map_err(db.failed(action))?;
            Ok(entries.cast_unsigned())
        })
        .await
        .map_err(unavailable)
    }
}

#[async_trait]
impl Mailbox for PostgresMailbox {
    fn kind(&self) -> &'static str {
        KIND
    }

    /// The identity store's database, whose writers are as strong as a relay
    /// (docs/THREAT_MODEL.md §2.3).
    fn relays_only(&self) -> bool {
        true
    }

    async fn put(
        &self,
        recipient: &UserId,
        delivery: Bytes,
        now_ms: u64,
    ) -> Result<PutOutcome, MailboxError> {
        let action = "storing a mailbox entry";
        let db = &self.db;
        let key = recipient.as_bytes().as_slice();
        let size = delivery.len() as i64;
        // A first entry is inserted with the usage row whatever the quota says below.
        if size.cast_unsigned() > self.limits.max_bytes {
            return Ok(PutOutcome::Full);
        }
        db.bounded(action, async {
            let mut tx = db.begin(&db.begin_write, action).await?;
            // One statement: the usage row is created or, within the quota, counted up under its
            // row lock (which orders concurrent puts for one recipient), and the entry takes the
            // id it hands out. Beyond the quota the update matches nothing, so nothing is
            // inserted and no id is returned. Three round trips per put (begin, this, commit)
            // instead of six.
            let id: Option<i64> = sqlx::query_scalar(
                "WITH usage AS ( \
                     INSERT INTO mailbox_usage AS u (recipient, entries, bytes, next_id) \
                     VALUES ($1, 1, $2, 2) \
                     ON CONFLICT (recipient) DO UPDATE \
                         SET entries = u.entries + 1, bytes = u.bytes + $2, next_id = u.next_id + 1 \
                         WHERE u.entries < $3 AND u.bytes + $2 <= $4 \
                     RETURNING u.next_id - 1 AS id \
                 ) \
                 INSERT INTO mailbox (recipient, id, stored_at, delivery) \
                 SELECT $1, id, $5, $6 FROM usage RETURNING id",
            )
            .persistent(db.persistent)
            .bind(key)
            .bind(size)
            .bind(self.limits.max_entries.min(i64::MAX as u64) as i64)
            .bind(self.limits.max_bytes.min(i64::MAX as u64) as i64)
            .bind(now_ms.min(i64::MAX as u64) as i64)
            .bind(delivery.as_ref())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db.failed(action))?;
            let Some(id) = id else {
                // Nothing was written; the transaction only took the row lock.
                tx.rollback().await.map_err(db.failed(action))?;
                return Ok(PutOutcome::Full);
            };
            tx.commit().await.map_err(db.failed(action))?;
            Ok(PutOutcome::Stored(id.cast_unsigned()))
        })
        .await
        .map_err(unavailable)
    }

    async fn take(
        &self,
        recipient: &UserId,
        after: u64,
        max: usize,
        now_ms: u64,
    ) -> Result<Vec<MailboxEntry>, MailboxError> {
        let action = "reading a mailbox";
        let db = &self.db;
        let oldest = now_ms
            .saturating_sub(self.limits.ttl_ms)
            .min(i64::MAX as u64) as i64;
        let rows = db
            .bounded(action, async {
                let mut tx = db.begin(&db.begin_read, action).await?;
                let rows = sqlx::query(
                    "SELECT id, stored_at, delivery FROM mailbox WHERE recipient = $1 AND id > $2 \
                     AND stored_at >= $3 ORDER BY id LIMIT $4",
                )
                .persistent(db.persistent)
                .bind(recipient.as_bytes().as_slice())
                .bind(after.min(i64::MAX as u64) as i64)
                .bind(oldest)
                .bind(max.min(i64::MAX as usize) as i64)
                .fetch_all(&mut *tx)
                .await
                .map_err(db.failed(action))?;
                tx.commit().await.map_err(db.failed(action))?;
                Ok(rows)
            })
            .await
            .map_err(unavailable)?;
        rows.into_iter()
            .map(|r| {
                let corrupt = |e: sqlx::Error| MailboxError::Corrupt(e.to_string());
                let id: i64 = r.try_get(0).map_err(corrupt)?;
                let stored_at: i64 = r.try_get(1).map_err(corrupt)?;
                let delivery: Vec<u8> = r.try_get(2).map_err(corrupt)?;
                Ok(MailboxEntry {
                    id: id.cast_unsigned(),
                    stored_at_ms: stored_at.cast_unsigned(),
                    delivery: Bytes::from(delivery),
                })
            })
            .collect()
    }

    async fn ack(&self, recipient: &UserId, up_to: u64) -> Result<(), MailboxError> {
        self.delete_up_to(recipient, up_to).await.map(|_| ())
    }

    async fn clear(&self, recipient: &UserId) -> Result<u64, MailboxError> {
        self.delete_up_to(recipient, u64::MAX).await
    }

    async fn expire(&self, now_ms: u64) -> Result<u64, MailboxError> {
        let action = "purging expired mailbox entries";
        let db = &self.db;
        let cutoff = now_ms
            .saturating_sub(self.limits.ttl_ms)
            .min(i64::MAX as u64) as i64;
        db.bounded(action, async {
            let mut tx = db.begin(&db.begin_write, action).await?;
            let row = sqlx::query(
                "WITH gone AS (DELETE FROM mailbox WHERE stored_at < $1 \
                 RETURNING recipient, octet_length(delivery) AS size), \
                 per AS (SELECT recipient, count(*) AS n, sum(size) AS b FROM gone \
                 GROUP BY recipient), \
                 upd AS (UPDATE mailbox_usage u SET entries = greatest(u.entries - per.n, 0), \
                 bytes = greatest(u.bytes - per.b, 0) FROM per WHERE u.recipient = per.recipient \
                 RETURNING per.n) \
                 SELECT coalesce(sum(n), 0)::BIGINT FROM upd",
            )
            .persistent(db.persistent)
            .bind(cutoff)
            .fetch_one(&mut *tx)
            .await
            .map_err(db.failed(action))?;
            let purged: i64 = row.try_get(0).map_err(db.failed(action))?;
            tx.commit().await.map_err(db.failed(action))?;
            Ok(purged.cast_unsigned())
        })
        .await
        .map_err(unavailable)
    }

    async fn health(&self) -> Health {
        self.db.health().await
    }
}

/// Registers mailbox kind `"postgres"` (same settings as the store's `[store] kind = "postgres"`).
pub fn register(kinds: &mut Kinds<Arc<dyn Mailbox>, MailboxLimits>) -> Result<(), PluginError> {
    kinds.register(KIND, |config, limits| async move {
        let config: PostgresConfig = typed_config("mailbox", KIND, config)?;
        config.validate().map_err(|message| PluginError::Config {
            category: "mailbox",
            kind: KIND.to_owned(),
            message,
        })?;
        let mailbox = PostgresMailbox::connect(&config, limits)
            .await
            .map_err(|e| PluginError::Start {
                category: "mailbox",
                kind: KIND.to_owned(),
                message: e.to_string(),
            })?;
        Ok(Arc::new(mailbox) as Arc<dyn Mailbox>)
    })
}

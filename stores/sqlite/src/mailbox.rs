//! The embedded default `Mailbox` on SQLite: sealed deliveries for recipients who are not
//! connected, in their own database file next to the identities (`mailbox.db`).
//!
//! Puts are **group-committed**: one writer task takes every put waiting at that moment (up to
//! [`MAX_BATCH`]) and commits them in one transaction, so the fsync that makes an entry durable
//! (`synchronous = FULL`) is paid once per batch, not once per message. A put is answered only
//! after its batch committed, so `stored` always means "on disk". Acknowledgements, clears and
//! expiry run as their own short transactions.
//!
//! It holds sealed bytes only — the same `Deliver` payload a live session would have received
//! — and never anything it could open.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::migrate::Migrator;
use sqlx::sqlite::SqlitePool;
use sqlx::{QueryBuilder, Row, Sqlite, Transaction};
use syncra_core::error::PluginError;
use syncra_core::id::USER_ID_LEN;
use syncra_core::mailbox::{Mailbox, MailboxEntry, MailboxError, MailboxLimits, PutOutcome};
use syncra_core::registry::{Kinds, typed_config};
use syncra_core::{Health, UserId};
use tokio::sync::{mpsc, oneshot};

/// The kind name this mailbox registers under.
pub const KIND: &str = "sqlite";

static MIGRATOR: Migrator = sqlx::migrate!("./migrations-mailbox");

/// Most puts committed in one transaction.
pub const MAX_BATCH: usize = 512;
/// Rows per statement (4 bound values each: far below SQLite's 32 766-variable limit).
const STATEMENT_ROWS: usize = 128;
/// Puts waiting for the writer; more wait for room (the sender's request waits, nobody else).
const QUEUE: usize = 4096;

/// The configuration of `[mailbox] kind = "sqlite"`.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SqliteMailboxConfig {
    /// The database file (the relay defaults it to `mailbox.db` in its data directory).
    pub path: PathBuf,
}

struct PutJob {
    recipient: UserId,
    delivery: Bytes,
    now_ms: u64,
    reply: oneshot::Sender<Result<PutOutcome, MailboxError>>,
}

/// A [`Mailbox`] in a SQLite database.
#[derive(Clone, Debug)]
pub struct SqliteMailbox {
    pool: SqlitePool,
    location: Arc<str>,
    limits: MailboxLimits,
    puts: mpsc::Sender<PutJob>,
}

impl std::fmt::Debug for PutJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PutJob").finish_non_exhaustive()
    }
}

fn unavailable(location: &str, action: &str, e: impl std::fmt::Display) -> MailboxError {
    MailboxError::Unavailable(format!("mailbox database {location}: {action} failed: {e}"))
}

impl SqliteMailbox {
    /// Opens (creating if missing) the mailbox database at `path` and migrates it.
    pub async fn open(path: &Path, limits: MailboxLimits) -> Result<Self, MailboxError> {
        let location: Arc<str> = path.display().to_string().into();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| unavailable(&location, "creating its directory", e))?;
        }
        let pool = crate::file_pool(path)
            .await
            .map_err(|e| unavailable(&location, "opening", e))?;
        MIGRATOR.run(&pool).await.map_err(|e| {
            unavailable(
                &location,
                "migrating (was it written by a newer syncra?)",
                e,
            )
        })?;
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(writer(pool.clone(), Arc::clone(&location), limits, rx));
        Ok(SqliteMailbox {
            pool,
            location,
            limits,
            puts: tx,
        })
    }

    /// Deletes a recipient's entries up to `up_to` and releases their usage; returns how many.
    async fn delete_up_to(&self, recipient: &UserId, up_to: u64) -> Result<u64, MailboxError> {
        let key = recipient.as_bytes().as_slice();
        let up_to = up_to.min(i64::MAX as u64) as i64;
        let mut tx = self.begin_write("acknowledging").await?;
        let row = sqlx::query(
            "SELECT count(*), coalesce(sum(length(delivery)), 0) FROM mailbox \
             WHERE recipient = ? AND id <= ?",
        )
        .bind(key)
        .bind(up_to)
        .fetch_one(&mut *tx)
        .await
        .map_err(self.failed("acknowledging"))?;
        let (entries, bytes): (i64, i64) = (
            row.try_get(0).map_err(self.failed("acknowledging"))?,
            row.try_get(1).map_err(self.failed("acknowledging"))?,
        );
        if entries > 0 {
            sqlx::query("DELETE FROM mailbox WHERE recipient = ? AND id <= ?")
                .bind(key)
                .bind(up_to)
                .execute(&mut *tx)
                .await
                .map_err(self.failed("acknowledging"))?;
            release(&mut tx, key, entries, bytes)
                .await
                .map_err(self.failed("acknowledging"))?;
        }
        tx.commit().await.map_err(self.failed("acknowledging"))?;
        Ok(entries.cast_unsigned())
    }

    fn failed(&self, action: &'static str) -> impl FnOnce(sqlx::Error) -> MailboxError + '_ {
        move |e| unavailable(&self.location, action, e)
    }

    async fn begin_write(
        &self,
        action: &'static str,
    ) -> Result<Transaction<'static, Sqlite>, MailboxError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(self.failed(action))
    }

    /// Closes every connection (tests that reopen the file).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// One recipient's usage as the batch sees it.
#[derive(Clone, Copy)]
struct Usage {
    entries: i64,
    bytes: i64,
    next_id: i64,
}

/// The group-commit writer: every put waiting at the time goes into one transaction.
async fn writer(
    pool: SqlitePool,
    location: Arc<str>,
    limits: MailboxLimits,
    mut rx: mpsc::Receiver<PutJob>,
) {
    let mut batch: Vec<PutJob> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        match commit(&pool, &limits, &batch).await {
            Ok(outcomes) => {
                for (job, outcome) in batch.drain(..).zip(outcomes) {
                    let _ = job.reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                let why = e.to_string();
                for job in batch.drain(..) {
                    let _ = job
                        .reply
                        .send(Err(unavailable(&location, "storing a delivery", &why)));
                }
            }
        }
    }
}

async fn commit(
    pool: &SqlitePool,
    limits: &MailboxLimits,
    batch: &[PutJob],
) -> Result<Vec<PutOutcome>, sqlx::Error> {
    // A handful of statements per batch, not per put: every statement is a round trip to the
    // connection's thread, and those hops, not the disk, bounded the throughput.
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let mut usage: HashMap<UserId, Usage> = HashMap::new();
    let mut recipients: Vec<&UserId> = Vec::new();
    for job in batch {
        if !recipients.contains(&&job.recipient) {
            recipients.push(&job.recipient);
        }
    }
    for chunk in recipients.chunks(STATEMENT_ROWS) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT recipient, entries, bytes, next_id FROM mailbox_usage WHERE recipient IN (",
        );
        let mut list = query.separated(", ");
        for r in chunk {
            list.push_bind(r.as_bytes().as_slice());
        }
        list.push_unseparated(")");
        for row in query.build().fetch_all(&mut *tx).await? {
            let raw: Vec<u8> = row.try_get(0)?;
            let Ok(id) = <[u8; USER_ID_LEN]>::try_from(raw.as_slice()) else {
                continue;
            };
            usage.insert(
                UserId::from_bytes(id),
                Usage {
                    entries: row.try_get(1)?,
                    bytes: row.try_get(2)?,
                    next_id: row.try_get(3)?,
                },
            );
        }
    }
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut rows: Vec<(&UserId, i64, i64, &[u8])> = Vec::with_capacity(batch.len());
    for job in batch {
        let u = usage.entry(job.recipient).or_insert(Usage {
            entries: 0,
            bytes: 0,
            next_id: 1,
        });
        let size = job.delivery.len() as i64;
        if (u.entries as u64) >= limits.max_entries || (u.bytes + size) as u64 > limits.max_bytes {
            outcomes.push(PutOutcome::Full);
            continue;
        }
        rows.push((
            &job.recipient,
            u.next_id,
            job.now_ms as i64,
            job.delivery.as_ref(),
        ));
        outcomes.push(PutOutcome::Stored(u.next_id as u64));
        u.entries += 1;
        u.bytes += size;
        u.next_id += 1;
    }
    for chunk in rows.chunks(STATEMENT_ROWS) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO mailbox (recipient, id, stored_at, delivery) ",
        );
        query.push_values(chunk, |mut row, (recipient, id, at, delivery)| {
            row.push_bind(recipient.as_bytes().as_slice())
                .push_bind(*id)
                .push_bind(*at)
                .push_bind(*delivery);
        });
        query.build().execute(&mut *tx).await?;
    }
    let touched: Vec<(&UserId, Usage)> = recipients
        .iter()
        .filter_map(|r| usage.get(*r).map(|u| (*r, *u)))
        .collect();
    for chunk in touched.chunks(STATEMENT_ROWS) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO mailbox_usage (recipient, entries, bytes, next_id) ",
        );
        query.push_values(chunk, |mut row, (recipient, u)| {
            row.push_bind(recipient.as_bytes().as_slice())
                .push_bind(u.entries)
                .push_bind(u.bytes)
                .push_bind(u.next_id);
        });
        query.push(
            " ON CONFLICT (recipient) DO UPDATE SET entries = excluded.entries, \
             bytes = excluded.bytes, next_id = excluded.next_id",
        );
        query.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// Subtracts deleted entries from a recipient's usage, in the deleting transaction.
async fn release(
    tx: &mut Transaction<'static, Sqlite>,
    recipient: &[u8],
    entries: i64,
    bytes: i64,
) -> Result<(), sqlx::Error> {
    if entries > 0 {
        sqlx::query(
            "UPDATE mailbox_usage SET entries = max(entries - ?, 0), bytes = max(bytes - ?, 0) \
             WHERE recipient = ?",
        )
        .bind(entries)
        .bind(bytes)
        .bind(recipient)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

#[async_trait]
impl Mailbox for SqliteMailbox {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn put(
        &self,
        recipient: &UserId,
        delivery: Bytes,
        now_ms: u64,
    ) -> Result<PutOutcome, MailboxError> {
        let (reply, answer) = oneshot::channel();
        let job = PutJob {
            recipient: *recipient,
            delivery,
            now_ms,
            reply,
        };
        let gone = || unavailable(&self.location, "storing a delivery", "the writer stopped");
        self.puts.send(job).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    async fn take(
        &self,
        recipient: &UserId,
        after: u64,
        max: usize,
        now_ms: u64,
    ) -> Result<Vec<MailboxEntry>, MailboxError> {
        let oldest = now_ms.saturating_sub(self.limits.ttl_ms) as i64;
        let rows = sqlx::query(
            "SELECT id, stored_at, delivery FROM mailbox WHERE recipient = ? AND id > ? \
             AND stored_at >= ? ORDER BY id LIMIT ?",
        )
        .bind(recipient.as_bytes().as_slice())
        .bind(after.min(i64::MAX as u64) as i64)
        .bind(oldest)
        .bind(max.min(i64::MAX as usize) as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(self.failed("reading a mailbox"))?;
        rows.into_iter()
            .map(|r| {
                let id: i64 = r
                    .try_get(0)
                    .map_err(|e| MailboxError::Corrupt(e.to_string()))?;
                let stored_at: i64 = r
                    .try_get(1)
                    .map_err(|e| MailboxError::Corrupt(e.to_string()))?;
                let delivery: Vec<u8> = r
                    .try_get(2)
                    .map_err(|e| MailboxError::Corrupt(e.to_string()))?;
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
        let cutoff = now_ms.saturating_sub(self.limits.ttl_ms) as i64;
        let mut tx = self.begin_write("purging expired entries").await?;
        let rows = sqlx::query(
            "SELECT recipient, count(*), sum(length(delivery)) FROM mailbox WHERE stored_at < ? \
             GROUP BY recipient",
        )
        .bind(cutoff)
        .fetch_all(&mut *tx)
        .await
        .map_err(self.failed("purging expired entries"))?;
        let mut total = 0u64;
        for r in &rows {
            let recipient: Vec<u8> = r.try_get(0).map_err(self.failed("purging"))?;
            let entries: i64 = r.try_get(1).map_err(self.failed("purging"))?;
            let bytes: i64 = r.try_get(2).map_err(self.failed("purging"))?;
            if recipient.len() != USER_ID_LEN {
                return Err(MailboxError::Corrupt(format!(
                    "a recipient of {} bytes in {}",
                    recipient.len(),
                    self.location
                )));
            }
            release(&mut tx, &recipient, entries, bytes)
                .await
                .map_err(self.failed("purging"))?;
            total += entries.cast_unsigned();
        }
        sqlx::query("DELETE FROM mailbox WHERE stored_at < ?")
            .bind(cutoff)
            .execute(&mut *tx)
            .await
            .map_err(self.failed("purging expired entries"))?;
        tx.commit()
            .await
            .map_err(self.failed("purging expired entries"))?;
        Ok(total)
    }

    async fn health(&self) -> Health {
        match sqlx::query_scalar::<_, i64>("SELECT 1")
            .fetch_one(&self.pool)
            .await
        {
            Ok(_) => Health::Up,
            Err(e) => Health::Down(unavailable(&self.location, "health check", e).to_string()),
        }
    }
}

/// Registers mailbox kind `"sqlite"`.
pub fn register(kinds: &mut Kinds<Arc<dyn Mailbox>, MailboxLimits>) -> Result<(), PluginError> {
    kinds.register(KIND, |config, limits| async move {
        let config: SqliteMailboxConfig = typed_config("mailbox", KIND, config)?;
        let mailbox = SqliteMailbox::open(&config.path, limits)
            .await
            .map_err(|e| PluginError::Start {
                category: "mailbox",
                kind: KIND.to_owned(),
                message: e.to_string(),
            })?;
        Ok(Arc::new(mailbox) as Arc<dyn Mailbox>)
    })
}

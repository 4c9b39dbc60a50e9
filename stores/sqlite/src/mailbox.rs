//! The embedded default `Mailbox` on SQLite: sealed deliveries for recipients who are not
//! connected, in their own database file next to the identities (`mailbox.db`).
//!
//! Writes are **group-committed**: one writer task takes every put, acknowledgement and clear
//! waiting at that moment (up to [`MAX_BATCH`]) and commits them in one transaction, so the
//! fsync that makes a change durable (`synchronous = FULL`) is paid once per batch, not once per
//! message, and writes never wait on each other for SQLite's write lock. A put is answered only
//! after its batch committed, so `stored` always means "on disk". A client acknowledges every
//! entry of its backlog as it files it, so a draining client sends a stream of acknowledgements;
//! those of one recipient in one batch become one `DELETE` up to the highest id. Only expiry, once
//! a minute, runs as its own transaction.
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

/// A write for the writer task.
enum Job {
    Put {
        recipient: UserId,
        delivery: Bytes,
        now_ms: u64,
        reply: oneshot::Sender<Result<PutOutcome, MailboxError>>,
    },
    /// Deletes the recipient's entries up to `up_to` (an acknowledgement, or `u64::MAX` to
    /// clear); answers how many were deleted.
    Delete {
        recipient: UserId,
        up_to: u64,
        reply: oneshot::Sender<Result<u64, MailboxError>>,
    },
}

impl Job {
    fn recipient(&self) -> &UserId {
        match self {
            Job::Put { recipient, .. } | Job::Delete { recipient, .. } => recipient,
        }
    }

    fn fail(self, e: MailboxError) {
        match self {
            Job::Put { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Job::Delete { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

/// A [`Mailbox`] in a SQLite database.
#[derive(Clone, Debug)]
pub struct SqliteMailbox {
    pool: SqlitePool,
    location: Arc<str>,
    limits: MailboxLimits,
    writes: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").finish_non_exhaustive()
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
            writes: tx,
        })
    }

    /// Hands a job to the writer and waits for its answer.
    async fn write<T>(
        &self,
        action: &str,
        job: Job,
        answer: oneshot::Receiver<Result<T, MailboxError>>,
    ) -> Result<T, MailboxError> {
        let gone = || unavailable(&self.location, action, "the writer stopped");
        self.writes.send(job).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Deletes a recipient's entries up to `up_to` through the writer; returns how many.
    async fn delete(
        &self,
        recipient: &UserId,
        up_to: u64,
        action: &str,
    ) -> Result<u64, MailboxError> {
        let (reply, answer) = oneshot::channel();
        let job = Job::Delete {
            recipient: *recipient,
            up_to,
            reply,
        };
        self.write(action, job, answer).await
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

/// The group-commit writer: every write waiting at the time goes into one transaction.
async fn writer(
    pool: SqlitePool,
    location: Arc<str>,
    limits: MailboxLimits,
    mut rx: mpsc::Receiver<Job>,
) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        match commit(&pool, &limits, &batch).await {
            Ok(answers) => {
                for (job, answer) in batch.drain(..).zip(answers) {
                    match (job, answer) {
                        (Job::Put { reply, .. }, Answer::Put(outcome)) => {
                            let _ = reply.send(Ok(outcome));
                        }
                        (Job::Delete { reply, .. }, Answer::Deleted(n)) => {
                            let _ = reply.send(Ok(n));
                        }
                        (job, _) => job.fail(unavailable(
                            &location,
                            "writing",
                            "the writer paired an answer with the wrong job",
                        )),
                    }
                }
            }
            Err(e) => {
                let why = e.to_string();
                for job in batch.drain(..) {
                    let action = match job {
                        Job::Put { .. } => "storing a delivery",
                        Job::Delete { .. } => "deleting entries",
                    };
                    job.fail(unavailable(&location, action, &why));
                }
            }
        }
    }
}

/// What the batch did for one job, in the batch's order.
enum Answer {
    Put(PutOutcome),
    Deleted(u64),
}

async fn commit(
    pool: &SqlitePool,
    limits: &MailboxLimits,
    batch: &[Job],
) -> Result<Vec<Answer>, sqlx::Error> {
    // A handful of statements per batch, not per write: every statement is a round trip to the
    // connection's thread, and those hops, not the disk, bounded the throughput.
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let mut usage: HashMap<UserId, Usage> = HashMap::new();
    let mut recipients: Vec<&UserId> = Vec::new();
    for job in batch {
        if !recipients.contains(&job.recipient()) {
            recipients.push(job.recipient());
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

    // Deletions first, one statement per recipient up to the highest id asked for in this
    // batch (acknowledgements are cumulative), so that the room they free counts for the puts.
    let mut deletes: Vec<(&UserId, u64)> = Vec::new();
    for job in batch {
        if let Job::Delete {
            recipient, up_to, ..
        } = job
        {
            match deletes.iter_mut().find(|(r, _)| *r == recipient) {
                Some((_, highest)) => *highest = (*highest).max(*up_to),
                None => deletes.push((recipient, *up_to)),
            }
        }
    }
    let mut deleted: HashMap<UserId, u64> = HashMap::new();
    for (recipient, up_to) in &deletes {
        let sizes: Vec<i64> = sqlx::query_scalar(
            "DELETE FROM mailbox WHERE recipient = ? AND id <= ? RETURNING length(delivery)",
        )
        .bind(recipient.as_bytes().as_slice())
        .bind((*up_to).min(i64::MAX as u64) as i64)
        .fetch_all(&mut *tx)
        .await?;
        if let Some(u) = usage.get_mut(*recipient) {
            u.entries = (u.entries - sizes.len() as i64).max(0);
            u.bytes = (u.bytes - sizes.iter().sum::<i64>()).max(0);
        }
        deleted.insert(**recipient, sizes.len() as u64);
    }

    let mut answers = Vec::with_capacity(batch.len());
    let mut rows: Vec<(&UserId, i64, i64, &[u8])> = Vec::with_capacity(batch.len());
    let mut put_into: Vec<&UserId> = Vec::new();
    for job in batch {
        let (recipient, delivery, now_ms) = match job {
            Job::Put {
                recipient,
                delivery,
                now_ms,
                ..
            } => (recipient, delivery, now_ms),
            Job::Delete { recipient, .. } => {
                answers.push(Answer::Deleted(
                    deleted.get(recipient).copied().unwrap_or(0),
                ));
                continue;
            }
        };
        let u = usage.entry(*recipient).or_insert(Usage {
            entries: 0,
            bytes: 0,
            next_id: 1,
        });
        let size = delivery.len() as i64;
        if (u.entries as u64) >= limits.max_entries || (u.bytes + size) as u64 > limits.max_bytes {
            answers.push(Answer::Put(PutOutcome::Full));
            continue;
        }
        rows.push((recipient, u.next_id, *now_ms as i64, delivery.as_ref()));
        answers.push(Answer::Put(PutOutcome::Stored(u.next_id as u64)));
        u.entries += 1;
        u.bytes += size;
        u.next_id += 1;
        if !put_into.contains(&recipient) {
            put_into.push(recipient);
        }
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
    // Usage rows change for recipients that got entries or lost some; a recipient that never
    // had a usage row and only had nothing deleted keeps having none.
    let touched: Vec<(&UserId, Usage)> = recipients
        .iter()
        .filter(|r| put_into.contains(r) || deleted.get(**r).is_some_and(|n| *n > 0))
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
    Ok(answers)
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

    /// A file of the relay's own.
    fn relays_only(&self) -> bool {
        true
    }

    async fn put(
        &self,
        recipient: &UserId,
        delivery: Bytes,
        now_ms: u64,
    ) -> Result<PutOutcome, MailboxError> {
        let (reply, answer) = oneshot::channel();
        let job = Job::Put {
            recipient: *recipient,
            delivery,
            now_ms,
            reply,
        };
        self.write("storing a delivery", job, answer).await
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
        self.delete(recipient, up_to, "acknowledging")
            .await
            .map(drop)
    }

    /// Counts what it deleted together with any acknowledgement of the same recipient that the
    /// writer committed in the same batch.
    async fn clear(&self, recipient: &UserId) -> Result<u64, MailboxError> {
        self.delete(recipient, u64::MAX, "emptying a mailbox").await
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

    use super::*;

    fn user(n: u8) -> UserId {
        UserId::from_bytes([n; USER_ID_LEN])
    }

    /// A database written before the entries moved to an ordinary table (migration 2) keeps
    /// every entry, its id and its order, and ids go on from where they were.
    #[tokio::test]
    async fn entries_written_before_migration_2_survive_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mailbox.db");
        let pool = crate::file_pool(&path).await.unwrap();
        MIGRATOR.run_to(1, &pool).await.unwrap();
        for (r, id, body) in [(1u8, 1i64, "a1"), (2, 1, "b1"), (1, 2, "a2"), (1, 3, "a3")] {
            sqlx::query(
                "INSERT INTO mailbox (recipient, id, stored_at, delivery) VALUES (?, ?, ?, ?)",
            )
            .bind(user(r).as_bytes().as_slice())
            .bind(id)
            .bind(1_000 + id)
            .bind(body.as_bytes())
            .execute(&pool)
            .await
            .unwrap();
        }
        for (r, entries, bytes, next_id) in [(1u8, 3i64, 6i64, 4i64), (2, 1, 2, 2)] {
            sqlx::query(
                "INSERT INTO mailbox_usage (recipient, entries, bytes, next_id) VALUES (?, ?, ?, ?)",
            )
            .bind(user(r).as_bytes().as_slice())
            .bind(entries)
            .bind(bytes)
            .bind(next_id)
            .execute(&pool)
            .await
            .unwrap();
        }
        pool.close().await;

        let m = SqliteMailbox::open(&path, MailboxLimits::default())
            .await
            .unwrap();
        let a = m.take(&user(1), 0, 10, 2_000).await.unwrap();
        let got: Vec<(u64, &[u8])> = a.iter().map(|e| (e.id, e.delivery.as_ref())).collect();
        assert_eq!(got, [(1, &b"a1"[..]), (2, b"a2"), (3, b"a3")]);
        assert_eq!(m.take(&user(2), 0, 10, 2_000).await.unwrap().len(), 1);
        assert_eq!(
            m.put(&user(1), Bytes::from_static(b"a4"), 2_000)
                .await
                .unwrap(),
            PutOutcome::Stored(4)
        );
        m.ack(&user(1), 2).await.unwrap();
        let left: Vec<u64> = m
            .take(&user(1), 0, 10, 2_000)
            .await
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(left, [3, 4]);
    }

    /// Acknowledgements, clears and puts for one recipient in one batch: the deletions count
    /// first, and what they free is room for the puts.
    #[tokio::test]
    async fn a_batch_of_acknowledgements_and_puts_keeps_the_quota_exact() {
        let dir = tempfile::tempdir().unwrap();
        let limits = MailboxLimits {
            max_entries: 10,
            ..MailboxLimits::default()
        };
        let m = Arc::new(
            SqliteMailbox::open(&dir.path().join("mailbox.db"), limits)
                .await
                .unwrap(),
        );
        let to = user(9);
        for _ in 0..10 {
            m.put(&to, Bytes::from_static(b"x"), 1).await.unwrap();
        }
        // Ten acknowledgements (as a draining client sends them) and ten puts at once.
        let mut tasks = Vec::new();
        for id in 1..=10u64 {
            let m = m.clone();
            tasks.push(tokio::spawn(
                async move { m.ack(&to, id).await.map(|_| None) },
            ));
        }
        for _ in 0..10 {
            let m = m.clone();
            tasks.push(tokio::spawn(async move {
                m.put(&to, Bytes::from_static(b"y"), 1).await.map(Some)
            }));
        }
        let mut stored = 0;
        for t in tasks {
            if let Some(PutOutcome::Stored(_)) = t.await.unwrap().unwrap() {
                stored += 1;
            }
        }
        let held = m.take(&to, 0, 100, 1).await.unwrap();
        assert_eq!(held.len(), stored, "what is held is what was stored");
        assert!(held.iter().all(|e| e.delivery.as_ref() == b"y"));
        // The usage row agrees with the rows: exactly 10 - held more fit.
        let mut more = 0;
        while let PutOutcome::Stored(_) = m.put(&to, Bytes::from_static(b"z"), 1).await.unwrap() {
            more += 1;
        }
        assert_eq!(held.len() + more, 10);
        assert_eq!(m.clear(&to).await.unwrap(), 10);
    }
}

//! `syncra-store-sqlite`: the embedded default `IdentityStore` on SQLite.
//!
//! A relay with no configuration keeps its identity records in one SQLite file (WAL mode, so
//! lookups do not wait for registrations), created with its directory on first start and
//! migrated by the migrations embedded in this crate. [`SqliteStore::open_in_memory`] gives the
//! same store without a file, for tests.
//!
//! This crate stores public material only (handle, identity key, signed prekey) and must never
//! hold a private key or a message. It supplies raw storage: the checks that make a record
//! acceptable (the id belongs to the key, the prekey is signed by it and not older than the
//! current one) live in `syncra-core`'s provided methods, and this crate must not weaken them.
//! It must also never trust what it reads back: a row that does not decode into a consistent
//! record is reported as an error naming the row, never a panic and never a half-valid record.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use syncra_core::carriage::GroupId;
use syncra_core::crypto::envelope::MessageId;
use syncra_core::crypto::keys::SignedPrekey;
use syncra_core::error::{PluginError, StoreError};
use syncra_core::record::StoredColumns;
use syncra_core::registry::{Kinds, typed_config};
use syncra_core::store::{
    ClaimedKeyPackage, EpochAdvance, GroupState, KeyPackageStock, MAX_KEY_PACKAGES, encode_members,
};
use syncra_core::{Handle, Health, IdentityRecord, IdentityStore, UserId};

pub mod mailbox;

/// The kind name this store registers under.
pub const KIND: &str = "sqlite";

/// The schema, embedded at compile time so the binary never needs the migration files.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// How long a write waits for another connection's write to finish before failing. Writes are
/// single short statements, so anything near this means the database is stuck, not busy.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a caller waits for a free connection before the store reports itself unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections to a database file. WAL lets readers run beside the one writer; a few are
/// enough for a relay, whose store traffic is registrations and lookups, not messages.
const FILE_CONNECTIONS: u32 = 4;

const SELECT_BY_HANDLE: &str = "SELECT user_id, handle, identity_key, prekey_public, \
     prekey_created_at, prekey_signature FROM users WHERE handle = ?";
const SELECT_BY_ID: &str = "SELECT user_id, handle, identity_key, prekey_public, \
     prekey_created_at, prekey_signature FROM users WHERE user_id = ?";

/// What went wrong, with the context `StoreError::Unavailable` carries as text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
enum SqliteError {
    #[error("cannot create the directory {} for the identity database: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the identity database {location}: {source}")]
    Open {
        location: Arc<str>,
        source: sqlx::Error,
    },
    #[error(
        "cannot bring the identity database {location} to the current schema: {source} \
         (was it written by a newer version of syncra?)"
    )]
    Migrate {
        location: Arc<str>,
        source: MigrateError,
    },
    #[error("identity database {location}: {action} failed: {source}")]
    Query {
        location: Arc<str>,
        action: &'static str,
        source: sqlx::Error,
    },
    #[error(
        "identity database {location}: the row for {row} is corrupt ({why}); restore the \
         database from a backup or delete that row"
    )]
    CorruptRow {
        location: Arc<str>,
        row: String,
        why: String,
    },
}

impl From<SqliteError> for StoreError {
    fn from(e: SqliteError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// Connections to a database file, as both the identity store and the mailbox use them: WAL
/// (readers beside the one writer) and `synchronous = FULL` (what was answered "ok" — a
/// registration, a stored delivery — survives a power cut), created if missing.
pub(crate) async fn file_pool(path: &Path) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT);
    // `connect_with` opens the first connection before returning, so WAL is switched on by one
    // connection before any other exists (the switch cannot wait on a busy timeout).
    SqlitePoolOptions::new()
        .max_connections(FILE_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
}

/// An [`IdentityStore`] in a SQLite database. Cheap to clone; clones share the connections.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// The file path, or a note that the database is in memory, for error messages.
    location: Arc<str>,
}

impl SqliteStore {
    /// Opens the database at `path`, creating the file and its directory if missing, and
    /// brings it to the current schema.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| SqliteError::CreateDir {
                path: parent.to_owned(),
                source,
            })?;
        }
        let location: Arc<str> = path.display().to_string().into();
        let pool = file_pool(path).await.map_err(|source| SqliteError::Open {
            location: Arc::clone(&location),
            source,
        })?;
        Self::migrated(pool, location).await
    }

    /// A fresh, empty database in memory, gone when the store is dropped. For tests.
    pub async fn open_in_memory() -> Result<Self, StoreError> {
        let location: Arc<str> = "(in memory)".into();
        let options = SqliteConnectOptions::new()
            .in_memory(true)
            .busy_timeout(BUSY_TIMEOUT);
        // A private in-memory database lives exactly as long as its one connection, so the pool
        // has one connection and never retires it.
        let pool = SqlitePoolOptions::new()
            .min_connections(1)
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|source| SqliteError::Open {
                location: Arc::clone(&location),
                source,
            })?;
        Self::migrated(pool, location).await
    }

    /// Opens the store a [`SqliteConfig`] describes.
    pub async fn from_config(config: &SqliteConfig) -> Result<Self, StoreError> {
        Self::open(&config.path).await
    }

    async fn migrated(pool: SqlitePool, location: Arc<str>) -> Result<Self, StoreError> {
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|source| SqliteError::Migrate {
                location: Arc::clone(&location),
                source,
            })?;
        Ok(SqliteStore { pool, location })
    }

    /// Closes every connection, waiting for running queries, so the file is complete on disk.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn query_error(&self, action: &'static str) -> impl FnOnce(sqlx::Error) -> SqliteError + '_ {
        move |source| SqliteError::Query {
            location: Arc::clone(&self.location),
            action,
            source,
        }
    }

    /// Starts a transaction that holds the write lock from its first statement, so what it
    /// reads cannot change before it writes.
    async fn begin_write(
        &self,
        action: &'static str,
    ) -> Result<Transaction<'static, Sqlite>, SqliteError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(self.query_error(action))
    }

    async fn stock_in(
        &self,
        conn: &mut sqlx::SqliteConnection,
        id: &UserId,
    ) -> Result<KeyPackageStock, SqliteError> {
        let user = id.as_bytes().as_slice();
        let one_time: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM key_packages WHERE user_id = ?")
                .bind(user)
                .fetch_one(&mut *conn)
                .await
                .map_err(self.query_error("counting KeyPackages"))?;
        let last_resort = sqlx::query("SELECT 1 FROM last_resort_key_packages WHERE user_id = ?")
            .bind(user)
            .fetch_optional(&mut *conn)
            .await
            .map_err(self.query_error("checking a last-resort KeyPackage"))?
            .is_some();
        Ok(KeyPackageStock {
            one_time: u32::try_from(one_time).unwrap_or(u32::MAX),
            last_resort,
        })
    }

    fn group_state(
        &self,
        group: &GroupId,
        epoch: i64,
        members: &[u8],
        last_commit: &[u8],
    ) -> Result<GroupState, SqliteError> {
        GroupState::from_columns(epoch, members, last_commit)
            .map_err(|why| self.corrupt(format!("group {group}"), why))
    }

    fn record_from_row(&self, row: &SqliteRow) -> Result<IdentityRecord, SqliteError> {
        let user_id: Vec<u8> = self.column(row, "user_id", "?")?;
        let who = StoredColumns::row_name(&user_id);
        let prekey_created_at = self
            .column::<i64>(row, "prekey_created_at", &who)?
            .cast_unsigned();
        StoredColumns {
            handle: self.column(row, "handle", &who)?,
            identity_key: self.column(row, "identity_key", &who)?,
            prekey_public: self.column(row, "prekey_public", &who)?,
            prekey_signature: self.column(row, "prekey_signature", &who)?,
            prekey_created_at,
            user_id,
        }
        .check()
        .map_err(|c| self.corrupt(c.row, c.why))
    }

    fn column<'r, T>(&self, row: &'r SqliteRow, name: &str, who: &str) -> Result<T, SqliteError>
    where
        T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
    {
        row.try_get(name)
            .map_err(|e| self.corrupt(who.to_owned(), format!("column {name}: {e}")))
    }

    fn corrupt(&self, row: String, why: String) -> SqliteError {
        SqliteError::CorruptRow {
            location: Arc::clone(&self.location),
            row,
            why,
        }
    }
}

#[async_trait]
impl IdentityStore for SqliteStore {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn insert(&self, record: &IdentityRecord) -> Result<(), StoreError> {
        let mut tx = self.begin_write("starting a registration").await?;
        // One statement decides the race: the UNIQUE and PRIMARY KEY constraints let exactly one
        // of two registrations of a handle insert, under SQLite's single write lock.
        let inserted = sqlx::query(
            "INSERT INTO users (user_id, handle, identity_key, prekey_public, prekey_created_at, \
             prekey_signature, registered_at, generation) VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT DO NOTHING",
        )
        .bind(record.user_id.as_bytes().as_slice())
        .bind(record.handle.as_str())
        .bind(record.identity_key.as_slice())
        .bind(record.prekey.public.as_slice())
        .bind(record.prekey.created_at.cast_signed())
        .bind(record.prekey.signature.as_slice())
        .bind(now_secs())
        .bind(syncra_core::store::new_generation().cast_signed())
        .execute(&mut *tx)
        .await
        .map_err(self.query_error("registering a user"))?
        .rows_affected();
        if inserted == 1 {
            tx.commit()
                .await
                .map_err(self.query_error("committing a registration"))?;
            return Ok(());
        }
        // Nothing was inserted, so a row conflicts. Which one is read in the same transaction,
        // which still holds the write lock, so the answer is about the state that refused us.
        // The identity is checked first: registering again under a new handle is the mistake
        // to report, whether or not the handle is also taken.
        let id_taken = sqlx::query("SELECT 1 FROM users WHERE user_id = ?")
            .bind(record.user_id.as_bytes().as_slice())
            .fetch_optional(&mut *tx)
            .await
            .map_err(self.query_error("checking a refused registration"))?
            .is_some();
        // Dropping `tx` rolls back; nothing was written.
        if id_taken {
            Err(StoreError::AlreadyRegistered(record.user_id))
        } else {
            Err(StoreError::HandleTaken(record.handle.as_str().to_owned()))
        }
    }

    async fn by_handle(&self, handle: &Handle) -> Result<Option<IdentityRecord>, StoreError> {
        let row = sqlx::query(SELECT_BY_HANDLE)
            .bind(handle.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(self.query_error("looking up a handle"))?;
        Ok(row.map(|r| self.record_from_row(&r)).transpose()?)
    }

    async fn by_id(&self, id: &UserId) -> Result<Option<IdentityRecord>, StoreError> {
        let row = sqlx::query(SELECT_BY_ID)
            .bind(id.as_bytes().as_slice())
            .fetch_optional(&self.pool)
            .await
            .map_err(self.query_error("looking up a user id"))?;
        Ok(row.map(|r| self.record_from_row(&r)).transpose()?)
    }

    /// Also refuses a prekey older than the stored one ([`StoreError::StalePrekey`]), checked
    /// under the write lock: the provided `replace_prekey` checks before it calls this, but two
    /// concurrent replacements could both pass that check and the older one land last.
    async fn store_prekey(&self, id: &UserId, prekey: &SignedPrekey) -> Result<(), StoreError> {
        let mut tx = self.begin_write("starting a prekey replacement").await?;
        let current: Option<i64> =
            sqlx::query_scalar("SELECT prekey_created_at FROM users WHERE user_id = ?")
                .bind(id.as_bytes().as_slice())
                .fetch_optional(&mut *tx)
                .await
                .map_err(self.query_error("reading the current prekey"))?;
        let Some(current) = current else {
            return Err(StoreError::NotFound(*id));
        };
        if prekey.created_at < current.cast_unsigned() {
            return Err(StoreError::StalePrekey);
        }
        sqlx::query(
            "UPDATE users SET prekey_public = ?, prekey_created_at = ?, prekey_signature = ? \
             WHERE user_id = ?",
        )
        .bind(prekey.public.as_slice())
        .bind(prekey.created_at.cast_signed())
        .bind(prekey.signature.as_slice())
        .bind(id.as_bytes().as_slice())
        .execute(&mut *tx)
        .await
        .map_err(self.query_error("replacing a prekey"))?;
        tx.commit()
            .await
            .map_err(self.query_error("committing a prekey replacement"))?;
        Ok(())
    }

    async fn generation(&self, id: &UserId) -> Result<Option<u64>, StoreError> {
        let generation: Option<i64> =
            sqlx::query_scalar("SELECT generation FROM users WHERE user_id = ?")
                .bind(id.as_bytes().as_slice())
                .fetch_optional(&self.pool)
                .await
                .map_err(self.query_error("reading a user's generation"))?;
        Ok(generation.map(i64::cast_unsigned))
    }

    async fn delete(&self, id: &UserId) -> Result<bool, StoreError> {
        let mut tx = self.begin_write("starting a deletion").await?;
        for sql in [
            "DELETE FROM key_packages WHERE user_id = ?",
            "DELETE FROM last_resort_key_packages WHERE user_id = ?",
        ] {
            sqlx::query(sql)
                .bind(id.as_bytes().as_slice())
                .execute(&mut *tx)
                .await
                .map_err(self.query_error("deleting a user's KeyPackages"))?;
        }
        let deleted = sqlx::query("DELETE FROM users WHERE user_id = ?")
            .bind(id.as_bytes().as_slice())
            .execute(&mut *tx)
            .await
            .map_err(self.query_error("deleting a user"))?
            .rows_affected();
        tx.commit()
            .await
            .map_err(self.query_error("committing a deletion"))?;
        Ok(deleted > 0)
    }

    async fn store_key_packages(
        &self,
        id: &UserId,
        one_time: &[bytes::Bytes],
        last_resort: Option<&bytes::Bytes>,
    ) -> Result<KeyPackageStock, StoreError> {
        let user = id.as_bytes().as_slice();
        let mut tx = self.begin_write("starting a KeyPackage publish").await?;
        let known = sqlx::query("SELECT 1 FROM users WHERE user_id = ?")
            .bind(user)
            .fetch_optional(&mut *tx)
            .await
            .map_err(self.query_error("checking a KeyPackage owner"))?
            .is_some();
        if !known {
            return Err(StoreError::NotFound(*id));
        }
        let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM key_packages WHERE user_id = ?")
            .bind(user)
            .fetch_one(&mut *tx)
            .await
            .map_err(self.query_error("counting KeyPackages"))?;
        if held.cast_unsigned() as usize + one_time.len() > MAX_KEY_PACKAGES {
            return Err(StoreError::KeyPackagesFull {
                max: MAX_KEY_PACKAGES,
            });
        }
        for package in one_time {
            sqlx::query("INSERT INTO key_packages (user_id, package) VALUES (?, ?)")
                .bind(user)
                .bind(package.as_ref())
                .execute(&mut *tx)
                .await
                .map_err(self.query_error("storing a KeyPackage"))?;
        }
        if let Some(package) = last_resort {
            sqlx::query(
                "INSERT INTO last_resort_key_packages (user_id, package) VALUES (?, ?) \
                 ON CONFLICT (user_id) DO UPDATE SET package = excluded.package",
            )
            .bind(user)
            .bind(package.as_ref())
            .execute(&mut *tx)
            .await
            .map_err(self.query_error("storing a last-resort KeyPackage"))?;
        }
        let stock = self.stock_in(&mut tx, id).await?;
        tx.commit()
            .await
            .map_err(self.query_error("committing a KeyPackage publish"))?;
        Ok(stock)
    }

    async fn claim_key_package(
        &self,
        id: &UserId,
    ) -> Result<Option<ClaimedKeyPackage>, StoreError> {
        let user = id.as_bytes().as_slice();
        let mut tx = self.begin_write("starting a KeyPackage claim").await?;
        let oldest: Option<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT seq, package FROM key_packages WHERE user_id = ? ORDER BY seq LIMIT 1",
        )
        .bind(user)
        .fetch_optional(&mut *tx)
        .await
        .map_err(self.query_error("claiming a KeyPackage"))?;
        let claimed = if let Some((seq, package)) = oldest {
            sqlx::query("DELETE FROM key_packages WHERE seq = ?")
                .bind(seq)
                .execute(&mut *tx)
                .await
                .map_err(self.query_error("claiming a KeyPackage"))?;
            Some(ClaimedKeyPackage {
                package: package.into(),
                last_resort: false,
            })
        } else {
            let package: Option<Vec<u8>> = sqlx::query_scalar(
                "SELECT package FROM last_resort_key_packages WHERE user_id = ?",
            )
            .bind(user)
            .fetch_optional(&mut *tx)
            .await
            .map_err(self.query_error("reading a last-resort KeyPackage"))?;
            package.map(|p| ClaimedKeyPackage {
                package: p.into(),
                last_resort: true,
            })
        };
        tx.commit()
            .await
            .map_err(self.query_error("committing a KeyPackage claim"))?;
        Ok(claimed)
    }

    async fn key_package_stock(&self, id: &UserId) -> Result<KeyPackageStock, StoreError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(self.query_error("counting KeyPackages"))?;
        Ok(self.stock_in(&mut conn, id).await?)
    }

    async fn group(&self, group: &GroupId) -> Result<Option<GroupState>, StoreError> {
        let row: Option<(i64, Vec<u8>, Vec<u8>)> =
            sqlx::query_as("SELECT epoch, members, last_commit FROM mls_groups WHERE group_id = ?")
                .bind(group.as_bytes().as_slice())
                .fetch_optional(&self.pool)
                .await
                .map_err(self.query_error("reading a group"))?;
        row.map(|(epoch, members, last)| self.group_state(group, epoch, &members, &last))
            .transpose()
            .map_err(StoreError::from)
    }

    async fn advance_group(
        &self,
        group: &GroupId,
        from: u64,
        members: &[UserId],
        commit: &MessageId,
    ) -> Result<EpochAdvance, StoreError> {
        let gid = group.as_bytes().as_slice();
        let members = encode_members(members);
        let mut tx = self.begin_write("starting a commit").await?;
        // Under the write lock: the read and the write see the same epoch.
        let current: Option<i64> =
            sqlx::query_scalar("SELECT epoch FROM mls_groups WHERE group_id = ?")
                .bind(gid)
                .fetch_optional(&mut *tx)
                .await
                .map_err(self.query_error("reading a group's epoch"))?;
        let current = current.map(i64::cast_unsigned);
        let next = from.checked_add(1).filter(|n| i64::try_from(*n).is_ok());
        let (Some(next), true) = (next, current.unwrap_or(0) == from) else {
            return Ok(EpochAdvance::Conflict { current });
        };
        sqlx::query(
            "INSERT INTO mls_groups (group_id, epoch, members, last_commit, updated_at) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (group_id) DO UPDATE SET \
             epoch = excluded.epoch, members = excluded.members, \
             last_commit = excluded.last_commit, updated_at = excluded.updated_at",
        )
        .bind(gid)
        .bind(next.cast_signed())
        .bind(members)
        .bind(commit.as_slice())
        .bind(now_secs())
        .execute(&mut *tx)
        .await
        .map_err(self.query_error("advancing a group's epoch"))?;
        tx.commit()
            .await
            .map_err(self.query_error("committing a commit"))?;
        Ok(EpochAdvance::Advanced)
    }

    async fn health(&self) -> Health {
        match sqlx::query_scalar::<_, i64>("SELECT 1")
            .fetch_one(&self.pool)
            .await
        {
            Ok(_) => Health::Up,
            Err(source) => Health::Down(
                SqliteError::Query {
                    location: Arc::clone(&self.location),
                    action: "health check",
                    source,
                }
                .to_string(),
            ),
        }
    }
}

/// Seconds since the Unix epoch, for `registered_at`.
fn now_secs() -> i64 {
    i64::try_from(syncra_core::now_ms() / 1000).unwrap_or(i64::MAX)
}

/// The configuration of `kind = "sqlite"`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteConfig {
    /// The database file. Created with its directory if missing.
    pub path: PathBuf,
}

/// Registers kind `"sqlite"`.
pub fn register(kinds: &mut Kinds<Arc<dyn IdentityStore>, ()>) -> Result<(), PluginError> {
    kinds.register(KIND, |config, ()| async move {
        let config: SqliteConfig = typed_config("store", KIND, config)?;
        let store = SqliteStore::from_config(&config)
            .await
            .map_err(|e| PluginError::Start {
                category: "store",
                kind: KIND.to_owned(),
                message: e.to_string(),
            })?;
        Ok(Arc::new(store) as Arc<dyn IdentityStore>)
    })
}

#[cfg(test)]
mod tests {
    use syncra_test_support::{FIXTURE_PREKEY_CREATED_AT, test_identity};

    use super::*;

    #[tokio::test]
    async fn reopening_a_file_keeps_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not").join("yet").join("identities.db");
        let (_, _, alice) = test_identity("alice");
        {
            let store = SqliteStore::open(&path).await.unwrap();
            store.register(&alice).await.unwrap();
            store.close().await;
        }
        assert!(path.exists());
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(
            store.by_id(&alice.user_id).await.unwrap(),
            Some(alice.clone())
        );
        assert_eq!(store.by_handle(&alice.handle).await.unwrap(), Some(alice));
    }

    #[tokio::test]
    async fn file_database_is_in_wal_mode() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("wal.db")).await.unwrap();
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
    }

    /// Registers Alice, damages her row with `sql`, and returns what reading it back gives.
    async fn read_after_damage(sql: &'static str) -> (String, String) {
        let store = SqliteStore::open_in_memory().await.unwrap();
        let (_, _, alice) = test_identity("alice");
        store.register(&alice).await.unwrap();
        let mut conn = store.pool.acquire().await.unwrap();
        // The schema's CHECKs would refuse most damage; a damaged file has no such manners.
        sqlx::query("PRAGMA ignore_check_constraints = ON")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query(sql).execute(&mut *conn).await.unwrap();
        drop(conn);
        let by_id = store.by_id(&alice.user_id).await;
        let Err(StoreError::Unavailable(by_id)) = by_id else {
            panic!("{sql}: expected Unavailable from by_id, got {by_id:?}");
        };
        // The damaged row may have lost its handle; find it by whatever handle it has now.
        let row_handle: String = sqlx::query_scalar("SELECT handle FROM users")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        let by_handle = match Handle::parse(&row_handle) {
            Ok(h) => match store.by_handle(&h).await {
                Err(StoreError::Unavailable(m)) => m,
                other => panic!("{sql}: expected Unavailable from by_handle, got {other:?}"),
            },
            Err(_) => by_id.clone(),
        };
        (by_id, by_handle)
    }

    #[tokio::test]
    async fn corrupt_rows_are_errors_not_panics() {
        let cases: [(&'static str, &str); 5] = [
            ("UPDATE users SET handle = 'Not A Handle!'", "not allowed"),
            (
                "UPDATE users SET identity_key = zeroblob(32)",
                "identity_key does not belong to user_id",
            ),
            (
                "UPDATE users SET identity_key = zeroblob(31)",
                "identity_key is 31 bytes, expected 32",
            ),
            (
                "UPDATE users SET prekey_signature = x'00'",
                "prekey_signature is 1 bytes, expected 64",
            ),
            (
                "UPDATE users SET prekey_public = zeroblob(33)",
                "prekey_public is 33 bytes, expected 32",
            ),
        ];
        for (sql, expect) in cases {
            let (by_id, by_handle) = read_after_damage(sql).await;
            for message in [by_id, by_handle] {
                assert!(message.contains(expect), "{sql}: {message}");
                assert!(message.contains("corrupt"), "{sql}: {message}");
                assert!(message.contains("(in memory)"), "{sql}: {message}");
            }
        }
    }

    #[tokio::test]
    async fn a_corrupt_user_id_is_reported_in_hex() {
        let store = SqliteStore::open_in_memory().await.unwrap();
        let (_, _, alice) = test_identity("alice");
        store.register(&alice).await.unwrap();
        let mut conn = store.pool.acquire().await.unwrap();
        sqlx::query("PRAGMA ignore_check_constraints = ON")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query("UPDATE users SET user_id = x'0102'")
            .execute(&mut *conn)
            .await
            .unwrap();
        drop(conn);
        let err = store
            .by_handle(&alice.handle)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("user id 0102"), "{err}");
        assert!(err.contains("user_id is 2 bytes, expected 20"), "{err}");
    }

    #[tokio::test]
    async fn raw_store_prekey_refuses_an_older_prekey() {
        // replace_prekey checks age before calling store_prekey; store_prekey checks again
        // under the write lock so that a concurrent older replacement cannot land last.
        let store = SqliteStore::open_in_memory().await.unwrap();
        let (alice_key, _, alice) = test_identity("alice");
        store.register(&alice).await.unwrap();
        let older = syncra_core::crypto::keys::PrekeySecret::generate(
            &alice_key,
            FIXTURE_PREKEY_CREATED_AT - 1,
        );
        let err = store.store_prekey(&alice.user_id, older.signed()).await;
        assert!(matches!(err, Err(StoreError::StalePrekey)), "{err:?}");
        let same_time = syncra_core::crypto::keys::PrekeySecret::generate(
            &alice_key,
            FIXTURE_PREKEY_CREATED_AT,
        );
        store
            .store_prekey(&alice.user_id, same_time.signed())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn health_is_down_once_closed() {
        let store = SqliteStore::open_in_memory().await.unwrap();
        assert_eq!(store.health().await, Health::Up);
        store.close().await;
        let Health::Down(why) = store.health().await else {
            panic!("a closed store must be down");
        };
        assert!(why.contains("health check"), "{why}");
    }

    #[tokio::test]
    async fn opening_an_impossible_path_names_it() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the database file should be.
        let err = SqliteStore::open(dir.path()).await.unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        // A file where the parent directory should be.
        let blocker = dir.path().join("blocker");
        std::fs::write(&blocker, b"").unwrap();
        let err = SqliteStore::open(&blocker.join("x.db"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot create the directory"), "{err}");
    }

    #[tokio::test]
    async fn registers_kind_sqlite_with_strict_config() {
        let dir = tempfile::tempdir().unwrap();
        let mut kinds = Kinds::new("store", &[]);
        register(&mut kinds).unwrap();
        let path = dir.path().join("relay").join("identities.db");
        let store = kinds
            .create(serde_json::json!({ "kind": "sqlite", "path": path }), ())
            .await
            .unwrap();
        assert_eq!(store.kind(), KIND);
        assert!(path.exists());

        let cases = [
            (
                serde_json::json!({ "kind": "sqlite", "path": path, "pth": "x" }),
                "pth",
            ),
            (serde_json::json!({ "kind": "sqlite" }), "path"),
        ];
        for (config, expect) in cases {
            let Err(err) = kinds.create(config, ()).await else {
                panic!("config naming {expect} must be refused");
            };
            assert!(matches!(err, PluginError::Config { .. }), "{err}");
            assert!(err.to_string().contains(expect), "{err}");
        }

        let Err(err) = kinds
            .create(
                serde_json::json!({ "kind": "sqlite", "path": dir.path() }),
                (),
            )
            .await
        else {
            panic!("a directory is not a database file");
        };
        assert!(matches!(err, PluginError::Start { .. }), "{err}");
    }
}

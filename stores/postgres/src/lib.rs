//! `syncra-store-postgres`: an `IdentityStore` on Postgres, and on Neon, which is Postgres
//! reached over TLS, usually through a connection pooler.
//!
//! A relay selects it with `kind = "postgres"` and a [`PostgresConfig`]. The schema is embedded
//! (`migrations/`) and brought up to date at start; [`migrate`] does only that, for an operator
//! who wants to migrate before rolling out relays. Every operation is one short transaction with
//! its own `statement_timeout`; a caller waits at most the pool's acquire timeout for a
//! connection, so when the database is down calls fail quickly with
//! [`StoreError::Unavailable`], and the pool reconnects by itself when it comes back.
//!
//! This crate stores public material only (handle, identity key, signed prekey) and must never
//! hold a private key or a message. It supplies raw storage; the checks that make a record
//! acceptable live in `syncra-core`'s provided methods and must not be weakened here. It must
//! never trust what it reads back (a row that does not decode into a consistent record is an
//! error naming the row, never a panic), and it must never let the database password out: every
//! message, log line and `Debug` output shows URLs through [`redact_url`], and error texts from
//! the driver are scrubbed of the password before they leave this crate.
//!
//! # Neon
//!
//! - **URL.** Neon's console gives
//!   `postgresql://USER:PASSWORD@ep-NAME-ID-pooler.REGION.aws.neon.tech/DB?sslmode=require`.
//!   The `-pooler` host is the pooled endpoint (PgBouncer in transaction mode); without
//!   `-pooler` it is the direct endpoint. Put the password in the URL (percent-encoded) or in
//!   the `SYNCRA_STORE__URL` environment variable rather than in a file under version control.
//! - **TLS.** Neon requires TLS. `sslmode=require` encrypts but, as in libpq, does not check
//!   the certificate; prefer `sslmode=verify-full`, which checks the chain against the
//!   built-in Mozilla roots (Neon's certificates are publicly trusted) and the host name. For a
//!   private CA, set `ssl_root_cert` (or `sslrootcert=` in the URL). Without any `sslmode`, this
//!   store uses `verify-full` for every host that is not loopback (libpq would use `prefer`,
//!   which an active attacker can downgrade), and `prefer` on loopback.
//! - **The pooler and prepared statements.** In transaction mode a client's consecutive
//!   transactions may run on different server connections, so nothing may outlive a
//!   transaction. This store therefore runs every operation inside one explicit transaction
//!   (`BEGIN; SET LOCAL statement_timeout = ...`: a session-level `SET` would leak to other
//!   clients of the pooler), uses the unnamed prepared statement by default
//!   (`prepared_statements = false`), and sends no `extra_float_digits` startup parameter
//!   (PgBouncer refuses unknown ones). Note that sqlx's `statement_cache_capacity(0)` alone is
//!   not enough: sqlx 0.9 still gives every persistent query a new *named* statement and never
//!   closes it, so queries are also marked non-persistent. `prepared_statements = true` keeps
//!   named statements cached per connection (one round trip less per query); use it for a
//!   direct connection, or a pooler that tracks protocol-level prepared statements (PgBouncer
//!   1.21+ with `max_prepared_statements`, which Neon's pooler has).
//! - **Migrations** take a session-level advisory lock, which a transaction pooler can leave
//!   held on a server connection. Set `migrate_url` to the direct (non-`-pooler`) URL when `url`
//!   is pooled; migrations (at start and in [`migrate`]) use it, everything else uses `url`.
//! - **Pool sizing.** `max_connections` (default 5) is per relay node. Through the pooler,
//!   Neon allows up to 10,000 client connections, so size by load. On a direct URL the compute's
//!   `max_connections` is small (about 100 at 0.25 CU, a few of them reserved), and every node's
//!   pool plus migrations and admin sessions must fit under it: nodes × `max_connections` well
//!   below that. Idle connections are closed after a minute, so an idle relay holds none.
//!   A suspended compute wakes on the first connection (hundreds of milliseconds to a few
//!   seconds), which `acquire_timeout_secs` (default 5) must cover.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow, PgSslMode};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Postgres, Row, Transaction};
use syncra_core::carriage::GroupId;
use syncra_core::crypto::envelope::MessageId;
use syncra_core::crypto::keys::SignedPrekey;
use syncra_core::error::{PluginError, StoreError};
use syncra_core::record::StoredColumns;
use syncra_core::redact::{REDACTED, redact_url, secret_spans};
use syncra_core::registry::{Kinds, typed_config};
use syncra_core::store::{
    ClaimedKeyPackage, EpochAdvance, GroupState, KeyPackageStock, MAX_KEY_PACKAGES, encode_members,
};
use syncra_core::{Handle, Health, IdentityRecord, IdentityStore, UserId};

/// The kind name this store registers under.
pub const KIND: &str = "postgres";

pub mod mailbox;

/// The schema, embedded at compile time so the binary never needs the migration files.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The unique constraints of `users` (named in `migrations/0001_users.sql`).
const USER_ID_CONSTRAINT: &str = "users_pkey";
const HANDLE_CONSTRAINT: &str = "users_handle_key";

/// How long `health` waits for `SELECT 1` before reporting the store down.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a diagnostic direct connection (made when the pool cannot serve) may take.
const DIAGNOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the schema migration may take, lock wait included.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

/// Slack on top of the acquire and statement timeouts before a hung operation (a network path
/// that drops packets without a reset) is abandoned.
const OPERATION_GRACE: Duration = Duration::from_secs(2);

/// Idle connections are closed after this, so an idle relay holds no database connections.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Connections are replaced after this, so server-side memory and pooler state never build up.
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// Named statements kept per connection when `prepared_statements = true`. The store has six.
const STATEMENT_CACHE: usize = 16;

const SELECT_BY_HANDLE: &str = "SELECT user_id, handle, identity_key, prekey_public, \
     prekey_created_at::text AS prekey_created_at, prekey_signature FROM users WHERE handle = $1";
const SELECT_BY_ID: &str = "SELECT user_id, handle, identity_key, prekey_public, \
     prekey_created_at::text AS prekey_created_at, prekey_signature FROM users WHERE user_id = $1";
const INSERT: &str = "INSERT INTO users (user_id, handle, identity_key, prekey_public, \
     prekey_created_at, prekey_signature, generation) VALUES ($1, $2, $3, $4, $5::numeric, $6, $7)";
const GENERATION: &str = "SELECT generation FROM users WHERE user_id = $1";
const EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM users WHERE user_id = $1)";
/// One statement decides a prekey replacement: the `WHERE` refuses an older prekey under the
/// row lock (a concurrent replacement is re-checked against the row it committed), and the
/// second `EXISTS` tells a stale prekey from an unknown user.
const STORE_PREKEY: &str = "WITH updated AS ( \
         UPDATE users SET prekey_public = $2, prekey_created_at = $3::numeric, \
         prekey_signature = $4 \
         WHERE user_id = $1 AND prekey_created_at <= $3::numeric RETURNING 1) \
     SELECT EXISTS (SELECT 1 FROM updated), EXISTS (SELECT 1 FROM users WHERE user_id = $1)";
/// Deleting a user takes their KeyPackages with them.
const DELETE: &str = "WITH kp AS (DELETE FROM key_packages WHERE user_id = $1), \
     lr AS (DELETE FROM last_resort_key_packages WHERE user_id = $1) \
     DELETE FROM users WHERE user_id = $1";
/// Locks the user's row, so concurrent publishes of one user count one after the other.
const LOCK_USER: &str = "SELECT 1 FROM users WHERE user_id = $1 FOR UPDATE";
const COUNT_KEY_PACKAGES: &str = "SELECT COUNT(*) FROM key_packages WHERE user_id = $1";
const INSERT_KEY_PACKAGE: &str = "INSERT INTO key_packages (user_id, package) VALUES ($1, $2)";
const UPSERT_LAST_RESORT: &str = "INSERT INTO last_resort_key_packages (user_id, package) \
     VALUES ($1, $2) ON CONFLICT (user_id) DO UPDATE SET package = excluded.package";
/// Claims the oldest one-time package: rows locked by a concurrent claim are skipped, so two
/// claims never take the same one.
const CLAIM_KEY_PACKAGE: &str = "DELETE FROM key_packages WHERE seq = ( \
     SELECT seq FROM key_packages WHERE user_id = $1 ORDER BY seq LIMIT 1 \
     FOR UPDATE SKIP LOCKED) RETURNING package";
const LAST_RESORT: &str = "SELECT package FROM last_resort_key_packages WHERE user_id = $1";
const STOCK: &str = "SELECT (SELECT COUNT(*) FROM key_packages WHERE user_id = $1), \
     EXISTS (SELECT 1 FROM last_resort_key_packages WHERE user_id = $1)";
const GROUP: &str = "SELECT epoch, members, last_commit FROM mls_groups WHERE group_id = $1";
/// Advances a known group if it is at the expected epoch (a concurrent commit holds the row
/// lock; under READ COMMITTED the loser re-reads the advanced epoch and updates nothing).
const ADVANCE_GROUP: &str = "UPDATE mls_groups SET epoch = $2 + 1, members = $3, \
     last_commit = $4, updated_at = now() WHERE group_id = $1 AND epoch = $2";
/// A group's first commit: of two racing ones the primary key lets one insert.
const CREATE_GROUP: &str = "INSERT INTO mls_groups (group_id, epoch, members, last_commit) \
     VALUES ($1, 1, $2, $3) ON CONFLICT (group_id) DO NOTHING";
const GROUP_EPOCH: &str = "SELECT epoch FROM mls_groups WHERE group_id = $1";

/// The configuration of `kind = "postgres"`.
///
/// `Debug` shows the URLs with the password replaced by `<redacted>`.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE?sslmode=...`. `sslmode` may be `disable`,
    /// `allow`, `prefer`, `require`, `verify-ca` or `verify-full`; without it, `verify-full`
    /// for any host that is not loopback.
    pub url: String,
    /// A direct (not pooled) URL for schema migrations, when `url` goes through a transaction
    /// pooler (Neon's `-pooler` endpoint). Defaults to `url`.
    #[serde(default)]
    pub migrate_url: Option<String>,
    /// Connections per relay node (default 5).
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// How long a call waits for a connection before failing as unavailable (default 5).
    #[serde(default = "default_acquire_timeout_secs")]
    pub acquire_timeout_secs: u64,
    /// The server-side limit on each statement, in milliseconds (default 5000).
    #[serde(default = "default_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    /// A PEM file of CA certificates to trust besides the built-in roots, for
    /// `sslmode=verify-ca`/`verify-full` against a private CA. Takes precedence over
    /// `sslrootcert` in the URL.
    #[serde(default)]
    pub ssl_root_cert: Option<PathBuf>,
    /// Whether to keep named prepared statements per connection (default false: only the
    /// unnamed statement, which works through any transaction pooler; see the crate docs).
    #[serde(default)]
    pub prepared_statements: bool,
}

fn default_max_connections() -> u32 {
    5
}

fn default_acquire_timeout_secs() -> u64 {
    5
}

fn default_statement_timeout_ms() -> u64 {
    5000
}

impl PostgresConfig {
    /// The defaults for a database URL.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresConfig {
            url: url.into(),
            migrate_url: None,
            max_connections: default_max_connections(),
            acquire_timeout_secs: default_acquire_timeout_secs(),
            statement_timeout_ms: default_statement_timeout_ms(),
            ssl_root_cert: None,
            prepared_statements: false,
        }
    }

    /// What is wrong with the settings, naming the key.
    fn validate(&self) -> Result<(), String> {
        for (key, url) in [
            ("url", Some(&self.url)),
            ("migrate_url", self.migrate_url.as_ref()),
        ] {
            if let Some(url) = url
                && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
            {
                return Err(format!(
                    "{key} {} must start with postgres:// or postgresql://",
                    redact_url(url)
                ));
            }
        }
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if !(1..=3600).contains(&self.acquire_timeout_secs) {
            return Err(format!(
                "acquire_timeout_secs must be between 1 and 3600, not {}",
                self.acquire_timeout_secs
            ));
        }
        // 0 would mean "no limit" to Postgres; the server takes at most i32::MAX.
        if !(1..=u64::from(i32::MAX.unsigned_abs())).contains(&self.statement_timeout_ms) {
            return Err(format!(
                "statement_timeout_ms must be between 1 and {}, not {}",
                i32::MAX,
                self.statement_timeout_ms
            ));
        }
        Ok(())
    }

    fn acquire_timeout(&self) -> Duration {
        Duration::from_secs(self.acquire_timeout_secs)
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(&self.url))
            .field("migrate_url", &self.migrate_url.as_deref().map(redact_url))
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout_secs", &self.acquire_timeout_secs)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .field("ssl_root_cert", &self.ssl_root_cert)
            .field("prepared_statements", &self.prepared_statements)
            .finish()
    }
}

/// What went wrong, with the context `StoreError::Unavailable` carries as text. Every location
/// is a redacted URL; the texts of driver errors are scrubbed by [`Secrets`] on the way out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
enum PostgresError {
    #[error("invalid postgres store configuration: {0}")]
    Config(String),
    #[error("cannot read ssl_root_cert {}: {source}", path.display())]
    RootCert {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to the identity database {location}: {source}")]
    Connect {
        location: Arc<str>,
        source: sqlx::Error,
    },
    #[error(
        "cannot connect to the identity database {location}: no answer within {after:?} \
         (is the host reachable?)"
    )]
    ConnectTimeout { location: Arc<str>, after: Duration },
    #[error("cannot bring the identity database {location} to the current schema: {source}")]
    Migrate {
        location: Arc<str>,
        source: MigrateError,
    },
    #[error(
        "identity database {location}: the schema migration did not finish within {after:?} \
         (another node migrating, or a migration lock left behind by a connection pooler: \
         migrate over a direct connection with migrate_url)"
    )]
    MigrateTimeout { location: Arc<str>, after: Duration },
    #[error(
        "identity database {location}: no connection for {action} within {after:?} (is the \
         server down or unreachable, or are all {max} connections busy?)"
    )]
    NoConnection {
        location: Arc<str>,
        action: &'static str,
        after: Duration,
        max: u32,
    },
    #[error("identity database {location}: {action} failed: {source}")]
    Query {
        location: Arc<str>,
        action: &'static str,
        source: sqlx::Error,
    },
    #[error("identity database {location}: {action} did not finish within {after:?}")]
    Timeout {
        location: Arc<str>,
        action: &'static str,
        after: Duration,
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

/// An [`IdentityStore`] in a Postgres database. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// For the diagnostic direct connection when the pool cannot serve. Holds the password:
    /// never printed.
    options: PgConnectOptions,
    /// The redacted URL, for messages.
    location: Arc<str>,
    secrets: Secrets,
    /// `BEGIN ...; SET LOCAL statement_timeout = ...` for reads and for writes (writes also
    /// with `synchronous_commit = on`).
    begin_read: Arc<str>,
    begin_write: Arc<str>,
    /// Whether queries use named, cached prepared statements.
    persistent: bool,
    max_connections: u32,
    acquire_timeout: Duration,
    /// The most any one operation may take, connection wait included.
    deadline: Duration,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("location", &self.location)
            .field("connections", &self.pool.size())
            .field("idle", &self.pool.num_idle())
            .field("max_connections", &self.max_connections)
            .field("prepared_statements", &self.persistent)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to the database a [`PostgresConfig`] describes and brings it to the current
    /// schema (over `migrate_url` if set). Fails if the database cannot be reached now.
    pub async fn connect(config: &PostgresConfig) -> Result<Self, StoreError> {
        let secrets = Secrets::of(config);
        Self::connect_inner(config, secrets.clone())
            .await
            .map_err(|e| secrets.unavailable(&e))
    }

    async fn connect_inner(
        config: &PostgresConfig,
        secrets: Secrets,
    ) -> Result<Self, PostgresError> {
        migrate_inner(config).await?;
        let location: Arc<str> = redact_url(&config.url).into();
        let options = connect_options(&config.url, config, config.prepared_statements)?;
        if config.migrate_url.is_some() {
            // The migration proved `migrate_url`; prove `url` too, so that a wrong pooled URL
            // fails the start with the real reason rather than the first registration.
            let conn = connect_direct(&options, &location, config.acquire_timeout()).await?;
            let _ = conn.close().await;
        }
        // Lazy: connections are opened on demand, so an idle relay holds none (min 0), and a
        // database that went away is reconnected to by the next call.
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .min_connections(0)
            .acquire_timeout(config.acquire_timeout())
            .idle_timeout(Some(IDLE_TIMEOUT))
            .max_lifetime(Some(MAX_LIFETIME))
            // A connection whose server went away is found out here and replaced, instead of
            // failing the caller's query.
            .test_before_acquire(true)
            .connect_lazy_with(options.clone());
        let statement_timeout = config.statement_timeout_ms;
        Ok(PostgresStore {
            pool,
            options,
            location,
            secrets,
            begin_read: format!(
                "BEGIN READ ONLY; SET LOCAL statement_timeout = {statement_timeout}"
            )
            .into(),
            // A write is answered only once it is on the server's disk (WAL flushed), whatever
            // the server's own `synchronous_commit` says: a mailbox `stored` and a registration
            // are promises to a person.
            begin_write: format!(
                "BEGIN; SET LOCAL statement_timeout = {statement_timeout}; \
                 SET LOCAL synchronous_commit = on"
            )
            .into(),
            persistent: config.prepared_statements,
            max_connections: config.max_connections,
            acquire_timeout: config.acquire_timeout(),
            deadline: config.acquire_timeout()
                + 2 * Duration::from_millis(statement_timeout)
                + OPERATION_GRACE,
        })
    }

    /// Closes every connection, waiting for running queries.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Runs one operation, abandoning it (as unavailable) after the store's deadline.
    async fn bounded<T>(
        &self,
        action: &'static str,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.deadline, op).await {
            Ok(result) => result,
            Err(_) => Err(self.fail(&PostgresError::Timeout {
                location: Arc::clone(&self.location),
                action,
                after: self.deadline,
            })),
        }
    }

    fn fail(&self, error: &PostgresError) -> StoreError {
        self.secrets.unavailable(error)
    }

    fn query_error(&self, action: &'static str, source: sqlx::Error) -> PostgresError {
        match source {
            sqlx::Error::PoolTimedOut => PostgresError::NoConnection {
                location: Arc::clone(&self.location),
                action,
                after: self.acquire_timeout,
                max: self.max_connections,
            },
            source => PostgresError::Query {
                location: Arc::clone(&self.location),
                action,
                source,
            },
        }
    }

    fn failed(&self, action: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
        move |source| self.fail(&self.query_error(action, source))
    }

    async fn begin(
        &self,
        statement: &Arc<str>,
        action: &'static str,
    ) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool
            .begin_with(AssertSqlSafe(Arc::clone(statement)))
            .await
            .map_err(self.failed(action))
    }

    async fn fetch_record<'k, K>(
        &self,
        sql: &'static str,
        key: K,
        action: &'static str,
    ) -> Result<Option<IdentityRecord>, StoreError>
    where
        K: sqlx::Encode<'k, Postgres> + sqlx::Type<Postgres> + Send + 'k,
    {
        self.bounded(action, async {
            let mut tx = self.begin(&self.begin_read, action).await?;
            let row = sqlx::query(sql)
                .persistent(self.persistent)
                .bind(key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(self.failed(action))?;
            tx.commit().await.map_err(self.failed(action))?;
            row.map(|r| self.record_from_row(&r))
                .transpose()
                .map_err(|e| self.fail(&e))
        })
        .await
    }

    async fn stock_in(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        id: &UserId,
        action: &'static str,
    ) -> Result<KeyPackageStock, StoreError> {
        let (one_time, last_resort): (i64, bool) = sqlx::query_as(STOCK)
            .persistent(self.persistent)
            .bind(id.as_bytes().as_slice())
            .fetch_one(&mut **tx)
            .await
            .map_err(self.failed(action))?;
        Ok(KeyPackageStock {
            one_time: u32::try_from(one_time).unwrap_or(u32::MAX),
            last_resort,
        })
    }

    async fn exists(&self, id: &UserId) -> Result<bool, StoreError> {
        let action = "checking a refused registration";
        let mut tx = self.begin(&self.begin_read, action).await?;
        let exists: bool = sqlx::query_scalar(EXISTS)
            .persistent(self.persistent)
            .bind(id.as_bytes().as_slice())
            .fetch_one(&mut *tx)
            .await
            .map_err(self.failed(action))?;
        tx.commit().await.map_err(self.failed(action))?;
        Ok(exists)
    }

    fn record_from_row(&self, row: &PgRow) -> Result<IdentityRecord, PostgresError> {
        let user_id: Vec<u8> = self.column(row, "user_id", "?")?;
        let who = StoredColumns::row_name(&user_id);
        // Kept as text: Postgres has no unsigned 64-bit integer.
        let created_at: String = self.column(row, "prekey_created_at", &who)?;
        let prekey_created_at: u64 = created_at.parse().map_err(|_| {
            self.corrupt(
                who.clone(),
                format!("prekey_created_at {created_at:?} is not a u64"),
            )
        })?;
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

    fn column<'r, T>(&self, row: &'r PgRow, name: &str, who: &str) -> Result<T, PostgresError>
    where
        T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
    {
        row.try_get(name)
            .map_err(|e| self.corrupt(who.to_owned(), format!("column {name}: {e}")))
    }

    fn corrupt(&self, row: String, why: String) -> PostgresError {
        PostgresError::CorruptRow {
            location: Arc::clone(&self.location),
            row,
            why,
        }
    }

    /// Why the pool could not serve: a direct connection attempt usually names the cause
    /// (refused, unknown host, bad certificate), which the pool's retry loop hides.
    async fn diagnose(&self, action: &'static str) -> PostgresError {
        match tokio::time::timeout(DIAGNOSE_TIMEOUT, PgConnection::connect_with(&self.options))
            .await
        {
            Ok(Err(source)) => PostgresError::Connect {
                location: Arc::clone(&self.location),
                source,
            },
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                PostgresError::NoConnection {
                    location: Arc::clone(&self.location),
                    action,
                    after: HEALTH_TIMEOUT,
                    max: self.max_connections,
                }
            }
            Err(_) => PostgresError::ConnectTimeout {
                location: Arc::clone(&self.location),
                after: DIAGNOSE_TIMEOUT,
            },
        }
    }
}

#[async_trait]
impl IdentityStore for PostgresStore {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn insert(&self, record: &IdentityRecord) -> Result<(), StoreError> {
        let action = "registering a user";
        self.bounded(action, async {
            let mut tx = self.begin(&self.begin_write, action).await?;
            // One statement decides the race: of two registrations of a handle, the unique
            // index lets one insert and makes the other wait for it, then fail.
            let inserted = sqlx::query(INSERT)
                .persistent(self.persistent)
                .bind(record.user_id.as_bytes().as_slice())
                .bind(record.handle.as_str())
                .bind(record.identity_key.as_slice())
                .bind(record.prekey.public.as_slice())
                .bind(record.prekey.created_at.to_string())
                .bind(record.prekey.signature.as_slice())
                .bind(syncra_core::store::new_generation().cast_signed())
                .execute(&mut *tx)
                .await;
            let violated = match inserted {
                Ok(_) => {
                    return tx.commit().await.map_err(self.failed(action));
                }
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                    e.constraint().map(str::to_owned)
                }
                Err(e) => return Err(self.failed(action)(e)),
            };
            // Dropping `tx` rolls back the failed transaction.
            drop(tx);
            match violated.as_deref() {
                Some(USER_ID_CONSTRAINT) => Err(StoreError::AlreadyRegistered(record.user_id)),
                // Postgres reports the first index that conflicts; when the identity is also
                // registered, that is the mistake to report, as the other stores do.
                Some(HANDLE_CONSTRAINT) if self.exists(&record.user_id).await? => {
                    Err(StoreError::AlreadyRegistered(record.user_id))
                }
                Some(HANDLE_CONSTRAINT) => {
                    Err(StoreError::HandleTaken(record.handle.as_str().to_owned()))
                }
                other => Err(self.fail(&PostgresError::Config(format!(
                    "registering a user violated the unknown unique constraint {other:?}; \
                     the schema was changed outside syncra"
                )))),
            }
        })
        .await
    }

    async fn by_handle(&self, handle: &Handle) -> Result<Option<IdentityRecord>, StoreError> {
        self.fetch_record(SELECT_BY_HANDLE, handle.as_str(), "looking up a handle")
            .await
    }

    async fn by_id(&self, id: &UserId) -> Result<Option<IdentityRecord>, StoreError> {
        self.fetch_record(
            SELECT_BY_ID,
            id.as_bytes().as_slice(),
            "looking up a user id",
        )
        .await
    }

    /// Also refuses a prekey older than the stored one ([`StoreError::StalePrekey`]), in the
    /// same statement that writes it: the provided `replace_prekey` checks before it calls
    /// this, but two concurrent replacements could both pass that check and the older one land
    /// last.
    async fn store_prekey(&self, id: &UserId, prekey: &SignedPrekey) -> Result<(), StoreError> {
        let action = "replacing a prekey";
        self.bounded(action, async {
            let mut tx = self.begin(&self.begin_write, action).await?;
            let (updated, known): (bool, bool) = sqlx::query_as(STORE_PREKEY)
                .persistent(self.persistent)
                .bind(id.as_bytes().as_slice())
                .bind(prekey.public.as_slice())
                .bind(prekey.created_at.to_string())
                .bind(prekey.signature.as_slice())
                .fetch_one(&mut *tx)
                .await
                .map_err(self.failed(action))?;
            tx.commit().await.map_err(self.failed(action))?;
            match (updated, known) {
                (true, _) => Ok(()),
                (false, true) => Err(StoreError::StalePrekey),
                (false, false) => Err(StoreError::NotFound(*id)),
            }
        })
        .await
    }

    async fn generation(&self, id: &UserId) -> Result<Option<u64>, StoreError> {
        let action = "reading a user's generation";
        self.bounded(action, async {
            let mut tx = self.begin(&self.begin_read, action).await?;
            let generation: Option<i64> = sqlx::query_scalar(GENERATION)
                .persistent(self.persistent)
                .bind(id.as_bytes().as_slice())
                .fetch_optional(&mut *tx)
                .await
                .map_err(self.failed(action))?;
            tx.commit().await.map_err(self.failed(action))?;
            Ok(generation.map(i64::cast_unsigned))
        })
        .await
    }

    async fn delete(&self, id: &UserId) -> Result<bool, StoreError> {
        let action = "deleting a user";
        self.bounded(action, async {
            let mut tx = self.begin(&self.begin_write, action).await?;
            let deleted = sqlx::query(DELETE)
                .persistent(self.persistent)
                .bind(id.as_bytes().as_slice())
                .execute(&mut *tx)
                .await
                .map_err(self.failed(action))?
                .rows_affected();
            tx.commit().await.map_err(self.failed(action))?;
            Ok(deleted > 0)
        })
        .await
    }

    async fn store_key_packages(
        &self,
        id: &UserId,
        one_time: &[bytes::Bytes],
        last_resort: Option<&bytes::Bytes>,
    ) -> Result<KeyPackageStock, StoreError> {
        let action = "publishing KeyPackages";
        let user = id.as_bytes().as_slice();
        self.bounded(action, async {
            let mut tx = self.begin(&self.begin_write, action).await?;
            let known = sqlx::query(LOCK_USER)
                .persistent(self.persistent)
                .bind(user)
                .fetch_optional(&mut *tx)
                .await
                .map_err(self.failed(action))?
                .is_some();
            if !known {
                return Err(StoreError::NotFound(*id));
            }
            let held: i64 = sqlx::query_scalar(COUNT_KEY_PACKAGES)
                .persistent(self.persistent)
                .bind(user)
                .fetch_one(&mut *tx)
                .await
                .map_err(self.failed(action))?;
            if held.cast_unsigned() as usize + one_time.len() > MAX_KEY_PACKAGES {
                return Err(StoreError::KeyPackagesFull {
                    max: MAX_KEY_PACKAGES,
                });
            }
            for package in one_time {
                sqlx::query(INSERT_KEY_PACKAGE)
                    .persistent(self.persistent)
                    .bind(user)
                    .bind(package.as_ref())
                    .execute(&mut *tx)
                    .await
                    .map_err(self.failed(action))?;
            }
            if let Some(package) = last_resort {
                sqlx::query(UPSERT_LAST_RESORT)
                    .persistent(self.persistent)
                    .bind(user)
                    .bind(package.as_ref())
                    .execute(&mut *tx)
                    .await
                    .map_err(self.failed(action))?;
            }
            let stock = self.stock_in(&mut tx, id, action).await?;
            tx.commit().await.map_err(self.failed(action))?;
            Ok(stock)
        })
        .await
    }

    async fn claim_key_package(
        &self,
        id: &UserId,
    ) -> Result<Option<ClaimedKeyPackage>, StoreError> {
        let action = "claiming a KeyPackage";
        let user = id.as_bytes().as_slice();
        self.bounded(action, async {
            let mut tx = self.begin(&self.begin_write, action).await?;
            let one_time: Option<Vec<u8>> = sqlx::query_scalar(CLAIM_KEY_PACKAGE)
                .persistent(self.persistent)
                .bind(user)
                .fetch_optional(&mut *tx)
                .await
                .map_err(self.failed(action))?;
            let claimed = match one_time {
                Some(p) => Some(ClaimedKeyPackage {
                    package: p.into(),
                    last_resort: false,
                }),
                None => sqlx::query_scalar::<_, Vec<u8>>(LAST_RESORT)
                    .persistent(self.persistent)
                    .bind(user)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(self.failed(action))?
                    .map(|p| ClaimedKeyPackage {
                        package: p.into(),
                        last_resort: true,
                    }),
            };
            tx.commit().await.map_err(self.failed(action))?;
            Ok(claimed)
        })
        .await
    }

    async fn key_package_stock(&self, id: &UserId) -> Result<KeyPackageStock, StoreError> {
        let action = "counting KeyPackages";
        self.bounded(action, async {
            let mut tx = self.begin(&self.begin_read, action).await?;
            let stock = self.stock_in(&mut tx, id, action).await?;
            tx.commit().await.map_err(self.failed(action))?;
            Ok(stock)
        })
        .await
    }

    async fn group(&self, group: &GroupId) -> Result<Option<GroupState>, StoreError> {
        let action = "reading a group";
        self.bounded(action, async {
            let mut tx = self.begin(&self.begin_read, action).await?;
            let row: Option<(i64, Vec<u8>, Vec<u8>)> = sqlx::query_as(GROUP)
                .persistent(self.persistent)
                .bind(group.as_bytes().as_slice())
                .fetch_optional(&mut *tx)
                .await
                .map_err(self.failed(action))?;
            tx.commit().await.map_err(self.failed(action))?;
            let Some((epoch, members, last_commit)) = row else {
                return Ok(None);
            };
            GroupState::from_columns(epoch, &members, &last_commit)
                .map(Some)
                .map_err(|why| self.fail(&self.corrupt(format!("group {group}"), why)))
        })
        .await
    }

    async fn advance_group(
        &self,
        group: &GroupId,
        from: u64,
        members: &[UserId],
        commit: &MessageId,
    ) -> Result<EpochAdvance, StoreError> {
        let action = "advancing a group's epoch";
        let gid = group.as_bytes().as_slice();
        let members = encode_members(members);
        // The epoch is a BIGINT: an epoch at its end cannot advance.
        let Some(from_signed) = i64::try_from(from).ok().filter(|f| *f < i64::MAX) else {
            let current = self.group(group).await?.map(|g| g.epoch);
            return Ok(EpochAdvance::Conflict { current });
        };
        self.bounded(action, async {
            let mut tx = self.begin(&self.begin_write, action).await?;
            let mut advanced = sqlx::query(ADVANCE_GROUP)
                .persistent(self.persistent)
                .bind(gid)
                .bind(from_signed)
                .bind(members.as_slice())
                .bind(commit.as_slice())
                .execute(&mut *tx)
                .await
                .map_err(self.failed(action))?
                .rows_affected()
                == 1;
            if !advanced && from == 0 {
                advanced = sqlx::query(CREATE_GROUP)
                    .persistent(self.persistent)
                    .bind(gid)
                    .bind(members.as_slice())
                    .bind(commit.as_slice())
                    .execute(&mut *tx)
                    .await
                    .map_err(self.failed(action))?
                    .rows_affected()
                    == 1;
            }
            let current = if advanced {
                None
            } else {
                sqlx::query_scalar::<_, i64>(GROUP_EPOCH)
                    .persistent(self.persistent)
                    .bind(gid)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(self.failed(action))?
            };
            tx.commit().await.map_err(self.failed(action))?;
            Ok(if advanced {
                EpochAdvance::Advanced
            } else {
                EpochAdvance::Conflict {
                    current: current.map(i64::cast_unsigned),
                }
            })
        })
        .await
    }

    async fn health(&self) -> Health {
        let action = "health check";
        // A simple query (no prepared statement), fine through any pooler.
        let probe = sqlx::raw_sql("SELECT 1").execute(&self.pool);
        let error = match tokio::time::timeout(HEALTH_TIMEOUT, probe).await {
            Ok(Ok(_)) => return Health::Up,
            Ok(Err(sqlx::Error::PoolTimedOut)) | Err(_) => self.diagnose(action).await,
            Ok(Err(source)) => self.query_error(action, source),
        };
        Health::Down(self.secrets.scrub(&error.to_string()))
    }
}

/// Brings the database a [`PostgresConfig`] describes to the current schema (over
/// `migrate_url` if set) and returns. For `syncra-relay migrate`; [`PostgresStore::connect`]
/// does the same at start. Safe to run from several nodes at once (the migrations take a lock)
/// and when the schema is already current.
pub async fn migrate(config: &PostgresConfig) -> Result<(), StoreError> {
    let secrets = Secrets::of(config);
    migrate_inner(config)
        .await
        .map_err(|e| secrets.unavailable(&e))
}

async fn migrate_inner(config: &PostgresConfig) -> Result<(), PostgresError> {
    config.validate().map_err(PostgresError::Config)?;
    let url = config.migrate_url.as_deref().unwrap_or(&config.url);
    let location: Arc<str> = redact_url(url).into();
    // A migration connection is a direct, short session: its named statements are closed with
    // it, so it may cache them whatever `prepared_statements` says.
    let options = connect_options(url, config, true)?;
    // A direct connection first: it fails with the real reason (refused, unknown host, bad
    // certificate, wrong password), which a pool's retry loop would turn into a timeout.
    let conn = connect_direct(&options, &location, config.acquire_timeout()).await?;
    let _ = conn.close().await;
    // `Migrator::run` on a pool rather than a `&mut PgConnection`: the future of the latter is
    // not provably `Send` for every lifetime, which a plugin factory needs.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(config.acquire_timeout())
        .connect_lazy_with(options);
    let result = match tokio::time::timeout(MIGRATION_TIMEOUT, MIGRATOR.run(&pool)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(PostgresError::Migrate {
            location: Arc::clone(&location),
            source,
        }),
        Err(_) => Err(PostgresError::MigrateTimeout {
            location: Arc::clone(&location),
            after: MIGRATION_TIMEOUT,
        }),
    };
    pool.close().await;
    result
}

async fn connect_direct(
    options: &PgConnectOptions,
    location: &Arc<str>,
    within: Duration,
) -> Result<PgConnection, PostgresError> {
    match tokio::time::timeout(within, options.connect()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(source)) => Err(PostgresError::Connect {
            location: Arc::clone(location),
            source,
        }),
        Err(_) => Err(PostgresError::ConnectTimeout {
            location: Arc::clone(location),
            after: within,
        }),
    }
}

/// The driver's options for `url` under `config`.
fn connect_options(
    url: &str,
    config: &PostgresConfig,
    cache_statements: bool,
) -> Result<PgConnectOptions, PostgresError> {
    check_query_keys(url).map_err(PostgresError::Config)?;
    let mut options = PgConnectOptions::from_str(url).map_err(|e| {
        PostgresError::Config(format!(
            "{} is not a usable postgres URL: {e}",
            redact_url(url)
        ))
    })?;
    if !has_query_key(url, &["sslmode", "ssl-mode"]) {
        let mode = default_ssl_mode(&options);
        options = options.ssl_mode(mode);
    }
    if let Some(path) = &config.ssl_root_cert {
        // Read now, so a missing file is a start error naming it, not a TLS error later.
        std::fs::read(path).map_err(|source| PostgresError::RootCert {
            path: path.clone(),
            source,
        })?;
        options = options.ssl_root_cert(path);
    }
    if options.get_application_name().is_none() {
        options = options.application_name("syncra-relay");
    }
    Ok(options
        .statement_cache_capacity(if cache_statements { STATEMENT_CACHE } else { 0 })
        // A startup parameter PgBouncer refuses unless told to ignore it; no column here is a
        // float, so nothing needs it.
        .extra_float_digits(None))
}

/// `verify-full` unless the server is on this machine (loopback or a Unix socket), where
/// `prefer` keeps a local server without TLS working.
fn default_ssl_mode(options: &PgConnectOptions) -> PgSslMode {
    let host = options.get_host();
    let local = options.get_socket().is_some()
        || host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if local {
        PgSslMode::Prefer
    } else {
        PgSslMode::VerifyFull
    }
}

/// The URL parameters the driver understands. Anything else is refused here, as unknown config
/// keys are everywhere in Syncra; the driver would only log and ignore it, value included, and
/// a misspelled `password` parameter would put the password in the log.
const QUERY_KEYS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// Refuses URL parameters the driver does not know (naming the key, never the value) and the
/// statement cache setting, which `prepared_statements` owns.
fn check_query_keys(url: &str) -> Result<(), String> {
    let Some((_, query)) = url.split_once('?') else {
        return Ok(());
    };
    let query = query.split('#').next().unwrap_or_default();
    for key in query.split('&').filter_map(|pair| pair.split('=').next()) {
        if key.is_empty() || QUERY_KEYS.contains(&key) {
            continue;
        }
        if key.starts_with("options[") && key.ends_with(']') {
            continue;
        }
        if key == "statement-cache-capacity" {
            return Err(
                "the URL parameter statement-cache-capacity is not used; set \
                 prepared_statements instead"
                    .into(),
            );
        }
        let shown: String = key.chars().take(40).collect();
        return Err(format!(
            "unknown URL parameter {shown:?}; known: {}",
            QUERY_KEYS.join(", ")
        ));
    }
    Ok(())
}

/// Whether the URL's query sets one of `keys`.
fn has_query_key(url: &str, keys: &[&str]) -> bool {
    let Some((_, query)) = url.split_once('?') else {
        return false;
    };
    let query = query.split('#').next().unwrap_or_default();
    query
        .split('&')
        .filter_map(|pair| pair.split('=').next())
        .any(|key| keys.iter().any(|k| k.eq_ignore_ascii_case(key)))
}

/// The passwords of the configured URLs, as written and percent-decoded, cut out of every
/// message that leaves this crate. Driver errors are not known to include them, but a message
/// is cheap to scrub and a leaked database password is not.
#[derive(Clone, Default)]
struct Secrets(Arc<[String]>);

impl Secrets {
    fn of(config: &PostgresConfig) -> Self {
        let mut secrets = Vec::new();
        for url in std::iter::once(&config.url).chain(&config.migrate_url) {
            for span in secret_spans(url) {
                let raw = url[span].trim_matches('\'');
                secrets.push(raw.to_owned());
                secrets.push(percent_decode(raw));
                secrets.push(percent_decode(&raw.replace('+', " ")));
            }
        }
        secrets.retain(|s| !s.is_empty());
        // Longest first, so a secret that contains another is cut out whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Secrets(secrets.into())
    }

    fn scrub(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for secret in self.0.iter() {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), REDACTED);
            }
        }
        text
    }

    fn unavailable(&self, error: &PostgresError) -> StoreError {
        StoreError::Unavailable(self.scrub(&error.to_string()))
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secrets({} redacted)", self.0.len())
    }
}

/// `%XX` escapes decoded; anything malformed is kept as written.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex_byte = || {
            let h = s.get(i + 1..i + 3)?;
            u8::from_str_radix(h, 16).ok()
        };
        match (bytes[i], hex_byte()) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Registers kind `"postgres"`.
pub fn register(kinds: &mut Kinds<Arc<dyn IdentityStore>, ()>) -> Result<(), PluginError> {
    kinds.register(KIND, |config, ()| async move {
        let config: PostgresConfig = typed_config("store", KIND, config)?;
        config.validate().map_err(|message| PluginError::Config {
            category: "store",
            kind: KIND.to_owned(),
            message,
        })?;
        let store = PostgresStore::connect(&config)
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
    use syncra_core::crypto::keys::PrekeySecret;
    use syncra_test_support::postgres::PostgresServer;
    use syncra_test_support::{FIXTURE_PREKEY_CREATED_AT, test_identity, unique_name};

    use super::*;

    #[test]
    fn secrets_scrub_the_password_as_written_and_decoded() {
        let config = PostgresConfig {
            migrate_url: Some("postgres://m:direct%2Bpw@host/db".into()),
            ..PostgresConfig::new("postgres://u:p%40ss@host/db?password=other")
        };
        let secrets = Secrets::of(&config);
        let text = "p%40ss p@ss other direct%2Bpw direct+pw done";
        assert_eq!(
            secrets.scrub(text),
            "<redacted> <redacted> <redacted> <redacted> <redacted> done"
        );
        assert!(!format!("{secrets:?}").contains("p@ss"));
    }

    #[test]
    fn config_debug_redacts_and_defaults_are_sensible() {
        let config: PostgresConfig = serde_json::from_value(serde_json::json!({
            "url": "postgres://u:hunter2@db.example/relay",
            "migrate_url": "postgres://u:direct-secret@db.example/relay",
        }))
        .unwrap();
        assert_eq!(
            config,
            PostgresConfig {
                migrate_url: Some("postgres://u:direct-secret@db.example/relay".into()),
                ..PostgresConfig::new("postgres://u:hunter2@db.example/relay")
            }
        );
        assert_eq!(config.max_connections, 5);
        assert_eq!(config.acquire_timeout_secs, 5);
        assert_eq!(config.statement_timeout_ms, 5000);
        assert!(!config.prepared_statements);
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(!debug.contains("direct-secret"), "{debug}");
        assert!(
            debug.contains("postgres://u:<redacted>@db.example/relay"),
            "{debug}"
        );
    }

    #[test]
    fn invalid_settings_are_refused_by_name() {
        let url = "postgres://u:hunter2@db.example/relay";
        let cases = [
            (PostgresConfig::new("mysql://u:hunter2@h/db"), "postgres://"),
            (
                PostgresConfig {
                    migrate_url: Some("http://u:hunter2@h".into()),
                    ..PostgresConfig::new(url)
                },
                "migrate_url",
            ),
            (
                PostgresConfig {
                    max_connections: 0,
                    ..PostgresConfig::new(url)
                },
                "max_connections",
            ),
            (
                PostgresConfig {
                    acquire_timeout_secs: 0,
                    ..PostgresConfig::new(url)
                },
                "acquire_timeout_secs",
            ),
            (
                PostgresConfig {
                    statement_timeout_ms: 0,
                    ..PostgresConfig::new(url)
                },
                "statement_timeout_ms",
            ),
        ];
        for (config, expect) in cases {
            let err = config.validate().unwrap_err();
            assert!(err.contains(expect), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn sslmode_is_honoured_and_defaults_to_verify_full_off_this_machine() {
        let mode = |url: &str| {
            let options = connect_options(url, &PostgresConfig::new(url), false).unwrap();
            format!("{:?}", options.get_ssl_mode())
        };
        let cases = [
            ("postgres://u@db.example/relay", "VerifyFull"),
            ("postgres://u@10.0.0.5/relay", "VerifyFull"),
            ("postgres://u@localhost/relay", "Prefer"),
            ("postgres://u@127.0.0.1:5433/relay", "Prefer"),
            ("postgres://u@[::1]:5433/relay", "Prefer"),
            ("postgres://u@db.example/relay?sslmode=disable", "Disable"),
            ("postgres://u@db.example/relay?sslmode=require", "Require"),
            (
                "postgres://u@localhost/relay?sslmode=verify-full",
                "VerifyFull",
            ),
            (
                "postgres://u@localhost/relay?ssl-mode=verify-ca",
                "VerifyCa",
            ),
        ];
        for (url, expect) in cases {
            assert_eq!(mode(url), expect, "{url}");
        }
    }

    #[test]
    fn unknown_url_parameters_are_refused_without_their_value() {
        let check = |url: &str, expect: Option<&str>| {
            let result = connect_options(url, &PostgresConfig::new(url), false);
            match (result, expect) {
                (Ok(_), None) => {}
                (Err(e), Some(expect)) => {
                    let e = e.to_string();
                    assert!(e.contains(expect), "{url}: {e}");
                    assert!(!e.contains("hunter2"), "{url}: {e}");
                }
                // The options' Debug would show a password; print only the outcome.
                (result, _) => panic!(
                    "{url}: expected {expect:?}, got {:?}",
                    result.map(|_| "options")
                ),
            }
        };
        check(
            "postgres://u@h/db?sslmode=require&application_name=relay&options=endpoint%3Dep-x",
            None,
        );
        check("postgres://u@h/db?options[search_path]=syncra", None);
        check("postgres://u@h/db?pasword=hunter2", Some("\"pasword\""));
        check(
            "postgres://u@h/db?statement-cache-capacity=100",
            Some("prepared_statements"),
        );
    }

    #[test]
    fn a_missing_root_certificate_is_named() {
        let config = PostgresConfig {
            ssl_root_cert: Some("/nonexistent/ca.pem".into()),
            ..PostgresConfig::new("postgres://u:hunter2@db.example/relay")
        };
        let err = connect_options(&config.url, &config, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }

    #[tokio::test]
    async fn connect_errors_never_show_the_password() {
        let cases = [
            // Nothing listens there.
            format!(
                "postgres://u:hunter2@127.0.0.1:{}/db?sslmode=disable",
                syncra_test_support::process::free_port()
            ),
            // Not a port.
            "postgres://u:hunter2@127.0.0.1:port/db".to_owned(),
            "postgres://u:hunter2@127.0.0.1/db?sslmode=sometimes".to_owned(),
        ];
        for url in cases {
            let config = PostgresConfig {
                acquire_timeout_secs: 1,
                ..PostgresConfig::new(url.clone())
            };
            let err = PostgresStore::connect(&config).await.unwrap_err();
            let text = format!("{err} {err:?}");
            assert!(matches!(err, StoreError::Unavailable(_)), "{text}");
            assert!(!text.contains("hunter2"), "{url}: {text}");
            assert!(text.contains("u:<redacted>@127.0.0.1"), "{url}: {text}");
        }
    }

    #[tokio::test]
    async fn registers_kind_postgres_with_strict_config() {
        let server = PostgresServer::start();
        let mut kinds = Kinds::new("store", &[]);
        register(&mut kinds).unwrap();
        let store = kinds
            .create(
                serde_json::json!({ "kind": "postgres", "url": server.url() }),
                (),
            )
            .await
            .unwrap();
        assert_eq!(store.kind(), KIND);
        assert_eq!(store.health().await, Health::Up);

        let cases = [
            (
                serde_json::json!({ "kind": "postgres", "url": server.url(), "urll": "x" }),
                "urll",
            ),
            (serde_json::json!({ "kind": "postgres" }), "url"),
            (
                serde_json::json!({ "kind": "postgres", "url": server.url(), "max_connections": 0 }),
                "max_connections",
            ),
        ];
        for (config, expect) in cases {
            let Err(err) = kinds.create(config, ()).await else {
                panic!("config naming {expect} must be refused");
            };
            assert!(matches!(err, PluginError::Config { .. }), "{err}");
            assert!(err.to_string().contains(expect), "{err}");
        }

        let dead = format!(
            "postgres://syncra:hunter2@127.0.0.1:{}/postgres?sslmode=disable",
            syncra_test_support::process::free_port()
        );
        let Err(err) = kinds
            .create(
                serde_json::json!({ "kind": "postgres", "url": dead, "acquire_timeout_secs": 1 }),
                (),
            )
            .await
        else {
            panic!("nothing listens there");
        };
        assert!(matches!(err, PluginError::Start { .. }), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    async fn store_on(server: &PostgresServer, prepared_statements: bool) -> PostgresStore {
        PostgresStore::connect(&PostgresConfig {
            max_connections: 1,
            prepared_statements,
            ..PostgresConfig::new(server.url())
        })
        .await
        .unwrap()
    }

    /// The named prepared statements of the pool's one connection.
    async fn named_statements(store: &PostgresStore) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM pg_prepared_statements")
            .persistent(false)
            .fetch_one(&store.pool)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn no_named_statement_outlives_a_transaction_unless_asked_for() {
        // What a transaction pooler needs: nothing left on the server connection. Then the
        // opt-in: named statements cached per connection.
        let server = PostgresServer::start();
        for (prepared, expect_named) in [(false, false), (true, true)] {
            let store = store_on(&server, prepared).await;
            let (alice_key, _, alice) = test_identity(&unique_name("alice"));
            store.register(&alice).await.unwrap();
            let newer = PrekeySecret::generate(&alice_key, FIXTURE_PREKEY_CREATED_AT + 1);
            store
                .replace_prekey(&alice.user_id, newer.signed())
                .await
                .unwrap();
            store.by_handle(&alice.handle).await.unwrap().unwrap();
            assert!(store.delete(&alice.user_id).await.unwrap());
            let named = named_statements(&store).await;
            assert_eq!(
                named > 0,
                expect_named,
                "prepared_statements = {prepared}: {named}"
            );
            store.close().await;
        }
    }

    #[tokio::test]
    async fn operations_run_under_the_statement_timeout() {
        let server = PostgresServer::start();
        let store = PostgresStore::connect(&PostgresConfig {
            statement_timeout_ms: 1234,
            ..PostgresConfig::new(server.url())
        })
        .await
        .unwrap();
        for begin in [&store.begin_read, &store.begin_write] {
            let mut tx = store.begin(begin, "test").await.unwrap();
            let timeout: String = sqlx::query_scalar("SHOW statement_timeout")
                .persistent(false)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            assert_eq!(timeout, "1234ms");
        }
        // The test server runs with `synchronous_commit = off`; writes turn it on for
        // themselves.
        let mut tx = store.begin(&store.begin_write, "test").await.unwrap();
        let sync: String = sqlx::query_scalar("SHOW synchronous_commit")
            .persistent(false)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(sync, "on");
        // A statement past the limit is cancelled by the server, not waited for.
        let mut tx = store.begin(&store.begin_read, "test").await.unwrap();
        let err = sqlx::raw_sql("SELECT pg_sleep(3)")
            .execute(&mut *tx)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("statement timeout"), "{err}");
    }

    #[tokio::test]
    async fn registration_conflicts_report_the_identity_first() {
        let server = PostgresServer::start();
        let store = store_on(&server, false).await;
        let (_, _, alice) = test_identity(&unique_name("alice"));
        store.register(&alice).await.unwrap();
        // The same record again conflicts on both constraints.
        let err = store.register(&alice).await;
        assert!(
            matches!(err, Err(StoreError::AlreadyRegistered(id)) if id == alice.user_id),
            "{err:?}"
        );
        // Alice's identity under a handle someone else holds: still her identity first.
        let (_, _, bob) = test_identity(&unique_name("bob"));
        store.register(&bob).await.unwrap();
        let again = IdentityRecord {
            handle: bob.handle.clone(),
            ..alice.clone()
        };
        let err = store.insert(&again).await;
        assert!(
            matches!(err, Err(StoreError::AlreadyRegistered(id)) if id == alice.user_id),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn raw_store_prekey_refuses_an_older_prekey() {
        let server = PostgresServer::start();
        let store = store_on(&server, false).await;
        let (alice_key, _, alice) = test_identity(&unique_name("alice"));
        store.register(&alice).await.unwrap();
        let older = PrekeySecret::generate(&alice_key, FIXTURE_PREKEY_CREATED_AT - 1);
        let err = store.store_prekey(&alice.user_id, older.signed()).await;
        assert!(matches!(err, Err(StoreError::StalePrekey)), "{err:?}");
        let same_time = PrekeySecret::generate(&alice_key, FIXTURE_PREKEY_CREATED_AT);
        store
            .store_prekey(&alice.user_id, same_time.signed())
            .await
            .unwrap();
        // Ordering is numeric over the whole u64 range (a bit-cast bigint would put this
        // below every ordinary timestamp).
        let far = PrekeySecret::generate(&alice_key, u64::MAX);
        store
            .store_prekey(&alice.user_id, far.signed())
            .await
            .unwrap();
        let err = store.store_prekey(&alice.user_id, same_time.signed()).await;
        assert!(matches!(err, Err(StoreError::StalePrekey)), "{err:?}");
    }

    #[tokio::test]
    async fn corrupt_rows_are_errors_not_panics() {
        let server = PostgresServer::start();
        let store = store_on(&server, false).await;
        // The schema's CHECKs refuse most damage; a restored or hand-edited database may not
        // have them.
        sqlx::raw_sql(
            "ALTER TABLE users DROP CONSTRAINT users_identity_key_check, \
             DROP CONSTRAINT users_prekey_signature_check",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        let cases = [
            ("UPDATE users SET handle = 'Not A Handle!'", "not allowed"),
            (
                "UPDATE users SET identity_key = decode(repeat('00', 32), 'hex')",
                "identity_key does not belong to user_id",
            ),
            (
                "UPDATE users SET identity_key = substring(identity_key from 2)",
                "identity_key is 31 bytes, expected 32",
            ),
            (
                "UPDATE users SET prekey_signature = '\\x00'::bytea",
                "prekey_signature is 1 bytes, expected 64",
            ),
        ];
        for (sql, expect) in cases {
            let (_, _, alice) = test_identity(&unique_name("alice"));
            store.register(&alice).await.unwrap();
            sqlx::raw_sql(AssertSqlSafe(format!(
                "{sql} WHERE user_id = '\\x{}'",
                alice
                    .user_id
                    .as_bytes()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            )))
            .execute(&store.pool)
            .await
            .unwrap();
            let err = store.by_id(&alice.user_id).await;
            let Err(StoreError::Unavailable(message)) = err else {
                panic!("{sql}: expected Unavailable, got {err:?}");
            };
            assert!(message.contains(expect), "{sql}: {message}");
            assert!(message.contains("corrupt"), "{sql}: {message}");
            assert!(
                message.contains(&alice.user_id.to_string()),
                "{sql}: {message}"
            );
            store.delete(&alice.user_id).await.unwrap();
        }
    }

    #[tokio::test]
    async fn migrations_are_idempotent_concurrent_and_use_migrate_url() {
        let server = PostgresServer::start();
        let config = PostgresConfig::new(server.url());
        let (a, b) = tokio::join!(migrate(&config), migrate(&config));
        a.unwrap();
        b.unwrap();
        migrate(&config).await.unwrap();
        // `url` unreachable, `migrate_url` right: migrating needs only the latter.
        let split = PostgresConfig {
            migrate_url: Some(server.url()),
            acquire_timeout_secs: 1,
            ..PostgresConfig::new(format!(
                "postgres://syncra:hunter2@127.0.0.1:{}/postgres?sslmode=disable",
                syncra_test_support::process::free_port()
            ))
        };
        migrate(&split).await.unwrap();
        // Starting a store needs both, and says which one failed.
        let err = PostgresStore::connect(&split)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("syncra:<redacted>@127.0.0.1"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let store = PostgresStore::connect(&config).await.unwrap();
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
            .persistent(false)
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(
            applied,
            MIGRATOR.migrations.len() as i64,
            "every migration, once"
        );
    }
}

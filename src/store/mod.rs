//! The SQL metadata store: the executors the registry has admitted, kept in SQLite (a
//! file by default) or PostgreSQL (shared by every flotilla server of a cluster) through
//! sea-orm. Only the registry uses it, and only on register and remove: heartbeats
//! never touch SQL.
//!
//! Guarantees:
//! - `Store::connect` returns a store whose schema is current: pending migrations run
//!   under a lock (a PostgreSQL advisory lock, a SQLite write lock), so servers that
//!   start together against one database do not race to create tables.
//! - Every operation is bounded by the pool's acquire timeout and records its latency
//!   and failures in `flotilla_store_*` metrics.
//! - No URL password reaches a log or an error (`redact_url`).
//! - `load_executors` never fails because of one bad row: the row is logged, counted
//!   and skipped, so a corrupt label blob cannot keep the control plane from starting.

mod entity;
mod migration;
mod target;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, EntityTrait,
    FromQueryResult, QueryOrder, QueryTrait, RuntimeErr, Set, SqlErr, SqliteTransactionMode,
    Statement, TransactionOptions, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use tracing::{debug, info, warn};

use self::migration::Migrator;
use self::target::Target;
pub use self::target::{check_url, redact_url};

/// How long a SQLite write waits for another connection's write lock. SQLite admits one
/// writer at a time; concurrent registrations queue here instead of failing.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Operations slower than this are logged: the registry waits on them.
const SLOW_OPERATION: Duration = Duration::from_secs(1);
/// Key of the PostgreSQL advisory lock that serializes migrations across servers
/// ("flotilla" in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x666c_6f74_696c_6c61;
/// Rows per [`Store::insert_executors`] statement: 6 bound values a row, well within
/// SQLite's 32,766 and PostgreSQL's 65,535 parameters per statement.
pub const MAX_INSERT_BATCH: usize = 500;

/// Errors of the SQL store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store URL cannot be used (bad syntax, unsupported scheme); nothing was
    /// contacted. The URL in the message has its password masked.
    #[error("invalid store URL {url_redacted}: {reason}")]
    InvalidUrl {
        url_redacted: String,
        reason: String,
    },
    /// The database could not be reached in time or failed the statement. Retrying
    /// later may succeed; nothing was written by a failed insert or delete.
    #[error("store unavailable ({operation}): {source}")]
    Unavailable {
        operation: &'static str,
        #[source]
        source: DbErr,
    },
    /// An executor with this id is stored already (primary-key conflict).
    #[error("executor {id} is already stored")]
    Duplicate { id: String },
    /// The schema could not be brought up to date; the store is not usable.
    #[error("store migration failed: {0}")]
    Migration(#[source] DbErr),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A stable machine-readable code, for HTTP error bodies and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidUrl { .. } => "invalid_store_url",
            Error::Unavailable { .. } => "store_unavailable",
            Error::Duplicate { .. } => "executor_exists",
            Error::Migration(_) => "store_migration_failed",
        }
    }

    /// Whether this error says something about the database's health (counted in
    /// `store_errors_total`); a duplicate id is the caller's outcome, not a failure.
    fn is_store_failure(&self) -> bool {
        !matches!(self, Error::Duplicate { .. })
    }
}

/// Connection pool settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Time `Store::connect` allows for reaching the database (the first connection,
    /// TCP and authentication included; migrations are not counted).
    pub connect_timeout: Duration,
    /// Time an operation waits for a pooled connection, including opening one; this
    /// bounds how long an operation can take when the database is down.
    pub acquire_timeout: Duration,
    /// Pool size. Ignored (1) for an in-memory SQLite database, which lives in its
    /// only connection.
    pub max_connections: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            connect_timeout: Duration::from_secs(5),
            acquire_timeout: Duration::from_secs(5),
            max_connections: 8,
        }
    }
}

/// One executor as persisted: what a control plane needs to re-admit it after a
/// restart or failover (liveness is not persisted; loaded executors get a grace TTL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredExecutor {
    pub id: String,
    pub name: String,
    pub address: String,
    /// Stored as a JSON object in a text column.
    pub labels: BTreeMap<String, String>,
    /// Hex of SHA-256 of the executor's token; the token itself is never stored.
    pub token_hash: String,
    /// Registration time, unix milliseconds.
    pub registered_at_ms: i64,
}

/// A connection pool to the metadata store. Cloning is cheap and shares the pool.
#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
    backend: &'static str,
    url_redacted: Arc<str>,
}

impl fmt::Debug for Store {
    // By hand: the pool's own Debug is not promised to keep the password out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .field("url", &self.url_redacted)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Connects to `url` (`sqlite://data/meta.db?mode=rwc`, `sqlite::memory:`,
    /// `postgres://user:pass@host/db`), then runs pending migrations.
    ///
    /// For a SQLite file, the file's directory is created if missing and the database
    /// is switched to WAL (readers do not block the writer).
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Store> {
        let url_redacted = redact_url(url);
        let target = Target::parse(url).map_err(|reason| Error::InvalidUrl {
            url_redacted: url_redacted.clone(),
            reason,
        })?;
        let db = observe("connect", open(url, &target, options)).await?;
        if let Target::SqliteFile(path) = &target {
            warn_unless_wal(&db, path).await;
        }
        observe("migrate", migrate(&db)).await?;
        let backend = target.backend();
        debug!(store = %url_redacted, backend, "metadata store connected");
        Ok(Store {
            db,
            backend,
            url_redacted: url_redacted.into(),
        })
    }

    /// Persists a newly registered executor.
    pub async fn insert_executor(&self, executor: &StoredExecutor) -> Result<()> {
        self.insert_executors(std::slice::from_ref(executor)).await
    }

    /// Persists newly registered executors in one statement: all or none. A burst of
    /// registrations is written a batch at a time instead of a row per statement, each
    /// waiting for the pool (SQLite admits one writer; an in-memory database has one
    /// connection). At most [`MAX_INSERT_BATCH`] rows. On a primary-key conflict the
    /// error names the first row's id when there is one row, any row's otherwise.
    pub async fn insert_executors(&self, executors: &[StoredExecutor]) -> Result<()> {
        const OPERATION: &str = "insert_executor";
        assert!(
            executors.len() <= MAX_INSERT_BATCH,
            "insert_executors takes at most {MAX_INSERT_BATCH} rows"
        );
        let Some(first) = executors.first() else {
            return Ok(());
        };
        observe(OPERATION, async {
            let rows = executors.iter().map(|executor| entity::ActiveModel {
                id: Set(executor.id.clone()),
                name: Set(executor.name.clone()),
                address: Set(executor.address.clone()),
                labels: Set(labels_to_json(&executor.labels)),
                token_hash: Set(executor.token_hash.clone()),
                registered_at_ms: Set(executor.registered_at_ms),
            });
            // Without RETURNING: we have the rows already, and it keeps the statement
            // the same on every backend.
            match entity::Entity::insert_many(rows)
                .exec_without_returning(&self.db)
                .await
            {
                Ok(_) => Ok(()),
                Err(source) => match source.sql_err() {
                    Some(SqlErr::UniqueConstraintViolation(_)) => Err(Error::Duplicate {
                        id: first.id.clone(),
                    }),
                    _ => Err(Error::Unavailable {
                        operation: OPERATION,
                        source,
                    }),
                },
            }
        })
        .await
    }

    /// Deletes an executor; `true` if it was stored.
    pub async fn delete_executor(&self, id: &str) -> Result<bool> {
        const OPERATION: &str = "delete_executor";
        observe(OPERATION, async {
            let result = entity::Entity::delete_by_id(id.to_owned())
                .exec(&self.db)
                .await
                .map_err(unavailable(OPERATION))?;
            Ok(result.rows_affected > 0)
        })
        .await
    }

    /// Every stored executor, oldest registration first. A row that cannot be decoded
    /// (corrupt labels, a column of the wrong type) is logged, counted in
    /// `store_skipped_rows_total` and left out: one bad row must not keep the
    /// registry from loading the others.
    pub async fn load_executors(&self) -> Result<Vec<StoredExecutor>> {
        const OPERATION: &str = "load_executors";
        observe(OPERATION, async {
            // Raw rows, decoded one by one: `all()` would fail the whole load on the
            // first row whose columns do not decode.
            let query = entity::Entity::find()
                .order_by_asc(entity::Column::RegisteredAtMs)
                .order_by_asc(entity::Column::Id)
                .build(self.db.get_database_backend());
            let rows = self
                .db
                .query_all_raw(query)
                .await
                .map_err(unavailable(OPERATION))?;
            let mut executors = Vec::with_capacity(rows.len());
            for row in rows {
                match decode_row(&row) {
                    Ok(executor) => executors.push(executor),
                    Err(reason) => {
                        let id: Option<String> = row.try_get("", "id").ok();
                        warn!(
                            executor = id.as_deref().unwrap_or("<unreadable id>"),
                            %reason,
                            "skipping a stored executor that cannot be decoded"
                        );
                        crate::metrics::store().skipped_rows_total.inc();
                    }
                }
            }
            Ok(executors)
        })
        .await
    }

    /// A round trip to the database (for readiness and status).
    pub async fn ping(&self) -> Result<()> {
        const OPERATION: &str = "ping";
        observe(OPERATION, async {
            self.db.ping().await.map_err(unavailable(OPERATION))
        })
        .await
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Closes the pool (shared by every clone): waits for connections in use to be
    /// returned, then closes them all. Later operations on any clone fail.
    pub async fn close(&self) -> Result<()> {
        const OPERATION: &str = "close";
        observe(OPERATION, async {
            self.db.close_by_ref().await.map_err(unavailable(OPERATION))
        })
        .await
    }
}

/// Opens the pool. Does not migrate.
async fn open(url: &str, target: &Target, options: &StoreOptions) -> Result<DatabaseConnection> {
    const OPERATION: &str = "connect";
    let mut connect = ConnectOptions::new(url);
    connect
        .max_connections(options.max_connections.max(1))
        .acquire_timeout(options.acquire_timeout)
        // sqlx logs every statement at INFO otherwise; `observe` times operations.
        .sqlx_logging(false);
    match target {
        Target::SqliteFile(path) => {
            create_parent_dir(path).await?;
            connect.map_sqlx_sqlite_opts(|sqlite| {
                sqlite
                    .journal_mode(SqliteJournalMode::Wal)
                    .busy_timeout(SQLITE_BUSY_TIMEOUT)
                    // NORMAL is durable against a crash of the process in WAL mode;
                    // a power loss may lose the last registrations, which re-register.
                    .synchronous(SqliteSynchronous::Normal)
            });
        }
        Target::SqliteMemory => {
            // The database lives exactly as long as its connection: one connection,
            // never recycled.
            connect
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
        }
        Target::Postgres => {
            connect.set_application_name("flotilla");
        }
    }
    // sea-orm hands `connect_timeout` to sqlx as the acquire timeout (the later
    // setting wins), so the first connection is bounded here instead.
    let deadline = tokio::time::Instant::now() + options.connect_timeout;
    loop {
        match tokio::time::timeout_at(deadline, Database::connect(connect.clone())).await {
            // Servers opening one new SQLite file together: switching it to WAL
            // takes an exclusive lock that SQLite's busy handler does not wait for
            // (SQLITE_BUSY at once, seen under load). That one is retried, within
            // the connect timeout.
            Ok(Err(error))
                if matches!(target, Target::SqliteFile(_))
                    && is_sqlite_busy(&error)
                    && tokio::time::Instant::now() + SQLITE_BUSY_RETRY < deadline =>
            {
                debug!(%error, "SQLite file busy while opening; trying again");
                tokio::time::sleep(SQLITE_BUSY_RETRY).await;
            }
            Ok(connected) => return connected.map_err(unavailable(OPERATION)),
            Err(_) => {
                return Err(Error::Unavailable {
                    operation: OPERATION,
                    source: DbErr::Conn(RuntimeErr::Internal(format!(
                        "no connection within the connect timeout ({:?})",
                        options.connect_timeout
                    ))),
                })
            }
        }
    }
}

/// The wait before opening a busy SQLite file again.
const SQLITE_BUSY_RETRY: Duration = Duration::from_millis(50);

/// SQLITE_BUSY or SQLITE_LOCKED (primary codes 5 and 6, under any extended code).
fn is_sqlite_busy(error: &DbErr) -> bool {
    let (DbErr::Conn(RuntimeErr::SqlxError(e))
    | DbErr::Exec(RuntimeErr::SqlxError(e))
    | DbErr::Query(RuntimeErr::SqlxError(e))) = error
    else {
        return false;
    };
    let sea_orm::sqlx::Error::Database(database) = &**e else {
        return false;
    };
    database
        .code()
        .and_then(|code| code.parse::<i32>().ok())
        .is_some_and(|code| matches!(code & 0xff, 5 | 6))
}

async fn create_parent_dir(file: &Path) -> Result<()> {
    let Some(dir) = file.parent().filter(|dir| !dir.as_os_str().is_empty()) else {
        return Ok(());
    };
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| Error::Unavailable {
            operation: "connect",
            source: DbErr::Conn(RuntimeErr::Internal(format!(
                "cannot create the directory {} for the SQLite database: {e}",
                dir.display()
            ))),
        })
}

/// WAL can silently stay off (a filesystem without shared memory, a read-only file);
/// the store still works, only slower under concurrent readers, so this only warns.
async fn warn_unless_wal(db: &DatabaseConnection, path: &Path) {
    let query = Statement::from_string(DbBackend::Sqlite, "PRAGMA journal_mode");
    let mode = match db.query_one_raw(query).await {
        Ok(Some(row)) => row.try_get_by_index::<String>(0).ok(),
        _ => None,
    };
    if !mode
        .as_deref()
        .is_some_and(|m| m.eq_ignore_ascii_case("wal"))
    {
        warn!(
            file = %path.display(),
            journal_mode = mode.as_deref().unwrap_or("<unknown>"),
            "SQLite store is not in WAL mode"
        );
    }
}

/// Runs pending migrations inside one transaction that first takes a database-wide
/// lock, so concurrent servers migrate one after the other and the later ones find
/// nothing to do. Both backends have transactional DDL, so a failed migration leaves
/// the schema as it was.
async fn migrate(db: &DatabaseConnection) -> Result<()> {
    let txn = match db.get_database_backend() {
        DbBackend::Sqlite => {
            // IMMEDIATE takes the write lock at BEGIN (waiting up to the busy timeout).
            db.begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..TransactionOptions::default()
            })
            .await
            .map_err(Error::Migration)?
        }
        _ => {
            let txn = db.begin().await.map_err(Error::Migration)?;
            txn.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_advisory_xact_lock($1)",
                [MIGRATION_LOCK_KEY.into()],
            ))
            .await
            .map_err(Error::Migration)?;
            txn
        }
    };
    let pending: Vec<String> = Migrator::get_pending_migrations(&txn)
        .await
        .map_err(Error::Migration)?
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    Migrator::up(&txn, None).await.map_err(Error::Migration)?;
    txn.commit().await.map_err(Error::Migration)?;
    if !pending.is_empty() {
        info!(migrations = ?pending, "store schema migrated");
    }
    Ok(())
}

/// Times `work` into `store_operation_duration_seconds{operation}` and counts its
/// failure in `store_errors_total{operation}`.
async fn observe<T>(operation: &'static str, work: impl Future<Output = Result<T>>) -> Result<T> {
    let started = Instant::now();
    let result = work.await;
    let elapsed = started.elapsed();
    let metrics = crate::metrics::store();
    metrics
        .operation_duration_seconds
        .with_label_values(&[operation])
        .observe(elapsed.as_secs_f64());
    if let Err(e) = &result {
        if e.is_store_failure() {
            metrics.errors_total.with_label_values(&[operation]).inc();
        }
    }
    if elapsed >= SLOW_OPERATION {
        warn!(
            operation,
            elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            ok = result.is_ok(),
            "slow store operation"
        );
    }
    result
}

fn unavailable(operation: &'static str) -> impl FnOnce(DbErr) -> Error {
    move |source| Error::Unavailable { operation, source }
}

fn labels_to_json(labels: &BTreeMap<String, String>) -> String {
    serde_json::to_string(labels).expect("a map of strings always serializes")
}

fn labels_from_json(json: &str) -> Result<BTreeMap<String, String>, serde_json::Error> {
    serde_json::from_str(json)
}

/// One `executors` row as a `StoredExecutor`, or why it is unreadable.
fn decode_row(row: &sea_orm::QueryResult) -> Result<StoredExecutor, String> {
    let model = entity::Model::from_query_result(row, "").map_err(|e| e.to_string())?;
    let labels = labels_from_json(&model.labels).map_err(|e| format!("labels: {e}"))?;
    Ok(StoredExecutor {
        id: model.id,
        name: model.name,
        address: model.address,
        labels,
        token_hash: model.token_hash,
        registered_at_ms: model.registered_at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn executor(id: &str) -> StoredExecutor {
        StoredExecutor {
            id: id.to_owned(),
            name: "worker".to_owned(),
            address: "127.0.0.1:9000".to_owned(),
            labels: BTreeMap::from([
                ("zone".to_owned(), "eu-1".to_owned()),
                ("disk".to_owned(), "ssd".to_owned()),
            ]),
            token_hash: "ab".repeat(32),
            registered_at_ms: 1_763_700_000_000,
        }
    }

    #[test]
    fn labels_round_trip_through_json() {
        let labels = executor("a").labels;
        let json = labels_to_json(&labels);
        assert_eq!(json, r#"{"disk":"ssd","zone":"eu-1"}"#);
        assert_eq!(labels_from_json(&json).unwrap(), labels);
        assert_eq!(labels_to_json(&BTreeMap::new()), "{}");
    }

    #[test]
    fn labels_reject_anything_but_an_object_of_strings() {
        for bad in ["", "{", "[]", r#"{"a":1}"#, "null", r#"{"a":null}"#] {
            assert!(labels_from_json(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn errors_have_stable_codes_and_duplicates_are_not_failures() {
        let duplicate = Error::Duplicate { id: "x".into() };
        assert_eq!(duplicate.code(), "executor_exists");
        assert!(!duplicate.is_store_failure());
        let unavailable = Error::Unavailable {
            operation: "ping",
            source: DbErr::Custom("down".into()),
        };
        assert_eq!(unavailable.code(), "store_unavailable");
        assert!(unavailable.is_store_failure());
    }

    #[test]
    fn invalid_url_error_never_shows_the_password() {
        let err = Error::InvalidUrl {
            url_redacted: redact_url("mysql://u:hunter2@h/db"),
            reason: Target::parse("mysql://u:hunter2@h/db").unwrap_err(),
        };
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[tokio::test]
    async fn in_memory_store_keeps_rows_across_operations() {
        // One connection for an in-memory database: with a pool of several, each
        // connection would see its own empty database.
        let store = Store::connect("sqlite::memory:", &StoreOptions::default())
            .await
            .unwrap();
        assert_eq!(store.backend(), "sqlite");
        store.insert_executor(&executor("a")).await.unwrap();
        store.insert_executor(&executor("b")).await.unwrap();
        let loaded = store.load_executors().await.unwrap();
        assert_eq!(loaded, vec![executor("a"), executor("b")]);
        assert!(store.delete_executor("a").await.unwrap());
        assert_eq!(store.load_executors().await.unwrap(), vec![executor("b")]);
    }

    #[tokio::test]
    async fn connect_rejects_an_unsupported_url_before_contacting_anything() {
        let err = Store::connect("mysql://u:hunter2@db/meta", &StoreOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidUrl { .. }), "{err:?}");
        assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");
    }
}

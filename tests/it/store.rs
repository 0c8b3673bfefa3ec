//! The SQL metadata store against both backends: a SQLite file in a temp dir and a
//! real PostgreSQL server (`harness::postgres`). The shared suite runs once per backend
//! (`sqlite::*`, `postgres::*`); backend-specific behaviour (WAL, the data directory,
//! unreachable servers) follows it.

use crate::harness;
use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::postgres::PostgresServer;
use flotilla::store::{Error, Store, StoreOptions, StoredExecutor};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};
use tempfile::TempDir;

const FIRST_MIGRATION: &str = "m20261121_000001_create_executors";

/// A database of its own for one test, and whatever keeps it alive.
struct TestDb {
    url: String,
    _sqlite_dir: Option<TempDir>,
    _postgres: Option<Arc<PostgresServer>>,
}

impl TestDb {
    /// A SQLite file (not yet created) in a fresh temp dir.
    fn sqlite() -> TestDb {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-store-")
            .tempdir()
            .expect("temp dir");
        TestDb {
            url: format!("sqlite://{}/meta.db?mode=rwc", dir.path().display()),
            _sqlite_dir: Some(dir),
            _postgres: None,
        }
    }

    /// A fresh database on the shared PostgreSQL server.
    async fn postgres(name: &str) -> TestDb {
        let server = PostgresServer::shared();
        TestDb {
            url: server.fresh_database(name).await,
            _sqlite_dir: None,
            _postgres: Some(server),
        }
    }

    async fn store(&self) -> Store {
        Store::connect(&self.url, &StoreOptions::default())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url))
    }

    /// A plain sea-orm connection beside the store, for what the store API does not
    /// offer (writing a corrupt row, reading pragmas and the migration table).
    async fn raw(&self) -> DatabaseConnection {
        let mut options = ConnectOptions::new(self.url.clone());
        options.max_connections(1).sqlx_logging(false);
        Database::connect(options)
            .await
            .unwrap_or_else(|e| panic!("raw connection to {}: {e}", self.url))
    }

    async fn applied_migrations(&self) -> Vec<String> {
        let raw = self.raw().await;
        let rows = raw
            .query_all_raw(sea_orm::Statement::from_string(
                raw.get_database_backend(),
                "SELECT version FROM seaql_migrations ORDER BY version",
            ))
            .await
            .expect("read seaql_migrations");
        rows.iter()
            .map(|row| row.try_get_by_index::<String>(0).expect("version column"))
            .collect()
    }
}

fn executor(id: &str, registered_at_ms: i64) -> StoredExecutor {
    StoredExecutor {
        id: id.to_owned(),
        name: id.split('-').next().unwrap_or(id).to_owned(),
        address: format!("10.0.0.{}:8400", registered_at_ms % 250),
        labels: BTreeMap::from([
            ("zone".to_owned(), "eu-west-1a".to_owned()),
            ("tier".to_owned(), "gold".to_owned()),
        ]),
        token_hash: format!("{:064x}", registered_at_ms),
        registered_at_ms,
    }
}

/// Runs each listed case as `sqlite::<case>` and `postgres::<case>`.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::harness::init_tracing();
                    super::$case(super::TestDb::sqlite()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::harness::init_tracing();
                    super::$case(super::TestDb::postgres(stringify!($case)).await).await;
                }
            )*
        }
    };
}

on_both_backends!(
    inserted_executors_load_back_with_their_labels,
    inserting_a_stored_id_again_is_a_duplicate,
    a_batch_insert_is_all_or_nothing,
    delete_reports_whether_a_row_was_deleted,
    connecting_again_applies_no_migration_twice,
    servers_starting_together_migrate_once,
    load_skips_rows_that_cannot_be_decoded,
    concurrent_inserts_all_land,
    operations_after_close_are_unavailable_and_counted,
);

async fn inserted_executors_load_back_with_their_labels(db: TestDb) {
    let store = db.store().await;
    store.ping().await.expect("ping");
    assert_eq!(store.load_executors().await.unwrap(), vec![]);

    let mut unlabelled = executor("bare-00000003", 1_700_000_000_300);
    unlabelled.labels.clear();
    let mut odd = executor("odd-00000002", 1_700_000_000_200);
    odd.labels
        .insert("quote\"and\\slash".to_owned(), "ünïcode ✓".to_owned());
    let plain = executor("plain-00000001", 1_700_000_000_100);
    for e in [&unlabelled, &odd, &plain] {
        store.insert_executor(e).await.expect("insert");
    }

    // Oldest registration first, every field as written.
    assert_eq!(
        store.load_executors().await.unwrap(),
        vec![plain, odd, unlabelled]
    );
    let metrics = flotilla::metrics::render();
    assert!(
        metrics.contains(
            r#"flotilla_store_operation_duration_seconds_count{operation="insert_executor"}"#
        ),
        "no insert latency in:\n{metrics}"
    );
}

async fn inserting_a_stored_id_again_is_a_duplicate(db: TestDb) {
    let store = db.store().await;
    let original = executor("dup-0000000a", 1_700_000_000_000);
    store.insert_executor(&original).await.unwrap();

    let mut impostor = executor("dup-0000000a", 1_700_000_009_999);
    impostor.address = "10.9.9.9:1".to_owned();
    match store.insert_executor(&impostor).await {
        Err(Error::Duplicate { id }) => assert_eq!(id, "dup-0000000a"),
        other => panic!("expected Duplicate, got {other:?}"),
    }
    assert_eq!(store.load_executors().await.unwrap(), vec![original]);
}

async fn a_batch_insert_is_all_or_nothing(db: TestDb) {
    let store = db.store().await;
    let batch: Vec<StoredExecutor> = (0..flotilla::store::MAX_INSERT_BATCH as i64)
        .map(|i| executor(&format!("batch-{i:08x}"), 1_700_000_000_000 + i))
        .collect();
    store.insert_executors(&batch).await.unwrap();
    assert_eq!(store.load_executors().await.unwrap(), batch);

    // One stored id among new ones: the statement fails whole, nothing new lands.
    let clash = vec![
        executor("fresh-00000001", 1_800_000_000_000),
        batch[7].clone(),
        executor("fresh-00000002", 1_800_000_000_001),
    ];
    match store.insert_executors(&clash).await {
        Err(Error::Duplicate { .. }) => {}
        other => panic!("expected Duplicate, got {other:?}"),
    }
    assert_eq!(store.load_executors().await.unwrap(), batch);
    store.insert_executors(&[]).await.unwrap();
}

async fn delete_reports_whether_a_row_was_deleted(db: TestDb) {
    let store = db.store().await;
    assert!(!store.delete_executor("ghost-00000000").await.unwrap());

    let keep = executor("keep-00000001", 1);
    store.insert_executor(&keep).await.unwrap();
    store
        .insert_executor(&executor("gone-00000002", 2))
        .await
        .unwrap();
    assert!(store.delete_executor("gone-00000002").await.unwrap());
    assert!(!store.delete_executor("gone-00000002").await.unwrap());
    assert_eq!(store.load_executors().await.unwrap(), vec![keep]);
}

async fn connecting_again_applies_no_migration_twice(db: TestDb) {
    let first = db.store().await;
    let e = executor("stay-00000001", 7);
    first.insert_executor(&e).await.unwrap();
    first.close().await.unwrap();
    drop(first);

    let second = db.store().await;
    assert_eq!(second.load_executors().await.unwrap(), vec![e]);
    assert_eq!(db.applied_migrations().await, vec![FIRST_MIGRATION]);
}

async fn servers_starting_together_migrate_once(db: TestDb) {
    // Several servers of one cluster start against one new database at once.
    let url = Arc::new(db.url.clone());
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = Arc::clone(&url);
            tokio::spawn(async move { Store::connect(&url, &StoreOptions::default()).await })
        })
        .collect();
    let mut stores = Vec::new();
    for start in starts {
        stores.push(start.await.unwrap().expect("concurrent connect"));
    }
    assert_eq!(db.applied_migrations().await, vec![FIRST_MIGRATION]);
    stores[0]
        .insert_executor(&executor("one-00000001", 1))
        .await
        .unwrap();
    assert_eq!(stores[3].load_executors().await.unwrap().len(), 1);
}

async fn load_skips_rows_that_cannot_be_decoded(db: TestDb) {
    let store = db.store().await;
    let good = executor("good-00000001", 1);
    store.insert_executor(&good).await.unwrap();
    let raw = db.raw().await;
    raw.execute_unprepared(
        "INSERT INTO executors (id, name, address, labels, token_hash, registered_at_ms) \
         VALUES ('bad-00000002', 'bad', '10.0.0.2:1', 'not json', 'ff', 2), \
                ('bad-00000003', 'bad', '10.0.0.3:1', '{\"zone\": 3}', 'ff', 3)",
    )
    .await
    .expect("write corrupt rows");

    let skipped_before = flotilla::metrics::store().skipped_rows_total.get();
    assert_eq!(store.load_executors().await.unwrap(), vec![good]);
    // Other tests may skip rows at the same time; these two are ours at least.
    assert!(flotilla::metrics::store().skipped_rows_total.get() - skipped_before >= 2);
}

async fn concurrent_inserts_all_land(db: TestDb) {
    let store = db.store().await;
    let started = Instant::now();
    let inserts: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let e = executor(&format!("w{i}-{i:08x}"), 1_700_000_000_000 + i);
                store.insert_executor(&e).await
            })
        })
        .collect();
    for insert in inserts {
        insert.await.unwrap().expect("concurrent insert");
    }
    let elapsed = started.elapsed();

    let loaded = store.load_executors().await.unwrap();
    let ids: BTreeSet<String> = loaded.into_iter().map(|e| e.id).collect();
    let expected: BTreeSet<String> = (0..200).map(|i| format!("w{i}-{i:08x}")).collect();
    assert_eq!(ids, expected);
    tracing::info!(
        backend = store.backend(),
        ?elapsed,
        "200 concurrent inserts"
    );
}

async fn operations_after_close_are_unavailable_and_counted(db: TestDb) {
    let store = db.store().await;
    let errors = || {
        flotilla::metrics::store()
            .errors_total
            .with_label_values(&["ping"])
            .get()
    };
    let before = errors();
    store.close().await.unwrap();
    match store.ping().await {
        Err(e @ Error::Unavailable { .. }) => assert_eq!(e.code(), "store_unavailable"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(errors() > before);
}

// ---- SQLite only ----

#[tokio::test]
async fn sqlite_store_is_in_wal_mode() {
    let db = TestDb::sqlite();
    let store = db.store().await;
    assert_eq!(store.backend(), "sqlite");
    let raw = db.raw().await;
    let row = raw
        .query_one_raw(sea_orm::Statement::from_string(
            raw.get_database_backend(),
            "PRAGMA journal_mode",
        ))
        .await
        .unwrap()
        .expect("a journal_mode row");
    assert_eq!(row.try_get_by_index::<String>(0).unwrap(), "wal");
}

#[tokio::test]
async fn sqlite_store_creates_its_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data/nested/meta.db");
    let url = format!("sqlite://{}?mode=rwc", file.display());
    let store = Store::connect(&url, &StoreOptions::default())
        .await
        .expect("connect creates the directory");
    store
        .insert_executor(&executor("a-00000001", 1))
        .await
        .unwrap();
    assert!(file.is_file(), "{} was not created", file.display());
}

#[tokio::test]
async fn sqlite_file_below_a_regular_file_is_unavailable() {
    // Root may write anywhere; nobody can make a directory inside a regular file.
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let url = format!("sqlite://{}/meta.db?mode=rwc", blocker.display());

    let started = Instant::now();
    let err = Store::connect(&url, &StoreOptions::default())
        .await
        .expect_err("no database below a file");
    assert!(
        matches!(
            err,
            Error::Unavailable {
                operation: "connect",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn sqlite_missing_file_without_create_mode_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/absent.db", dir.path().display());
    let err = Store::connect(&url, &StoreOptions::default())
        .await
        .expect_err("mode=rw does not create the file");
    assert!(
        matches!(
            err,
            Error::Unavailable {
                operation: "connect",
                ..
            }
        ),
        "{err:?}"
    );
}

// ---- PostgreSQL only ----

#[tokio::test]
async fn postgres_on_a_closed_port_is_unavailable_quickly() {
    harness::init_tracing();
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("postgres://flotilla:hunter2@127.0.0.1:{port}/meta");
    let options = StoreOptions {
        connect_timeout: Duration::from_millis(500),
        acquire_timeout: Duration::from_millis(500),
        ..StoreOptions::default()
    };

    let started = Instant::now();
    let err = Store::connect(&url, &options)
        .await
        .expect_err("nothing listens there");
    let elapsed = started.elapsed();
    assert!(
        matches!(
            err,
            Error::Unavailable {
                operation: "connect",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("hunter2"), "password leaked: {shown}");
}

#[tokio::test]
async fn postgres_store_reports_its_backend() {
    let db = TestDb::postgres("backend").await;
    let store = db.store().await;
    assert_eq!(store.backend(), "postgres");
    assert!(!format!("{store:?}").contains("hunter2"));
}

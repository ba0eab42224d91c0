//! The PostgreSQL dialect: the same suite as SQLite, each test in its own freshly created schema (selected
//! with `search_path` in the store URL) so concurrent tests and runs never see each other's rows.
//!
//! Server: `KMSGATE_TEST_PG_URL`, or `postgres://postgres@127.0.0.1:5432/test`. A server that cannot be
//! reached fails the tests: `scripts/test` installs and starts PostgreSQL when it is missing.

// Tests report failures by panicking; `expect` names what failed.
#![allow(clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kmsgate_core::{ErrorKind, Store};
use kmsgate_store::testsuite::{self, Fixture, key_id, sample_key, tenant};
use kmsgate_store::{Dialect, SqlStore, StoreOptions};
use sqlx::{AnyPool, AssertSqlSafe};

const URL_ENV: &str = "KMSGATE_TEST_PG_URL";
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The server URL; panics (fails the test) when it cannot be reached.
async fn server_url() -> String {
    let url = std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.to_owned());
    sqlx::any::install_default_drivers();
    match tokio::time::timeout(Duration::from_secs(5), AnyPool::connect(&url)).await {
        Ok(Ok(pool)) => {
            pool.close().await;
            url
        }
        Ok(Err(e)) => panic!("PostgreSQL at {URL_ENV} or {DEFAULT_URL} cannot be reached ({e}); run scripts/test"),
        Err(_) => panic!("PostgreSQL at {URL_ENV} or {DEFAULT_URL} did not answer; run scripts/test"),
    }
}

/// Drops the test's schema (and everything in it) when the fixture goes away.
struct Schema {
    server: String,
    name: String,
}

impl Drop for Schema {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on: use a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let pool = AnyPool::connect(&server).await.expect("connect to drop the schema");
                sqlx::query(AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {name} CASCADE")))
                    .execute(&pool)
                    .await
                    .expect("drop schema");
                pool.close().await;
            });
        })
        .join();
        if dropped.is_err() && !std::thread::panicking() {
            panic!("the test schema {} could not be dropped", self.name);
        }
    }
}

/// A unique schema name: the process, the time and a counter (parallel tests, repeated runs).
fn schema_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("kmsgate_test_{}_{}_{}", std::process::id(), nanos, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Creates a fresh schema; returns its guard and the store URL that selects it.
async fn fresh_schema(server: &str) -> (Schema, String) {
    let name = schema_name();
    let pool = AnyPool::connect(server).await.expect("connect");
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {name}"))).execute(&pool).await.expect("create schema");
    pool.close().await;
    let sep = if server.contains('?') { '&' } else { '?' };
    let url = format!("{server}{sep}options=-c%20search_path%3D{name}");
    (Schema { server: server.to_owned(), name }, url)
}

/// Small pools: the whole suite runs in parallel against one server with a connection limit.
fn options() -> StoreOptions {
    StoreOptions::default().max_connections(4)
}

async fn pg_fixture() -> Fixture {
    let server = server_url().await;
    let (schema, url) = fresh_schema(&server).await;
    let store = SqlStore::open_with(&url, options()).await.expect("open the postgres store");
    Fixture::with_guard(store, schema)
}

mod suite {
    kmsgate_store::store_testsuite!(super::pg_fixture());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_database() {
    let server = server_url().await;
    let (_schema, url) = fresh_schema(&server).await;
    let a = SqlStore::open_with(&url, options()).await.expect("open a");
    let b = SqlStore::open_with(&url, options()).await.expect("open b");
    assert_eq!(a.dialect(), Dialect::Postgres);
    testsuite::concurrent_handles(&a, &b).await;
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_one_chain_from_two_replicas() {
    let server = server_url().await;
    let (_schema, url) = fresh_schema(&server).await;
    let a = SqlStore::open_with(&url, options()).await.expect("open a");
    let b = SqlStore::open_with(&url, options()).await.expect("open b");
    testsuite::audit_log_one_chain_from_two_handles(&a, &b).await;
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_migrate_once() {
    let server = server_url().await;
    let (_schema, url) = fresh_schema(&server).await;
    let (a, b, c) = tokio::join!(
        SqlStore::open_with(&url, options()),
        SqlStore::open_with(&url, options()),
        SqlStore::open_with(&url, options())
    );
    let (a, b, c) = (a.expect("open a"), b.expect("open b"), c.expect("open c"));
    a.create_key(&sample_key("acme", "k"), &[]).await.expect("create");
    for s in [&b, &c] {
        assert!(s.get_key(&tenant("acme"), &key_id("k")).await.expect("get").is_some());
    }
    let pool = AnyPool::connect(&url).await.expect("connect");
    let (steps, latest): (i64, i64) = sqlx::query_as("SELECT COUNT(*), MAX(version) FROM schema_migrations")
        .fetch_one(&pool)
        .await
        .expect("count steps");
    // Versions are 1, 2, ... with no gaps: as many rows as the latest version means each step once.
    assert!(latest >= 2, "every step is applied: {latest}");
    assert_eq!(steps, latest, "each step is recorded once");
    pool.close().await;
    for s in [a, b, c] {
        s.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_reconnecting() {
    let server = server_url().await;
    let (_schema, url) = fresh_schema(&server).await;
    let store = SqlStore::open_with(&url, options()).await.expect("open");
    let created = store.create_key(&sample_key("acme", "k"), &[]).await.expect("create");
    store.close().await;
    let store = SqlStore::open_with(&url, options()).await.expect("reopen");
    assert_eq!(store.get_key(&tenant("acme"), &key_id("k")).await.expect("get"), Some(created));
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pruned_change_feed_continues_after_reconnecting() {
    let server = server_url().await;
    let (_schema, url) = fresh_schema(&server).await;
    let store = SqlStore::open_with(&url, options()).await.expect("open");
    let last = testsuite::prune_before_reopen(&store).await;
    store.close().await;
    let store = SqlStore::open_with(&url, options()).await.expect("reopen");
    testsuite::changes_continue_after_reopen(&store, last).await;
    store.close().await;
}

#[tokio::test]
async fn an_unreachable_server_is_a_storage_error_without_the_password() {
    let opts = StoreOptions::default().acquire_timeout(Duration::from_millis(500));
    // Port 1 on loopback: nothing listens there.
    let err = SqlStore::open_with("postgres://kms:hunter2@127.0.0.1:1/kms", opts).await.expect_err("no server");
    assert!(matches!(err.kind(), ErrorKind::StorageFailure | ErrorKind::DependencyTimeout), "{err:?}");
    assert!(!err.message().contains("hunter2"));
}

/// `store migrate` from the embedded SQLite default into PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_sqlite_into_postgres() {
    let server = server_url().await;
    let (_schema, url) = fresh_schema(&server).await;
    let src = SqlStore::open("sqlite::memory:").await.expect("open sqlite");
    testsuite::populate_for_copy(&src).await;
    testsuite::populate_audit_log(&src).await;
    let dst = SqlStore::open_with(&url, options()).await.expect("open postgres");
    src.copy_into(&dst).await.expect("copy");
    testsuite::check_copied(&src, &dst).await;
    testsuite::check_audit_log_copied(&src, &dst).await;
}

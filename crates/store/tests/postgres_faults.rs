//! The PostgreSQL store when the database misbehaves: a statement stuck behind a lock ends with the
//! dependency-timeout kind at the statement timeout; a crashed server fails calls promptly, and once it is back
//! the same store (pool) works again with every acknowledged write in place. Runs on a private cluster (see
//! `kmsgate_store::pgcluster`), never on the shared server.

// Tests report failures by panicking; `expect` names what failed.
#![allow(clippy::expect_used)]

use std::time::{Duration, Instant};

use kmsgate_core::{ErrorKind, Store};
use kmsgate_store::pgcluster::{PrivateCluster, StopMode};
use kmsgate_store::testsuite::{key_id, sample_key, tenant};
use kmsgate_store::{SqlStore, StoreOptions};
use sqlx::Connection as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_stuck_behind_a_lock_is_a_dependency_timeout() {
    let cluster = tokio::task::spawn_blocking(|| PrivateCluster::start(None)).await.expect("start the cluster");
    let url = cluster.url("options=-c%20statement_timeout%3D300");
    let store = SqlStore::open_with(&url, StoreOptions::default().max_connections(2)).await.expect("open");
    store.create_key(&sample_key("acme", "k"), &[]).await.expect("create");

    sqlx::any::install_default_drivers();
    let mut blocker = sqlx::AnyConnection::connect(&cluster.url("")).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut blocker).await.expect("begin");
    sqlx::query("LOCK TABLE keys IN ACCESS EXCLUSIVE MODE").execute(&mut blocker).await.expect("lock");
    let started = Instant::now();
    let err = store.get_key(&tenant("acme"), &key_id("k")).await.expect_err("the read waits on the lock");
    assert_eq!(err.kind(), ErrorKind::DependencyTimeout, "{err:?} {:?}", err.internal_source());
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    // Writers queue on the same lock and time out the same way.
    let err = store.create_key(&sample_key("acme", "k2"), &[]).await.expect_err("the write waits on the lock");
    assert_eq!(err.kind(), ErrorKind::DependencyTimeout, "{err:?} {:?}", err.internal_source());
    sqlx::query("ROLLBACK").execute(&mut blocker).await.expect("release");
    assert!(store.get_key(&tenant("acme"), &key_id("k")).await.expect("read after the lock").is_some());
    assert!(
        store.get_key(&tenant("acme"), &key_id("k2")).await.expect("read").is_none(),
        "the timed-out write left nothing"
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_server_fails_calls_promptly_and_the_store_recovers_with_every_acknowledged_write() {
    let mut cluster = tokio::task::spawn_blocking(|| PrivateCluster::start(None)).await.expect("start the cluster");
    let opts = StoreOptions::default().max_connections(2).acquire_timeout(Duration::from_millis(800));
    let store = SqlStore::open_with(&cluster.url(""), opts).await.expect("open");
    let mut acked = Vec::new();
    for i in 0..20 {
        let k = store.create_key(&sample_key("acme", &format!("k{i}")), &[]).await.expect("create");
        acked.push(k.id);
    }

    // A writer keeps creating keys while the server crashes: whatever it was told succeeded must survive.
    let store = std::sync::Arc::new(store);
    let writer = tokio::spawn({
        let store = store.clone();
        async move {
            let mut acked = Vec::new();
            let mut failures = 0;
            for i in 0.. {
                match store.create_key(&sample_key("acme", &format!("during-{i}")), &[]).await {
                    Ok(k) => acked.push(k.id),
                    Err(e) => {
                        assert!(matches!(e.kind(), ErrorKind::DependencyTimeout | ErrorKind::StorageFailure), "{e:?}");
                        failures += 1;
                        if failures == 3 {
                            return acked;
                        }
                    }
                }
            }
            acked
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut cluster = tokio::task::spawn_blocking(move || {
        cluster.stop(StopMode::Immediate);
        cluster
    })
    .await
    .expect("stop");
    let during = writer.await.expect("writer");
    assert!(!during.is_empty(), "the writer wrote before the crash");
    acked.extend(during);
    for _ in 0..3 {
        let started = Instant::now();
        let err = store.get_key(&tenant("acme"), &acked[0]).await.expect_err("the server is down");
        assert!(
            matches!(err.kind(), ErrorKind::DependencyTimeout | ErrorKind::StorageFailure),
            "{err:?} {:?}",
            err.internal_source()
        );
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "bounded by the acquire timeout: {:?}",
            started.elapsed()
        );
        assert!(store.ping().await.is_err());
    }

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.start_again();
        cluster
    })
    .await
    .expect("restart");
    // The same pool reconnects by itself.
    let started = Instant::now();
    while store.ping().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "the store did not reconnect: {}", cluster.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in &acked {
        assert!(store.get_key(&tenant("acme"), id).await.expect("get").is_some(), "acknowledged {id} was lost");
    }
    store.create_key(&sample_key("acme", "after"), &[]).await.expect("writable again");
    println!("{} acknowledged writes survived the crash", acked.len());
    store.close().await;
}

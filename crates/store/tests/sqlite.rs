//! The SQLite store: the shared suite on an in-memory and on a file database, plus durability across
//! reopen, several handles and processes on one file, and a writer killed with SIGKILL.

// Tests report failures by panicking; `expect` names what failed.
#![allow(clippy::expect_used)]

use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::process::ExitStatusExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kmsgate_core::{Document, ErrorKind, KeyId, PageRequest, Precondition, Store, Tenant, Timestamp};
use kmsgate_store::testsuite::{self, Fixture, alias, key_id, sample_key, tenant};
use kmsgate_store::{Dialect, SqlStore, StoreOptions};

async fn memory_fixture() -> Fixture {
    Fixture::new(SqlStore::open("sqlite::memory:").await.expect("open sqlite::memory:"))
}

async fn file_fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqlStore::open(&file_url(&dir)).await.expect("open sqlite file");
    Fixture::with_guard(store, dir)
}

/// A file two directories below the temporary one: `open` creates them.
fn file_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}/state/kmsgate/kms.db", dir.path().display())
}

mod memory {
    kmsgate_store::store_testsuite!(super::memory_fixture());
}

mod file {
    kmsgate_store::store_testsuite!(super::file_fixture());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_handles_on_one_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = file_url(&dir);
    let a = SqlStore::open(&url).await.expect("open a");
    let b = SqlStore::open(&url).await.expect("open b");
    testsuite::concurrent_handles(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_one_chain_from_two_handles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = file_url(&dir);
    let a = SqlStore::open(&url).await.expect("open a");
    let b = SqlStore::open(&url).await.expect("open b");
    testsuite::audit_log_one_chain_from_two_handles(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_opens_of_a_new_file_all_succeed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = file_url(&dir);
    let (a, b, c) = tokio::join!(SqlStore::open(&url), SqlStore::open(&url), SqlStore::open(&url));
    let (a, b, c) = (a.expect("open a"), b.expect("open b"), c.expect("open c"));
    assert_eq!(a.dialect(), Dialect::Sqlite);
    a.create_key(&sample_key("acme", "k"), &[]).await.expect("create");
    for s in [&b, &c] {
        assert!(s.get_key(&tenant("acme"), &key_id("k")).await.expect("get").is_some());
    }
}

#[tokio::test]
async fn open_creates_the_file_and_its_directories() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state/kmsgate/kms.db");
    assert!(!path.exists());
    let store = SqlStore::open(&file_url(&dir)).await.expect("open");
    store.ping().await.expect("ping");
    assert!(path.is_file());
}

#[tokio::test]
async fn unsupported_urls_are_invalid_requests() {
    for url in ["mysql://root@localhost/kms", "kms.db", "sqlite://"] {
        let err = SqlStore::open(url).await.expect_err(url);
        assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{url}");
    }
}

#[tokio::test]
async fn in_memory_stores_are_private() {
    let a = SqlStore::open("sqlite::memory:").await.expect("open a");
    let b = SqlStore::open("sqlite::memory:").await.expect("open b");
    a.create_key(&sample_key("acme", "k"), &[]).await.expect("create");
    assert!(b.get_key(&tenant("acme"), &key_id("k")).await.expect("get").is_none());
}

#[tokio::test]
async fn everything_survives_close_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = file_url(&dir);
    let t = tenant("acme");
    let acme = Tenant { id: t.clone(), display_name: "Acme".to_owned(), created_at: Timestamp(1) };

    let store = SqlStore::open(&url).await.expect("open");
    store.ensure_tenant(&acme).await.expect("tenant");
    let doc = Document::new("xks.credential", "AKIA-1", t.clone(), serde_json::json!({"secret": "wrapped"}));
    let doc = store.put_document(&doc, Precondition::Absent).await.expect("put").expect("inserted");
    store.heartbeat("replica-1", &serde_json::json!({"version": "1"})).await.expect("heartbeat");
    let created = store.create_key(&sample_key("acme", "k"), &[alias("alias/k")]).await.expect("create");
    let mut next = created.clone();
    next.description = "updated".to_owned();
    let updated = store.update_key(&next).await.expect("update").expect("matched");
    let feed = store.changes_since(0, 100).await.expect("feed");
    store.close().await;
    drop(store);

    let store = SqlStore::open(&url).await.expect("reopen");
    assert_eq!(store.get_tenant(&t).await.expect("tenant"), Some(acme));
    assert_eq!(store.get_document("xks.credential", "AKIA-1").await.expect("document"), Some(doc));
    let replicas = store.live_replicas(Timestamp(0)).await.expect("replicas");
    assert_eq!(replicas.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["replica-1"]);
    assert_eq!(store.get_key(&t, &created.id).await.expect("get"), Some(updated.clone()));
    assert_eq!(store.get_alias(&t, &alias("alias/k")).await.expect("alias").map(|a| a.key_id), Some(created.id));
    assert_eq!(store.changes_since(0, 100).await.expect("feed"), feed);
    let last = feed.last().map(|c| c.seq).expect("non-empty feed");
    assert!(store.record_change(&t, kmsgate_core::ChangeKind::Policy, "p").await.expect("record") > last);
    let page = store.list_keys(&t, &PageRequest::first(10)).await.expect("list");
    assert_eq!(page.items, vec![updated]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pruned_change_feed_continues_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = file_url(&dir);
    let store = SqlStore::open(&url).await.expect("open");
    let last = testsuite::prune_before_reopen(&store).await;
    store.close().await;
    drop(store);
    let store = SqlStore::open(&url).await.expect("reopen");
    testsuite::changes_continue_after_reopen(&store, last).await;
}

// ---- crash test ------------------------------------------------------------------------------------------

/// Set in the child process only: the store URL it writes to.
const CRASH_CHILD_ENV: &str = "KMSGATE_STORE_CRASH_CHILD_URL";
/// Printed by the writer after each `create_key` returned `Ok`.
const ACK: &str = "KMSGATE-STORE-ACK ";
/// How long the parent waits for the child's 30 acknowledgements: generous, for a loaded machine.
const PARENT_DEADLINE: Duration = Duration::from_secs(180);
/// How long a child writes at most: beyond the parent's deadline, so it is always killed while writing.
const CHILD_BOUND: Duration = Duration::from_secs(600);

/// The writer path of the crash test: creates keys one by one and prints each id once the store acknowledged
/// it, `count` of them or, without a count, until `until` (the child: it must never finish before the parent
/// kills it, however slowly the parent is scheduled; the pipe to the parent, once full, paces it). Returns the
/// acknowledged ids.
async fn write_and_ack(url: &str, count: Option<usize>, until: Instant) -> Vec<KeyId> {
    let store = SqlStore::open(url).await.expect("writer opens the store");
    let mut acked = Vec::new();
    for i in 0.. {
        if count.is_some_and(|n| i >= n) || Instant::now() >= until {
            break;
        }
        let key = sample_key("acme", &format!("child-{i:05}"));
        let stored = store.create_key(&key, &[alias(&format!("alias/child-{i:05}"))]).await.expect("create_key");
        // println! so a normal run's output is captured; the child runs with --nocapture.
        println!("{ACK}{}", stored.id);
        std::io::stdout().flush().expect("stdout");
        acked.push(stored.id);
    }
    acked
}

/// The child entry point of [`acknowledged_writes_survive_sigkill`]. Run normally, it runs the same writer path
/// on a scratch file and checks that a separate handle finds every acknowledged key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child_writer() {
    if let Ok(url) = std::env::var(CRASH_CHILD_ENV) {
        // Child: keep writing until the parent kills us. An orphan (the parent gone) stops writing when its
        // stdout breaks, or after the bound, long after the parent's own deadline.
        write_and_ack(&url, None, Instant::now() + CHILD_BOUND).await;
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let url = file_url(&dir);
    let acked = write_and_ack(&url, Some(5), Instant::now() + CHILD_BOUND).await;
    assert_eq!(acked.len(), 5);
    let reader = SqlStore::open(&url).await.expect("open");
    for id in &acked {
        assert!(reader.get_key(&tenant("acme"), id).await.expect("get").is_some(), "{id} was acknowledged");
    }
}

/// A writer process is SIGKILLed right after it acknowledged writes; every acknowledged write is in the file,
/// and the file opens cleanly. While the child runs, this process reads and writes the same file.
#[test]
fn acknowledged_writes_survive_sigkill() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let url = file_url(&dir);
    // Create the schema first so the child and this process do not race the first open. The child writes
    // back to back and only the full pipe to this process pauses it, so this process's own writes may wait for
    // the lock that long on a loaded machine: a busy timeout well beyond that (waiting, not an error, is what
    // resolves the lock between processes).
    let parent = rt
        .block_on(SqlStore::open_with(&url, StoreOptions::default().busy_timeout(Duration::from_secs(120))))
        .expect("open");

    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(exe)
        .args(["--exact", "crash_child_writer", "--nocapture", "--test-threads", "1"])
        .env(CRASH_CHILD_ENV, &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the writer");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();

    let deadline = Instant::now() + PARENT_DEADLINE;
    let mut acked = Vec::new();
    let mut own = Vec::new();
    while acked.len() < 30 && Instant::now() < deadline {
        let Some(line) = lines.next() else { break };
        let line = line.expect("read child stdout");
        let Some(id) = line.strip_prefix(ACK) else { continue };
        acked.push(KeyId::parse(id).expect("acked id"));
        if acked.len() % 10 == 0 {
            // Another process's acknowledged write is visible here at once, and writing concurrently with
            // it works (the busy timeout, not an error, resolves the lock).
            let seen = rt.block_on(parent.get_key(&tenant("acme"), &acked[acked.len() - 1])).expect("get");
            assert!(seen.is_some(), "the child's acknowledged key is visible to another process");
            let mine = sample_key("acme", &format!("parent-{}", acked.len()));
            own.push(rt.block_on(parent.create_key(&mine, &[])).expect("write next to the child").id);
        }
    }
    // SIGKILL: no destructor, no clean close; most likely in the middle of the next write.
    child.kill().expect("kill the writer");
    let status = child.wait().expect("reap the writer");
    assert_eq!(status.signal(), Some(9), "the writer was SIGKILLed, not finished: {status:?}");
    assert_eq!(acked.len(), 30, "the writer acknowledged 30 writes in time");
    drop(parent);

    rt.block_on(async {
        let store = SqlStore::open(&url).await.expect("reopen after the crash");
        for id in acked.iter().chain(&own) {
            assert!(store.get_key(&tenant("acme"), id).await.expect("get").is_some(), "acknowledged {id} is lost");
        }
        let first = &acked[0];
        let alias_entry = store.get_alias(&tenant("acme"), &alias(&format!("alias/{first}"))).await.expect("alias");
        assert_eq!(alias_entry.map(|a| a.key_id), Some(first.clone()), "a key and its alias commit together");
        let n = store.count_keys(&tenant("acme")).await.expect("count");
        assert!(n >= 33, "{n} keys after the crash");
        store.create_key(&sample_key("acme", "after-crash"), &[]).await.expect("the file is writable");
    });
}

/// `store migrate`: everything moves into an empty store, and a non-empty destination is refused.
#[tokio::test]
async fn copy_into_an_empty_store() {
    let src = SqlStore::open("sqlite::memory:").await.expect("open source");
    testsuite::populate_for_copy(&src).await;
    testsuite::populate_audit_log(&src).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dst = SqlStore::open(&file_url(&dir)).await.expect("open destination");
    let report = src.copy_into(&dst).await.expect("copy");
    let count = |name: &str| report.tables.iter().find(|(t, _)| *t == name).map(|(_, n)| *n);
    assert_eq!((count("keys"), count("aliases"), count("secret_versions")), (Some(2), Some(1), Some(1)));
    testsuite::check_copied(&src, &dst).await;
    testsuite::check_audit_log_copied(&src, &dst).await;
    let err = src.copy_into(&dst).await.expect_err("the destination now holds data");
    assert_eq!(err.kind(), ErrorKind::InvalidRequest);
    assert!(err.message().contains("not empty"), "{}", err.message());
}

//! Several replicas on one PostgreSQL database (a schema of its own per run on the shared test server):
//! two real `kmsgate serve` processes enforce changes made elsewhere (a key disabled or enabled, a credential
//! revoked) within about a second and count each other in the XKS fleet size; two dispatchers with their own pools (as two replicas have) write one secret
//! concurrently with `cas` without losing an update or duplicating a version number; and the same over the
//! secrets REST API of two `serve` processes, with a token revoked on one refused by the other.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::{self, Server, cli_json, cli_ok, toml_str};
use common::wire::{XksCred, xks_encrypt, xks_health};
use kmsgate_core::{
    Caller, Dispatcher, DispatcherConfig, ErrorKind, PutSecretRequest, SecretPath, SecretSelector, Store, TenantId,
};
use kmsgate_store::pgcluster::{TestSchema, shared_server_url};
use kmsgate_store::{SqlStore, StoreOptions};
use serde_json::Value;

/// How long a change made through one process may take to be enforced by another (the default 500 ms
/// change poll plus request and scheduling time on a loaded two-core machine).
const PROPAGATION_LIMIT: Duration = Duration::from_millis(1500);

/// A configuration for a replica (or the CLI) on `store_url`, with the shared root key file in `dir`.
fn write_config(dir: &Path, name: &str, store_url: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let text = format!(
        "data_dir = {data}\n[server]\nbind = \"127.0.0.1:0\"\n[store]\nurl = {url}\nmax_connections = 4\n\
         [backend.software]\nkek_file = {kek}\n[xks]\nhealth_refresh_secs = 1\n",
        data = toml_str(&dir.join(format!("{name}.data")).display().to_string()),
        url = toml_str(store_url),
        kek = toml_str(&dir.join("kek").display().to_string()),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Polls `probe` every 20 ms until it returns true; the time it took, or `None` after `limit`.
async fn time_until<F, Fut>(limit: Duration, mut probe: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < limit {
        if probe().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

fn is_disabled_refusal(r: &common::Reply) -> bool {
    r.status == 400 && r.json()["errorName"] == "InvalidStateException"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disable_through_the_cli_is_refused_by_both_replicas_within_a_second() {
    let schema = TestSchema::create(&shared_server_url().await).await;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let cli_cfg = write_config(p, "cli.toml", schema.url());

    // The CLI creates the root key, the key, an XKS key store and its credential before any replica runs.
    let key = cli_json(p, &cli_cfg, &["keys", "create", "--alias", "alias/replicated"]);
    let key_id = key["id"].as_str().unwrap().to_owned();
    cli_json(p, &cli_cfg, &["xks", "stores", "create", "--name", "rep", "--prefix", "/rep", "--all-keys"]);
    let cred: XksCred = XksCred::from_file(
        &serde_json::from_str(&cli_ok(p, &cli_cfg, &["xks", "credentials", "create", "--store", "rep"])).unwrap(),
    );

    let a = process::start(p, &write_config(p, "a.toml", schema.url()), &p.join("a.log"));
    let b = process::start(p, &write_config(p, "b.toml", schema.url()), &p.join("b.log"));
    let replicas: [&Server; 2] = [&a, &b];

    // Both serve the key (and now hold it in their caches: a refusal later comes from the change feed).
    for r in replicas {
        let reply = xks_encrypt(r.addr, &cred, &key_id, b"before").await;
        assert_eq!(reply.status, 200, "{}: {}", String::from_utf8_lossy(&reply.body), r.log_text());
    }

    // The fleet: each replica's heartbeat is in the store, so both report two (GetHealthStatus answers from a
    // background probe, refreshed every second here).
    for r in replicas {
        let seen = time_until(Duration::from_secs(15), || async {
            let h = xks_health(r.addr, &cred).await;
            h.status == 200 && h.json()["xksProxyFleetSize"] == 2
        })
        .await;
        assert!(
            seen.is_some(),
            "xksProxyFleetSize of {} never reached 2: {}",
            r.addr,
            xks_health(r.addr, &cred).await.json()
        );
    }

    for (command, refused) in [("disable", true), ("enable", false)] {
        let started = Instant::now();
        cli_json(p, &cli_cfg, &["keys", command, &key_id]);
        let committed = Instant::now();
        let (a_took, b_took) = tokio::join!(
            time_until(PROPAGATION_LIMIT, || async {
                let r = xks_encrypt(a.addr, &cred, &key_id, b"probe").await;
                if refused { is_disabled_refusal(&r) } else { r.status == 200 }
            }),
            time_until(PROPAGATION_LIMIT, || async {
                let r = xks_encrypt(b.addr, &cred, &key_id, b"probe").await;
                if refused { is_disabled_refusal(&r) } else { r.status == 200 }
            }),
        );
        let (Some(a_took), Some(b_took)) = (a_took, b_took) else {
            panic!(
                "`keys {command}` not enforced by both replicas within {PROPAGATION_LIMIT:?}: {a_took:?} {b_took:?}"
            );
        };
        println!(
            "keys {command}: enforced by replica A after {a_took:?}, B after {b_took:?} (CLI process took {:?})",
            committed - started
        );
        // Once enforced, it stays enforced on both (no replica serves a stale cached key afterwards).
        for r in replicas {
            let reply = xks_encrypt(r.addr, &cred, &key_id, b"again").await;
            assert_eq!(is_disabled_refusal(&reply), refused, "{}", String::from_utf8_lossy(&reply.body));
        }
    }

    // A revoked credential is refused by both replicas just as quickly (documents follow the change feed too);
    // a second credential of the same key store keeps working.
    let second = XksCred::from_file(
        &serde_json::from_str(&cli_ok(p, &cli_cfg, &["xks", "credentials", "create", "--store", "rep"])).unwrap(),
    );
    for r in replicas {
        assert_eq!(xks_encrypt(r.addr, &second, &key_id, b"second").await.status, 200);
    }
    cli_json(p, &cli_cfg, &["xks", "credentials", "revoke", &cred.akid]);
    let (a_took, b_took) = tokio::join!(
        time_until(PROPAGATION_LIMIT, || async {
            let r = xks_encrypt(a.addr, &cred, &key_id, b"revoked").await;
            r.status == 401 && r.json()["errorName"] == "AuthenticationFailedException"
        }),
        time_until(PROPAGATION_LIMIT, || async {
            let r = xks_encrypt(b.addr, &cred, &key_id, b"revoked").await;
            r.status == 401 && r.json()["errorName"] == "AuthenticationFailedException"
        }),
    );
    assert!(
        a_took.is_some() && b_took.is_some(),
        "revocation not enforced within {PROPAGATION_LIMIT:?}: {a_took:?} {b_took:?}"
    );
    println!("credential revoked: refused by replica A after {a_took:?}, B after {b_took:?}");
    for r in replicas {
        assert_eq!(xks_encrypt(r.addr, &second, &key_id, b"second").await.status, 200, "the other credential works");
    }

    // The replicas table holds both processes.
    let store = SqlStore::open_with(schema.url(), StoreOptions::default().max_connections(1)).await.unwrap();
    let live = store.live_replicas(kmsgate_core::Timestamp(kmsgate_core::Timestamp::now().0 - 30_000)).await.unwrap();
    let binds: Vec<String> =
        live.iter().filter_map(|r| r.info.get("bind").and_then(Value::as_str).map(str::to_owned)).collect();
    assert_eq!(live.len(), 2, "{live:?}");
    assert_eq!(binds.iter().filter(|b| b.as_str() == "127.0.0.1:0").count(), 2, "{binds:?}");
    store.close().await;
    for r in replicas {
        assert!(!r.log_text().contains("panicked"), "{}", r.log_text());
    }
}

// ---- concurrent cas writers on two replicas -------------------------------------------------------------

const WRITERS_PER_REPLICA: usize = 3;
const WRITES_PER_WRITER: usize = 5;

async fn replica_dispatcher(url: &str, kek_dir: &Path) -> Dispatcher {
    // A pool of its own per replica: the database, not a shared connection, arbitrates.
    let store: Arc<dyn Store> =
        Arc::new(SqlStore::open_with(url, StoreOptions::default().max_connections(4)).await.expect("open store"));
    let backend = common::software_backend(kek_dir);
    let cfg = DispatcherConfig { store_deadline: Duration::from_secs(10), ..DispatcherConfig::default() };
    let d = Dispatcher::builder(store).backend(backend).config(cfg).build().await.expect("dispatcher");
    d.ensure_tenant(&TenantId::default_tenant()).await.expect("tenant");
    d
}

/// One writer: `WRITES_PER_WRITER` successful cas writes, each re-reading the current version after a
/// conflict. Returns (version number, value) of every acknowledged write.
async fn cas_writer(d: Dispatcher, path: SecretPath, name: String) -> (Vec<(u32, String)>, usize) {
    let caller = Caller::admin(TenantId::default_tenant());
    let mut acked = Vec::new();
    let mut conflicts = 0;
    while acked.len() < WRITES_PER_WRITER {
        let current = d.describe_secret(&caller, &path, false).await.expect("describe").current_version;
        let value = format!("{name}-{}", acked.len());
        let req =
            PutSecretRequest { cas: Some(current), ..PutSecretRequest::new(path.clone(), value.clone().into_bytes()) };
        match d.put_secret(&caller, req).await {
            Ok(w) => {
                assert_eq!(w.version.version, current + 1, "a cas write lands right after the version it expected");
                acked.push((w.version.version, value));
            }
            Err(e) if e.kind() == ErrorKind::VersionConflict => conflicts += 1,
            Err(e) => panic!("{name}: unexpected error {e:?} ({:?})", e.internal_source()),
        }
    }
    (acked, conflicts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cas_writes_on_two_replicas_lose_nothing() {
    let schema = TestSchema::create(&shared_server_url().await).await;
    let kek = tempfile::tempdir().unwrap();
    let a = replica_dispatcher(schema.url(), kek.path()).await;
    let b = replica_dispatcher(schema.url(), kek.path()).await;
    let caller = Caller::admin(TenantId::default_tenant());
    let path = SecretPath::parse("replicas/cas").unwrap();

    // Creating with cas 0 on both replicas at once: exactly one wins, the other is told it conflicts.
    let create = |d: &Dispatcher, v: &str| {
        let req = PutSecretRequest {
            cas: Some(0),
            max_versions: Some(100),
            ..PutSecretRequest::new(path.clone(), v.as_bytes().to_vec())
        };
        let (d, caller) = (d.clone(), caller.clone());
        async move { d.put_secret(&caller, req).await }
    };
    let (ra, rb) = tokio::join!(create(&a, "first-a"), create(&b, "first-b"));
    let winner = match (&ra, &rb) {
        (Ok(_), Err(e)) | (Err(e), Ok(_)) => {
            assert_eq!(e.kind(), ErrorKind::VersionConflict, "{e:?}");
            if ra.is_ok() { "first-a" } else { "first-b" }
        }
        _ => panic!("exactly one cas-0 create must win: {ra:?} / {rb:?}"),
    };

    // Writers on both replicas race; each retries after a conflict until its writes land.
    let mut tasks = Vec::new();
    for (replica, d) in [("a", &a), ("b", &b)] {
        for w in 0..WRITERS_PER_REPLICA {
            tasks.push(tokio::spawn(cas_writer(d.clone(), path.clone(), format!("{replica}{w}"))));
        }
    }
    let mut acked: BTreeMap<u32, String> = BTreeMap::new();
    let mut conflicts = 0;
    for t in tasks {
        let (writes, c) = t.await.expect("writer task");
        conflicts += c;
        for (version, value) in writes {
            assert!(acked.insert(version, value).is_none(), "version {version} acknowledged twice");
        }
    }
    let total = 2 * WRITERS_PER_REPLICA * WRITES_PER_WRITER;
    assert_eq!(acked.len(), total);
    let expected: Vec<u32> = (2..=u32::try_from(total).unwrap() + 1).collect();
    assert_eq!(acked.keys().copied().collect::<Vec<_>>(), expected, "versions are dense: none lost, none doubled");
    println!(
        "{total} cas writes from {} writers on two replicas, {conflicts} conflicts retried",
        2 * WRITERS_PER_REPLICA
    );

    // Every acknowledged write is there, under its number, on both replicas.
    for d in [&a, &b] {
        let s = d.describe_secret(&caller, &path, false).await.unwrap();
        assert_eq!(s.current_version, u32::try_from(total).unwrap() + 1);
        let first = d.get_secret_value(&caller, &path, &SecretSelector::Version(1)).await.unwrap();
        assert_eq!(&first.data[..], winner.as_bytes());
        for (version, value) in &acked {
            let got = d.get_secret_value(&caller, &path, &SecretSelector::Version(*version)).await.unwrap();
            assert_eq!(&got.data[..], value.as_bytes(), "version {version}");
        }
    }

    // Without cas, concurrent writers on both replicas all land, each under a number of its own.
    let plain = |d: &Dispatcher, i: usize| {
        let (d, caller, path) = (d.clone(), caller.clone(), path.clone());
        async move { d.put_secret(&caller, PutSecretRequest::new(path, format!("plain-{i}").into_bytes())).await }
    };
    let (x, y, z, w) = tokio::join!(plain(&a, 0), plain(&b, 1), plain(&a, 2), plain(&b, 3));
    let mut numbers: Vec<u32> =
        [x, y, z, w].into_iter().map(|r| r.expect("a plain write lands").version.version).collect();
    numbers.sort_unstable();
    let next = u32::try_from(total).unwrap() + 2;
    assert_eq!(numbers, vec![next, next + 1, next + 2, next + 3]);
}

// ---- the secrets REST API on two replicas ---------------------------------------------------------------

/// A replica configuration with the secrets API's per-identity rate limits off: every writer here is the one
/// bootstrap identity, and the test is about the store arbitrating, not about the limiter.
fn write_secrets_config(dir: &Path, name: &str, store_url: &str) -> std::path::PathBuf {
    let path = write_config(dir, name, store_url);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("[secrets]\nrate_limits = false\n");
    std::fs::write(&path, text).unwrap();
    path
}

/// One `/v1` request with a bearer token on a fresh connection.
async fn rest(addr: std::net::SocketAddr, method: &str, path: &str, token: &str, body: Option<Value>) -> common::Reply {
    let body = body.map(|b| serde_json::to_vec(&b).unwrap()).unwrap_or_default();
    let mut req = common::request(method, &addr.to_string(), path, &body);
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    common::send_on(stream, false, req).await.unwrap()
}

/// One REST writer: `WRITES_PER_WRITER` acknowledged `PUT`s with `options.cas` = the version it just read,
/// re-reading after each `409 version_conflict`. Returns (version, value) of every acknowledged write.
async fn rest_cas_writer(addr: std::net::SocketAddr, token: String, name: String) -> (Vec<(u32, String)>, usize) {
    let mut acked = Vec::new();
    let mut conflicts = 0;
    while acked.len() < WRITES_PER_WRITER {
        let r = rest(addr, "GET", "/v1/secrets/replicas/rest", &token, None).await;
        assert_eq!(r.status, 200, "{name}: {}", String::from_utf8_lossy(&r.body));
        let current = r.json()["version"].as_u64().unwrap();
        let value = format!("{name}-{}", acked.len());
        let body = serde_json::json!({"data": {"v": value}, "options": {"cas": current}});
        let r = rest(addr, "PUT", "/v1/secrets/replicas/rest", &token, Some(body)).await;
        match r.status {
            200 | 201 => {
                let version = u32::try_from(r.json()["version"].as_u64().unwrap()).unwrap();
                assert_eq!(u64::from(version), current + 1, "a cas write lands right after the version it expected");
                acked.push((version, value));
            }
            409 => {
                assert_eq!(r.json()["error"]["code"], "version_conflict", "{}", String::from_utf8_lossy(&r.body));
                conflicts += 1;
            }
            s => panic!("{name}: unexpected {s}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    (acked, conflicts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_rest_api_on_two_replicas_cas_and_revocation() {
    let schema = TestSchema::create(&shared_server_url().await).await;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let cli_cfg = write_secrets_config(p, "cli.toml", schema.url());
    let boot = cli_json(p, &cli_cfg, &["secrets", "bootstrap"]);
    let admin = boot["token"].as_str().unwrap().to_owned();

    let a = process::start(p, &write_secrets_config(p, "a.toml", schema.url()), &p.join("a.log"));
    let b = process::start(p, &write_secrets_config(p, "b.toml", schema.url()), &p.join("b.log"));

    // Creating with cas 0 on both replicas at once: exactly one wins, the other gets 409 version_conflict.
    let create = |addr, v: &'static str| {
        let body = serde_json::json!({"data": {"v": v}, "options": {"cas": 0, "max_versions": 100}});
        rest(addr, "PUT", "/v1/secrets/replicas/rest", &admin, Some(body))
    };
    let (ra, rb) = tokio::join!(create(a.addr, "first-a"), create(b.addr, "first-b"));
    let winner = match (ra.status, rb.status) {
        (201, 409) => "first-a",
        (409, 201) => "first-b",
        other => panic!(
            "exactly one cas-0 create must win: {other:?} {} / {}",
            String::from_utf8_lossy(&ra.body),
            String::from_utf8_lossy(&rb.body)
        ),
    };

    // Writers on both replicas race over HTTP.
    let mut tasks = Vec::new();
    for (replica, addr) in [("a", a.addr), ("b", b.addr)] {
        for w in 0..WRITERS_PER_REPLICA {
            tasks.push(tokio::spawn(rest_cas_writer(addr, admin.clone(), format!("{replica}{w}"))));
        }
    }
    let mut acked: BTreeMap<u32, String> = BTreeMap::new();
    let mut conflicts = 0;
    for t in tasks {
        let (writes, c) = t.await.expect("writer task");
        conflicts += c;
        for (version, value) in writes {
            assert!(acked.insert(version, value).is_none(), "version {version} acknowledged twice");
        }
    }
    let total = 2 * WRITERS_PER_REPLICA * WRITES_PER_WRITER;
    let expected: Vec<u32> = (2..=u32::try_from(total).unwrap() + 1).collect();
    assert_eq!(acked.keys().copied().collect::<Vec<_>>(), expected, "versions are dense: none lost, none doubled");
    println!("{total} REST cas writes on two replicas, {conflicts} conflicts retried");

    // Every acknowledged version reads back, with its value, on both replicas.
    for addr in [a.addr, b.addr] {
        let r = rest(addr, "GET", "/v1/secrets/replicas/rest?version=1", &admin, None).await;
        assert_eq!(r.json()["data"]["v"], winner);
        for (version, value) in &acked {
            let r = rest(addr, "GET", &format!("/v1/secrets/replicas/rest?version={version}"), &admin, None).await;
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            assert_eq!(r.json()["data"]["v"], value.as_str(), "version {version} on {addr}");
        }
        let r = rest(addr, "GET", "/v1/secrets/replicas/rest", &admin, None).await;
        assert_eq!(r.json()["version"], total + 1);
    }

    // A token revoked on replica a is refused by replica b (which has it cached as valid) within ~a second.
    let body = serde_json::json!({"name": "short-lived", "scopes": ["secrets:read"]});
    let r = rest(a.addr, "POST", "/v1/auth/tokens", &admin, Some(body)).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let minted = r.json();
    let (token, id) = (minted["token"].as_str().unwrap().to_owned(), minted["token_id"].as_str().unwrap().to_owned());
    for addr in [a.addr, b.addr] {
        assert_eq!(rest(addr, "GET", "/v1/auth/whoami", &token, None).await.status, 200);
    }
    let r = rest(a.addr, "DELETE", &format!("/v1/auth/tokens/{id}"), &admin, None).await;
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    let took = time_until(PROPAGATION_LIMIT, || async {
        let r = rest(b.addr, "GET", "/v1/auth/whoami", &token, None).await;
        r.status == 401 && r.json()["error"]["code"] == "token_revoked"
    })
    .await;
    let took = took.unwrap_or_else(|| panic!("replica b still accepts the revoked token: {}", b.log_text()));
    println!("revocation on a enforced by b after {took:?}");
}

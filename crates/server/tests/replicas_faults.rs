//! The database failing under a running `kmsgate serve`: a crash and restart of PostgreSQL in the middle of
//! XKS and Alibaba traffic, and a slow database (a lock held). The shared server on 5432 is never touched: the
//! test runs its own private cluster, reached over TLS with `store.ssl_mode = "verify-full"` and a CA of the
//! test's making, so the configuration path of database TLS is exercised end to end as well.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use aws_lc_rs::signature::RsaKeyPair;
use common::process::{self, cli_json, cli_ok, toml_str};
use common::wire::{XksCred, alibaba_call, alibaba_key_pair, xks_encrypt, xks_health};
use kmsgate_alibaba::proto;
use kmsgate_store::pgcluster::{PrivateCluster, StopMode, TlsFiles};
use prost::Message;

/// The store settings of the test: a request gives up on the database after at most `DEADLINE_MS`.
const ACQUIRE_TIMEOUT_MS: u64 = 1000;
const STATEMENT_TIMEOUT_MS: u64 = 1000;
const DEADLINE_MS: u64 = 1500;
/// What a failing request may take: the store deadline plus request handling on a loaded two-core machine.
const ANSWER_WITHIN: Duration = Duration::from_millis(DEADLINE_MS + 700);

fn tls_files(dir: &Path) -> (TlsFiles, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(rcgen::DnType::CommonName, "kmsgate fault test database CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let ca_path = dir.join("db-ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (TlsFiles { cert_pem: cert.pem(), key_pem: key.serialize_pem() }, ca_path)
}

fn write_config(dir: &Path, port: u16, ca: &Path) -> std::path::PathBuf {
    let path = dir.join("kmsgate.toml");
    let text = format!(
        "data_dir = {data}\n[server]\nbind = \"127.0.0.1:0\"\nchange_poll_ms = 250\n\
         [store]\nurl = {url}\nssl_mode = \"verify-full\"\nssl_root_cert = {ca}\nmax_connections = 4\n\
         acquire_timeout_ms = {ACQUIRE_TIMEOUT_MS}\nstatement_timeout_ms = {STATEMENT_TIMEOUT_MS}\n\
         deadline_ms = {DEADLINE_MS}\n[xks]\nhealth_refresh_secs = 1\n",
        data = toml_str(&dir.join("data").display().to_string()),
        url = toml_str(&format!("postgres://postgres@localhost:{port}/test")),
        ca = toml_str(&ca.display().to_string()),
    );
    std::fs::write(&path, text).unwrap();
    path
}

struct Client {
    name: &'static str,
    addr: SocketAddr,
    xks: XksCred,
    ali_id: String,
    ali_pair: RsaKeyPair,
    n: AtomicU32,
}

/// What one request returned: HTTP status, the vendor's error name (None on success) and how long it took.
#[derive(Debug)]
struct Outcome {
    status: u16,
    error: Option<String>,
    took: Duration,
}

impl Client {
    fn new(name: &'static str, addr: SocketAddr, xks: &XksCred, ali_id: &str, ali_pem: &str) -> Client {
        let ali_pair = alibaba_key_pair(ali_pem);
        Client { name, addr, xks: xks.clone(), ali_id: ali_id.to_owned(), ali_pair, n: AtomicU32::new(0) }
    }

    async fn xks(&self, key_id: &str) -> Outcome {
        let started = Instant::now();
        let r = xks_encrypt(self.addr, &self.xks, key_id, b"fault probe").await;
        let error = (r.status != 200).then(|| r.json()["errorName"].as_str().unwrap_or("?").to_owned());
        Outcome { status: r.status, error, took: started.elapsed() }
    }

    async fn alibaba(&self, key_id: &str) -> Outcome {
        // A distinct plaintext per call: the frontend refuses a replayed signature.
        let n = self.n.fetch_add(1, Ordering::Relaxed);
        let body = proto::EncryptRequest {
            key_id: key_id.to_owned(),
            plaintext: format!("fault probe {} {n}", self.name).into_bytes(),
            ..Default::default()
        }
        .encode_to_vec();
        let started = Instant::now();
        let r = alibaba_call(self.addr, &self.ali_pair, &self.ali_id, "Encrypt", body).await;
        let error = (r.status != 200).then(|| proto::Error::decode(&*r.body).map(|e| e.error_code).unwrap_or_default());
        Outcome { status: r.status, error, took: started.elapsed() }
    }

    async fn ready(&self) -> bool {
        common::http(self.addr, "GET", "/readyz", b"").await.status == 200
    }
}

/// Requests sent in a loop across the outage: a cached key (served, or refused in the store envelopes once its
/// cache entry expires) and an unknown key (never cached, so every request needs the store: 404 while the
/// database is up). Every answer must be one of those, in time; any other answer or a broken connection fails.
async fn traffic(
    c: std::sync::Arc<Client>,
    warm: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<String> {
    let unknown = "00000000-0000-4000-8000-000000000000";
    let mut seen = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        for (what, o, ok) in [
            ("xks cached", c.xks(&warm).await, (200, "")),
            ("xks unknown", c.xks(unknown).await, (404, "KeyNotFoundException")),
            ("alibaba cached", c.alibaba(&warm).await, (200, "")),
            ("alibaba unknown", c.alibaba(unknown).await, (404, "Forbidden.KeyNotFound")),
        ] {
            let down = if what.starts_with("xks") { XKS_DOWN } else { ALIBABA_DOWN };
            let got = (o.status, o.error.clone().unwrap_or_default());
            assert!(
                got == (ok.0, ok.1.to_owned()) || down.iter().any(|(s, e)| (*s, e.to_string()) == got),
                "{} {what}: {got:?}",
                c.name
            );
            assert!(o.took < ANSWER_WITHIN, "{} {what}: answered after {:?}", c.name, o.took);
            seen.push(format!("{what} {} {}", got.0, got.1));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

fn assert_ok(what: &str, o: &Outcome) {
    assert_eq!((o.status, o.error.as_deref()), (200, None), "{what}: {o:?}");
}

/// The design's envelopes of the store being unavailable: the dependency timeout, or a storage failure.
fn assert_store_envelope(what: &str, o: &Outcome, allowed: &[(u16, &str)]) {
    let got = (o.status, o.error.clone().unwrap_or_default());
    assert!(allowed.iter().any(|(s, e)| *s == got.0 && *e == got.1), "{what}: {got:?} is not one of {allowed:?}");
    assert!(o.took < ANSWER_WITHIN, "{what}: answered after {:?} (store deadline {DEADLINE_MS} ms)", o.took);
}

const XKS_DOWN: &[(u16, &str)] = &[(503, "DependencyTimeoutException"), (500, "InternalException")];
const ALIBABA_DOWN: &[(u16, &str)] = &[(503, "ServiceUnavailableTemporary"), (500, "InternalFailure")];

async fn wait_for(limit: Duration, what: &str, mut probe: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while started.elapsed() < limit {
        if probe().await {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within {limit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_crash_restart_and_slowness_under_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let (files, ca) = tls_files(p);
    let mut cluster = tokio::task::spawn_blocking(move || PrivateCluster::start(Some(&files))).await.unwrap();
    let cfg = write_config(p, cluster.port(), &ca);

    let key = |alias: &str| cli_json(p, &cfg, &["keys", "create", "--alias", alias])["id"].as_str().unwrap().to_owned();
    let (warm, cold, slow) = (key("alias/warm"), key("alias/cold"), key("alias/slow"));
    cli_json(p, &cfg, &["xks", "stores", "create", "--name", "faults", "--prefix", "/faults", "--all-keys"]);
    let xks = XksCred::from_file(
        &serde_json::from_str(&cli_ok(p, &cfg, &["xks", "credentials", "create", "--store", "faults"])).unwrap(),
    );
    let ck =
        cli_json(p, &cfg, &["alibaba", "client-keys", "create", "--identity", "app", "--out-dir", p.to_str().unwrap()]);
    let ali_id = ck["id"].as_str().unwrap().to_owned();
    let ali_pem = std::fs::read_to_string(ck["private_key_file"].as_str().unwrap()).unwrap();
    // Two replicas on the database.
    let servers = [process::start(p, &cfg, &p.join("a.log")), process::start(p, &cfg, &p.join("b.log"))];
    let clients = [
        std::sync::Arc::new(Client::new("A", servers[0].addr, &xks, &ali_id, &ali_pem)),
        std::sync::Arc::new(Client::new("B", servers[1].addr, &xks, &ali_id, &ali_pem)),
    ];

    // Traffic with the database up, and writes acknowledged while it flows.
    let mut acknowledged = Vec::new();
    for i in 0..3 {
        for c in &clients {
            assert_ok("XKS before the outage", &c.xks(&warm).await);
            assert_ok("Alibaba before the outage", &c.alibaba(&warm).await);
        }
        acknowledged.push(key(&format!("alias/acked-{i}")));
    }
    for c in &clients {
        assert!(c.ready().await, "ready with the database up");
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let background: Vec<_> =
        clients.iter().map(|c| tokio::spawn(traffic(c.clone(), warm.clone(), stop.clone()))).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The database crashes (an immediate shutdown: no checkpoint, recovery at the next start).
    let mut cluster = tokio::task::spawn_blocking(move || {
        cluster.stop(StopMode::Immediate);
        cluster
    })
    .await
    .unwrap();
    let down_since = Instant::now();

    for c in &clients {
        // What needs the store fails in each frontend's envelope within the deadline ...
        let x = c.xks(&cold).await;
        assert_store_envelope("XKS, key not in cache, database down", &x, XKS_DOWN);
        let a = c.alibaba(&cold).await;
        assert_store_envelope("Alibaba, key not in cache, database down", &a, ALIBABA_DOWN);
        println!(
            "{}: database down: XKS {} {:?} after {:?}; Alibaba {} {:?} after {:?}",
            c.name, x.status, x.error, x.took, a.status, a.error, a.took
        );
        // ... readiness turns false ...
        let not_ready = wait_for(Duration::from_secs(10), "/readyz turning 503", async || !c.ready().await).await;
        println!(
            "{}: /readyz 503 {not_ready:?} after the probe started ({:?} after the crash)",
            c.name,
            down_since.elapsed()
        );
        // ... XKS GetHealthStatus reports the members as not ACTIVE (KMS sees the proxy as unhealthy) ...
        let mut status = String::new();
        wait_for(Duration::from_secs(10), "XKS health leaving ACTIVE", async || {
            let h = xks_health(c.addr, &c.xks).await;
            status = h.json()["ekmFleetDetails"][0]["healthStatus"].as_str().unwrap_or("?").to_owned();
            h.status == 200 && status != "ACTIVE"
        })
        .await;
        println!("{}: XKS GetHealthStatus with the database down: {status}", c.name);
        // ... and keys already in the cache keep serving cryptography.
        assert_ok("XKS, cached key, database down", &c.xks(&warm).await);
        assert_ok("Alibaba, cached key, database down", &c.alibaba(&warm).await);
    }

    // The database comes back: the replicas recover by themselves.
    let restarted = Instant::now();
    let mut cluster = tokio::task::spawn_blocking(move || {
        cluster.start_again();
        cluster
    })
    .await
    .unwrap();
    for c in &clients {
        let ready_after = wait_for(Duration::from_secs(20), "/readyz back to 200", async || c.ready().await).await;
        println!(
            "{}: /readyz 200 again {ready_after:?} after the database accepted connections ({:?} incl. its start)",
            c.name,
            restarted.elapsed()
        );
        wait_for(Duration::from_secs(10), "XKS health ACTIVE again", async || {
            xks_health(c.addr, &c.xks).await.json()["ekmFleetDetails"][0]["healthStatus"] == "ACTIVE"
        })
        .await;
        assert_ok("XKS, formerly failing key, after recovery", &c.xks(&cold).await);
        assert_ok("Alibaba, formerly failing key, after recovery", &c.alibaba(&cold).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for (c, t) in clients.iter().zip(background) {
        let seen = t.await.expect("traffic kept to the envelopes");
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for s in &seen {
            *counts.entry(s.as_str()).or_default() += 1;
        }
        println!("{}: traffic across the outage: {counts:?}", c.name);
        for needed in ["xks unknown 404 KeyNotFoundException", "xks unknown 503 DependencyTimeoutException"] {
            assert!(counts.contains_key(needed), "{}: traffic never saw {needed}: {counts:?}", c.name);
        }
    }

    // Nothing acknowledged before the crash is lost.
    let listed = cli_json(p, &cfg, &["keys", "list"]);
    let ids: Vec<&str> = listed["keys"].as_array().unwrap().iter().filter_map(|k| k["id"].as_str()).collect();
    for id in acknowledged.iter().chain([&warm, &cold, &slow]) {
        assert!(ids.contains(&id.as_str()), "acknowledged key {id} is gone after the restart: {ids:?}");
    }
    // The change feed is followed again: a disable through the CLI is enforced by both within the poll interval.
    cli_json(p, &cfg, &["keys", "disable", &warm]);
    for c in &clients {
        wait_for(Duration::from_millis(1500), "disable enforced after recovery", async || {
            c.xks(&warm).await.error.as_deref() == Some("InvalidStateException")
        })
        .await;
    }

    // A slow database: a lock held on the keys table makes reading a key wait past the statement timeout.
    // The dependency-timeout error comes back within the deadline, and the key works once the lock is gone.
    sqlx::any::install_default_drivers();
    let mut blocker =
        <sqlx::AnyConnection as sqlx::Connection>::connect(&cluster.url("sslmode=disable")).await.unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("LOCK TABLE keys IN ACCESS EXCLUSIVE MODE").execute(&mut blocker).await.unwrap();
    let c = &clients[0];
    let x = c.xks(&slow).await;
    assert_store_envelope("XKS, database slow", &x, &[(503, "DependencyTimeoutException")]);
    let a = c.alibaba(&slow).await;
    assert_store_envelope("Alibaba, database slow", &a, &[(503, "ServiceUnavailableTemporary")]);
    println!("database slow: XKS {} after {:?}; Alibaba {} after {:?}", x.status, x.took, a.status, a.took);
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    assert_ok("XKS once the lock is released", &c.xks(&slow).await);
    assert_ok("Alibaba once the lock is released", &c.alibaba(&slow).await);
    drop(blocker);

    for server in &servers {
        let log = server.log_text();
        assert!(!log.contains("panicked"), "{log}");
        for secret in [xks.secret.as_str(), "fault probe"] {
            assert!(!log.contains(secret), "the log must not contain secrets or plaintext");
        }
    }
    drop(servers);
    tokio::task::spawn_blocking(move || cluster.stop(StopMode::Fast)).await.unwrap();
}

//! The `kmsgate` binary over real sockets and real processes: the embedded default, probes, request ids,
//! TLS with ALPN, mutual TLS with subject pinning, graceful shutdown, configuration sources, and the CLI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_kmsgate");

/// A running `kmsgate serve`, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
    banner: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kmsgate(cwd: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(cwd).env_remove("KMSGATE_KEK").env_remove("KMSGATE_CONFIG").env("KMSGATE_LOG", "warn");
    // Tests run in parallel: every server gets its own ephemeral admin port, not the fixed default.
    c.env("KMSGATE_ADMIN__BIND", "127.0.0.1:0");
    c
}

/// Starts `kmsgate serve` on an ephemeral port and reads the address from its banner.
fn start(cwd: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Server {
    let mut cmd = kmsgate(cwd);
    cmd.arg("serve").args(extra).stdout(Stdio::piped()).stderr(Stdio::piped());
    if !extra.contains(&"--bind")
        && !envs.iter().any(|(k, _)| *k == "KMSGATE_SERVER__BIND")
        && !extra.contains(&"--config")
    {
        cmd.args(["--bind", "127.0.0.1:0"]);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn kmsgate");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut banner = String::new();
    let addr = loop {
        let Some(Ok(line)) = lines.next() else {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
            panic!("kmsgate exited before listening: {banner}\n{err}");
        };
        banner.push_str(&line);
        banner.push('\n');
        if let Some(rest) = line.trim().strip_prefix("listening:") {
            let url = rest.split_whitespace().next().unwrap();
            let hostport = url.split("://").nth(1).unwrap();
            break hostport.parse::<SocketAddr>().unwrap();
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server { child, addr, banner }
}

fn run_cli(cwd: &Path, args: &[&str]) -> (i32, String, String) {
    let out = kmsgate(cwd).args(args).output().expect("run kmsgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cli_json(cwd: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = run_cli(cwd, &all);
    assert_eq!(code, 0, "kmsgate {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test]
async fn embedded_default_serves_probes_and_stops_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path(), &[], &[]);
    assert!(server.banner.contains("embedded default"), "{}", server.banner);
    assert!(server.banner.contains("generated now"), "{}", server.banner);

    let data = dir.path().join("kmsgate-data");
    assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(data.join("kek")).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(data.join("kmsgate.db").exists());

    let r = common::http(server.addr, "GET", "/healthz", b"").await;
    assert_eq!(r.status, 200);
    assert!(r.headers.contains_key("x-request-id"));
    let r = common::http(server.addr, "GET", "/readyz", b"").await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let body = r.json();
    assert_eq!(body["store"], "ok");
    assert_eq!(body["backends"][0]["status"], "ACTIVE");

    // The caller's request id is echoed.
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut req = common::request("GET", "x", "/healthz", b"");
    req.headers_mut().insert("x-request-id", "req-12345".parse().unwrap());
    let r = common::send_on(stream, false, req).await.unwrap();
    assert_eq!(r.headers["x-request-id"], "req-12345");

    let r = common::http(server.addr, "GET", "/no/such/route", b"").await;
    assert_eq!(r.status, 404);
    r.json();

    // SIGTERM: exits cleanly.
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "kmsgate did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A second start reuses the data and the root key.
    let again = start(dir.path(), &[], &[]);
    assert!(!again.banner.contains("generated now"), "{}", again.banner);
}

#[tokio::test]
async fn environment_overrides_configuration() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("k.toml"), "default_tenant = \"acme\"\n[server]\nbind = \"127.0.0.1:1\"\n").unwrap();
    let server = start(dir.path(), &["--config", "k.toml"], &[("KMSGATE_SERVER__BIND", "127.0.0.1:0")]);
    assert!(server.banner.contains("tenant:    acme"), "{}", server.banner);
    assert_eq!(common::http(server.addr, "GET", "/healthz", b"").await.status, 200);

    let (code, _, err) = run_cli(dir.path(), &["--config", "k.toml", "keys", "list"]);
    assert_eq!(code, 0, "{err}");
    std::fs::write(dir.path().join("bad.toml"), "[server]\nbnid = 1\n").unwrap();
    let (code, _, err) = run_cli(dir.path(), &["--config", "bad.toml", "keys", "list"]);
    assert_ne!(code, 0);
    assert!(err.contains("bnid"), "{err}");
}

#[tokio::test]
async fn cli_manages_keys_and_aliases() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let k = cli_json(
        p,
        &[
            "keys",
            "create",
            "--spec",
            "AES_256",
            "--alias",
            "alias/pay",
            "--tag",
            "team=pay",
            "--description",
            "payments",
        ],
    );
    let id = k["id"].as_str().unwrap().to_owned();
    assert_eq!(k["usage"], serde_json::json!(["ENCRYPT", "DECRYPT"]));
    assert_eq!(k["state"], "Enabled");
    assert_eq!(k["aliases"], serde_json::json!(["alias/pay"]));
    assert_eq!(k["tags"]["team"], "pay");

    let enc_only = cli_json(p, &["keys", "create", "--usage", "encrypt"]);
    assert_eq!(enc_only["usage"], serde_json::json!(["ENCRYPT"]));
    let none = cli_json(p, &["keys", "create", "--usage", "none"]);
    assert_eq!(none["usage"], serde_json::json!([]));
    let ec = cli_json(p, &["keys", "create", "--spec", "EC_P256"]);
    assert_eq!(ec["usage"], serde_json::json!(["SIGN", "VERIFY"]));

    assert_eq!(cli_json(p, &["keys", "describe", "alias/pay"])["id"], id.as_str());
    assert_eq!(cli_json(p, &["keys", "disable", &id])["state"], "Disabled");
    assert_eq!(cli_json(p, &["keys", "enable", &id])["state"], "Enabled");
    let sched = cli_json(p, &["keys", "schedule-deletion", &id, "--days", "7"]);
    assert_eq!(sched["state"], "PendingDeletion");
    assert!(sched["deletion_at"].is_string());
    assert_eq!(cli_json(p, &["keys", "cancel-deletion", &id])["state"], "Disabled");
    let enc_id = enc_only["id"].as_str().unwrap();
    cli_json(p, &["keys", "schedule-deletion", enc_id]);
    assert_eq!(cli_json(p, &["keys", "cancel-deletion", "--enable", enc_id])["state"], "Enabled");
    let (code, _, err) = run_cli(p, &["keys", "cancel-deletion", enc_id]);
    assert_ne!(code, 0, "cancelling a deletion that is not scheduled fails");
    assert!(err.contains("not pending deletion"), "{err}");
    cli_json(p, &["keys", "enable", &id]);
    let rotated = cli_json(p, &["keys", "rotate", &id]);
    assert_eq!(rotated["versions"].as_array().unwrap().len(), 2);

    let listed = cli_json(p, &["keys", "list"]);
    assert_eq!(listed["keys"].as_array().unwrap().len(), 4);
    let page = cli_json(p, &["keys", "list", "--limit", "3"]);
    assert_eq!(page["keys"].as_array().unwrap().len(), 3);
    let rest = cli_json(p, &["keys", "list", "--after", page["next"].as_str().unwrap()]);
    assert_eq!(rest["keys"].as_array().unwrap().len(), 1);

    cli_json(p, &["aliases", "create", "alias/other", &id]);
    cli_json(p, &["aliases", "update", "alias/other", ec["id"].as_str().unwrap()]);
    let aliases = cli_json(p, &["aliases", "list"]);
    assert_eq!(aliases["aliases"].as_array().unwrap().len(), 2);
    cli_json(p, &["aliases", "delete", "alias/other"]);
    assert_eq!(cli_json(p, &["aliases", "list"])["aliases"].as_array().unwrap().len(), 1);

    // Human output.
    let (code, out, _) = run_cli(p, &["keys", "list"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("ID"), "{out}");
    assert!(out.contains("alias/pay"));
}

#[tokio::test]
async fn cli_refuses_bad_input_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let k = cli_json(p, &["keys", "create", "--alias", "alias/a"]);
    let id = k["id"].as_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["keys", "create", "--spec", "AES_512"], "unknown key spec"),
        (&["keys", "create", "--usage", "encrypt,fly"], "unknown key usage"),
        (&["keys", "create", "--spec", "EC_P256", "--usage", "encrypt"], "can only have"),
        (&["keys", "create", "--alias", "nope"], "alias/"),
        (&["keys", "create", "--alias", "alias/a"], "exists"),
        (&["keys", "create", "--tag", "novalue"], "key=value"),
        (&["keys", "create", "--id", "bad id!"], "key id"),
        (&["keys", "describe", "missing-key"], "does not exist"),
        (&["keys", "schedule-deletion", id, "--days", "2"], "7 to 366"),
        (&["aliases", "create", "alias/b", "missing-key"], "does not exist"),
        (&["aliases", "delete", "alias/none"], "does not exist"),
        (&["keys", "enable", id], ""),
    ];
    for (args, needle) in cases {
        let (code, _, err) = run_cli(p, args);
        if args[1] == "enable" {
            assert_eq!(code, 0, "enabling an enabled key is a no-op: {err}");
            continue;
        }
        assert_ne!(code, 0, "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let listed = cli_json(p, &["keys", "list"]);
    assert_eq!(listed["keys"].as_array().unwrap().len(), 1, "nothing was created by failed commands");
    assert_eq!(cli_json(p, &["aliases", "list"])["aliases"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn root_key_is_required_for_existing_keys() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    cli_json(p, &["keys", "create"]);
    let kek = p.join("kmsgate-data/kek");
    let saved = std::fs::read(&kek).unwrap();
    std::fs::remove_file(&kek).unwrap();
    let (code, _, err) = run_cli(p, &["keys", "list"]);
    assert_ne!(code, 0);
    assert!(err.contains("root key") && err.contains("missing"), "{err}");
    assert!(!kek.exists(), "no new root key was minted over existing keys");
    std::fs::write(&kek, b"not base64 at all").unwrap();
    let (code, _, err) = run_cli(p, &["keys", "list"]);
    assert_ne!(code, 0);
    assert!(err.contains("root key"), "{err}");
    std::fs::write(&kek, saved).unwrap();
    assert_eq!(run_cli(p, &["keys", "list"]).0, 0);
}

/// Test PKI: a CA, a server certificate for localhost, and client certificates.
struct Pki {
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_der: rustls::pki_types::CertificateDer<'static>,
}

impl Pki {
    fn new(cn: &str) -> Pki {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        let ca_der = cert.der().clone();
        Pki { ca: rcgen::Issuer::new(params, key), ca_der }
    }

    fn ca_pem(&self) -> String {
        pem(&self.ca_der)
    }

    /// A leaf certificate (PEM cert, PEM key) with the given SAN names and CN.
    fn leaf(&self, names: &[&str], cn: &str, client: bool, expired: bool) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n"))
}

fn client_config(ca_pem: &str, identity: Option<(&str, &str)>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match identity {
        None => b.with_no_client_auth(),
        Some((cert, key)) => {
            let certs =
                rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes()).map(Result::unwrap).collect();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            b.with_client_auth_cert(certs, key).unwrap()
        }
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

#[tokio::test]
async fn tls_with_alpn_and_mutual_tls_subject_pinning() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let server_pki = Pki::new("kmsgate test server CA");
    let client_pki = Pki::new("kmsgate test client CA");
    let (cert, key) = server_pki.leaf(&["localhost"], "localhost", false, false);
    std::fs::write(p.join("server.pem"), cert).unwrap();
    std::fs::write(p.join("server.key"), key).unwrap();
    std::fs::write(p.join("clients.pem"), client_pki.ca_pem()).unwrap();
    std::fs::write(
        p.join("tls.toml"),
        "[server]\nbind = \"127.0.0.1:0\"\n[server.tls]\ncert = \"server.pem\"\nkey = \"server.key\"\n\
         client_ca = \"clients.pem\"\nclient_subjects = [\"cks.kms.eu-west-1.amazonaws.com\"]\n",
    )
    .unwrap();
    let server = start(p, &["--config", "tls.toml"], &[]);
    assert!(server.banner.contains("https://"), "{}", server.banner);
    let ca = server_pki.ca_pem();

    let good = client_pki.leaf(&["cks.kms.eu-west-1.amazonaws.com"], "cks.kms.eu-west-1.amazonaws.com", true, false);
    let by_cn_only = client_pki.leaf(&[], "cks.kms.eu-west-1.amazonaws.com", true, false);
    let wrong_subject = client_pki.leaf(&["someone.else.example"], "someone.else.example", true, false);
    let expired = client_pki.leaf(&["cks.kms.eu-west-1.amazonaws.com"], "cks.kms.eu-west-1.amazonaws.com", true, true);
    let stranger_pki = Pki::new("cks.kms.eu-west-1.amazonaws.com");
    let other_ca =
        stranger_pki.leaf(&["cks.kms.eu-west-1.amazonaws.com"], "cks.kms.eu-west-1.amazonaws.com", true, false);

    for (alpn, want) in [(&[&b"h2"[..], b"http/1.1"][..], &b"h2"[..]), (&[&b"http/1.1"[..]][..], &b"http/1.1"[..])] {
        let r = common::https(server.addr, client_config(&ca, Some((&good.0, &good.1)), alpn), "localhost", "/healthz")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.alpn.as_deref(), Some(want));
    }
    let r = common::https(
        server.addr,
        client_config(&ca, Some((&by_cn_only.0, &by_cn_only.1)), &[b"h2"]),
        "localhost",
        "/healthz",
    )
    .await;
    assert_eq!(r.unwrap().status, 200, "the subject CN is accepted too");

    let refused = [
        ("no certificate", client_config(&ca, None, &[b"h2"])),
        ("wrong subject", client_config(&ca, Some((&wrong_subject.0, &wrong_subject.1)), &[b"h2"])),
        ("expired", client_config(&ca, Some((&expired.0, &expired.1)), &[b"h2"])),
        ("another CA", client_config(&ca, Some((&other_ca.0, &other_ca.1)), &[b"h2"])),
    ];
    for (what, cfg) in refused {
        let r = common::https(server.addr, cfg, "localhost", "/healthz").await;
        assert!(r.is_err(), "{what}: the handshake must fail, got {r:?}");
    }
}

/// The same binary on PostgreSQL: the CLI writes through one process, a server in another sees it, and
/// readiness probes the database for real.
#[tokio::test]
async fn runs_on_postgresql() {
    let base =
        std::env::var("KMSGATE_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!("kmsgate_srv_{}_{}", std::process::id(), uuid::Uuid::new_v4().simple());
    let psql = |sql: &str| {
        let out =
            Command::new("psql").args([base.as_str(), "-qAtc", sql]).output().expect("psql (scripts/test installs it)");
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    };
    psql(&format!("CREATE SCHEMA {schema}"));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
    std::fs::write(p.join("pg.toml"), format!("[store]\nurl = \"{url}\"\n[server]\nbind = \"127.0.0.1:0\"\n")).unwrap();
    let k = cli_json(p, &["--config", "pg.toml", "keys", "create", "--alias", "alias/on-pg"]);
    let server = start(p, &["--config", "pg.toml"], &[]);
    assert!(server.banner.contains("postgres://"), "{}", server.banner);
    let r = common::http(server.addr, "GET", "/readyz", b"").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let listed = cli_json(p, &["--config", "pg.toml", "keys", "list"]);
    assert_eq!(listed["keys"][0]["id"], k["id"]);
    drop(server);
    psql(&format!("DROP SCHEMA {schema} CASCADE"));
}

/// `kmsgate store migrate`: an embedded installation moves to PostgreSQL and keeps working there with the
/// same root key; a second migration into the now non-empty database is refused.
#[tokio::test]
async fn store_migrate_from_sqlite_to_postgresql() {
    let base =
        std::env::var("KMSGATE_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!("kmsgate_mig_{}_{}", std::process::id(), uuid::Uuid::new_v4().simple());
    let psql = |sql: &str| {
        let out = Command::new("psql").args([base.as_str(), "-qAtc", sql]).output().expect("psql");
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    };
    psql(&format!("CREATE SCHEMA {schema}"));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let k = cli_json(p, &["keys", "create", "--alias", "alias/moving"]);
    cli_json(p, &["keys", "create", "--spec", "EC_P256"]);
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
    std::fs::write(p.join("pg.toml"), format!("[store]\nurl = \"{url}\"\n")).unwrap();
    let db = format!("sqlite://{}", p.join("kmsgate-data/kmsgate.db").display());
    let report = cli_json(p, &["--config", "pg.toml", "store", "migrate", "--from", &db]);
    assert_eq!(report["copied"]["keys"], 2, "{report}");
    assert_eq!(report["copied"]["aliases"], 1, "{report}");
    let moved = cli_json(p, &["--config", "pg.toml", "keys", "describe", "alias/moving"]);
    assert_eq!(moved["id"], k["id"]);
    let rotated = cli_json(p, &["--config", "pg.toml", "keys", "rotate", "alias/moving"]);
    assert_eq!(rotated["versions"].as_array().unwrap().len(), 2, "the copied key works under the same root key");
    let (code, _, err) = run_cli(p, &["--config", "pg.toml", "store", "migrate", "--from", &db]);
    assert_ne!(code, 0);
    assert!(err.contains("not empty"), "{err}");
    psql(&format!("DROP SCHEMA {schema} CASCADE"));
}

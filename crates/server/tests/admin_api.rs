//! The online admin API on the admin listener, driven by the real CLI (`kmsgate --server URL ...`) and by raw
//! HTTP: a change made through it reaches the running server's data path at once (a disabled key is refused by
//! the very next XKS request, with the change feed's poll set far beyond the test), a missing or wrong token is
//! 401 in the API's JSON envelope, every route's refusals have their status and code, and each change is
//! audited as the `admin` frontend and counted in the request metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::process::{BIN, cli_json, cli_ok, toml_str};
use common::wire::{XksCred, xks_encrypt};
use http_body_util::Full;
use hyper::body::Bytes;
use serde_json::{Value, json};

struct Server {
    child: std::process::Child,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr_of(line: &str, label: &str) -> Option<SocketAddr> {
    let url = line.trim().strip_prefix(label)?.split_whitespace().next()?;
    url.split("://").nth(1)?.parse().ok()
}

fn start(cwd: &Path, cfg: &Path) -> Server {
    let mut child = Command::new(BIN)
        .current_dir(cwd)
        .env_remove("KMSGATE_KEK")
        .env_remove("KMSGATE_SERVER")
        .env_remove("KMSGATE_ADMIN_TOKEN")
        .env("KMSGATE_LOG", "warn")
        .args(["--config", cfg.to_str().unwrap(), "serve", "--admin-bind", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut admin = None;
    let addr = loop {
        let Some(Ok(line)) = lines.next() else { panic!("kmsgate exited before listening") };
        if let Some(a) = addr_of(&line, "admin:") {
            admin = Some(a);
        }
        if let Some(a) = addr_of(&line, "listening:") {
            break a;
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Server { child, addr, admin: admin.unwrap() }
}

/// The CLI through the admin API: (exit code, stdout, stderr).
fn remote(cwd: &Path, cfg: &Path, server: &Server, token: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut c = Command::new(BIN);
    c.current_dir(cwd)
        .env_remove("KMSGATE_KEK")
        .env_remove("KMSGATE_ADMIN_TOKEN")
        .env("KMSGATE_LOG", "warn")
        .env("KMSGATE_SERVER", format!("http://{}", server.admin))
        .args(["--config", cfg.to_str().unwrap()])
        .args(args);
    if let Some(t) = token {
        c.env("KMSGATE_ADMIN_TOKEN", t);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn remote_json(cwd: &Path, cfg: &Path, server: &Server, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = remote(cwd, cfg, server, None, &all);
    assert_eq!(code, 0, "kmsgate --server {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// One admin API call with an optional bearer token: (status, JSON body, headers).
async fn call(
    admin: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, Value, hyper::HeaderMap) {
    let mut b = hyper::Request::builder().method(method).uri(path).header("host", admin.to_string());
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    let req = b.body(Full::new(Bytes::from(body.unwrap_or("").to_owned()))).unwrap();
    let r = common::send_on(tokio::net::TcpStream::connect(admin).await.unwrap(), false, req).await.unwrap();
    let v = if r.body.is_empty() { Value::Null } else { r.json() };
    (r.status, v, r.headers)
}

fn config(p: &Path) -> PathBuf {
    let cfg = p.join("kmsgate.toml");
    // The change feed is polled far less often than the test runs: whatever the server sees at once, it saw
    // through its own dispatcher.
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {data}\n[server]\nbind = \"127.0.0.1:0\"\nchange_poll_ms = 600000\n\
             [audit]\ndestination = \"file\"\npath = {audit}\n",
            data = toml_str(&p.join("data").display().to_string()),
            audit = toml_str(&p.join("audit.log").display().to_string()),
        ),
    )
    .unwrap();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_a_running_server_through_the_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let cfg = config(p);
    // Set up before the server starts (the store's own CLI): an all-keys XKS key store with a credential, and
    // an Alibaba ClientKey.
    cli_json(p, &cfg, &["xks", "stores", "create", "--name", "online", "--prefix", "/online", "--all-keys"]);
    let cred = XksCred::from_file(
        &serde_json::from_str(&cli_ok(p, &cfg, &["xks", "credentials", "create", "--store", "online"])).unwrap(),
    );
    let second = XksCred::from_file(
        &serde_json::from_str(&cli_ok(p, &cfg, &["xks", "credentials", "create", "--store", "online"])).unwrap(),
    );
    let ck =
        cli_json(p, &cfg, &["alibaba", "client-keys", "create", "--identity", "app", "--out-dir", p.to_str().unwrap()]);
    let ck_id = ck["id"].as_str().unwrap().to_owned();

    let server = start(p, &cfg);
    let token_file = p.join("data/admin.token");
    let token = std::fs::read_to_string(&token_file).unwrap().trim().to_owned();
    assert_eq!(std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(token.len() >= 40, "{token}");

    // Create and list through the server.
    let key = remote_json(p, &cfg, &server, &["keys", "create", "--alias", "alias/online", "--tag", "team=pay"]);
    let id = key["id"].as_str().unwrap().to_owned();
    assert_eq!(key["state"], "Enabled");
    assert_eq!(key["aliases"], json!(["alias/online"]));
    let listed = remote_json(p, &cfg, &server, &["keys", "list"]);
    assert!(listed["keys"].as_array().unwrap().iter().any(|k| k["id"] == id.as_str()), "{listed}");
    let described = remote_json(p, &cfg, &server, &["keys", "describe", "alias/online"]);
    assert_eq!(described["id"], id.as_str());
    assert_eq!(described["tags"]["team"], "pay");
    let (code, text, _) = remote(p, &cfg, &server, None, &["keys", "list"]);
    assert_eq!(code, 0);
    assert!(text.contains(&id) && text.contains("alias/online"), "{text}");

    // XKS serves the new key, and refuses it the moment it is disabled through the API.
    assert_eq!(xks_encrypt(server.addr, &cred, &id, b"before").await.status, 200);
    let disabled = remote_json(p, &cfg, &server, &["keys", "disable", &id]);
    assert_eq!(disabled["state"], "Disabled");
    let r = xks_encrypt(server.addr, &cred, &id, b"after").await;
    assert_eq!(
        (r.status, r.json()["errorName"].as_str().unwrap().to_owned()),
        (400, "InvalidStateException".to_owned())
    );
    assert_eq!(remote_json(p, &cfg, &server, &["keys", "enable", &id])["state"], "Enabled");
    assert_eq!(xks_encrypt(server.addr, &cred, &id, b"again").await.status, 200);
    let rotated = remote_json(p, &cfg, &server, &["keys", "rotate", &id]);
    assert_eq!(rotated["versions"].as_array().unwrap().len(), 2);

    // Aliases.
    let other = remote_json(p, &cfg, &server, &["keys", "create"])["id"].as_str().unwrap().to_owned();
    let e = remote_json(p, &cfg, &server, &["aliases", "create", "alias/second", &id]);
    assert_eq!(e["key_id"], id.as_str());
    let e = remote_json(p, &cfg, &server, &["aliases", "update", "alias/second", &other]);
    assert_eq!(e["key_id"], other.as_str());
    let list = remote_json(p, &cfg, &server, &["aliases", "list", "--key", &other]);
    assert_eq!(list["aliases"].as_array().unwrap().len(), 1, "{list}");
    remote_json(p, &cfg, &server, &["aliases", "delete", "alias/second"]);
    let list = remote_json(p, &cfg, &server, &["aliases", "list"]);
    let names: Vec<&str> = list["aliases"].as_array().unwrap().iter().map(|e| e["alias"].as_str().unwrap()).collect();
    assert!(names.contains(&"alias/online") && !names.contains(&"alias/second"), "{list}");

    // Deletion scheduling and its cancellation.
    let pending = remote_json(p, &cfg, &server, &["keys", "schedule-deletion", &other, "--days", "7"]);
    assert_eq!(pending["state"], "PendingDeletion");
    assert!(pending["deletion_at"].is_string());
    let back = remote_json(p, &cfg, &server, &["keys", "cancel-deletion", &other]);
    assert_eq!(back["state"], "Disabled");

    // XKS credentials: listed, and a revoked one is refused at once while the other still works.
    let creds = remote_json(p, &cfg, &server, &["xks", "credentials", "list", "--store", "online"]);
    assert_eq!(creds["credentials"].as_array().unwrap().len(), 2, "{creds}");
    let stores = remote_json(p, &cfg, &server, &["xks", "stores", "list"]);
    assert_eq!(stores["stores"][0]["name"], "online");
    remote_json(p, &cfg, &server, &["xks", "credentials", "revoke", &cred.akid]);
    let r = xks_encrypt(server.addr, &cred, &id, b"revoked").await;
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(xks_encrypt(server.addr, &second, &id, b"second").await.status, 200);

    // Alibaba ClientKeys.
    let cks = remote_json(p, &cfg, &server, &["alibaba", "client-keys", "list"]);
    assert_eq!(cks["client_keys"][0]["id"], ck_id.as_str());
    remote_json(p, &cfg, &server, &["alibaba", "client-keys", "revoke", &ck_id]);
    let cks = remote_json(p, &cfg, &server, &["alibaba", "client-keys", "list"]);
    assert_eq!(cks["client_keys"][0]["revoked"], true, "{cks}");

    // HSM status: this server has no PKCS#11 members.
    assert_eq!(remote_json(p, &cfg, &server, &["hsm", "status"])["members"], json!([]));

    // Commands that stay with the store's CLI say so.
    let (code, _, err) = remote(p, &cfg, &server, None, &["xks", "credentials", "create", "--store", "online"]);
    assert_ne!(code, 0);
    assert!(err.contains("not available through --server"), "{err}");

    // A wrong token: the CLI fails with the server's 401.
    let (code, _, err) = remote(p, &cfg, &server, Some("kmsgate_not-the-token-at-all"), &["keys", "list"]);
    assert_ne!(code, 0);
    assert!(err.contains("401 unauthorized"), "{err}");

    // Every change above is audited as the admin frontend by the admin API identity.
    let audit = std::fs::read_to_string(p.join("audit.log")).unwrap();
    let disable = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["operation"] == "DisableKey")
        .unwrap_or_else(|| panic!("no DisableKey record: {audit}"));
    assert_eq!(disable["frontend"], "admin");
    assert_eq!(disable["identity"], "admin-api");
    assert!(!audit.contains(&token), "the admin token is never audited");

    // And counted.
    let metrics = common::http(server.admin, "GET", "/metrics", b"").await;
    let text = String::from_utf8(metrics.body).unwrap();
    assert!(
        text.contains("kmsgate_requests_total{frontend=\"admin\",operation=\"DisableKey\",code=\"ok\"} 1"),
        "{text}"
    );
    assert!(text.contains("kmsgate_requests_total{frontend=\"admin\",operation=\"unknown\",code=\"unauthorized\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_of_the_admin_api_are_json_with_their_status() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let cfg = config(p);
    let server = start(p, &cfg);
    let a = server.admin;
    let token = std::fs::read_to_string(p.join("data/admin.token")).unwrap().trim().to_owned();
    let t = Some(token.as_str());

    // Authentication.
    let (s, v, h) = call(a, None, "GET", "/v1/keys", None).await;
    assert_eq!((s, v["error"]["code"].as_str().unwrap()), (401, "unauthorized"), "{v}");
    assert_eq!(h.get("www-authenticate").unwrap(), "Bearer");
    let (s, v, _) = call(a, Some("kmsgate_wrong"), "GET", "/v1/keys", None).await;
    assert_eq!((s, v["error"]["code"].as_str().unwrap()), (401, "unauthorized"));
    let (s, v, _) = call(a, Some(&token[..token.len() - 1]), "POST", "/v1/keys", Some("{}")).await;
    assert_eq!(s, 401, "a prefix of the token is not the token: {v}");
    // The probes need no token.
    assert_eq!(call(a, None, "GET", "/healthz", None).await.0, 200);

    let (s, key, _) = call(a, t, "POST", "/v1/keys", Some(r#"{"aliases":["alias/x"]}"#)).await;
    assert_eq!(s, 201, "{key}");
    let id = key["id"].as_str().unwrap().to_owned();

    let expect = |got: (u16, Value, hyper::HeaderMap), status: u16, code: &str| {
        assert_eq!((got.0, got.1["error"]["code"].as_str().unwrap_or("")), (status, code), "{}", got.1);
        assert!(got.1["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    };
    let unknown = "00000000-0000-4000-8000-000000000000";
    expect(call(a, t, "GET", &format!("/v1/keys/{unknown}"), None).await, 404, "key_not_found");
    expect(call(a, t, "GET", "/v1/keys/alias%2Fnope", None).await, 404, "key_not_found");
    expect(call(a, t, "GET", "/v1/keys/bad%20id", None).await, 400, "invalid_request");
    expect(call(a, t, "POST", "/v1/keys", Some(r#"{"spec":"AES_512"}"#)).await, 400, "invalid_request");
    expect(call(a, t, "POST", "/v1/keys", Some(r#"{"spec":"AES_256","colour":"red"}"#)).await, 400, "invalid_request");
    expect(call(a, t, "POST", "/v1/keys", Some("{not json")).await, 400, "invalid_request");
    expect(call(a, t, "POST", "/v1/keys", Some(r#"{"spec":"AES_256","usage":"sign"}"#)).await, 400, "invalid_request");
    expect(call(a, t, "POST", "/v1/keys", Some(r#"{"aliases":["alias/x"]}"#)).await, 409, "already_exists");
    expect(call(a, t, "POST", &format!("/v1/keys/{id}/explode"), None).await, 404, "unknown_operation");
    expect(
        call(a, t, "POST", &format!("/v1/keys/{id}/schedule-deletion"), Some(r#"{"days":3}"#)).await,
        400,
        "invalid_request",
    );
    expect(call(a, t, "POST", &format!("/v1/keys/{id}/cancel-deletion"), None).await, 409, "invalid_key_state");
    expect(call(a, t, "DELETE", "/v1/keys", None).await, 405, "method_not_allowed");
    expect(call(a, t, "GET", "/v1/keys?limit=0", None).await, 400, "invalid_request");
    expect(call(a, t, "GET", "/v1/keys?colour=red", None).await, 400, "invalid_request");
    expect(call(a, t, "GET", "/v1/keys?after=%zz", None).await, 400, "invalid_request");
    expect(call(a, t, "POST", "/v1/aliases", Some(r#"{"key":"x"}"#)).await, 400, "invalid_request");
    expect(
        call(a, t, "POST", "/v1/aliases", Some(&format!(r#"{{"alias":"alias/y","key":"{unknown}"}}"#))).await,
        404,
        "key_not_found",
    );
    expect(call(a, t, "DELETE", "/v1/aliases/alias/none", None).await, 404, "alias_not_found");
    expect(
        call(a, t, "PUT", "/v1/aliases/alias/x", Some(r#"{"alias":"alias/z","key":"x"}"#)).await,
        400,
        "invalid_request",
    );
    expect(call(a, t, "POST", "/v1/xks/credentials/AKIANOSUCHCREDENTIAL/revoke", None).await, 400, "invalid_request");
    expect(call(a, t, "POST", "/v1/alibaba/client-keys/KAAP.nope/revoke", None).await, 400, "invalid_request");

    // Another tenant sees none of the default tenant's keys; a malformed tenant is refused.
    let mut b = hyper::Request::builder().method("GET").uri("/v1/keys").header("host", a.to_string());
    b = b.header("authorization", format!("Bearer {token}")).header("x-kmsgate-tenant", "other");
    let r = common::send_on(
        tokio::net::TcpStream::connect(a).await.unwrap(),
        false,
        b.body(Full::new(Bytes::new())).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["keys"], json!([]));
    let mut b = hyper::Request::builder().method("GET").uri("/v1/keys").header("host", a.to_string());
    b = b.header("authorization", format!("Bearer {token}")).header("x-kmsgate-tenant", "no spaces allowed");
    let r = common::send_on(
        tokio::net::TcpStream::connect(a).await.unwrap(),
        false,
        b.body(Full::new(Bytes::new())).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.json()["error"]["code"].as_str().unwrap().to_owned()), (400, "invalid_request".to_owned()));

    // The admin API is off with admin.api = false: the routes do not exist.
    drop(server);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("[admin]\napi = false\n");
    std::fs::write(&cfg, text).unwrap();
    let server = start(p, &cfg);
    let (s, _, _) = call(server.admin, t, "GET", "/v1/keys", None).await;
    assert_eq!(s, 404);
}

/// A CA and a `localhost` server certificate signed by it: (CA PEM path, cert path, key path).
fn admin_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(rcgen::DnType::CommonName, "kmsgate admin API test CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let paths = (dir.join("admin-ca.pem"), dir.join("admin.pem"), dir.join("admin.key"));
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reaches_an_admin_listener_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let cfg = config(p);
    let (ca, cert, key) = admin_pki(p);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "[admin.tls]\ncert = {}\nkey = {}\n",
        toml_str(&cert.display().to_string()),
        toml_str(&key.display().to_string())
    ));
    std::fs::write(&cfg, text).unwrap();
    let server = start(p, &cfg);
    let url = format!("https://localhost:{}", server.admin.port());
    let run = |ca: Option<&Path>, args: &[&str]| {
        let mut c = Command::new(BIN);
        c.current_dir(p)
            .env_remove("KMSGATE_KEK")
            .env_remove("KMSGATE_ADMIN_TOKEN")
            .env_remove("KMSGATE_SERVER_CA")
            .env("KMSGATE_LOG", "warn")
            .args(["--config", cfg.to_str().unwrap(), "--server", &url])
            .args(args);
        if let Some(ca) = ca {
            c.env("KMSGATE_SERVER_CA", ca);
        }
        let out = c.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(Some(&ca), &["--json", "keys", "create", "--alias", "alias/tls"]);
    assert_eq!(code, 0, "{err}");
    let key: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(key["aliases"], json!(["alias/tls"]));

    // Without the CA the CLI says what it needs; with another CA the handshake fails.
    let (code, _, err) = run(None, &["keys", "list"]);
    assert_ne!(code, 0);
    assert!(err.contains("KMSGATE_SERVER_CA"), "{err}");
    let (other_ca, _, _) = admin_pki(&p.join("data"));
    let (code, _, err) = run(Some(&other_ca), &["keys", "list"]);
    assert_ne!(code, 0);
    assert!(err.contains("TLS to localhost"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_status_through_the_server_shows_its_own_pkcs11_members() {
    let var = |n: &str| std::env::var(n).unwrap_or_else(|_| panic!("{n} is not set: run through ./scripts/test"));
    let _ = var("SOFTHSM2_CONF");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let cfg = config(p);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "[[backend.pkcs11]]\nname = \"hsm\"\nmodule = {}\ntoken_label = {}\npin_file = {}\nsessions = 2\n\
         deadline_ms = 5000\n",
        toml_str(
            &std::env::var("KMSGATE_TEST_P11_MODULE").unwrap_or_else(|_| "/usr/lib/softhsm/libsofthsm2.so".into())
        ),
        toml_str(&std::env::var("KMSGATE_TEST_P11_TOKEN").unwrap_or_else(|_| "kmsgate-test".into())),
        toml_str(&var("KMSGATE_TEST_P11_PIN_FILE")),
    ));
    std::fs::write(&cfg, text).unwrap();
    let server = start(p, &cfg);

    let status = remote_json(p, &cfg, &server, &["hsm", "status"]);
    let member = &status["members"][0];
    assert_eq!(member["name"], "hsm", "{status}");
    assert_eq!(member["health"]["status"], "ACTIVE", "{status}");
    assert_eq!(member["pool"]["size"], 2, "{status}");
    let (code, out, err) = remote(p, &cfg, &server, None, &["hsm", "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("hsm: ACTIVE"), "{out}");

    // A key created through the server in the HSM.
    let key = remote_json(p, &cfg, &server, &["keys", "create", "--backend", "hsm"]);
    assert_eq!(key["versions"][0]["backend"], "hsm", "{key}");
}

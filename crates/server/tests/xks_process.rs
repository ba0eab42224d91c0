//! XKS against the real `kmsgate` binary: the CLI in other processes manages key stores and credentials of a
//! running server (rotation without restart), the request log, and XKS over TLS with mutual TLS and HTTP/2.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
// The credential and its signed calls over plain HTTP/1.1 are the shared test module's.
use common::wire::{XKS_REGION as REGION, XksCred as Cred, xks_call as call};
use http_body_util::Full;
use hyper::body::Bytes;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_kmsgate");

struct Server {
    child: Child,
    addr: SocketAddr,
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

/// `kmsgate serve` on an ephemeral port; its log (stderr) goes to `log`.
fn start(cwd: &Path, extra: &[&str], log: &Path) -> Server {
    let mut cmd = kmsgate(cwd);
    cmd.arg("serve").args(extra).stdout(Stdio::piped()).stderr(std::fs::File::create(log).unwrap());
    if !extra.contains(&"--config") {
        cmd.args(["--bind", "127.0.0.1:0"]);
    }
    // Change polling a bit faster than the default so the test waits less; the mechanism is the same.
    cmd.env("KMSGATE_LOG", "info").env("KMSGATE_SERVER__CHANGE_POLL_MS", "200");
    let mut child = cmd.spawn().expect("spawn kmsgate");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let Some(Ok(line)) = lines.next() else {
            panic!("kmsgate exited before listening: {}", std::fs::read_to_string(log).unwrap_or_default());
        };
        if let Some(rest) = line.trim().strip_prefix("listening:") {
            let url = rest.split_whitespace().next().unwrap();
            break url.split("://").nth(1).unwrap().parse::<SocketAddr>().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Server { child, addr }
}

fn cli(cwd: &Path, args: &[&str]) -> (i32, String, String) {
    let out = kmsgate(cwd).args(args).output().expect("run kmsgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cli_ok(cwd: &Path, args: &[&str]) -> String {
    let (code, out, err) = cli(cwd, args);
    assert_eq!(code, 0, "kmsgate {args:?} failed: {err}");
    out
}

fn cli_json(cwd: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = cli_ok(cwd, &all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn cred_of(file: &Value) -> Cred {
    Cred::from_file(file)
}

fn signed(host: &str, path: &str, body: &[u8], cred: &Cred, with_host_header: bool) -> Vec<(String, String)> {
    let (date, auth) = kmsgate_xks::sigv4::sign(&kmsgate_xks::sigv4::ToSign {
        method: "POST",
        path,
        query: None,
        headers: &[("host", host), ("content-type", "application/json")],
        body,
        access_key_id: &cred.akid,
        secret: &cred.secret,
        region: REGION,
        service: "kms-xks-proxy",
        time: time::OffsetDateTime::now_utc(),
    });
    let mut h = vec![
        ("content-type".to_owned(), "application/json".to_owned()),
        ("x-amz-date".to_owned(), date),
        ("authorization".to_owned(), auth),
    ];
    if with_host_header {
        h.push(("host".to_owned(), host.to_owned()));
    }
    h
}

fn request(uri: &str, body: &[u8], headers: &[(String, String)]) -> hyper::Request<Full<Bytes>> {
    let mut b = hyper::Request::builder().method("POST").uri(uri);
    for (k, v) in headers {
        b = b.header(k.as_str(), v.as_str());
    }
    b.body(Full::new(Bytes::copy_from_slice(body))).unwrap()
}

fn health_body(request_id: &str) -> Value {
    json!({"requestMetadata": {"kmsOperation": "KmsHealthCheck", "kmsRequestId": request_id}})
}

fn md(op: &str, request_id: &str) -> Value {
    json!({
        "awsPrincipalArn": "arn:aws:iam::123456789012:user/LogProbe",
        "kmsKeyArn": "arn:aws:kms:eu-west-1:123456789012:key/1234abcd",
        "kmsOperation": op,
        "kmsRequestId": request_id,
    })
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Polls until `f` holds or `limit` passes.
async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn cli_manages_key_stores_and_credentials_of_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let key = cli_json(p, &["keys", "create", "--alias", "alias/xks-demo"]);
    let key_id = key["id"].as_str().unwrap().to_owned();
    let log = p.join("server.log");
    let mut server = start(p, &[], &log);
    let pid = server.child.id();

    // Key stores: create, refuse bad or conflicting input, list.
    let store = cli_json(
        p,
        &[
            "xks",
            "stores",
            "create",
            "--name",
            "demo",
            "--prefix",
            "/demo",
            "--keys",
            "alias/xks-demo",
            "--quota-rps",
            "1000",
        ],
    );
    assert_eq!(store["uri_path"], "/demo/kms/xks/v1");
    assert_eq!(store["tenant"], "default");
    cli_json(p, &["keys", "create", "--spec", "HMAC_256", "--alias", "alias/hmac"]);
    let refused: &[(&[&str], &str)] = &[
        (&["xks", "stores", "create", "--name", "demo", "--prefix", "/other", "--all-keys"], "already exists"),
        (&["xks", "stores", "create", "--name", "demo2", "--prefix", "/demo", "--all-keys"], "already used"),
        (&["xks", "stores", "create", "--name", "bad", "--prefix", "/bad prefix!", "--all-keys"], "--prefix"),
        (&["xks", "stores", "create", "--name", "bad", "--prefix", "/b", "--keys", "no-such-key"], "does not exist"),
        (&["xks", "stores", "create", "--name", "bad", "--prefix", "/b", "--keys", "alias/hmac"], "AES_256"),
        (
            &["xks", "stores", "create", "--name", "bad", "--prefix", "/b", "--keys", "x", "--all-keys"],
            "cannot be used",
        ),
        (&["xks", "stores", "create", "--name", "bad", "--prefix", "/b"], "required"),
        (&["xks", "credentials", "create", "--store", "nope"], "no XKS key store"),
        (&["xks", "credentials", "revoke", "AAAAAAAAAAAAAAAAAAAA"], "no XKS credential"),
    ];
    for (args, needle) in refused {
        let (code, _, err) = cli(p, args);
        assert_ne!(code, 0, "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let stores = cli_json(p, &["xks", "stores", "list"]);
    assert_eq!(stores["stores"].as_array().unwrap().len(), 1, "{stores}");
    assert!(cli_ok(p, &["xks", "stores", "list"]).contains("/demo/kms/xks/v1"));

    // A credential: exactly the AWS console's JSON file, in AWS's formats.
    let out = cli_ok(p, &["xks", "credentials", "create", "--store", "demo"]);
    let file: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(file.as_object().unwrap().len(), 2);
    assert_eq!(file["XksProxyUriPath"], "/demo/kms/xks/v1");
    assert_eq!(file["XksProxyAuthenticationCredential"].as_object().unwrap().len(), 2);
    let a = cred_of(&file);
    assert!(
        (20..=30).contains(&a.akid.len())
            && a.akid.bytes().all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
    );
    assert!((43..=64).contains(&a.secret.len()));
    assert_eq!(STANDARD.decode(&a.secret).unwrap().len(), 32);

    let r = call(server.addr, &a, "/health", &health_body("h-a")).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // Rotation: a second pair (written to a 0600 file), both work, the first is revoked and fails, and the
    // server never restarts.
    let out_file = p.join("xks-credential.json");
    let out = cli_json(p, &["xks", "credentials", "create", "--store", "demo", "--out", out_file.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(&out_file).unwrap().permissions().mode() & 0o777, 0o600);
    let b = cred_of(&serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap());
    assert_eq!(out["access_key_id"].as_str(), Some(b.akid.as_str()));
    assert!(!out.to_string().contains(&b.secret), "the secret goes to the file only");
    let (code, _, err) =
        cli(p, &["xks", "credentials", "create", "--store", "demo", "--out", out_file.to_str().unwrap()]);
    assert_ne!(code, 0, "an existing file is never overwritten");
    assert!(err.contains("exists"), "{err}");
    assert_ne!(a.akid, b.akid);
    for c in [&a, &b] {
        assert_eq!(call(server.addr, c, "/health", &health_body("both")).await.status, 200);
    }
    let listed = cli_ok(p, &["xks", "credentials", "list", "--store", "demo"]);
    assert!(listed.contains(&a.akid) && listed.contains(&b.akid), "{listed}");
    let listed_json = cli_json(p, &["xks", "credentials", "list"]).to_string();
    for secret in [&a.secret, &b.secret] {
        assert!(
            !listed.contains(secret.as_str()) && !listed_json.contains(secret.as_str()),
            "listings never show secrets"
        );
    }
    cli_json(p, &["xks", "credentials", "revoke", &a.akid]);
    let addr = server.addr;
    let revoked = eventually(Duration::from_secs(5), || {
        let a = a.clone();
        async move { call(addr, &a, "/health", &health_body("after-revoke")).await.status == 401 }
    })
    .await;
    assert!(revoked, "the revoked credential must fail within the change-poll interval");
    assert_eq!(call(server.addr, &b, "/health", &health_body("b-still")).await.status, 200);
    assert!(server.child.try_wait().unwrap().is_none(), "the server kept running");
    assert_eq!(server.child.id(), pid);
    assert!(!cli_ok(p, &["xks", "credentials", "list"]).contains(&a.akid));

    // Cryptography through the running server, and its request log.
    let pt = STANDARD.encode(b"log probe plaintext 0123456789");
    let aad = STANDARD.encode(b"log probe additional data");
    let enc = call(
        server.addr,
        &b,
        &format!("/keys/{key_id}/encrypt"),
        &json!({"requestMetadata": md("GenerateDataKey", "kms-req-4711"), "plaintext": pt, "encryptionAlgorithm": "AES_GCM",
                "additionalAuthenticatedData": aad}),
    )
    .await;
    assert_eq!(enc.status, 200, "{}", String::from_utf8_lossy(&enc.body));
    let denied = call(
        server.addr,
        &b,
        "/keys/no-such-key/metadata",
        &json!({"requestMetadata": md("CreateKey", "kms-req-4712")}),
    )
    .await;
    assert_eq!(denied.status, 404);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = strip_ansi(&std::fs::read_to_string(&log).unwrap());
    let xks_line = |id: &str| {
        text.lines()
            .find(|l| l.contains("xks request") && l.contains(id))
            .unwrap_or_else(|| panic!("no request log line for {id}:\n{text}"))
            .to_owned()
    };
    let line = xks_line("kms-req-4711");
    for field in [
        "uri_path=/demo/kms/xks/v1",
        &format!("key_id={key_id}"),
        "operation=\"Encrypt\"",
        "kms_operation=GenerateDataKey",
        "aws_principal_arn=arn:aws:iam::123456789012:user/LogProbe",
        &format!("access_key_id={}", b.akid),
        "outcome=\"ok\"",
        "latency_us=",
    ] {
        assert!(line.contains(field), "{field} missing from: {line}");
    }
    assert!(xks_line("kms-req-4712").contains("outcome=\"KeyNotFoundException\""));
    for secret in [pt.as_str(), aad.as_str(), "log probe", &b.secret, &a.secret] {
        assert!(!text.contains(secret), "the log must never contain plaintext, AAD or secrets ({secret})");
    }

    // Deleting the key store takes its prefix and credentials away without a restart.
    let deleted = cli_json(p, &["xks", "stores", "delete", "demo"]);
    assert_eq!(deleted["credentials_revoked"], json!([b.akid]));
    let gone = eventually(Duration::from_secs(5), || {
        let b = b.clone();
        async move {
            let r = call(addr, &b, "/health", &health_body("gone")).await;
            r.status == 404 && r.json()["errorName"] == "InvalidUriPathException"
        }
    })
    .await;
    assert!(gone);
    assert!(server.child.try_wait().unwrap().is_none());
    server.child.kill().unwrap();
}

// ---- TLS, mutual TLS and HTTP/2 ------------------------------------------------------------------------

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
        let b64 = STANDARD.encode(&self.ca_der);
        let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
        format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n"))
    }

    fn leaf(&self, names: &[&str], client: bool) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn client_config(ca_pem: &str, identity: Option<&(String, String)>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
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

/// One signed XKS call over TLS. On h2 the request carries only `:authority` (no Host header), which is
/// what the signature's `host` must then be checked against.
async fn tls_call(
    addr: SocketAddr,
    client: Arc<rustls::ClientConfig>,
    cred: &Cred,
    op: &str,
    body: &Value,
) -> Result<(common::Reply, Vec<u8>), String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost".to_owned()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(client).connect(name, stream).await.map_err(|e| e.to_string())?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec).unwrap_or_default();
    let h2 = alpn == b"h2";
    let authority = format!("localhost:{}", addr.port());
    let path = format!("{}{op}", cred.uri_path);
    let bytes = body.to_string().into_bytes();
    let headers = signed(&authority, &path, &bytes, cred, !h2);
    let uri = if h2 { format!("https://{authority}{path}") } else { path };
    let reply = common::send_on(tls, h2, request(&uri, &bytes, &headers)).await?;
    Ok((reply, alpn))
}

#[tokio::test]
async fn xks_over_tls_with_mutual_tls_on_http2_and_http1() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let server_pki = Pki::new("kmsgate xks test server CA");
    let client_pki = Pki::new("kmsgate xks test client CA");
    let (cert, key) = server_pki.leaf(&["localhost"], false);
    std::fs::write(p.join("server.pem"), cert).unwrap();
    std::fs::write(p.join("server.key"), key).unwrap();
    std::fs::write(p.join("clients.pem"), client_pki.ca_pem()).unwrap();
    std::fs::write(
        p.join("tls.toml"),
        "[server]\nbind = \"127.0.0.1:0\"\n[server.tls]\ncert = \"server.pem\"\nkey = \"server.key\"\n\
         client_ca = \"clients.pem\"\nclient_subjects = [\"cks.kms.eu-west-1.amazonaws.com\"]\n\
         [xks]\nregions = [\"eu-west-1\"]\n",
    )
    .unwrap();
    let key = cli_json(p, &["--config", "tls.toml", "keys", "create"]);
    let key_id = key["id"].as_str().unwrap().to_owned();
    cli_json(
        p,
        &["--config", "tls.toml", "xks", "stores", "create", "--name", "tls", "--prefix", "/tls", "--all-keys"],
    );
    let cred = cred_of(
        &serde_json::from_str(&cli_ok(p, &["--config", "tls.toml", "xks", "credentials", "create", "--store", "tls"]))
            .unwrap(),
    );
    let server = start(p, &["--config", "tls.toml"], &p.join("server.log"));
    let ca = server_pki.ca_pem();
    let kms = client_pki.leaf(&["cks.kms.eu-west-1.amazonaws.com"], true);

    for (alpn, want) in [(&[&b"h2"[..]][..], &b"h2"[..]), (&[&b"http/1.1"[..]][..], &b"http/1.1"[..])] {
        let client = client_config(&ca, Some(&kms), alpn);
        let (r, got) = tls_call(server.addr, client.clone(), &cred, "/health", &health_body("tls")).await.unwrap();
        assert_eq!(got, want);
        assert_eq!(r.status, 200, "{:?}: {}", String::from_utf8_lossy(want), String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["ekmFleetDetails"][0]["healthStatus"], "ACTIVE");
        let body = json!({"requestMetadata": md("Encrypt", "tls-enc"), "plaintext": STANDARD.encode(b"over tls"), "encryptionAlgorithm": "AES_GCM"});
        let (r, _) =
            tls_call(server.addr, client.clone(), &cred, &format!("/keys/{key_id}/encrypt"), &body).await.unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let enc = r.json();
        let dec = json!({"requestMetadata": md("Decrypt", "tls-dec"), "ciphertext": enc["ciphertext"],
            "ciphertextMetadata": enc["ciphertextMetadata"], "initializationVector": enc["initializationVector"],
            "authenticationTag": enc["authenticationTag"], "encryptionAlgorithm": "AES_GCM"});
        let (r, _) = tls_call(server.addr, client, &cred, &format!("/keys/{key_id}/decrypt"), &dec).await.unwrap();
        assert_eq!(STANDARD.decode(r.json()["plaintext"].as_str().unwrap()).unwrap(), b"over tls");
    }

    // curl over TLS with its client certificate, on HTTP/2 (it signs what becomes :authority).
    for (name, content) in [("ca.pem", ca.clone()), ("kms.pem", kms.0.clone()), ("kms.key", kms.1.clone())] {
        std::fs::write(p.join(name), content).unwrap();
    }
    let url = format!("https://localhost:{}{}/health", server.addr.port(), cred.uri_path);
    let out = Command::new("curl")
        .current_dir(p)
        .args(["-sS", "--http2", "--cacert", "ca.pem", "--cert", "kms.pem", "--key", "kms.key"])
        .args(["--resolve", &format!("localhost:{}:127.0.0.1", server.addr.port())])
        .args(["--aws-sigv4", "aws:amz:eu-west-1:kms-xks-proxy", "--user", &format!("{}:{}", cred.akid, cred.secret)])
        .args([
            "-X",
            "POST",
            "-H",
            "Content-Type:application/json",
            "--data-binary",
            &health_body("curl-h2").to_string(),
        ])
        .args(["-w", "\n%{http_code} %{http_version}", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.ends_with("200 2"), "curl over h2: {text} {}", String::from_utf8_lossy(&out.stderr));

    // Another subject or no certificate: refused in the handshake, never reaching SigV4.
    let stranger = client_pki.leaf(&["someone.else.example"], true);
    for identity in [None, Some(&stranger)] {
        let r =
            tls_call(server.addr, client_config(&ca, identity, &[b"h2"]), &cred, "/health", &health_body("x")).await;
        assert!(r.is_err(), "the handshake must fail: {r:?}");
    }
}

//! Prometheus metrics of the real `kmsgate` binary: drive XKS, Alibaba and probe requests (software and
//! SoftHSM keys, successes, wire errors, a throttled key store), scrape `/metrics` on the admin listener over
//! TLS, parse every line of the exposition, check the series moved, and run `promtool check metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http_body_util::Full;
use hyper::body::Bytes;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_kmsgate");
const REGION: &str = "eu-west-1";

struct Server {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    grpc: Option<SocketAddr>,
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
    c.env("KMSGATE_CONFIG", cwd.join("kmsgate.toml"));
    c
}

fn cli_ok(cwd: &Path, args: &[&str]) -> String {
    let out = kmsgate(cwd).args(args).output().unwrap();
    assert!(out.status.success(), "kmsgate {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn addr_of(line: &str, label: &str) -> Option<SocketAddr> {
    let url = line.trim().strip_prefix(label)?.split_whitespace().next()?;
    url.split("://").nth(1)?.parse().ok()
}

fn start(cwd: &Path) -> Server {
    let mut child = kmsgate(cwd)
        .args(["serve", "--bind", "127.0.0.1:0", "--admin-bind", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut admin = None;
    let mut grpc = None;
    let addr = loop {
        let Some(Ok(line)) = lines.next() else { panic!("kmsgate exited before listening") };
        admin = admin.or_else(|| addr_of(&line, "admin:"));
        grpc = grpc.or_else(|| addr_of(&line, "gRPC:"));
        if let Some(a) = addr_of(&line, "listening:") {
            break a;
        }
    };
    // The gRPC listener is announced after the banner, when configured.
    if std::fs::read_to_string(cwd.join("kmsgate.toml")).is_ok_and(|t| t.contains("[grpc]")) {
        while grpc.is_none() {
            let Some(Ok(line)) = lines.next() else { panic!("kmsgate exited before the gRPC listener") };
            grpc = addr_of(&line, "gRPC:");
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Server { child, addr, admin: admin.unwrap(), grpc }
}

struct Cred {
    akid: String,
    secret: String,
    uri_path: String,
}

fn credential(cwd: &Path, store: &str) -> Cred {
    let file: Value = serde_json::from_str(&cli_ok(cwd, &["xks", "credentials", "create", "--store", store])).unwrap();
    let c = &file["XksProxyAuthenticationCredential"];
    Cred {
        akid: c["AccessKeyId"].as_str().unwrap().to_owned(),
        secret: c["RawSecretAccessKey"].as_str().unwrap().to_owned(),
        uri_path: file["XksProxyUriPath"].as_str().unwrap().to_owned(),
    }
}

/// One XKS call, signed with `cred` (or with a wrong secret when `forge`).
async fn xks(addr: SocketAddr, cred: &Cred, op: &str, body: &Value, forge: bool) -> common::Reply {
    let path = format!("{}{op}", cred.uri_path);
    let bytes = body.to_string().into_bytes();
    let host = addr.to_string();
    let secret = if forge { "x".repeat(cred.secret.len()) } else { cred.secret.clone() };
    let (date, auth) = kmsgate_xks::sigv4::sign(&kmsgate_xks::sigv4::ToSign {
        method: "POST",
        path: &path,
        query: None,
        headers: &[("host", &host), ("content-type", "application/json")],
        body: &bytes,
        access_key_id: &cred.akid,
        secret: &secret,
        region: REGION,
        service: "kms-xks-proxy",
        time: time::OffsetDateTime::now_utc(),
    });
    let req = hyper::Request::builder()
        .method("POST")
        .uri(&path)
        .header("host", &host)
        .header("content-type", "application/json")
        .header("x-amz-date", date)
        .header("authorization", auth)
        .body(Full::new(Bytes::from(bytes)))
        .unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    common::send_on(stream, false, req).await.unwrap()
}

fn md(op: &str) -> Value {
    json!({"awsPrincipalArn": "arn:aws:iam::123456789012:user/M", "kmsKeyArn": "arn:aws:kms:eu-west-1:123456789012:key/m",
        "kmsOperation": op, "kmsRequestId": "r-1"})
}

/// A CA and a localhost server certificate valid for 100 days, for the admin listener.
fn admin_pki(dir: &Path) -> (String, time::OffsetDateTime) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(rcgen::DnType::CommonName, "metrics test CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let not_after = time::OffsetDateTime::now_utc() + time::Duration::days(100);
    leaf.not_after = not_after;
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("admin.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("admin.key"), key.serialize_pem()).unwrap();
    (ca_cert.pem(), not_after)
}

fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(cfg)
}

/// A parsed exposition: every sample by its full series name (`name{labels}` with labels sorted), and the
/// declared type of every family.
#[derive(Debug, Default)]
pub struct Exposition {
    pub samples: BTreeMap<String, f64>,
    pub types: BTreeMap<String, String>,
}

impl Exposition {
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples.get(&series_key(name, labels)).copied()
    }
}

fn series_key(name: &str, labels: &[(&str, &str)]) -> String {
    let mut l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    l.sort();
    format!("{name}{{{}}}", l.join(","))
}

fn valid_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

/// Parses the text format 0.0.4 strictly: every line is a HELP, a TYPE or a sample of a declared family,
/// label values are quoted and escaped, values are floats, and no series appears twice.
pub fn parse_exposition(text: &str) -> Exposition {
    let mut e = Exposition::default();
    let mut helped = BTreeSet::new();
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        assert!(!line.is_empty(), "empty {}", at());
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or_else(|| panic!("{}", at()));
            assert!(valid_name(name) && !help.is_empty(), "{}", at());
            assert!(helped.insert(name.to_owned()), "HELP twice: {}", at());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("{}", at()));
            assert!(valid_name(name), "{}", at());
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{}", at());
            assert!(e.types.insert(name.to_owned(), kind.to_owned()).is_none(), "TYPE twice: {}", at());
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {}", at());
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{}", at()));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value {}", at())),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}').unwrap_or_else(|| panic!("{}", at()))),
            None => (series, ""),
        };
        assert!(valid_name(name), "{}", at());
        let mut parsed: Vec<(String, String)> = Vec::new();
        let mut rest = labels;
        while !rest.is_empty() {
            let (k, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("label {}", at()));
            assert!(valid_name(k) && !k.starts_with("__"), "label name {}", at());
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        _ => panic!("bad escape {}", at()),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => value.push(c),
                    None => panic!("unterminated label value {}", at()),
                }
            };
            assert!(parsed.iter().all(|(p, _)| p != k), "label twice {}", at());
            parsed.push((k.to_owned(), value));
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
        // The family: the name itself, or a histogram's _bucket/_sum/_count.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| e.types.get(*f).is_some_and(|t| t == "histogram")))
            .unwrap_or(name);
        let kind = e.types.get(family).unwrap_or_else(|| panic!("sample of an undeclared family {}", at()));
        if kind == "counter" {
            assert!(name.ends_with("_total") && value >= 0.0, "counter {}", at());
        }
        if name.ends_with("_bucket") && kind == "histogram" {
            assert!(parsed.iter().any(|(k, _)| k == "le"), "bucket without le {}", at());
        }
        let refs: Vec<(&str, &str)> = parsed.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert!(e.samples.insert(series_key(name, &refs), value).is_none(), "series twice {}", at());
    }
    e
}

fn pkcs11_toml() -> String {
    let var = |n: &str| std::env::var(n).unwrap_or_else(|_| panic!("{n} is not set: run through ./scripts/test"));
    let _ = var("SOFTHSM2_CONF");
    format!(
        "[[backend.pkcs11]]\nname = \"hsm\"\nmodule = \"{}\"\ntoken_label = \"{}\"\npin_file = \"{}\"\nsessions = 3\n\
         deadline_ms = 5000\n",
        std::env::var("KMSGATE_TEST_P11_MODULE").unwrap_or_else(|_| "/usr/lib/softhsm/libsofthsm2.so".to_owned()),
        std::env::var("KMSGATE_TEST_P11_TOKEN").unwrap_or_else(|_| "kmsgate-test".to_owned()),
        var("KMSGATE_TEST_P11_PIN_FILE"),
    )
}

#[tokio::test]
async fn metrics_move_with_traffic_and_parse_as_the_exposition_format() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let (ca_pem, not_after) = admin_pki(p);
    std::fs::write(
        p.join("kmsgate.toml"),
        format!(
            "[admin.tls]\ncert = \"{0}\"\nkey = \"{1}\"\n\n[grpc]\nenabled = true\nbind = \"127.0.0.1:0\"\n\n\
             [grpc.tls]\ncert = \"{0}\"\nkey = \"{1}\"\n\n[backend]\ndeadline_ms = 5000\n\n{2}",
            p.join("admin.crt").display(),
            p.join("admin.key").display(),
            pkcs11_toml()
        ),
    )
    .unwrap();

    let id = |out: String| serde_json::from_str::<Value>(&out).unwrap()["id"].as_str().unwrap().to_owned();
    let soft = id(cli_ok(p, &["--json", "keys", "create", "--alias", "alias/soft"]));
    let hsm = id(cli_ok(p, &["--json", "keys", "create", "--alias", "alias/hsm", "--backend", "hsm"]));
    cli_ok(p, &["xks", "stores", "create", "--name", "open", "--prefix", "/open", "--all-keys"]);
    cli_ok(p, &["xks", "stores", "create", "--name", "tight", "--prefix", "/tight", "--all-keys", "--quota-rps", "1"]);
    let open = credential(p, "open");
    let tight = credential(p, "tight");
    let server = start(p);

    // XKS: successes on both backends, a wrong signature, a bad ciphertext, an unknown route, a throttled store.
    let r = xks(server.addr, &open, "/health", &json!({"requestMetadata": md("KmsHealthCheck")}), false).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let mut sealed = Value::Null;
    for key in [&soft, &hsm] {
        for _ in 0..2 {
            let body = json!({"requestMetadata": md("Encrypt"), "plaintext": STANDARD.encode(b"metrics"),
                "encryptionAlgorithm": "AES_GCM"});
            let r = xks(server.addr, &open, &format!("/keys/{key}/encrypt"), &body, false).await;
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            sealed = r.json();
        }
    }
    // The last ciphertext (of the HSM key) with another tag: the backend refuses it.
    let bad = json!({"requestMetadata": md("Decrypt"), "ciphertext": sealed["ciphertext"],
        "ciphertextMetadata": sealed["ciphertextMetadata"], "encryptionAlgorithm": "AES_GCM",
        "initializationVector": sealed["initializationVector"], "authenticationTag": STANDARD.encode([2u8; 16])});
    let r = xks(server.addr, &open, &format!("/keys/{hsm}/decrypt"), &bad, false).await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["errorName"], "InvalidCiphertextException");
    let body =
        json!({"requestMetadata": md("Encrypt"), "plaintext": STANDARD.encode(b"m"), "encryptionAlgorithm": "AES_GCM"});
    let r = xks(server.addr, &open, "/keys/3f0c9a4e-0000-4000-8000-000000000000/encrypt", &body, false).await;
    assert_eq!(r.json()["errorName"], "KeyNotFoundException");
    let r = xks(server.addr, &open, "/health", &json!({"requestMetadata": md("KmsHealthCheck")}), true).await;
    assert_eq!(r.status, 401);
    let r = xks(server.addr, &open, "/nope", &json!({}), false).await;
    assert_eq!(r.json()["errorName"], "InvalidUriPathException");
    let mut throttled = 0;
    for _ in 0..4 {
        let r = xks(server.addr, &tight, "/health", &json!({"requestMetadata": md("KmsHealthCheck")}), false).await;
        throttled += usize::from(r.status == 429);
    }
    assert!(throttled >= 2, "the 1 req/s store throttled {throttled} of 4");
    // Alibaba instance API without its content type; a probe on the data listener.
    // (an `x-kms-*` header routes `/` to the instance API rather than the OpenAPI; JSON is the wrong type).
    let mut req = common::request("POST", &server.addr.to_string(), "/", b"");
    req.headers_mut().insert("x-kms-apiname", hyper::header::HeaderValue::from_static("Encrypt"));
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let r = common::send_on(stream, false, req).await.unwrap();
    assert_eq!(r.status, 415);
    assert_eq!(common::http(server.addr, "GET", "/healthz", b"").await.status, 200);

    // The secrets REST API: a probe, and a read without a token (the path must not become a label).
    assert_eq!(common::http(server.addr, "GET", "/v1/health", b"").await.status, 200);
    let r = common::http(server.addr, "GET", "/v1/secrets/app/probe-9f3e", b"").await;
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (401, Some("authentication_required")));
    // The Alibaba OpenAPI: an unsigned Encrypt.
    let r = common::http(server.addr, "GET", "/?Action=Encrypt&Version=2016-01-20&Format=JSON", b"").await;
    assert!(r.status >= 400, "{}", String::from_utf8_lossy(&r.body));
    let oapi_code = r.json()["Code"].as_str().unwrap().to_owned();
    // The gRPC API on its own listener: a health check, and a call without a credential.
    let grpc_addr = server.grpc.expect("the gRPC listener is announced");
    let ch = grpc_channel(grpc_addr, &ca_pem).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    use kmsgate_grpc::proto::kmsgate_v1 as pb;
    let r = pb::key_management_service_client::KeyManagementServiceClient::new(ch)
        .random(pb::RandomRequest { length: 8 })
        .await;
    assert_eq!(r.unwrap_err().code(), tonic::Code::Unauthenticated);

    // Scrape over TLS until the store-backed gauges have been refreshed once.
    let tls = client_config(&ca_pem);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (text, e) = loop {
        let r = common::https(server.admin, tls.clone(), "localhost", "/metrics").await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8");
        let text = String::from_utf8(r.body).unwrap();
        let e = parse_exposition(&text);
        if e.get("kmsgate_replicas", &[]).is_some() {
            break (text, e);
        }
        assert!(Instant::now() < deadline, "kmsgate_replicas never appeared:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let get = |name: &str, labels: &[(&str, &str)]| {
        e.get(name, labels).unwrap_or_else(|| panic!("no {}\n{text}", series_key(name, labels)))
    };
    let req =
        |op: &str, code: &str| get("kmsgate_requests_total", &[("frontend", "xks"), ("operation", op), ("code", code)]);
    assert_eq!(req("Encrypt", "ok"), 4.0);
    assert_eq!(req("Decrypt", "InvalidCiphertextException"), 1.0);
    assert_eq!(req("Encrypt", "KeyNotFoundException"), 1.0);
    assert_eq!(req("GetHealthStatus", "AuthenticationFailedException"), 1.0);
    assert_eq!(req("Unknown", "InvalidUriPathException"), 1.0);
    assert_eq!(req("GetHealthStatus", "ThrottlingException"), throttled as f64);
    assert_eq!(req("GetHealthStatus", "ok"), (1 + 4 - throttled) as f64);
    assert_eq!(
        get("kmsgate_request_duration_seconds_count", &[("frontend", "xks"), ("operation", "Encrypt"), ("code", "ok")]),
        4.0
    );
    assert_eq!(
        get(
            "kmsgate_requests_total",
            &[("frontend", "alibaba_instance"), ("operation", "Encrypt"), ("code", "InvalidContentType")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(get("kmsgate_requests_total", &[("frontend", "none"), ("operation", "none"), ("code", "ok")]), 1.0);
    // The newer frontends label their requests too, with operations from fixed lists.
    let labelled = |frontend: &str, op: &str, code: &str| {
        get("kmsgate_requests_total", &[("frontend", frontend), ("operation", op), ("code", code)])
    };
    assert_eq!(labelled("secrets", "Health", "ok"), 1.0);
    assert_eq!(labelled("secrets", "GetSecret", "authentication_required"), 1.0);
    assert_eq!(labelled("alibaba_openapi", "Encrypt", &oapi_code), 1.0, "{text}");
    assert_eq!(labelled("grpc", "Check", "ok"), 1.0);
    assert_eq!(labelled("grpc", "Random", "UNAUTHENTICATED"), 1.0);

    let ops = |op: &str, outcome: &str| {
        get("kmsgate_operations_total", &[("frontend", "xks"), ("operation", op), ("outcome", outcome)])
    };
    // The XKS deep health check runs dispatcher operations of its own in the background: at least, not exactly.
    assert!(ops("Encrypt", "ok") >= 4.0);
    assert_eq!(ops("Decrypt", "invalid_ciphertext"), 1.0);
    assert_eq!(
        get("kmsgate_operation_duration_seconds_count", &[("frontend", "xks"), ("operation", "Encrypt")]),
        ops("Encrypt", "ok")
    );
    for backend in ["software", "hsm"] {
        let n = get("kmsgate_backend_call_duration_seconds_count", &[("backend", backend), ("call", "crypto")]);
        assert!(n >= 2.0, "{backend}: {n}");
    }
    // The refused tag was the HSM working, not failing.
    for reason in ["timeout", "error"] {
        assert_eq!(
            get("kmsgate_backend_call_failures_total", &[("backend", "hsm"), ("call", "crypto"), ("reason", reason)]),
            0.0
        );
    }
    assert!(get("kmsgate_cache_hits_total", &[("cache", "key")]) >= 1.0, "second encrypts hit the key cache");
    assert!(get("kmsgate_cache_misses_total", &[("cache", "key")]) >= 1.0);
    assert!(get("kmsgate_cache_hits_total", &[("cache", "document")]) >= 1.0, "credentials are cached");
    assert_eq!(get("kmsgate_rate_limited_total", &[("frontend", "xks"), ("limiter", "frontend")]), throttled as f64);
    assert_eq!(get("kmsgate_hsm_pool_sessions", &[("backend", "hsm")]), 3.0);
    assert_eq!(get("kmsgate_hsm_pool_sessions_in_use", &[("backend", "hsm")]), 0.0);
    assert_eq!(get("kmsgate_hsm_pool_waiters", &[("backend", "hsm")]), 0.0);
    assert!(get("kmsgate_hsm_pool_sessions_open", &[("backend", "hsm")]) >= 1.0);
    let expiry = get("kmsgate_tls_certificate_expiry_seconds", &[("listener", "admin")]);
    let expected = (not_after - time::OffsetDateTime::now_utc()).whole_seconds() as f64;
    assert!((expiry - expected).abs() < 120.0, "expiry {expiry}, expected about {expected}");
    // The gRPC listener serves the same certificate here.
    assert_eq!(get("kmsgate_tls_certificate_expiry_seconds", &[("listener", "grpc")]), expiry);
    assert_eq!(get("kmsgate_replicas", &[]), 1.0);
    assert_eq!(get("kmsgate_credentials", &[("kind", "xks.credential")]), 2.0);
    assert!(get("kmsgate_credential_max_age_seconds", &[("kind", "xks.credential")]) >= 0.0);
    assert_eq!(get("kmsgate_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);

    // Histograms: cumulative buckets ending at +Inf == _count.
    let inf = get(
        "kmsgate_request_duration_seconds_bucket",
        &[("frontend", "xks"), ("operation", "Encrypt"), ("code", "ok"), ("le", "+Inf")],
    );
    assert_eq!(inf, 4.0);

    // No label value is a key id, alias, request id or path.
    for series in e.samples.keys() {
        for needle in
            [soft.as_str(), hsm.as_str(), "alias/", "/open", "r-1", "kms/xks", "default", "probe-9f3e", "kmsgate.v1"]
        {
            assert!(!series.contains(needle), "{series} carries {needle}");
        }
    }

    deploy_references_only_exposed_metrics(&e);
    promtool_check(&text);
}

/// A tonic channel to the gRPC listener over TLS (ALPN h2), trusting `ca_pem`, without a client certificate.
async fn grpc_channel(addr: SocketAddr, ca_pem: &str) -> tonic::transport::Channel {
    let mut cfg = (*client_config(ca_pem)).clone();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let svc = tower::service_fn(move |_uri: http::Uri| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    tonic::transport::Endpoint::from_static("http://localhost").connect_with_connector(svc).await.unwrap()
}

/// Every `kmsgate_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("kmsgate_") {
        let tail = &rest[i..];
        let end =
            tail.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).unwrap_or(tail.len());
        // `kmsgate_*` in prose is a pattern, not a name.
        if end > "kmsgate_".len() {
            out.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    out
}

/// The Grafana dashboard and the alert rules in deploy/ use only series this server exposes, and the dashboard
/// shows every family.
fn deploy_references_only_exposed_metrics(e: &Exposition) {
    let mut exposed = BTreeSet::new();
    for (family, kind) in &e.types {
        exposed.insert(family.clone());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                exposed.insert(format!("{family}{suffix}"));
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/helm/kmsgate/files");
    for file in ["alerts.yaml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let used = metric_names(&text);
        assert!(used.len() >= 8, "{file} uses only {used:?}");
        let unknown: Vec<_> = used.difference(&exposed).collect();
        assert!(unknown.is_empty(), "{file} uses metrics the server does not expose: {unknown:?}");
        if file.ends_with(".json") {
            let shown: BTreeSet<String> = used
                .iter()
                .map(|n| {
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .fold(n.clone(), |n, s| n.strip_suffix(s).map_or(n.clone(), str::to_owned))
                })
                .collect();
            let missing: Vec<_> = e.types.keys().filter(|f| !shown.contains(*f)).collect();
            assert!(missing.is_empty(), "the dashboard shows no panel for {missing:?}");
        }
    }
}

/// `promtool check metrics` (Debian's `prometheus` package). `./scripts/test` installs it and sets
/// `KMSGATE_TEST_REQUIRE_PROMTOOL=1`, so in CI the check cannot be skipped.
fn promtool_check(text: &str) {
    let required = std::env::var("KMSGATE_TEST_REQUIRE_PROMTOOL").is_ok_and(|v| v == "1");
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            assert!(!required, "promtool is required (KMSGATE_TEST_REQUIRE_PROMTOOL=1) but cannot run: {e}");
            eprintln!("promtool not found; run through ./scripts/test for the promtool check");
            return;
        }
    };
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool check metrics:\n{report}");
}

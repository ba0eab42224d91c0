//! The Alibaba instance API against the real `kmsgate` binary, managed by the CLI in other processes:
//! ClientKey files (`clientKey_KAAP.<uuid>.json` + password) read by the three vendor readers (the Python SDK
//! signing real requests, Java's keytool, Go's x/crypto/pkcs12), a key disabled by the CLI refused by the
//! running server, per-ClientKey QPS limits, and AES-CBC/ECB through the SDK.
//!
//! Needs what `./scripts/test` installs: the Python venv with the vendor SDK, `keytool`, `openssl`, and Go with
//! golang.org/x/crypto (Debian `golang-go golang-golang-x-crypto-dev`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http_body_util::Full;
use hyper::body::Bytes;
use kmsgate_alibaba::proto;
use prost::Message as _;
use serde_json::Value;

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

/// `kmsgate serve` on an ephemeral port with the default change-poll interval.
fn start(cwd: &Path) -> Server {
    start_with(cwd, &[])
}

fn start_with(cwd: &Path, global: &[&str]) -> Server {
    let log = std::fs::File::create(cwd.join("server.log")).unwrap();
    let mut child = kmsgate(cwd)
        .args(global)
        .args(["serve", "--bind", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn kmsgate");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let Some(Ok(line)) = lines.next() else {
            panic!("kmsgate exited: {}", std::fs::read_to_string(cwd.join("server.log")).unwrap_or_default());
        };
        if let Some(rest) = line.trim().strip_prefix("listening:") {
            let url = rest.split_whitespace().next().unwrap();
            break url.split("://").nth(1).unwrap().parse::<SocketAddr>().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Server { child, addr }
}

fn cli_json(cwd: &Path, args: &[&str]) -> Value {
    let out = kmsgate(cwd).arg("--json").args(args).output().expect("run kmsgate");
    assert!(out.status.success(), "kmsgate {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn python() -> String {
    if let Ok(p) = std::env::var("KMSGATE_TEST_PYTHON") {
        return p;
    }
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/venv/bin/python");
    assert!(
        Path::new(venv).exists(),
        "the Alibaba SDK venv is missing: run ./scripts/test (or set KMSGATE_TEST_PYTHON)"
    );
    venv.to_owned()
}

/// Runs crates/alibaba/tests/sdk_client_key_file.py in `mode` and returns its JSON.
fn sdk(mode: &str, addr: SocketAddr, files: &ClientKeyFiles, key: Option<&str>) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../alibaba/tests/sdk_client_key_file.py");
    let mut cmd = Command::new(python());
    cmd.arg(script).arg(mode).arg(addr.to_string()).arg(&files.json).arg(&files.password);
    if let Some(k) = key {
        cmd.arg(k);
    }
    let out = cmd.output().expect("run python");
    assert!(out.status.success(), "SDK script ({mode}) failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

struct ClientKeyFiles {
    id: String,
    json: PathBuf,
    password: PathBuf,
}

fn create_client_key(cwd: &Path, extra: &[&str]) -> ClientKeyFiles {
    let mut args = vec!["alibaba", "client-keys", "create", "--identity", "app", "--out-dir"];
    let out_dir = cwd.display().to_string();
    args.push(&out_dir);
    args.extend_from_slice(extra);
    let v = cli_json(cwd, &args);
    let id = v["id"].as_str().unwrap().to_owned();
    let json = PathBuf::from(v["client_key_file"].as_str().unwrap());
    let password = PathBuf::from(v["password_file"].as_str().unwrap());
    // The vendor console's names, and only the owner may read them.
    assert_eq!(json.file_name().unwrap().to_str().unwrap(), format!("clientKey_{id}.json"));
    assert_eq!(password.file_name().unwrap().to_str().unwrap(), format!("clientKey_{id}_Password.txt"));
    for f in [&json, &password, &PathBuf::from(v["private_key_file"].as_str().unwrap())] {
        assert_eq!(std::fs::metadata(f).unwrap().permissions().mode() & 0o777, 0o600, "{}", f.display());
    }
    ClientKeyFiles { id, json: cwd.join(json), password: cwd.join(password) }
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?} (run ./scripts/test to install it): {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Builds the Go reader (crates/alibaba/tests/pkcs12_reader) against Debian's golang.org/x/crypto.
fn go_reader(out_dir: &Path) -> PathBuf {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/../alibaba/tests/pkcs12_reader/main.go");
    let bin = out_dir.join("pkcs12_reader");
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gocache");
    let (ok, text) = run(Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(src)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", cache)
        .env("GOFLAGS", ""));
    assert!(ok, "go build failed: {text}");
    bin
}

/// Signs like the SDK with a signature made elsewhere: the string to sign of a GenerateRandom request.
fn generate_random_request(addr: SocketAddr, key_id: &str) -> (Vec<u8>, Vec<(String, String)>, String) {
    random_request(addr, key_id, 8)
}

fn random_request(addr: SocketAddr, key_id: &str, length: i32) -> (Vec<u8>, Vec<(String, String)>, String) {
    let body = proto::GenerateRandomRequest { length }.encode_to_vec();
    let sha = hex::encode_upper(digest::digest(&digest::SHA256, &body));
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let sts = format!(
        "POST\n{sha}\napplication/x-protobuf\n{date}\nx-kms-acccesskeyid:{key_id}\nx-kms-apiname:GenerateRandom\n\
         x-kms-apiversion:dkms-gcs-0.2\nx-kms-signaturemethod:RSA_PKCS1_SHA_256\n/"
    );
    let headers = [
        ("host", addr.to_string()),
        ("content-type", "application/x-protobuf".to_owned()),
        ("content-sha256", sha),
        ("date", date),
        ("x-kms-acccesskeyid", key_id.to_owned()),
        ("x-kms-apiname", "GenerateRandom".to_owned()),
        ("x-kms-apiversion", "dkms-gcs-0.2".to_owned()),
        ("x-kms-signaturemethod", "RSA_PKCS1_SHA_256".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    (body, headers, sts)
}

/// The ClientKey's key from its PKCS#1 PEM file, as Rust signs with it.
fn pem_key(files: &ClientKeyFiles) -> aws_lc_rs::signature::RsaKeyPair {
    let pem =
        std::fs::read_to_string(files.json.with_file_name(format!("clientKey_{}_PrivateKey.pem", files.id))).unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    aws_lc_rs::signature::RsaKeyPair::from_der(&STANDARD.decode(b64).unwrap()).unwrap()
}

/// A GenerateRandom request of `length` signed in Rust; returns the HTTP status.
async fn random_status(
    addr: SocketAddr,
    files: &ClientKeyFiles,
    pair: &aws_lc_rs::signature::RsaKeyPair,
    length: i32,
) -> u16 {
    let (body, mut headers, sts) = random_request(addr, &files.id, length);
    let mut sig = vec![0; pair.public_modulus_len()];
    pair.sign(&aws_lc_rs::signature::RSA_PKCS1_SHA256, &aws_lc_rs::rand::SystemRandom::new(), sts.as_bytes(), &mut sig)
        .unwrap();
    headers.push(("authorization".to_owned(), format!("Bearer {}", STANDARD.encode(sig))));
    post(addr, &headers, body).await.status
}

async fn post(addr: SocketAddr, headers: &[(String, String)], body: Vec<u8>) -> common::Reply {
    let mut b = hyper::Request::builder().method("POST").uri("/");
    for (k, v) in headers {
        b = b.header(k.as_str(), v.as_str());
    }
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    common::send_on(stream, false, b.body(Full::new(Bytes::from(body))).unwrap()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_key_files_are_read_by_the_python_java_and_go_readers() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let key = cli_json(p, &["keys", "create"])["id"].as_str().unwrap().to_owned();
    let files = create_client_key(p, &[]);
    let server = start(p);

    // Python: the vendor SDK opens the PKCS#12 with the password and signs real requests.
    let r = tokio::task::spawn_blocking({
        let files = ClientKeyFiles { id: files.id.clone(), json: files.json.clone(), password: files.password.clone() };
        let key = key.clone();
        move || sdk("use", server.addr, &files, Some(&key))
    })
    .await
    .unwrap();
    assert_eq!(r["decrypt"], "from the client key file");
    assert_eq!(r["random_len"], 16);
    assert_eq!(r["transfer_decrypt"], "via the wrapper");

    let doc: Value = serde_json::from_slice(&std::fs::read(&files.json).unwrap()).unwrap();
    assert_eq!(doc["KeyId"], files.id.as_str());
    let p12 = p.join("client.p12");
    std::fs::write(&p12, STANDARD.decode(doc["PrivateKeyData"].as_str().unwrap()).unwrap()).unwrap();
    let password = std::fs::read_to_string(&files.password).unwrap();
    assert!(password.len() >= 8 && !password.contains('\n'));

    // Java: the SDK loads a PKCS12 KeyStore; keytool does the same and must find one key with its certificate.
    let (ok, text) = run(Command::new("keytool")
        .args(["-list", "-storetype", "PKCS12", "-keystore"])
        .arg(&p12)
        .args(["-storepass", &password]));
    assert!(ok, "keytool: {text}");
    assert!(text.contains("1 entry") && text.contains("PrivateKeyEntry"), "{text}");
    let (ok, _) = run(Command::new("keytool")
        .args(["-list", "-storetype", "PKCS12", "-keystore"])
        .arg(&p12)
        .args(["-storepass", "not-the-password"]));
    assert!(!ok, "keytool accepts a wrong password");

    // OpenSSL: the legacy algorithms Go requires, on both bags, with a SHA-1 MAC.
    let (ok, text) = run(Command::new("openssl")
        .args(["pkcs12", "-info", "-legacy", "-noout", "-in"])
        .arg(&p12)
        .arg("-passin")
        .arg(format!("file:{}", files.password.display())));
    assert!(ok, "openssl pkcs12: {text}");
    assert!(text.contains("MAC: sha1"), "{text}");
    assert_eq!(text.matches("pbeWithSHA1And3-KeyTripleDES-CBC").count(), 2, "{text}");

    // Go: x/crypto/pkcs12 (ToPEM and Decode) opens it; its key signs a request the gateway accepts.
    let reader = go_reader(p);
    let (body, headers, sts) = generate_random_request(server.addr, &files.id);
    let out = Command::new(&reader).arg(&files.json).arg(&files.password).arg(&sts).output().unwrap();
    assert!(out.status.success(), "Go reader: {}", String::from_utf8_lossy(&out.stderr));
    let go: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(go["key_id"], files.id.as_str());
    assert_eq!(go["cert_cn"], files.id.as_str());
    assert_eq!(go["pem_types"], serde_json::json!(["CERTIFICATE", "PRIVATE KEY"]));
    let mut headers = headers;
    headers.push(("authorization".to_owned(), format!("Bearer {}", go["signature"].as_str().unwrap())));
    let reply = post(server.addr, &headers, body).await;
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    assert_eq!(proto::GenerateRandomResponse::decode(&*reply.body).unwrap().random.len(), 8);
    // The same reader with a wrong password fails.
    let wrong = p.join("wrong.txt");
    std::fs::write(&wrong, "wrong-password").unwrap();
    assert!(!Command::new(&reader).arg(&files.json).arg(&wrong).arg("m").output().unwrap().status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_disables_keys_and_limits_client_keys_of_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let key = cli_json(p, &["keys", "create"])["id"].as_str().unwrap().to_owned();
    let files = create_client_key(p, &[]);
    let limited = create_client_key(p, &["--qps", "1"]);
    let listed = cli_json(p, &["alibaba", "client-keys", "list"]);
    let qps_of = |id: &str| {
        listed["client_keys"].as_array().unwrap().iter().find(|k| k["id"] == id).map(|k| k["qps"].clone()).unwrap()
    };
    assert_eq!(qps_of(&limited.id), 1);
    assert_eq!(qps_of(&files.id), Value::Null);
    let server = start(p);
    let addr = server.addr;

    // A ClientKey limited to 1 request per second: the burst beyond it is refused with the vendor's
    // throttling error; with the SDK's own retries (1 s apart) every call gets through, in bounded time.
    let r = tokio::task::spawn_blocking(move || sdk("throttle", addr, &limited, None)).await.unwrap();
    let burst = r["burst"].as_array().unwrap();
    assert_eq!(burst[0][0], "no error", "{burst:?}");
    let throttled: Vec<_> = burst.iter().filter(|e| e[0] != "no error").collect();
    assert!(!throttled.is_empty(), "{burst:?}");
    for e in throttled {
        assert_eq!(e, &serde_json::json!(["Rejected.Throttling", 429, true, "QPS Limit Exceeded"]));
    }
    assert_eq!(r["retried_ok"], 3);
    assert!(r["retried_secs"].as_f64().unwrap() < 10.0, "{r}");

    // `set-qps` in another process limits an unlimited ClientKey of the running server, and `default` lifts it.
    let pair = pem_key(&files);
    let (ok, text) = run(kmsgate(p).args(["alibaba", "client-keys", "set-qps", &files.id, "0"]));
    assert!(!ok && text.contains("at least 1"), "{text}");
    let (ok, text) = run(kmsgate(p).args(["alibaba", "client-keys", "set-qps", &files.id, "1"]));
    assert!(ok, "{text}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut n = 100;
    loop {
        n += 2;
        // Two requests back to back: under a limit of 1 per second the second (or, if the limit arrived
        // between two pairs, the first) is refused.
        let (a, b) = (random_status(addr, &files, &pair, n).await, random_status(addr, &files, &pair, n + 1).await);
        assert!([a, b].iter().all(|s| *s == 200 || *s == 429), "{a} {b}");
        if a == 429 || b == 429 {
            break;
        }
        assert!(Instant::now() < deadline, "the new limit never reached the server");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ok, text) = run(kmsgate(p).args(["alibaba", "client-keys", "set-qps", &files.id, "default"]));
    assert!(ok, "{text}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        n += 3;
        let mut statuses = Vec::new();
        for i in 0..3 {
            statuses.push(random_status(addr, &files, &pair, n + i).await);
        }
        if statuses.iter().all(|s| *s == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "the limit was never lifted: {statuses:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The CLI, another process on the same store, disables the key; the server hears of it from the change
    // feed and the next SDK calls are refused.
    let (ok, text) = run(kmsgate(p).args(["keys", "disable", &key]));
    assert!(ok, "{text}");
    let r = tokio::task::spawn_blocking(move || sdk("wait-disabled", addr, &files, Some(&key))).await.unwrap();
    assert_eq!(r["error"], serde_json::json!(["Rejected.Disabled", 409, true]), "{r}");
    assert!(r["secs"].as_f64().unwrap() < 5.0, "{r}");
    drop(server);
}

/// AES-GCM, AES-CBC and AES-ECB through the SDK, on a key of the given backend (`--config` in `global`).
async fn aes_modes_through_the_sdk(p: &Path, global: &[&str], backend: &[&str]) {
    let mut args = global.to_vec();
    args.extend_from_slice(&["keys", "create"]);
    args.extend_from_slice(backend);
    let key = cli_json(p, &args)["id"].as_str().unwrap().to_owned();
    let files = create_client_key(p, &[]);
    let server = start_with(p, global);
    let addr = server.addr;
    let r = tokio::task::spawn_blocking(move || sdk("algorithms", addr, &files, Some(&key))).await.unwrap();
    assert_eq!(r["gcm_default"], serde_json::json!(["AES_GCM", 12, true]));
    assert_eq!(r["cbc_pkcs7"], serde_json::json!(["AES_CBC", "PKCS7_PADDING", 16, 32, true]));
    assert_eq!(r["cbc_default_padding_is_pkcs7"], true);
    // CBC without padding equals ECB over the chained blocks: both modes are what they claim.
    assert_eq!(r["cbc_is_cbc"], serde_json::json!([32, true, true]));
    assert_eq!(r["cbc_no_padding_opens"], true);
    assert_eq!(r["ecb_equal_blocks"], serde_json::json!([0, true]));
    assert_eq!(r["ecb_pkcs7"], serde_json::json!([48, true]));
    for e in ["err_partial_block", "err_cbc_iv", "err_padding_mode", "err_cbc_aad", "err_bad_padding"] {
        assert_eq!(r[e], serde_json::json!(["InvalidParameter", 400, true]), "{e}");
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aes_gcm_cbc_and_ecb_through_the_sdk_on_software_keys() {
    let dir = tempfile::tempdir().unwrap();
    aes_modes_through_the_sdk(dir.path(), &[], &[]).await;
}

/// The same on a SoftHSM key (CKM_AES_CBC_PAD, CKM_AES_CBC, CKM_AES_ECB). `./scripts/test` provides the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aes_gcm_cbc_and_ecb_through_the_sdk_on_hsm_keys() {
    let var = |name: &str| {
        std::env::var(name)
            .unwrap_or_else(|_| panic!("{name} is not set: run ./scripts/test (it creates a SoftHSM token)"))
    };
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let config = format!(
        "[[backend.pkcs11]]\nname = \"hsm\"\nmodule = \"{}\"\ntoken_label = \"{}\"\npin_file = \"{}\"\nsessions = 1\n\
         deadline_ms = 5000\n[backend]\ndeadline_ms = 10000\n",
        var("KMSGATE_TEST_P11_MODULE"),
        var("KMSGATE_TEST_P11_TOKEN"),
        var("KMSGATE_TEST_P11_PIN_FILE"),
    );
    std::fs::write(p.join("hsm.toml"), config).unwrap();
    aes_modes_through_the_sdk(p, &["--config", "hsm.toml"], &["--backend", "hsm"]).await;
}

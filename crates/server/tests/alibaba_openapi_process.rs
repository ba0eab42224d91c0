//! OpenAPI AccessKeys managed by the CLI (`kmsgate alibaba access-keys create|list|revoke`) in other processes
//! than the running `kmsgate serve`: the secret file the CLI writes (mode 0600, the vendor console's CSV)
//! works with the vendor SDK unchanged, and a revoked key is refused by the running server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    c
}

fn start(cwd: &Path) -> Server {
    let log = std::fs::File::create(cwd.join("server.log")).unwrap();
    let mut child = kmsgate(cwd)
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

/// One ListKeys through alibabacloud-kms20160120 (ACS3) with the AccessKey CSV the CLI wrote: `"ok"` or the
/// SDK's error code.
const LIST_KEYS: &str = r#"
import sys
from alibabacloud_tea_openapi.models import Config
from alibabacloud_kms20160120.client import Client
from alibabacloud_kms20160120 import models as m
ak, secret = open(sys.argv[2]).read().splitlines()[1].split(",")
c = Client(Config(access_key_id=ak, access_key_secret=secret, endpoint=sys.argv[1], protocol="http", region_id="cn-hangzhou"))
try:
    c.list_keys(m.ListKeysRequest())
    print("ok")
except Exception as e:
    print(e.code)
"#;

fn list_keys(addr: SocketAddr, csv: &Path) -> String {
    let out = Command::new(python()).args(["-c", LIST_KEYS]).arg(addr.to_string()).arg(csv).output().unwrap();
    assert!(out.status.success(), "SDK failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn access_keys_from_the_cli_sign_sdk_requests_until_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let keys = cwd.join("keys");
    std::fs::create_dir(&keys).unwrap();
    let created = cli_json(cwd, &["alibaba", "access-keys", "create", "--identity", "app", "--out-dir", "keys"]);
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("LTAI") && id.len() == 24, "{id}");
    let csv = cwd.join(created["secret_file"].as_str().unwrap());
    let meta = std::fs::metadata(&csv).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "AccessKey ID,AccessKey Secret");
    let (csv_id, secret) = lines[1].split_once(',').unwrap();
    assert_eq!(csv_id, id);
    assert_eq!(secret.len(), 30);
    // The secret is stored sealed, never in plain.
    let db = std::fs::read_dir(cwd.join("kmsgate-data")).unwrap();
    for f in db {
        let bytes = std::fs::read(f.unwrap().path()).unwrap_or_default();
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "the secret is on disk in plain");
    }
    // A missing --out-dir is refused before anything is issued.
    let bad = kmsgate(cwd)
        .args(["alibaba", "access-keys", "create", "--identity", "x", "--out-dir", "nope"])
        .output()
        .unwrap();
    assert!(!bad.status.success());

    let server = start(cwd);
    assert_eq!(list_keys(server.addr, &csv), "ok");

    let listed = cli_json(cwd, &["alibaba", "access-keys", "list"]);
    let entry = listed["access_keys"].as_array().unwrap().iter().find(|k| k["id"] == id.as_str()).unwrap().clone();
    assert_eq!(entry["identity"], "app");
    assert_eq!(entry["revoked"], false);
    assert!(!listed.to_string().contains(secret), "list never shows secrets");

    cli_json(cwd, &["alibaba", "access-keys", "revoke", &id]);
    let listed = cli_json(cwd, &["alibaba", "access-keys", "list"]);
    assert_eq!(listed["access_keys"][0]["revoked"], true);
    // The running server hears of it through the change feed.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = list_keys(server.addr, &csv);
        if got == "Forbidden.AccessKey" {
            break;
        }
        assert!(Instant::now() < deadline, "the revoked AccessKey still works: {got}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let unknown = kmsgate(cwd).args(["alibaba", "access-keys", "revoke", "LTAI00000000000000000000"]).output().unwrap();
    assert!(!unknown.status.success(), "revoking an unknown AccessKey is an error");
}

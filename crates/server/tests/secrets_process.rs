//! The secrets REST API as users meet it: the real `kmsgate` binary. The embedded default's first start
//! bootstraps an admin token (printed once, to stderr), `kmsgate secrets bootstrap` does the same for a tenant,
//! and schemathesis (PyPI) fuzzes `/v1/openapi.json` against the live server with that token: no 5xx, no
//! response outside the schema.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_kmsgate");

struct Server {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn kmsgate(cwd: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(cwd).env_remove("KMSGATE_KEK").env_remove("KMSGATE_CONFIG").env("KMSGATE_LOG", "warn");
    c
}

fn start(cwd: &Path, log: &Path, envs: &[(&str, &str)]) -> Server {
    let mut cmd = kmsgate(cwd);
    cmd.args(["serve", "--bind", "127.0.0.1:0", "--admin-bind", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap());
    for (k, v) in envs {
        cmd.env(k, v);
    }
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
    Server { child, addr, log: log.to_path_buf() }
}

/// The bootstrap token from the first start's stderr (the banner is printed before listening begins).
fn token_in(log: &str) -> Option<String> {
    log.split_whitespace().find(|w| w.starts_with("svt_")).map(str::to_owned)
}

async fn get(addr: SocketAddr, path: &str, token: &str) -> common::Reply {
    let req = hyper::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    common::send_on(stream, false, req).await.unwrap()
}

#[tokio::test]
async fn first_start_bootstraps_once_and_schemathesis_finds_no_fault() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    // Rate limits off so the fuzzer reaches the handlers instead of the 429s (which are tested elsewhere).
    let s = start(dir.path(), &log, &[("KMSGATE_SECRETS__RATE_LIMITS", "false")]);
    let text = s.log();
    let token = token_in(&text).unwrap_or_else(|| panic!("no bootstrap token on stderr: {text}"));
    assert!(text.contains("shown once"), "{text}");
    let me = get(s.addr, "/v1/auth/whoami", &token).await;
    assert_eq!(me.status, 200, "{}", String::from_utf8_lossy(&me.body));
    assert_eq!(me.json()["tenant_id"], "default");

    let python = std::env::var("KMSGATE_TEST_PYTHON")
        .expect("KMSGATE_TEST_PYTHON (run ./scripts/test, which installs schemathesis into target/venv)");
    let st = Path::new(&python).with_file_name("schemathesis");
    assert!(st.exists(), "{} missing: run ./scripts/test", st.display());
    let out = Command::new(&st)
        .args(["run", &format!("http://{}/v1/openapi.json", s.addr)])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,\
             response_headers_conformance",
        ])
        .args(["--phases", "examples,coverage,fuzzing", "-n", "25", "--generation-deterministic"])
        // The fuzzer's own token must survive the run: it would revoke it, or delete its identity.
        .args(["--exclude-operation-id", "revokeToken", "--exclude-operation-id", "deleteIdentity"])
        .env("NO_COLOR", "1")
        // Its example database and reports go to the test's directory, not the source tree.
        .current_dir(dir.path())
        .output()
        .expect("run schemathesis");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "schemathesis found problems:\n{report}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(report.contains("passed"), "{report}");
    assert!(!s.log().contains("panicked"), "the server panicked: {}", s.log());
    assert_eq!(get(s.addr, "/v1/auth/whoami", &token).await.status, 200, "the token survived");
    drop(s);

    // The second start finds the tenant bootstrapped: no token is printed again.
    let log2 = dir.path().join("serve2.log");
    let s = start(dir.path(), &log2, &[]);
    assert_eq!(token_in(&s.log()), None, "{}", s.log());
    assert_eq!(get(s.addr, "/v1/auth/whoami", &token).await.status, 200);
}

#[tokio::test]
async fn cli_bootstrap_prints_the_token_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = kmsgate(dir.path()).args(["--tenant", "acme", "--json", "secrets", "bootstrap"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tenant_id"], "acme");
    let token = v["token"].as_str().unwrap().to_owned();
    let again = kmsgate(dir.path()).args(["--tenant", "acme", "secrets", "bootstrap"]).output().unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already bootstrapped") && !err.contains("svt_"), "{err}");

    let log = dir.path().join("serve.log");
    let s = start(dir.path(), &log, &[]);
    let me = get(s.addr, "/v1/auth/whoami", &token).await;
    assert_eq!(me.status, 200, "{}", String::from_utf8_lossy(&me.body));
    assert_eq!(me.json()["tenant_id"], "acme");
    assert!(!s.log().contains(&token), "the CLI's token is never logged");

    // The run-time maintenance switch: the CLI flips it, the running server follows through the change feed.
    let wait_for = |want: u16| {
        let token = token.clone();
        async move {
            let mut got = 0;
            for _ in 0..100 {
                got = get(s.addr, "/v1/auth/whoami", &token).await.status;
                if got == want {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            got
        }
    };
    let on = kmsgate(dir.path()).args(["secrets", "maintenance", "on"]).output().unwrap();
    assert!(on.status.success(), "{}", String::from_utf8_lossy(&on.stderr));
    assert_eq!(wait_for(503).await, 503);
    let r = get(s.addr, "/v1/auth/whoami", &token).await;
    assert_eq!(r.json()["error"]["code"], "maintenance_mode");
    assert!(r.headers.contains_key("retry-after"));
    let off = kmsgate(dir.path()).args(["secrets", "maintenance", "off"]).output().unwrap();
    assert!(off.status.success());
    assert_eq!(wait_for(200).await, 200);
}

//! The bench still speaks XKS: a tiny closed-loop run of the `kmsgate-bench` binary against a real kmsgate
//! (the `kmsgate` binary of the same target directory) over TLS, with every answer verified in depth. Counts
//! only, never timings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use kmsgate_bench::gateway::{self, Gateway, GatewayOptions};

const BENCH: &str = env!("CARGO_BIN_EXE_kmsgate-bench");

struct Setup {
    _dir: tempfile::TempDir,
    gw: Gateway,
    pki: gateway::Pki,
    cred: gateway::XksCredential,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let kmsgate = gateway::find_kmsgate(None).expect("the kmsgate binary (cargo build -p kmsgate)");
    let pki = gateway::write_pki(dir.path()).unwrap();
    let mut gw = Gateway::new(GatewayOptions {
        kmsgate,
        dir: dir.path().to_path_buf(),
        pki: Some(pki.clone()),
        softhsm: None,
        hsm_sessions: 1,
    })
    .unwrap();
    gw.cli(&["keys", "create", "--spec", "AES_256", "--id", "smoke-key"]).unwrap();
    let cred = gw.xks_credential("smoke", "/smoke").unwrap();
    gw.start().unwrap();
    Setup { _dir: dir, gw, pki, cred }
}

fn bench(s: &Setup, extra: &[&str], secret: &str) -> (bool, serde_json::Value, String) {
    let url = s.gw.served.as_ref().unwrap().url();
    let out = Command::new(BENCH)
        .args(["xks", "--url", &url, "--uri-path", &s.cred.uri_path, "--access-key-id", &s.cred.access_key_id])
        .args(["--key-id", "smoke-key", "--region", "eu-west-1", "-c", "2", "-d", "1", "--warmup", "0.3"])
        .arg("--ca-file")
        .arg(&s.pki.ca)
        .args(["--json", "-"])
        .args(extra)
        .env("KMSBENCH_XKS_SECRET", secret)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}): {}\n{stderr}", String::from_utf8_lossy(&out.stdout)));
    (out.status.success(), report, stderr)
}

fn assert_clean(report: &serde_json::Value, stderr: &str) {
    let s = &report["scenarios"][0];
    assert!(s["ok"].as_u64().unwrap() > 0, "{s}\n{stderr}");
    assert_eq!(s["errors"], serde_json::json!({}), "{s}");
    assert_eq!(s["warmup_errors"], serde_json::json!({}), "{s}");
    assert!(s["warmup_ok"].as_u64().unwrap() > 0, "warm-up answers are the verified ones: {s}");
}

#[test]
fn speaks_xks_to_a_real_kmsgate() {
    let s = setup();
    // Encrypt with AAD and an integrity value on HTTP/1.1, every answer verified (sizes, CDIV).
    let (ok, report, stderr) = bench(&s, &["--op", "encrypt", "--verify", "all"], &s.cred.secret);
    assert!(ok, "{stderr}");
    assert_clean(&report, &stderr);
    assert_eq!(report["scenarios"][0]["transport"], "tls/h1");

    // Decrypt of ciphertexts made during warm-up, on h2.
    let (ok, report, stderr) = bench(&s, &["--op", "decrypt", "--verify", "all", "--http2"], &s.cred.secret);
    assert!(ok, "{stderr}");
    assert_clean(&report, &stderr);

    for op in ["metadata", "health"] {
        let (ok, report, stderr) = bench(&s, &["--op", op, "--verify", "all"], &s.cred.secret);
        assert!(ok, "{op}: {stderr}");
        assert_clean(&report, &stderr);
    }
}

#[test]
fn a_wrong_secret_fails_loudly_with_the_wire_error() {
    let s = setup();
    let wrong = "d3Jvbmctc2VjcmV0LXdyb25nLXNlY3JldC13cm9uZy1zZWNyZXQ=";
    let (ok, report, stderr) = bench(&s, &["--op", "encrypt"], wrong);
    assert!(!ok, "every request failed, so the run must fail: {stderr}");
    let sc = &report["scenarios"][0];
    assert_eq!(sc["ok"], 0);
    assert!(sc["errors"]["401 AuthenticationFailedException"].as_u64().unwrap() > 0, "{sc}");
    assert!(stderr.contains("every request of"), "{stderr}");
}

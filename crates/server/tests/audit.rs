//! The hash-chained audit log of the real binary: the CLI and a running server append to one file, the records
//! name who did what to which key with which outcome and never carry plaintext, AAD, key material or
//! credentials, and `kmsgate audit verify` accepts the file and refuses every edit, removal and reordering.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_kmsgate");

fn kmsgate(cwd: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(cwd).env_remove("KMSGATE_KEK").env("KMSGATE_LOG", "warn");
    c.env("KMSGATE_CONFIG", cwd.join("kmsgate.toml")).env("KMSGATE_ADMIN__BIND", "127.0.0.1:0");
    c
}

fn run(cwd: &Path, args: &[&str]) -> Output {
    kmsgate(cwd).args(args).output().unwrap()
}

fn cli_ok(cwd: &Path, args: &[&str]) -> String {
    let out = run(cwd, args);
    assert!(out.status.success(), "kmsgate {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One signed XKS call to the full `path` (the shared signer, with the key store's prefix already in `path`).
async fn xks(addr: SocketAddr, akid: &str, secret: &str, path: &str, body: &Value) -> common::Reply {
    let cred = common::wire::XksCred { akid: akid.to_owned(), secret: secret.to_owned(), uri_path: String::new() };
    common::wire::xks_call(addr, &cred, path, body).await
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test]
async fn audit_log_is_chained_complete_and_free_of_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::write(p.join("kmsgate.toml"), "[audit]\ndestination = \"file\"\n").unwrap();
    let log = p.join("kmsgate-data/audit.log");

    // The CLI appends its own changes.
    let key: Value =
        serde_json::from_str(&cli_ok(p, &["--json", "keys", "create", "--alias", "alias/audited"])).unwrap();
    let key_id = key["id"].as_str().unwrap().to_owned();
    cli_ok(p, &["xks", "stores", "create", "--name", "a", "--prefix", "/a", "--all-keys"]);
    let cred: Value = serde_json::from_str(&cli_ok(p, &["xks", "credentials", "create", "--store", "a"])).unwrap();
    let akid = cred["XksProxyAuthenticationCredential"]["AccessKeyId"].as_str().unwrap().to_owned();
    let secret = cred["XksProxyAuthenticationCredential"]["RawSecretAccessKey"].as_str().unwrap().to_owned();
    let cli_records = records(&log).len();
    assert!(cli_records >= 3, "the CLI's changes are audited: {cli_records}");

    // A running server appends to the same file.
    let mut child = kmsgate(p)
        .args(["serve", "--bind", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr: SocketAddr = loop {
        let line = lines.next().unwrap().unwrap();
        if let Some(rest) = line.trim().strip_prefix("listening:") {
            break rest.split_whitespace().next().unwrap().split("://").nth(1).unwrap().parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});

    let plaintext = b"AUDIT-PLAINTEXT-SENTINEL-4711";
    let aad = b"AUDIT-AAD-SENTINEL-0815";
    let md = json!({"awsPrincipalArn": "arn:aws:iam::123456789012:user/Auditor", "kmsOperation": "Encrypt",
        "kmsKeyArn": "arn:aws:kms:eu-west-1:123456789012:key/a", "kmsRequestId": "audit-req-1"});
    let enc = json!({"requestMetadata": md, "plaintext": STANDARD.encode(plaintext),
        "additionalAuthenticatedData": STANDARD.encode(aad), "encryptionAlgorithm": "AES_GCM"});
    let r = xks(addr, &akid, &secret, &format!("/a/kms/xks/v1/keys/{key_id}/encrypt"), &enc).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let sealed = r.json();
    let dec = json!({"requestMetadata": md, "ciphertext": sealed["ciphertext"],
        "ciphertextMetadata": sealed["ciphertextMetadata"], "initializationVector": sealed["initializationVector"],
        "authenticationTag": sealed["authenticationTag"], "additionalAuthenticatedData": STANDARD.encode(aad),
        "encryptionAlgorithm": "AES_GCM"});
    let r = xks(addr, &akid, &secret, &format!("/a/kms/xks/v1/keys/{key_id}/decrypt"), &dec).await;
    assert_eq!(r.status, 200);
    assert_eq!(STANDARD.decode(r.json()["plaintext"].as_str().unwrap()).unwrap(), plaintext);
    // A refused operation is audited with its outcome.
    let mut bad = dec.clone();
    bad["authenticationTag"] = json!(STANDARD.encode([0u8; 16]));
    let r = xks(addr, &akid, &secret, &format!("/a/kms/xks/v1/keys/{key_id}/decrypt"), &bad).await;
    assert_eq!(r.status, 400);

    // SIGTERM: the server drains and writes its last records before exiting.
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "kmsgate did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }

    let all = records(&log);
    let text = std::fs::read_to_string(&log).unwrap();
    let xks_ops: Vec<&Value> = all.iter().filter(|r| r["frontend"] == "xks").collect();
    let find = |op: &str, outcome: &Value| {
        xks_ops.iter().find(|r| r["operation"] == op && &r["outcome"] == outcome && r["request_id"] == "audit-req-1")
    };
    let e = find("Encrypt", &json!("ok")).unwrap_or_else(|| panic!("no Encrypt record:\n{text}"));
    assert_eq!(e["resource"], key_id.as_str());
    assert_eq!(e["tenant"], "default");
    assert_eq!(e["metadata"]["awsPrincipalArn"], "arn:aws:iam::123456789012:user/Auditor");
    assert!(e["latency_us"].as_u64().is_some() && e["identity"].as_str().is_some_and(|i| !i.is_empty()));
    assert!(find("Decrypt", &json!("ok")).is_some(), "{text}");
    assert!(find("Decrypt", &json!({"error": {"kind": "invalid_ciphertext"}})).is_some(), "{text}");
    assert!(all.iter().any(|r| r["operation"] == "CreateKey" && r["frontend"] == "admin"), "{text}");

    // Never plaintext, AAD, credentials or key material, in any encoding.
    let kek = std::fs::read_to_string(p.join("kmsgate-data/kek")).unwrap();
    let hexed = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    for needle in [
        String::from_utf8_lossy(plaintext).into_owned(),
        STANDARD.encode(plaintext),
        hexed(plaintext),
        String::from_utf8_lossy(aad).into_owned(),
        STANDARD.encode(aad),
        hexed(aad),
        secret.clone(),
        kek.trim().to_owned(),
        sealed["ciphertext"].as_str().unwrap().to_owned(),
    ] {
        assert!(!text.contains(&needle), "the audit log contains a secret ({needle})");
    }

    // The chain verifies ...
    let out = run(p, &["--json", "audit", "verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["records"], all.len() as u64);
    assert_eq!(v["chains"], 1);

    // ... and every edit, removal or reordering is refused, naming where.
    let original: Vec<&str> = text.lines().collect();
    let tampered = p.join("tampered.log");
    let refused = |lines: Vec<String>, needle: &str| {
        std::fs::write(&tampered, lines.join("\n") + "\n").unwrap();
        let out = run(p, &["audit", "verify", tampered.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success() && err.contains(needle), "expected {needle:?}, got: {err}");
    };
    let pos = original.iter().position(|l| l.contains("invalid_ciphertext")).unwrap();
    let owned = || original.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>();
    let mut edited = owned();
    edited[pos] = edited[pos].replace("invalid_ciphertext", "ok");
    refused(edited, &format!("line {}: record", pos + 1));
    let mut removed = owned();
    removed.remove(pos - 1);
    refused(removed, "does not follow");
    let mut swapped = owned();
    swapped.swap(1, 2);
    refused(swapped, "line 2");
    let mut forged = owned();
    forged.insert(2, "{\"type\":\"kmsgate.audit\",\"seq\":3}".to_owned());
    refused(forged, "line 3");
    refused(owned()[1..].to_vec(), "not at the start");
}

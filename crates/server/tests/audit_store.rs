//! The audit log in the store (`[audit] destination = "store"`) on PostgreSQL: two servers and the CLI append
//! to one schema at the same time and build one chain without gaps or duplicates, the rows never carry
//! plaintext, AAD or credentials, and `kmsgate audit verify --store` accepts the chain and names the first bad
//! row after an edit, a removal and a reordering.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
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

/// Starts `kmsgate serve` and returns it with the address it listens on.
fn serve(p: &Path) -> (Child, SocketAddr) {
    let mut child = kmsgate(p)
        .args(["serve", "--bind", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr: SocketAddr = loop {
        let line = lines.next().expect("kmsgate serve exited before listening").unwrap();
        if let Some(rest) = line.trim().strip_prefix("listening:") {
            break rest.split_whitespace().next().unwrap().split("://").nth(1).unwrap().parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

/// SIGTERM: the server drains and writes its last records before exiting.
fn stop(mut child: Child) {
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "kmsgate did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn one_chain_in_postgresql_for_all_replicas() {
    let base =
        std::env::var("KMSGATE_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!("kmsgate_aud_{}_{}", std::process::id(), uuid::Uuid::new_v4().simple());
    let psql = |sql: &str| {
        let out =
            Command::new("psql").args([base.as_str(), "-qAtc", sql]).output().expect("psql (scripts/test installs it)");
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    psql(&format!("CREATE SCHEMA {schema}"));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
    std::fs::write(p.join("kmsgate.toml"), format!("[store]\nurl = \"{url}\"\n[audit]\ndestination = \"store\"\n"))
        .unwrap();

    let key: Value =
        serde_json::from_str(&cli_ok(p, &["--json", "keys", "create", "--alias", "alias/audited"])).unwrap();
    let key_id = key["id"].as_str().unwrap().to_owned();
    cli_ok(p, &["xks", "stores", "create", "--name", "a", "--prefix", "/a", "--all-keys"]);
    let cred: Value = serde_json::from_str(&cli_ok(p, &["xks", "credentials", "create", "--store", "a"])).unwrap();
    let akid = cred["XksProxyAuthenticationCredential"]["AccessKeyId"].as_str().unwrap().to_owned();
    let secret = cred["XksProxyAuthenticationCredential"]["RawSecretAccessKey"].as_str().unwrap().to_owned();

    // Two replicas on the one schema, and CLI processes changing keys, all at the same time.
    let (a, addr_a) = serve(p);
    let (b, addr_b) = serve(p);
    let plaintext = b"AUDIT-PLAINTEXT-SENTINEL-4711";
    let aad = b"AUDIT-AAD-SENTINEL-0815";
    const PER_SERVER: usize = 25;
    const CLI_CHANGES: usize = 4;
    let cli = {
        let p = p.to_owned();
        std::thread::spawn(move || {
            (0..CLI_CHANGES)
                .map(|i| {
                    let out = cli_ok(&p, &["--json", "keys", "create", "--alias", &format!("alias/cli-{i}")]);
                    serde_json::from_str::<Value>(&out).unwrap()["id"].as_str().unwrap().to_owned()
                })
                .collect::<Vec<_>>()
        })
    };
    let mut tasks = Vec::new();
    for (n, addr) in [addr_a, addr_b].into_iter().cycle().take(2 * PER_SERVER).enumerate() {
        let (akid, secret, key_id) = (akid.clone(), secret.clone(), key_id.clone());
        tasks.push(tokio::spawn(async move {
            let md = json!({"awsPrincipalArn": "arn:aws:iam::123456789012:user/Auditor", "kmsOperation": "Encrypt",
                "kmsKeyArn": "arn:aws:kms:eu-west-1:123456789012:key/a", "kmsRequestId": format!("audit-req-{n}")});
            let enc = json!({"requestMetadata": md, "plaintext": STANDARD.encode(plaintext),
                "additionalAuthenticatedData": STANDARD.encode(aad), "encryptionAlgorithm": "AES_GCM"});
            let r = xks(addr, &akid, &secret, &format!("/a/kms/xks/v1/keys/{key_id}/encrypt"), &enc).await;
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            r.json()["ciphertext"].as_str().unwrap().to_owned()
        }));
    }
    let mut ciphertexts = Vec::new();
    for t in tasks {
        ciphertexts.push(t.await.unwrap());
    }
    let cli_keys = cli.join().unwrap();
    stop(a);
    stop(b);

    // One chain: rows 1..N, every encrypt and every CLI change in it exactly once.
    let table = format!("{schema}.audit_log");
    let dump = psql(&format!("SELECT seq, hash, record FROM {table} ORDER BY seq"));
    let rows: Vec<(u64, &str, Value)> = dump
        .lines()
        .map(|l| {
            let mut f = l.splitn(3, '|');
            let seq = f.next().unwrap().parse().unwrap();
            let hash = f.next().unwrap();
            (seq, hash, serde_json::from_str(f.next().unwrap()).unwrap())
        })
        .collect();
    for (i, (seq, hash, r)) in rows.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1, "no gaps or duplicates");
        assert_eq!((r["seq"].as_u64(), r["hash"].as_str()), (Some(*seq), Some(*hash)));
    }
    for n in 0..2 * PER_SERVER {
        let id = format!("audit-req-{n}");
        let hits = rows.iter().filter(|(_, _, r)| r["operation"] == "Encrypt" && r["request_id"] == id).count();
        assert_eq!(hits, 1, "request {id} is recorded once:\n{dump}");
    }
    for id in cli_keys.iter().chain([&key_id]) {
        let hits =
            rows.iter().filter(|(_, _, r)| r["operation"] == "CreateKey" && r["resource"] == id.as_str()).count();
        assert_eq!(hits, 1, "the CLI's CreateKey of {id} is recorded once:\n{dump}");
    }

    // Never plaintext, AAD, credentials or key material, in any encoding.
    let kek = std::fs::read_to_string(p.join("kmsgate-data/kek")).unwrap();
    let hexed = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut needles = vec![
        String::from_utf8_lossy(plaintext).into_owned(),
        STANDARD.encode(plaintext),
        hexed(plaintext),
        String::from_utf8_lossy(aad).into_owned(),
        STANDARD.encode(aad),
        hexed(aad),
        secret.clone(),
        kek.trim().to_owned(),
    ];
    needles.extend(ciphertexts);
    for needle in needles {
        assert!(!dump.contains(&needle), "the audit table contains a secret ({needle})");
    }

    // The chain verifies ...
    let out = run(p, &["--json", "audit", "verify", "--store"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["records"].as_u64(), v["chains"].as_u64()), (Some(rows.len() as u64), Some(1)));
    assert_eq!(v["head"]["hash"], rows.last().unwrap().1);

    // ... and each tampering is refused, naming the first bad row; the table is restored in between.
    psql(&format!("CREATE TABLE {schema}.audit_backup AS SELECT * FROM {table}"));
    let restore = || psql(&format!("DELETE FROM {table}; INSERT INTO {table} SELECT * FROM {schema}.audit_backup"));
    let refused = |tamper: String, needle: &str| {
        psql(&tamper);
        let out = run(p, &["audit", "verify", "--store"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success() && err.contains(needle), "expected {needle:?}, got: {err}");
        restore();
        assert!(run(p, &["audit", "verify", "--store"]).status.success(), "restored");
    };
    let k = rows.len() / 2;
    refused(
        format!("UPDATE {table} SET record = replace(record, '\"Encrypt\"', '\"Decrypt\"') WHERE seq = {k}"),
        &format!("seq {k}: record {k} was altered"),
    );
    refused(format!("DELETE FROM {table} WHERE seq = {k}"), &format!("seq {k}: the record is missing"));
    refused(format!("DELETE FROM {table} WHERE seq = 1"), "seq 1: the record is missing");
    // Reordering: rows k and k+1 swap their records (and hash columns).
    refused(
        format!(
            "UPDATE {table} t SET record = o.record, hash = o.hash FROM {schema}.audit_backup o \
             WHERE (t.seq = {k} AND o.seq = {k} + 1) OR (t.seq = {k} + 1 AND o.seq = {k})"
        ),
        &format!("seq {k}: record {} does not follow record {}", k + 1, k - 1),
    );
    // Renumbering a record to hide a removal: its columns no longer match its content.
    refused(
        format!("DELETE FROM {table} WHERE seq = {k}; UPDATE {table} SET seq = {k} WHERE seq = {k} + 1"),
        &format!("seq {k}: record {} does not follow", k + 1),
    );
    psql(&format!("DROP SCHEMA {schema} CASCADE"));
}

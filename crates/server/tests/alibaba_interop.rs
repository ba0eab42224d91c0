//! Interop: Alibaba's own instance SDKs (PyPI `alibabacloud-dkms-gcs`, `alibabacloud-kms-python-sdk`) against
//! the server's router over HTTPS with the gateway's CA. `./scripts/test` creates the virtualenv with both.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use kmsgate::app::App;
use kmsgate::config::{Config, TlsConfig};
use kmsgate_alibaba::clientkey;
use kmsgate_core::{CreateKeyRequest, KeyRef, KeySpec, PutSecretRequest, SecretPath};

fn python() -> String {
    if let Ok(p) = std::env::var("KMSGATE_TEST_PYTHON") {
        return p;
    }
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/venv/bin/python");
    for candidate in [venv, "python3"] {
        let ok = std::process::Command::new(candidate)
            .args(["-c", "import sdk.client, alibabacloud_kms_kms20160120.transfer_client"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return candidate.to_owned();
        }
    }
    panic!(
        "the Alibaba SDKs are needed for this interop test: run ./scripts/test, or set KMSGATE_TEST_PYTHON to a \
         python with alibabacloud-dkms-gcs and alibabacloud-kms-python-sdk"
    );
}

/// A CA and a server certificate for 127.0.0.1 (IP SAN: the SDK checks the host name).
fn pki(dir: &std::path::Path) -> (TlsConfig, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(rcgen::DnType::CommonName, "kmsgate test CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    leaf.distinguished_name.push(rcgen::DnType::CommonName, "127.0.0.1");
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let (cert_path, key_path, ca_path) = (dir.join("server.pem"), dir.join("server.key"), dir.join("ca.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    (TlsConfig { cert: cert_path, key: key_path, client_ca: None, client_subjects: Vec::new() }, ca_path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vendor_sdks_work_unchanged() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let (tls, ca_path) = pki(dir.path());
    let config = Config { data_dir: dir.path().join("data"), ..Config::default() };
    let (app, _) = App::open(config).await.unwrap();
    let d = app.dispatcher.clone();
    let admin = app.admin();

    let key = |spec| {
        let d = d.clone();
        let admin = admin.clone();
        async move { d.create_key(&admin, CreateKeyRequest::new(spec)).await.unwrap().id.to_string() }
    };
    let aes = key(KeySpec::Aes256).await;
    let rsa = key(KeySpec::Rsa2048).await;
    let ec = key(KeySpec::EcP256).await;
    let disabled = key(KeySpec::Aes256).await;
    d.disable_key(&admin, &KeyRef::parse(&disabled).unwrap()).await.unwrap();
    let pending = key(KeySpec::Aes256).await;
    d.schedule_key_deletion(&admin, &KeyRef::parse(&pending).unwrap(), 7).await.unwrap();
    let path = SecretPath::parse("app/db").unwrap();
    d.put_secret(&admin, PutSecretRequest::new(path.clone(), b"old".to_vec())).await.unwrap();
    d.put_secret(&admin, PutSecretRequest::new(path, b"new".to_vec())).await.unwrap();

    let ck = clientkey::create(&d, &admin, "interop", "").await.unwrap();
    let key_file = dir.path().join("client.pem");
    std::fs::write(&key_file, ck.private_key_pem().unwrap().as_bytes()).unwrap();
    // Another ClientKey's private key under this id: a signature that does not verify.
    let other = clientkey::create(&d, &admin, "other", "").await.unwrap();
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, other.private_key_pem().unwrap().as_bytes()).unwrap();

    let router = kmsgate::serve::router(&app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let tls = kmsgate::http::tls_config(&tls).unwrap();
    tokio::spawn(kmsgate::http::serve(
        listener,
        Some(tls),
        router,
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(1),
    ));

    let ids = serde_json::json!({ "aes": aes, "rsa": rsa, "ec": ec, "disabled": disabled, "pending": pending });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../alibaba/tests/sdk_interop.py");
    let args = [
        script.to_owned(),
        addr.to_string(),
        ca_path.display().to_string(),
        ck.id.clone(),
        key_file.display().to_string(),
        other_file.display().to_string(),
        ids.to_string(),
    ];
    let output = tokio::task::spawn_blocking(move || std::process::Command::new(python).args(args).output().unwrap())
        .await
        .unwrap();
    let _ = tx.send(());
    assert!(output.status.success(), "SDK script failed: {}", String::from_utf8_lossy(&output.stderr));
    let r: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    assert_eq!(r["decrypt"], "hello");
    assert_eq!(r["advance_decrypt"], "advance");
    assert_eq!(r["random_len"], 32);
    assert_eq!(r["data_key_opens"], true);
    assert_eq!(r["advance_data_key_opens"], true);
    for alg in ["RSA_PKCS1_SHA_256", "RSA_PSS_SHA_256", "ECDSA_SHA_256"] {
        assert_eq!(r[format!("verify_{alg}")], true, "{alg}");
    }
    assert_eq!(r["public_key"], true);
    assert_eq!(r["secret"], serde_json::json!(["new", ["ACSCurrent"]]));
    assert_eq!(r["secret_previous"], serde_json::json!(["old", ["ACSPrevious"]]));
    for api in ["generate_data_key_pair", "advance_generate_data_key_pair", "advance_pair_opens", "pair_opens"] {
        assert_eq!(r[api], true, "{api}");
    }
    assert_eq!(r["transfer_decrypt"], "from the wrapper");
    assert_eq!(r["transfer_data_key"], true);
    assert_eq!(r["transfer_public_key"], true);
    assert_eq!(r["cross_sdk"], "from the wrapper");
    let err = |name: &str, code: &str, status: u16| {
        assert_eq!(r[name], serde_json::json!([code, status, true]), "{name}");
    };
    err("err_missing_key", "Forbidden.KeyNotFound", 404);
    err("err_disabled", "Rejected.Disabled", 409);
    err("err_pending_deletion", "Rejected.PendingDeletion", 409);
    err("err_bad_signature", "SignatureNotMatch", 401);
    err("err_unknown_client_key", "Unauthorized", 401);
    err("err_skewed_date", "RequestTimeTooSkewed", 400);
    err("err_too_large", "InvalidParameter", 413);
}

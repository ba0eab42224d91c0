//! TLS to PostgreSQL. The shared server's certificate is not signed by a CA this test controls, so it starts a
//! private cluster (see `kmsgate_store::pgcluster`) serving a certificate for `localhost` signed by a fresh test
//! CA, and connects with `sslmode`/`sslrootcert` in the store URL.

// Tests report failures by panicking; `expect` names what failed.
#![allow(clippy::expect_used)]

use std::time::{Duration, Instant};

use kmsgate_core::{ErrorKind, Store};
use kmsgate_store::pgcluster::{PrivateCluster, TlsFiles};
use kmsgate_store::testsuite::{key_id, sample_key, tenant};
use kmsgate_store::{SqlStore, StoreOptions};
use sqlx::AnyPool;

struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = rcgen::KeyPair::generate().expect("CA key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).expect("self-sign the CA");
    Ca { pem: cert.pem(), issuer: rcgen::Issuer::new(params, key) }
}

/// A server certificate for `localhost` only (no IP address), so connecting by IP is a name mismatch.
fn server_cert(ca: &Ca) -> TlsFiles {
    let key = rcgen::KeyPair::generate().expect("server key");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
    params.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca.issuer).expect("sign the server certificate");
    TlsFiles { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
}

fn options() -> StoreOptions {
    StoreOptions::default().max_connections(2).acquire_timeout(Duration::from_secs(5))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_right_ca_connects_and_a_wrong_ca_is_a_clear_storage_error() {
    let good = ca("kmsgate test database CA");
    let wrong = ca("kmsgate some other CA");
    let cluster = tokio::task::spawn_blocking({
        let files = server_cert(&good);
        move || PrivateCluster::start(Some(&files))
    })
    .await
    .expect("start the cluster");
    let good_ca = cluster.dir().join("good-ca.pem");
    let wrong_ca = cluster.dir().join("wrong-ca.pem");
    std::fs::write(&good_ca, &good.pem).expect("write CA");
    std::fs::write(&wrong_ca, &wrong.pem).expect("write CA");
    let port = cluster.port();
    let url = |host: &str, mode: &str, ca: &std::path::Path| {
        format!("postgres://postgres@{host}:{port}/test?sslmode={mode}&sslrootcert={}", ca.display())
    };

    // The right CA and the certificate's name: the store opens, works, and the session really is encrypted.
    let verified = url("localhost", "verify-full", &good_ca);
    let store = SqlStore::open_with(&verified, options()).await.unwrap_or_else(|e| {
        panic!("verify-full with the signing CA must connect: {e:?}\n{}", cluster.log());
    });
    let created = store.create_key(&sample_key("acme", "over-tls"), &[]).await.expect("write over TLS");
    assert_eq!(store.get_key(&tenant("acme"), &key_id("over-tls")).await.expect("read over TLS"), Some(created));
    store.close().await;
    sqlx::any::install_default_drivers();
    let pool = AnyPool::connect(&verified).await.expect("connect");
    let ssl: i32 =
        sqlx::query_scalar("SELECT CASE WHEN ssl THEN 1 ELSE 0 END FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .expect("pg_stat_ssl");
    assert_eq!(ssl, 1, "the server sees a TLS session");
    pool.close().await;

    // A CA that did not sign the server's certificate: refused in the handshake, as a storage error that says
    // it is TLS, promptly, and without the URL's secrets.
    let started = Instant::now();
    let err = SqlStore::open_with(&url("localhost", "verify-full", &wrong_ca), options())
        .await
        .expect_err("a certificate from another CA must be refused");
    assert_eq!(err.kind(), ErrorKind::StorageFailure, "{err:?}");
    assert_eq!(err.message(), "the TLS connection to the database failed", "{:?}", err.internal_source());
    let cause = format!("{:?}", err.internal_source());
    assert!(cause.contains("UnknownIssuer") || cause.contains("certificate"), "the log says why: {cause}");
    assert!(started.elapsed() < Duration::from_secs(5), "no waiting out the acquire timeout: {:?}", started.elapsed());

    // verify-full checks the name: the certificate is for `localhost`, not for 127.0.0.1 ...
    let err = SqlStore::open_with(&url("127.0.0.1", "verify-full", &good_ca), options())
        .await
        .expect_err("a name mismatch must be refused");
    assert_eq!(err.message(), "the TLS connection to the database failed", "{err:?} {:?}", err.internal_source());
    let cause = err.internal_source().map(ToString::to_string).unwrap_or_default();
    assert!(cause.contains("not valid for name"), "the log says why: {cause}");
    // ... which verify-ca does not (the chain alone is checked).
    let store = SqlStore::open_with(&url("127.0.0.1", "verify-ca", &good_ca), options()).await.expect("verify-ca");
    assert!(store.get_key(&tenant("acme"), &key_id("over-tls")).await.expect("read").is_some());
    store.close().await;
}

/// `sslmode=require` against a server without TLS fails instead of silently talking in the clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_against_a_server_without_tls_fails() {
    let cluster = tokio::task::spawn_blocking(|| PrivateCluster::start(None)).await.expect("start the cluster");
    let err = SqlStore::open_with(&cluster.url("sslmode=require"), options()).await.expect_err("no TLS on the server");
    assert_eq!(err.kind(), ErrorKind::StorageFailure, "{err:?}");
    assert_eq!(err.message(), "the TLS connection to the database failed", "{err:?}");
    // The default (`prefer`) still connects in the clear.
    let store = SqlStore::open_with(&cluster.url(""), options()).await.expect("prefer falls back to plain");
    store.ping().await.expect("ping");
    store.close().await;
}

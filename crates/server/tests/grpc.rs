//! The internal gRPC API over real sockets with a tonic client: TLS and mTLS, every RPC, every status code the
//! API returns, deadline propagation into the dispatcher, health, reflection, and the same keys and secrets
//! seen through the Alibaba instance API and the CLI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kmsgate::config::TlsConfig;
use kmsgate::grpc::GrpcConfig;
use kmsgate_core::backend::KeyMaterialRef;
use kmsgate_core::{
    Caller, Dispatcher, DispatcherConfig, Document, HealthStatus, KeyBackend, KeyId, KeySpec, KeyUsageSet,
    MemberHealth, Operation, Precondition, SigningAlgorithm, TenantId,
};
use kmsgate_grpc::error::decode_details;
use kmsgate_grpc::proto::kmsgate_v1 as pb;
use kmsgate_grpc::proto::kmsgate_v1::key_management_service_client::KeyManagementServiceClient;
use kmsgate_grpc::proto::kmsgate_v1::secrets_service_client::SecretsServiceClient;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;
use zeroize::Zeroizing;

// ---- PKI and TLS -------------------------------------------------------------------------------------

struct Pki {
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_pem: String,
}

impl Pki {
    fn new(cn: &str) -> Pki {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Pki { ca_pem: cert.pem(), ca: rcgen::Issuer::new(params, key) }
    }

    /// (certificate PEM, key PEM) of a leaf.
    fn leaf(&self, cn: &str, sans: &[&str], client: bool) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Server TLS files in `dir`; with `mtls`, client certificates of this CA are requested and verified.
    fn server_tls(&self, dir: &std::path::Path, mtls: bool) -> TlsConfig {
        let (cert, key) = self.leaf("localhost", &["localhost"], false);
        std::fs::write(dir.join("server.pem"), cert).unwrap();
        std::fs::write(dir.join("server.key"), key).unwrap();
        std::fs::write(dir.join("ca.pem"), &self.ca_pem).unwrap();
        TlsConfig {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            client_ca: mtls.then(|| dir.join("ca.pem")),
            client_subjects: Vec::new(),
        }
    }
}

/// A rustls client config (ALPN h2) trusting `ca_pem`, with an optional client certificate.
fn client_tls(ca_pem: &str, identity: Option<&(String, String)>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
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
            let certs = CertificateDer::pem_slice_iter(cert.as_bytes()).map(Result::unwrap).collect();
            b.with_client_auth_cert(certs, PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap()).unwrap()
        }
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// A tonic channel over our own rustls connector (ALPN h2), trusting `ca_pem`, with an optional client cert.
async fn channel(addr: SocketAddr, ca_pem: &str, identity: Option<&(String, String)>) -> Result<Channel, String> {
    use rustls::pki_types::ServerName;
    let connector = tokio_rustls::TlsConnector::from(client_tls(ca_pem, identity));
    let svc = tower::service_fn(move |_uri: http::Uri| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await?;
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "h2 negotiated by ALPN");
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Endpoint::from_static("http://localhost").connect_with_connector(svc).await.map_err(|e| format!("{e:?}"))
}

// ---- servers -----------------------------------------------------------------------------------------

struct GrpcServer {
    addr: SocketAddr,
    pki: Pki,
    /// Registered as `app` in the default tenant (when the server does mTLS).
    app_cert: (String, String),
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl GrpcServer {
    async fn kms(&self) -> KeyManagementServiceClient<Channel> {
        KeyManagementServiceClient::new(channel(self.addr, &self.pki.ca_pem, Some(&self.app_cert)).await.unwrap())
    }

    async fn secrets(&self) -> SecretsServiceClient<Channel> {
        SecretsServiceClient::new(channel(self.addr, &self.pki.ca_pem, Some(&self.app_cert)).await.unwrap())
    }
}

/// Serves the gRPC API of `d` over TLS (mTLS with `mtls`) and registers the client subject
/// `app.internal` as identity `app` of the default tenant.
async fn serve(d: &Dispatcher, mtls: bool, cfg: GrpcConfig) -> GrpcServer {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("kmsgate gRPC test CA");
    let tls = kmsgate::grpc::tls_config(&pki.server_tls(dir.path(), mtls)).unwrap();
    let admin = Caller::admin(TenantId::default_tenant());
    match kmsgate_grpc::auth::add_client(d, &admin, "app.internal", "app", "test client").await {
        Ok(_) => {}
        Err(e) if e.kind() == kmsgate_core::ErrorKind::AlreadyExists => {}
        Err(e) => panic!("{e:?}"),
    }
    let app_cert = pki.leaf("app", &["app.internal"], true);
    let router = kmsgate::grpc::router(d.clone(), &cfg, kmsgate::grpc::auth_chain(d, None)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(kmsgate::http::serve(
        listener,
        Some(tls),
        router,
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(1),
    ));
    GrpcServer { addr, pki, app_cert, _dir: dir, _stop: tx }
}

fn grpc_config() -> GrpcConfig {
    GrpcConfig { enabled: true, health_watch_secs: 1, ..GrpcConfig::default() }
}

/// The ErrorInfo reason of a kmsgate status (and checks the standard details are there).
fn reason(s: &tonic::Status) -> String {
    let (body, info) = decode_details(s).unwrap_or_else(|| panic!("no google.rpc.Status details in {s:?}"));
    assert_eq!(body.code, s.code() as i32);
    let info = info.expect("ErrorInfo");
    assert_eq!(info.domain, "kmsgate");
    info.reason
}

fn expect_err<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    why: &str,
) -> tonic::Status {
    let s = r.expect_err(why);
    assert_eq!(s.code(), code, "{why}: {s:?}");
    s
}

fn sha256(data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref().to_vec()
}

// ---- every RPC over mTLS -----------------------------------------------------------------------------

#[tokio::test]
async fn every_rpc_over_mtls() {
    let env = common::Env::software().await;
    let s = serve(&env.dispatcher, true, grpc_config()).await;
    let mut kms = s.kms().await;

    // Keys: create (with alias, tags, explicit usages), describe, list with paging.
    let aes = kms
        .create_key(pb::CreateKeyRequest {
            spec: pb::KeySpec::Aes256 as i32,
            description: "payments".into(),
            tags: [("team".to_owned(), "pay".to_owned())].into(),
            aliases: vec!["alias/payments".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(aes.spec, pb::KeySpec::Aes256 as i32);
    assert_eq!(aes.state, pb::KeyState::Enabled as i32);
    assert_eq!(aes.usages, vec![pb::KeyUsage::Encrypt as i32, pb::KeyUsage::Decrypt as i32]);
    assert_eq!(aes.tags.get("team").map(String::as_str), Some("pay"));
    let ec = kms
        .create_key(pb::CreateKeyRequest { spec: pb::KeySpec::EcP256 as i32, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    let hmac = kms
        .create_key(pb::CreateKeyRequest {
            spec: pb::KeySpec::Hmac256 as i32,
            key_id: "mac-key-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(hmac.key_id, "mac-key-1");
    let described =
        kms.describe_key(pb::DescribeKeyRequest { key_id: "alias/payments".into() }).await.unwrap().into_inner();
    assert_eq!(described.key.unwrap().key_id, aes.key_id);
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page =
            kms.list_keys(pb::ListKeysRequest { page_size: 1, page_token: token.clone() }).await.unwrap().into_inner();
        assert!(page.keys.len() <= 1);
        seen.extend(page.keys.into_iter().map(|k| k.key_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    for k in [&aes.key_id, &ec.key_id, &hmac.key_id] {
        assert!(seen.contains(k), "{k} listed over pages");
    }

    // Encrypt / Decrypt by alias, with AAD.
    let e = kms
        .encrypt(pb::EncryptRequest {
            key_id: "alias/payments".into(),
            plaintext: b"card 4111".to_vec(),
            aad: b"ctx".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((e.key_id.as_str(), e.iv.len(), e.tag.len()), (aes.key_id.as_str(), 12, 16));
    assert_eq!(e.algorithm, pb::EncryptionAlgorithm::Aes256Gcm as i32);
    let decrypt = |e: &pb::EncryptResponse, aad: &[u8]| pb::DecryptRequest {
        key_id: e.key_id.clone(),
        key_version: e.key_version.clone(),
        iv: e.iv.clone(),
        ciphertext: e.ciphertext.clone(),
        tag: e.tag.clone(),
        aad: aad.to_vec(),
        ..Default::default()
    };
    let p = kms.decrypt(decrypt(&e, b"ctx")).await.unwrap().into_inner();
    assert_eq!(p.plaintext, b"card 4111");

    // GenerateDataKey: the encrypted copy opens to the plaintext copy.
    let dk = kms
        .generate_data_key(pb::GenerateDataKeyRequest { key_id: aes.key_id.clone(), length: 0, aad: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dk.plaintext.len(), 32);
    let opened = kms
        .decrypt(pb::DecryptRequest {
            key_id: dk.key_id.clone(),
            key_version: dk.key_version.clone(),
            iv: dk.iv.clone(),
            ciphertext: dk.ciphertext.clone(),
            tag: dk.tag.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, dk.plaintext);

    // Sign / Verify (message and digest) and GetPublicKey; the signature verifies with aws-lc-rs too.
    let msg = b"release v1.2.3".to_vec();
    let sig = kms
        .sign(pb::SignRequest {
            key_id: ec.key_id.clone(),
            algorithm: pb::SigningAlgorithm::EcdsaSha256 as i32,
            input: Some(pb::sign_request::Input::Message(msg.clone())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let verify = |input, signature: Vec<u8>| pb::VerifyRequest {
        key_id: ec.key_id.clone(),
        algorithm: pb::SigningAlgorithm::EcdsaSha256 as i32,
        input: Some(input),
        signature,
        ..Default::default()
    };
    let v = kms.verify(verify(pb::verify_request::Input::Digest(sha256(&msg)), sig.signature.clone())).await;
    assert!(v.unwrap().into_inner().valid);
    let v = kms.verify(verify(pb::verify_request::Input::Message(b"other".to_vec()), sig.signature.clone())).await;
    assert!(!v.unwrap().into_inner().valid);
    let pk = kms
        .get_public_key(pb::GetPublicKeyRequest { key_id: ec.key_id.clone(), key_version: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pk.spec, pb::KeySpec::EcP256 as i32);
    assert!(pk.public_key_pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
    let spki = pk.public_key_der;
    // The SPKI of P-256 ends with the 65-byte uncompressed point.
    let point = &spki[spki.len() - 65..];
    aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1, point)
        .verify(&msg, &sig.signature)
        .or_else(|_| {
            aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(&msg, &sig.signature)
        })
        .expect("the signature verifies against the public key");

    // Random, Hmac, VerifyHmac.
    let r = kms.random(pb::RandomRequest { length: 48 }).await.unwrap().into_inner();
    assert_eq!(r.random.len(), 48);
    let mac = kms.hmac(pb::HmacRequest { key_id: hmac.key_id.clone(), data: b"m".to_vec() }).await.unwrap();
    let mac = mac.into_inner().mac;
    assert_eq!(mac.len(), 32);
    let ok = kms.verify_hmac(pb::VerifyHmacRequest { key_id: hmac.key_id.clone(), data: b"m".to_vec(), mac }).await;
    assert!(ok.unwrap().into_inner().valid);

    // Rotate: a new primary version; the old ciphertext still opens with the version it names.
    let rotated = kms.rotate_key(pb::RotateKeyRequest { key_id: aes.key_id.clone() }).await.unwrap();
    let rotated = rotated.into_inner().key.unwrap();
    assert_eq!(rotated.versions.len(), 2);
    assert_ne!(rotated.primary_version, e.key_version);
    assert_eq!(kms.decrypt(decrypt(&e, b"ctx")).await.unwrap().into_inner().plaintext, b"card 4111");
    let e2 = kms
        .encrypt(pb::EncryptRequest { key_id: aes.key_id.clone(), plaintext: b"x".to_vec(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e2.key_version, rotated.primary_version);

    // Disable / Enable, ScheduleKeyDeletion / CancelKeyDeletion.
    let k = kms.disable_key(pb::DisableKeyRequest { key_id: aes.key_id.clone() }).await.unwrap().into_inner();
    assert_eq!(k.key.unwrap().state, pb::KeyState::Disabled as i32);
    let k = kms.enable_key(pb::EnableKeyRequest { key_id: aes.key_id.clone() }).await.unwrap().into_inner();
    assert_eq!(k.key.unwrap().state, pb::KeyState::Enabled as i32);
    let k = kms
        .schedule_key_deletion(pb::ScheduleKeyDeletionRequest { key_id: ec.key_id.clone(), pending_window_days: 7 })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(k.state, pb::KeyState::PendingDeletion as i32);
    assert!(k.deletion_at.is_some());
    let k = kms
        .cancel_key_deletion(pb::CancelKeyDeletionRequest { key_id: ec.key_id.clone(), enable: true })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!((k.state, k.deletion_at), (pb::KeyState::Enabled as i32, None));

    // Aliases: create, update, list (by key and all), delete.
    let a = kms
        .create_alias(pb::CreateAliasRequest { alias: "alias/signer".into(), key_id: ec.key_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .alias
        .unwrap();
    assert_eq!(a.key_id, ec.key_id);
    let a = kms
        .update_alias(pb::UpdateAliasRequest { alias: "alias/signer".into(), key_id: hmac.key_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .alias
        .unwrap();
    assert_eq!(a.key_id, hmac.key_id);
    let list = kms
        .list_aliases(pb::ListAliasesRequest { key_id: hmac.key_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.aliases.iter().map(|a| a.alias.as_str()).collect::<Vec<_>>(), ["alias/signer"]);
    let all = kms.list_aliases(pb::ListAliasesRequest::default()).await.unwrap().into_inner();
    assert!(all.aliases.iter().any(|a| a.alias == "alias/payments"));
    kms.delete_alias(pb::DeleteAliasRequest { alias: "alias/signer".into() }).await.unwrap();

    // Health (audited).
    let h = kms.health(pb::HealthRequest {}).await.unwrap().into_inner();
    assert!(h.ready && h.store_ok);
    assert_eq!(h.members.first().map(|m| m.status.as_str()), Some("ok"));

    // Secrets: put (create, then a version), get (current and by version), list, delete.
    let mut sec = s.secrets().await;
    let w = sec
        .put_secret(pb::PutSecretRequest {
            path: "apps/web/db".into(),
            data: b"pw-1".to_vec(),
            metadata_json: Some(r#"{"owner":"web"}"#.into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(w.created);
    assert_eq!(w.version.unwrap().version, 1);
    let w = sec
        .put_secret(pb::PutSecretRequest {
            path: "apps/web/db".into(),
            data: b"pw-2".to_vec(),
            cas: Some(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((w.created, w.secret.unwrap().current_version), (false, 2));
    let g = sec.get_secret(pb::GetSecretRequest { path: "apps/web/db".into(), selector: None }).await.unwrap();
    let g = g.into_inner();
    assert_eq!(g.data, b"pw-2");
    assert!(g.version.unwrap().stages.contains(&"current".to_owned()));
    assert!(g.secret.unwrap().metadata_json.contains("web"));
    let g = sec
        .get_secret(pb::GetSecretRequest {
            path: "apps/web/db".into(),
            selector: Some(pb::get_secret_request::Selector::Version(1)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.data, b"pw-1");
    let g = sec
        .get_secret(pb::GetSecretRequest {
            path: "apps/web/db".into(),
            selector: Some(pb::get_secret_request::Selector::Stage("previous".into())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.data, b"pw-1");
    sec.put_secret(pb::PutSecretRequest { path: "apps/webx".into(), data: b"x".to_vec(), ..Default::default() })
        .await
        .unwrap();
    let l = sec
        .list_secrets(pb::ListSecretsRequest { prefix: "apps/web".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.secrets.iter().map(|s| s.path.as_str()).collect::<Vec<_>>(), ["apps/web/db"], "segment-wise prefix");
    let del = sec
        .delete_secret(pb::DeleteSecretRequest { path: "apps/web/db".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(del.secret.unwrap().recoverable_until.is_some());
    let gone = sec.get_secret(pb::GetSecretRequest { path: "apps/web/db".into(), selector: None }).await;
    assert_eq!(reason(&expect_err(gone, Code::NotFound, "soft-deleted")), "secret_not_found");
    let l = sec
        .list_secrets(pb::ListSecretsRequest { prefix: "apps".into(), include_deleted: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.secrets.len(), 2);
    sec.delete_secret(pb::DeleteSecretRequest { path: "apps/webx".into(), permanent: true, ..Default::default() })
        .await
        .unwrap();

    // Request ids: the caller's, or the listener's own (echoed in the response), name the audit record.
    let mut req = tonic::Request::new(pb::RandomRequest { length: 1 });
    req.metadata_mut().insert("x-request-id", "req-grpc-1".parse().unwrap());
    kms.random(req).await.unwrap();
    let resp = kms.random(pb::RandomRequest { length: 1 }).await.unwrap();
    let echoed = resp.metadata().get("x-request-id").unwrap().to_str().unwrap().to_owned();
    let ids: Vec<_> = env
        .audit
        .events()
        .into_iter()
        .filter(|e| e.operation == Operation::GenerateRandom)
        .map(|e| e.request_id)
        .collect();
    assert!(ids.contains(&"req-grpc-1".to_owned()), "{ids:?}");
    assert_eq!(ids.last(), Some(&echoed));

    // Every call was audited as the mapped identity through the gRPC frontend.
    let events = env.audit.events();
    let enc = events.iter().find(|e| e.operation == Operation::Encrypt).unwrap();
    assert_eq!((enc.identity.as_str(), enc.frontend.as_str()), ("app", "grpc"));
    assert_eq!(enc.metadata.get("client_subject").map(String::as_str), Some("app.internal"));
    assert!(events.iter().any(|e| e.operation == Operation::PutSecretValue || e.operation == Operation::CreateSecret));
}

/// RSA and EC keys over gRPC: OAEP encryption, PKCS#1 v1.5 and PSS signatures, ECDSA, public keys.
async fn asymmetric_round_trips(kms: &mut KeyManagementServiceClient<Channel>) {
    let rsa = kms
        .create_key(pb::CreateKeyRequest {
            spec: pb::KeySpec::Rsa2048 as i32,
            usage: Some(pb::KeyUsages {
                usages: [pb::KeyUsage::Encrypt, pb::KeyUsage::Decrypt, pb::KeyUsage::Sign, pb::KeyUsage::Verify]
                    .map(|u| u as i32)
                    .to_vec(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    let e = kms
        .encrypt(pb::EncryptRequest {
            key_id: rsa.key_id.clone(),
            plaintext: b"wrapped".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((e.algorithm, e.iv.len(), e.tag.len()), (pb::EncryptionAlgorithm::RsaOaepSha256 as i32, 0, 0));
    assert_eq!(e.ciphertext.len(), 256);
    let p = kms
        .decrypt(pb::DecryptRequest {
            key_id: rsa.key_id.clone(),
            ciphertext: e.ciphertext.clone(),
            algorithm: pb::EncryptionAlgorithm::RsaOaepSha256 as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.plaintext, b"wrapped");
    for alg in [pb::SigningAlgorithm::RsaPkcs1Sha256, pb::SigningAlgorithm::RsaPssSha256] {
        let sig = kms
            .sign(pb::SignRequest {
                key_id: rsa.key_id.clone(),
                algorithm: alg as i32,
                input: Some(pb::sign_request::Input::Digest(sha256(b"doc"))),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(sig.signature.len(), 256);
        let v = kms
            .verify(pb::VerifyRequest {
                key_id: rsa.key_id.clone(),
                algorithm: alg as i32,
                input: Some(pb::verify_request::Input::Message(b"doc".to_vec())),
                signature: sig.signature,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(v.valid, "{alg:?}");
    }
    let pk =
        kms.get_public_key(pb::GetPublicKeyRequest { key_id: rsa.key_id.clone(), key_version: String::new() }).await;
    assert_eq!(pk.unwrap().into_inner().spec, pb::KeySpec::Rsa2048 as i32);
}

#[tokio::test]
async fn rsa_over_the_software_backend() {
    let env = common::Env::software().await;
    let s = serve(&env.dispatcher, true, grpc_config()).await;
    asymmetric_round_trips(&mut s.kms().await).await;
}

/// The same API against the real HSM (SoftHSMv2 through PKCS#11), including a rotation and a deadline.
#[tokio::test]
async fn over_softhsm_pkcs11() {
    let env = common::Env::pkcs11().await;
    let s = serve(&env.dispatcher, true, grpc_config()).await;
    let mut kms = s.kms().await;
    let key = kms
        .create_key(pb::CreateKeyRequest { spec: pb::KeySpec::Aes256 as i32, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(key.versions[0].backend, "hsm-test");
    let e = kms
        .encrypt(pb::EncryptRequest {
            key_id: key.key_id.clone(),
            plaintext: b"in the HSM".to_vec(),
            aad: b"a".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    kms.rotate_key(pb::RotateKeyRequest { key_id: key.key_id.clone() }).await.unwrap();
    let mut req = tonic::Request::new(pb::DecryptRequest {
        key_id: key.key_id.clone(),
        key_version: e.key_version.clone(),
        iv: e.iv.clone(),
        ciphertext: e.ciphertext.clone(),
        tag: e.tag.clone(),
        aad: b"a".to_vec(),
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(5));
    assert_eq!(kms.decrypt(req).await.unwrap().into_inner().plaintext, b"in the HSM");
    let mac_key = kms
        .create_key(pb::CreateKeyRequest { spec: pb::KeySpec::Hmac256 as i32, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    let mac = kms.hmac(pb::HmacRequest { key_id: mac_key.key_id.clone(), data: b"d".to_vec() }).await.unwrap();
    let ok = kms
        .verify_hmac(pb::VerifyHmacRequest { key_id: mac_key.key_id, data: b"d".to_vec(), mac: mac.into_inner().mac })
        .await
        .unwrap();
    assert!(ok.into_inner().valid);
    assert_eq!(kms.random(pb::RandomRequest { length: 32 }).await.unwrap().into_inner().random.len(), 32);
    asymmetric_round_trips(&mut kms).await;
    let h = kms.health(pb::HealthRequest {}).await.unwrap().into_inner();
    assert!(h.ready);
    assert!(h.members.iter().any(|m| m.id.starts_with("hsm-test") && m.status == "ok"), "{:?}", h.members);
}

// ---- authentication over TLS and mTLS ----------------------------------------------------------------

#[tokio::test]
async fn authentication_tls_and_mtls() {
    let env = common::Env::software().await;
    let s = serve(&env.dispatcher, true, grpc_config()).await;

    // A certificate of the CA whose subject is not registered: UNAUTHENTICATED.
    let stranger = s.pki.leaf("stranger", &["stranger.internal"], true);
    let mut kms = KeyManagementServiceClient::new(channel(s.addr, &s.pki.ca_pem, Some(&stranger)).await.unwrap());
    let r = kms.random(pb::RandomRequest { length: 8 }).await;
    assert_eq!(reason(&expect_err(r, Code::Unauthenticated, "unregistered")), "authentication_failed");

    // The subject is matched case-insensitively, SAN first, then CN.
    let by_cn = s.pki.leaf("APP.internal", &[], true);
    let mut kms = KeyManagementServiceClient::new(channel(s.addr, &s.pki.ca_pem, Some(&by_cn)).await.unwrap());
    kms.random(pb::RandomRequest { length: 8 }).await.expect("CN maps to app");

    // No client certificate at all: the mTLS listener refuses the handshake (or the first call).
    match channel(s.addr, &s.pki.ca_pem, None).await {
        Err(_) => {}
        Ok(ch) => {
            let r = KeyManagementServiceClient::new(ch).random(pb::RandomRequest { length: 8 }).await;
            assert!(r.is_err(), "a client without a certificate is refused");
        }
    }
    // A certificate of another CA is refused in the handshake.
    let other = Pki::new("other CA").leaf("app", &["app.internal"], true);
    match channel(s.addr, &s.pki.ca_pem, Some(&other)).await {
        Err(_) => {}
        Ok(ch) => {
            let r = KeyManagementServiceClient::new(ch).random(pb::RandomRequest { length: 8 }).await;
            assert!(r.is_err(), "a foreign certificate is refused");
        }
    }

    // Removing the mapping takes effect (here through the same dispatcher's cache invalidation).
    let admin = Caller::admin(TenantId::default_tenant());
    kmsgate_grpc::auth::remove_client(&env.dispatcher, &admin, "app.internal").await.unwrap();
    let r = s.kms().await.random(pb::RandomRequest { length: 8 }).await;
    expect_err(r, Code::Unauthenticated, "removed mapping");

    // A mapping in another tenant puts the caller in that tenant: it does not see the default tenant's keys.
    let t2 = TenantId::parse("team-b").unwrap();
    env.dispatcher.ensure_tenant(&t2).await.unwrap();
    let admin2 = Caller::admin(t2.clone());
    kmsgate_grpc::auth::add_client(&env.dispatcher, &admin2, "b.internal", "b-svc", "").await.unwrap();
    let key = env
        .dispatcher
        .create_key(&admin, kmsgate_core::CreateKeyRequest::new(KeySpec::Aes256))
        .await
        .unwrap()
        .id
        .to_string();
    let b = s.pki.leaf("b", &["b.internal"], true);
    let mut kms_b = KeyManagementServiceClient::new(channel(s.addr, &s.pki.ca_pem, Some(&b)).await.unwrap());
    let r = kms_b.describe_key(pb::DescribeKeyRequest { key_id: key.clone() }).await;
    assert_eq!(reason(&expect_err(r, Code::NotFound, "other tenant's key")), "key_not_found");

    // TLS without client certificates: the listener serves TLS (h2 by ALPN), health and reflection answer,
    // and API calls are UNAUTHENTICATED (no credential: this listener's chain has no token authenticator, as
    // with `[secrets] enabled = false`; tokens: `bearer_tokens_of_the_secrets_api`).
    let tls_only = serve(&env.dispatcher, false, grpc_config()).await;
    let ch = channel(tls_only.addr, &tls_only.pki.ca_pem, None).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let st = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(st.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let mut req = tonic::Request::new(pb::RandomRequest { length: 8 });
    req.metadata_mut().insert("authorization", "Bearer not-a-real-token".parse().unwrap());
    let r = KeyManagementServiceClient::new(ch).random(req).await;
    let st = expect_err(r, Code::Unauthenticated, "no client certificate");
    assert!(st.message().contains("client certificate"), "{}", st.message());

    // gRPC needs HTTP/2: a client offering only HTTP/1.1 by ALPN is refused in the handshake.
    let mut h1 = (*client_tls(&tls_only.pki.ca_pem, None)).clone();
    h1.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(tls_only.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let r = tokio_rustls::TlsConnector::from(Arc::new(h1)).connect(name, tcp).await;
    assert!(r.is_err(), "no common application protocol");
}

// ---- every status code --------------------------------------------------------------------------------

/// Denies everything to the identity `denied`; throttles GenerateRandom for `throttled`.
#[derive(Debug)]
struct Policy;

impl kmsgate_core::policy::Authorizer for Policy {
    fn authorize(&self, caller: &Caller, _op: Operation, _resource: Option<&str>) -> kmsgate_core::Result<()> {
        if caller.identity == "denied" {
            return Err(kmsgate_core::Error::new(kmsgate_core::ErrorKind::AccessDenied, "denied by policy"));
        }
        Ok(())
    }
}

impl kmsgate_core::policy::RateLimiter for Policy {
    fn check(&self, caller: &Caller, op: Operation) -> kmsgate_core::Result<()> {
        if caller.identity == "throttled" && op == Operation::GenerateRandom {
            return Err(kmsgate_core::Error::new(kmsgate_core::ErrorKind::Throttled, "too many requests")
                .with_retry_after(Duration::from_secs(2)));
        }
        Ok(())
    }
}

async fn client_as(
    s: &GrpcServer,
    d: &Dispatcher,
    subject: &str,
    identity: &str,
) -> KeyManagementServiceClient<Channel> {
    let admin = Caller::admin(TenantId::default_tenant());
    kmsgate_grpc::auth::add_client(d, &admin, subject, identity, "").await.unwrap();
    let cert = s.pki.leaf(identity, &[subject], true);
    KeyManagementServiceClient::new(channel(s.addr, &s.pki.ca_pem, Some(&cert)).await.unwrap())
}

#[tokio::test]
async fn every_status_code() {
    let dir = tempfile::tempdir().unwrap();
    let store = common::open_store(dir.path()).await;
    let backend = common::software_backend(dir.path());
    let audit = Arc::new(kmsgate_core::audit::MemoryAuditSink::default());
    let cfg = DispatcherConfig {
        default_backend: "software".to_owned(),
        max_keys_per_tenant: Some(4),
        max_plaintext: 1024,
        ..DispatcherConfig::default()
    };
    let d = Dispatcher::builder(store)
        .backend(backend)
        .audit(audit)
        .authorizer(Arc::new(Policy))
        .rate_limiter(Arc::new(Policy))
        .config(cfg)
        .build()
        .await
        .unwrap();
    d.ensure_tenant(&TenantId::default_tenant()).await.unwrap();
    let s = serve(&d, true, grpc_config()).await;
    let mut kms = s.kms().await;
    let mut sec = s.secrets().await;
    let key = kms
        .create_key(pb::CreateKeyRequest { spec: pb::KeySpec::Aes256 as i32, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
        .key_id;
    let enc = |key_id: &str, pt: &[u8]| pb::EncryptRequest {
        key_id: key_id.to_owned(),
        plaintext: pt.to_vec(),
        ..Default::default()
    };

    // INVALID_ARGUMENT: a missing or malformed parameter, an invalid ciphertext, a malformed grpc-timeout.
    let r = kms.encrypt(enc("", b"x")).await;
    assert_eq!(reason(&expect_err(r, Code::InvalidArgument, "empty key id")), "invalid_request");
    let r = kms.create_key(pb::CreateKeyRequest::default()).await;
    expect_err(r, Code::InvalidArgument, "no spec");
    let e = kms.encrypt(enc(&key, b"secret")).await.unwrap().into_inner();
    let mut tag = e.tag.clone();
    tag[0] ^= 1;
    let r = kms
        .decrypt(pb::DecryptRequest {
            key_id: key.clone(),
            key_version: e.key_version.clone(),
            iv: e.iv.clone(),
            ciphertext: e.ciphertext.clone(),
            tag,
            ..Default::default()
        })
        .await;
    assert_eq!(reason(&expect_err(r, Code::InvalidArgument, "tampered tag")), "invalid_ciphertext");
    let mut req = tonic::Request::new(pb::RandomRequest { length: 8 });
    req.metadata_mut().insert("grpc-timeout", "soon".parse().unwrap());
    expect_err(kms.random(req).await, Code::InvalidArgument, "malformed grpc-timeout");

    // UNIMPLEMENTED: over this gateway's size limit (Unsupported), and an unknown method.
    let r = kms.encrypt(enc(&key, &[0; 2048])).await;
    assert_eq!(reason(&expect_err(r, Code::Unimplemented, "plaintext over the limit")), "unsupported");
    let ch = channel(s.addr, &s.pki.ca_pem, Some(&s.app_cert)).await.unwrap();
    let mut raw = tonic::client::Grpc::new(ch);
    raw.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<pb::RandomRequest, pb::RandomResponse>::default();
    let path = http::uri::PathAndQuery::from_static("/kmsgate.v1.KeyManagementService/NoSuchMethod");
    let r = raw.unary(tonic::Request::new(pb::RandomRequest { length: 1 }), path, codec).await;
    assert_eq!(r.unwrap_err().code(), Code::Unimplemented);

    // UNAUTHENTICATED is covered by `authentication_tls_and_mtls`; PERMISSION_DENIED by policy.
    let mut denied = client_as(&s, &d, "denied.internal", "denied").await;
    let r = denied.encrypt(enc(&key, b"x")).await;
    assert_eq!(reason(&expect_err(r, Code::PermissionDenied, "policy")), "access_denied");

    // NOT_FOUND: key, alias, secret, secret version.
    let r = kms.encrypt(enc("no-such-key", b"x")).await;
    assert_eq!(reason(&expect_err(r, Code::NotFound, "unknown key")), "key_not_found");
    // The gateway's internal keys do not exist for callers: by id, by alias, and no alias can be made for them.
    let admin = kmsgate_core::Caller::admin(TenantId::default_tenant());
    d.seal(&admin, "grpc-test/purpose", b"x").await.unwrap();
    let sealing = common::internal_key(&d, &TenantId::default_tenant(), Dispatcher::SEALING_ALIAS).await;
    for k in [sealing.id.as_str(), Dispatcher::SEALING_ALIAS] {
        let r = kms.encrypt(enc(k, b"x")).await;
        assert_eq!(reason(&expect_err(r, Code::NotFound, "internal key")), "key_not_found");
    }
    let r = kms
        .create_alias(pb::CreateAliasRequest { alias: "alias/kmsgate-internal/mine".into(), key_id: key.clone() })
        .await;
    assert_eq!(reason(&expect_err(r, Code::InvalidArgument, "reserved alias")), "invalid_request");
    let r = kms.delete_alias(pb::DeleteAliasRequest { alias: "alias/nope".into() }).await;
    assert_eq!(reason(&expect_err(r, Code::NotFound, "unknown alias")), "alias_not_found");
    let r = sec.get_secret(pb::GetSecretRequest { path: "none".into(), selector: None }).await;
    assert_eq!(reason(&expect_err(r, Code::NotFound, "unknown secret")), "secret_not_found");
    sec.put_secret(pb::PutSecretRequest { path: "s1".into(), data: b"v".to_vec(), ..Default::default() })
        .await
        .unwrap();
    let r = sec
        .get_secret(pb::GetSecretRequest {
            path: "s1".into(),
            selector: Some(pb::get_secret_request::Selector::Version(9)),
        })
        .await;
    assert_eq!(reason(&expect_err(r, Code::NotFound, "unknown version")), "secret_version_not_found");

    // ALREADY_EXISTS: an alias twice, a create-only secret twice, a write to a soft-deleted secret.
    let alias = pb::CreateAliasRequest { alias: "alias/a".into(), key_id: key.clone() };
    kms.create_alias(alias.clone()).await.unwrap();
    let r = kms.create_alias(alias).await;
    assert_eq!(reason(&expect_err(r, Code::AlreadyExists, "alias twice")), "already_exists");
    let create_only = pb::PutSecretRequest {
        path: "s1".into(),
        data: b"v".to_vec(),
        mode: pb::WriteMode::CreateOnly as i32,
        ..Default::default()
    };
    expect_err(sec.put_secret(create_only).await, Code::AlreadyExists, "create-only on an existing secret");
    sec.put_secret(pb::PutSecretRequest { path: "s2".into(), data: b"v".to_vec(), ..Default::default() })
        .await
        .unwrap();
    sec.delete_secret(pb::DeleteSecretRequest { path: "s2".into(), ..Default::default() }).await.unwrap();
    let r = sec.put_secret(pb::PutSecretRequest { path: "s2".into(), data: b"v".to_vec(), ..Default::default() }).await;
    assert_eq!(reason(&expect_err(r, Code::AlreadyExists, "soft-deleted path")), "secret_exists");

    // ABORTED: a compare-and-set that does not hold.
    let r = sec
        .put_secret(pb::PutSecretRequest {
            path: "s1".into(),
            data: b"v2".to_vec(),
            cas: Some(7),
            ..Default::default()
        })
        .await;
    let st = expect_err(r, Code::Aborted, "cas mismatch");
    assert_eq!(reason(&st), "version_conflict");
    let info = decode_details(&st).unwrap().1.unwrap();
    assert_eq!(info.metadata.get("current").map(String::as_str), Some("1"), "details travel in ErrorInfo");

    // FAILED_PRECONDITION: key state, key usage, an expired secret.
    kms.disable_key(pb::DisableKeyRequest { key_id: key.clone() }).await.unwrap();
    let st = expect_err(kms.encrypt(enc(&key, b"x")).await, Code::FailedPrecondition, "disabled");
    assert_eq!(reason(&st), "invalid_key_state");
    assert_eq!(decode_details(&st).unwrap().1.unwrap().metadata.get("key_state").map(String::as_str), Some("Disabled"));
    kms.enable_key(pb::EnableKeyRequest { key_id: key.clone() }).await.unwrap();
    let r = kms
        .sign(pb::SignRequest {
            key_id: key.clone(),
            algorithm: pb::SigningAlgorithm::EcdsaSha256 as i32,
            input: Some(pb::sign_request::Input::Message(b"m".to_vec())),
            ..Default::default()
        })
        .await;
    assert_eq!(reason(&expect_err(r, Code::FailedPrecondition, "AES key cannot sign")), "invalid_key_usage");
    let past = prost_types::Timestamp { seconds: 1_000_000_000, nanos: 0 };
    sec.put_secret(pb::PutSecretRequest {
        path: "s3".into(),
        data: b"v".to_vec(),
        expires_at: Some(past),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = sec.get_secret(pb::GetSecretRequest { path: "s3".into(), selector: None }).await;
    assert_eq!(reason(&expect_err(r, Code::FailedPrecondition, "expired")), "secret_expired");

    // RESOURCE_EXHAUSTED: throttling (with retry-after in ErrorInfo and RetryInfo) and the key quota.
    let mut throttled = client_as(&s, &d, "throttled.internal", "throttled").await;
    let st = expect_err(throttled.random(pb::RandomRequest { length: 8 }).await, Code::ResourceExhausted, "throttled");
    assert_eq!(reason(&st), "throttled");
    let (body, info) = decode_details(&st).unwrap();
    assert_eq!(info.unwrap().metadata.get("retry_after_ms").map(String::as_str), Some("2000"));
    assert!(body.details.iter().any(|a| a.type_url == kmsgate_grpc::error::RETRY_INFO_TYPE));
    let mut quota = None;
    for _ in 0..5 {
        let r = kms.create_key(pb::CreateKeyRequest { spec: pb::KeySpec::Aes256 as i32, ..Default::default() }).await;
        if let Err(e) = r {
            quota = Some(e);
            break;
        }
    }
    let st = quota.expect("the key quota is reached");
    assert_eq!((st.code(), reason(&st).as_str()), (Code::ResourceExhausted, "quota_exceeded"));

    // INTERNAL: a client mapping in the store the gateway cannot read (never an authentication verdict).
    let admin = Caller::admin(TenantId::default_tenant());
    let broken = Document::new(
        kmsgate_grpc::auth::CLIENT_KIND,
        "broken.internal",
        TenantId::default_tenant(),
        serde_json::json!({"not": "a mapping"}),
    );
    d.put_document(&admin, broken, Precondition::Absent).await.unwrap();
    let cert = s.pki.leaf("broken", &["broken.internal"], true);
    let mut b = KeyManagementServiceClient::new(channel(s.addr, &s.pki.ca_pem, Some(&cert)).await.unwrap());
    let st = expect_err(b.random(pb::RandomRequest { length: 8 }).await, Code::Internal, "unreadable mapping");
    assert_eq!(reason(&st), "storage_failure");
    assert!(!st.message().contains("missing field"), "no internal detail: {}", st.message());
}

/// One unary gRPC call made by hand over TLS + h2 (no tonic client, so no client-side timer).
async fn raw_unary<M: prost::Message>(s: &GrpcServer, path: &str, msg: &M, timeout: Option<&str>) -> common::Reply {
    let body = msg.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&body);
    let mut b = hyper::Request::builder()
        .method("POST")
        .uri(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = timeout {
        b = b.header("grpc-timeout", t);
    }
    let req = b.body(http_body_util::Full::new(bytes::Bytes::from(framed))).unwrap();
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_tls(&s.pki.ca_pem, Some(&s.app_cert)))
        .connect(name, tcp)
        .await
        .unwrap();
    common::send_on(tls, true, req).await.unwrap()
}

// ---- deadlines ----------------------------------------------------------------------------------------

#[tokio::test]
async fn deadline_bounds_the_hsm_call() {
    let dir = tempfile::tempdir().unwrap();
    let store = common::open_store(dir.path()).await;
    let slow = Arc::new(common::SlowBackend {
        inner: common::software_backend(dir.path()),
        delay: Duration::from_millis(1500),
    });
    let (d, audit) = common::dispatcher_over(store, slow, Duration::from_millis(1000)).await;
    let s = serve(&d, true, grpc_config()).await;
    let mut kms = s.kms().await;
    let key = kms
        .create_key(pb::CreateKeyRequest { spec: pb::KeySpec::Aes256 as i32, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
        .key_id;
    let enc = || pb::EncryptRequest { key_id: key.clone(), plaintext: b"x".to_vec(), ..Default::default() };

    // The client's 50 ms deadline bounds the HSM call: DEADLINE_EXCEEDED in about 50 ms, from the server
    // (kmsgate's ErrorInfo), and the dispatcher's own audit record shows the operation ended then too.
    let mut req = tonic::Request::new(enc());
    req.set_timeout(Duration::from_millis(50));
    let started = Instant::now();
    let st = kms.encrypt(req).await.unwrap_err();
    let took = started.elapsed();
    // tonic's own timer races the server's answer: either DEADLINE_EXCEEDED from kmsgate or the client's
    // local "Timeout expired" (CANCELLED); both come at the deadline, not at the backend's.
    assert!(matches!(st.code(), Code::DeadlineExceeded | Code::Cancelled), "{st:?}");
    assert!(took >= Duration::from_millis(45) && took < Duration::from_millis(800), "took {took:?}");
    // The dispatcher itself was bounded by the caller's deadline: its audit record ends at ~50 ms with the
    // dependency timeout, long before the 1 s backend deadline or the 1.5 s HSM delay.
    let mut ev = None;
    for _ in 0..100 {
        ev = audit.events().into_iter().rev().find(|e| e.operation == Operation::Encrypt);
        if ev.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ev = ev.expect("the encrypt is audited");
    eprintln!("50 ms deadline: the client saw {st:?} after {took:?}; the dispatcher ended after {} us", ev.latency_us);
    assert_eq!(ev.outcome, kmsgate_core::Outcome::Error { kind: "dependency_timeout" });
    assert!(ev.latency_us < 800_000, "the dispatcher stopped at the caller's deadline: {} us", ev.latency_us);

    // A raw HTTP/2 gRPC call with `grpc-timeout: 50m` and no client-side timer at all: the server itself
    // answers DEADLINE_EXCEEDED (with kmsgate's ErrorInfo) at about 50 ms.
    let started = Instant::now();
    let reply = raw_unary(&s, "/kmsgate.v1.KeyManagementService/Encrypt", &enc(), Some("50m")).await;
    let took = started.elapsed();
    assert_eq!(reply.headers.get("grpc-status").unwrap(), "4", "{:?}", reply.headers);
    eprintln!("raw grpc-timeout 50m: DEADLINE_EXCEEDED from the server after {took:?}");
    assert!(took >= Duration::from_millis(45) && took < Duration::from_millis(800), "took {took:?}");
    let details = reply.headers.get("grpc-status-details-bin").expect("details");
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD_NO_PAD.decode(details.as_bytes()).unwrap();
    let st = tonic::Status::with_details(Code::DeadlineExceeded, "x", raw.into());
    assert_eq!(reason(&st), "deadline_exceeded");

    // Without a deadline, the backend deadline (1 s) applies: UNAVAILABLE, retryable.
    let started = Instant::now();
    let st = expect_err(kms.encrypt(enc()).await, Code::Unavailable, "backend deadline");
    assert!(started.elapsed() >= Duration::from_millis(900), "took {:?}", started.elapsed());
    assert_eq!(reason(&st), "dependency_timeout");

    // A deadline longer than the work changes nothing.
    let mut req = tonic::Request::new(pb::RandomRequest { length: 4 });
    req.set_timeout(Duration::from_secs(5));
    assert_eq!(kms.random(req).await.unwrap().into_inner().random.len(), 4);
}

// ---- health and reflection ----------------------------------------------------------------------------

/// A backend whose health can be switched off.
#[derive(Debug)]
struct Switchable {
    inner: Arc<dyn KeyBackend>,
    sick: Arc<AtomicBool>,
}

#[async_trait]
impl KeyBackend for Switchable {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn generate(&self, k: &KeyId, v: Uuid, s: KeySpec, u: KeyUsageSet) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.generate(k, v, s, u).await
    }
    async fn import(&self, k: &KeyId, v: Uuid, s: KeySpec, u: KeyUsageSet, m: &[u8]) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.import(k, v, s, u, m).await
    }
    async fn aes_gcm_encrypt(
        &self,
        k: KeyMaterialRef<'_>,
        iv: &[u8],
        aad: &[u8],
        pt: &[u8],
    ) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.aes_gcm_encrypt(k, iv, aad, pt).await
    }
    async fn aes_gcm_decrypt(
        &self,
        k: KeyMaterialRef<'_>,
        iv: &[u8],
        aad: &[u8],
        ct: &[u8],
    ) -> kmsgate_core::Result<Zeroizing<Vec<u8>>> {
        self.inner.aes_gcm_decrypt(k, iv, aad, ct).await
    }
    async fn rsa_oaep_encrypt(&self, k: KeyMaterialRef<'_>, pt: &[u8]) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.rsa_oaep_encrypt(k, pt).await
    }
    async fn rsa_oaep_decrypt(&self, k: KeyMaterialRef<'_>, ct: &[u8]) -> kmsgate_core::Result<Zeroizing<Vec<u8>>> {
        self.inner.rsa_oaep_decrypt(k, ct).await
    }
    async fn sign_digest(&self, k: KeyMaterialRef<'_>, a: SigningAlgorithm, d: &[u8]) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.sign_digest(k, a, d).await
    }
    async fn verify_digest(
        &self,
        k: KeyMaterialRef<'_>,
        a: SigningAlgorithm,
        d: &[u8],
        s: &[u8],
    ) -> kmsgate_core::Result<bool> {
        self.inner.verify_digest(k, a, d, s).await
    }
    async fn public_key_der(&self, k: KeyMaterialRef<'_>) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.public_key_der(k).await
    }
    async fn hmac_sha256(&self, k: KeyMaterialRef<'_>, data: &[u8]) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.hmac_sha256(k, data).await
    }
    async fn random(&self, len: usize) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.random(len).await
    }
    async fn destroy(&self, k: KeyMaterialRef<'_>) -> kmsgate_core::Result<()> {
        self.inner.destroy(k).await
    }
    async fn health(&self) -> Vec<MemberHealth> {
        let mut m = self.inner.health().await;
        if self.sick.load(Ordering::SeqCst) {
            for x in &mut m {
                x.status = HealthStatus::Unavailable;
                x.detail = "switched off by the test".to_owned();
            }
        }
        m
    }
}

#[tokio::test]
async fn health_reports_real_readiness_and_reflection_lists_the_api() {
    use futures::StreamExt as _;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let dir = tempfile::tempdir().unwrap();
    let store = common::open_store(dir.path()).await;
    let sick = Arc::new(AtomicBool::new(false));
    let backend = Arc::new(Switchable { inner: common::software_backend(dir.path()), sick: sick.clone() });
    let (d, _) = common::dispatcher_over(store, backend, Duration::from_secs(5)).await;
    let s = serve(&d, true, grpc_config()).await;
    let ch = channel(s.addr, &s.pki.ca_pem, Some(&s.app_cert)).await.unwrap();
    let mut health = HealthClient::new(ch.clone());
    let check = |service: &str| HealthCheckRequest { service: service.to_owned() };

    for svc in ["", "kmsgate.v1.KeyManagementService", "kmsgate.v1.SecretsService"] {
        let st = health.check(check(svc)).await.unwrap().into_inner().status;
        assert_eq!(st, ServingStatus::Serving as i32, "{svc}");
    }
    let r = health.check(check("no.such.Service")).await;
    assert_eq!(r.unwrap_err().code(), Code::NotFound);

    let mut watch = health.watch(check("")).await.unwrap().into_inner();
    assert_eq!(watch.next().await.unwrap().unwrap().status, ServingStatus::Serving as i32);
    sick.store(true, Ordering::SeqCst);
    let st = health.check(check("")).await.unwrap().into_inner().status;
    assert_eq!(st, ServingStatus::NotServing as i32, "Check probes the backend now");
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32, "Watch sends the change");
    sick.store(false, Ordering::SeqCst);
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(next.status, ServingStatus::Serving as i32);
    // The audited Health RPC says the same.
    let h = s.kms().await.health(pb::HealthRequest {}).await.unwrap().into_inner();
    assert!(h.ready);

    // Reflection v1: the services, and the descriptor of one of them.
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let mut refl = ServerReflectionClient::new(ch.clone());
        let reqs = vec![
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            },
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol("kmsgate.v1.SecretsService".into())),
            },
        ];
        let mut stream = refl.server_reflection_info(futures::stream::iter(reqs)).await.unwrap().into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) = stream.next().await.unwrap().unwrap().message_response
        else {
            panic!("a service list")
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        for n in ["kmsgate.v1.KeyManagementService", "kmsgate.v1.SecretsService", "grpc.health.v1.Health"] {
            assert!(names.contains(&n), "{n} in {names:?}");
        }
        let Some(MessageResponse::FileDescriptorResponse(files)) =
            stream.next().await.unwrap().unwrap().message_response
        else {
            panic!("a file descriptor")
        };
        use prost::Message as _;
        let fd = prost_types::FileDescriptorProto::decode(files.file_descriptor_proto[0].as_slice()).unwrap();
        assert_eq!((fd.name(), fd.package()), ("kmsgate/v1/secrets.proto", "kmsgate.v1"));
    }
    // and v1alpha, which older grpcurl versions ask.
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut refl = ServerReflectionClient::new(ch);
        let reqs = vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }];
        let mut stream = refl.server_reflection_info(futures::stream::iter(reqs)).await.unwrap().into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) = stream.next().await.unwrap().unwrap().message_response
        else {
            panic!("a service list")
        };
        assert!(list.service.iter().any(|s| s.name == "kmsgate.v1.KeyManagementService"));
    }

    // With reflection off, the reflection service is not there.
    let s2 = serve(&d, true, GrpcConfig { reflection: false, ..grpc_config() }).await;
    let ch = channel(s2.addr, &s2.pki.ca_pem, Some(&s2.app_cert)).await.unwrap();
    let mut refl = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(ch);
    let reqs = vec![tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    }];
    let r = refl.server_reflection_info(futures::stream::iter(reqs)).await;
    let code = match r {
        Err(e) => e.code(),
        Ok(resp) => resp.into_inner().next().await.unwrap().unwrap_err().code(),
    };
    assert_eq!(code, Code::Unimplemented);
}

// ---- cross-frontend: Alibaba instance API and the CLI ------------------------------------------------

fn cli(data_dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kmsgate"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("KMSGATE_CONFIG")
        .env_remove("KMSGATE_KEK")
        .output()
        .unwrap();
    assert!(out.status.success(), "kmsgate {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

mod alibaba_client {
    use aws_lc_rs::digest;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
    use base64::Engine as _;
    use bytes::Bytes;
    use http_body_util::Full;

    /// One signed instance-API call, as the SDK makes it.
    pub async fn call(
        addr: std::net::SocketAddr,
        pair: &RsaKeyPair,
        key_id: &str,
        api: &str,
        body: Vec<u8>,
    ) -> super::common::Reply {
        let sha = hex::encode_upper(digest::digest(&digest::SHA256, &body));
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        let sts = format!(
            "POST\n{sha}\napplication/x-protobuf\n{date}\nx-kms-acccesskeyid:{key_id}\nx-kms-apiname:{api}\n\
             x-kms-apiversion:dkms-gcs-0.2\nx-kms-signaturemethod:RSA_PKCS1_SHA_256\n/"
        );
        let mut sig = vec![0; pair.public_modulus_len()];
        pair.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), sts.as_bytes(), &mut sig).unwrap();
        let req = hyper::Request::builder()
            .method("POST")
            .uri("/")
            .header("host", addr.to_string())
            .header("content-type", "application/x-protobuf")
            .header("content-sha256", sha)
            .header("date", date)
            .header("x-kms-acccesskeyid", key_id)
            .header("x-kms-apiname", api)
            .header("x-kms-apiversion", "dkms-gcs-0.2")
            .header("x-kms-signaturemethod", "RSA_PKCS1_SHA_256")
            .header("authorization", format!("Bearer {}", base64::engine::general_purpose::STANDARD.encode(sig)))
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        super::common::send_on(stream, false, req).await.unwrap()
    }
}

#[tokio::test]
async fn cross_frontend_alibaba_and_cli() {
    use kmsgate_alibaba::{clientkey, proto as ali};
    use prost::Message as _;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = kmsgate::config::Config { data_dir: data.clone(), ..kmsgate::config::Config::default() };
    let (app, _) = kmsgate::app::App::open(config).await.unwrap();
    let d = app.dispatcher.clone();

    // The gRPC client is registered with the CLI (another process on the same store); the running server
    // learns it from the change feed.
    let out = cli(&data, &["--json", "grpc", "clients", "add", "--subject", "Web.Internal", "--identity", "web"]);
    assert!(out.contains("\"web.internal\""), "{out}");
    let listed = cli(&data, &["--json", "grpc", "clients", "list"]);
    assert!(listed.contains("\"identity\":\"web\""), "{listed}");

    let pki = Pki::new("cross CA");
    let tls = kmsgate::grpc::tls_config(&pki.server_tls(dir.path(), true)).unwrap();
    let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc_listener.local_addr().unwrap();
    let main_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let main_addr = main_listener.local_addr().unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.changed().await;
    };
    tokio::spawn(kmsgate::http::serve(
        grpc_listener,
        Some(tls),
        kmsgate::grpc::router(
            d.clone(),
            &grpc_config(),
            kmsgate::grpc::auth_chain(&d, kmsgate::grpc::token_verifier(&app)),
        )
        .unwrap(),
        stop(rx.clone()),
        Duration::from_secs(1),
    ));
    tokio::spawn(kmsgate::http::serve(
        main_listener,
        None,
        kmsgate::serve::router(&app),
        stop(rx),
        Duration::from_secs(1),
    ));
    d.apply_changes().await.unwrap();
    let web = pki.leaf("web", &["web.internal"], true);
    let ch = channel(grpc_addr, &pki.ca_pem, Some(&web)).await.unwrap();
    let mut kms = KeyManagementServiceClient::new(ch.clone());
    let mut sec = SecretsServiceClient::new(ch);

    let admin = app.admin();
    let ck = clientkey::create(&d, &admin, "ali-app", "").await.unwrap();
    let pair = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(&ck.private_key_pkcs8).unwrap();

    // Encrypt over gRPC, decrypt over the Alibaba instance API (CiphertextBlob = ciphertext ‖ tag).
    let key = kms
        .create_key(pb::CreateKeyRequest {
            spec: pb::KeySpec::Aes256 as i32,
            aliases: vec!["alias/shared".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
        .key_id;
    let e = kms
        .encrypt(pb::EncryptRequest {
            key_id: "alias/shared".into(),
            plaintext: b"both ways".to_vec(),
            aad: b"a".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut blob = e.ciphertext.clone();
    blob.extend_from_slice(&e.tag);
    let body = ali::DecryptRequest {
        key_id: key.clone(),
        ciphertext_blob: blob,
        iv: e.iv.clone(),
        aad: b"a".to_vec(),
        ..Default::default()
    }
    .encode_to_vec();
    let r = alibaba_client::call(main_addr, &pair, &ck.id, "Decrypt", body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(ali::DecryptResponse::decode(&*r.body).unwrap().plaintext, b"both ways");

    // ... and the other way round.
    let body =
        ali::EncryptRequest { key_id: "alias/shared".into(), plaintext: b"from ali".to_vec(), ..Default::default() }
            .encode_to_vec();
    let r = alibaba_client::call(main_addr, &pair, &ck.id, "Encrypt", body).await;
    assert_eq!(r.status, 200);
    let ae = ali::EncryptResponse::decode(&*r.body).unwrap();
    let (ct, tag) = ae.ciphertext_blob.split_at(ae.ciphertext_blob.len() - 16);
    let p = kms
        .decrypt(pb::DecryptRequest {
            key_id: ae.key_id.clone(),
            iv: ae.iv.clone(),
            ciphertext: ct.to_vec(),
            tag: tag.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.plaintext, b"from ali");

    // A secret put over gRPC is read through Alibaba GetSecretValue.
    sec.put_secret(pb::PutSecretRequest { path: "db-password".into(), data: b"s3cr3t".to_vec(), ..Default::default() })
        .await
        .unwrap();
    let body = ali::GetSecretValueRequest { secret_name: "db-password".into(), ..Default::default() }.encode_to_vec();
    let r = alibaba_client::call(main_addr, &pair, &ck.id, "GetSecretValue", body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = ali::GetSecretValueResponse::decode(&*r.body).unwrap();
    assert_eq!((v.secret_data.as_str(), v.version_stages.as_slice()), ("s3cr3t", &["ACSCurrent".to_owned()][..]));

    // A key disabled through the CLI (another process) is refused over gRPC and over Alibaba alike.
    cli(&data, &["keys", "disable", "alias/shared"]);
    d.apply_changes().await.unwrap();
    let r =
        kms.encrypt(pb::EncryptRequest { key_id: key.clone(), plaintext: b"x".to_vec(), ..Default::default() }).await;
    let st = expect_err(r, Code::FailedPrecondition, "disabled by the CLI");
    assert_eq!(decode_details(&st).unwrap().1.unwrap().metadata.get("key_state").map(String::as_str), Some("Disabled"));
    let body =
        ali::EncryptRequest { key_id: key.clone(), plaintext: b"x".to_vec(), ..Default::default() }.encode_to_vec();
    assert_eq!(alibaba_client::call(main_addr, &pair, &ck.id, "Encrypt", body).await.status, 409);
    // Enabled over gRPC, usable through the CLI's view too.
    kms.enable_key(pb::EnableKeyRequest { key_id: key.clone() }).await.unwrap();
    let described = cli(&data, &["--json", "keys", "describe", &key]);
    assert!(described.contains("\"Enabled\""), "{described}");

    // Removing the client with the CLI locks it out once the change feed is read.
    cli(&data, &["grpc", "clients", "remove", "web.internal"]);
    d.apply_changes().await.unwrap();
    let r = kms.random(pb::RandomRequest { length: 4 }).await;
    expect_err(r, Code::Unauthenticated, "removed by the CLI");
}

// ---- an independent client: Google's gRPC implementation (grpcio) ------------------------------------------

/// grpcio (PyPI, C core) over mTLS and over the plugin socket: health, reflection-built messages, a key's
/// life, rich error details validated by grpcio-status, and the KMS v2 plugin with upstream messages declared
/// in Python. `./scripts/test` provides the interpreter (`KMSGATE_TEST_GRPC_PYTHON`); without it this fails.
#[tokio::test]
async fn python_grpcio_client() {
    let python = std::env::var("KMSGATE_TEST_GRPC_PYTHON").unwrap_or_else(|_| {
        panic!("KMSGATE_TEST_GRPC_PYTHON is not set: run the tests through ./scripts/test, which installs grpcio")
    });
    let env = common::Env::software().await;
    let s = serve(&env.dispatcher, true, grpc_config()).await;
    let files = tempfile::tempdir().unwrap();
    let (ca, cert, key) =
        (files.path().join("ca.pem"), files.path().join("client.pem"), files.path().join("client.key"));
    std::fs::write(&ca, &s.pki.ca_pem).unwrap();
    std::fs::write(&cert, &s.app_cert.0).unwrap();
    std::fs::write(&key, &s.app_cert.1).unwrap();

    let mut req = kmsgate_core::CreateKeyRequest::new(KeySpec::Aes256);
    req.aliases = vec![kmsgate_core::AliasName::parse("alias/k8s").unwrap()];
    env.dispatcher.create_key(&env.caller, req).await.unwrap();
    let socket = files.path().join("kms.sock");
    let plugin_cfg = kmsgate_grpc::KmsPluginConfig {
        socket: Some(socket.clone()),
        key: "alias/k8s".into(),
        ..kmsgate_grpc::KmsPluginConfig::default()
    };
    let router =
        kmsgate::grpc::plugin_router(env.dispatcher.clone(), &plugin_cfg, &TenantId::default_tenant()).unwrap();
    let listener = kmsgate::grpc::bind_unix(&socket).unwrap();
    let (_tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(kmsgate::grpc::serve_unix(
        listener,
        socket.clone(),
        router,
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(1),
    ));

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc_interop.py");
    let args = [script.to_owned(), format!("127.0.0.1:{}", s.addr.port())]
        .into_iter()
        .chain([&ca, &cert, &key, &socket].iter().map(|p| p.display().to_string()))
        .collect::<Vec<_>>();
    let out = tokio::task::spawn_blocking(move || std::process::Command::new(python).args(args).output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "grpcio client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The calls were the real thing: audited through the gRPC and plugin frontends.
    let events = env.audit.events();
    assert!(events.iter().any(|e| e.operation == Operation::RotateKey && e.identity == "app"));
    assert!(events.iter().any(|e| e.operation == Operation::Decrypt && e.frontend.as_str() == "kubernetes_kms"));
}

// ---- bearer tokens of the secrets API -----------------------------------------------------------------

/// One REST call to the secrets API on `addr` with a bearer token.
async fn rest(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<serde_json::Value>,
) -> common::Reply {
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {token}"));
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    let body = body.map(|v| serde_json::to_vec(&v).unwrap()).unwrap_or_default();
    let req = b.body(http_body_util::Full::new(bytes::Bytes::from(body))).unwrap();
    common::send_on(tokio::net::TcpStream::connect(addr).await.unwrap(), false, req).await.unwrap()
}

async fn rest_ok(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let r = rest(addr, method, path, token, body).await;
    assert!((200..300).contains(&r.status), "{method} {path}: {} {}", r.status, String::from_utf8_lossy(&r.body));
    if r.body.is_empty() { serde_json::Value::Null } else { r.json() }
}

/// `msg` with `authorization: Bearer token` metadata.
fn bearer<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

#[tokio::test]
async fn bearer_tokens_of_the_secrets_api() {
    use serde_json::json;

    let dir = tempfile::tempdir().unwrap();
    let mut config =
        kmsgate::config::Config { data_dir: dir.path().join("data"), ..kmsgate::config::Config::default() };
    let audit_file = dir.path().join("audit.log");
    config.audit = kmsgate::config::AuditConfig {
        destination: kmsgate::config::AuditDestination::File,
        path: Some(audit_file.clone()),
    };
    let (app, _) = kmsgate::app::App::open(config).await.unwrap();
    let d = app.dispatcher.clone();
    let st = kmsgate_secrets::SecretsState::new(d.clone(), app.config.secrets.clone(), app.tenant.clone());
    let (admin, _) = kmsgate_secrets::bootstrap(&st, &app.tenant, 3600).await.unwrap().expect("fresh tenant");

    // The secrets REST API on the main listener; the gRPC API twice: TLS only (tokens are the only
    // credential) and mTLS (certificate and token together).
    let pki = Pki::new("token CA");
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.changed().await;
    };
    let main_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let main = main_listener.local_addr().unwrap();
    tokio::spawn(kmsgate::http::serve(
        main_listener,
        None,
        kmsgate::serve::router(&app),
        stop(rx.clone()),
        Duration::from_secs(1),
    ));
    let mut grpc_addrs = Vec::new();
    for mtls in [false, true] {
        let tls = kmsgate::grpc::tls_config(&pki.server_tls(dir.path(), mtls)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        grpc_addrs.push(listener.local_addr().unwrap());
        let auth = kmsgate::grpc::auth_chain(&d, kmsgate::grpc::token_verifier(&app));
        tokio::spawn(kmsgate::http::serve(
            listener,
            Some(tls),
            kmsgate::grpc::router(d.clone(), &grpc_config(), auth).unwrap(),
            stop(rx.clone()),
            Duration::from_secs(1),
        ));
    }
    let ch = channel(grpc_addrs[0], &pki.ca_pem, None).await.unwrap();
    let mut kms = KeyManagementServiceClient::new(ch.clone());
    let mut sec = SecretsServiceClient::new(ch);

    // The bootstrap admin token (admin role, `admin` scope): key and secret RPCs alike.
    let key = kms
        .create_key(bearer(&admin, pb::CreateKeyRequest { spec: pb::KeySpec::Aes256 as i32, ..Default::default() }))
        .await
        .expect("admin token creates a key")
        .into_inner()
        .key
        .unwrap()
        .key_id;
    let enc = |pt: &[u8]| pb::EncryptRequest { key_id: key.clone(), plaintext: pt.to_vec(), ..Default::default() };
    kms.encrypt(bearer(&admin, enc(b"x"))).await.expect("admin token encrypts");
    for (path, v) in [("app/db", "one"), ("team/b", "two")] {
        let put = pb::PutSecretRequest { path: path.into(), data: v.as_bytes().to_vec(), ..Default::default() };
        sec.put_secret(bearer(&admin, put)).await.expect("admin token writes");
    }

    // Alice: read and list scopes, and a policy granting read and list on app/** only.
    rest_ok(main, "POST", "/v1/identities", &admin, Some(json!({"identity_type": "user", "identity_id": "alice"})))
        .await;
    let mint = |scopes: serde_json::Value, ttl: &str| {
        json!({"name": format!("alice-{ttl}"), "identity_type": "user", "identity_id": "alice", "scopes": scopes,
               "ttl": ttl})
    };
    let alice =
        rest_ok(main, "POST", "/v1/auth/tokens", &admin, Some(mint(json!(["secrets:read", "secrets:list"]), "1h")))
            .await["token"]
            .as_str()
            .unwrap()
            .to_owned();
    let rules = json!([{"path_pattern": "app/**", "permissions": ["read", "list"]}]);
    let pid =
        rest_ok(main, "POST", "/v1/policies", &admin, Some(json!({"name": "app-read", "rules": rules}))).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
    let bind = json!({"identity_type": "user", "identity_id": "alice"});
    rest_ok(main, "POST", &format!("/v1/policies/{pid}/bindings"), &admin, Some(bind)).await;

    // Valid token, permitted: OK, acting as user:alice.
    let got = sec
        .get_secret(bearer(&alice, pb::GetSecretRequest { path: "app/db".into(), ..Default::default() }))
        .await
        .expect("policy grants read on app/**")
        .into_inner();
    assert_eq!(got.data, b"one");
    let listed = sec.list_secrets(bearer(&alice, pb::ListSecretsRequest::default())).await.unwrap().into_inner();
    let paths: Vec<_> = listed.secrets.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["app/db"], "the listing is filtered by the policy, as over REST");
    kms.health(bearer(&alice, pb::HealthRequest {})).await.expect("any valid token may probe");

    // Valid token without permission: PERMISSION_DENIED, and nothing changes.
    let r = sec.get_secret(bearer(&alice, pb::GetSecretRequest { path: "team/b".into(), ..Default::default() })).await;
    assert_eq!(reason(&expect_err(r, Code::PermissionDenied, "no policy on team/b")), "access_denied");
    let put = pb::PutSecretRequest { path: "app/db".into(), data: b"overwritten".to_vec(), ..Default::default() };
    let r = sec.put_secret(bearer(&alice, put)).await;
    let s = expect_err(r, Code::PermissionDenied, "no write scope");
    assert!(s.message().contains("secrets:write"), "{}", s.message());
    let got =
        sec.get_secret(bearer(&admin, pb::GetSecretRequest { path: "app/db".into(), ..Default::default() })).await;
    assert_eq!(got.unwrap().into_inner().data, b"one", "a refused write changes nothing");
    let r = kms.encrypt(bearer(&alice, enc(b"x"))).await;
    let s = expect_err(r, Code::PermissionDenied, "key operations need the admin role");
    assert!(s.message().contains("admin"), "{}", s.message());
    let r = kms.list_keys(bearer(&alice, pb::ListKeysRequest::default())).await;
    expect_err(r, Code::PermissionDenied, "key management too");

    // The admin identity with a token lacking the admin scope: key RPCs refused.
    let narrow =
        rest_ok(main, "POST", "/v1/auth/tokens", &admin, Some(json!({"name": "narrow", "scopes": ["secrets:*"]})))
            .await["token"]
            .as_str()
            .unwrap()
            .to_owned();
    let r = kms.encrypt(bearer(&narrow, enc(b"x"))).await;
    expect_err(r, Code::PermissionDenied, "admin role without the admin scope");
    let got =
        sec.get_secret(bearer(&narrow, pb::GetSecretRequest { path: "team/b".into(), ..Default::default() })).await;
    assert_eq!(got.unwrap().into_inner().data, b"two", "admins pass the policies; the scope suffices");

    // Garbage, malformed and non-bearer credentials: UNAUTHENTICATED, with no detail about the verifier.
    for bad in ["svt_garbage", "svt_", "not-a-token", &format!("{alice}x")] {
        let r = kms.health(bearer(bad, pb::HealthRequest {})).await;
        assert_eq!(reason(&expect_err(r, Code::Unauthenticated, bad)), "authentication_failed");
    }
    let mut req = tonic::Request::new(pb::HealthRequest {});
    req.metadata_mut().insert("authorization", "Basic YWxpY2U6cHc=".parse().unwrap());
    expect_err(kms.health(req).await, Code::Unauthenticated, "not a bearer credential");
    expect_err(kms.health(pb::HealthRequest {}).await, Code::Unauthenticated, "no credential at all");

    // Expired: a one-second token works, then is refused.
    let short =
        rest_ok(main, "POST", "/v1/auth/tokens", &admin, Some(mint(json!(["secrets:read"]), "1s"))).await["token"]
            .as_str()
            .unwrap()
            .to_owned();
    let t0 = Instant::now();
    loop {
        match kms.health(bearer(&short, pb::HealthRequest {})).await {
            Ok(_) => assert!(t0.elapsed() < Duration::from_secs(5), "the token never expired"),
            Err(s) => {
                assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
                assert!(s.message().contains("expired"), "{}", s.message());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Revoked through REST: refused over gRPC at once.
    let victim =
        rest_ok(main, "POST", "/v1/auth/tokens", &admin, Some(mint(json!(["secrets:read"]), "2h"))).await["token"]
            .as_str()
            .unwrap()
            .to_owned();
    kms.health(bearer(&victim, pb::HealthRequest {})).await.expect("valid before revocation");
    let r = sec.list_secrets(bearer(&victim, pb::ListSecretsRequest::default())).await;
    let s = expect_err(r, Code::PermissionDenied, "listing needs secrets:list");
    assert!(s.message().contains("secrets:list"), "{}", s.message());
    let del = pb::DeleteSecretRequest { path: "app/db".into(), ..Default::default() };
    expect_err(sec.delete_secret(bearer(&alice, del)).await, Code::PermissionDenied, "delete needs secrets:delete");
    let jti = rest_ok(main, "GET", "/v1/auth/whoami", &victim, None).await["token_id"].as_str().unwrap().to_owned();
    let r = rest(main, "DELETE", &format!("/v1/auth/tokens/{jti}"), &admin, None).await;
    assert_eq!(r.status, 204);
    let revoked_at = Instant::now();
    let r = kms.health(bearer(&victim, pb::HealthRequest {})).await;
    let s = expect_err(r, Code::Unauthenticated, "revoked token");
    assert!(s.message().contains("revoked"), "{}", s.message());
    assert!(revoked_at.elapsed() < Duration::from_secs(1), "refused at once, not after a cache expiry");

    // Certificate and token together: the token decides (the call's own credential is the more specific); a
    // bad token is refused even on a connection whose certificate is registered.
    let admin_caller = app.admin();
    kmsgate_grpc::auth::add_client(&d, &admin_caller, "svc.internal", "svc", "").await.unwrap();
    let cert = pki.leaf("svc", &["svc.internal"], true);
    let mut both = KeyManagementServiceClient::new(channel(grpc_addrs[1], &pki.ca_pem, Some(&cert)).await.unwrap());
    both.encrypt(enc(b"cert alone")).await.expect("the registered certificate alone may encrypt");
    let r = both.encrypt(bearer(&alice, enc(b"x"))).await;
    expect_err(r, Code::PermissionDenied, "alice's token narrows the call, the certificate does not widen it");
    let r = both.encrypt(bearer(&victim, enc(b"x"))).await;
    expect_err(r, Code::Unauthenticated, "a revoked token never falls back to the certificate");
    both.encrypt(bearer(&admin, enc(b"x"))).await.expect("a permitted token on an mTLS connection");

    // Audit: alice's calls name her and her token id (never the token); refusals by the token's scopes or
    // policies are audited as AccessCheck, as over REST.
    let deadline = Instant::now() + Duration::from_secs(10);
    let records: Vec<serde_json::Value> = loop {
        let text = std::fs::read_to_string(&audit_file).unwrap_or_default();
        assert!(!text.contains(&alice) && !text.contains(&admin), "no token in the audit log");
        let records: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let denied = |r: &&serde_json::Value| {
            r["identity"] == "user:alice" && r["frontend"] == "grpc" && r["operation"] == "AccessCheck"
        };
        if records.iter().filter(denied).count() >= 4 {
            break records;
        }
        assert!(Instant::now() < deadline, "refusals not audited:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let team_b = records
        .iter()
        .find(|r| r["identity"] == "user:alice" && r["operation"] == "AccessCheck" && r["resource"] == "team/b")
        .expect("the refused read of team/b is audited");
    assert_eq!(team_b["outcome"]["error"]["kind"], "access_denied", "{team_b}");
    assert!(team_b["metadata"]["token_id"].as_str().is_some_and(|t| t.starts_with("tok_")), "{team_b}");
    assert!(
        records.iter().any(|r| r["identity"] == "user:alice"
            && r["frontend"] == "grpc"
            && r["resource"] == "app/db"
            && r["outcome"] == "ok"),
        "alice's permitted read is audited as hers"
    );
}

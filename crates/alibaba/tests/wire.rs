//! The instance API over its router with a real dispatcher (SQLite store, software backend), signing
//! requests exactly as the vendor SDKs do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{KeyPair, RSA_PKCS1_SHA256, RsaKeyPair};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kmsgate_alibaba::{AlibabaConfig, AlibabaState, MIGRATION_HEADER, clientkey, proto, routes};
use kmsgate_core::{
    Caller, CreateKeyRequest, Dispatcher, DispatcherConfig, KeyBackend, KeyRef, KeySpec, KeyUsage, KeyUsageSet,
    PutSecretRequest, SecretPath, TenantId,
};
use kmsgate_hsm::{Kek, SoftwareBackend};
use kmsgate_store::SqlStore;
use prost::Message;
use tower::ServiceExt;

struct Env {
    _dir: tempfile::TempDir,
    d: Dispatcher,
    router: axum::Router,
    key_id: String,
    pair: RsaKeyPair,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("kmsgate.db").display());
    let store = Arc::new(SqlStore::open(&url).await.unwrap());
    let kek = Kek::generate_file(dir.path().join("kek")).unwrap();
    let backend: Arc<dyn KeyBackend> = Arc::new(SoftwareBackend::new("software".to_owned(), kek));
    let cfg = DispatcherConfig { default_backend: "software".to_owned(), ..DispatcherConfig::default() };
    let d = Dispatcher::builder(store).backend(backend).config(cfg).build().await.unwrap();
    d.ensure_tenant(&TenantId::default_tenant()).await.unwrap();
    let pair = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
    let admin = Caller::admin(TenantId::default_tenant());
    let key_id = clientkey::register(&d, &admin, "app-1", pair.public_key().as_ref(), "test").await.unwrap();
    let router = routes(Arc::new(AlibabaState::new(d.clone(), AlibabaConfig::default())));
    Env { _dir: dir, d, router, key_id, pair }
}

struct Sent {
    api: String,
    body: Vec<u8>,
    date: SystemTime,
    extra: Vec<(String, String)>,
    tamper: bool,
}

impl Sent {
    fn new(api: &str, msg: &impl Message) -> Self {
        Sent {
            api: api.to_owned(),
            body: msg.encode_to_vec(),
            date: SystemTime::now(),
            extra: Vec::new(),
            tamper: false,
        }
    }
}

fn request(env: &Env, key_id: &str, s: &Sent) -> Request<Body> {
    let sha = hex::encode_upper(digest::digest(&digest::SHA256, &s.body));
    let date = httpdate::fmt_http_date(s.date);
    let mut kms = vec![
        ("x-kms-acccesskeyid".to_owned(), key_id.to_owned()),
        ("x-kms-apiname".to_owned(), s.api.clone()),
        ("x-kms-apiversion".to_owned(), "dkms-gcs-0.2".to_owned()),
        ("x-kms-signaturemethod".to_owned(), "RSA_PKCS1_SHA_256".to_owned()),
    ];
    kms.extend(s.extra.iter().cloned());
    kms.sort();
    let mut sts = format!("POST\n{sha}\napplication/x-protobuf\n{date}\n");
    for (n, v) in &kms {
        sts.push_str(&format!("{n}:{v}\n"));
    }
    sts.push('/');
    let mut sig = vec![0; env.pair.public_modulus_len()];
    env.pair.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), sts.as_bytes(), &mut sig).unwrap();
    if s.tamper {
        sig[10] ^= 1;
    }
    let mut b = Request::post("/")
        .header("content-type", "application/x-protobuf")
        .header("accept", "application/x-protobuf")
        .header("content-sha256", sha)
        .header("date", date)
        .header("authorization", format!("Bearer {}", STANDARD.encode(sig)));
    for (n, v) in kms {
        b = b.header(n, v);
    }
    b.body(Body::from(s.body.clone())).unwrap()
}

struct Got {
    status: StatusCode,
    version: Option<String>,
    body: Vec<u8>,
}

async fn send_req(env: &Env, req: Request<Body>) -> Got {
    let r = env.router.clone().oneshot(req).await.unwrap();
    let status = r.status();
    let version = r.headers().get(MIGRATION_HEADER).map(|v| v.to_str().unwrap().to_owned());
    let body = axum::body::to_bytes(r.into_body(), usize::MAX).await.unwrap().to_vec();
    Got { status, version, body }
}

async fn call<R: Message + Default>(env: &Env, api: &str, msg: &impl Message) -> (R, Option<String>) {
    let g = send_req(env, request(env, &env.key_id, &Sent::new(api, msg))).await;
    if g.status != StatusCode::OK {
        let e = proto::Error::decode(&*g.body).unwrap();
        panic!("{api}: {} {e:?}", g.status);
    }
    (R::decode(&*g.body).unwrap(), g.version)
}

async fn error_of(env: &Env, req: Request<Body>) -> (StatusCode, proto::Error) {
    let g = send_req(env, req).await;
    assert_ne!(g.status, StatusCode::OK);
    let e = proto::Error::decode(&*g.body).unwrap();
    assert_eq!(e.status_code, i32::from(g.status.as_u16()), "status in both places");
    assert!(!e.request_id.is_empty());
    (g.status, e)
}

async fn call_err(env: &Env, api: &str, msg: &impl Message) -> (u16, String) {
    let (s, e) = error_of(env, request(env, &env.key_id, &Sent::new(api, msg))).await;
    (s.as_u16(), e.error_code)
}

async fn aes_key(env: &Env) -> String {
    let admin = Caller::admin(TenantId::default_tenant());
    env.d.create_key(&admin, CreateKeyRequest::new(KeySpec::Aes256)).await.unwrap().id.to_string()
}

#[tokio::test]
async fn symmetric_apis_round_trip() {
    let env = env().await;
    let key = aes_key(&env).await;
    let (enc, v): (proto::EncryptResponse, _) = call(
        &env,
        "Encrypt",
        &proto::EncryptRequest {
            key_id: key.clone(),
            plaintext: b"hello".to_vec(),
            aad: b"ctx".to_vec(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(enc.iv.len(), 12);
    assert_eq!(enc.algorithm, "AES_GCM");
    assert!(!enc.request_id.is_empty());
    assert!(v.is_some(), "Encrypt carries x-kms-migrationkeyversionid");
    let (dec, v2): (proto::DecryptResponse, _) = call(
        &env,
        "Decrypt",
        &proto::DecryptRequest {
            key_id: key.clone(),
            ciphertext_blob: enc.ciphertext_blob.clone(),
            iv: enc.iv.clone(),
            aad: b"ctx".to_vec(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(dec.plaintext, b"hello");
    assert_eq!(v, v2);
    // Wrong AAD does not open.
    let (s, code) = call_err(
        &env,
        "Decrypt",
        &proto::DecryptRequest {
            key_id: key.clone(),
            ciphertext_blob: enc.ciphertext_blob,
            iv: enc.iv,
            ..Default::default()
        },
    )
    .await;
    assert_eq!((s, code.as_str()), (400, "InvalidParameter"));

    // Advance: the blob names its key version, so decrypting needs no KeyId, even after a rotation.
    let (aenc, _): (proto::AdvanceEncryptResponse, _) = call(
        &env,
        "AdvanceEncrypt",
        &proto::AdvanceEncryptRequest { key_id: key.clone(), plaintext: b"adv".to_vec(), ..Default::default() },
    )
    .await;
    assert_eq!(aenc.ciphertext_blob[..3], [b'$', 0, 2]);
    assert_eq!(&aenc.ciphertext_blob[3..39], aenc.key_version_id.as_bytes());
    let admin = Caller::admin(TenantId::default_tenant());
    env.d.rotate_key(&admin, &KeyRef::parse(&key).unwrap()).await.unwrap();
    let (adec, _): (proto::AdvanceDecryptResponse, _) = call(
        &env,
        "AdvanceDecrypt",
        &proto::AdvanceDecryptRequest { ciphertext_blob: aenc.ciphertext_blob.clone(), ..Default::default() },
    )
    .await;
    assert_eq!(adec.plaintext, b"adv");
    assert_eq!(adec.key_id, key);
    assert_eq!(adec.key_version_id, aenc.key_version_id);

    let (dk, v): (proto::GenerateDataKeyResponse, _) =
        call(&env, "GenerateDataKey", &proto::GenerateDataKeyRequest { key_id: key.clone(), ..Default::default() })
            .await;
    assert_eq!(dk.plaintext.len(), 32);
    assert!(v.is_some());
    let (adk, _): (proto::AdvanceGenerateDataKeyResponse, _) = call(
        &env,
        "AdvanceGenerateDataKey",
        &proto::AdvanceGenerateDataKeyRequest { key_id: key.clone(), number_of_bytes: 16, ..Default::default() },
    )
    .await;
    let (opened, _): (proto::AdvanceDecryptResponse, _) = call(
        &env,
        "AdvanceDecrypt",
        &proto::AdvanceDecryptRequest { ciphertext_blob: adk.ciphertext_blob, ..Default::default() },
    )
    .await;
    assert_eq!(opened.plaintext, adk.plaintext);

    let (rnd, _): (proto::GenerateRandomResponse, _) =
        call(&env, "GenerateRandom", &proto::GenerateRandomRequest { length: 24 }).await;
    assert_eq!(rnd.random.len(), 24);
    let (h, _): (proto::HashResponse, _) =
        call(&env, "Hash", &proto::HashRequest { message: b"abc".to_vec(), algorithm: "SHA_256".to_owned() }).await;
    assert_eq!(h.digest, digest::digest(&digest::SHA256, b"abc").as_ref());
}

#[tokio::test]
async fn data_key_pairs() {
    use aws_lc_rs::encoding::AsDer as _;
    use aws_lc_rs::signature::KeyPair as _;
    let env = env().await;
    let key = aes_key(&env).await;
    let (p, _): (proto::GenerateDataKeyPairResponse, _) = call(
        &env,
        "GenerateDataKeyPair",
        &proto::GenerateDataKeyPairRequest {
            key_id: key.clone(),
            key_pair_spec: "RSA_2048".to_owned(),
            key_format: "DER".to_owned(),
            aad: b"ctx".to_vec(),
            ..Default::default()
        },
    )
    .await;
    let pair = RsaKeyPair::from_pkcs8(&p.private_key_plaintext).expect("PKCS#8 RSA private key");
    let spki: aws_lc_rs::encoding::PublicKeyX509Der<'static> = pair.public_key().as_der().unwrap();
    assert_eq!(spki.as_ref(), &p.public_key[..], "the public key belongs to the private key");
    let (opened, _): (proto::DecryptResponse, _) = call(
        &env,
        "Decrypt",
        &proto::DecryptRequest {
            key_id: key.clone(),
            ciphertext_blob: p.private_key_ciphertext_blob,
            iv: p.iv,
            aad: b"ctx".to_vec(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(opened.plaintext, p.private_key_plaintext);

    let (q, _): (proto::AdvanceGenerateDataKeyPairWithoutPlaintextResponse, _) = call(
        &env,
        "AdvanceGenerateDataKeyPairWithoutPlaintext",
        &proto::AdvanceGenerateDataKeyPairWithoutPlaintextRequest {
            key_id: key.clone(),
            key_pair_spec: "EC_P256".to_owned(),
            ..Default::default()
        },
    )
    .await;
    assert!(String::from_utf8(q.public_key).unwrap().starts_with("-----BEGIN PUBLIC KEY-----\n"));
    let (opened, _): (proto::AdvanceDecryptResponse, _) = call(
        &env,
        "AdvanceDecrypt",
        &proto::AdvanceDecryptRequest { ciphertext_blob: q.private_key_ciphertext_blob, ..Default::default() },
    )
    .await;
    assert!(String::from_utf8(opened.plaintext).unwrap().starts_with("-----BEGIN PRIVATE KEY-----\n"));
    assert_eq!(opened.key_version_id, q.key_version_id);

    let (_, _): (proto::GenerateDataKeyPairWithoutPlaintextResponse, _) = call(
        &env,
        "GenerateDataKeyPairWithoutPlaintext",
        &proto::GenerateDataKeyPairWithoutPlaintextRequest {
            key_id: key.clone(),
            key_pair_spec: "EC_P256".to_owned(),
            ..Default::default()
        },
    )
    .await;
    let (a, _): (proto::AdvanceGenerateDataKeyPairResponse, _) = call(
        &env,
        "AdvanceGenerateDataKeyPair",
        &proto::AdvanceGenerateDataKeyPairRequest {
            key_id: key.clone(),
            key_pair_spec: "RSA_3072".to_owned(),
            ..Default::default()
        },
    )
    .await;
    assert!(!a.private_key_plaintext.is_empty() && a.private_key_ciphertext_blob[0] == b'$');
    let bad = proto::GenerateDataKeyPairRequest {
        key_id: key.clone(),
        key_pair_spec: "DSA".to_owned(),
        ..Default::default()
    };
    assert_eq!(call_err(&env, "GenerateDataKeyPair", &bad).await, (400, "InvalidParameter".to_owned()));
    let sm2 =
        proto::GenerateDataKeyPairRequest { key_id: key, key_pair_spec: "EC_SM2".to_owned(), ..Default::default() };
    assert_eq!(call_err(&env, "GenerateDataKeyPair", &sm2).await, (400, "UnsupportedOperation".to_owned()));
}

#[tokio::test]
async fn asymmetric_hmac_and_secrets() {
    let env = env().await;
    let admin = Caller::admin(TenantId::default_tenant());
    let rsa = env.d.create_key(&admin, CreateKeyRequest::new(KeySpec::Rsa2048)).await.unwrap().id.to_string();
    let message = b"to be signed".to_vec();
    let (s, v): (proto::SignResponse, _) = call(
        &env,
        "Sign",
        &proto::SignRequest {
            key_id: rsa.clone(),
            algorithm: "RSA_PSS_SHA_256".to_owned(),
            message: message.clone(),
            message_type: "RAW".to_owned(),
            ..Default::default()
        },
    )
    .await;
    assert!(v.is_some());
    let digest = digest::digest(&digest::SHA256, &message).as_ref().to_vec();
    let (ok, v): (proto::VerifyResponse, _) = call(
        &env,
        "Verify",
        &proto::VerifyRequest {
            key_id: rsa.clone(),
            algorithm: "RSA_PSS_SHA_256".to_owned(),
            digest,
            signature: s.signature,
            message_type: "DIGEST".to_owned(),
            ..Default::default()
        },
    )
    .await;
    assert!(ok.value);
    assert!(v.is_some());
    let (pk, v): (proto::GetPublicKeyResponse, _) =
        call(&env, "GetPublicKey", &proto::GetPublicKeyRequest { key_id: rsa.clone() }).await;
    assert!(pk.public_key.starts_with("-----BEGIN PUBLIC KEY-----\n"));
    assert!(v.is_some());

    let mut req = CreateKeyRequest::new(KeySpec::Hmac256);
    req.usage = Some(KeyUsageSet::of(&[KeyUsage::GenerateMac, KeyUsage::VerifyMac]));
    let hk = env.d.create_key(&admin, req).await.unwrap().id.to_string();
    let (mac, _): (proto::HmacResponse, _) =
        call(&env, "Hmac", &proto::HmacRequest { key_id: hk, message: b"m".to_vec() }).await;
    assert_eq!(mac.signature.len(), 32);

    let path = SecretPath::parse("db/password").unwrap();
    env.d.put_secret(&admin, PutSecretRequest::new(path.clone(), b"v1".to_vec())).await.unwrap();
    env.d.put_secret(&admin, PutSecretRequest::new(path, b"v2".to_vec())).await.unwrap();
    let (cur, _): (proto::GetSecretValueResponse, _) = call(
        &env,
        "GetSecretValue",
        &proto::GetSecretValueRequest { secret_name: "db/password".to_owned(), ..Default::default() },
    )
    .await;
    assert_eq!(cur.secret_data, "v2");
    assert_eq!(cur.version_stages, vec!["ACSCurrent".to_owned()]);
    let (prev, _): (proto::GetSecretValueResponse, _) = call(
        &env,
        "GetSecretValue",
        &proto::GetSecretValueRequest {
            secret_name: "db/password".to_owned(),
            version_stage: "ACSPrevious".to_owned(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(prev.secret_data, "v1");
    assert_eq!(prev.version_stages, vec!["ACSPrevious".to_owned()]);
}

#[tokio::test]
async fn every_error_code_over_the_wire() {
    let env = env().await;
    let admin = Caller::admin(TenantId::default_tenant());
    let key = aes_key(&env).await;
    let enc = |k: &str| proto::EncryptRequest { key_id: k.to_owned(), plaintext: b"x".to_vec(), ..Default::default() };

    // Authentication and header errors.
    let mut bad_sig = Sent::new("Encrypt", &enc(&key));
    bad_sig.tamper = true;
    let (s, e) = error_of(&env, request(&env, &env.key_id, &bad_sig)).await;
    assert_eq!((s.as_u16(), e.error_code.as_str()), (401, "SignatureNotMatch"));
    let (s, e) =
        error_of(&env, request(&env, "KAAP.00000000-0000-0000-0000-000000000000", &Sent::new("Encrypt", &enc(&key))))
            .await;
    assert_eq!((s.as_u16(), e.error_code.as_str()), (401, "Unauthorized"));
    let mut skewed = Sent::new("Encrypt", &enc(&key));
    skewed.date = SystemTime::now() - Duration::from_secs(16 * 60);
    let (s, e) = error_of(&env, request(&env, &env.key_id, &skewed)).await;
    assert_eq!((s.as_u16(), e.error_code.as_str()), (400, "RequestTimeTooSkewed"));
    let (s, e) = error_of(&env, request(&env, &env.key_id, &Sent::new("NoSuchApi", &enc(&key)))).await;
    assert_eq!(
        (s.as_u16(), e.error_code.as_str(), e.error_message.as_str()),
        (400, "InvalidApiName", "The ApiName \"NoSuchApi\" is invalid.")
    );

    // Replay of an accepted request: refused as long as it is replayed (its date cannot change); the SDK
    // retries a throttled request with a fresh date and signature.
    let once = Sent::new("GenerateRandom", &proto::GenerateRandomRequest { length: 4 });
    assert_eq!(send_req(&env, request(&env, &env.key_id, &once)).await.status, StatusCode::OK);
    for _ in 0..2 {
        let (s, e) = error_of(&env, request(&env, &env.key_id, &once)).await;
        assert_eq!((s.as_u16(), e.error_code.as_str()), (429, "Rejected.Throttling"));
    }
    let mut fresh = Sent::new("GenerateRandom", &proto::GenerateRandomRequest { length: 4 });
    fresh.date = once.date + Duration::from_secs(1);
    assert_eq!(send_req(&env, request(&env, &env.key_id, &fresh)).await.status, StatusCode::OK);

    // Header-level errors, built by editing a signed request.
    let edit = |f: &dyn Fn(&mut axum::http::HeaderMap)| {
        let mut r = request(&env, &env.key_id, &Sent::new("Encrypt", &enc(&key)));
        f(r.headers_mut());
        r
    };
    let (s, e) = error_of(
        &env,
        edit(&|h| {
            h.remove("x-kms-apiversion");
        }),
    )
    .await;
    assert_eq!((s.as_u16(), e.error_code.as_str()), (400, "InvalidApiVersion"));
    let (s, e) = error_of(
        &env,
        edit(&|h| {
            h.remove("x-kms-signaturemethod");
        }),
    )
    .await;
    assert_eq!(
        (s.as_u16(), e.error_code.as_str(), e.error_message.as_str()),
        (400, "InvalidParam", "The Param x-kms-signaturemethod is invalid.")
    );
    let (s, e) = error_of(
        &env,
        edit(&|h| {
            h.insert("date", "yesterday".parse().unwrap());
        }),
    )
    .await;
    assert_eq!(
        (s.as_u16(), e.error_code.as_str(), e.error_message.as_str()),
        (400, "InvalidParam", "The Param Date is invalid.")
    );
    let (s, e) = error_of(
        &env,
        edit(&|h| {
            h.remove("x-kms-acccesskeyid");
        }),
    )
    .await;
    assert_eq!((s.as_u16(), e.error_code.as_str()), (400, "MissingParameter"));
    let (s, e) = error_of(
        &env,
        edit(&|h| {
            h.insert("content-type", "application/json".parse().unwrap());
        }),
    )
    .await;
    assert_eq!((s.as_u16(), e.error_code.as_str()), (415, "InvalidContentType"));
    let big = Request::post("/")
        .header("content-type", "application/x-protobuf")
        .header("x-kms-apiname", "Encrypt")
        .body(Body::from(vec![0u8; 3 * 1024 * 1024 + 1]))
        .unwrap();
    let (s, _) = error_of(&env, big).await;
    assert_eq!(s.as_u16(), 413);

    // Operation errors.
    assert_eq!(call_err(&env, "Encrypt", &enc("no-such-key")).await, (404, "Forbidden.KeyNotFound".to_owned()));
    assert_eq!(call_err(&env, "Encrypt", &enc("")).await, (400, "MissingParameter".to_owned()));
    let big = proto::EncryptRequest { key_id: key.clone(), plaintext: vec![1; 6 * 1024 + 1], ..Default::default() };
    assert_eq!(call_err(&env, "Encrypt", &big).await, (400, "InvalidParameter".to_owned()));
    let sm4 = proto::EncryptRequest { algorithm: "SM4_GCM".to_owned(), ..enc(&key) };
    assert_eq!(call_err(&env, "Encrypt", &sm4).await, (400, "UnsupportedOperation".to_owned()));
    let k = KeyRef::parse(&key).unwrap();
    env.d.disable_key(&admin, &k).await.unwrap();
    assert_eq!(call_err(&env, "Encrypt", &enc(&key)).await, (409, "Rejected.Disabled".to_owned()));
    let other = aes_key(&env).await;
    env.d.schedule_key_deletion(&admin, &KeyRef::parse(&other).unwrap(), 7).await.unwrap();
    assert_eq!(call_err(&env, "Encrypt", &enc(&other)).await, (409, "Rejected.PendingDeletion".to_owned()));
    let mut imp = CreateKeyRequest::new(KeySpec::Aes256);
    imp.external = true;
    let pending = env.d.create_key(&admin, imp).await.unwrap().id.to_string();
    assert_eq!(call_err(&env, "Encrypt", &enc(&pending)).await, (409, "Rejected.PendingImport".to_owned()));

    // A revoked ClientKey is refused.
    clientkey::revoke(&env.d, &admin, &env.key_id).await.unwrap();
    let (s, e) = error_of(
        &env,
        request(&env, &env.key_id, &Sent::new("GenerateRandom", &proto::GenerateRandomRequest { length: 4 })),
    )
    .await;
    assert_eq!((s.as_u16(), e.error_code.as_str()), (401, "Unauthorized"));
}

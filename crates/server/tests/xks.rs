//! The XKS proxy API over real sockets, served in-process (so a test can make the backend slow or faulty):
//! two independent real signers (curl --aws-sigv4, botocore), every errorName with its status, round trips,
//! tampering, key states, rotation, metadata, health, secondary authorization and quotas.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http_body_util::Full;
use hyper::body::Bytes;
use kmsgate_core::backend::KeyMaterialRef;
use kmsgate_core::{
    Caller, CreateKeyRequest, Dispatcher, KeyBackend, KeyId, KeyRef, KeySpec, KeyUsage, KeyUsageSet, MemberHealth,
    SigningAlgorithm, TenantId,
};
use kmsgate_xks::XksConfig;
use kmsgate_xks::admin::{self, NewStore};
use kmsgate_xks::keystore::Quota;
use kmsgate_xks::rules::Rules;
use serde_json::{Value, json};
use uuid::Uuid;
use zeroize::Zeroizing;

const REGION: &str = "eu-west-1";

/// A software backend that a test can slow down or break at run time.
#[derive(Debug)]
struct Faulty {
    inner: Arc<dyn KeyBackend>,
    delay_ms: AtomicU64,
    fail_decrypt: AtomicBool,
    corrupt_encrypt: AtomicBool,
}

#[async_trait]
impl KeyBackend for Faulty {
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
        key: KeyMaterialRef<'_>,
        iv: &[u8],
        aad: &[u8],
        pt: &[u8],
    ) -> kmsgate_core::Result<Vec<u8>> {
        tokio::time::sleep(Duration::from_millis(self.delay_ms.load(Ordering::SeqCst))).await;
        let mut out = self.inner.aes_gcm_encrypt(key, iv, aad, pt).await?;
        if self.corrupt_encrypt.load(Ordering::SeqCst) {
            // A bit flip between the HSM and the proxy: what the integrity value and trial decrypt exist for.
            out[0] ^= 0x01;
        }
        Ok(out)
    }
    async fn aes_gcm_decrypt(
        &self,
        key: KeyMaterialRef<'_>,
        iv: &[u8],
        aad: &[u8],
        ct: &[u8],
    ) -> kmsgate_core::Result<Zeroizing<Vec<u8>>> {
        tokio::time::sleep(Duration::from_millis(self.delay_ms.load(Ordering::SeqCst))).await;
        if self.fail_decrypt.load(Ordering::SeqCst) {
            return Err(kmsgate_core::Error::backend(std::io::Error::other("HSM slot 0: CKR_DEVICE_ERROR")));
        }
        self.inner.aes_gcm_decrypt(key, iv, aad, ct).await
    }
    async fn rsa_oaep_encrypt(&self, key: KeyMaterialRef<'_>, pt: &[u8]) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.rsa_oaep_encrypt(key, pt).await
    }
    async fn rsa_oaep_decrypt(&self, key: KeyMaterialRef<'_>, ct: &[u8]) -> kmsgate_core::Result<Zeroizing<Vec<u8>>> {
        self.inner.rsa_oaep_decrypt(key, ct).await
    }
    async fn sign_digest(
        &self,
        key: KeyMaterialRef<'_>,
        a: SigningAlgorithm,
        d: &[u8],
    ) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.sign_digest(key, a, d).await
    }
    async fn verify_digest(
        &self,
        key: KeyMaterialRef<'_>,
        a: SigningAlgorithm,
        d: &[u8],
        s: &[u8],
    ) -> kmsgate_core::Result<bool> {
        self.inner.verify_digest(key, a, d, s).await
    }
    async fn public_key_der(&self, key: KeyMaterialRef<'_>) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.public_key_der(key).await
    }
    async fn hmac_sha256(&self, key: KeyMaterialRef<'_>, data: &[u8]) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.hmac_sha256(key, data).await
    }
    async fn random(&self, len: usize) -> kmsgate_core::Result<Vec<u8>> {
        self.inner.random(len).await
    }
    async fn destroy(&self, key: KeyMaterialRef<'_>) -> kmsgate_core::Result<()> {
        self.inner.destroy(key).await
    }
    async fn health(&self) -> Vec<MemberHealth> {
        self.inner.health().await
    }
}

#[derive(Debug, Clone)]
struct Cred {
    akid: String,
    secret: String,
    uri_path: String,
}

/// An XKS proxy served in-process on a real socket, over a temporary SQLite store.
struct Proxy {
    addr: std::net::SocketAddr,
    d: Dispatcher,
    admin: Caller,
    backend: Arc<Faulty>,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Proxy {
    async fn start(cfg: XksConfig) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let inner = common::software_backend(dir.path());
        Proxy::start_with(cfg, dir, inner, Duration::from_millis(150)).await
    }

    /// The same proxy over another backend (PKCS#11).
    async fn start_with(
        cfg: XksConfig,
        dir: tempfile::TempDir,
        inner: Arc<dyn KeyBackend>,
        deadline: Duration,
    ) -> Proxy {
        let store = common::open_store(dir.path()).await;
        let backend = Arc::new(Faulty {
            inner,
            delay_ms: AtomicU64::new(0),
            fail_decrypt: AtomicBool::new(false),
            corrupt_encrypt: AtomicBool::new(false),
        });
        let (d, _audit) = common::dispatcher_over(store, backend.clone(), deadline).await;
        let router = kmsgate_xks::router(d.clone(), cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(kmsgate::http::serve(
            listener,
            None,
            router,
            async move {
                let _ = rx.await;
            },
            Duration::from_secs(1),
        ));
        Proxy { addr, d, admin: Caller::admin(TenantId::default_tenant()), backend, _dir: dir, _stop: tx }
    }

    async fn key(&self, usage: Option<&[KeyUsage]>) -> String {
        let mut req = CreateKeyRequest::new(KeySpec::Aes256);
        req.usage = usage.map(KeyUsageSet::of);
        self.d.create_key(&self.admin, req).await.unwrap().id.to_string()
    }

    async fn store(&self, s: NewStore) -> Cred {
        let info = admin::create_store(&self.d, &self.admin, s).await.unwrap();
        let c = admin::create_credential(&self.d, &self.admin, &info.name).await.unwrap();
        Cred { akid: c.access_key_id.clone(), secret: c.secret.to_string(), uri_path: c.uri_path.clone() }
    }

    async fn simple_store(&self, name: &str, keys: &[&str]) -> Cred {
        self.store(NewStore {
            name: name.into(),
            uri_path: format!("/{name}/kms/xks/v1"),
            keys: keys.iter().map(|s| s.to_string()).collect(),
            ..NewStore::default()
        })
        .await
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    async fn call(&self, cred: &Cred, op_path: &str, body: &Value) -> common::Reply {
        let path = format!("{}{op_path}", cred.uri_path);
        let bytes = serde_json::to_vec(body).unwrap();
        let headers = rust_sign(&self.host(), &path, &bytes, cred, REGION, time::OffsetDateTime::now_utc());
        send(self.addr, "POST", &path, &bytes, &headers).await
    }
}

/// kmsgate's own signer (the verifier's counterpart): used where the signer is not under test.
fn rust_sign(
    host: &str,
    path: &str,
    body: &[u8],
    cred: &Cred,
    region: &str,
    t: time::OffsetDateTime,
) -> Vec<(String, String)> {
    let (date, auth) = kmsgate_xks::sigv4::sign(&kmsgate_xks::sigv4::ToSign {
        method: "POST",
        path,
        query: None,
        headers: &[("host", host), ("content-type", "application/json")],
        body,
        access_key_id: &cred.akid,
        secret: &cred.secret,
        region,
        service: "kms-xks-proxy",
        time: t,
    });
    vec![
        ("host".into(), host.into()),
        ("content-type".into(), "application/json".into()),
        ("x-amz-date".into(), date),
        ("authorization".into(), auth),
    ]
}

async fn send(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(String, String)],
) -> common::Reply {
    let mut b = hyper::Request::builder().method(method).uri(path);
    for (k, v) in headers {
        b = b.header(k.as_str(), v.as_str());
    }
    let req = b.body(Full::new(Bytes::copy_from_slice(body))).unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    common::send_on(stream, false, req).await.unwrap()
}

fn md(op: &str) -> Value {
    json!({
        "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
        "kmsKeyArn": "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "kmsOperation": op,
        "kmsRequestId": Uuid::new_v4().to_string(),
    })
}

fn enc_body(pt: &[u8], aad: Option<&[u8]>, cdiv: bool) -> Value {
    let mut b =
        json!({"requestMetadata": md("Encrypt"), "plaintext": STANDARD.encode(pt), "encryptionAlgorithm": "AES_GCM"});
    if let Some(a) = aad {
        b["additionalAuthenticatedData"] = STANDARD.encode(a).into();
    }
    if cdiv {
        b["ciphertextDataIntegrityValueAlgorithm"] = "SHA_256".into();
    }
    b
}

/// The Decrypt body for an Encrypt reply.
fn dec_body(enc: &Value, aad: Option<&[u8]>) -> Value {
    let mut b = json!({
        "requestMetadata": md("Decrypt"),
        "ciphertext": enc["ciphertext"],
        "ciphertextMetadata": enc["ciphertextMetadata"],
        "encryptionAlgorithm": "AES_GCM",
        "initializationVector": enc["initializationVector"],
        "authenticationTag": enc["authenticationTag"],
    });
    if let Some(a) = aad {
        b["additionalAuthenticatedData"] = STANDARD.encode(a).into();
    }
    b
}

fn b64d(v: &Value) -> Vec<u8> {
    STANDARD.decode(v.as_str().unwrap()).unwrap()
}

fn b64e(v: &[u8]) -> Value {
    Value::String(STANDARD.encode(v))
}

#[track_caller]
fn assert_error(r: &common::Reply, status: u16, name: &str) {
    let body = r.json();
    assert_eq!((r.status, body["errorName"].as_str().unwrap_or("")), (status, name), "{body}");
    let msg = body["errorMessage"].as_str().unwrap_or("");
    assert!(msg.len() < 512 && msg.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{msg:?}");
    assert_eq!(r.headers["content-type"], "application/json");
}

#[tokio::test]
async fn round_trips_integrity_value_sizes_and_tampering() {
    let p = Proxy::start(XksConfig::default()).await;
    let key = p.key(None).await;
    let cred = p.simple_store("rt", &[&key]).await;
    let path = format!("/keys/{key}");

    // Without AAD, with AAD, with an integrity value, at the spec's minimum sizes.
    let big_pt: Vec<u8> = (0..4300u32).map(|i| (i % 251) as u8).collect();
    let big_aad: Vec<u8> = (0..8192u32).map(|i| (i % 241) as u8).collect();
    let cases: Vec<(Vec<u8>, Option<Vec<u8>>, bool)> = vec![
        (b"Hello World!".to_vec(), None, false),
        (b"Hello World!".to_vec(), Some(b"project=nile,department=marketing".to_vec()), false),
        (b"Hello World!".to_vec(), Some(b"project=nile".to_vec()), true),
        (b"".to_vec(), None, true),
        (big_pt.clone(), Some(big_aad.clone()), true),
    ];
    for (pt, aad, cdiv) in &cases {
        let r = p.call(&cred, &format!("{path}/encrypt"), &enc_body(pt, aad.as_deref(), *cdiv)).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let enc = r.json();
        let ct = b64d(&enc["ciphertext"]);
        let iv = b64d(&enc["initializationVector"]);
        let tag = b64d(&enc["authenticationTag"]);
        let meta = b64d(&enc["ciphertextMetadata"]);
        assert_eq!(ct.len(), pt.len(), "GCM ciphertext has the plaintext's length (tag split off)");
        assert_eq!((iv.len(), tag.len()), (12, 16));
        assert!(meta.len() <= 20 && meta[0] == 1);
        if *cdiv {
            // Appendix C, recomputed by the client as KMS does.
            let mut all = aad.clone().unwrap_or_default();
            for part in [&meta, &iv, &ct, &tag] {
                all.extend_from_slice(part);
            }
            let want = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &all);
            assert_eq!(b64d(&enc["ciphertextDataIntegrityValue"]), want.as_ref());
        } else {
            assert!(enc.get("ciphertextDataIntegrityValue").is_none());
        }
        let r = p.call(&cred, &format!("{path}/decrypt"), &dec_body(&enc, aad.as_deref())).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(b64d(&r.json()["plaintext"]), *pt);
    }

    // Tampering: each field alone → InvalidCiphertextException.
    let aad = b"context".to_vec();
    let enc = p.call(&cred, &format!("{path}/encrypt"), &enc_body(b"secret data", Some(&aad), false)).await.json();
    let flip = |v: &Value, i: usize| {
        let mut b = b64d(v);
        b[i] ^= 0x80;
        b64e(&b)
    };
    let mut tampered = Vec::new();
    for field in ["ciphertext", "authenticationTag", "initializationVector", "ciphertextMetadata"] {
        let mut b = dec_body(&enc, Some(&aad));
        // The metadata's first byte is the format; flip inside the version so the format still parses.
        b[field] = flip(&enc[field], if field == "ciphertextMetadata" { 5 } else { 0 });
        tampered.push((field, b));
    }
    tampered.push(("additionalAuthenticatedData", dec_body(&enc, Some(b"contexT"))));
    tampered.push(("no additionalAuthenticatedData", dec_body(&enc, None)));
    let mut moved = dec_body(&enc, None);
    // AAD=X with no metadata must never verify as metadata X with no AAD (the length prefixes).
    moved["additionalAuthenticatedData"] = enc["ciphertextMetadata"].clone();
    moved.as_object_mut().unwrap().remove("ciphertextMetadata");
    tampered.push(("metadata moved to AAD", moved));
    let mut format = dec_body(&enc, Some(&aad));
    format["ciphertextMetadata"] = flip(&enc["ciphertextMetadata"], 0);
    tampered.push(("metadata format", format));
    let mut iv16 = dec_body(&enc, Some(&aad));
    iv16["initializationVector"] = b64e(&[0u8; 16]);
    tampered.push(("16-byte IV", iv16));
    for (what, body) in tampered {
        let r = p.call(&cred, &format!("{path}/decrypt"), &body).await;
        assert_eq!(r.status, 400, "{what}: {}", String::from_utf8_lossy(&r.body));
        assert_error(&r, 400, "InvalidCiphertextException");
    }
    // Nothing was broken for real: the untampered request still decrypts.
    let r = p.call(&cred, &format!("{path}/decrypt"), &dec_body(&enc, Some(&aad))).await;
    assert_eq!(b64d(&r.json()["plaintext"]), b"secret data");
}

#[tokio::test]
async fn metadata_cannot_select_another_key_and_rotation_keeps_old_ciphertexts() {
    let p = Proxy::start(XksConfig::default()).await;
    let (a, b) = (p.key(None).await, p.key(None).await);
    let cred = p.simple_store("two", &[&a, &b]).await;
    let enc_a = p.call(&cred, &format!("/keys/{a}/encrypt"), &enc_body(b"for a", None, false)).await.json();
    let enc_b = p.call(&cred, &format!("/keys/{b}/encrypt"), &enc_body(b"for b", None, false)).await.json();
    // Key b's ciphertext sent to key a's URI, and key b's version in key a's request: both refused.
    let r = p.call(&cred, &format!("/keys/{a}/decrypt"), &dec_body(&enc_b, None)).await;
    assert_error(&r, 400, "InvalidCiphertextException");
    let mut mixed = dec_body(&enc_a, None);
    mixed["ciphertextMetadata"] = enc_b["ciphertextMetadata"].clone();
    let r = p.call(&cred, &format!("/keys/{a}/decrypt"), &mixed).await;
    assert_error(&r, 400, "InvalidCiphertextException");

    // Rotation: new ciphertexts name the new version, old ones still decrypt.
    let before = p.d.resolve(&TenantId::default_tenant(), &KeyRef::Id(KeyId::parse(&a).unwrap())).await.unwrap();
    p.d.rotate_key(&p.admin, &KeyRef::Id(KeyId::parse(&a).unwrap())).await.unwrap();
    let enc_new = p.call(&cred, &format!("/keys/{a}/encrypt"), &enc_body(b"after", None, true)).await.json();
    let old_version = &b64d(&enc_a["ciphertextMetadata"])[1..];
    let new_version = &b64d(&enc_new["ciphertextMetadata"])[1..];
    assert_eq!(old_version, before.primary_version.as_bytes());
    assert_ne!(old_version, new_version);
    let r = p.call(&cred, &format!("/keys/{a}/decrypt"), &dec_body(&enc_a, None)).await;
    assert_eq!(b64d(&r.json()["plaintext"]), b"for a");
    let r = p.call(&cred, &format!("/keys/{a}/decrypt"), &dec_body(&enc_new, None)).await;
    assert_eq!(b64d(&r.json()["plaintext"]), b"after");
}

#[tokio::test]
async fn key_metadata_states_and_usage_subsets() {
    let p = Proxy::start(XksConfig::default()).await;
    let full = p.key(None).await;
    let wrap = p.key(Some(&[KeyUsage::Encrypt, KeyUsage::Decrypt, KeyUsage::Wrap, KeyUsage::Unwrap])).await;
    let enc_only = p.key(Some(&[KeyUsage::Encrypt])).await;
    let dec_only = p.key(Some(&[KeyUsage::Decrypt])).await;
    let neither = p.key(Some(&[])).await;
    let cred = p.simple_store("meta", &[&full, &wrap, &enc_only, &dec_only, &neither]).await;
    let meta = |k: &str| {
        let (p, cred, k) = (&p, &cred, k.to_owned());
        async move { p.call(cred, &format!("/keys/{k}/metadata"), &json!({"requestMetadata": md("CreateKey")})).await }
    };
    let r = meta(&full).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"], "keyStatus": "ENABLED"}));
    assert_eq!(meta(&wrap).await.json()["keyUsage"], json!(["ENCRYPT", "DECRYPT", "WRAP", "UNWRAP"]));
    assert_eq!(meta(&enc_only).await.json()["keyUsage"], json!(["ENCRYPT"]));
    assert_eq!(meta(&neither).await.json()["keyUsage"], json!([]));

    // Usage subsets: encrypt-only encrypts but refuses an integrity value (it could not be verified) and
    // decryption; decrypt-only and no-usage keys refuse to encrypt.
    let r = p.call(&cred, &format!("/keys/{enc_only}/encrypt"), &enc_body(b"x", None, false)).await;
    assert_eq!(r.status, 200);
    let enc = r.json();
    let r = p.call(&cred, &format!("/keys/{enc_only}/encrypt"), &enc_body(b"x", None, true)).await;
    assert_error(&r, 400, "InvalidKeyUsageException");
    let r = p.call(&cred, &format!("/keys/{enc_only}/decrypt"), &dec_body(&enc, None)).await;
    assert_error(&r, 400, "InvalidKeyUsageException");
    for k in [&dec_only, &neither] {
        let r = p.call(&cred, &format!("/keys/{k}/encrypt"), &enc_body(b"x", None, false)).await;
        assert_error(&r, 400, "InvalidKeyUsageException");
    }

    // Disabled and pending deletion: metadata says DISABLED, cryptography is InvalidStateException.
    let enc = p.call(&cred, &format!("/keys/{full}/encrypt"), &enc_body(b"x", None, false)).await.json();
    let full_ref = KeyRef::Id(KeyId::parse(&full).unwrap());
    p.d.disable_key(&p.admin, &full_ref).await.unwrap();
    assert_eq!(meta(&full).await.json()["keyStatus"], "DISABLED");
    let r = p.call(&cred, &format!("/keys/{full}/encrypt"), &enc_body(b"x", None, false)).await;
    assert_error(&r, 400, "InvalidStateException");
    let r = p.call(&cred, &format!("/keys/{full}/decrypt"), &dec_body(&enc, None)).await;
    assert_error(&r, 400, "InvalidStateException");
    p.d.enable_key(&p.admin, &full_ref).await.unwrap();
    assert_eq!(meta(&full).await.json()["keyStatus"], "ENABLED");
    p.d.schedule_key_deletion(&p.admin, &full_ref, 7).await.unwrap();
    assert_eq!(meta(&full).await.json()["keyStatus"], "DISABLED");
    let r = p.call(&cred, &format!("/keys/{full}/decrypt"), &dec_body(&enc, None)).await;
    assert_error(&r, 400, "InvalidStateException");
}

#[tokio::test]
async fn every_error_name_with_its_status() {
    let p = Proxy::start(XksConfig::default()).await;
    let key = p.key(None).await;
    let other_tenant_key = {
        let t = TenantId::parse("other").unwrap();
        p.d.ensure_tenant(&t).await.unwrap();
        p.d.create_key(&Caller::admin(t), CreateKeyRequest::new(KeySpec::Aes256)).await.unwrap().id.to_string()
    };
    let not_listed = p.key(None).await;
    let cred = p.simple_store("errs", &[&key]).await;
    let enc = p.call(&cred, &format!("/keys/{key}/encrypt"), &enc_body(b"data", None, false)).await.json();

    // ValidationException: bad JSON, missing fields, bad Base64, wrong algorithms, wrong IV/tag sizes,
    // missing required requestMetadata fields.
    let mut bad: Vec<(&str, Value)> = vec![
        ("no requestMetadata", json!({"plaintext": "AA==", "encryptionAlgorithm": "AES_GCM"})),
        ("no plaintext", json!({"requestMetadata": md("Encrypt"), "encryptionAlgorithm": "AES_GCM"})),
        ("bad base64", json!({"requestMetadata": md("Encrypt"), "plaintext": "***", "encryptionAlgorithm": "AES_GCM"})),
        (
            "wrong algorithm",
            json!({"requestMetadata": md("Encrypt"), "plaintext": "AA==", "encryptionAlgorithm": "AES_CBC"}),
        ),
        ("no algorithm", json!({"requestMetadata": md("Encrypt"), "plaintext": "AA=="})),
        (
            "plaintext not a string",
            json!({"requestMetadata": md("Encrypt"), "plaintext": 987654321, "encryptionAlgorithm": "AES_GCM"}),
        ),
    ];
    let mut cdiv = enc_body(b"x", None, false);
    cdiv["ciphertextDataIntegrityValueAlgorithm"] = "SHA_512".into();
    bad.push(("cdiv algorithm", cdiv));
    let mut no_arn = enc_body(b"x", None, false);
    no_arn["requestMetadata"].as_object_mut().unwrap().remove("kmsKeyArn");
    bad.push(("no kmsKeyArn", no_arn));
    let mut no_id = enc_body(b"x", None, false);
    no_id["requestMetadata"].as_object_mut().unwrap().remove("kmsRequestId");
    bad.push(("no kmsRequestId", no_id));
    for (what, body) in bad {
        let r = p.call(&cred, &format!("/keys/{key}/encrypt"), &body).await;
        assert_eq!(r.status, 400, "{what}");
        assert_error(&r, 400, "ValidationException");
        if what == "plaintext not a string" {
            assert!(!String::from_utf8_lossy(&r.body).contains("987654321"), "the value is never echoed");
        }
    }
    for (field, len) in [("initializationVector", 8), ("authenticationTag", 12)] {
        let mut b = dec_body(&enc, None);
        b[field] = b64e(&vec![0u8; len]);
        let r = p.call(&cred, &format!("/keys/{key}/decrypt"), &b).await;
        assert_error(&r, 400, "ValidationException");
    }
    let mut b = dec_body(&enc, None);
    b["ciphertextMetadata"] = b64e(&[1u8; 21]);
    assert_error(&p.call(&cred, &format!("/keys/{key}/decrypt"), &b).await, 400, "ValidationException");
    let r = p
        .call(
            &cred,
            &format!("/keys/{key}/metadata"),
            &json!({"requestMetadata": {"kmsOperation": "CreateKey", "kmsRequestId": "x"}}),
        )
        .await;
    assert_error(&r, 400, "ValidationException");
    // Not JSON at all.
    let path = format!("{}/keys/{key}/encrypt", cred.uri_path);
    let headers = rust_sign(&p.host(), &path, b"{not json", &cred, REGION, time::OffsetDateTime::now_utc());
    assert_error(&send(p.addr, "POST", &path, b"{not json", &headers).await, 400, "ValidationException");
    // Unknown fields and unknown kmsOperation values are accepted.
    let mut future = enc_body(b"x", None, false);
    future["requestMetadata"]["kmsOperation"] = "BulkEncrypt".into();
    future["requestMetadata"]["kmsRecipientAttestationImageSha384"] = "abc".into();
    future["someFutureField"] = json!({"a": 1});
    assert_eq!(p.call(&cred, &format!("/keys/{key}/encrypt"), &future).await.status, 200);

    // KeyNotFoundException: unknown, not listed for this store, in another tenant, malformed id.
    for k in ["no-such-key", not_listed.as_str(), other_tenant_key.as_str(), &"k".repeat(129)] {
        let r = p.call(&cred, &format!("/keys/{k}/metadata"), &json!({"requestMetadata": md("CreateKey")})).await;
        assert_error(&r, 404, "KeyNotFoundException");
    }
    // The internal sealing key is never reachable, even for an all-keys store.
    let all = p
        .store(NewStore {
            name: "all".into(),
            uri_path: "/all/kms/xks/v1".into(),
            all_keys: true,
            ..NewStore::default()
        })
        .await;
    let sealing = common::internal_key(&p.d, &TenantId::default_tenant(), Dispatcher::SEALING_ALIAS).await;
    let r = p.call(&all, &format!("/keys/{}/encrypt", sealing.id), &enc_body(b"x", None, false)).await;
    assert_error(&r, 404, "KeyNotFoundException");
    assert_eq!(p.call(&all, &format!("/keys/{not_listed}/encrypt"), &enc_body(b"x", None, false)).await.status, 200);

    // InvalidUriPathException: unknown prefix (no authentication needed), unknown operation (authenticated).
    let stranger =
        Cred { akid: "AAAAAAAAAAAAAAAAAAAA".into(), secret: "x".repeat(44), uri_path: "/nope/kms/xks/v1".into() };
    assert_error(&p.call(&stranger, "/health", &json!({})).await, 404, "InvalidUriPathException");
    assert_error(
        &p.call(&cred, "/invalid", &json!({"requestMetadata": md("X")})).await,
        404,
        "InvalidUriPathException",
    );
    assert_error(&p.call(&cred, &format!("/keys/{key}/sign"), &json!({})).await, 404, "InvalidUriPathException");
    // ... but an unknown operation under a known prefix with a bad signature is an authentication failure.
    let wrong = Cred { secret: "y".repeat(44), ..cred.clone() };
    assert_error(&p.call(&wrong, "/invalid", &json!({})).await, 401, "AuthenticationFailedException");

    // 405 for other methods on the four operation URIs, with Allow: POST.
    for op in [
        "/health".to_owned(),
        format!("/keys/{key}/encrypt"),
        format!("/keys/{key}/decrypt"),
        format!("/keys/{key}/metadata"),
    ] {
        let r = send(p.addr, "GET", &format!("{}{op}", cred.uri_path), b"", &[("host".into(), p.host())]).await;
        assert_eq!(r.status, 405, "{op}");
        assert_eq!(r.headers["allow"], "POST");
    }

    // UnsupportedOperationException: over our configured sizes (still above the spec minimum).
    let r = p.call(&cred, &format!("/keys/{key}/encrypt"), &enc_body(&vec![0u8; 65537], None, false)).await;
    assert_error(&r, 501, "UnsupportedOperationException");
    let r = p.call(&cred, &format!("/keys/{key}/encrypt"), &enc_body(b"x", Some(&vec![0u8; 65536]), false)).await;
    assert_error(&r, 501, "UnsupportedOperationException");

    // InvalidStateException, InvalidKeyUsageException, InvalidCiphertextException, AccessDeniedException,
    // ThrottlingException and AuthenticationFailedException have their own tests below and above; provoke
    // each once more here so this test alone covers all twelve.
    let r = p.call(&cred, &format!("/keys/{key}/decrypt"), &dec_body(&enc, Some(b"wrong aad"))).await;
    assert_error(&r, 400, "InvalidCiphertextException");
    let enc_only = p.key(Some(&[KeyUsage::Encrypt])).await;
    let eo = p.simple_store("eo", &[&enc_only]).await;
    assert_error(
        &p.call(&eo, &format!("/keys/{enc_only}/encrypt"), &enc_body(b"x", None, true)).await,
        400,
        "InvalidKeyUsageException",
    );
    let key_ref = KeyRef::Id(KeyId::parse(&key).unwrap());
    p.d.disable_key(&p.admin, &key_ref).await.unwrap();
    assert_error(
        &p.call(&cred, &format!("/keys/{key}/encrypt"), &enc_body(b"x", None, false)).await,
        400,
        "InvalidStateException",
    );
    p.d.enable_key(&p.admin, &key_ref).await.unwrap();
    let rules: Rules =
        serde_json::from_value(json!({"rules": [{"name": "nobody", "effect": "deny", "principals": ["*"]}]})).unwrap();
    let denied = p
        .store(NewStore {
            name: "deny".into(),
            uri_path: "/deny/kms/xks/v1".into(),
            keys: vec![key.clone()],
            rules,
            ..NewStore::default()
        })
        .await;
    assert_error(
        &p.call(&denied, &format!("/keys/{key}/encrypt"), &enc_body(b"x", None, false)).await,
        403,
        "AccessDeniedException",
    );
    let throttled = p
        .store(NewStore {
            name: "slow".into(),
            uri_path: "/slow/kms/xks/v1".into(),
            keys: vec![key.clone()],
            quota: Some(Quota { rps: 1, burst: 2 }),
            ..NewStore::default()
        })
        .await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r =
            p.call(&throttled, &format!("/keys/{key}/metadata"), &json!({"requestMetadata": md("DescribeKey")})).await;
        statuses.push(r.status);
        if r.status == 429 {
            assert_error(&r, 429, "ThrottlingException");
        }
    }
    assert_eq!(&statuses[..2], &[200, 200]);
    assert!(statuses[2..].contains(&429), "{statuses:?}");
    // The quota is per key store: the others are unaffected.
    assert_eq!(
        p.call(&cred, &format!("/keys/{key}/metadata"), &json!({"requestMetadata": md("DescribeKey")})).await.status,
        200
    );
    assert_error(&p.call(&wrong, "/health", &json!({})).await, 401, "AuthenticationFailedException");

    // DependencyTimeoutException: the backend misses the dispatcher's deadline.
    p.backend.delay_ms.store(400, Ordering::SeqCst);
    let r = p.call(&cred, &format!("/keys/{key}/encrypt"), &enc_body(b"x", None, false)).await;
    assert_error(&r, 503, "DependencyTimeoutException");
    p.backend.delay_ms.store(0, Ordering::SeqCst);

    // InternalException: a failing HSM, and a corrupted encryption caught by the trial decrypt.
    p.backend.fail_decrypt.store(true, Ordering::SeqCst);
    let r = p.call(&cred, &format!("/keys/{key}/decrypt"), &dec_body(&enc, None)).await;
    assert_error(&r, 500, "InternalException");
    assert!(!String::from_utf8_lossy(&r.body).contains("CKR_"), "backend internals stay in the logs");
    p.backend.fail_decrypt.store(false, Ordering::SeqCst);
    p.backend.corrupt_encrypt.store(true, Ordering::SeqCst);
    let r = p.call(&cred, &format!("/keys/{key}/encrypt"), &enc_body(b"data key", None, true)).await;
    assert_error(&r, 500, "InternalException");
    p.backend.corrupt_encrypt.store(false, Ordering::SeqCst);
    assert_eq!(p.call(&cred, &format!("/keys/{key}/encrypt"), &enc_body(b"x", None, true)).await.status, 200);
}

/// What is wrong, the headers sent, the body sent.
type AuthCase = (&'static str, Vec<(String, String)>, Vec<u8>);

#[tokio::test]
async fn authentication_failures_are_401_and_reveal_nothing() {
    let p = Proxy::start(XksConfig { regions: vec![REGION.into(), "us-east-1".into()], ..XksConfig::default() }).await;
    let key = p.key(None).await;
    let cred = p.simple_store("auth", &[&key]).await;
    let other = p.simple_store("auth2", &[&key]).await;
    let path = format!("{}/keys/{key}/encrypt", cred.uri_path);
    let body = serde_json::to_vec(&enc_body(b"x", None, false)).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let ok = rust_sign(&p.host(), &path, &body, &cred, REGION, now);
    assert_eq!(send(p.addr, "POST", &path, &body, &ok).await.status, 200);
    assert_eq!(
        send(p.addr, "POST", &path, &body, &rust_sign(&p.host(), &path, &body, &cred, "us-east-1", now)).await.status,
        200
    );

    let set = |h: &[(String, String)], name: &str, value: &str| -> Vec<(String, String)> {
        h.iter().map(|(k, v)| (k.clone(), if k == name { value.to_owned() } else { v.clone() })).collect()
    };
    let mut tampered_body = body.clone();
    let last = tampered_body.len() - 2;
    tampered_body[last] ^= 1;
    let cases: Vec<AuthCase> = vec![
        ("tampered body", ok.clone(), tampered_body),
        ("tampered signed header", set(&ok, "content-type", "application/x-json"), body.clone()),
        ("tampered host", set(&ok, "host", "evil.example:443"), body.clone()),
        (
            "tampered date",
            set(&ok, "x-amz-date", &kmsgate_xks::sigv4::format_amz_date(now + time::Duration::seconds(1))),
            body.clone(),
        ),
        ("old date", rust_sign(&p.host(), &path, &body, &cred, REGION, now - time::Duration::minutes(6)), body.clone()),
        (
            "future date",
            rust_sign(&p.host(), &path, &body, &cred, REGION, now + time::Duration::minutes(6)),
            body.clone(),
        ),
        (
            "wrong secret",
            rust_sign(&p.host(), &path, &body, &Cred { secret: "z".repeat(44), ..cred.clone() }, REGION, now),
            body.clone(),
        ),
        ("wrong region", rust_sign(&p.host(), &path, &body, &cred, "ap-south-1", now), body.clone()),
        (
            "unknown access key",
            rust_sign(
                &p.host(),
                &path,
                &body,
                &Cred { akid: "ABCDEFGHIJKLMNOPQRSTUVWX".into(), ..cred.clone() },
                REGION,
                now,
            ),
            body.clone(),
        ),
        ("another store's credential", rust_sign(&p.host(), &path, &body, &other, REGION, now), body.clone()),
        ("no authorization", ok.iter().filter(|(k, _)| k != "authorization").cloned().collect(), body.clone()),
        (
            "unsigned payload",
            {
                let mut h = ok.clone();
                h.push(("x-amz-content-sha256".into(), "UNSIGNED-PAYLOAD".into()));
                h
            },
            body.clone(),
        ),
    ];
    // What the server would have computed, to make sure it is never echoed.
    for (what, headers, body) in cases {
        let r = send(p.addr, "POST", &path, &body, &headers).await;
        assert_eq!(r.status, 401, "{what}: {}", String::from_utf8_lossy(&r.body));
        assert_error(&r, 401, "AuthenticationFailedException");
        let text = String::from_utf8_lossy(&r.body).to_string();
        for leak in ["AWS4-HMAC-SHA256\n", "POST\n", "Signature", "canonical", "expected"] {
            assert!(!text.contains(leak), "{what}: {text}");
        }
    }

    // Revoked: refused at once on this replica (its own change), the other credential keeps working.
    admin::revoke_credential(&p.d, &p.admin, &cred.akid).await.unwrap();
    assert_error(
        &send(p.addr, "POST", &path, &body, &rust_sign(&p.host(), &path, &body, &cred, REGION, now)).await,
        401,
        "AuthenticationFailedException",
    );
    let path2 = format!("{}/keys/{key}/encrypt", other.uri_path);
    assert_eq!(
        send(p.addr, "POST", &path2, &body, &rust_sign(&p.host(), &path2, &body, &other, REGION, now)).await.status,
        200
    );
}

#[tokio::test]
async fn secondary_authorization_rules() {
    let p = Proxy::start(XksConfig::default()).await;
    let key = p.key(None).await;
    let rules: Rules = serde_json::from_value(json!({"rules": [
        {"name": "deny-mallory", "effect": "deny", "principals": ["arn:aws:iam::*:user/mallory"]},
        {"name": "ebs-crypto", "effect": "allow", "operations": ["encrypt", "decrypt"], "kmsViaServices": ["ebs"],
         "sourceVpces": ["vpce-0123*", ""]},
        {"name": "admin-metadata", "effect": "allow", "operations": ["metadata"], "kmsOperations": ["CreateKey", "DescribeKey"]}
    ]}))
    .unwrap();
    let cred = p
        .store(NewStore {
            name: "rules".into(),
            uri_path: "/rules/kms/xks/v1".into(),
            keys: vec![key.clone()],
            rules,
            ..NewStore::default()
        })
        .await;
    let with = |op: &str, f: &dyn Fn(&mut Value)| {
        let mut b =
            if op == "metadata" { json!({"requestMetadata": md("CreateKey")}) } else { enc_body(b"x", None, false) };
        f(&mut b["requestMetadata"]);
        b
    };
    let cases: Vec<(&str, &str, Value, u16)> = vec![
        ("ebs encrypt", "encrypt", with("encrypt", &|m| m["kmsViaService"] = "ebs".into()), 200),
        (
            "ebs via endpoint",
            "encrypt",
            with("encrypt", &|m| {
                m["kmsViaService"] = "ebs".into();
                m["awsSourceVpce"] = "vpce-0123abc".into();
            }),
            200,
        ),
        (
            "other endpoint",
            "encrypt",
            with("encrypt", &|m| {
                m["kmsViaService"] = "ebs".into();
                m["awsSourceVpce"] = "vpce-9999".into();
            }),
            403,
        ),
        ("s3 encrypt", "encrypt", with("encrypt", &|m| m["kmsViaService"] = "s3".into()), 403),
        ("direct encrypt", "encrypt", with("encrypt", &|_| {}), 403),
        (
            "mallory via ebs",
            "encrypt",
            with("encrypt", &|m| {
                m["kmsViaService"] = "ebs".into();
                m["awsPrincipalArn"] = "arn:aws:iam::1:user/mallory".into();
            }),
            403,
        ),
        ("create key", "metadata", with("metadata", &|_| {}), 200),
        ("metadata for another op", "metadata", with("metadata", &|m| m["kmsOperation"] = "ListKeys".into()), 403),
    ];
    for (what, op, body, status) in cases {
        let r = p.call(&cred, &format!("/keys/{key}/{op}"), &body).await;
        assert_eq!(r.status, status, "{what}: {}", String::from_utf8_lossy(&r.body));
        if status == 403 {
            assert_error(&r, 403, "AccessDeniedException");
        }
    }
    // Health is never subject to the rules.
    let r = p
        .call(&cred, "/health", &json!({"requestMetadata": {"kmsOperation": "KmsHealthCheck", "kmsRequestId": "h"}}))
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn health_status_is_deep_and_fresh() {
    let p = Proxy::start(XksConfig { health_refresh_secs: 1, ..XksConfig::default() }).await;
    let key = p.key(None).await;
    let cred = p.simple_store("health", &[&key]).await;
    let health = || async {
        p.call(
            &cred,
            "/health",
            &json!({"requestMetadata": {"kmsOperation": "CreateCustomKeyStore", "kmsRequestId": "h1"}}),
        )
        .await
    };
    let r = health().await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let h = r.json();
    assert!(h["xksProxyFleetSize"].as_u64().unwrap() >= 1);
    assert_eq!(h["xksProxyVendor"], "kmsgate");
    assert!(h["xksProxyModel"].as_str().unwrap().contains(env!("CARGO_PKG_VERSION")));
    assert_eq!(h["ekmVendor"], "kmsgate software key store");
    let fleet = h["ekmFleetDetails"].as_array().unwrap();
    assert!((1..=10).contains(&fleet.len()));
    assert_eq!(fleet[0], json!({"id": "software", "model": fleet[0]["model"], "healthStatus": "ACTIVE"}));

    // The spec allows no ValidationException for GetHealthStatus: a body without metadata still gets health.
    assert_eq!(p.call(&cred, "/health", &json!({})).await.status, 200);

    // The deep check used its own internal key, which is not a customer key.
    let health_key =
        common::internal_key(&p.d, &TenantId::default_tenant(), "alias/kmsgate-internal/xks-health-software").await;
    assert!(health_key.internal);
    assert_eq!(health_key.versions[0].handle.backend, "software");
    let r =
        p.call(&cred, &format!("/keys/{}/metadata", health_key.id), &json!({"requestMetadata": md("CreateKey")})).await;
    assert_error(&r, 404, "KeyNotFoundException");

    // A broken HSM shows within a refresh interval: real decryption fails, the probe still says fine.
    p.backend.fail_decrypt.store(true, Ordering::SeqCst);
    let mut seen = String::new();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen = health().await.json()["ekmFleetDetails"][0]["healthStatus"].as_str().unwrap_or("").to_owned();
        if seen == "UNAVAILABLE" {
            break;
        }
    }
    assert_eq!(seen, "UNAVAILABLE");
    p.backend.fail_decrypt.store(false, Ordering::SeqCst);
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen = health().await.json()["ekmFleetDetails"][0]["healthStatus"].as_str().unwrap_or("").to_owned();
        if seen == "ACTIVE" {
            break;
        }
    }
    assert_eq!(seen, "ACTIVE");
    // A configured fleet size wins over heartbeats.
    let p2 = Proxy::start(XksConfig { fleet_size: 3, ..XksConfig::default() }).await;
    let key2 = p2.key(None).await;
    let c2 = p2.simple_store("h2", &[&key2]).await;
    let r = p2
        .call(&c2, "/health", &json!({"requestMetadata": {"kmsOperation": "KmsHealthCheck", "kmsRequestId": "h2"}}))
        .await;
    assert_eq!(r.json()["xksProxyFleetSize"], 3);
}

// ---- the two independent real signers ------------------------------------------------------------------

fn python() -> String {
    if let Ok(p) = std::env::var("KMSGATE_TEST_PYTHON") {
        return p;
    }
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/venv/bin/python");
    for candidate in [venv, "python3"] {
        let ok = std::process::Command::new(candidate)
            .args(["-c", "import botocore"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return candidate.to_owned();
        }
    }
    panic!(
        "botocore is needed for the XKS interop test: run ./scripts/test, or set KMSGATE_TEST_PYTHON to a python with botocore"
    );
}

/// Headers botocore's SigV4Auth computes for a POST of `body` to `url`.
fn botocore_sign(url: &str, body: &str, cred: &Cred, region: &str) -> Vec<(String, String)> {
    use std::io::Write as _;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../xks/tests/botocore_sign.py");
    let mut child = std::process::Command::new(python())
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let input = json!({"url": url, "body": body, "access_key_id": cred.akid, "secret": cred.secret, "region": region});
    child.stdin.take().unwrap().write_all(input.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "botocore: {}", String::from_utf8_lossy(&out.stderr));
    let headers: serde_json::Map<String, Value> = serde_json::from_slice(&out.stdout).unwrap();
    headers.into_iter().map(|(k, v)| (k, v.as_str().unwrap().to_owned())).collect()
}

/// `curl --aws-sigv4 "aws:amz:REGION:kms-xks-proxy"` as the spec's Appendix D runs it.
fn curl(url: &str, body: &str, cred: &Cred, region: &str) -> (u16, Value) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--aws-sigv4", &format!("aws:amz:{region}:kms-xks-proxy"), "--user"])
        .arg(format!("{}:{}", cred.akid, cred.secret))
        .args(["-X", "POST", "-H", "Content-Type:application/json", "--data-binary", body])
        .args(["-w", "\n%{http_code}", url])
        .output()
        .expect("curl is needed for the XKS interop test (scripts/test installs it)");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (json_text, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), serde_json::from_str(json_text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn curl_and_botocore_signatures_are_accepted() {
    let p = Proxy::start(XksConfig { regions: vec![REGION.into()], ..XksConfig::default() }).await;
    let key = p.key(None).await;
    let cred = p.simple_store("interop", &[&key]).await;
    let base = format!("http://{}{}", p.addr, cred.uri_path);

    // curl: health, metadata, then an encrypt/decrypt round trip with AAD and an integrity value.
    let curl_cred = cred.clone();
    let (base2, key2) = (base.clone(), key.clone());
    let (status, h) = tokio::task::spawn_blocking(move || {
        curl(
            &format!("{base2}/health"),
            r#"{"requestMetadata":{"kmsOperation":"KmsHealthCheck","kmsRequestId":"c1"}}"#,
            &curl_cred,
            REGION,
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["ekmFleetDetails"][0]["healthStatus"], "ACTIVE");
    let run_curl = |path: String, body: Value, region: &'static str| {
        let c = cred.clone();
        let url = format!("{base}{path}");
        tokio::task::spawn_blocking(move || curl(&url, &body.to_string(), &c, region))
    };
    let (status, m) =
        run_curl(format!("/keys/{key2}/metadata"), json!({"requestMetadata": md("CreateKey")}), REGION).await.unwrap();
    assert_eq!((status, m["keySpec"].as_str()), (200, Some("AES_256")));
    let (status, enc) =
        run_curl(format!("/keys/{key}/encrypt"), enc_body(b"via curl", Some(b"aad"), true), REGION).await.unwrap();
    assert_eq!(status, 200, "{enc}");
    let (status, dec) = run_curl(format!("/keys/{key}/decrypt"), dec_body(&enc, Some(b"aad")), REGION).await.unwrap();
    assert_eq!((status, b64d(&dec["plaintext"])), (200, b"via curl".to_vec()));
    // curl with a wrong region and a wrong secret.
    let (status, e) =
        run_curl("/health".into(), json!({"requestMetadata": md("KmsHealthCheck")}), "us-west-2").await.unwrap();
    assert_eq!((status, e["errorName"].as_str()), (401, Some("AuthenticationFailedException")));
    let bad = Cred { secret: "A".repeat(44), ..cred.clone() };
    let url = format!("{base}/health");
    let (status, _) = tokio::task::spawn_blocking(move || curl(&url, "{}", &bad, REGION)).await.unwrap();
    assert_eq!(status, 401);

    // botocore: sign, then send exactly what it signed (Host is the URL's host:port).
    let path = format!("{}/keys/{key}/encrypt", cred.uri_path);
    let body = enc_body(b"via botocore", None, true).to_string();
    let c = cred.clone();
    let url = format!("http://{}{path}", p.addr);
    let b2 = body.clone();
    let mut headers = tokio::task::spawn_blocking(move || botocore_sign(&url, &b2, &c, REGION)).await.unwrap();
    headers.push(("host".into(), p.host()));
    let r = send(p.addr, "POST", &path, body.as_bytes(), &headers).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let enc = r.json();
    // Tampering with what botocore signed fails.
    let mut tampered = body.clone().into_bytes();
    let i = tampered.len() - 3;
    tampered[i] ^= 1;
    assert_error(&send(p.addr, "POST", &path, &tampered, &headers).await, 401, "AuthenticationFailedException");
    let dpath = format!("{}/keys/{key}/decrypt", cred.uri_path);
    let dbody = dec_body(&enc, None).to_string();
    let (c, url, b2) = (cred.clone(), format!("http://{}{dpath}", p.addr), dbody.clone());
    let mut headers = tokio::task::spawn_blocking(move || botocore_sign(&url, &b2, &c, REGION)).await.unwrap();
    headers.push(("host".into(), p.host()));
    let r = send(p.addr, "POST", &dpath, dbody.as_bytes(), &headers).await;
    assert_eq!(b64d(&r.json()["plaintext"]), b"via botocore");
}

/// Issue 4: an XKS Encrypt/Decrypt round trip over the wire, served by the PKCS#11 backend on SoftHSM.
#[tokio::test]
async fn round_trip_served_by_pkcs11() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = kmsgate_hsm::Pkcs11Backend::start(common::pkcs11_config("hsm-xks")).await.expect("start PKCS#11");
    let p = Proxy::start_with(XksConfig::default(), dir, Arc::new(hsm), Duration::from_secs(2)).await;
    let key = p.key(None).await;
    let described = p.d.describe_key(&p.admin, &KeyRef::parse(&key).unwrap()).await.unwrap();
    assert_eq!(described.primary().unwrap().handle.backend, "hsm-xks", "the key lives in the HSM");
    let cred = p.simple_store("p11", &[key.as_str()]).await;
    let aad = b"tenant=acme";
    let enc = p.call(&cred, &format!("/keys/{key}/encrypt"), &enc_body(b"served by SoftHSM", Some(aad), true)).await;
    assert_eq!(enc.status, 200, "{}", String::from_utf8_lossy(&enc.body));
    let enc = enc.json();
    let dec = p.call(&cred, &format!("/keys/{key}/decrypt"), &dec_body(&enc, Some(aad))).await;
    assert_eq!(dec.status, 200, "{}", String::from_utf8_lossy(&dec.body));
    assert_eq!(b64d(&dec.json()["plaintext"]), b"served by SoftHSM");
    let mut tampered = enc.clone();
    let mut tag = b64d(&enc["authenticationTag"]);
    tag[0] ^= 1;
    tampered["authenticationTag"] = b64e(&tag);
    let bad = p.call(&cred, &format!("/keys/{key}/decrypt"), &dec_body(&tampered, Some(aad))).await;
    assert_error(&bad, 400, "InvalidCiphertextException");
}

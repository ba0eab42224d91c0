//! The PKCS#11 backend against a real SoftHSMv2 token: every algorithm checked independently with aws-lc-rs,
//! the token objects' attributes, handle binding, adoption, and the fault behaviour (deadlines, a full queue,
//! session loss, device errors, and a token whose directory disappears and comes back).
//!
//! `./scripts/test` creates a throwaway token and exports `SOFTHSM2_CONF`, `KMSGATE_TEST_P11_TOKEN` and
//! `KMSGATE_TEST_P11_PIN_FILE`. Without them these tests fail: they never skip, and never fall back to the
//! system's token directory. The recovery test runs in a child process with a token of its own, because
//! re-initialising the module affects every session of the process.

// Tests report failures by panicking; `expect` names what failed.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::rsa::{OAEP_SHA256_MGF1SHA256, OaepPublicEncryptingKey, PublicEncryptingKey};
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, RSA_PKCS1_2048_8192_SHA256, RSA_PSS_2048_8192_SHA256, UnparsedPublicKey,
    VerificationAlgorithm,
};
use kmsgate_core::{
    ErrorKind, HealthStatus, KeyBackend, KeyId, KeyMaterialRef, KeySpec, KeyState, KeyUsage, KeyUsageSet,
    SigningAlgorithm,
};
use kmsgate_hsm::cryptoki::context::Function;
use kmsgate_hsm::cryptoki::error::{Error as P11Error, RvError};
use kmsgate_hsm::cryptoki::mechanism::Mechanism;
use kmsgate_hsm::cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use kmsgate_hsm::{AdoptBy, Pkcs11Backend, Pkcs11Config};
use uuid::Uuid;

// ---- fixtures -------------------------------------------------------------------------------------------------

const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The throwaway token `./scripts/test` set up; panics (fails the test) when it is missing or when the
/// configuration points at the system's token directory.
fn test_config(name: &str) -> Pkcs11Config {
    let conf = env("SOFTHSM2_CONF").unwrap_or_else(|| {
        panic!("SOFTHSM2_CONF is not set: run the PKCS#11 tests through ./scripts/test, which creates a throwaway SoftHSM token")
    });
    let text = std::fs::read_to_string(&conf).unwrap_or_else(|e| panic!("cannot read SOFTHSM2_CONF {conf}: {e}"));
    let token_dir = text
        .lines()
        .find_map(|l| {
            l.trim().strip_prefix("directories.tokendir").map(|v| v.trim_start_matches([' ', '=']).trim().to_owned())
        })
        .unwrap_or_else(|| panic!("{conf} names no directories.tokendir"));
    assert!(
        !token_dir.starts_with("/var/lib/softhsm"),
        "refusing to test against the system token directory {token_dir}"
    );
    let pin_file = env("KMSGATE_TEST_P11_PIN_FILE").expect("KMSGATE_TEST_P11_PIN_FILE is not set (run ./scripts/test)");
    let mut c = Pkcs11Config::new(
        name,
        env("KMSGATE_TEST_P11_MODULE").unwrap_or_else(|| DEFAULT_MODULE.to_owned()),
        env("KMSGATE_TEST_P11_TOKEN").unwrap_or_else(|| "kmsgate-test".to_owned()),
    );
    c.pin_file = Some(PathBuf::from(pin_file));
    c.sessions = 2;
    // Generous: the machine may be busy; the fault tests set their own.
    c.deadline_ms = 5_000;
    c.keygen_deadline_ms = 30_000;
    c
}

async fn start(config: Pkcs11Config) -> Pkcs11Backend {
    Pkcs11Backend::start(config).await.expect("start the PKCS#11 backend")
}

async fn backend() -> Pkcs11Backend {
    start(test_config("hsm-test")).await
}

#[derive(Debug, Clone)]
struct TestKey {
    id: KeyId,
    version: Uuid,
    spec: KeySpec,
    handle: Vec<u8>,
}

impl TestKey {
    fn r(&self) -> KeyMaterialRef<'_> {
        KeyMaterialRef { key_id: &self.id, version: self.version, spec: self.spec, handle: &self.handle }
    }

    fn label(&self) -> String {
        format!("kmsgate:{}:{}", self.id, self.version)
    }
}

async fn generate_with(b: &Pkcs11Backend, spec: KeySpec, usage: KeyUsageSet) -> TestKey {
    let id = KeyId::generate();
    let version = Uuid::new_v4();
    let handle = b.generate(&id, version, spec, usage).await.expect("generate");
    TestKey { id, version, spec, handle }
}

async fn generate(b: &Pkcs11Backend, spec: KeySpec) -> TestKey {
    generate_with(b, spec, spec.allowed_usages()).await
}

async fn import(b: &Pkcs11Backend, spec: KeySpec, material: &[u8]) -> kmsgate_core::Result<TestKey> {
    let id = KeyId::generate();
    let version = Uuid::new_v4();
    let handle = b.import(&id, version, spec, spec.allowed_usages(), material).await?;
    Ok(TestKey { id, version, spec, handle })
}

fn kind<T: std::fmt::Debug>(r: kmsgate_core::Result<T>) -> ErrorKind {
    r.expect_err("expected an error").kind()
}

fn sha256(data: &[u8]) -> Vec<u8> {
    digest(&SHA256, data).as_ref().to_vec()
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).expect("random");
    b
}

/// aws-lc-rs verifiers take the key in the form the algorithm expects (PKCS#1 RSAPublicKey, SEC1 point): the
/// BIT STRING of the SPKI. A minimal DER walk, independent of the backend's encoder.
fn spki_public_key(spki: &[u8]) -> &[u8] {
    fn read_len(b: &[u8], i: &mut usize) -> usize {
        let first = b[*i];
        *i += 1;
        if first < 0x80 {
            return usize::from(first);
        }
        let mut len = 0;
        for _ in 0..(first & 0x7f) {
            len = (len << 8) | usize::from(b[*i]);
            *i += 1;
        }
        len
    }
    let mut i = 0;
    assert_eq!(spki[i], 0x30);
    i += 1;
    let total = read_len(spki, &mut i);
    assert_eq!(i + total, spki.len(), "SPKI length");
    assert_eq!(spki[i], 0x30);
    i += 1;
    let alg_len = read_len(spki, &mut i);
    i += alg_len;
    assert_eq!(spki[i], 0x03);
    i += 1;
    let bits_len = read_len(spki, &mut i);
    assert_eq!(spki[i], 0, "no unused bits");
    &spki[i + 1..i + bits_len]
}

fn verify_independently(alg: &'static dyn VerificationAlgorithm, spki: &[u8], message: &[u8], signature: &[u8]) {
    UnparsedPublicKey::new(alg, spki_public_key(spki))
        .verify(message, signature)
        .expect("aws-lc-rs verifies the HSM's signature with the exported public key");
}

/// Objects on the token with this label, with the attributes the tests look at.
async fn objects_labelled(b: &Pkcs11Backend, label: String) -> Vec<Vec<Attribute>> {
    b.with_session(Duration::from_secs(10), move |s| {
        let mut out = Vec::new();
        for o in s.find_objects(&[Attribute::Token(true), Attribute::Label(label.as_bytes().to_vec())])? {
            out.push(s.get_attributes(
                o,
                &[
                    AttributeType::Class,
                    AttributeType::Id,
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                    AttributeType::Sign,
                    AttributeType::Verify,
                    AttributeType::Value,
                ],
            )?);
        }
        Ok(out)
    })
    .await
    .expect("inspect token objects")
}

fn attr(attrs: &[Attribute], wanted: AttributeType) -> Option<&Attribute> {
    attrs.iter().find(|a| a.attribute_type() == wanted)
}

fn flag(attrs: &[Attribute], wanted: AttributeType) -> Option<bool> {
    attr(attrs, wanted).map(|a| match a {
        Attribute::Token(v)
        | Attribute::Private(v)
        | Attribute::Sensitive(v)
        | Attribute::Extractable(v)
        | Attribute::NeverExtractable(v)
        | Attribute::Encrypt(v)
        | Attribute::Decrypt(v)
        | Attribute::Sign(v)
        | Attribute::Verify(v) => *v,
        other => panic!("not a flag: {other:?}"),
    })
}

fn class_of(attrs: &[Attribute]) -> ObjectClass {
    match attr(attrs, AttributeType::Class) {
        Some(Attribute::Class(c)) => *c,
        other => panic!("no class: {other:?}"),
    }
}

// ---- identity, start-up and health ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn starts_warm_and_reports_an_active_member() {
    let mut config = test_config("hsm-a");
    config.sessions = 3;
    let b = start(config.clone()).await;
    assert_eq!(b.name(), "hsm-a");
    assert_eq!(b.kind(), "pkcs11");

    let status = b.status().await;
    assert_eq!(status.pool.size, 3);
    assert_eq!(status.pool.open, 3, "every session is opened and logged in before start returns");
    assert_eq!((status.pool.failing, status.pool.in_use, status.pool.waiting), (0, 0, 0));
    assert_eq!(status.health.status, HealthStatus::Active, "{:?}", status.health);
    assert_eq!(status.health.id, "hsm-a");
    assert!(status.health.model.contains("SoftHSM"), "{}", status.health.model);
    let token = status.token.expect("token summary");
    assert_eq!(token.label, config.token_label);
    let slot = status.slot.expect("slot");
    assert!(status.slots.iter().any(|s| s.id == slot && s.token_label.as_deref() == Some(config.token_label.as_str())));
    assert!(status.library.is_some_and(|l| l.manufacturer.contains("SoftHSM")));

    let health = b.health().await;
    assert_eq!(health.len(), 1);
    assert_eq!((health[0].id.as_str(), health[0].status), ("hsm-a", HealthStatus::Active));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_absent_token_starts_unavailable_and_a_bad_config_does_not_start() {
    let mut config = test_config("hsm-missing");
    config.token_label = "no-such-token-label".to_owned();
    config.sessions = 1;
    let b = start(config).await;
    let health = b.health().await;
    assert_eq!(health[0].status, HealthStatus::Unavailable);
    assert!(health[0].detail.contains("no token labelled"), "{}", health[0].detail);
    // Calls fail fast with the retryable dependency kind instead of waiting out the deadline.
    let started = Instant::now();
    assert_eq!(kind(b.random(8).await), ErrorKind::DependencyFailure);
    assert!(started.elapsed() < Duration::from_secs(1));

    let mut bad_module = test_config("hsm-bad");
    bad_module.module = PathBuf::from("/nonexistent/libpkcs11.so");
    assert_eq!(kind(Pkcs11Backend::start(bad_module).await), ErrorKind::InvalidRequest);
    let mut no_pin = test_config("hsm-bad");
    no_pin.pin_file = Some(PathBuf::from("/nonexistent/pin"));
    assert_eq!(kind(Pkcs11Backend::start(no_pin).await), ErrorKind::InvalidRequest);
    let mut zero = test_config("hsm-bad");
    zero.sessions = 0;
    assert_eq!(kind(Pkcs11Backend::start(zero).await), ErrorKind::InvalidRequest);
}

// ---- AES-256-GCM ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn aes_gcm_round_trips_with_and_without_aad() {
    let b = backend().await;
    let k = generate(&b, KeySpec::Aes256).await;
    let iv = random_bytes::<12>();
    for len in [0usize, 1, 16, 1000, 70_000] {
        // Empty AAD is a regression test: SoftHSMv2 issue #605 crashed on it; 2.6.1 must round-trip it.
        for aad in [&b""[..], &b"context: tenant=a"[..]] {
            let plaintext: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let sealed = b.aes_gcm_encrypt(k.r(), &iv, aad, &plaintext).await.expect("encrypt");
            assert_eq!(sealed.len(), len + 16);
            if len >= 16 {
                assert_ne!(&sealed[..len], plaintext.as_slice());
            }
            let opened = b.aes_gcm_decrypt(k.r(), &iv, aad, &sealed).await.expect("decrypt");
            assert_eq!(opened.as_slice(), plaintext.as_slice());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn aes_gcm_output_equals_aws_lc_for_an_imported_key() {
    let b = backend().await;
    let material = random_bytes::<32>();
    let k = import(&b, KeySpec::Aes256, &material).await.expect("import");
    let reference = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &material).unwrap());
    for (aad, plaintext) in [(&b""[..], &b"no aad"[..]), (b"aad", b""), (b"header", b"the quick brown fox")] {
        let iv = random_bytes::<12>();
        let hsm = b.aes_gcm_encrypt(k.r(), &iv, aad, plaintext).await.expect("HSM encrypt");
        let mut expected = plaintext.to_vec();
        reference
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(iv), Aad::from(aad), &mut expected)
            .expect("aws-lc-rs encrypt");
        assert_eq!(hsm, expected, "ct || tag is the aws-lc-rs (and software backend) layout");
        let opened = b.aes_gcm_decrypt(k.r(), &iv, aad, &expected).await.expect("HSM decrypts aws-lc-rs output");
        assert_eq!(opened.as_slice(), plaintext);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn gcm_tag_mismatch_is_invalid_ciphertext_and_the_session_stays() {
    let mut config = test_config("hsm-tag");
    config.sessions = 1;
    let b = start(config).await;
    let k = generate(&b, KeySpec::Aes256).await;
    let iv = [9u8; 12];
    let sealed = b.aes_gcm_encrypt(k.r(), &iv, b"aad", b"secret data").await.unwrap();
    let mut tag = sealed.clone();
    *tag.last_mut().unwrap() ^= 1;
    let mut body = sealed.clone();
    body[0] ^= 1;
    type Case<'a> = (&'a str, &'a [u8], &'a [u8], &'a [u8]);
    let cases: [Case<'_>; 5] = [
        ("tag", &iv, b"aad", &tag),
        ("ciphertext", &iv, b"aad", &body),
        ("aad", &iv, b"aaD", &sealed),
        ("no aad", &iv, b"", &sealed),
        ("iv", &[8u8; 12], b"aad", &sealed),
    ];
    for (what, iv, aad, ct) in cases {
        assert_eq!(kind(b.aes_gcm_decrypt(k.r(), iv, aad, ct).await), ErrorKind::InvalidCiphertext, "wrong {what}");
    }
    assert_eq!(kind(b.aes_gcm_decrypt(k.r(), &iv, b"aad", &sealed[..15]).await), ErrorKind::InvalidCiphertext);
    assert_eq!(kind(b.aes_gcm_encrypt(k.r(), &[0u8; 16], b"", b"x").await), ErrorKind::InvalidRequest);
    // SoftHSM's CKR_GENERAL_ERROR for a bad tag did not cost the session.
    let pool = b.status().await.pool;
    assert_eq!((pool.sessions_evicted, pool.sessions_opened, pool.open), (0, 1, 1));
    let opened = b.aes_gcm_decrypt(k.r(), &iv, b"aad", &sealed).await.unwrap();
    assert_eq!(opened.as_slice(), b"secret data");
    // An AES operation on another spec is a usage error, decided before the HSM is asked.
    let hmac = generate(&b, KeySpec::Hmac256).await;
    assert_eq!(kind(b.aes_gcm_encrypt(hmac.r(), &iv, b"", b"x").await), ErrorKind::InvalidKeyUsage);
}

// ---- signatures -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn rsa_signatures_verify_independently() {
    let b = backend().await;
    for spec in [KeySpec::Rsa2048, KeySpec::Rsa3072] {
        let k = generate_with(&b, spec, KeyUsageSet::of(&[KeyUsage::Sign, KeyUsage::Verify])).await;
        let spki = b.public_key_der(k.r()).await.expect("public key");
        let message = format!("message for {spec}").into_bytes();
        let d = sha256(&message);
        for (alg, verifier) in [
            (SigningAlgorithm::RsaPkcs1Sha256, &RSA_PKCS1_2048_8192_SHA256 as &'static dyn VerificationAlgorithm),
            (SigningAlgorithm::RsaPssSha256, &RSA_PSS_2048_8192_SHA256),
        ] {
            let sig = b.sign_digest(k.r(), alg, &d).await.expect("sign");
            assert_eq!(sig.len(), if spec == KeySpec::Rsa2048 { 256 } else { 384 });
            verify_independently(verifier, &spki, &message, &sig);
            assert!(b.verify_digest(k.r(), alg, &d, &sig).await.unwrap());
            assert!(!b.verify_digest(k.r(), alg, &sha256(b"other"), &sig).await.unwrap());
            let mut tampered = sig.clone();
            tampered[7] ^= 1;
            assert!(!b.verify_digest(k.r(), alg, &d, &tampered).await.unwrap());
            let again = b.sign_digest(k.r(), alg, &d).await.unwrap();
            // PKCS#1 v1.5 is deterministic; PSS salts every signature.
            assert_eq!(again == sig, alg == SigningAlgorithm::RsaPkcs1Sha256, "{alg:?}");
        }
        assert_eq!(kind(b.sign_digest(k.r(), SigningAlgorithm::EcdsaSha256, &d).await), ErrorKind::InvalidKeyUsage);
        assert_eq!(
            kind(b.sign_digest(k.r(), SigningAlgorithm::RsaPssSha256, &d[..31]).await),
            ErrorKind::InvalidRequest
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ecdsa_signatures_are_der_and_verify_independently() {
    let b = backend().await;
    let k = generate(&b, KeySpec::EcP256).await;
    let spki = b.public_key_der(k.r()).await.unwrap();
    assert_eq!(spki.len(), 91, "P-256 SPKI");
    assert!(spki.windows(10).any(|w| w == [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]));
    let message = b"sign me";
    let d = sha256(message);
    for _ in 0..8 {
        let sig = b.sign_digest(k.r(), SigningAlgorithm::EcdsaSha256, &d).await.unwrap();
        // DER SEQUENCE of two INTEGERs, like the software backend emits (not the token's raw r || s).
        assert_eq!(sig[0], 0x30);
        assert_eq!(usize::from(sig[1]) + 2, sig.len());
        assert!((8..=72).contains(&sig.len()));
        verify_independently(&ECDSA_P256_SHA256_ASN1, &spki, message, &sig);
        assert!(b.verify_digest(k.r(), SigningAlgorithm::EcdsaSha256, &d, &sig).await.unwrap());
        assert!(!b.verify_digest(k.r(), SigningAlgorithm::EcdsaSha256, &sha256(b"x"), &sig).await.unwrap());
    }
    assert!(!b.verify_digest(k.r(), SigningAlgorithm::EcdsaSha256, &d, &[0x30, 0x00]).await.unwrap());
}

// ---- RSA-OAEP, HMAC, random ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn rsa_oaep_interoperates_with_aws_lc() {
    let b = backend().await;
    let k = generate_with(&b, KeySpec::Rsa2048, KeyUsageSet::of(&[KeyUsage::Encrypt, KeyUsage::Decrypt])).await;
    let spki = b.public_key_der(k.r()).await.unwrap();
    let public = OaepPublicEncryptingKey::new(PublicEncryptingKey::from_der(&spki).unwrap()).unwrap();
    for message in [&b""[..], b"a data key of 32 bytes, exactly!", &[7u8; 190]] {
        let mut ct = vec![0u8; public.ciphertext_size()];
        let ct = public.encrypt(&OAEP_SHA256_MGF1SHA256, message, &mut ct, None).unwrap().to_vec();
        let opened = b.rsa_oaep_decrypt(k.r(), &ct).await.expect("HSM decrypts aws-lc-rs OAEP-SHA256");
        assert_eq!(opened.as_slice(), message);
        let own = b.rsa_oaep_encrypt(k.r(), message).await.unwrap();
        assert_eq!(own.len(), 256);
        assert_eq!(b.rsa_oaep_decrypt(k.r(), &own).await.unwrap().as_slice(), message);
    }
    let ct = b.rsa_oaep_encrypt(k.r(), b"x").await.unwrap();
    for i in [0usize, 1, 100, 255] {
        let mut bad = ct.clone();
        bad[i] ^= 0x40;
        assert_eq!(kind(b.rsa_oaep_decrypt(k.r(), &bad).await), ErrorKind::InvalidCiphertext, "flip at {i}");
    }
    assert_eq!(kind(b.rsa_oaep_decrypt(k.r(), &ct[1..]).await), ErrorKind::InvalidCiphertext);
    assert_eq!(kind(b.rsa_oaep_decrypt(k.r(), &[0xff; 256]).await), ErrorKind::InvalidCiphertext);
    assert_eq!(kind(b.rsa_oaep_encrypt(k.r(), &[1; 191]).await), ErrorKind::InvalidRequest);
    assert_eq!(b.status().await.pool.sessions_evicted, 0, "padding failures cost no session");
}

#[tokio::test(flavor = "multi_thread")]
async fn hmac_equals_aws_lc_for_an_imported_key() {
    let b = backend().await;
    let material = random_bytes::<32>();
    let k = import(&b, KeySpec::Hmac256, &material).await.unwrap();
    let reference = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &material);
    for data in [&b""[..], b"payload", &[3u8; 5000]] {
        let mac = b.hmac_sha256(k.r(), data).await.unwrap();
        assert_eq!(mac, aws_lc_rs::hmac::sign(&reference, data).as_ref());
    }
    let generated = generate(&b, KeySpec::Hmac256).await;
    let one = b.hmac_sha256(generated.r(), b"x").await.unwrap();
    assert_eq!(one.len(), 32);
    assert_eq!(one, b.hmac_sha256(generated.r(), b"x").await.unwrap());
    assert_ne!(one, b.hmac_sha256(k.r(), b"x").await.unwrap());
    assert_eq!(
        kind(b.hmac_sha256(KeyMaterialRef { spec: KeySpec::Aes256, ..k.r() }, b"x").await),
        ErrorKind::InvalidKeyUsage
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn random_comes_from_the_token() {
    let b = backend().await;
    let a = b.random(32).await.unwrap();
    assert_eq!(a.len(), 32);
    assert_ne!(a, b.random(32).await.unwrap());
    assert!(b.random(0).await.unwrap().is_empty());
    assert_eq!(b.random(1024).await.unwrap().len(), 1024);
    assert_eq!(kind(b.random(64 * 1024 + 1).await), ErrorKind::InvalidRequest);
}

// ---- token objects, handles, lifecycle ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_sensitive_non_extractable_token_objects_carrying_their_usage() {
    let b = backend().await;
    let aes = generate_with(&b, KeySpec::Aes256, KeyUsageSet::of(&[KeyUsage::Encrypt])).await;
    // Handle: format 0x50, kind 1 (generated), 16-byte CKA_ID.
    assert_eq!(aes.handle.len(), 19);
    assert_eq!(&aes.handle[..3], &[0x50, 0x01, 16]);
    let objects = objects_labelled(&b, aes.label()).await;
    assert_eq!(objects.len(), 1);
    let o = &objects[0];
    assert_eq!(class_of(o), ObjectClass::SECRET_KEY);
    assert_eq!(attr(o, AttributeType::Id), Some(&Attribute::Id(aes.handle[3..].to_vec())));
    for (a, expected) in [
        (AttributeType::Token, true),
        (AttributeType::Private, true),
        (AttributeType::Sensitive, true),
        (AttributeType::Extractable, false),
        (AttributeType::NeverExtractable, true),
        (AttributeType::Encrypt, true),
        (AttributeType::Decrypt, false),
    ] {
        assert_eq!(flag(o, a), Some(expected), "{a:?}");
    }
    assert!(attr(o, AttributeType::Value).is_none(), "the key value cannot be read");
    // The token itself enforces the usage: the encrypt-only key does not decrypt (defence in depth behind the
    // dispatcher's usage check).
    let sealed = b.aes_gcm_encrypt(aes.r(), &[1; 12], b"", b"x").await.unwrap();
    assert_eq!(kind(b.aes_gcm_decrypt(aes.r(), &[1; 12], b"", &sealed).await), ErrorKind::InvalidKeyUsage);

    let ec = generate_with(&b, KeySpec::EcP256, KeyUsageSet::of(&[KeyUsage::Sign])).await;
    let objects = objects_labelled(&b, ec.label()).await;
    assert_eq!(objects.len(), 2, "a key pair: private and public halves under one CKA_ID and label");
    for o in &objects {
        assert_eq!(attr(o, AttributeType::Id), Some(&Attribute::Id(ec.handle[3..].to_vec())));
        if class_of(o) == ObjectClass::PRIVATE_KEY {
            assert_eq!(flag(o, AttributeType::Sign), Some(true));
            assert_eq!(flag(o, AttributeType::Sensitive), Some(true));
            assert_eq!(flag(o, AttributeType::Extractable), Some(false));
        } else {
            assert_eq!(class_of(o), ObjectClass::PUBLIC_KEY);
            assert_eq!(flag(o, AttributeType::Verify), Some(false));
        }
    }
    let hmac = generate_with(&b, KeySpec::Hmac256, KeyUsageSet::of(&[KeyUsage::VerifyMac])).await;
    let objects = objects_labelled(&b, hmac.label()).await;
    // Verifying a MAC recomputes it, so a verify-only HMAC key still needs CKA_SIGN.
    assert_eq!(
        (flag(&objects[0], AttributeType::Sign), flag(&objects[0], AttributeType::Verify)),
        (Some(true), Some(true))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handle_is_all_another_backend_instance_needs() {
    let first = backend().await;
    let aes = generate(&first, KeySpec::Aes256).await;
    let ec = generate(&first, KeySpec::EcP256).await;
    let sealed = first.aes_gcm_encrypt(aes.r(), &[4; 12], b"a", b"kept on the token").await.unwrap();
    let spki = first.public_key_der(ec.r()).await.unwrap();
    drop(first);
    // Another member (its own sessions and caches) on the same token: the stored handle finds the objects.
    let second = start(test_config("hsm-other")).await;
    let opened = second.aes_gcm_decrypt(aes.r(), &[4; 12], b"a", &sealed).await.unwrap();
    assert_eq!(opened.as_slice(), b"kept on the token");
    assert_eq!(second.public_key_der(ec.r()).await.unwrap(), spki);
}

#[tokio::test(flavor = "multi_thread")]
async fn handles_are_bound_to_their_key_version() {
    let b = backend().await;
    let k = generate(&b, KeySpec::Aes256).await;
    let other_id = KeyId::generate();
    let moved = KeyMaterialRef { key_id: &other_id, ..k.r() };
    assert_eq!(kind(b.aes_gcm_encrypt(moved, &[0; 12], b"", b"x").await), ErrorKind::Internal);
    let other_version = KeyMaterialRef { version: Uuid::new_v4(), ..k.r() };
    assert_eq!(kind(b.aes_gcm_encrypt(other_version, &[0; 12], b"", b"x").await), ErrorKind::Internal);
    let other_spec = KeyMaterialRef { spec: KeySpec::EcP256, ..k.r() };
    assert_eq!(kind(b.sign_digest(other_spec, SigningAlgorithm::EcdsaSha256, &[0; 32]).await), ErrorKind::Internal);
    let mut unknown_id = k.handle.clone();
    unknown_id[5] ^= 1;
    let unknown = KeyMaterialRef { handle: &unknown_id, ..k.r() };
    let err = b.aes_gcm_encrypt(unknown, &[0; 12], b"", b"x").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DependencyFailure);
    assert!(err.message().contains("no key object"), "{}", err.message());
    let malformed = KeyMaterialRef { handle: &[0x50, 9, 1, 1], ..k.r() };
    assert_eq!(kind(b.aes_gcm_encrypt(malformed, &[0; 12], b"", b"x").await), ErrorKind::Internal);
    let pending = KeyMaterialRef { handle: &[], ..k.r() };
    assert_eq!(
        kind(b.aes_gcm_encrypt(pending, &[0; 12], b"", b"x").await),
        ErrorKind::InvalidKeyState(KeyState::PendingImport)
    );
    // The rightful owner still works (the failed lookups cached nothing for it).
    b.aes_gcm_encrypt(k.r(), &[0; 12], b"", b"x").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn destroy_removes_the_objects_and_is_idempotent() {
    let b = backend().await;
    for spec in [KeySpec::Aes256, KeySpec::EcP256] {
        let k = generate(&b, spec).await;
        assert!(!objects_labelled(&b, k.label()).await.is_empty());
        b.destroy(k.r()).await.unwrap();
        assert!(objects_labelled(&b, k.label()).await.is_empty(), "{spec} objects destroyed");
        b.destroy(k.r()).await.unwrap();
        let err = match spec {
            KeySpec::Aes256 => b.aes_gcm_encrypt(k.r(), &[0; 12], b"", b"x").await.unwrap_err(),
            _ => b.sign_digest(k.r(), SigningAlgorithm::EcdsaSha256, &[0; 32]).await.unwrap_err(),
        };
        assert_eq!(err.kind(), ErrorKind::DependencyFailure);
    }
    // A key awaiting import has nothing to destroy.
    let id = KeyId::generate();
    b.destroy(KeyMaterialRef { key_id: &id, version: Uuid::new_v4(), spec: KeySpec::Aes256, handle: &[] })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn imports_take_raw_symmetric_keys_only() {
    let b = backend().await;
    assert_eq!(kind(import(&b, KeySpec::Aes256, &[1; 16]).await), ErrorKind::InvalidRequest);
    let err = import(&b, KeySpec::EcP256, &[0x30, 0x00]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.message().contains("import-hsm"), "{}", err.message());
    assert_eq!(kind(import(&b, KeySpec::Rsa2048, &[0x30, 0x00]).await), ErrorKind::Unsupported);
    let k = import(&b, KeySpec::Aes256, &[2; 32]).await.unwrap();
    let objects = objects_labelled(&b, k.label()).await;
    assert_eq!(flag(&objects[0], AttributeType::Sensitive), Some(true));
    assert_eq!(flag(&objects[0], AttributeType::Extractable), Some(false));
}

#[tokio::test(flavor = "multi_thread")]
async fn existing_keys_are_adopted_by_label_or_id() {
    let b = backend().await;
    let tag = Uuid::new_v4().simple().to_string();
    let (aes_label, ec_label, hmac_label, twin_label, small_label) = (
        format!("legacy-aes-{tag}"),
        format!("legacy-ec-{tag}"),
        format!("legacy-hmac-{tag}"),
        format!("twin-{tag}"),
        format!("aes128-{tag}"),
    );
    let ec_id = random_bytes::<8>().to_vec();
    let (l1, l2, l3, l4, l5, id) = (
        aes_label.clone(),
        ec_label.clone(),
        hmac_label.clone(),
        twin_label.clone(),
        small_label.clone(),
        ec_id.clone(),
    );
    b.with_session(Duration::from_secs(30), move |s| {
        let secret = |label: &str, len: u64, key_type: KeyType| {
            vec![
                Attribute::Token(true),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::KeyType(key_type),
                Attribute::ValueLen(len.into()),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
            ]
        };
        let mut aes = secret(&l1, 32, KeyType::AES);
        aes.extend([Attribute::Encrypt(true), Attribute::Decrypt(true)]);
        s.generate_key(&Mechanism::AesKeyGen, &aes)?;
        let mut hmac = secret(&l3, 32, KeyType::GENERIC_SECRET);
        hmac.push(Attribute::Sign(true));
        s.generate_key(&Mechanism::GenericSecretKeyGen, &hmac)?;
        for _ in 0..2 {
            s.generate_key(&Mechanism::AesKeyGen, &secret(&l4, 32, KeyType::AES))?;
        }
        s.generate_key(&Mechanism::AesKeyGen, &secret(&l5, 16, KeyType::AES))?;
        let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
        s.generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(true),
                Attribute::Id(id.clone()),
                Attribute::Label(l2.as_bytes().to_vec()),
                Attribute::EcParams(p256),
                Attribute::Verify(true),
            ],
            &[
                Attribute::Token(true),
                Attribute::Id(id),
                Attribute::Label(l2.as_bytes().to_vec()),
                Attribute::Sensitive(true),
                Attribute::Sign(true),
            ],
        )?;
        Ok(())
    })
    .await
    .expect("create legacy keys with raw PKCS#11");

    // By label; no CKA_ID, so the handle locates it by label.
    let aes = b.adopt(AdoptBy::Label(aes_label.clone())).await.unwrap();
    assert_eq!(aes.spec, KeySpec::Aes256);
    assert_eq!(aes.permitted, KeyUsageSet::of(&[KeyUsage::Encrypt, KeyUsage::Decrypt]));
    assert_eq!(aes.handle[..2], [0x50, 0x03]);
    assert!(aes.sensitive && !aes.extractable);
    // Any key id and version can use an adopted handle (it is not bound to the label kmsgate would give).
    let adopted =
        TestKey { id: KeyId::generate(), version: Uuid::new_v4(), spec: aes.spec, handle: aes.handle.clone() };
    let sealed = b.aes_gcm_encrypt(adopted.r(), &[5; 12], b"", b"adopted").await.unwrap();
    assert_eq!(b.aes_gcm_decrypt(adopted.r(), &[5; 12], b"", &sealed).await.unwrap().as_slice(), b"adopted");

    // By id; the handle keeps the id.
    let ec = b.adopt(AdoptBy::Id(ec_id.clone())).await.unwrap();
    assert_eq!(ec.spec, KeySpec::EcP256);
    assert_eq!(ec.handle[..3], [0x50, 0x02, 8]);
    assert_eq!(ec.id, ec_id);
    assert_eq!(ec.permitted, KeyUsageSet::of(&[KeyUsage::Sign, KeyUsage::Verify]));
    // By label too, and it still prefers the unique id.
    assert_eq!(b.adopt(AdoptBy::Label(ec_label)).await.unwrap().handle, ec.handle);
    let ec_key = TestKey { id: KeyId::generate(), version: Uuid::new_v4(), spec: ec.spec, handle: ec.handle.clone() };
    let spki = b.public_key_der(ec_key.r()).await.unwrap();
    let sig = b.sign_digest(ec_key.r(), SigningAlgorithm::EcdsaSha256, &sha256(b"m")).await.unwrap();
    verify_independently(&ECDSA_P256_SHA256_ASN1, &spki, b"m", &sig);

    let hmac = b.adopt(AdoptBy::Label(hmac_label)).await.unwrap();
    assert_eq!(hmac.spec, KeySpec::Hmac256);
    assert_eq!(hmac.permitted, KeyUsageSet::of(&[KeyUsage::GenerateMac, KeyUsage::VerifyMac]));

    assert_eq!(kind(b.adopt(AdoptBy::Label(format!("absent-{tag}"))).await), ErrorKind::KeyNotFound);
    assert_eq!(kind(b.adopt(AdoptBy::Label(twin_label)).await), ErrorKind::InvalidRequest);
    assert_eq!(kind(b.adopt(AdoptBy::Label(small_label)).await), ErrorKind::Unsupported);

    // Deleting an adopted key leaves the HSM object alone.
    b.destroy(adopted.r()).await.unwrap();
    assert_eq!(objects_labelled(&b, aes_label).await.len(), 1);
}

// ---- deadlines, queueing, faults -----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_call_slower_than_the_deadline_times_out_while_other_sessions_serve() {
    let mut config = test_config("hsm-slow");
    config.sessions = 2;
    config.deadline_ms = 300;
    let b = Arc::new(start(config).await);
    let k = generate(&b, KeySpec::Aes256).await;
    // A slow HSM call holds one session; it reports when it runs (the pool's counters lag by a moment).
    let slow = |b: Arc<Pkcs11Backend>, hold: Duration| {
        let (running_tx, running) = std::sync::mpsc::channel();
        let call = tokio::spawn(async move {
            b.with_session(Duration::from_secs(10), move |_| {
                let _ = running_tx.send(());
                std::thread::sleep(hold);
                Ok(())
            })
            .await
        });
        running.recv_timeout(Duration::from_secs(10)).expect("the slow call runs");
        call
    };
    // Long holds: sleeping costs no CPU, and the assertions below must happen while both are held.
    let first = slow(b.clone(), Duration::from_millis(4000));
    for _ in 0..20 {
        let started = Instant::now();
        b.aes_gcm_encrypt(k.r(), &[0; 12], b"", b"still flowing").await.expect("the other session serves");
        assert!(started.elapsed() < Duration::from_millis(300));
    }
    let second = slow(b.clone(), Duration::from_millis(3000));
    let started = Instant::now();
    let err = b.aes_gcm_encrypt(k.r(), &[0; 12], b"", b"x").await.unwrap_err();
    let waited = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::DependencyTimeout);
    assert!(
        waited >= Duration::from_millis(290) && waited < Duration::from_millis(800),
        "answered in time: {waited:?}"
    );
    // A call that itself takes longer than its deadline.
    let started = Instant::now();
    let slow_call = b
        .with_session(Duration::from_millis(100), |_| {
            std::thread::sleep(Duration::from_millis(50));
            Ok(())
        })
        .await;
    assert_eq!(kind(slow_call), ErrorKind::DependencyTimeout);
    assert!(started.elapsed() < Duration::from_millis(600));
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    b.aes_gcm_encrypt(k.r(), &[0; 12], b"", b"x").await.expect("serving again");
    let pool = b.status().await.pool;
    assert!(pool.timeouts >= 2, "{pool:?}");
    assert!(pool.abandoned >= 1, "queued calls whose caller gave up are skipped, not run: {pool:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_fails_fast() {
    let mut config = test_config("hsm-queue");
    config.sessions = 1;
    config.queue = 2;
    let b = Arc::new(start(config).await);
    let hold = |b: Arc<Pkcs11Backend>| {
        let (running_tx, running) = std::sync::mpsc::channel();
        let call = tokio::spawn(async move {
            b.with_session(Duration::from_secs(10), move |_| {
                let _ = running_tx.send(());
                std::thread::sleep(Duration::from_millis(700));
                Ok(())
            })
            .await
        });
        (call, running)
    };
    // The queue counts calls no worker has picked up yet, so fill it only once the session is busy.
    let (first, running) = hold(b.clone());
    running.recv_timeout(Duration::from_secs(10)).expect("the first call runs");
    let held = [first, hold(b.clone()).0, hold(b.clone()).0];
    wait_for(|| async { b.status().await.pool.waiting == 2 }, "two calls queued").await;
    let started = Instant::now();
    let err = b.random(16).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(50), "no waiting: {:?}", started.elapsed());
    assert_eq!(err.kind(), ErrorKind::DependencyTimeout);
    assert!(err.message().contains("queue"), "{}", err.message());
    assert!(err.retry_after().is_some());
    for h in held {
        h.await.unwrap().unwrap();
    }
    assert_eq!(b.status().await.pool.rejected_queue_full, 1);
    b.random(16).await.expect("serving again");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_error_evicts_and_replaces_the_session() {
    let mut config = test_config("hsm-evict");
    config.sessions = 1;
    let b = start(config).await;
    let k = generate(&b, KeySpec::Aes256).await;
    let broken = b
        .with_session(Duration::from_secs(5), |_| -> Result<(), P11Error> {
            Err(P11Error::Pkcs11(RvError::SessionHandleInvalid, Function::Encrypt))
        })
        .await;
    assert_eq!(kind(broken), ErrorKind::DependencyFailure);
    let pool = b.status().await.pool;
    assert_eq!((pool.sessions_evicted, pool.open), (1, 0));
    b.aes_gcm_encrypt(k.r(), &[0; 12], b"", b"x").await.expect("a fresh session serves the next call");
    let pool = b.status().await.pool;
    assert_eq!((pool.sessions_opened, pool.open), (2, 1));
    // An ambiguous CKR_GENERAL_ERROR also replaces the session and has the token probed; the token is fine.
    let general = b
        .with_session(Duration::from_secs(5), |_| -> Result<(), P11Error> {
            Err(P11Error::Pkcs11(RvError::GeneralError, Function::Sign))
        })
        .await;
    assert_eq!(kind(general), ErrorKind::DependencyFailure);
    assert_eq!(b.status().await.pool.sessions_evicted, 2);
    assert_eq!(b.health().await[0].status, HealthStatus::Active);
    b.aes_gcm_encrypt(k.r(), &[0; 12], b"", b"x").await.unwrap();
}

async fn wait_for<F, Fut>(mut check: F, what: &str)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < until, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- recovery from a failed module or token (own process, own token) ----------------------------------------------

/// A token of its own for the child process: directory, configuration, PIN file, initialised token.
fn private_token(dir: &Path, label: &str) -> (PathBuf, PathBuf) {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", tokens.display()),
    )
    .unwrap();
    let pin_file = dir.join("user.pin");
    std::fs::write(&pin_file, "246810\n").unwrap();
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &conf)
        .args(["--init-token", "--free", "--label", label, "--so-pin", "13579", "--pin", "246810"])
        .output()
        .expect("softhsm2-util (install softhsm2; ./scripts/test does)");
    assert!(out.status.success(), "softhsm2-util --init-token: {}", String::from_utf8_lossy(&out.stderr));
    (conf, pin_file)
}

/// A token lost and restored, a device error and a lost login, all recovered without restarting the process.
/// SOFTHSM2_CONF is read when the module initialises and cannot be set in-process (edition 2024 makes
/// `set_var` unsafe), so the test re-runs itself in a child process whose SOFTHSM2_CONF names a private
/// token; the child (this same test, with KMSGATE_TEST_P11_CHILD_DIR set) does the work.
#[test]
fn a_lost_token_is_recovered_without_a_restart() {
    if let Ok(dir) = std::env::var("KMSGATE_TEST_P11_CHILD_DIR") {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        rt.block_on(recovery(PathBuf::from(dir)));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (conf, pin_file) = private_token(dir.path(), "recovery");
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args(["--exact", "a_lost_token_is_recovered_without_a_restart", "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &conf)
        .env("KMSGATE_TEST_P11_TOKEN", "recovery")
        .env("KMSGATE_TEST_P11_PIN_FILE", &pin_file)
        .env("KMSGATE_TEST_P11_CHILD_DIR", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    assert!(stdout.contains("1 passed"), "the child test ran\n{stdout}");
}

async fn recovery(dir: PathBuf) {
    let mut config = test_config("hsm-recovery");
    config.sessions = 2;
    config.deadline_ms = 2_000;
    config.probe_interval_ms = 100;
    config.retry_max_ms = 300;
    let b = start(config).await;
    let k = generate(&b, KeySpec::Aes256).await;
    let sealed = b.aes_gcm_encrypt(k.r(), &[6; 12], b"", b"survives").await.unwrap();
    let status_of = || async { b.health().await[0].status };

    // 1. A device error (injected through a pooled session) re-initialises the module.
    let injected = b
        .with_session(Duration::from_secs(5), |_| -> Result<(), P11Error> {
            Err(P11Error::Pkcs11(RvError::DeviceError, Function::Encrypt))
        })
        .await;
    assert_eq!(kind(injected), ErrorKind::DependencyFailure);
    wait_for(|| async { b.status().await.pool.recoveries >= 1 }, "the module is re-initialised").await;
    wait_for(|| async { status_of().await == HealthStatus::Active }, "active after the device error").await;
    assert_eq!(b.aes_gcm_decrypt(k.r(), &[6; 12], b"", &sealed).await.unwrap().as_slice(), b"survives");

    // 2. A lost login (another session logged the application out) is re-established transparently.
    b.with_session(Duration::from_secs(5), |s| s.logout()).await.unwrap();
    assert_eq!(b.aes_gcm_decrypt(k.r(), &[6; 12], b"", &sealed).await.unwrap().as_slice(), b"survives");

    // 3. The token's directory disappears: health goes UNAVAILABLE, calls fail fast with a retryable kind.
    let tokens = dir.join("tokens");
    let parked = dir.join("tokens.parked");
    std::fs::rename(&tokens, &parked).unwrap();
    wait_for(|| async { status_of().await == HealthStatus::Unavailable }, "the lost token is noticed").await;
    let started = Instant::now();
    let err = b.aes_gcm_decrypt(k.r(), &[6; 12], b"", &sealed).await.unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::DependencyFailure | ErrorKind::DependencyTimeout), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let detail = b.health().await.pop().unwrap().detail;
    assert!(!detail.is_empty(), "health says why");

    // 4. It comes back: the backend re-initialises by itself, finds the token by label and serves again.
    std::fs::rename(&parked, &tokens).unwrap();
    wait_for(|| async { status_of().await == HealthStatus::Active }, "the restored token is used again").await;
    assert_eq!(b.aes_gcm_decrypt(k.r(), &[6; 12], b"", &sealed).await.unwrap().as_slice(), b"survives");
    let fresh = generate(&b, KeySpec::EcP256).await;
    b.sign_digest(fresh.r(), SigningAlgorithm::EcdsaSha256, &[1; 32]).await.unwrap();
    let status = b.status().await;
    assert!(status.pool.recoveries >= 2, "{:?}", status.pool);
    assert_eq!(status.health.status, HealthStatus::Active);
}

/// CKM_AES_CBC_PAD, CKM_AES_CBC and CKM_AES_ECB (PKCS#7 for ECB done by the backend) give exactly what the
/// software backend gives for the same key material, in both directions; bad padding is an invalid ciphertext.
#[tokio::test(flavor = "multi_thread")]
async fn aes_cbc_and_ecb_equal_the_software_backend_for_an_imported_key() {
    use kmsgate_core::{AesBlockMode, BlockPadding};
    let b = backend().await;
    let soft = kmsgate_hsm::SoftwareBackend::new("software", kmsgate_hsm::Kek::generate().unwrap());
    let material = random_bytes::<32>();
    let k = import(&b, KeySpec::Aes256, &material).await.expect("import");
    let (sid, sversion) = (KeyId::generate(), Uuid::new_v4());
    let shandle = soft.import(&sid, sversion, KeySpec::Aes256, KeyUsageSet::NONE, &material).await.unwrap();
    let s = KeyMaterialRef { key_id: &sid, version: sversion, spec: KeySpec::Aes256, handle: &shandle };
    let iv = random_bytes::<16>();
    for (mode, padding, iv, plaintext) in [
        (AesBlockMode::Cbc, BlockPadding::Pkcs7, &iv[..], &b"not a whole block"[..]),
        (AesBlockMode::Cbc, BlockPadding::Pkcs7, &iv[..], &[7u8; 32][..]),
        (AesBlockMode::Cbc, BlockPadding::NoPadding, &iv[..], &[9u8; 48][..]),
        (AesBlockMode::Ecb, BlockPadding::Pkcs7, &[][..], &b"twenty-one bytes here"[..]),
        (AesBlockMode::Ecb, BlockPadding::NoPadding, &[][..], &[5u8; 32][..]),
    ] {
        let hsm = b.aes_block_encrypt(k.r(), mode, padding, iv, plaintext).await.expect("HSM encrypt");
        let sw = soft.aes_block_encrypt(s, mode, padding, iv, plaintext).await.unwrap();
        assert_eq!(hsm, sw, "{mode:?} {padding:?}");
        let opened = b.aes_block_decrypt(k.r(), mode, padding, iv, &sw).await.expect("HSM decrypt");
        assert_eq!(opened.as_slice(), plaintext, "{mode:?} {padding:?}");
    }
    // A whole-block plaintext whose last byte is not valid padding.
    let raw = b.aes_block_encrypt(k.r(), AesBlockMode::Cbc, BlockPadding::NoPadding, &iv, &[0x41; 16]).await.unwrap();
    let e = b.aes_block_decrypt(k.r(), AesBlockMode::Cbc, BlockPadding::Pkcs7, &iv, &raw).await;
    assert_eq!(kind(e), ErrorKind::InvalidCiphertext);
    let raw = b.aes_block_encrypt(k.r(), AesBlockMode::Ecb, BlockPadding::NoPadding, &[], &[0x41; 16]).await.unwrap();
    let e = b.aes_block_decrypt(k.r(), AesBlockMode::Ecb, BlockPadding::Pkcs7, &[], &raw).await;
    assert_eq!(kind(e), ErrorKind::InvalidCiphertext);
    // Without padding, a partial block is refused before the HSM is asked.
    let e = b.aes_block_encrypt(k.r(), AesBlockMode::Ecb, BlockPadding::NoPadding, &[], b"short").await;
    assert_eq!(kind(e), ErrorKind::InvalidRequest);
}

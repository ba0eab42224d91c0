//! Behaviour of the software backend through the public API only: every algorithm against independent
//! computations (aws-lc-rs used directly, published test vectors), every rejection path, root key handling and
//! handle binding.

// Tests report failures by panicking; `expect` names what failed.
#![allow(clippy::expect_used)]

use std::sync::Arc;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{KeySize, OAEP_SHA256_MGF1SHA256, OaepPublicEncryptingKey, PublicEncryptingKey};
use aws_lc_rs::signature::{
    self, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _,
    RSA_PKCS1_2048_8192_SHA256, RSA_PSS_2048_8192_SHA256, RsaKeyPair, RsaParameters, RsaPssSaltLength,
    UnparsedPublicKey,
};
use kmsgate_core::{ErrorKind, KeyBackend, KeyId, KeyMaterialRef, KeySpec, KeyState, KeyUsageSet, SigningAlgorithm};
use kmsgate_hsm::{Kek, SoftwareBackend};
use uuid::Uuid;

#[derive(Debug)]
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

    /// The same handle presented under another identity.
    fn moved(&self, id: &str, version: Uuid, spec: KeySpec) -> TestKey {
        TestKey { id: key_id(id), version, spec, handle: self.handle.clone() }
    }
}

fn key_id(s: &str) -> KeyId {
    KeyId::parse(s).expect("valid key id")
}

fn backend() -> SoftwareBackend {
    SoftwareBackend::new("software", Kek::generate().expect("root key"))
}

async fn generate(b: &SoftwareBackend, spec: KeySpec) -> TestKey {
    let id = KeyId::generate();
    let version = Uuid::new_v4();
    let handle = b.generate(&id, version, spec, spec.default_usages()).await.expect("generate");
    TestKey { id, version, spec, handle }
}

async fn import(b: &SoftwareBackend, spec: KeySpec, material: &[u8]) -> kmsgate_core::Result<TestKey> {
    let id = KeyId::generate();
    let version = Uuid::new_v4();
    let handle = b.import(&id, version, spec, KeyUsageSet::NONE, material).await?;
    Ok(TestKey { id, version, spec, handle })
}

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

fn kind<T>(r: kmsgate_core::Result<T>) -> Option<ErrorKind> {
    r.err().map(|e| e.kind())
}

fn sha256(data: &[u8]) -> Vec<u8> {
    digest(&SHA256, data).as_ref().to_vec()
}

/// A DER SEQUENCE of two INTEGERs, short-form lengths (always the case for P-256).
fn is_der_ecdsa_sig(sig: &[u8]) -> bool {
    sig.len() >= 8
        && sig[0] == 0x30
        && usize::from(sig[1]) == sig.len() - 2
        && sig[2] == 0x02
        && sig.get(4 + usize::from(sig[3])) == Some(&0x02)
        && 4 + usize::from(sig[3]) + 2 + usize::from(sig[5 + usize::from(sig[3])]) == sig.len()
}

const OID_RSA_ENCRYPTION: &[u8] = &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---- identity and health ------------------------------------------------------------------------------------

#[tokio::test]
async fn name_kind_and_health() {
    let kek = Kek::generate().expect("root key");
    let fingerprint = kek.fingerprint_hex();
    let b = SoftwareBackend::new("soft-eu-1", kek);
    assert_eq!(b.name(), "soft-eu-1");
    assert_eq!(b.kind(), "software");
    assert_eq!(SoftwareBackend::DEFAULT_NAME, "software");
    assert_eq!(b.kek_fingerprint(), fingerprint);

    let health = b.health().await;
    assert_eq!(health.len(), 1);
    assert_eq!(health[0].id, "soft-eu-1");
    assert_eq!(health[0].model, format!("kmsgate software keystore {}", env!("CARGO_PKG_VERSION")));
    assert_eq!(health[0].status, kmsgate_core::HealthStatus::Active);
    assert_eq!(health[0].detail, "");
}

#[tokio::test]
async fn debug_output_has_no_secrets() {
    let b = backend();
    let shown = format!("{b:?}");
    assert!(shown.contains("SoftwareBackend"));
    assert!(shown.contains(&b.kek_fingerprint()));
    assert!(!shown.contains("secret"));
}

// ---- AES-256-GCM --------------------------------------------------------------------------------------------

#[tokio::test]
async fn aes_gcm_round_trips() {
    let b = backend();
    let k = generate(&b, KeySpec::Aes256).await;
    let iv = [7u8; 12];
    // 70 000 bytes takes the blocking-thread path.
    for len in [0usize, 1, 15, 16, 17, 1000, 70_000] {
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

#[tokio::test]
async fn aes_gcm_matches_the_gcm_spec_vectors_and_aws_lc() {
    let b = backend();
    // GCM specification (McGrew and Viega) test cases 13 and 14: AES-256, zero key, zero IV.
    let zero = import(&b, KeySpec::Aes256, &[0u8; 32]).await.expect("import zero key");
    let tc13 = b.aes_gcm_encrypt(zero.r(), &[0u8; 12], b"", b"").await.expect("encrypt");
    assert_eq!(tc13, unhex("530f8afbc74536b9a963b4f1c4cb738b"));
    let tc14 = b.aes_gcm_encrypt(zero.r(), &[0u8; 12], b"", &[0u8; 16]).await.expect("encrypt");
    assert_eq!(tc14, unhex("cea7403d4d606b6e074ec5d3baf39d18 d0d1c8a799996bf0265b98b5d48ab919"));

    // An imported key gives byte-for-byte what aws-lc-rs gives with the same key, IV and AAD.
    let raw: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(73).wrapping_add(5)).collect();
    let k = import(&b, KeySpec::Aes256, &raw).await.expect("import");
    let iv = unhex("cafebabefacedbaddecaf888");
    let aad = b"feedfacedeadbeef";
    let plaintext = b"the quick brown fox jumps over the lazy dog";
    let ours = b.aes_gcm_encrypt(k.r(), &iv, aad, plaintext).await.expect("encrypt");
    let direct = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw).expect("key"));
    let mut theirs = plaintext.to_vec();
    direct
        .seal_in_place_append_tag(Nonce::try_assume_unique_for_key(&iv).expect("iv"), Aad::from(aad), &mut theirs)
        .expect("seal");
    assert_eq!(ours, theirs);
}

#[tokio::test]
async fn aes_gcm_rejects_wrong_key_aad_tag_iv_and_short_input() {
    let b = backend();
    let k = generate(&b, KeySpec::Aes256).await;
    let other = generate(&b, KeySpec::Aes256).await;
    let iv = [1u8; 12];
    let sealed = b.aes_gcm_encrypt(k.r(), &iv, b"aad", b"secret message").await.expect("encrypt");

    let invalid = Some(ErrorKind::InvalidCiphertext);
    assert_eq!(kind(b.aes_gcm_decrypt(other.r(), &iv, b"aad", &sealed).await), invalid, "wrong key");
    assert_eq!(kind(b.aes_gcm_decrypt(k.r(), &iv, b"aaD", &sealed).await), invalid, "wrong AAD");
    assert_eq!(kind(b.aes_gcm_decrypt(k.r(), &iv, b"", &sealed).await), invalid, "missing AAD");
    let mut bad_tag = sealed.clone();
    *bad_tag.last_mut().expect("tag") ^= 1;
    assert_eq!(kind(b.aes_gcm_decrypt(k.r(), &iv, b"aad", &bad_tag).await), invalid, "wrong tag");
    let mut bad_ct = sealed.clone();
    bad_ct[0] ^= 0x40;
    assert_eq!(kind(b.aes_gcm_decrypt(k.r(), &iv, b"aad", &bad_ct).await), invalid, "altered ciphertext");
    assert_eq!(kind(b.aes_gcm_decrypt(k.r(), &[2u8; 12], b"aad", &sealed).await), invalid, "wrong IV");
    assert_eq!(kind(b.aes_gcm_decrypt(k.r(), &iv, b"aad", &sealed[..15]).await), invalid, "shorter than a tag");
    assert_eq!(kind(b.aes_gcm_decrypt(k.r(), &iv, b"aad", &sealed[1..]).await), invalid, "truncated");
    let e = b.aes_gcm_decrypt(k.r(), &iv, b"aaD", &sealed).await.expect_err("error");
    assert_eq!(e.message(), "the ciphertext, IV, tag or additional data is invalid");

    // A malformed IV is a bad request, not a forged ciphertext.
    assert_eq!(kind(b.aes_gcm_encrypt(k.r(), &[0u8; 16], b"", b"x").await), Some(ErrorKind::InvalidRequest));
    assert_eq!(kind(b.aes_gcm_encrypt(k.r(), &[], b"", b"x").await), Some(ErrorKind::InvalidRequest));
    assert_eq!(kind(b.aes_gcm_decrypt(k.r(), &[0u8; 11], b"aad", &sealed).await), Some(ErrorKind::InvalidRequest));

    // The untouched input still decrypts.
    let opened = b.aes_gcm_decrypt(k.r(), &iv, b"aad", &sealed).await.expect("decrypt");
    assert_eq!(opened.as_slice(), b"secret message");
}

// ---- key usage ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn operations_on_the_wrong_spec_are_invalid_key_usage() {
    let b = backend();
    let aes = generate(&b, KeySpec::Aes256).await;
    let hmac = generate(&b, KeySpec::Hmac256).await;
    let ec = generate(&b, KeySpec::EcP256).await;
    let usage = Some(ErrorKind::InvalidKeyUsage);
    let digest = sha256(b"m");

    assert_eq!(kind(b.aes_gcm_encrypt(ec.r(), &[0; 12], b"", b"x").await), usage);
    assert_eq!(kind(b.aes_gcm_decrypt(hmac.r(), &[0; 12], b"", &[0; 32]).await), usage);
    assert_eq!(kind(b.hmac_sha256(aes.r(), b"x").await), usage);
    assert_eq!(kind(b.rsa_oaep_encrypt(aes.r(), b"x").await), usage);
    assert_eq!(kind(b.rsa_oaep_decrypt(ec.r(), &[0; 256]).await), usage);
    assert_eq!(kind(b.sign_digest(aes.r(), SigningAlgorithm::EcdsaSha256, &digest).await), usage);
    assert_eq!(kind(b.sign_digest(ec.r(), SigningAlgorithm::RsaPssSha256, &digest).await), usage);
    assert_eq!(kind(b.verify_digest(ec.r(), SigningAlgorithm::RsaPkcs1Sha256, &digest, &[0; 64]).await), usage);
    assert_eq!(kind(b.public_key_der(aes.r()).await), usage);
    assert_eq!(kind(b.public_key_der(hmac.r()).await), usage);
    let e = b.hmac_sha256(aes.r(), b"x").await.expect_err("error");
    assert_eq!(e.message(), "a AES_256 key cannot be used for HMAC-SHA256");
}

// ---- RSA ----------------------------------------------------------------------------------------------------

static PSS_SALT_32: RsaParameters = RSA_PSS_2048_8192_SHA256.with_pss_salt_length(RsaPssSaltLength::Custom(32));
static PSS_SALT_20: RsaParameters = RSA_PSS_2048_8192_SHA256.with_pss_salt_length(RsaPssSaltLength::Custom(20));

async fn check_rsa_signatures(b: &SoftwareBackend, k: &TestKey, modulus_bytes: usize) {
    let message = b"pay 100 to alice";
    let digest = sha256(message);
    let spki = b.public_key_der(k.r()).await.expect("public key");

    // PKCS#1 v1.5: deterministic, verifies here and, over the message, with aws-lc-rs from the SPKI alone.
    let pkcs1 = b.sign_digest(k.r(), SigningAlgorithm::RsaPkcs1Sha256, &digest).await.expect("sign");
    assert_eq!(pkcs1.len(), modulus_bytes);
    let again = b.sign_digest(k.r(), SigningAlgorithm::RsaPkcs1Sha256, &digest).await.expect("sign");
    assert_eq!(pkcs1, again);
    assert!(b.verify_digest(k.r(), SigningAlgorithm::RsaPkcs1Sha256, &digest, &pkcs1).await.expect("verify"));
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &spki).verify(message, &pkcs1).expect("independent verify");

    // PSS: randomized (a salt is used), salt of exactly 32 bytes, verifiable from the SPKI.
    let pss = b.sign_digest(k.r(), SigningAlgorithm::RsaPssSha256, &digest).await.expect("sign");
    let pss2 = b.sign_digest(k.r(), SigningAlgorithm::RsaPssSha256, &digest).await.expect("sign");
    assert_eq!(pss.len(), modulus_bytes);
    assert_ne!(pss, pss2);
    assert!(b.verify_digest(k.r(), SigningAlgorithm::RsaPssSha256, &digest, &pss).await.expect("verify"));
    assert!(b.verify_digest(k.r(), SigningAlgorithm::RsaPssSha256, &digest, &pss2).await.expect("verify"));
    UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, &spki).verify(message, &pss).expect("independent verify");
    UnparsedPublicKey::new(&PSS_SALT_32, &spki).verify(message, &pss).expect("salt is 32 bytes");
    assert!(UnparsedPublicKey::new(&PSS_SALT_20, &spki).verify(message, &pss).is_err());

    // Tampering gives Ok(false), never an error.
    let mut other_digest = digest.clone();
    other_digest[31] ^= 1;
    for (alg, sig) in [(SigningAlgorithm::RsaPkcs1Sha256, &pkcs1), (SigningAlgorithm::RsaPssSha256, &pss)] {
        assert!(!b.verify_digest(k.r(), alg, &other_digest, sig).await.expect("verify"));
        let mut bad = sig.clone();
        bad[modulus_bytes / 2] ^= 0x10;
        assert!(!b.verify_digest(k.r(), alg, &digest, &bad).await.expect("verify"));
        assert!(!b.verify_digest(k.r(), alg, &digest, &sig[1..]).await.expect("verify"));
        assert!(!b.verify_digest(k.r(), alg, &digest, b"").await.expect("verify"));
    }
    // A signature of one scheme does not pass as the other.
    assert!(!b.verify_digest(k.r(), SigningAlgorithm::RsaPssSha256, &digest, &pkcs1).await.expect("verify"));
    assert!(!b.verify_digest(k.r(), SigningAlgorithm::RsaPkcs1Sha256, &digest, &pss).await.expect("verify"));

    // The trait passes 32-byte digests; anything else is a bad request.
    let bad_len = b.sign_digest(k.r(), SigningAlgorithm::RsaPkcs1Sha256, &digest[..31]).await;
    assert_eq!(kind(bad_len), Some(ErrorKind::InvalidRequest));
    let bad_len = b.verify_digest(k.r(), SigningAlgorithm::RsaPkcs1Sha256, message, &pkcs1).await;
    assert_eq!(kind(bad_len), Some(ErrorKind::InvalidRequest));
}

async fn check_rsa_oaep(b: &SoftwareBackend, k: &TestKey, modulus_bytes: usize) {
    let max = modulus_bytes - 2 * 32 - 2;
    for len in [0, 1, 32, max] {
        let plaintext = vec![0xa5u8; len];
        let ct = b.rsa_oaep_encrypt(k.r(), &plaintext).await.expect("encrypt");
        assert_eq!(ct.len(), modulus_bytes);
        let back = b.rsa_oaep_decrypt(k.r(), &ct).await.expect("decrypt");
        assert_eq!(back.as_slice(), plaintext.as_slice());
    }
    assert_eq!(kind(b.rsa_oaep_encrypt(k.r(), &vec![0u8; max + 1]).await), Some(ErrorKind::InvalidRequest));

    let c1 = b.rsa_oaep_encrypt(k.r(), b"data key").await.expect("encrypt");
    let c2 = b.rsa_oaep_encrypt(k.r(), b"data key").await.expect("encrypt");
    assert_ne!(c1, c2, "OAEP is randomized");

    // Encrypted independently with aws-lc-rs from the exported SPKI (OAEP SHA-256, MGF1 SHA-256, no label).
    let spki = b.public_key_der(k.r()).await.expect("public key");
    let public = OaepPublicEncryptingKey::new(PublicEncryptingKey::from_der(&spki).expect("spki")).expect("oaep");
    assert_eq!(public.key_size_bits(), modulus_bytes * 8);
    let mut out = vec![0u8; public.ciphertext_size()];
    let independent = public.encrypt(&OAEP_SHA256_MGF1SHA256, b"from outside", &mut out, None).expect("encrypt");
    let back = b.rsa_oaep_decrypt(k.r(), independent).await.expect("decrypt");
    assert_eq!(back.as_slice(), b"from outside");

    let invalid = Some(ErrorKind::InvalidCiphertext);
    for i in [0, modulus_bytes / 2, modulus_bytes - 1] {
        let mut bad = c1.clone();
        bad[i] ^= 0x01;
        assert_eq!(kind(b.rsa_oaep_decrypt(k.r(), &bad).await), invalid, "flipped byte {i}");
    }
    assert_eq!(kind(b.rsa_oaep_decrypt(k.r(), &c1[1..]).await), invalid, "short");
    assert_eq!(kind(b.rsa_oaep_decrypt(k.r(), &[c1.as_slice(), &[0]].concat()).await), invalid, "long");
    assert_eq!(kind(b.rsa_oaep_decrypt(k.r(), b"").await), invalid, "empty");
}

#[tokio::test]
async fn rsa_2048_signs_verifies_and_encrypts() {
    let b = backend();
    let k = generate(&b, KeySpec::Rsa2048).await;
    check_rsa_signatures(&b, &k, 256).await;
    check_rsa_oaep(&b, &k, 256).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_3072_signs_verifies_and_encrypts() {
    let b = backend();
    let k = generate(&b, KeySpec::Rsa3072).await;
    check_rsa_signatures(&b, &k, 384).await;
    check_rsa_oaep(&b, &k, 384).await;
}

#[tokio::test]
async fn rsa_public_key_is_spki() {
    let b = backend();
    let k = generate(&b, KeySpec::Rsa2048).await;
    let spki = b.public_key_der(k.r()).await.expect("public key");
    assert_eq!(spki[0], 0x30);
    assert!(contains(&spki, OID_RSA_ENCRYPTION));
    assert_eq!(PublicEncryptingKey::from_der(&spki).expect("parses").key_size_bits(), 2048);
    // Every version has its own key pair.
    let k2 = generate(&b, KeySpec::Rsa2048).await;
    assert_ne!(spki, b.public_key_der(k2.r()).await.expect("public key"));
}

// ---- ECDSA --------------------------------------------------------------------------------------------------

#[tokio::test]
async fn ecdsa_p256_signs_der_and_verifies() {
    let b = backend();
    let k = generate(&b, KeySpec::EcP256).await;
    let message = b"attest: build 42";
    let digest = sha256(message);
    let spki = b.public_key_der(k.r()).await.expect("public key");
    assert_eq!(spki[0], 0x30);
    assert!(contains(&spki, OID_EC_PUBLIC_KEY));
    assert!(contains(&spki, OID_P256));

    let sig = b.sign_digest(k.r(), SigningAlgorithm::EcdsaSha256, &digest).await.expect("sign");
    assert!(is_der_ecdsa_sig(&sig), "DER Ecdsa-Sig-Value: {sig:02x?}");
    assert!(b.verify_digest(k.r(), SigningAlgorithm::EcdsaSha256, &digest, &sig).await.expect("verify"));
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &spki).verify(message, &sig).expect("independent verify");

    let mut other_digest = digest.clone();
    other_digest[0] ^= 1;
    assert!(!b.verify_digest(k.r(), SigningAlgorithm::EcdsaSha256, &other_digest, &sig).await.expect("verify"));
    let mut bad = sig.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(!b.verify_digest(k.r(), SigningAlgorithm::EcdsaSha256, &digest, &bad).await.expect("verify"));
    assert!(!b.verify_digest(k.r(), SigningAlgorithm::EcdsaSha256, &digest, &[0u8; 64]).await.expect("verify"));
    assert!(!b.verify_digest(k.r(), SigningAlgorithm::EcdsaSha256, &digest, b"").await.expect("verify"));
    let other_key = generate(&b, KeySpec::EcP256).await;
    assert!(!b.verify_digest(other_key.r(), SigningAlgorithm::EcdsaSha256, &digest, &sig).await.expect("verify"));
}

// ---- HMAC and random ----------------------------------------------------------------------------------------

#[tokio::test]
async fn hmac_matches_rfc_4231() {
    // HMAC pads a key shorter than the 64-byte block with zeros, so the RFC's short keys zero-padded to the
    // 32 bytes an HMAC_256 import takes are the same keys: these are the RFC's own vectors, unchanged.
    let cases: [(Vec<u8>, Vec<u8>, &str); 4] = [
        (vec![0x0b; 20], b"Hi There".to_vec(), "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
        (
            b"Jefe".to_vec(),
            b"what do ya want for nothing?".to_vec(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        ),
        (vec![0xaa; 20], vec![0xdd; 50], "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
        ((1u8..=25).collect(), vec![0xcd; 50], "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"),
    ];
    let b = backend();
    for (i, (key, data, expected)) in cases.iter().enumerate() {
        let mut padded = key.clone();
        padded.resize(32, 0);
        let k = import(&b, KeySpec::Hmac256, &padded).await.expect("import");
        let mac = b.hmac_sha256(k.r(), data).await.expect("hmac");
        assert_eq!(mac, unhex(expected), "RFC 4231 test case {}", i + 1);
    }
}

#[tokio::test]
async fn hmac_of_generated_keys() {
    let b = backend();
    let k = generate(&b, KeySpec::Hmac256).await;
    let other = generate(&b, KeySpec::Hmac256).await;
    let m1 = b.hmac_sha256(k.r(), b"message").await.expect("hmac");
    assert_eq!(m1.len(), 32);
    assert_eq!(m1, b.hmac_sha256(k.r(), b"message").await.expect("hmac"));
    assert_ne!(m1, b.hmac_sha256(k.r(), b"messagf").await.expect("hmac"));
    assert_ne!(m1, b.hmac_sha256(other.r(), b"message").await.expect("hmac"));
    // Large input (blocking-thread path) gives the same result as inline for the same data.
    let big = vec![0x42u8; 100_000];
    let big_mac = b.hmac_sha256(k.r(), &big).await.expect("hmac");
    assert_eq!(big_mac.len(), 32);
    assert_eq!(big_mac, b.hmac_sha256(k.r(), &big).await.expect("hmac"));
}

#[tokio::test]
async fn random_bytes() {
    let b = backend();
    assert_eq!(b.random(0).await.expect("random"), Vec::<u8>::new());
    let a = b.random(32).await.expect("random");
    let c = b.random(32).await.expect("random");
    assert_eq!(a.len(), 32);
    assert_ne!(a, c);
    assert_ne!(a, vec![0u8; 32]);
    assert_eq!(b.random(1024).await.expect("random").len(), 1024);
    assert_eq!(kind(b.random(1 << 20).await), Some(ErrorKind::InvalidRequest));
}

// ---- import -------------------------------------------------------------------------------------------------

#[tokio::test]
async fn import_raw_symmetric_material() {
    let b = backend();
    let raw = [0x11u8; 32];
    let k = import(&b, KeySpec::Aes256, &raw).await.expect("import");
    assert_eq!(k.handle.len(), 69);
    assert!(!contains(&k.handle, &raw[..8]), "material must not be stored in clear");
    let sealed = b.aes_gcm_encrypt(k.r(), &[0u8; 12], b"", b"hello").await.expect("encrypt");
    assert_eq!(b.aes_gcm_decrypt(k.r(), &[0u8; 12], b"", &sealed).await.expect("decrypt").as_slice(), b"hello");

    for len in [0usize, 16, 31, 33, 64] {
        let e = import(&b, KeySpec::Aes256, &vec![1u8; len]).await.expect_err("rejected");
        assert_eq!(e.kind(), ErrorKind::InvalidRequest);
        assert_eq!(e.message(), format!("AES_256 key material must be 32 raw bytes, found {len}"));
        assert_eq!(kind(import(&b, KeySpec::Hmac256, &vec![1u8; len]).await), Some(ErrorKind::InvalidRequest));
    }
}

#[tokio::test]
async fn import_pkcs8_rsa_and_ec() {
    let b = backend();

    // RSA-2048 made outside the backend: the backend's signatures verify under the original public key, and
    // what is encrypted to the original public key decrypts.
    let pair = RsaKeyPair::generate(KeySize::Rsa2048).expect("rsa");
    let pkcs8 = pair.as_der().expect("pkcs8");
    let k = import(&b, KeySpec::Rsa2048, pkcs8.as_ref()).await.expect("import");
    assert!(!contains(&k.handle, &pkcs8.as_ref()[40..72]), "material must not be stored in clear");
    // Header (21) + PKCS#8 v1 + tag (16): the re-encoding of an aws-lc key is the same size as the original.
    assert_eq!(k.handle.len(), 21 + pkcs8.as_ref().len() + 16);
    let original_spki = pair.public_key().as_der().expect("spki");
    assert_eq!(b.public_key_der(k.r()).await.expect("public key"), original_spki.as_ref());
    let digest = sha256(b"imported");
    let sig = b.sign_digest(k.r(), SigningAlgorithm::RsaPssSha256, &digest).await.expect("sign");
    UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, original_spki.as_ref())
        .verify(b"imported", &sig)
        .expect("verify");
    let public = OaepPublicEncryptingKey::new(PublicEncryptingKey::from_der(original_spki.as_ref()).expect("spki"))
        .expect("oaep");
    let mut out = vec![0u8; public.ciphertext_size()];
    let ct = public.encrypt(&OAEP_SHA256_MGF1SHA256, b"wrapped", &mut out, None).expect("encrypt");
    assert_eq!(b.rsa_oaep_decrypt(k.r(), ct).await.expect("decrypt").as_slice(), b"wrapped");

    // The wrong size or family for the spec, or garbage, is a bad request.
    let e = import(&b, KeySpec::Rsa3072, pkcs8.as_ref()).await.expect_err("rejected");
    assert_eq!(
        (e.kind(), e.message()),
        (ErrorKind::InvalidRequest, "the key material is a 2048-bit RSA key, not RSA_3072")
    );
    assert_eq!(kind(import(&b, KeySpec::EcP256, pkcs8.as_ref()).await), Some(ErrorKind::InvalidRequest));
    assert_eq!(kind(import(&b, KeySpec::Rsa2048, b"not a key").await), Some(ErrorKind::InvalidRequest));
    assert_eq!(kind(import(&b, KeySpec::Rsa2048, &pkcs8.as_ref()[..100]).await), Some(ErrorKind::InvalidRequest));

    // P-256.
    let ec = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).expect("ec");
    let ec_pkcs8 = ec.to_pkcs8v1().expect("pkcs8");
    let k = import(&b, KeySpec::EcP256, ec_pkcs8.as_ref()).await.expect("import");
    assert_eq!(k.handle.len(), 21 + ec_pkcs8.as_ref().len() + 16);
    let ec_spki = ec.public_key().as_der().expect("spki");
    assert_eq!(b.public_key_der(k.r()).await.expect("public key"), ec_spki.as_ref());
    let sig = b.sign_digest(k.r(), SigningAlgorithm::EcdsaSha256, &digest).await.expect("sign");
    signature::UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, ec_spki.as_ref())
        .verify(b"imported", &sig)
        .expect("verify");
    assert_eq!(kind(import(&b, KeySpec::Rsa2048, ec_pkcs8.as_ref()).await), Some(ErrorKind::InvalidRequest));
    let e = import(&b, KeySpec::EcP256, &[0x30, 0x03, 0x02, 0x01, 0x00]).await.expect_err("rejected");
    assert_eq!(e.message(), "the key material is not a valid EC_P256 key");
}

// ---- root key and handles -----------------------------------------------------------------------------------

#[tokio::test]
async fn a_handle_under_another_root_key_is_a_clear_error() {
    let b1 = backend();
    let b2 = backend();
    for spec in [KeySpec::Aes256, KeySpec::EcP256, KeySpec::Rsa2048] {
        let k = generate(&b1, spec).await;
        let e = match spec {
            KeySpec::Aes256 => b2.aes_gcm_encrypt(k.r(), &[0; 12], b"", b"x").await.err(),
            _ => b2.public_key_der(k.r()).await.err(),
        }
        .expect("rejected");
        assert_eq!(e.kind(), ErrorKind::DependencyFailure, "{spec}");
        assert_eq!(e.message(), "the root key does not match the one this key was wrapped under");
        // Operators get both fingerprints in the log-only source.
        let source = e.internal_source().map(|s| s.to_string()).unwrap_or_default();
        assert!(source.contains(&b2.kek_fingerprint()), "{source}");
    }
}

#[tokio::test]
async fn a_handle_is_bound_to_its_key_id_version_and_spec() {
    let b = backend();
    let k = generate(&b, KeySpec::Aes256).await;
    // Use it legitimately first, so a prepared copy is cached: the moved handle must still be refused.
    b.aes_gcm_encrypt(k.r(), &[0; 12], b"", b"x").await.expect("encrypt");

    let other_id = k.moved("another-key", k.version, KeySpec::Aes256);
    let other_version = k.moved(k.id.as_str(), Uuid::new_v4(), KeySpec::Aes256);
    for moved in [&other_id, &other_version] {
        let e = b.aes_gcm_encrypt(moved.r(), &[0; 12], b"", b"x").await.expect_err("rejected");
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert!(e.message().starts_with("the key handle does not authenticate for this key version"), "{e}");
    }
    // Relabelled as an HMAC key: the spec is bound too.
    let as_hmac = k.moved(k.id.as_str(), k.version, KeySpec::Hmac256);
    assert_eq!(kind(b.hmac_sha256(as_hmac.r(), b"x").await), Some(ErrorKind::Internal));

    // Same for an asymmetric key.
    let ec = generate(&b, KeySpec::EcP256).await;
    b.public_key_der(ec.r()).await.expect("public key");
    let moved = ec.moved("elsewhere", ec.version, KeySpec::EcP256);
    assert_eq!(kind(b.public_key_der(moved.r()).await), Some(ErrorKind::Internal));
    // The rightful owner is unaffected.
    b.aes_gcm_encrypt(k.r(), &[0; 12], b"", b"x").await.expect("encrypt");
}

#[tokio::test]
async fn altered_truncated_and_empty_handles_are_refused() {
    let b = backend();
    let k = generate(&b, KeySpec::Hmac256).await;
    for i in [0usize, 1, 12, 30, k.handle.len() - 1] {
        let mut altered = k.moved(k.id.as_str(), k.version, k.spec);
        altered.handle[i] ^= 0x01;
        let expected = if (1..9).contains(&i) { ErrorKind::DependencyFailure } else { ErrorKind::Internal };
        assert_eq!(kind(b.hmac_sha256(altered.r(), b"x").await), Some(expected), "byte {i}");
    }
    let mut truncated = k.moved(k.id.as_str(), k.version, k.spec);
    truncated.handle.truncate(30);
    let e = b.hmac_sha256(truncated.r(), b"x").await.expect_err("rejected");
    assert_eq!((e.kind(), e.message()), (ErrorKind::Internal, "the key handle is malformed or of an unknown format"));

    let mut pending = k.moved(k.id.as_str(), k.version, k.spec);
    pending.handle.clear();
    assert_eq!(kind(b.hmac_sha256(pending.r(), b"x").await), Some(ErrorKind::InvalidKeyState(KeyState::PendingImport)));
}

#[tokio::test]
async fn kek_file_is_created_0600_and_loads() {
    use std::os::unix::fs::PermissionsExt as _;

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kek");
    let created = Kek::generate_file(&path).expect("generate");
    let mode = std::fs::metadata(&path).expect("metadata").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(&path).expect("read");
    assert!(text.ends_with('\n'));
    assert_eq!(text.trim_end().len(), 44, "base64 of 32 bytes");

    // The loaded key is the same key: what one backend wraps, the other opens.
    let loaded = Kek::from_file(&path).expect("load");
    assert_eq!(loaded.fingerprint(), created.fingerprint());
    let b1 = SoftwareBackend::new("software", created);
    let b2 = SoftwareBackend::new("software", loaded);
    let k = generate(&b1, KeySpec::Aes256).await;
    let sealed = b1.aes_gcm_encrypt(k.r(), &[3; 12], b"a", b"persisted").await.expect("encrypt");
    assert_eq!(b2.aes_gcm_decrypt(k.r(), &[3; 12], b"a", &sealed).await.expect("decrypt").as_slice(), b"persisted");

    // Never overwritten.
    let e = Kek::generate_file(&path).expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    assert!(e.message().contains("refusing to overwrite"), "{e}");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), text);
}

#[test]
fn kek_file_errors_are_clear() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope");
    let e = Kek::from_file(&missing).expect_err("missing");
    assert_eq!(e.kind(), ErrorKind::InvalidRequest);
    assert_eq!(e.message(), format!("the root key file {} does not exist", missing.display()));

    let short = dir.path().join("short");
    std::fs::write(&short, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==\n").expect("write");
    let e = Kek::from_file(&short).expect_err("short");
    assert_eq!(
        e.message(),
        format!("the root key file {}: the root key must decode to exactly 32 bytes, found 31", short.display())
    );

    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, "this is not base64 at all\n").expect("write");
    let e = Kek::from_file(&garbage).expect_err("garbage");
    assert!(e.message().ends_with("the root key is not valid base64 (expected base64 of 32 bytes)"), "{e}");

    let binary = dir.path().join("binary");
    std::fs::write(&binary, [0xffu8, 0xfe, 0x00]).expect("write");
    assert!(Kek::from_file(&binary).expect_err("binary").message().contains("is not text"));

    // Trailing whitespace of any kind is fine.
    let spaced = dir.path().join("spaced");
    std::fs::write(&spaced, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8= \r\n\n").expect("write");
    let kek = Kek::from_file(&spaced).expect("load");
    assert_eq!(kek.fingerprint(), Kek::from_bytes(&(0u8..32).collect::<Vec<_>>()).expect("kek").fingerprint());
}

// ---- cache and concurrency ----------------------------------------------------------------------------------

#[tokio::test]
async fn prepared_keys_are_cached_and_destroy_evicts() {
    let b = backend();
    let k = generate(&b, KeySpec::Aes256).await;
    let r = generate(&b, KeySpec::Rsa2048).await;
    assert_eq!(b.cached_keys(), 0, "generation does not prepare");
    b.aes_gcm_encrypt(k.r(), &[0; 12], b"", b"x").await.expect("encrypt");
    b.aes_gcm_encrypt(k.r(), &[1; 12], b"", b"y").await.expect("encrypt");
    assert_eq!(b.cached_keys(), 1);
    b.public_key_der(r.r()).await.expect("public key");
    assert_eq!(b.cached_keys(), 2);

    b.destroy(k.r()).await.expect("destroy");
    assert_eq!(b.cached_keys(), 1);
    b.destroy(r.r()).await.expect("destroy");
    assert_eq!(b.cached_keys(), 0);
    // Destroying twice is fine.
    b.destroy(r.r()).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_one_prepared_key() {
    let b = Arc::new(backend());
    let aes = Arc::new(generate(&b, KeySpec::Aes256).await);
    let rsa = Arc::new(generate(&b, KeySpec::Rsa2048).await);
    let mut tasks = Vec::new();
    for i in 0..32u8 {
        let (b, aes, rsa) = (b.clone(), aes.clone(), rsa.clone());
        tasks.push(tokio::spawn(async move {
            let sealed = b.aes_gcm_encrypt(aes.r(), &[i; 12], &[i], &[i; 40]).await.expect("encrypt");
            let opened = b.aes_gcm_decrypt(aes.r(), &[i; 12], &[i], &sealed).await.expect("decrypt");
            assert_eq!(opened.as_slice(), [i; 40].as_slice());
            let digest = sha256(&[i]);
            let sig = b.sign_digest(rsa.r(), SigningAlgorithm::RsaPkcs1Sha256, &digest).await.expect("sign");
            assert!(b.verify_digest(rsa.r(), SigningAlgorithm::RsaPkcs1Sha256, &digest, &sig).await.expect("verify"));
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(b.cached_keys(), 2);
}

/// NIST SP 800-38A F.2.5 (CBC-AES256) and F.1.5 (ECB-AES256), then the padded modes and their failures.
#[tokio::test]
async fn aes_cbc_and_ecb_match_the_nist_vectors_and_pad_with_pkcs7() {
    use kmsgate_core::{AesBlockMode, BlockPadding};
    let b = backend();
    let k = import(&b, KeySpec::Aes256, &unhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"))
        .await
        .unwrap();
    let iv = unhex("000102030405060708090a0b0c0d0e0f");
    let pt = unhex(
        "6bc1bee22e409f96e93d7e117393172a ae2d8a571e03ac9c9eb76fac45af8e51
         30c81c46a35ce411e5fbc1191a0a52ef f69f2445df4f9b17ad2b417be66c3710",
    );
    let cbc = unhex(
        "f58c4c04d6e5f1ba779eabfb5f7bfbd6 9cfc4e967edb808d679f777bc6702c7d
         39f23369a9d9bacfa530e26304231461 b2eb05e2c39be9fcda6c19078c6a9d1b",
    );
    let ecb = unhex(
        "f3eed1bdb5d2a03c064b5a7e3db181f8 591ccb10d410ed26dc5ba74a31362870
         b6ed21b99ca6f4f9f153e7b1beafed1d 23304b7a39f9f3ff067d8d8f9e24ecc7",
    );
    let (cbc_mode, ecb_mode, none, pkcs7) =
        (AesBlockMode::Cbc, AesBlockMode::Ecb, BlockPadding::NoPadding, BlockPadding::Pkcs7);
    assert_eq!(b.aes_block_encrypt(k.r(), cbc_mode, none, &iv, &pt).await.unwrap(), cbc);
    assert_eq!(b.aes_block_decrypt(k.r(), cbc_mode, none, &iv, &cbc).await.unwrap().as_slice(), pt);
    assert_eq!(b.aes_block_encrypt(k.r(), ecb_mode, none, &[], &pt).await.unwrap(), ecb);
    assert_eq!(b.aes_block_decrypt(k.r(), ecb_mode, none, &[], &ecb).await.unwrap().as_slice(), pt);

    // PKCS#7 adds a whole block to whole blocks; the first blocks are unchanged.
    let padded = b.aes_block_encrypt(k.r(), cbc_mode, pkcs7, &iv, &pt).await.unwrap();
    assert_eq!((padded.len(), &padded[..64]), (80, &cbc[..]));
    assert_eq!(b.aes_block_decrypt(k.r(), cbc_mode, pkcs7, &iv, &padded).await.unwrap().as_slice(), pt);
    let padded = b.aes_block_encrypt(k.r(), ecb_mode, pkcs7, &[], &pt[..20]).await.unwrap();
    assert_eq!((padded.len(), &padded[..16]), (32, &ecb[..16]));
    assert_eq!(b.aes_block_decrypt(k.r(), ecb_mode, pkcs7, &[], &padded).await.unwrap().as_slice(), &pt[..20]);

    // Bad padding, partial blocks and a wrong IV length.
    assert_eq!(kind(b.aes_block_decrypt(k.r(), cbc_mode, pkcs7, &iv, &cbc).await), Some(ErrorKind::InvalidCiphertext));
    assert_eq!(
        kind(b.aes_block_decrypt(k.r(), ecb_mode, none, &[], &ecb[..20]).await),
        Some(ErrorKind::InvalidCiphertext)
    );
    assert_eq!(kind(b.aes_block_encrypt(k.r(), ecb_mode, none, &[], &pt[..20]).await), Some(ErrorKind::InvalidRequest));
    assert_eq!(
        kind(b.aes_block_encrypt(k.r(), cbc_mode, pkcs7, &iv[..12], &pt).await),
        Some(ErrorKind::InvalidRequest)
    );
    let hmac = generate(&b, KeySpec::Hmac256).await;
    assert_eq!(kind(b.aes_block_encrypt(hmac.r(), ecb_mode, pkcs7, &[], &pt).await), Some(ErrorKind::InvalidKeyUsage));
}

//! The dispatcher's behaviour over a real store and a real backend. The suite is written once and run per
//! backend (`backend_suite!`), so every backend meets the same assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::signature::{self, UnparsedPublicKey};
use common::{Env, SlowBackend};
use kmsgate_core::{
    AliasName, Caller, CreateKeyRequest, DecryptRequest, EncryptReply, EncryptRequest, EncryptionAlgorithm, ErrorKind,
    KeyRef, KeySpec, KeyState, KeyUsage, KeyUsageSet, Outcome, PageRequest, SignInput, SignRequest, SigningAlgorithm,
    TenantId, Timestamp,
};
use zeroize::Zeroizing;

async fn key(env: &Env, spec: KeySpec, usage: Option<KeyUsageSet>) -> KeyRef {
    let mut req = CreateKeyRequest::new(spec);
    req.usage = usage;
    let k = env.dispatcher.create_key(&env.caller, req).await.expect("create key");
    KeyRef::Id(k.id)
}

fn enc(key: &KeyRef, pt: &[u8], aad: &[u8]) -> EncryptRequest {
    EncryptRequest {
        key: key.clone(),
        algorithm: None,
        plaintext: Zeroizing::new(pt.to_vec()),
        aad: aad.to_vec(),
        iv: None,
    }
}

fn dec(key: &KeyRef, r: &EncryptReply, aad: &[u8]) -> DecryptRequest {
    DecryptRequest {
        key: key.clone(),
        version: Some(r.version),
        algorithm: Some(r.algorithm),
        iv: r.iv.clone(),
        aad: aad.to_vec(),
        ciphertext: r.ciphertext.clone(),
        tag: r.tag.clone(),
    }
}

fn kind<T: std::fmt::Debug>(r: kmsgate_core::Result<T>) -> ErrorKind {
    r.expect_err("expected an error").kind()
}

async fn aes_round_trips_and_rejects_tampering(env: Env) {
    let k = key(&env, KeySpec::Aes256, None).await;
    let d = &env.dispatcher;
    for (pt, aad) in [(&b"hello"[..], &b""[..]), (b"", b"ctx"), (&[7u8; 4300][..], &[9u8; 8192][..])] {
        let r = d.encrypt(&env.caller, enc(&k, pt, aad)).await.unwrap();
        assert_eq!((r.iv.len(), r.tag.len(), r.ciphertext.len()), (12, 16, pt.len()));
        if !pt.is_empty() {
            assert_ne!(r.ciphertext.as_slice(), pt, "ciphertext differs from plaintext");
        }
        let out = d.decrypt(&env.caller, dec(&k, &r, aad)).await.unwrap();
        assert_eq!(out.plaintext.as_slice(), pt);
    }
    let r = d.encrypt(&env.caller, enc(&k, b"secret data", b"aad")).await.unwrap();
    let mut bad = dec(&k, &r, b"aaD");
    assert_eq!(kind(d.decrypt(&env.caller, bad.clone()).await), ErrorKind::InvalidCiphertext, "wrong AAD");
    bad.aad = b"aad".to_vec();
    bad.tag[0] ^= 1;
    assert_eq!(kind(d.decrypt(&env.caller, bad.clone()).await), ErrorKind::InvalidCiphertext, "wrong tag");
    bad.tag = r.tag.clone();
    bad.iv[3] ^= 1;
    assert_eq!(kind(d.decrypt(&env.caller, bad.clone()).await), ErrorKind::InvalidCiphertext, "wrong IV");
    bad.iv = r.iv.clone();
    bad.ciphertext[0] ^= 1;
    assert_eq!(kind(d.decrypt(&env.caller, bad.clone()).await), ErrorKind::InvalidCiphertext, "tampered ct");
    bad.ciphertext = r.ciphertext.clone();
    bad.iv = vec![0; 16];
    assert_eq!(kind(d.decrypt(&env.caller, bad.clone()).await), ErrorKind::InvalidCiphertext, "16-byte IV");
    // Another key cannot open it.
    let other = key(&env, KeySpec::Aes256, None).await;
    let mut wrong_key = dec(&other, &r, b"aad");
    wrong_key.version = None;
    assert_eq!(kind(d.decrypt(&env.caller, wrong_key).await), ErrorKind::InvalidCiphertext, "wrong key");
    // A version of another key never selects that key.
    let mut foreign_version = dec(&other, &r, b"aad");
    foreign_version.version = Some(r.version);
    assert_eq!(kind(d.decrypt(&env.caller, foreign_version).await), ErrorKind::InvalidCiphertext);
    // Caller-chosen IV is used as given.
    let mut with_iv = enc(&k, b"x", b"");
    with_iv.iv = Some(vec![5; 12]);
    assert_eq!(d.encrypt(&env.caller, with_iv.clone()).await.unwrap().iv, vec![5; 12]);
    with_iv.iv = Some(vec![5; 8]);
    assert_eq!(kind(d.encrypt(&env.caller, with_iv).await), ErrorKind::InvalidRequest);
    // Over the configured limit.
    let big = enc(&k, &vec![0; d.config().max_plaintext + 1], b"");
    assert_eq!(kind(d.encrypt(&env.caller, big).await), ErrorKind::Unsupported);
}

async fn rsa_oaep_round_trips(env: Env) {
    let d = &env.dispatcher;
    for spec in [KeySpec::Rsa2048, KeySpec::Rsa3072] {
        let k = key(&env, spec, Some(KeyUsageSet::of(&[KeyUsage::Encrypt, KeyUsage::Decrypt]))).await;
        let r = d.encrypt(&env.caller, enc(&k, b"data key bytes", b"")).await.unwrap();
        assert_eq!(r.algorithm, EncryptionAlgorithm::RsaOaepSha256);
        assert_eq!(r.ciphertext.len(), if spec == KeySpec::Rsa2048 { 256 } else { 384 });
        let out = d.decrypt(&env.caller, dec(&k, &r, b"")).await.unwrap();
        assert_eq!(out.plaintext.as_slice(), b"data key bytes");
        let mut bad = dec(&k, &r, b"");
        bad.ciphertext[10] ^= 0x40;
        assert_eq!(kind(d.decrypt(&env.caller, bad).await), ErrorKind::InvalidCiphertext);
        assert_eq!(kind(d.encrypt(&env.caller, enc(&k, &[1; 319], b"")).await), ErrorKind::InvalidRequest);
    }
}

async fn signatures_verify_independently(env: Env) {
    let d = &env.dispatcher;
    let cases = [
        (KeySpec::Rsa2048, SigningAlgorithm::RsaPkcs1Sha256),
        (KeySpec::Rsa2048, SigningAlgorithm::RsaPssSha256),
        (KeySpec::Rsa3072, SigningAlgorithm::RsaPkcs1Sha256),
        (KeySpec::Rsa3072, SigningAlgorithm::RsaPssSha256),
        (KeySpec::EcP256, SigningAlgorithm::EcdsaSha256),
    ];
    for (spec, alg) in cases {
        let k = key(&env, spec, None).await;
        let msg = b"the message to sign".to_vec();
        let req = SignRequest { key: k.clone(), algorithm: alg, input: SignInput::Message(msg.clone()), version: None };
        let sig = d.sign(&env.caller, req.clone()).await.unwrap();
        assert!(d.verify(&env.caller, req.clone(), &sig.signature).await.unwrap(), "{spec} {alg:?}");
        // The digest form is the same operation.
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &msg).as_ref().to_vec();
        let by_digest = SignRequest { input: SignInput::Digest(digest), ..req.clone() };
        assert!(d.verify(&env.caller, by_digest, &sig.signature).await.unwrap());
        let other = SignRequest { input: SignInput::Message(b"another message".to_vec()), ..req.clone() };
        assert!(!d.verify(&env.caller, other, &sig.signature).await.unwrap());
        let mut tampered = sig.signature.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(!d.verify(&env.caller, req.clone(), &tampered).await.unwrap());
        // An independent verifier accepts the signature with the exported public key.
        let pk = d.get_public_key(&env.caller, &k, None).await.unwrap();
        let spki = pk.der;
        let alg_ref: &dyn signature::VerificationAlgorithm = match alg {
            SigningAlgorithm::RsaPkcs1Sha256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            SigningAlgorithm::RsaPssSha256 => &signature::RSA_PSS_2048_8192_SHA256,
            SigningAlgorithm::EcdsaSha256 => &signature::ECDSA_P256_SHA256_ASN1,
        };
        UnparsedPublicKey::new(alg_ref, spki_public_key(&spki))
            .verify(&msg, &sig.signature)
            .expect("independent verification with the exported public key");
        // Wrong algorithm for the spec is a usage error.
        let wrong = match alg {
            SigningAlgorithm::EcdsaSha256 => SigningAlgorithm::RsaPssSha256,
            _ => SigningAlgorithm::EcdsaSha256,
        };
        assert_eq!(
            kind(d.sign(&env.caller, SignRequest { algorithm: wrong, ..req }).await),
            ErrorKind::InvalidKeyUsage
        );
    }
}

/// aws-lc-rs verifiers take the key in the form the algorithm expects: PKCS#1 RSAPublicKey for RSA, the
/// SEC1 point for EC. Extract it from the SPKI with a minimal DER walk (SEQUENCE { algId, BIT STRING }).
fn spki_public_key(spki: &[u8]) -> &[u8] {
    fn read_len(b: &[u8], i: &mut usize) -> usize {
        let first = b[*i];
        *i += 1;
        if first < 0x80 {
            return usize::from(first);
        }
        let n = usize::from(first & 0x7f);
        let mut len = 0;
        for _ in 0..n {
            len = (len << 8) | usize::from(b[*i]);
            *i += 1;
        }
        len
    }
    let mut i = 0;
    assert_eq!(spki[i], 0x30);
    i += 1;
    read_len(spki, &mut i);
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

async fn hmac_random_and_data_keys(env: Env) {
    let d = &env.dispatcher;
    let k = key(&env, KeySpec::Hmac256, None).await;
    let (_, mac) = d.hmac(&env.caller, &k, b"payload").await.unwrap();
    assert_eq!(mac.len(), 32);
    assert!(d.verify_hmac(&env.caller, &k, b"payload", &mac).await.unwrap());
    assert!(!d.verify_hmac(&env.caller, &k, b"payloaD", &mac).await.unwrap());
    let mut bad = mac.clone();
    bad[0] ^= 1;
    assert!(!d.verify_hmac(&env.caller, &k, b"payload", &bad).await.unwrap());

    let a = d.random(&env.caller, 32).await.unwrap();
    let b = d.random(&env.caller, 32).await.unwrap();
    assert_eq!(a.len(), 32);
    assert_ne!(a, b);
    assert_eq!(kind(d.random(&env.caller, 0).await), ErrorKind::InvalidRequest);
    assert_eq!(kind(d.random(&env.caller, 1025).await), ErrorKind::InvalidRequest);

    let aes = key(&env, KeySpec::Aes256, None).await;
    let dk = d.generate_data_key(&env.caller, &aes, 32, b"ctx".to_vec()).await.unwrap();
    assert_eq!(dk.plaintext.len(), 32);
    let back = d.decrypt(&env.caller, dec(&aes, &dk.encrypted, b"ctx")).await.unwrap();
    assert_eq!(back.plaintext.as_slice(), dk.plaintext.as_slice());
}

async fn state_and_usage_rules(env: Env) {
    let d = &env.dispatcher;
    let c = &env.caller;
    let k = key(&env, KeySpec::Aes256, None).await;
    let r = d.encrypt(c, enc(&k, b"x", b"")).await.unwrap();
    // The key is now cached; a disable must be seen at once.
    d.disable_key(c, &k).await.unwrap();
    assert_eq!(kind(d.encrypt(c, enc(&k, b"x", b"")).await), ErrorKind::InvalidKeyState(KeyState::Disabled));
    assert_eq!(kind(d.decrypt(c, dec(&k, &r, b"")).await), ErrorKind::InvalidKeyState(KeyState::Disabled));
    d.enable_key(c, &k).await.unwrap();
    d.encrypt(c, enc(&k, b"x", b"")).await.unwrap();
    d.schedule_key_deletion(c, &k, 7).await.unwrap();
    assert_eq!(kind(d.encrypt(c, enc(&k, b"x", b"")).await), ErrorKind::InvalidKeyState(KeyState::PendingDeletion));
    assert_eq!(kind(d.enable_key(c, &k).await), ErrorKind::InvalidKeyState(KeyState::PendingDeletion));
    assert_eq!(kind(d.schedule_key_deletion(c, &k, 7).await), ErrorKind::InvalidKeyState(KeyState::PendingDeletion));
    let back = d.cancel_key_deletion(c, &k, KeyState::Disabled).await.unwrap();
    assert_eq!((back.state, back.deletion_at), (KeyState::Disabled, None));
    assert_eq!(kind(d.schedule_key_deletion(c, &k, 3).await), ErrorKind::InvalidRequest);

    let enc_only = key(&env, KeySpec::Aes256, Some(KeyUsageSet::of(&[KeyUsage::Encrypt]))).await;
    let r = d.encrypt(c, enc(&enc_only, b"x", b"")).await.unwrap();
    assert_eq!(kind(d.decrypt(c, dec(&enc_only, &r, b"")).await), ErrorKind::InvalidKeyUsage);
    let dec_only = key(&env, KeySpec::Aes256, Some(KeyUsageSet::of(&[KeyUsage::Decrypt]))).await;
    assert_eq!(kind(d.encrypt(c, enc(&dec_only, b"x", b"")).await), ErrorKind::InvalidKeyUsage);
    let none = key(&env, KeySpec::Aes256, Some(KeyUsageSet::NONE)).await;
    assert_eq!(kind(d.encrypt(c, enc(&none, b"x", b"")).await), ErrorKind::InvalidKeyUsage);
    let sign_req = SignRequest {
        key: k.clone(),
        algorithm: SigningAlgorithm::EcdsaSha256,
        input: SignInput::Message(vec![1]),
        version: None,
    };
    d.enable_key(c, &k).await.unwrap();
    assert_eq!(kind(d.sign(c, sign_req).await), ErrorKind::InvalidKeyUsage);
    let mut bad = CreateKeyRequest::new(KeySpec::EcP256);
    bad.usage = Some(KeyUsageSet::of(&[KeyUsage::Encrypt]));
    assert_eq!(kind(d.create_key(c, bad).await), ErrorKind::InvalidRequest);
    let missing = KeyRef::parse("no-such-key").unwrap();
    assert_eq!(kind(d.encrypt(c, enc(&missing, b"x", b"")).await), ErrorKind::KeyNotFound);
    // Keys are per tenant.
    let other = Caller::admin(TenantId::parse("other").unwrap());
    d.ensure_tenant(&other.tenant).await.unwrap();
    assert_eq!(kind(d.encrypt(&other, enc(&k, b"x", b"")).await), ErrorKind::KeyNotFound);
}

async fn aliases_resolve_and_move(env: Env) {
    let d = &env.dispatcher;
    let c = &env.caller;
    let a = key(&env, KeySpec::Aes256, None).await;
    let b = key(&env, KeySpec::Aes256, None).await;
    let alias = AliasName::parse("alias/app").unwrap();
    let by_alias = KeyRef::Alias(alias.clone());
    d.create_alias(c, &alias, &a).await.unwrap();
    assert_eq!(kind(d.create_alias(c, &alias, &b).await), ErrorKind::AlreadyExists);
    let r = d.encrypt(c, enc(&by_alias, b"x", b"")).await.unwrap();
    assert_eq!(KeyRef::Id(r.key_id.clone()), a);
    d.update_alias(c, &alias, &b).await.unwrap();
    let r = d.encrypt(c, enc(&by_alias, b"x", b"")).await.unwrap();
    assert_eq!(KeyRef::Id(r.key_id.clone()), b, "the alias cache follows an update at once");
    let list = d.list_aliases(c, Some(&b), &PageRequest::first(10)).await.unwrap();
    assert_eq!(list.items.iter().map(|e| e.alias.clone()).collect::<Vec<_>>(), vec![alias.clone()]);
    d.delete_alias(c, &alias).await.unwrap();
    assert_eq!(kind(d.encrypt(c, enc(&by_alias, b"x", b"")).await), ErrorKind::KeyNotFound);
    assert_eq!(kind(d.delete_alias(c, &alias).await), ErrorKind::AliasNotFound);
    let missing = KeyRef::parse("missing").unwrap();
    assert_eq!(kind(d.create_alias(c, &alias, &missing).await), ErrorKind::KeyNotFound);
    // Aliases given at creation.
    let mut req = CreateKeyRequest::new(KeySpec::Aes256);
    req.aliases = vec![AliasName::parse("alias/born-with").unwrap()];
    d.create_key(c, req.clone()).await.unwrap();
    d.encrypt(c, enc(&KeyRef::parse("alias/born-with").unwrap(), b"x", b"")).await.unwrap();
    assert_eq!(kind(d.create_key(c, req).await), ErrorKind::AlreadyExists, "duplicate alias at creation");
}

async fn rotation_keeps_old_ciphertexts(env: Env) {
    let d = &env.dispatcher;
    let c = &env.caller;
    let k = key(&env, KeySpec::Aes256, None).await;
    let r1 = d.encrypt(c, enc(&k, b"v1 data", b"a")).await.unwrap();
    let rotated = d.rotate_key(c, &k).await.unwrap();
    assert_eq!(rotated.versions.len(), 2);
    let r2 = d.encrypt(c, enc(&k, b"v2 data", b"a")).await.unwrap();
    assert_ne!(r1.version, r2.version);
    assert_eq!(r2.version, rotated.primary_version);
    assert_eq!(d.decrypt(c, dec(&k, &r1, b"a")).await.unwrap().plaintext.as_slice(), b"v1 data");
    assert_eq!(d.decrypt(c, dec(&k, &r2, b"a")).await.unwrap().plaintext.as_slice(), b"v2 data");
    // Old ciphertext under the new version's material fails: versions are distinct material.
    let mut mixed = dec(&k, &r1, b"a");
    mixed.version = Some(r2.version);
    assert_eq!(kind(d.decrypt(c, mixed).await), ErrorKind::InvalidCiphertext);
    let mut unknown = dec(&k, &r1, b"a");
    unknown.version = Some(uuid::Uuid::new_v4());
    assert_eq!(kind(d.decrypt(c, unknown).await), ErrorKind::InvalidCiphertext);
    // A named version: exactly that one, primary or not (a frontend bound it into its AAD before a rotation).
    let old = d.encrypt_version(c, &enc(&k, b"old again", b"a"), r1.version).await.unwrap();
    assert_eq!(old.version, r1.version);
    assert_eq!(d.decrypt(c, dec(&k, &old, b"a")).await.unwrap().plaintext.as_slice(), b"old again");
    let mut under_new = dec(&k, &old, b"a");
    under_new.version = Some(r2.version);
    assert_eq!(kind(d.decrypt(c, under_new).await), ErrorKind::InvalidCiphertext);
    assert_eq!(d.encrypt_version(c, &enc(&k, b"x", b""), r2.version).await.unwrap().version, r2.version);
    let missing = d.encrypt_version(c, &enc(&k, b"x", b""), uuid::Uuid::new_v4()).await;
    assert_eq!(kind(missing), ErrorKind::InvalidRequest);
    // State still rules: a disabled key encrypts under no version.
    d.disable_key(c, &k).await.unwrap();
    assert_eq!(
        kind(d.encrypt_version(c, &enc(&k, b"x", b""), r1.version).await),
        ErrorKind::InvalidKeyState(KeyState::Disabled)
    );
}

async fn audit_one_event_per_operation_without_secrets(env: Env) {
    let d = &env.dispatcher;
    let c = &env.caller;
    let before = env.audit.events().len();
    let k = key(&env, KeySpec::Aes256, None).await;
    let plaintext = b"TOP-SECRET-PLAINTEXT-4711";
    let aad = b"SECRET-AAD-0815";
    let r = d.encrypt(c, enc(&k, plaintext, aad)).await.unwrap();
    d.decrypt(c, dec(&k, &r, aad)).await.unwrap();
    let _ = d.decrypt(c, dec(&k, &r, b"wrong")).await;
    let events = env.audit.events();
    let new = &events[before..];
    let ops: Vec<_> = new.iter().map(|e| e.operation.as_str()).collect();
    assert_eq!(ops, vec!["CreateKey", "Encrypt", "Decrypt", "Decrypt"]);
    assert_eq!(new[3].outcome, Outcome::Error { kind: "invalid_ciphertext" });
    assert_eq!(new[1].resource.as_deref(), Some(k.to_string().as_str()));
    let all = serde_json::to_string(new).unwrap();
    for secret in [&plaintext[..], &aad[..]] {
        assert!(!all.contains(std::str::from_utf8(secret).unwrap()));
    }
}

async fn deadline_miss_is_dependency_timeout(env: Env) {
    let k = key(&env, KeySpec::Aes256, None).await;
    let slow = Arc::new(SlowBackend { inner: env.backend.clone(), delay: Duration::from_millis(400) });
    let (d, _) = common::dispatcher_over(env.store.clone(), slow, Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    assert_eq!(kind(d.encrypt(&env.caller, enc(&k, b"x", b"")).await), ErrorKind::DependencyTimeout);
    assert!(started.elapsed() < Duration::from_millis(300), "the deadline bounds the call");
    // Unrelated work keeps flowing meanwhile.
    let ok = d.list_keys(&env.caller, &PageRequest::first(5)).await.unwrap();
    assert!(!ok.items.is_empty());
}

async fn purge_destroys_due_keys(env: Env) {
    let d = &env.dispatcher;
    let c = &env.caller;
    let k = key(&env, KeySpec::Aes256, None).await;
    let kept = key(&env, KeySpec::Aes256, None).await;
    d.schedule_key_deletion(c, &k, 7).await.unwrap();
    d.schedule_key_deletion(c, &kept, 7).await.unwrap();
    assert!(d.purge_due_keys(c).await.unwrap().is_empty(), "nothing is due yet");
    // Move the deletion date into the past, as time passing would.
    let KeyRef::Id(id) = &k else { unreachable!() };
    let mut stored = env.store.get_key(&c.tenant, id).await.unwrap().unwrap();
    stored.deletion_at = Some(Timestamp(Timestamp::now().0 - 1000));
    env.store.update_key(&stored).await.unwrap().unwrap();
    assert_eq!(d.purge_due_keys(c).await.unwrap(), vec![id.clone()]);
    assert_eq!(kind(d.describe_key(c, &k).await), ErrorKind::KeyNotFound);
    assert_eq!(d.describe_key(c, &kept).await.unwrap().state, KeyState::PendingDeletion);
}

macro_rules! backend_suite {
    ($module:ident, $env:expr) => {
        mod $module {
            use super::*;
            #[tokio::test]
            async fn aes_round_trips_and_rejects_tampering() {
                super::aes_round_trips_and_rejects_tampering($env).await
            }
            #[tokio::test]
            async fn rsa_oaep_round_trips() {
                super::rsa_oaep_round_trips($env).await
            }
            #[tokio::test]
            async fn signatures_verify_independently() {
                super::signatures_verify_independently($env).await
            }
            #[tokio::test]
            async fn hmac_random_and_data_keys() {
                super::hmac_random_and_data_keys($env).await
            }
            #[tokio::test]
            async fn state_and_usage_rules() {
                super::state_and_usage_rules($env).await
            }
            #[tokio::test]
            async fn aliases_resolve_and_move() {
                super::aliases_resolve_and_move($env).await
            }
            #[tokio::test]
            async fn rotation_keeps_old_ciphertexts() {
                super::rotation_keeps_old_ciphertexts($env).await
            }
            #[tokio::test]
            async fn audit_one_event_per_operation_without_secrets() {
                super::audit_one_event_per_operation_without_secrets($env).await
            }
            #[tokio::test]
            async fn deadline_miss_is_dependency_timeout() {
                super::deadline_miss_is_dependency_timeout($env).await
            }
            #[tokio::test]
            async fn purge_destroys_due_keys() {
                super::purge_destroys_due_keys($env).await
            }
        }
    };
}

backend_suite!(software, Env::software().await);
backend_suite!(pkcs11, Env::pkcs11().await);

/// Another process's change (CLI, replica) reaches this process's cache through the change feed.
#[tokio::test]
async fn change_feed_invalidates_another_dispatchers_cache() {
    let env = Env::software().await;
    let k = key(&env, KeySpec::Aes256, None).await;
    let (other, _) = common::dispatcher_over(env.store.clone(), env.backend.clone(), Duration::from_secs(5)).await;
    other.encrypt(&env.caller, enc(&k, b"x", b"")).await.unwrap();
    env.dispatcher.disable_key(&env.caller, &k).await.unwrap();
    // Still cached in the other process until it reads the feed...
    other.encrypt(&env.caller, enc(&k, b"x", b"")).await.unwrap();
    assert!(other.apply_changes().await.unwrap() >= 1);
    assert_eq!(
        kind(other.encrypt(&env.caller, enc(&k, b"x", b"")).await),
        ErrorKind::InvalidKeyState(KeyState::Disabled)
    );
}

/// Keys survive a restart, need the root key, and a wrong root key is a clear error, not garbage.
#[tokio::test]
async fn restart_needs_the_same_root_key() {
    let env = Env::software().await;
    let k = key(&env, KeySpec::Aes256, None).await;
    let r = env.dispatcher.encrypt(&env.caller, enc(&k, b"persisted", b"")).await.unwrap();
    let dir = env.dir;
    drop(env.dispatcher);
    drop(env.store);

    let store = common::open_store(dir.path()).await;
    let (d, _) =
        common::dispatcher_over(store.clone(), common::software_backend(dir.path()), Duration::from_secs(5)).await;
    let caller = Caller::admin(TenantId::default_tenant());
    assert_eq!(d.decrypt(&caller, dec(&k, &r, b"")).await.unwrap().plaintext.as_slice(), b"persisted");

    let other_dir = tempfile::tempdir().unwrap();
    let wrong = common::software_backend(other_dir.path());
    let (d, _) = common::dispatcher_over(store, wrong, Duration::from_secs(5)).await;
    let err = d.decrypt(&caller, dec(&k, &r, b"")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DependencyFailure);
    assert!(err.message().contains("root key"), "{}", err.message());
}

/// Sealed credentials: bound to purpose and tenant, tamper-evident, and the sealing key is created once.
#[tokio::test]
async fn seal_and_unseal_credentials() {
    let env = Env::software().await;
    let d = &env.dispatcher;
    let c = &env.caller;
    let sealed = d.seal(c, "xks.credential/AKID1", b"the secret").await.unwrap();
    assert!(!sealed.windows(10).any(|w| w == b"the secret"), "no plaintext in the sealed form");
    assert_eq!(d.unseal(c, "xks.credential/AKID1", &sealed).await.unwrap().as_slice(), b"the secret");
    assert_eq!(kind(d.unseal(c, "xks.credential/AKID2", &sealed).await), ErrorKind::InvalidCiphertext, "other purpose");
    let mut tampered = sealed.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert_eq!(kind(d.unseal(c, "xks.credential/AKID1", &tampered).await), ErrorKind::InvalidCiphertext);
    assert_eq!(kind(d.unseal(c, "xks.credential/AKID1", &sealed[..10]).await), ErrorKind::InvalidCiphertext);
    // One sealing key per tenant, reused; another tenant cannot open this tenant's sealed values.
    d.seal(c, "p", b"x").await.unwrap();
    let keys = env.store.list_keys(&c.tenant, &PageRequest::first(10)).await.unwrap();
    assert_eq!(keys.items.len(), 1);
    assert!(keys.items[0].internal);
    assert!(d.list_keys(c, &PageRequest::first(10)).await.unwrap().items.is_empty(), "not listed to callers");
    let other = Caller::admin(TenantId::parse("other").unwrap());
    d.ensure_tenant(&other.tenant).await.unwrap();
    d.seal(&other, "p", b"x").await.unwrap();
    assert!(d.unseal(&other, "xks.credential/AKID1", &sealed).await.is_err());
}

/// Documents are read through a cache that follows this process's writes at once and other processes'
/// writes through the change feed; heartbeats count live replicas.
#[tokio::test]
async fn documents_and_heartbeats() {
    use kmsgate_core::{Document, Precondition};
    let env = Env::software().await;
    let d = &env.dispatcher;
    let c = &env.caller;
    assert!(d.document("test.kind", "doc-1").await.unwrap().is_none());
    let doc = Document::new("test.kind", "doc-1", c.tenant.clone(), serde_json::json!({"v": 1}));
    let stored = d.put_document(c, doc.clone(), Precondition::Absent).await.unwrap().unwrap();
    assert_eq!(stored.revision, 1);
    assert_eq!(d.document("test.kind", "doc-1").await.unwrap().unwrap().body["v"], 1, "the miss was not kept");
    assert_eq!(kind(d.put_document(c, doc.clone(), Precondition::Absent).await), ErrorKind::AlreadyExists);

    // Another process changes it; this one sees it after reading the change feed.
    let (other, _) = common::dispatcher_over(env.store.clone(), env.backend.clone(), Duration::from_secs(5)).await;
    let mut changes = d.subscribe_changes();
    let mut v2 = stored.clone();
    v2.body = serde_json::json!({"v": 2});
    other.put_document(c, v2, Precondition::Revision(1)).await.unwrap().unwrap();
    assert_eq!(d.document("test.kind", "doc-1").await.unwrap().unwrap().body["v"], 1, "still cached");
    d.apply_changes().await.unwrap();
    assert_eq!(d.document("test.kind", "doc-1").await.unwrap().unwrap().body["v"], 2);
    let mut seen = Vec::new();
    while let Ok(c) = changes.try_recv() {
        seen.push(c.id);
    }
    assert!(seen.iter().any(|id| id == "test.kind/doc-1"), "broadcast: {seen:?}");
    assert!(other.delete_document(c, "test.kind", "doc-1").await.unwrap());
    d.apply_changes().await.unwrap();
    assert!(d.document("test.kind", "doc-1").await.unwrap().is_none());

    d.heartbeat("replica-a", &serde_json::json!({})).await.unwrap();
    other.heartbeat("replica-b", &serde_json::json!({})).await.unwrap();
    assert_eq!(d.live_replicas(Duration::from_secs(30)).await.unwrap().len(), 2);
}

/// The gateway's internal keys (credential sealing, secret data keys, backend probes) do not exist for any
/// caller, the admin included: every operation on them, by id or by alias, is `KeyNotFound`; listings leave
/// them out; nobody can make, move or delete an alias in their namespace or forge their marks. The
/// dispatcher's own paths keep using them.
#[tokio::test]
async fn internal_keys_are_out_of_every_callers_reach() {
    let env = Env::software().await;
    let (d, c) = (&env.dispatcher, &env.caller);
    let mine = key(&env, KeySpec::Aes256, None).await;
    let sealed = d.seal(c, "test/purpose", b"credential").await.unwrap();
    d.probe_backend(c, "software", &AliasName::parse("alias/kmsgate-internal/probe-software").unwrap()).await.unwrap();
    let sealing = common::internal_key(d, &c.tenant, kmsgate_core::Dispatcher::SEALING_ALIAS).await;
    let probe = common::internal_key(d, &c.tenant, "alias/kmsgate-internal/probe-software").await;
    assert!(sealing.internal && probe.internal);

    for internal in [&sealing, &probe] {
        let by_id = KeyRef::Id(internal.id.clone());
        let alias = d.store().list_aliases(&c.tenant, Some(&internal.id), &PageRequest::first(10)).await.unwrap();
        let by_alias = KeyRef::Alias(alias.items[0].alias.clone());
        for k in [&by_id, &by_alias] {
            let nf = |e: ErrorKind| assert_eq!(e, ErrorKind::KeyNotFound, "{k}");
            nf(kind(d.encrypt(c, enc(k, b"x", b"")).await));
            let body = &sealed[17..];
            let (iv, ct_tag) = body.split_at(12);
            let (ct, tag) = ct_tag.split_at(ct_tag.len() - 16);
            let raw = DecryptRequest {
                key: k.clone(),
                version: None,
                algorithm: Some(EncryptionAlgorithm::AesGcm),
                iv: iv.to_vec(),
                aad: b"test/purpose".to_vec(),
                ciphertext: ct.to_vec(),
                tag: tag.to_vec(),
            };
            nf(kind(d.decrypt(c, raw).await));
            nf(kind(d.generate_data_key(c, k, 32, Vec::new()).await));
            let sign = SignRequest {
                key: k.clone(),
                algorithm: SigningAlgorithm::EcdsaSha256,
                input: SignInput::Message(b"m".to_vec()),
                version: None,
            };
            nf(kind(d.sign(c, sign.clone()).await));
            nf(kind(d.verify(c, sign, b"sig").await));
            nf(kind(d.hmac(c, k, b"m").await));
            nf(kind(d.verify_hmac(c, k, b"m", &[0; 32]).await));
            nf(kind(d.get_public_key(c, k, None).await));
            nf(kind(d.describe_key(c, k).await));
            nf(kind(d.enable_key(c, k).await));
            nf(kind(d.disable_key(c, k).await));
            nf(kind(d.schedule_key_deletion(c, k, 7).await));
            nf(kind(d.cancel_key_deletion(c, k, KeyState::Enabled).await));
            nf(kind(d.update_key_description(c, k, "mine now".into()).await));
            nf(kind(d.update_key_tags(c, k, &Default::default(), &["x".into()]).await));
            nf(kind(d.rotate_key(c, k).await));
            nf(kind(d.delete_key_material(c, k).await));
            nf(kind(d.import_key_material(c, k, &[0; 32]).await));
            nf(kind(d.list_aliases(c, Some(k), &PageRequest::first(10)).await));
            nf(kind(d.create_alias(c, &AliasName::parse("alias/steal").unwrap(), k).await));
        }
        // Unchanged by all of that.
        let after = common::internal_key(d, &c.tenant, alias_of(d, &c.tenant, &internal.id).await.as_str()).await;
        assert_eq!(
            (after.state, after.versions.len(), &after.description),
            (KeyState::Enabled, 1, &internal.description)
        );
    }

    // Listings show the caller's keys and aliases only.
    let keys = d.list_keys(c, &PageRequest::first(100)).await.unwrap();
    assert_eq!(keys.items.iter().map(|k| KeyRef::Id(k.id.clone())).collect::<Vec<_>>(), vec![mine.clone()]);
    let aliases = d.list_aliases(c, None, &PageRequest::first(100)).await.unwrap();
    assert!(aliases.items.iter().all(|a| !a.alias.is_internal()), "{:?}", aliases.items);

    // The reserved alias namespace and description are the gateway's.
    let sealing_alias = AliasName::parse(kmsgate_core::Dispatcher::SEALING_ALIAS).unwrap();
    let squat = AliasName::parse("alias/kmsgate-internal/mine").unwrap();
    assert_eq!(kind(d.create_alias(c, &squat, &mine).await), ErrorKind::InvalidRequest);
    assert_eq!(kind(d.update_alias(c, &sealing_alias, &mine).await), ErrorKind::AliasNotFound);
    assert_eq!(kind(d.delete_alias(c, &sealing_alias).await), ErrorKind::AliasNotFound);
    let mut req = CreateKeyRequest::new(KeySpec::Aes256);
    req.aliases = vec![AliasName::parse("alias/kmsgate-internal/secrets").unwrap()];
    assert_eq!(kind(d.create_key(c, req).await), ErrorKind::InvalidRequest);
    let mut req = CreateKeyRequest::new(KeySpec::Aes256);
    req.description = "kmsgate internal: hide me".into();
    assert_eq!(kind(d.create_key(c, req).await), ErrorKind::InvalidRequest);
    assert_eq!(kind(d.update_key_description(c, &mine, "kmsgate internal: x".into()).await), ErrorKind::InvalidRequest);
    assert_eq!(common::internal_key(d, &c.tenant, sealing_alias.as_str()).await.id, sealing.id, "alias unmoved");

    // The dispatcher's own paths still work.
    assert_eq!(d.unseal(c, "test/purpose", &sealed).await.unwrap().as_slice(), b"credential");
    d.probe_backend(c, "software", &AliasName::parse("alias/kmsgate-internal/probe-software").unwrap()).await.unwrap();
    let not_reserved = AliasName::parse("alias/probe").unwrap();
    assert_eq!(kind(d.probe_backend(c, "software", &not_reserved).await), ErrorKind::InvalidRequest);
}

/// A key an older version created for itself is recognised by its description alone.
#[tokio::test]
async fn legacy_internal_keys_are_recognised_by_their_description() {
    let env = Env::software().await;
    let (d, c) = (&env.dispatcher, &env.caller);
    let k = key(&env, KeySpec::Aes256, None).await;
    let KeyRef::Id(id) = &k else { unreachable!() };
    let mut stored = env.store.get_key(&c.tenant, id).await.unwrap().unwrap();
    stored.description = "kmsgate internal: seals stored credentials (SigV4 and HMAC secrets); never delete".into();
    env.store.update_key(&stored).await.unwrap().unwrap();
    d.apply_changes().await.unwrap();
    assert_eq!(kind(d.encrypt(c, enc(&k, b"x", b"")).await), ErrorKind::KeyNotFound);
    assert_eq!(kind(d.describe_key(c, &k).await), ErrorKind::KeyNotFound);
    assert!(d.list_keys(c, &PageRequest::first(10)).await.unwrap().items.is_empty());
}

async fn alias_of(d: &kmsgate_core::Dispatcher, tenant: &TenantId, id: &kmsgate_core::KeyId) -> AliasName {
    d.store().list_aliases(tenant, Some(id), &PageRequest::first(1)).await.unwrap().items.remove(0).alias
}

//! The core's key-import path (customer material for keys created `external`), its removal, and key tags,
//! over a real store and each real backend.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::Env;
use kmsgate_core::{
    CreateKeyRequest, DecryptRequest, EncryptRequest, EncryptionAlgorithm, ErrorKind, KeyOrigin, KeyRef, KeySpec,
    KeyState,
};
use zeroize::Zeroizing;

fn kind<T: std::fmt::Debug>(r: kmsgate_core::Result<T>) -> ErrorKind {
    r.expect_err("expected an error").kind()
}

fn enc(key: &KeyRef, pt: &[u8]) -> EncryptRequest {
    EncryptRequest {
        key: key.clone(),
        algorithm: Some(EncryptionAlgorithm::AesGcm),
        plaintext: Zeroizing::new(pt.to_vec()),
        aad: b"ctx".to_vec(),
        iv: None,
    }
}

async fn import_lifecycle(env: Env) {
    let (d, c) = (&env.dispatcher, &env.caller);
    let mut req = CreateKeyRequest::new(KeySpec::Aes256);
    req.external = true;
    let k = d.create_key(c, req).await.unwrap();
    assert_eq!((k.state, k.origin), (KeyState::PendingImport, KeyOrigin::External));
    let key = KeyRef::Id(k.id.clone());
    assert_eq!(kind(d.encrypt(c, enc(&key, b"x")).await), ErrorKind::InvalidKeyState(KeyState::PendingImport));
    // Wrong material changes nothing.
    assert_eq!(kind(d.import_key_material(c, &key, &[1; 16]).await), ErrorKind::InvalidRequest);
    assert_eq!(d.describe_key(c, &key).await.unwrap().state, KeyState::PendingImport);

    let material = [7u8; 32];
    let imported = d.import_key_material(c, &key, &material).await.unwrap();
    assert_eq!(imported.state, KeyState::Enabled);
    assert_eq!(imported.versions.len(), 1);
    let e = d.encrypt(c, enc(&key, b"customer material")).await.unwrap();
    // The ciphertext is AES-256-GCM under exactly the customer's bytes.
    let unbound = aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &material).unwrap();
    let less_safe = aws_lc_rs::aead::LessSafeKey::new(unbound);
    let mut buf = [e.ciphertext.clone(), e.tag.clone()].concat();
    let nonce = aws_lc_rs::aead::Nonce::try_assume_unique_for_key(&e.iv).unwrap();
    let opened = less_safe.open_in_place(nonce, aws_lc_rs::aead::Aad::from(b"ctx"), &mut buf).unwrap();
    assert_eq!(opened, b"customer material");
    assert_eq!(
        kind(d.import_key_material(c, &key, &material).await),
        ErrorKind::InvalidKeyState(KeyState::Enabled),
        "material never changes under existing ciphertexts"
    );
    assert_eq!(kind(d.rotate_key(c, &key).await), ErrorKind::Unsupported);

    let gone = d.delete_key_material(c, &key).await.unwrap();
    assert_eq!(gone.state, KeyState::PendingImport);
    let dec = DecryptRequest {
        key: key.clone(),
        version: Some(e.version),
        algorithm: Some(EncryptionAlgorithm::AesGcm),
        iv: e.iv.clone(),
        aad: b"ctx".to_vec(),
        ciphertext: e.ciphertext.clone(),
        tag: e.tag.clone(),
    };
    assert_eq!(kind(d.decrypt(c, dec.clone()).await), ErrorKind::InvalidKeyState(KeyState::PendingImport));
    assert_eq!(kind(d.delete_key_material(c, &key).await), ErrorKind::InvalidKeyState(KeyState::PendingImport));
    // The same material again restores the key and its ciphertexts.
    d.import_key_material(c, &key, &material).await.unwrap();
    assert_eq!(&*d.decrypt(c, dec).await.unwrap().plaintext, b"customer material");

    // Generated keys take no imports and keep their material.
    let generated = KeyRef::Id(d.create_key(c, CreateKeyRequest::new(KeySpec::Aes256)).await.unwrap().id);
    assert_eq!(kind(d.import_key_material(c, &generated, &material).await), ErrorKind::Unsupported);
    assert_eq!(kind(d.delete_key_material(c, &generated).await), ErrorKind::Unsupported);

    // Tags: set, overwrite, remove.
    let set: BTreeMap<String, String> =
        [("team".to_owned(), "a".to_owned()), ("env".to_owned(), "prod".to_owned())].into();
    d.update_key_tags(c, &generated, &set, &[]).await.unwrap();
    let set2: BTreeMap<String, String> = [("team".to_owned(), "b".to_owned())].into();
    let k = d.update_key_tags(c, &generated, &set2, &["env".to_owned()]).await.unwrap();
    assert_eq!(k.tags, set2);
    assert_eq!(d.describe_key(c, &generated).await.unwrap().tags, set2);
    let ops: Vec<_> = env.audit.events().into_iter().map(|e| e.operation.as_str()).collect();
    for op in ["ImportKeyMaterial", "DeleteKeyMaterial", "TagKey"] {
        assert!(ops.contains(&op), "{op} is audited");
    }
}

#[tokio::test]
async fn software_import_lifecycle() {
    import_lifecycle(Env::software().await).await
}

#[tokio::test]
async fn pkcs11_import_lifecycle() {
    import_lifecycle(Env::pkcs11().await).await
}

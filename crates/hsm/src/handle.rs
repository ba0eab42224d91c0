//! Wrapping and unwrapping of key material into the handles the store records (format described in the crate
//! docs).

use aws_lc_rs::aead::{Aad, NONCE_LEN, Nonce};
use aws_lc_rs::rand;
use kmsgate_core::{Error, ErrorKind, KeyMaterialRef, KeyState, Result};
use zeroize::Zeroizing;

use crate::kek::{FINGERPRINT_LEN, Kek};

/// The only handle format so far. A new layout gets a new byte; old handles keep unwrapping.
pub(crate) const FORMAT_V1: u8 = 1;
/// Format byte, fingerprint, nonce.
pub(crate) const HEADER_LEN: usize = 1 + FINGERPRINT_LEN + NONCE_LEN;
pub(crate) const TAG_LEN: usize = 16;

const AAD_LABEL: &[u8] = b"kmsgate/software-handle/v1\0";

/// Feeds the identity a handle is bound to, in a fixed order with length prefixes so two different identities
/// can never encode to the same bytes (key ids are at most 128 bytes, spec names a few).
fn feed_identity(key: &KeyMaterialRef<'_>, sink: &mut dyn FnMut(&[u8])) {
    let id = key.key_id.as_str().as_bytes();
    let id_len = u16::try_from(id.len()).unwrap_or(u16::MAX);
    sink(&id_len.to_be_bytes());
    sink(id);
    sink(key.version.as_bytes());
    let spec = key.spec.as_str().as_bytes();
    let spec_len = u8::try_from(spec.len()).unwrap_or(u8::MAX);
    sink(&[spec_len]);
    sink(spec);
}

fn aad(fingerprint: &[u8; FINGERPRINT_LEN], key: &KeyMaterialRef<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(AAD_LABEL.len() + 1 + FINGERPRINT_LEN + 2 + 128 + 16 + 1 + 16);
    out.extend_from_slice(AAD_LABEL);
    out.push(FORMAT_V1);
    out.extend_from_slice(fingerprint);
    feed_identity(key, &mut |part| out.extend_from_slice(part));
    out
}

/// Seals `material` under the root key, bound to `key`'s identity (its `handle` field is ignored).
pub(crate) fn wrap(kek: &Kek, key: &KeyMaterialRef<'_>, material: &[u8]) -> Result<Vec<u8>> {
    let fingerprint = kek.fingerprint();
    let mut nonce = [0u8; NONCE_LEN];
    rand::fill(&mut nonce).map_err(|e| {
        Error::new(ErrorKind::DependencyFailure, "the random generator failed while wrapping a key").with_source(e)
    })?;
    // Zeroizing: if sealing fails half-way the buffer may still hold plaintext material.
    let mut out = Zeroizing::new(Vec::with_capacity(HEADER_LEN + material.len() + TAG_LEN));
    out.push(FORMAT_V1);
    out.extend_from_slice(&fingerprint);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(material);
    let tag = kek
        .wrap_key()
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(&fingerprint, key)),
            &mut out[HEADER_LEN..],
        )
        .map_err(|e| Error::new(ErrorKind::DependencyFailure, "wrapping the key material failed").with_source(e))?;
    out.extend_from_slice(tag.as_ref());
    Ok(std::mem::take(&mut *out))
}

/// Opens a handle made by [`wrap`] for the same identity under the same root key.
///
/// Failures, none of which is `InvalidCiphertext` (the caller's data is not at fault):
/// - empty handle: the version awaits imported material (`InvalidKeyState(PendingImport)`);
/// - truncated or unknown format: `Internal`;
/// - fingerprint of another root key: `DependencyFailure` (a configuration problem the operator must fix);
/// - authentication failure: `Internal`, because the store handed over a handle that was moved to another key
///   id, version or spec, or altered; retrying cannot help.
pub(crate) fn unwrap(kek: &Kek, key: &KeyMaterialRef<'_>) -> Result<Zeroizing<Vec<u8>>> {
    let handle = key.handle;
    if handle.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidKeyState(KeyState::PendingImport),
            "the key version has no key material yet (import pending)",
        ));
    }
    if handle.len() <= HEADER_LEN + TAG_LEN || handle[0] != FORMAT_V1 {
        return Err(Error::internal("the key handle is malformed or of an unknown format"));
    }
    let (header, sealed) = handle.split_at(HEADER_LEN);
    let fingerprint: [u8; FINGERPRINT_LEN] = header[1..1 + FINGERPRINT_LEN]
        .try_into()
        .map_err(|_| Error::internal("the key handle is malformed or of an unknown format"))?;
    if fingerprint != kek.fingerprint() {
        let detail = format!(
            "handle root key fingerprint {}, configured root key fingerprint {}",
            hex(&fingerprint),
            kek.fingerprint_hex()
        );
        return Err(Error::new(
            ErrorKind::DependencyFailure,
            "the root key does not match the one this key was wrapped under",
        )
        .with_source(detail));
    }
    let nonce = Nonce::try_assume_unique_for_key(&header[1 + FINGERPRINT_LEN..])
        .map_err(|_| Error::internal("the key handle is malformed or of an unknown format"))?;
    let mut buf = Zeroizing::new(sealed.to_vec());
    let len = kek
        .wrap_key()
        .open_in_place(nonce, Aad::from(aad(&fingerprint, key)), &mut buf)
        .map_err(|e| {
            Error::internal(
                "the key handle does not authenticate for this key version: it was moved to another key, version \
                 or spec, or altered",
            )
            .with_source(e)
        })?
        .len();
    buf.truncate(len);
    Ok(buf)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use kmsgate_core::{KeyId, KeySpec};
    use uuid::Uuid;

    use super::*;

    fn kek() -> Kek {
        Kek::from_bytes(&[42u8; 32]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn id(s: &str) -> KeyId {
        KeyId::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    fn at<'a>(key_id: &'a KeyId, version: Uuid, spec: KeySpec, handle: &'a [u8]) -> KeyMaterialRef<'a> {
        KeyMaterialRef { key_id, version, spec, handle }
    }

    #[test]
    fn layout_is_as_documented() {
        let kek = kek();
        let k = id("k1");
        let v = Uuid::new_v4();
        let material = [9u8; 32];
        let h = wrap(&kek, &at(&k, v, KeySpec::Aes256, &[]), &material).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h.len(), 1 + 8 + 12 + 32 + 16);
        assert_eq!(h[0], FORMAT_V1);
        assert_eq!(&h[1..9], kek.fingerprint().as_slice());
        // The material must not appear in clear.
        assert!(!h.windows(8).any(|w| w == [9u8; 8]));
        let back = unwrap(&kek, &at(&k, v, KeySpec::Aes256, &h)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.as_slice(), material.as_slice());
    }

    #[test]
    fn nonces_are_fresh() {
        let kek = kek();
        let k = id("k1");
        let v = Uuid::new_v4();
        let r = at(&k, v, KeySpec::Hmac256, &[]);
        let a = wrap(&kek, &r, &[1u8; 32]).unwrap_or_else(|e| panic!("{e}"));
        let b = wrap(&kek, &r, &[1u8; 32]).unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(a[9..21], b[9..21]);
        assert_ne!(a, b);
    }

    #[test]
    fn identity_encoding_is_unambiguous() {
        let v = Uuid::new_v4();
        let (a, b) = (id("ab"), id("a"));
        let fp = [0u8; 8];
        assert_ne!(aad(&fp, &at(&a, v, KeySpec::Aes256, &[])), aad(&fp, &at(&b, v, KeySpec::Aes256, &[])));
        assert_ne!(aad(&fp, &at(&a, v, KeySpec::Aes256, &[])), aad(&fp, &at(&a, v, KeySpec::Hmac256, &[])));
    }

    #[test]
    fn failures_have_the_documented_kinds() {
        let kek = kek();
        let k = id("k1");
        let v = Uuid::new_v4();
        let h = wrap(&kek, &at(&k, v, KeySpec::Aes256, &[]), &[3u8; 32]).unwrap_or_else(|e| panic!("{e}"));
        let kind = |handle: &[u8]| unwrap(&kek, &at(&k, v, KeySpec::Aes256, handle)).err().map(|e| e.kind());

        assert_eq!(kind(&[]), Some(ErrorKind::InvalidKeyState(KeyState::PendingImport)));
        assert_eq!(kind(&h[..HEADER_LEN + TAG_LEN]), Some(ErrorKind::Internal));
        let mut other_format = h.clone();
        other_format[0] = 2;
        assert_eq!(kind(&other_format), Some(ErrorKind::Internal));
        let mut other_fp = h.clone();
        other_fp[3] ^= 1;
        assert_eq!(kind(&other_fp), Some(ErrorKind::DependencyFailure));
        let mut flipped = h.clone();
        flipped[HEADER_LEN + 4] ^= 0x80;
        assert_eq!(kind(&flipped), Some(ErrorKind::Internal));
        let mut nonce = h.clone();
        nonce[10] ^= 1;
        assert_eq!(kind(&nonce), Some(ErrorKind::Internal));
        assert_eq!(kind(&h), None);
    }
}

//! The XKS-specific byte layouts: the AAD handed to the key manager, `ciphertextMetadata`, and the
//! ciphertext data integrity value (spec, Encrypt item 2 and Appendix C).

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Version byte of our `ciphertextMetadata`; it also names the AAD layout, so a future layout can coexist.
pub const METADATA_FORMAT_V1: u8 = 0x01;
/// `format (1) || key version uuid (16)`: within the spec's 20-byte limit.
pub const METADATA_LEN: usize = 17;
/// The spec's upper bound on `ciphertextMetadata`.
pub const METADATA_MAX: usize = 20;

/// `ciphertextMetadata` for a ciphertext made with `version` of the key.
pub fn metadata(version: Uuid) -> [u8; METADATA_LEN] {
    let mut out = [0u8; METADATA_LEN];
    out[0] = METADATA_FORMAT_V1;
    out[1..].copy_from_slice(version.as_bytes());
    out
}

/// The key version a `ciphertextMetadata` names, if it is one of ours.
pub fn parse_metadata(md: &[u8]) -> Option<Uuid> {
    match md {
        [METADATA_FORMAT_V1, rest @ ..] if rest.len() == 16 => Uuid::from_slice(rest).ok(),
        _ => None,
    }
}

/// `u16_be(len(aad)) || aad || u8(len(md)) || md`: both lengths explicit, so "AAD = X, no metadata" can never
/// verify as "no AAD, metadata = X". Absent fields are empty. `None` when a length does not fit its prefix.
pub fn backend_aad(aad: &[u8], md: &[u8]) -> Option<Vec<u8>> {
    let aad_len = u16::try_from(aad.len()).ok()?;
    let md_len = u8::try_from(md.len()).ok()?;
    let mut out = Vec::with_capacity(2 + aad.len() + 1 + md.len());
    out.extend_from_slice(&aad_len.to_be_bytes());
    out.extend_from_slice(aad);
    out.push(md_len);
    out.extend_from_slice(md);
    Some(out)
}

/// `SHA-256(aad || md || iv || ciphertext || tag)` with no length prefixes (Appendix C).
pub fn integrity_value(aad: &[u8], md: &[u8], iv: &[u8], ciphertext: &[u8], tag: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(aad);
    h.update(md);
    h.update(iv);
    h.update(ciphertext);
    h.update(tag);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    /// The example of the specification's Appendix C, bit for bit.
    #[test]
    fn appendix_c_vector() {
        let aad = b"project=nile,department=marketing";
        let md = b"key_version=1";
        let iv = hex::decode("1ccae5470f39700254779031").unwrap_or_default();
        let ct = hex::decode("821c642b5b71783367deaf18").unwrap_or_default();
        let tag = hex::decode("bc1c4dda7707d6812447c5955e99b261").unwrap_or_default();
        assert_eq!((aad.len(), md.len(), iv.len(), ct.len(), tag.len()), (33, 13, 12, 12, 16));
        let cdiv = integrity_value(aad, md, &iv, &ct, &tag);
        assert_eq!(hex::encode(cdiv), "a8703f2260bd8791ec2d15ea0b23e65a0631eedcf2a13a65cc82db3f47cf5ec7");
        assert_eq!(STANDARD.encode(cdiv), "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc=");
        // The spec's example response fields decode to the same bytes.
        assert_eq!(STANDARD.decode("HMrlRw85cAJUd5Ax").unwrap_or_default(), iv);
        assert_eq!(STANDARD.decode("ghxkK1txeDNn3q8Y").unwrap_or_default(), ct);
        assert_eq!(STANDARD.decode("vBxN2ncH1oEkR8WVXpmyYQ==").unwrap_or_default(), tag);
        assert_eq!(STANDARD.decode("a2V5X3ZlcnNpb249MQ==").unwrap_or_default(), md);
        assert_eq!(STANDARD.decode("cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n").unwrap_or_default(), aad);
    }

    #[test]
    fn aad_layout_separates_aad_from_metadata() {
        let a = backend_aad(b"X", b"").unwrap_or_default();
        let b = backend_aad(b"", b"X").unwrap_or_default();
        assert_eq!(a, vec![0, 1, b'X', 0]);
        assert_eq!(b, vec![0, 0, 1, b'X']);
        assert_ne!(a, b);
        assert_eq!(backend_aad(b"", b""), Some(vec![0, 0, 0]));
        assert_eq!(backend_aad(&vec![7u8; 300], b"m").map(|v| v[..2].to_vec()), Some(vec![1, 44]));
        assert!(backend_aad(&vec![0u8; 65536], b"").is_none());
        assert!(backend_aad(&vec![0u8; 65535], b"").is_some());
    }

    #[test]
    fn metadata_roundtrip() {
        let v = Uuid::new_v4();
        let md = metadata(v);
        assert_eq!(md.len(), METADATA_LEN);
        assert!(md.len() <= METADATA_MAX);
        assert_eq!(parse_metadata(&md), Some(v));
        let mut bad = md;
        bad[0] = 2;
        assert_eq!(parse_metadata(&bad), None);
        assert_eq!(parse_metadata(&md[..16]), None);
        assert_eq!(parse_metadata(b""), None);
    }
}

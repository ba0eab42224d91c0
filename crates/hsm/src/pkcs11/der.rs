//! The few DER structures the PKCS#11 backend builds or takes apart: `SubjectPublicKeyInfo` from an RSA modulus
//! and exponent or an EC point, DER `Ecdsa-Sig-Value` from a token's raw `r || s`, and the OCTET STRING around
//! `CKA_EC_POINT`. A hand-written encoder keeps the crate free of an ASN.1 dependency for four fixed shapes.

/// `rsaEncryption` (1.2.840.113549.1.1.1).
const OID_RSA_ENCRYPTION: &[u8] = &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// `id-ecPublicKey` (1.2.840.10045.2.1).
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// `prime256v1` (1.2.840.10045.3.1.7), also the DER value of `CKA_EC_PARAMS` for P-256.
pub(crate) const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Uncompressed P-256 point: `0x04 || X || Y`.
pub(crate) const P256_POINT_LEN: usize = 65;
/// Raw ECDSA P-256 signature from `CKM_ECDSA`: `r || s`, 32 bytes each.
pub(crate) const P256_RAW_SIG_LEN: usize = 64;

const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_NULL: u8 = 0x05;
const TAG_SEQUENCE: u8 = 0x30;

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        // Short form; the cast cannot truncate below 0x80.
        out.push(len as u8);
        return;
    }
    let bytes = len.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    let significant = &bytes[skip..];
    out.push(0x80 | significant.len() as u8);
    out.extend_from_slice(significant);
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    push_len(&mut out, content.len());
    out.extend_from_slice(content);
    out
}

/// A non-negative INTEGER from big-endian magnitude bytes: leading zeros stripped, one zero added back when the
/// top bit is set so the value is not read as negative.
fn unsigned_integer(magnitude: &[u8]) -> Vec<u8> {
    let skip = magnitude.iter().take_while(|b| **b == 0).count();
    let trimmed = &magnitude[skip..];
    let mut content = Vec::with_capacity(trimmed.len() + 1);
    if trimmed.first().is_none_or(|b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(trimmed);
    tlv(TAG_INTEGER, &content)
}

fn bit_string(content: &[u8]) -> Vec<u8> {
    let mut inner = Vec::with_capacity(content.len() + 1);
    inner.push(0); // no unused bits
    inner.extend_from_slice(content);
    tlv(TAG_BIT_STRING, &inner)
}

/// `SubjectPublicKeyInfo` of an RSA key from `CKA_MODULUS` and `CKA_PUBLIC_EXPONENT` (big-endian).
pub(crate) fn rsa_spki(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    let mut rsa_public_key = unsigned_integer(modulus);
    rsa_public_key.extend_from_slice(&unsigned_integer(exponent));
    let rsa_public_key = tlv(TAG_SEQUENCE, &rsa_public_key);
    let mut algorithm = OID_RSA_ENCRYPTION.to_vec();
    algorithm.extend_from_slice(&[TAG_NULL, 0]);
    let mut spki = tlv(TAG_SEQUENCE, &algorithm);
    spki.extend_from_slice(&bit_string(&rsa_public_key));
    tlv(TAG_SEQUENCE, &spki)
}

/// `SubjectPublicKeyInfo` of a P-256 key from its uncompressed point.
pub(crate) fn ec_p256_spki(point: &[u8]) -> Vec<u8> {
    let mut algorithm = OID_EC_PUBLIC_KEY.to_vec();
    algorithm.extend_from_slice(OID_P256);
    let mut spki = tlv(TAG_SEQUENCE, &algorithm);
    spki.extend_from_slice(&bit_string(point));
    tlv(TAG_SEQUENCE, &spki)
}

/// The uncompressed point inside `CKA_EC_POINT`. PKCS#11 says the attribute is a DER OCTET STRING (SoftHSM:
/// `04 41 04 X Y`), but some tokens return the bare point; the lengths (67 vs 65) tell them apart.
pub(crate) fn ec_point(attribute: &[u8]) -> Option<&[u8]> {
    let point = match attribute {
        [TAG_OCTET_STRING, len, rest @ ..] if usize::from(*len) == P256_POINT_LEN && rest.len() == P256_POINT_LEN => {
            rest
        }
        bare if bare.len() == P256_POINT_LEN => bare,
        _ => return None,
    };
    (point[0] == 0x04).then_some(point)
}

/// DER `Ecdsa-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }` from the raw `r || s` a token returns for
/// `CKM_ECDSA`. The software backend emits DER, so verifiers see one format whichever backend signed.
pub(crate) fn ecdsa_raw_to_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() != P256_RAW_SIG_LEN {
        return None;
    }
    let (r, s) = raw.split_at(P256_RAW_SIG_LEN / 2);
    let mut content = unsigned_integer(r);
    content.extend_from_slice(&unsigned_integer(s));
    Some(tlv(TAG_SEQUENCE, &content))
}

/// The number of significant bits of a big-endian magnitude (an RSA modulus from `CKA_MODULUS`).
pub(crate) fn bit_len(magnitude: &[u8]) -> usize {
    let skip = magnitude.iter().take_while(|b| **b == 0).count();
    match magnitude.get(skip) {
        Some(first) => (magnitude.len() - skip) * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_use_short_and_long_forms() {
        let mut out = Vec::new();
        push_len(&mut out, 0x7f);
        push_len(&mut out, 0x80);
        push_len(&mut out, 0x1234);
        assert_eq!(out, vec![0x7f, 0x81, 0x80, 0x82, 0x12, 0x34]);
    }

    #[test]
    fn integers_are_minimal_and_non_negative() {
        assert_eq!(unsigned_integer(&[0, 0, 1]), vec![0x02, 0x01, 0x01]);
        assert_eq!(unsigned_integer(&[0x80]), vec![0x02, 0x02, 0x00, 0x80]);
        assert_eq!(unsigned_integer(&[0, 0x7f, 0xff]), vec![0x02, 0x02, 0x7f, 0xff]);
        assert_eq!(unsigned_integer(&[0, 0]), vec![0x02, 0x01, 0x00]);
    }

    #[test]
    fn ecdsa_signatures_become_der() {
        let mut raw = [0u8; 64];
        raw[0] = 0x80; // r needs a leading zero
        raw[31] = 1;
        raw[63] = 2; // s is small: 31 leading zeros stripped
        let der = ecdsa_raw_to_der(&raw).unwrap_or_default();
        let mut expected = vec![0x30, 33 + 2 + 3, 0x02, 33, 0x00, 0x80];
        expected.extend_from_slice(&[0u8; 30]);
        expected.push(1);
        expected.extend_from_slice(&[0x02, 0x01, 0x02]);
        assert_eq!(der, expected);
        assert!(ecdsa_raw_to_der(&raw[..63]).is_none());
    }

    #[test]
    fn ec_points_are_unwrapped_in_both_forms() {
        let mut point = vec![0x04];
        point.extend_from_slice(&[7u8; 64]);
        let mut wrapped = vec![0x04, 0x41];
        wrapped.extend_from_slice(&point);
        assert_eq!(ec_point(&wrapped), Some(point.as_slice()));
        assert_eq!(ec_point(&point), Some(point.as_slice()));
        assert_eq!(ec_point(&wrapped[..66]), None);
        let mut compressed = point.clone();
        compressed[0] = 0x02;
        assert_eq!(ec_point(&compressed), None);
    }

    #[test]
    fn modulus_bits() {
        assert_eq!(bit_len(&[0, 0x80, 0]), 16);
        assert_eq!(bit_len(&[0x01, 0]), 9);
        assert_eq!(bit_len(&[0, 0]), 0);
        let mut m = vec![0u8];
        m.extend_from_slice(&[0xff; 256]);
        assert_eq!(bit_len(&m), 2048);
    }

    #[test]
    fn spki_shapes() {
        let spki = rsa_spki(&[0xc1; 256], &[1, 0, 1]);
        // SEQUENCE (long form) { SEQUENCE { OID, NULL }, BIT STRING { 00, SEQUENCE { INTEGER, INTEGER } } }
        assert_eq!(&spki[..4], &[0x30, 0x82, 0x01, 0x22]);
        assert_eq!(spki.len(), 0x122 + 4);
        assert_eq!(&spki[4..6], &[0x30, 0x0d]);
        assert_eq!(&spki[6..17], OID_RSA_ENCRYPTION);
        assert!(spki.ends_with(&[0x02, 0x03, 0x01, 0x00, 0x01]));

        let mut point = vec![0x04];
        point.extend_from_slice(&[9u8; 64]);
        let spki = ec_p256_spki(&point);
        assert_eq!(spki.len(), 91);
        assert_eq!(&spki[..4], &[0x30, 0x59, 0x30, 0x13]);
        assert!(spki.ends_with(&point));
    }
}

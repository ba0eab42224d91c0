//! The Advance* ciphertext blob: `'$' | (cipherVer<<4)|padding | algorithm | 36-byte key version id |
//! 12-byte IV | ciphertext‖tag`. Carrying the version id lets AdvanceDecrypt work without a KeyId and after a
//! rotation.

use uuid::Uuid;

pub const MAGIC: u8 = b'$';
/// Cipher version 0, no padding.
pub const VERSION_AND_PADDING: u8 = 0x00;
pub const ALG_AES_GCM: u8 = 0x02;
pub const VERSION_ID_LEN: usize = 36;
pub const IV_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 3 + VERSION_ID_LEN + IV_LEN;

/// A parsed Advance blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvanceBlob {
    pub version: Uuid,
    pub iv: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub tag: Vec<u8>,
}

pub fn encode(version: Uuid, iv: &[u8], ciphertext: &[u8], tag: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + ciphertext.len() + tag.len());
    out.extend_from_slice(&[MAGIC, VERSION_AND_PADDING, ALG_AES_GCM]);
    out.extend_from_slice(version.hyphenated().to_string().as_bytes());
    out.extend_from_slice(iv);
    out.extend_from_slice(ciphertext);
    out.extend_from_slice(tag);
    out
}

/// `None` when the bytes are not an Advance AES-GCM blob.
pub fn decode(blob: &[u8]) -> Option<AdvanceBlob> {
    if blob.len() < HEADER_LEN + TAG_LEN || blob[0] != MAGIC || blob[1] != VERSION_AND_PADDING || blob[2] != ALG_AES_GCM
    {
        return None;
    }
    let id = std::str::from_utf8(&blob[3..3 + VERSION_ID_LEN]).ok()?;
    let version = Uuid::parse_str(id).ok()?;
    let iv = blob[3 + VERSION_ID_LEN..HEADER_LEN].to_vec();
    let body = &blob[HEADER_LEN..];
    let (ct, tag) = body.split_at(body.len() - TAG_LEN);
    Some(AdvanceBlob { version, iv, ciphertext: ct.to_vec(), tag: tag.to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let v = Uuid::new_v4();
        let b = encode(v, &[7; 12], b"abc", &[9; 16]);
        assert_eq!(b[0], b'$');
        assert_eq!(&b[3..39], v.to_string().as_bytes());
        let d = decode(&b).expect("decodes");
        assert_eq!(d, AdvanceBlob { version: v, iv: vec![7; 12], ciphertext: b"abc".to_vec(), tag: vec![9; 16] });
        assert!(decode(&b[..b.len() - 4]).is_none(), "shorter than header and tag");
        let mut bad = b.clone();
        bad[2] = 0x05;
        assert!(decode(&bad).is_none());
        assert!(decode(b"$\x00\x02short").is_none());
    }
}

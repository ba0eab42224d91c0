//! EME-OAEP decoding (RFC 8017 §7.1.2) with SHA-256, MGF1-SHA-256 and an empty label, for tokens whose
//! `CKM_RSA_PKCS_OAEP` only accepts SHA-1 (SoftHSM 2.6 returns `CKR_ARGUMENTS_BAD` for SHA-256). The token then
//! performs the raw private-key operation (`CKM_RSA_X_509`) and this module removes the padding.
//!
//! The decoder is constant-time in everything that decides validity: which check fails must not be observable,
//! or the token becomes a padding oracle (Manger's attack needs only to tell "first byte not zero" apart).

use aws_lc_rs::digest::{Context, SHA256, digest};
use zeroize::Zeroizing;

const HASH_LEN: usize = 32;

/// XORs `MGF1-SHA256(seed)` into `out`.
fn mgf1_xor(out: &mut [u8], seed: &[u8]) {
    for (counter, chunk) in (0u32..).zip(out.chunks_mut(HASH_LEN)) {
        let mut ctx = Context::new(&SHA256);
        ctx.update(seed);
        ctx.update(&counter.to_be_bytes());
        let mask = ctx.finish();
        for (o, m) in chunk.iter_mut().zip(mask.as_ref()) {
            *o ^= m;
        }
    }
}

/// All ones when `a == b`, else zero, without a data-dependent branch.
fn ct_eq_u8(a: u8, b: u8) -> u8 {
    let x = u32::from(a ^ b);
    // x - 1 underflows (sets the top bit) exactly when x == 0.
    (x.wrapping_sub(1) >> 31) as u8 * 0xff
}

fn ct_select_usize(mask: u8, a: usize, b: usize) -> usize {
    let m = usize::from(mask & 1).wrapping_neg();
    (a & m) | (b & !m)
}

/// Decodes `em`, the raw RSA output for a `k`-byte modulus (left-padded with zeros if the token stripped them).
/// `None` for any malformed encoding, without saying which check failed.
pub(crate) fn decode_sha256(em: &[u8], k: usize) -> Option<Zeroizing<Vec<u8>>> {
    if k < 2 * HASH_LEN + 2 || em.len() > k {
        return None;
    }
    let mut padded = Zeroizing::new(vec![0u8; k]);
    padded[k - em.len()..].copy_from_slice(em);
    let (first, rest) = padded.split_at_mut(1);
    let (masked_seed, masked_db) = rest.split_at_mut(HASH_LEN);

    let mut seed = Zeroizing::new(masked_seed.to_vec());
    mgf1_xor(&mut seed, masked_db);
    mgf1_xor(masked_db, &seed);
    let db = masked_db;

    let label_hash = digest(&SHA256, b"");
    let mut good = ct_eq_u8(first[0], 0);
    for (a, b) in db[..HASH_LEN].iter().zip(label_hash.as_ref()) {
        good &= ct_eq_u8(*a, *b);
    }

    // Find the 0x01 separator after the zero padding, touching every byte.
    let mut looking = 0xffu8;
    let mut invalid = 0u8;
    let mut one_index = 0usize;
    for (i, byte) in db.iter().enumerate().skip(HASH_LEN) {
        let is_one = ct_eq_u8(*byte, 1);
        let is_zero = ct_eq_u8(*byte, 0);
        one_index = ct_select_usize(looking & is_one, i, one_index);
        invalid |= looking & !is_zero & !is_one;
        looking &= !is_one;
    }
    good &= !looking & !invalid;
    // Only validity leaves here; the separator position is revealed only for a valid encoding, where the
    // message length is public anyway.
    if good != 0xff {
        return None;
    }
    Some(Zeroizing::new(db[one_index + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// EME-OAEP encoding with a fixed seed, for building test inputs (the independent check is the SoftHSM
    /// test that decrypts aws-lc-rs OAEP ciphertexts through this decoder).
    fn encode(message: &[u8], k: usize, seed: [u8; HASH_LEN]) -> Vec<u8> {
        let mut db = digest(&SHA256, b"").as_ref().to_vec();
        db.resize(k - HASH_LEN - 1 - message.len() - 1, 0);
        db.push(1);
        db.extend_from_slice(message);
        let mut masked_db = db;
        mgf1_xor(&mut masked_db, &seed);
        let mut masked_seed = seed.to_vec();
        mgf1_xor(&mut masked_seed, &masked_db);
        let mut em = vec![0u8];
        em.extend_from_slice(&masked_seed);
        em.extend_from_slice(&masked_db);
        em
    }

    #[test]
    fn round_trips_including_empty_and_maximal_messages() {
        for len in [0usize, 1, 32, 256 - 2 * 32 - 2] {
            let msg: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let em = encode(&msg, 256, [3u8; 32]);
            assert_eq!(decode_sha256(&em, 256).as_deref().map(Vec::as_slice), Some(msg.as_slice()), "len {len}");
            // A token may strip the leading zero byte.
            assert_eq!(decode_sha256(&em[1..], 256).as_deref().map(Vec::as_slice), Some(msg.as_slice()));
        }
    }

    #[test]
    fn every_defect_is_rejected_alike() {
        let em = encode(b"secret", 256, [5u8; 32]);
        let mut first_byte = em.clone();
        first_byte[0] = 1;
        assert!(decode_sha256(&first_byte, 256).is_none());
        for i in [1usize, 20, 40, 100, 255] {
            let mut flipped = em.clone();
            flipped[i] ^= 0x10;
            assert!(decode_sha256(&flipped, 256).is_none(), "flip at {i}");
        }
        // A truncated encoding unmasks to garbage.
        let mut truncated = encode(b"", 256, [5u8; 32]);
        truncated.truncate(255);
        assert!(decode_sha256(&truncated, 255).is_none());
        assert!(decode_sha256(&[0u8; 300], 256).is_none());
        assert!(decode_sha256(&em, 60).is_none());
    }

    #[test]
    fn constant_time_helpers() {
        assert_eq!(ct_eq_u8(7, 7), 0xff);
        assert_eq!(ct_eq_u8(7, 8), 0);
        assert_eq!(ct_eq_u8(0, 0x80), 0);
        assert_eq!(ct_select_usize(0xff, 1, 2), 1);
        assert_eq!(ct_select_usize(0, 1, 2), 2);
    }
}

//! kmsgate-hsm: key backends behind core's [`KeyBackend`](kmsgate_core::KeyBackend) trait.
//!
//! This crate holds the **PKCS#11** backend ([`Pkcs11Backend`], one per HSM fleet member; see its module docs and
//! `docs/hsm.md`) and the **software** backend ([`SoftwareBackend`]), the embedded default. All crypto goes
//! through aws-lc-rs: AES-256-GCM (caller IV of 12 bytes, AAD, output `ciphertext || 16-byte tag`), RSA-2048/3072
//! (PKCS#1 v1.5 and PSS signatures over a SHA-256 digest, PSS with MGF1-SHA-256 and a 32-byte salt;
//! RSAES-OAEP-SHA-256 with MGF1-SHA-256), ECDSA P-256 with SHA-256 (DER `Ecdsa-Sig-Value` signatures),
//! HMAC-SHA-256 and random bytes. Public keys are exported as DER `SubjectPublicKeyInfo`.
//!
//! # Root key
//!
//! Key material is never stored in clear: each key version's material is sealed under a root key ([`Kek`]),
//! 32 random bytes kept as base64 text in a file ([`Kek::from_file`], created by [`Kek::generate_file`] with mode
//! 0600) or an environment variable ([`Kek::from_env`]). The root key is not used directly; from it are derived
//!
//! - the **wrapping key**: HKDF-SHA-256 with salt `kmsgate/software-kek/v1`, info
//!   `kmsgate/software-kek/handle-wrap-key/v1`, 32 bytes, used as an AES-256-GCM key;
//! - the **fingerprint**: the first 8 bytes of SHA-256(`kmsgate/software-kek/fingerprint/v1\0` || root key).
//!   It identifies the root key in handles and logs without revealing anything about it.
//!
//! Losing the root key loses every software key; replacing it makes existing handles fail with a clear error.
//!
//! # Handle format (version 1)
//!
//! The handle the store records for a software key version is:
//!
//! | offset | length | content |
//! |---|---|---|
//! | 0 | 1 | format byte, `0x01` |
//! | 1 | 8 | root key fingerprint |
//! | 9 | 12 | random nonce |
//! | 21 | n | AES-256-GCM encryption of the material under the wrapping key |
//! | 21 + n | 16 | GCM tag |
//!
//! The material is the 32 raw key bytes for `AES_256` and `HMAC_256` (handle: 69 bytes) and a PKCS#8 v1 DER
//! private key for `RSA_2048`, `RSA_3072` and `EC_P256` (handles of about 1.25 KB, 1.8 KB and 175 bytes;
//! imported keys are re-encoded canonically, dropping PKCS#8 attributes).
//!
//! The additional authenticated data binds the handle to its key version:
//!
//! ```text
//! "kmsgate/software-handle/v1\0" || format byte || fingerprint
//!   || u16 big-endian length of the key id || key id (UTF-8)
//!   || version UUID (16 bytes) || u8 length of the spec name || spec name ("AES_256", "RSA_2048", ...)
//! ```
//!
//! Unwrapping fails, without producing any material, when:
//!
//! | cause | error kind | message |
//! |---|---|---|
//! | empty handle (external key awaiting import) | `InvalidKeyState(PendingImport)` | the key version has no key material yet |
//! | fingerprint of another root key | `DependencyFailure` | the root key does not match the one this key was wrapped under |
//! | handle moved to another key id, version or spec, or altered | `Internal` | the key handle does not authenticate for this key version |
//! | truncated handle or unknown format byte | `Internal` | the key handle is malformed or of an unknown format |
//!
//! A moved or altered handle is `Internal` rather than `DependencyFailure` because it means the stored record
//! is not what this backend wrote: retrying cannot help, and `DependencyFailure` is marked retryable.
//!
//! # Performance
//!
//! Unwrapped keys are kept ready (scheduled AES keys, parsed RSA/EC key pairs, HMAC keys) in a bounded cache
//! keyed by the version UUID and a digest of (key id, version, spec, handle), so a handle presented under another
//! identity never reuses an entry. RSA key generation, RSA private-key operations and RSA key parsing run on
//! tokio's blocking pool; AES-GCM and HMAC over inputs up to 64 KiB, ECDSA and public-key operations run inline.

#![forbid(unsafe_code)]

mod handle;
mod kek;
mod pkcs11;
mod software;

/// The cryptoki version this crate is built on, for callers of [`Pkcs11Backend::with_session`].
pub use cryptoki;
pub use kek::{FINGERPRINT_LEN, KEK_LEN, Kek};
pub use pkcs11::{
    AdoptBy, AdoptedKey, LibraryInfo, Pkcs11Backend, Pkcs11Config, Pkcs11Status, PoolStatus, SlotStatus, TokenSummary,
};
pub use software::{SoftwareBackend, SoftwareConfig};

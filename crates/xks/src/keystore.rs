//! Logical key stores and their SigV4 credentials, as core documents in the store (so every replica and the
//! CLI agree, and changes reach running servers through the change feed without a restart).
//!
//! - `xks.keystore/<name>`: tenant, URI path, allowed keys, quota, secondary-authorization rules.
//! - `xks.uripath/<uri path>`: the index from URI path to key store; inserting it with `Precondition::Absent`
//!   is what makes URI paths unique across key stores.
//! - `xks.credential/<AccessKeyId>`: the key store it belongs to and the secret access key sealed under the
//!   tenant's internal sealing key (bound to `xks.credential/<AccessKeyId>`).

use serde::{Deserialize, Serialize};

use crate::rules::Rules;

pub const KIND_STORE: &str = "xks.keystore";
pub const KIND_PATH: &str = "xks.uripath";
pub const KIND_CREDENTIAL: &str = "xks.credential";

/// The fixed tail of every XKS URI path (API version 1).
pub const API_SUFFIX: &str = "/kms/xks/v1";

/// Most segments a prefix may have. The spec only bounds the length (128); the router matches each depth
/// with its own route pattern and allows 25 parameters per pattern, and real prefixes have one to three.
pub const MAX_PREFIX_SEGMENTS: usize = 24;

/// A key store's request quota: a token bucket per replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Sustained requests per second.
    pub rps: u32,
    /// Bucket size: requests allowed in a burst above the sustained rate.
    pub burst: u32,
}

/// The body of an `xks.keystore` document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStoreBody {
    pub uri_path: String,
    /// Every AES key of the tenant (internal ones excepted) is reachable.
    #[serde(default)]
    pub all_keys: bool,
    /// Otherwise only these key ids or aliases.
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub quota: Option<Quota>,
    #[serde(default)]
    pub rules: Rules,
}

/// The body of an `xks.uripath` document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathBody {
    pub store: String,
}

/// The body of an `xks.credential` document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialBody {
    pub store: String,
    /// Base64 of `Dispatcher::seal(tenant, "xks.credential/<AKID>", secret)`.
    pub sealed_secret: String,
    /// RFC 3339.
    pub created_at: String,
}

/// The seal purpose of a credential's secret: binds the sealed value to its record.
pub fn seal_purpose(access_key_id: &str) -> String {
    format!("{KIND_CREDENTIAL}/{access_key_id}")
}

/// Key store names: 1-64 of `A-Za-z0-9 . _ -`.
pub fn valid_store_name(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `XksProxyUriPath` as KMS accepts it: 10-128 characters of `A-Za-z0-9 / _ -`, ending in `/kms/xks/v1`,
/// starting with `/`, without empty segments; and at most [`MAX_PREFIX_SEGMENTS`] prefix segments.
pub fn valid_uri_path(s: &str) -> bool {
    (10..=128).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-'))
        && s.starts_with('/')
        && s.ends_with(API_SUFFIX)
        && !s.contains("//")
        && s.matches('/').count() - 3 <= MAX_PREFIX_SEGMENTS
}

/// Turns the CLI's `--prefix` (`/tenant-a`, `tenant-a`, `` or a full path ending in `/kms/xks/v1`) into the
/// URI path, or `None` if the result is not a valid path.
pub fn uri_path_from_prefix(prefix: &str) -> Option<String> {
    let trimmed = prefix.trim();
    let path = if trimmed.ends_with(API_SUFFIX) {
        trimmed.to_owned()
    } else {
        let p = trimmed.trim_end_matches('/');
        let p = if p.is_empty() || p.starts_with('/') { p.to_owned() } else { format!("/{p}") };
        format!("{p}{API_SUFFIX}")
    };
    valid_uri_path(&path).then_some(path)
}

/// AccessKeyId as KMS accepts it: 20-30 characters of `A-Z2-7`.
pub fn valid_access_key_id(s: &str) -> bool {
    (20..=30).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
}

/// RawSecretAccessKey as KMS accepts it: 43-64 characters of `A-Za-z0-9 / + =`.
pub fn valid_secret(s: &str) -> bool {
    (43..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'+' | b'='))
}

/// RFC 4648 base32 without padding: random bytes to an AccessKeyId that says nothing about the secret.
pub fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len() * 8 / 5 + 1);
    let mut buffer: u32 = 0;
    let mut bits = 0u32;
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_paths() {
        assert!(valid_uri_path("/kms/xks/v1"));
        assert!(valid_uri_path("/keystores/4a0d79d6-1d1b-49fd-9dbe-799cb9c0fb3f/kms/xks/v1"));
        assert!(!valid_uri_path("/kms/xks/v2"));
        assert!(!valid_uri_path("kms/xks/v1/x/kms/xks/v1"));
        assert!(!valid_uri_path("/a b/kms/xks/v1"));
        assert!(!valid_uri_path("/a.b/kms/xks/v1"));
        assert!(!valid_uri_path("//kms/xks/v1"));
        assert!(!valid_uri_path(&format!("/{}{API_SUFFIX}", "a".repeat(117))));
        assert!(valid_uri_path(&format!("/{}{API_SUFFIX}", "a".repeat(116))));
        assert!(valid_uri_path(&format!("{}{API_SUFFIX}", "/a".repeat(24))));
        assert!(!valid_uri_path(&format!("{}{API_SUFFIX}", "/a".repeat(25))));
        assert_eq!(uri_path_from_prefix("/tenant-a").as_deref(), Some("/tenant-a/kms/xks/v1"));
        assert_eq!(uri_path_from_prefix("tenant-a/").as_deref(), Some("/tenant-a/kms/xks/v1"));
        assert_eq!(uri_path_from_prefix("").as_deref(), Some("/kms/xks/v1"));
        assert_eq!(uri_path_from_prefix("/x/kms/xks/v1").as_deref(), Some("/x/kms/xks/v1"));
        assert_eq!(uri_path_from_prefix("/bad prefix"), None);
    }

    #[test]
    fn credential_formats() {
        assert!(valid_access_key_id("AKIAI2SFODNN7EXAMPLE"));
        assert!(!valid_access_key_id("AKIAI2SFODNN7EXAMPL"));
        assert!(!valid_access_key_id("akiai2sfodnn7example"));
        assert!(!valid_access_key_id("AKIAI2SFODNN7EXAMPL1"));
        assert!(valid_secret("FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE"));
        assert!(!valid_secret("short"));
        assert!(!valid_secret(&"-".repeat(44)));
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(&[0xff; 15]).len(), 24);
        assert!(valid_access_key_id(&base32(&[0x5a; 15])));
        assert!(valid_store_name("store-1.a_b"));
        assert!(!valid_store_name("store/1"));
        assert!(!valid_store_name(""));
    }
}

//! Request authentication: `content-sha256`, the `date` window, and the RSA PKCS#1 v1.5 SHA-256 `Bearer`
//! signature of the ClientKey over the string to sign; plus a replay cache of (ClientKey id, signature).

use std::time::{Duration, SystemTime};

use aws_lc_rs::digest;
use aws_lc_rs::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use moka::future::Cache;

use crate::clientkey::ClientKeyBody;
use crate::error::AliError;

pub const API_VERSION: &str = "dkms-gcs-0.2";
pub const SIGNATURE_METHOD: &str = "RSA_PKCS1_SHA_256";
/// Three "c"s: the header name is part of the protocol as the SDKs send it.
pub const ACCESS_KEY_HEADER: &str = "x-kms-acccesskeyid";

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The string the SDK signs: method, body hash, content type, date, the sorted `x-kms-*` headers and the
/// literal resource `/`.
pub fn string_to_sign(headers: &HeaderMap) -> String {
    let mut kms: Vec<(String, String)> = headers
        .iter()
        .filter(|(n, _)| n.as_str().starts_with("x-kms-"))
        .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.as_str().to_owned(), v.trim().to_owned())))
        .collect();
    kms.sort();
    let mut s = String::with_capacity(256);
    s.push_str("POST\n");
    s.push_str(header(headers, "content-sha256").unwrap_or(""));
    s.push('\n');
    s.push_str(header(headers, "content-type").unwrap_or(""));
    s.push('\n');
    s.push_str(header(headers, "date").unwrap_or(""));
    s.push('\n');
    for (n, v) in kms {
        s.push_str(&n);
        s.push(':');
        s.push_str(&v);
        s.push('\n');
    }
    s.push('/');
    s
}

/// The checks that need no ClientKey, in the order the vendor reports them. Returns the ClientKey id.
pub fn precheck<'a>(headers: &'a HeaderMap, body: &[u8], now: SystemTime, skew: Duration) -> Result<&'a str, AliError> {
    match header(headers, "x-kms-apiversion") {
        Some(API_VERSION) => {}
        Some(v) => return Err(AliError::invalid_api_version(v)),
        None => return Err(AliError::invalid_api_version("")),
    }
    match header(headers, "x-kms-signaturemethod") {
        Some(SIGNATURE_METHOD) => {}
        Some(v) => {
            let shown = if v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()) { v } else { "?" };
            return Err(AliError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "InvalidParam",
                format!("The Param x-kms-signaturemethod is invalid. message:\"{shown}\"."),
            ));
        }
        None => return Err(AliError::invalid_param("x-kms-signaturemethod")),
    }
    let key_id = match header(headers, ACCESS_KEY_HEADER) {
        Some(k) if !k.is_empty() => k,
        _ => return Err(AliError::missing_parameter(ACCESS_KEY_HEADER)),
    };
    let date = header(headers, "date").ok_or_else(|| AliError::invalid_param("Date"))?;
    let at = httpdate::parse_http_date(date).map_err(|_| AliError::invalid_param("Date"))?;
    let off = at.duration_since(now).or_else(|_| now.duration_since(at)).unwrap_or(Duration::MAX);
    if off > skew {
        return Err(AliError::time_skewed());
    }
    let sent = header(headers, "content-sha256").ok_or_else(|| AliError::missing_parameter("content-sha256"))?;
    let actual = hex::encode_upper(digest::digest(&digest::SHA256, body));
    // The body hash is public information; no constant-time compare is needed.
    if !sent.eq_ignore_ascii_case(&actual) {
        return Err(AliError::invalid_param("content-sha256"));
    }
    if header(headers, "authorization").is_none() {
        return Err(AliError::invalid_param("Authorization"));
    }
    Ok(key_id)
}

/// Verifies the `Bearer` signature with the ClientKey's public key; returns the raw signature (for the replay
/// cache).
pub fn verify_signature(headers: &HeaderMap, key: &ClientKeyBody) -> Result<Vec<u8>, AliError> {
    let auth = header(headers, "authorization").ok_or_else(|| AliError::invalid_param("Authorization"))?;
    let b64 = auth.strip_prefix("Bearer ").ok_or_else(|| AliError::invalid_param("Authorization"))?;
    let signature = STANDARD.decode(b64.trim()).map_err(|_| AliError::invalid_param("Authorization"))?;
    let public = key.public_key_der().map_err(|_| AliError::internal())?;
    let sts = string_to_sign(headers);
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public)
        .verify(sts.as_bytes(), &signature)
        .map_err(|_| AliError::signature_not_match())?;
    Ok(signature)
}

/// Recently seen (ClientKey id, SHA-256 of signature) pairs: a signed request cannot be played again while its
/// date is still acceptable.
#[derive(Debug, Clone)]
pub struct ReplayCache {
    seen: Cache<(String, [u8; 32]), ()>,
}

impl ReplayCache {
    pub fn new(window: Duration) -> Self {
        // A date may be up to `window` in the future or the past: remember for both sides of it.
        ReplayCache { seen: Cache::builder().max_capacity(1_000_000).time_to_live(window.saturating_mul(2)).build() }
    }

    /// True when the pair is new (and now remembered).
    pub async fn first_use(&self, key_id: &str, signature: &[u8]) -> bool {
        let d = digest::digest(&digest::SHA256, signature);
        let mut h = [0u8; 32];
        h.copy_from_slice(d.as_ref());
        self.seen.entry((key_id.to_owned(), h)).or_insert(()).await.is_fresh()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn string_to_sign_matches_the_captured_layout() {
        let mut h = HeaderMap::new();
        h.insert("content-sha256", HeaderValue::from_static("ABCD"));
        h.insert("content-type", HeaderValue::from_static("application/x-protobuf"));
        h.insert("date", HeaderValue::from_static("Sun, 22 Nov 2026 02:38:23 GMT"));
        h.insert("x-kms-apiversion", HeaderValue::from_static("dkms-gcs-0.2"));
        h.insert("x-kms-apiname", HeaderValue::from_static("Encrypt"));
        h.insert("x-kms-signaturemethod", HeaderValue::from_static("RSA_PKCS1_SHA_256"));
        h.insert("x-kms-acccesskeyid", HeaderValue::from_static("KAAP.x"));
        h.insert("accept", HeaderValue::from_static("application/x-protobuf"));
        assert_eq!(
            string_to_sign(&h),
            "POST\nABCD\napplication/x-protobuf\nSun, 22 Nov 2026 02:38:23 GMT\nx-kms-acccesskeyid:KAAP.x\n\
             x-kms-apiname:Encrypt\nx-kms-apiversion:dkms-gcs-0.2\nx-kms-signaturemethod:RSA_PKCS1_SHA_256\n/"
        );
    }

    #[tokio::test]
    async fn a_signature_is_accepted_once() {
        let c = ReplayCache::new(Duration::from_secs(60));
        assert!(c.first_use("KAAP.a", b"sig").await);
        assert!(!c.first_use("KAAP.a", b"sig").await);
        assert!(c.first_use("KAAP.b", b"sig").await);
    }
}

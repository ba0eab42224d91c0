//! Signed tokens and cursors. One random 256-bit key per installation, sealed by the key backend through the
//! dispatcher and stored as a document, so every replica signs and verifies alike; purpose-specific keys are
//! derived from it.

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The token prefix (the contract's opaque `svt_` form with an HMAC).
pub const TOKEN_PREFIX: &str = "svt_";

/// The signing keys derived from the installation key.
#[derive(Debug)]
pub struct Keys {
    token: hmac::Key,
    cursor: hmac::Key,
}

impl Keys {
    pub fn derive(root: &[u8]) -> Keys {
        let root = hmac::Key::new(hmac::HMAC_SHA256, root);
        let sub = |label: &[u8]| hmac::Key::new(hmac::HMAC_SHA256, hmac::sign(&root, label).as_ref());
        Keys { token: sub(b"kmsgate-secrets token v1"), cursor: sub(b"kmsgate-secrets cursor v1") }
    }

    pub fn sign_token(&self, claims: &Claims) -> String {
        format!("{TOKEN_PREFIX}{}", sign(&self.token, claims))
    }

    /// `None` when the value is not a token this installation signed (shape or signature).
    pub fn verify_token(&self, token: &str) -> Option<Claims> {
        verify(&self.token, token.strip_prefix(TOKEN_PREFIX)?)
    }

    pub fn sign_cursor(&self, c: &Cursor) -> String {
        sign(&self.cursor, c)
    }

    pub fn verify_cursor(&self, s: &str) -> Option<Cursor> {
        verify(&self.cursor, s)
    }
}

fn sign<T: Serialize>(key: &hmac::Key, value: &T) -> String {
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap_or_default());
    let tag = hmac::sign(key, body.as_bytes());
    format!("{body}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

fn verify<T: DeserializeOwned>(key: &hmac::Key, s: &str) -> Option<T> {
    if s.len() > 8192 {
        return None;
    }
    let (body, tag) = s.split_once('.')?;
    let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
    // Constant-time comparison inside aws-lc-rs.
    hmac::verify(key, body.as_bytes(), &tag).ok()?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).ok()?).ok()
}

/// What a bearer token asserts. Authorization data (roles, revocation) is looked up per request, by `jti`
/// and identity, so a revoked token or a demoted identity stops working on every replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub jti: String,
    /// The identity id.
    pub sub: String,
    /// The identity type: user, service_account.
    pub typ: String,
    pub tenant: String,
    pub partner: String,
    pub scopes: Vec<String>,
    /// Unix seconds.
    pub iat: i64,
    pub exp: i64,
    /// Authentication methods (`token`, plus `mfa` when minted with MFA).
    #[serde(default)]
    pub amr: Vec<String>,
    /// Unix seconds of the last MFA, as the issuer asserts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfa_verified_at: Option<i64>,
}

/// A listing position: last key, hash of the filters, tenant, expiry (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub k: String,
    pub f: String,
    pub t: String,
    pub e: i64,
}

/// A short stable hash of a listing's filters, so a cursor cannot be replayed with other filters.
pub fn filter_hash(parts: &[&str]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p.as_bytes());
    }
    URL_SAFE_NO_PAD.encode(&ctx.finish().as_ref()[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            jti: "tok_1".into(),
            sub: "ci".into(),
            typ: "service_account".into(),
            tenant: "default".into(),
            partner: "default".into(),
            scopes: vec!["secrets:read".into()],
            iat: 1,
            exp: 2,
            amr: vec!["token".into()],
            mfa_verified_at: None,
        }
    }

    #[test]
    fn tokens_round_trip_and_reject_tampering() {
        let k = Keys::derive(&[7; 32]);
        let t = k.sign_token(&claims());
        assert!(t.starts_with("svt_"));
        assert_eq!(k.verify_token(&t), Some(claims()));
        let other = Keys::derive(&[8; 32]);
        assert_eq!(other.verify_token(&t), None, "another installation's key");
        let mut forged = claims();
        forged.scopes.push("admin".into());
        let (_, sig) = t.rsplit_once('.').unwrap();
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(k.verify_token(&format!("svt_{body}.{sig}")), None);
        assert_eq!(k.verify_token("svt_garbage"), None);
        let c = Cursor { k: "a/b".into(), f: filter_hash(&["x"]), t: "default".into(), e: 9 };
        let s = k.sign_cursor(&c);
        assert_eq!(k.verify_cursor(&s), Some(c));
        assert_eq!(k.verify_token(&format!("svt_{s}")), None, "a cursor is not a token");
        assert_ne!(filter_hash(&["ab", "c"]), filter_hash(&["a", "bc"]));
    }
}

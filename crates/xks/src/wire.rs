//! Request bodies of the four operations and their validation (spec §API operations). Unknown fields are
//! ignored (KMS may add requestMetadata fields, Appendix B); `kmsOperation` is never validated.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use crate::error::XksError;

/// The four operations and the catch-all for anything else under a known prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Health,
    Metadata(String),
    Encrypt(String),
    Decrypt(String),
    Unknown,
}

impl Route {
    /// `rest` is the path after `/kms/xks/v1` (empty, or starting with `/`).
    pub fn parse(rest: &str) -> Route {
        if rest == "/health" {
            return Route::Health;
        }
        let Some(tail) = rest.strip_prefix("/keys/") else { return Route::Unknown };
        let Some((id, op)) = tail.split_once('/') else { return Route::Unknown };
        if id.is_empty() {
            return Route::Unknown;
        }
        match op {
            "metadata" => Route::Metadata(id.to_owned()),
            "encrypt" => Route::Encrypt(id.to_owned()),
            "decrypt" => Route::Decrypt(id.to_owned()),
            _ => Route::Unknown,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Route::Health => "GetHealthStatus",
            Route::Metadata(_) => "GetKeyMetadata",
            Route::Encrypt(_) => "Encrypt",
            Route::Decrypt(_) => "Decrypt",
            Route::Unknown => "Unknown",
        }
    }

    pub fn key_id(&self) -> Option<&str> {
        match self {
            Route::Metadata(k) | Route::Encrypt(k) | Route::Decrypt(k) => Some(k),
            Route::Health | Route::Unknown => None,
        }
    }
}

/// Which requestMetadata fields an operation requires (protocols/xks.md §1.2).
fn required_fields(route: &Route) -> &'static [&'static str] {
    match route {
        Route::Health => &["kmsOperation", "kmsRequestId"],
        Route::Metadata(_) => &["awsPrincipalArn", "kmsOperation", "kmsRequestId"],
        Route::Encrypt(_) | Route::Decrypt(_) => &["awsPrincipalArn", "kmsKeyArn", "kmsOperation", "kmsRequestId"],
        Route::Unknown => &[],
    }
}

/// Fields of the spec that must be strings when present.
const KNOWN_FIELDS: &[&str] =
    &["awsPrincipalArn", "awsSourceVpc", "awsSourceVpce", "kmsKeyArn", "kmsOperation", "kmsRequestId", "kmsViaService"];

/// Caps on what unknown metadata fields may add to audit records.
const MAX_EXTRA_FIELDS: usize = 16;
const MAX_FIELD_LEN: usize = 4096;

/// The request metadata as strings (audit, logs, secondary authorization).
pub fn request_metadata(route: &Route, md: Option<&Map<String, Value>>) -> Result<BTreeMap<String, String>, XksError> {
    let Some(md) = md else {
        return Err(XksError::validation("requestMetadata is required"));
    };
    let mut out = BTreeMap::new();
    for field in KNOWN_FIELDS {
        match md.get(*field) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                out.insert((*field).to_owned(), s.clone());
            }
            Some(_) => return Err(XksError::validation(format!("requestMetadata.{field} must be a string"))),
        }
    }
    for field in required_fields(route) {
        if !out.contains_key(*field) {
            return Err(XksError::validation(format!("requestMetadata.{field} is required")));
        }
    }
    // Fields KMS may add later are kept for audit when they are short strings; anything else is ignored.
    let mut extra = 0;
    for (k, v) in md {
        if KNOWN_FIELDS.contains(&k.as_str()) || extra >= MAX_EXTRA_FIELDS {
            continue;
        }
        if let Value::String(s) = v
            && k.len() <= 128
            && s.len() <= MAX_FIELD_LEN
        {
            out.insert(k.clone(), s.clone());
            extra += 1;
        }
    }
    Ok(out)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetadataOnly {
    #[serde(default)]
    pub request_metadata: Option<Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptBody {
    #[serde(default)]
    pub request_metadata: Option<Map<String, Value>>,
    #[serde(default)]
    pub plaintext: Option<String>,
    #[serde(default)]
    pub encryption_algorithm: Option<String>,
    #[serde(default)]
    pub additional_authenticated_data: Option<String>,
    #[serde(default)]
    pub ciphertext_data_integrity_value_algorithm: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecryptBody {
    #[serde(default)]
    pub request_metadata: Option<Map<String, Value>>,
    #[serde(default)]
    pub ciphertext: Option<String>,
    #[serde(default)]
    pub ciphertext_metadata: Option<String>,
    #[serde(default)]
    pub encryption_algorithm: Option<String>,
    #[serde(default)]
    pub additional_authenticated_data: Option<String>,
    #[serde(default)]
    pub initialization_vector: Option<String>,
    #[serde(default)]
    pub authentication_tag: Option<String>,
}

pub fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, XksError> {
    serde_json::from_slice(body).map_err(|e| {
        // serde's own message can quote the offending value (which may be key material): position only.
        XksError::validation(format!(
            "the request body is not valid JSON for this operation (line {}, column {})",
            e.line(),
            e.column()
        ))
    })
}

/// Decodes a required or optional Base64 field (standard alphabet, padded).
pub fn b64(field: &str, value: Option<&str>, required: bool) -> Result<Option<Vec<u8>>, XksError> {
    match value {
        None if required => Err(XksError::validation(format!("{field} is required"))),
        None => Ok(None),
        Some(v) => {
            STANDARD.decode(v).map(Some).map_err(|_| XksError::validation(format!("{field} is not valid Base64")))
        }
    }
}

/// The plaintext, decoded straight into a buffer that is wiped when dropped.
pub fn b64_secret(field: &str, value: Option<&str>) -> Result<Zeroizing<Vec<u8>>, XksError> {
    let v = value.ok_or_else(|| XksError::validation(format!("{field} is required")))?;
    STANDARD.decode(v).map(Zeroizing::new).map_err(|_| XksError::validation(format!("{field} is not valid Base64")))
}

pub fn require_aes_gcm(alg: Option<&str>) -> Result<(), XksError> {
    match alg {
        Some("AES_GCM") => Ok(()),
        Some(_) => Err(XksError::validation("encryptionAlgorithm must be AES_GCM")),
        None => Err(XksError::validation("encryptionAlgorithm is required")),
    }
}

/// Base64 size of `n` bytes.
pub fn b64_len(n: usize) -> usize {
    n.div_ceil(3).saturating_mul(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(Route::parse("/health"), Route::Health);
        assert_eq!(Route::parse("/keys/k-1/metadata"), Route::Metadata("k-1".into()));
        assert_eq!(Route::parse("/keys/k-1/encrypt"), Route::Encrypt("k-1".into()));
        assert_eq!(Route::parse("/keys/k-1/decrypt"), Route::Decrypt("k-1".into()));
        for bad in ["", "/", "/health/", "/keys//encrypt", "/keys/k/sign", "/keys/k/encrypt/x", "/invalid"] {
            assert_eq!(Route::parse(bad), Route::Unknown, "{bad}");
        }
    }

    #[test]
    fn metadata_requirements_per_operation() {
        let md = |v: Value| v.as_object().cloned();
        let health = md(serde_json::json!({"kmsOperation": "Anything", "kmsRequestId": "x"}));
        assert!(request_metadata(&Route::Health, health.as_ref()).is_ok());
        assert!(request_metadata(&Route::Metadata("k".into()), health.as_ref()).is_err());
        let enc = md(serde_json::json!({
            "awsPrincipalArn": "arn", "kmsOperation": "BulkEncryptOfTheFuture", "kmsRequestId": "x",
            "kmsKeyArn": "arn:k", "someNewField": "v", "nested": {"a": 1}
        }));
        let got = request_metadata(&Route::Encrypt("k".into()), enc.as_ref()).unwrap_or_default();
        assert_eq!(got.get("someNewField").map(String::as_str), Some("v"));
        assert!(!got.contains_key("nested"));
        let no_key_arn = md(serde_json::json!({"awsPrincipalArn": "a", "kmsOperation": "o", "kmsRequestId": "x"}));
        assert!(request_metadata(&Route::Decrypt("k".into()), no_key_arn.as_ref()).is_err());
        assert!(request_metadata(&Route::Metadata("k".into()), no_key_arn.as_ref()).is_ok());
        let wrong_type = md(serde_json::json!({"kmsOperation": 5, "kmsRequestId": "x"}));
        assert!(request_metadata(&Route::Health, wrong_type.as_ref()).is_err());
        assert!(request_metadata(&Route::Health, None).is_err());
    }

    #[test]
    fn base64_and_algorithms() {
        assert_eq!(b64("f", Some("SGVsbG8="), true).ok().flatten(), Some(b"Hello".to_vec()));
        assert!(b64("f", Some("SGVsbG8"), true).is_err(), "padding is required");
        assert!(b64("f", Some("SGV-bG8="), true).is_err(), "URL-safe alphabet is not Base64");
        assert!(b64("f", None, true).is_err());
        assert_eq!(b64("f", None, false).ok(), Some(None));
        assert!(require_aes_gcm(Some("AES_GCM")).is_ok());
        assert!(require_aes_gcm(Some("AES_CBC")).is_err());
        assert!(require_aes_gcm(None).is_err());
        assert_eq!(b64_len(4300), 5736);
        assert_eq!(b64_len(8192), 10924);
    }
}

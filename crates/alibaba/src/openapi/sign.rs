//! The two signature schemes of the OpenAPI.
//!
//! * v1 (aliyun-python-sdk-core; tea-openapi with `signature_algorithm="v2"`): `Signature` =
//!   base64(HMAC-SHA1(secret + "&", METHOD & "%2F" & percent(canonical query))) over every parameter but
//!   `Signature`, with `Timestamp` (UTC, `yyyy-MM-ddTHH:mm:ssZ`) and a unique `SignatureNonce`.
//! * ACS3-HMAC-SHA256 (tea-openapi's default): `Authorization: ACS3-HMAC-SHA256 Credential=<id>,
//!   SignedHeaders=<a;b;...>,Signature=<hex>` over the canonical request of the method, `/`, the canonical
//!   query, exactly the listed headers, and `x-acs-content-sha256`; with `x-acs-date` and
//!   `x-acs-signature-nonce`.
//!
//! Both reject a timestamp outside the window (`IllegalTimestamp`) and a nonce seen before within it
//! (`SignatureNonceUsed`, per replica). Signatures are compared in constant time.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use aws_lc_rs::{constant_time, digest, hmac};
use axum::http::{HeaderMap, Method};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use moka::future::Cache;

use super::error::OapiError;
use super::params::{Params, canonical_query, percent_encode};

pub const ACS3: &str = "ACS3-HMAC-SHA256";

/// What a request claims before its AccessKey is looked up.
#[derive(Debug)]
pub struct Claim {
    pub access_key_id: String,
    pub nonce: String,
    scheme: Scheme,
}

#[derive(Debug)]
enum Scheme {
    V1 { signature: Vec<u8> },
    Acs3 { signed_headers: Vec<String>, signature: Vec<u8>, content_sha256: String },
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Parses `yyyy-MM-ddTHH:mm:ssZ` (milliseconds tolerated) as UTC.
fn parse_utc(s: &str) -> Option<SystemTime> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    let secs = u64::try_from(t.unix_timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

fn check_time(value: Option<&str>, now: SystemTime, window: Duration) -> Result<(), OapiError> {
    let v = value.filter(|v| !v.is_empty()).ok_or_else(OapiError::timestamp_missing)?;
    let at = parse_utc(v).ok_or_else(|| {
        OapiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "IllegalTimestamp",
            "The specified time stamp is not in the UTC ISO 8601 format.",
        )
    })?;
    let off = at.duration_since(now).or_else(|_| now.duration_since(at)).unwrap_or(Duration::MAX);
    if off > window {
        return Err(OapiError::timestamp_expired());
    }
    Ok(())
}

/// The checks that need no secret: which scheme, its mandatory parts, the time window. An `Authorization`
/// header selects ACS3; otherwise the v1 parameters are required.
pub fn claim(
    headers: &HeaderMap,
    params: &Params,
    body: &[u8],
    now: SystemTime,
    window: Duration,
) -> Result<Claim, OapiError> {
    if let Some(auth) = header(headers, "authorization") {
        return claim_acs3(auth, headers, params, body, now, window);
    }
    let ak = params.opt("AccessKeyId").ok_or_else(|| OapiError::missing("AccessKeyId"))?;
    let sig = params
        .opt("Signature")
        .ok_or_else(|| OapiError::incomplete_signature("The parameter Signature is missing."))?;
    match params.opt("SignatureMethod") {
        Some("HMAC-SHA1") => {}
        Some(_) => return Err(OapiError::incomplete_signature("The SignatureMethod is not supported; use HMAC-SHA1.")),
        None => return Err(OapiError::incomplete_signature("The parameter SignatureMethod is missing.")),
    }
    match params.opt("SignatureVersion") {
        Some("1.0") => {}
        _ => return Err(OapiError::incomplete_signature("The SignatureVersion must be 1.0.")),
    }
    let nonce = params.opt("SignatureNonce").ok_or_else(|| OapiError::missing("SignatureNonce"))?;
    check_time(params.get("Timestamp"), now, window)?;
    let signature =
        STANDARD.decode(sig).map_err(|_| OapiError::incomplete_signature("The Signature is not base64."))?;
    Ok(Claim { access_key_id: ak.to_owned(), nonce: nonce.to_owned(), scheme: Scheme::V1 { signature } })
}

fn claim_acs3(
    auth: &str,
    headers: &HeaderMap,
    params: &Params,
    body: &[u8],
    now: SystemTime,
    window: Duration,
) -> Result<Claim, OapiError> {
    let bad = |what: &str| OapiError::incomplete_signature(what);
    let rest = auth
        .strip_prefix(ACS3)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or_else(|| bad("The Authorization header must use ACS3-HMAC-SHA256."))?;
    let mut credential = None;
    let mut signed = None;
    let mut signature = None;
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=').ok_or_else(|| bad("The Authorization header is malformed."))?;
        match k {
            "Credential" => credential = Some(v),
            "SignedHeaders" => signed = Some(v),
            "Signature" => signature = Some(v),
            _ => return Err(bad("The Authorization header is malformed.")),
        }
    }
    let (Some(credential), Some(signed), Some(signature)) = (credential, signed, signature) else {
        return Err(bad("The Authorization header lacks Credential, SignedHeaders or Signature."));
    };
    let signature = hex::decode(signature).map_err(|_| bad("The Signature is not hex."))?;
    let signed_headers: Vec<String> = signed.split(';').map(str::to_owned).collect();
    // The headers that bind the request must be signed, or they could be changed in flight.
    let mut sorted = signed_headers.clone();
    sorted.sort();
    sorted.dedup();
    if sorted != signed_headers {
        return Err(bad("SignedHeaders must be sorted, lower-case and unique."));
    }
    for required in
        ["host", "x-acs-action", "x-acs-version", "x-acs-date", "x-acs-signature-nonce", "x-acs-content-sha256"]
    {
        if !signed_headers.iter().any(|h| h == required) {
            return Err(bad(&format!("The header {required} must be signed.")));
        }
    }
    for name in headers.keys() {
        if name.as_str().starts_with("x-acs-") && !signed_headers.iter().any(|h| h == name.as_str()) {
            return Err(bad(&format!("The header {} must be signed.", name.as_str())));
        }
    }
    for h in &signed_headers {
        if !headers.contains_key(h.as_str()) {
            return Err(bad(&format!("The signed header {} is missing.", super::error::shown(h))));
        }
    }
    let action = header(headers, "x-acs-action").unwrap_or("");
    if params.opt("Action").is_some_and(|a| a != action) {
        return Err(OapiError::invalid("Action"));
    }
    check_time(header(headers, "x-acs-date"), now, window)?;
    let nonce = header(headers, "x-acs-signature-nonce")
        .filter(|v| !v.is_empty())
        .ok_or_else(|| OapiError::missing("x-acs-signature-nonce"))?;
    let content_sha256 = header(headers, "x-acs-content-sha256").unwrap_or("").to_owned();
    let actual = hex::encode(digest::digest(&digest::SHA256, body));
    if content_sha256 != actual {
        return Err(OapiError::invalid_msg("The x-acs-content-sha256 header does not match the request body."));
    }
    Ok(Claim {
        access_key_id: credential.to_owned(),
        nonce: nonce.to_owned(),
        scheme: Scheme::Acs3 { signed_headers, signature, content_sha256 },
    })
}

/// v1: the string to sign over every parameter but `Signature`.
pub fn v1_string_to_sign(method: &Method, params: &BTreeMap<String, String>) -> String {
    format!("{}&{}&{}", method.as_str(), percent_encode("/"), percent_encode(&canonical_query(params, &["Signature"])))
}

/// ACS3: `ACS3-HMAC-SHA256\n` + hex(SHA-256(canonical request)).
pub fn acs3_string_to_sign(
    method: &Method,
    path: &str,
    query: &BTreeMap<String, String>,
    headers: &HeaderMap,
    signed_headers: &[String],
    content_sha256: &str,
) -> String {
    let mut canonical = format!("{}\n{}\n{}\n", method.as_str(), path, canonical_query(query, &[]));
    for h in signed_headers {
        let mut values: Vec<&str> =
            headers.get_all(h.as_str()).iter().filter_map(|v| v.to_str().ok()).map(str::trim).collect();
        values.sort_unstable();
        canonical.push_str(h);
        canonical.push(':');
        canonical.push_str(&values.join(","));
        canonical.push('\n');
    }
    canonical.push('\n');
    canonical.push_str(&signed_headers.join(";"));
    canonical.push('\n');
    canonical.push_str(content_sha256);
    format!("{ACS3}\n{}", hex::encode(digest::digest(&digest::SHA256, canonical.as_bytes())))
}

/// Verifies the claimed signature with the AccessKey's secret. `query` holds only the query-string
/// parameters (what ACS3 signs); `params` every parameter (what v1 signs).
pub fn verify(
    claim: &Claim,
    secret: &[u8],
    method: &Method,
    path: &str,
    query: &BTreeMap<String, String>,
    params: &BTreeMap<String, String>,
    headers: &HeaderMap,
) -> Result<(), OapiError> {
    match &claim.scheme {
        Scheme::V1 { signature } => {
            let sts = v1_string_to_sign(method, params);
            let mut key = Vec::with_capacity(secret.len() + 1);
            key.extend_from_slice(secret);
            key.push(b'&');
            let k = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &key);
            zeroize::Zeroize::zeroize(&mut key);
            let expected = hmac::sign(&k, sts.as_bytes());
            constant_time::verify_slices_are_equal(expected.as_ref(), signature)
                .map_err(|_| OapiError::signature_mismatch(&sts))
        }
        Scheme::Acs3 { signed_headers, signature, content_sha256 } => {
            let sts = acs3_string_to_sign(method, path, query, headers, signed_headers, content_sha256);
            let k = hmac::Key::new(hmac::HMAC_SHA256, secret);
            let expected = hmac::sign(&k, sts.as_bytes());
            constant_time::verify_slices_are_equal(expected.as_ref(), signature)
                .map_err(|_| OapiError::signature_mismatch(&sts))
        }
    }
}

/// Nonces seen within the timestamp window, per AccessKey.
#[derive(Debug, Clone)]
pub struct NonceCache {
    seen: Cache<(String, String), ()>,
}

impl NonceCache {
    pub fn new(window: Duration) -> Self {
        // A timestamp may sit up to `window` on either side of now: remember for both sides.
        NonceCache { seen: Cache::builder().max_capacity(1_000_000).time_to_live(window.saturating_mul(2)).build() }
    }

    /// True when the nonce is new for that AccessKey (and now remembered).
    pub async fn first_use(&self, access_key_id: &str, nonce: &str) -> bool {
        self.seen.entry((access_key_id.to_owned(), nonce.to_owned())).or_insert(()).await.is_fresh()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_string_to_sign_has_the_vendor_layout() {
        let p: BTreeMap<String, String> =
            [("Action", "ListKeys"), ("Timestamp", "2026-11-22T07:00:00Z"), ("Signature", "x")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
        assert_eq!(
            v1_string_to_sign(&Method::POST, &p),
            "POST&%2F&Action%3DListKeys%26Timestamp%3D2026-11-22T07%253A00%253A00Z"
        );
    }

    #[test]
    fn times_outside_the_window_are_refused() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let w = Duration::from_secs(900);
        assert!(check_time(Some("2027-01-15T08:00:00Z"), now, w).is_ok());
        assert_eq!(check_time(Some("2027-01-15T07:40:00Z"), now, w).unwrap_err().code, "IllegalTimestamp");
        assert_eq!(check_time(None, now, w).unwrap_err().code, "IllegalTimestamp");
        assert_eq!(check_time(Some("yesterday"), now, w).unwrap_err().code, "IllegalTimestamp");
    }

    fn acs3_headers(signed: &str, body: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        let now = time::OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let date = now.format(&time::format_description::well_known::Rfc3339).unwrap();
        h.insert("host", "127.0.0.1:1".parse().unwrap());
        h.insert("x-acs-action", "ListKeys".parse().unwrap());
        h.insert("x-acs-version", "2016-01-20".parse().unwrap());
        h.insert("x-acs-date", date.parse().unwrap());
        h.insert("x-acs-signature-nonce", "n1".parse().unwrap());
        h.insert("x-acs-content-sha256", hex::encode(digest::digest(&digest::SHA256, body)).parse().unwrap());
        let auth = format!("ACS3-HMAC-SHA256 Credential=LTAIx,SignedHeaders={signed},Signature=00ff");
        h.insert("authorization", auth.parse().unwrap());
        h
    }

    #[test]
    fn acs3_requires_the_binding_headers_signed_and_the_body_hash() {
        let all = "host;x-acs-action;x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version";
        let p = Params::default();
        let w = Duration::from_secs(900);
        let now = SystemTime::now();
        let ok = claim(&acs3_headers(all, b""), &p, b"", now, w).unwrap();
        assert_eq!((ok.access_key_id.as_str(), ok.nonce.as_str()), ("LTAIx", "n1"));
        let code = |h: &HeaderMap, body: &[u8]| claim(h, &p, body, now, w).unwrap_err().code;
        // The date left out of the signature could be replaced in flight.
        assert_eq!(
            code(&acs3_headers("host;x-acs-action;x-acs-content-sha256;x-acs-signature-nonce;x-acs-version", b""), b""),
            "IncompleteSignature"
        );
        let mut extra = acs3_headers(all, b"");
        extra.insert("x-acs-security-token", "t".parse().unwrap());
        assert_eq!(code(&extra, b""), "IncompleteSignature", "every x-acs-* header is signed");
        assert_eq!(code(&acs3_headers("x-acs-version;host", b""), b""), "IncompleteSignature", "sorted");
        assert_eq!(code(&acs3_headers(all, b""), b"tampered"), "InvalidParameter", "the body hash binds the body");
        let mut bad = acs3_headers(all, b"");
        bad.insert("authorization", "ACS3-HMAC-SHA256 Credential=LTAIx".parse().unwrap());
        assert_eq!(code(&bad, b""), "IncompleteSignature");
        let mut other = acs3_headers(all, b"");
        other.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(code(&other, b""), "IncompleteSignature");
    }

    #[test]
    fn v1_requires_its_parameters() {
        let w = Duration::from_secs(900);
        let now = SystemTime::now();
        let ts = time::OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let ts = ts.format(&time::format_description::well_known::Rfc3339).unwrap();
        let full = format!(
            "AccessKeyId=LTAIx&Signature=AAAA&SignatureMethod=HMAC-SHA1&SignatureVersion=1.0&SignatureNonce=n&Timestamp={ts}"
        );
        let p = Params::parse(&full, None).unwrap();
        assert!(claim(&HeaderMap::new(), &p, b"", now, w).is_ok());
        for (drop, code) in [
            ("AccessKeyId", "MissingParameter"),
            ("Signature", "IncompleteSignature"),
            ("SignatureMethod", "IncompleteSignature"),
            ("SignatureNonce", "MissingParameter"),
            ("Timestamp", "IllegalTimestamp"),
        ] {
            let mut q = p.clone();
            q.0.remove(drop);
            assert_eq!(claim(&HeaderMap::new(), &q, b"", now, w).unwrap_err().code, code, "{drop}");
        }
        let mut sha256 = p.clone();
        sha256.0.insert("SignatureMethod".into(), "HMAC-SHA256".into());
        assert_eq!(claim(&HeaderMap::new(), &sha256, b"", now, w).unwrap_err().code, "IncompleteSignature");
    }

    #[test]
    fn verification_is_exact() {
        let p = Params::parse("AccessKeyId=LTAIx&Action=ListKeys&SignatureMethod=HMAC-SHA1&SignatureVersion=1.0&SignatureNonce=n&Timestamp=2026-11-22T07%3A00%3A00Z", None).unwrap();
        let sts = v1_string_to_sign(&Method::POST, &p.0);
        let k = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, b"secret&");
        let sig = hmac::sign(&k, sts.as_bytes());
        let claim = Claim {
            access_key_id: "LTAIx".into(),
            nonce: "n".into(),
            scheme: Scheme::V1 { signature: sig.as_ref().to_vec() },
        };
        let h = HeaderMap::new();
        assert!(verify(&claim, b"secret", &Method::POST, "/", &p.0, &p.0, &h).is_ok());
        let e = verify(&claim, b"secreT", &Method::POST, "/", &p.0, &p.0, &h).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (400, "SignatureDoesNotMatch"));
        assert!(!e.message.contains("secret"), "the message never carries the secret");
        assert!(verify(&claim, b"secret", &Method::GET, "/", &p.0, &p.0, &h).is_err(), "the method is signed");
    }

    #[tokio::test]
    async fn a_nonce_is_accepted_once_per_access_key() {
        let c = NonceCache::new(Duration::from_secs(60));
        assert!(c.first_use("LTAIa", "n1").await);
        assert!(!c.first_use("LTAIa", "n1").await);
        assert!(c.first_use("LTAIb", "n1").await);
    }
}

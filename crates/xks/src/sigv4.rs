//! AWS Signature Version 4 verification of XKS requests (spec Appendix A), written against the public
//! algorithm with `hmac` + `sha2`: parse the `Authorization` header, rebuild the canonical request from
//! exactly the headers named in `SignedHeaders`, derive the signing key for the credential scope and compare
//! in constant time. A failure never reveals what was expected: callers get one fixed error and only the
//! [`Failure`] reason (never a computed value) reaches the log.
//!
//! [`sign`] is the same algorithm from the client side, for the load generator and tests.

use axum::http::HeaderMap;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

type HmacSha256 = Hmac<Sha256>;

/// The SigV4 service name of every XKS request.
pub const SERVICE: &str = "kms-xks-proxy";
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// Why verification failed: logged, never sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    MissingAuthorization,
    MalformedAuthorization,
    UnsupportedAlgorithm,
    WrongService,
    RegionNotAllowed,
    RequiredHeaderNotSigned,
    SignedHeaderMissing,
    MissingDate,
    MalformedDate,
    ClockSkew,
    ScopeDateMismatch,
    PayloadHashMismatch,
    UnknownCredential,
    SignatureMismatch,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::MissingAuthorization => "no Authorization header",
            Failure::MalformedAuthorization => "malformed Authorization header",
            Failure::UnsupportedAlgorithm => "algorithm is not AWS4-HMAC-SHA256",
            Failure::WrongService => "credential scope service is not kms-xks-proxy",
            Failure::RegionNotAllowed => "credential scope region is not allowed",
            Failure::RequiredHeaderNotSigned => "host and x-amz-date must be signed",
            Failure::SignedHeaderMissing => "a signed header is absent or not visible ASCII",
            Failure::MissingDate => "no X-Amz-Date header",
            Failure::MalformedDate => "malformed X-Amz-Date",
            Failure::ClockSkew => "X-Amz-Date is outside the allowed clock skew",
            Failure::ScopeDateMismatch => "credential scope date differs from X-Amz-Date",
            Failure::PayloadHashMismatch => "x-amz-content-sha256 does not match the body",
            Failure::UnknownCredential => "unknown, revoked or foreign access key id",
            Failure::SignatureMismatch => "signature mismatch",
        }
    }
}

/// A parsed `Authorization` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub access_key_id: String,
    /// `yyyymmdd` of the credential scope.
    pub date: String,
    pub region: String,
    pub service: String,
    /// Lower-case header names, in the order given (which SigV4 requires to be sorted).
    pub signed_headers: Vec<String>,
    pub signature: [u8; 32],
}

impl Authorization {
    pub fn parse(value: &str) -> Result<Self, Failure> {
        let rest = value.trim_start();
        let Some((alg, params)) = rest.split_once(' ') else {
            return Err(Failure::MalformedAuthorization);
        };
        if alg != ALGORITHM {
            return Err(Failure::UnsupportedAlgorithm);
        }
        let (mut credential, mut signed, mut signature) = (None, None, None);
        for part in params.split(',') {
            let part = part.trim();
            let Some((k, v)) = part.split_once('=') else {
                return Err(Failure::MalformedAuthorization);
            };
            let slot = match k {
                "Credential" => &mut credential,
                "SignedHeaders" => &mut signed,
                "Signature" => &mut signature,
                _ => return Err(Failure::MalformedAuthorization),
            };
            if slot.replace(v).is_some() {
                return Err(Failure::MalformedAuthorization);
            }
        }
        let (Some(credential), Some(signed), Some(signature)) = (credential, signed, signature) else {
            return Err(Failure::MalformedAuthorization);
        };
        let scope: Vec<&str> = credential.split('/').collect();
        let [akid, date, region, service, terminator] = scope[..] else {
            return Err(Failure::MalformedAuthorization);
        };
        if terminator != "aws4_request"
            || akid.is_empty()
            || akid.len() > 128
            || date.len() != 8
            || !date.bytes().all(|b| b.is_ascii_digit())
            || region.is_empty()
        {
            return Err(Failure::MalformedAuthorization);
        }
        let signed_headers: Vec<String> = signed.split(';').map(str::to_owned).collect();
        let well_formed = signed_headers.iter().all(|h| {
            !h.is_empty() && h.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        });
        let sorted_unique = signed_headers.windows(2).all(|w| w[0] < w[1]);
        if !well_formed || !sorted_unique {
            return Err(Failure::MalformedAuthorization);
        }
        if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(Failure::MalformedAuthorization);
        }
        let mut sig = [0u8; 32];
        hex::decode_to_slice(signature, &mut sig).map_err(|_| Failure::MalformedAuthorization)?;
        Ok(Authorization {
            access_key_id: akid.to_owned(),
            date: date.to_owned(),
            region: region.to_owned(),
            service: service.to_owned(),
            signed_headers,
            signature: sig,
        })
    }

    /// `date/region/service/aws4_request`.
    pub fn scope(&self) -> String {
        format!("{}/{}/{}/aws4_request", self.date, self.region, self.service)
    }
}

/// What a request contributes to its canonical form.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    pub method: &'a str,
    /// The path as received (still percent-encoded).
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The URI authority: on HTTP/2 the `:authority` pseudo-header stands in for `Host`.
    pub authority: Option<&'a str>,
    pub body: &'a [u8],
}

/// Everything checked before the secret is needed, plus the string to sign.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub authorization: Authorization,
    pub string_to_sign: String,
}

/// The checks that need no secret, then the string to sign. `allowed_region` decides the scope's region.
pub fn prepare(
    req: &RequestParts<'_>,
    now: OffsetDateTime,
    max_skew_secs: u64,
    allowed_region: impl Fn(&str) -> bool,
) -> Result<Prepared, Failure> {
    let header = req.headers.get("authorization").ok_or(Failure::MissingAuthorization)?;
    let auth = Authorization::parse(header.to_str().map_err(|_| Failure::MalformedAuthorization)?)?;
    if auth.service != SERVICE {
        return Err(Failure::WrongService);
    }
    if !allowed_region(&auth.region) {
        return Err(Failure::RegionNotAllowed);
    }
    if !auth.signed_headers.iter().any(|h| h == "host") || !auth.signed_headers.iter().any(|h| h == "x-amz-date") {
        return Err(Failure::RequiredHeaderNotSigned);
    }
    let amz_date = req.headers.get("x-amz-date").ok_or(Failure::MissingDate)?;
    let amz_date = amz_date.to_str().map_err(|_| Failure::MalformedDate)?;
    let when = parse_amz_date(amz_date).ok_or(Failure::MalformedDate)?;
    let skew = (now - when).whole_seconds().unsigned_abs();
    if skew > max_skew_secs {
        return Err(Failure::ClockSkew);
    }
    if amz_date[..8] != auth.date {
        return Err(Failure::ScopeDateMismatch);
    }
    let payload_hash = hex::encode(Sha256::digest(req.body));
    if let Some(declared) = req.headers.get("x-amz-content-sha256") {
        // "UNSIGNED-PAYLOAD" and friends are refused: the body is what XKS authenticates.
        if declared.as_bytes() != payload_hash.as_bytes() {
            return Err(Failure::PayloadHashMismatch);
        }
    }
    let mut headers = Vec::with_capacity(auth.signed_headers.len());
    for name in &auth.signed_headers {
        let value = header_value(req, name).ok_or(Failure::SignedHeaderMissing)?;
        headers.push((name.as_str(), value));
    }
    let canonical = canonical_request(req.method, req.path, req.query, &headers, &payload_hash);
    let string_to_sign = string_to_sign(amz_date, &auth.scope(), &canonical);
    Ok(Prepared { authorization: auth, string_to_sign })
}

/// Constant-time check of the request's signature with the derived signing key.
pub fn verify(prepared: &Prepared, signing_key: &[u8; 32]) -> Result<(), Failure> {
    let mut mac = hmac(signing_key);
    mac.update(prepared.string_to_sign.as_bytes());
    mac.verify_slice(&prepared.authorization.signature).map_err(|_| Failure::SignatureMismatch)
}

/// The values of one signed header, joined by commas (several header lines of the same name), each trimmed
/// with inner whitespace runs collapsed. `host` falls back to the URI authority (HTTP/2).
fn header_value(req: &RequestParts<'_>, name: &str) -> Option<String> {
    let mut out = String::new();
    let mut any = false;
    for v in req.headers.get_all(name) {
        let v = v.to_str().ok()?;
        if any {
            out.push(',');
        }
        any = true;
        push_collapsed(&mut out, v);
    }
    if !any && name == "host" {
        push_collapsed(&mut out, req.authority?);
        any = true;
    }
    any.then_some(out)
}

fn push_collapsed(out: &mut String, value: &str) {
    let mut pending_space = false;
    let mut started = false;
    for c in value.trim().chars() {
        if c == ' ' || c == '\t' {
            pending_space = started;
            continue;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        out.push(c);
        started = true;
    }
}

/// `yyyymmddTHHMMSSZ` in UTC.
pub fn parse_amz_date(s: &str) -> Option<OffsetDateTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let year = i32::try_from(digits(0..4)?).ok()?;
    let month = time::Month::try_from(u8::try_from(digits(4..6)?).ok()?).ok()?;
    let day = u8::try_from(digits(6..8)?).ok()?;
    let date = time::Date::from_calendar_date(year, month, day).ok()?;
    let t = time::Time::from_hms(
        u8::try_from(digits(9..11)?).ok()?,
        u8::try_from(digits(11..13)?).ok()?,
        u8::try_from(digits(13..15)?).ok()?,
    )
    .ok()?;
    Some(time::PrimitiveDateTime::new(date, t).assume_utc())
}

/// Formats a time as `X-Amz-Date` wants it.
pub fn format_amz_date(t: OffsetDateTime) -> String {
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// RFC 3986 encoding as SigV4 defines it: everything but `A-Za-z0-9-._~` is `%XX` (upper-case hex); `/` is
/// kept only in paths.
fn uri_encode(out: &mut String, s: &str, keep_slash: bool) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex_val(b[i + 1]), hex_val(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The canonical URI of a non-S3 service: every segment of the (already encoded) path is encoded again.
pub fn canonical_uri(path: &str) -> String {
    if path.is_empty() {
        return "/".to_owned();
    }
    let mut out = String::with_capacity(path.len() + 16);
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        uri_encode(&mut out, segment, false);
    }
    out
}

/// Parameters decoded, re-encoded, sorted by name then value.
pub fn canonical_query(query: Option<&str>) -> String {
    let Some(q) = query.filter(|q| !q.is_empty()) else {
        return String::new();
    };
    let mut pairs: Vec<(String, String)> = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let mut ek = String::new();
            uri_encode(&mut ek, &String::from_utf8_lossy(&percent_decode(k)), false);
            let mut ev = String::new();
            uri_encode(&mut ev, &String::from_utf8_lossy(&percent_decode(v)), false);
            (ek, ev)
        })
        .collect();
    pairs.sort();
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
}

/// The canonical request of Task 1. `headers` are the signed headers in order, names lower-case, values
/// already trimmed and collapsed.
pub fn canonical_request(
    method: &str,
    path: &str,
    query: Option<&str>,
    headers: &[(&str, String)],
    payload_hash: &str,
) -> String {
    let mut out = String::with_capacity(256 + payload_hash.len());
    out.push_str(method);
    out.push('\n');
    out.push_str(&canonical_uri(path));
    out.push('\n');
    out.push_str(&canonical_query(query));
    out.push('\n');
    for (name, value) in headers {
        out.push_str(name);
        out.push(':');
        out.push_str(value);
        out.push('\n');
    }
    out.push('\n');
    let names: Vec<&str> = headers.iter().map(|(n, _)| *n).collect();
    out.push_str(&names.join(";"));
    out.push('\n');
    out.push_str(payload_hash);
    out
}

pub fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &str) -> String {
    format!("{ALGORITHM}\n{amz_date}\n{scope}\n{}", hex::encode(Sha256::digest(canonical_request.as_bytes())))
}

fn hmac(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail; an empty MAC would fail closed anyway.
    match <HmacSha256 as KeyInit>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable_hmac(),
    }
}

#[cold]
fn unreachable_hmac() -> HmacSha256 {
    // Keys of any length are valid for HMAC (RFC 2104); this path exists only to avoid a panic.
    <HmacSha256 as KeyInit>::new(&Default::default())
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = hmac(key);
    m.update(data);
    m.finalize().into_bytes().into()
}

/// The signing key of Task 3: derived once per (credential, date, region) and cached by the caller.
pub fn signing_key(secret: &[u8], date: &str, region: &str, service: &str) -> [u8; 32] {
    let mut k = Vec::with_capacity(4 + secret.len());
    k.extend_from_slice(b"AWS4");
    k.extend_from_slice(secret);
    let k_date = hmac_sha256(&k, date.as_bytes());
    zeroize::Zeroize::zeroize(&mut k);
    let k_region = hmac_sha256(&k_date, region.as_bytes());
    let k_service = hmac_sha256(&k_region, service.as_bytes());
    hmac_sha256(&k_service, b"aws4_request")
}

/// A request to sign from the client side.
#[derive(Debug, Clone)]
pub struct ToSign<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// Every header to sign besides `x-amz-date` (which [`sign`] adds): at least `host`.
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
    pub access_key_id: &'a str,
    pub secret: &'a str,
    pub region: &'a str,
    pub service: &'a str,
    pub time: OffsetDateTime,
}

/// Signs a request: returns the `X-Amz-Date` and `Authorization` header values to send.
pub fn sign(r: &ToSign<'_>) -> (String, String) {
    let amz_date = format_amz_date(r.time);
    let date = &amz_date[..8];
    let mut headers: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|(n, v)| {
            let mut s = String::new();
            push_collapsed(&mut s, v);
            (n.to_ascii_lowercase(), s)
        })
        .collect();
    headers.push(("x-amz-date".to_owned(), amz_date.clone()));
    headers.sort();
    let borrowed: Vec<(&str, String)> = headers.iter().map(|(n, v)| (n.as_str(), v.clone())).collect();
    let payload_hash = hex::encode(Sha256::digest(r.body));
    let canonical = canonical_request(r.method, r.path, r.query, &borrowed, &payload_hash);
    let scope = format!("{date}/{}/{}/aws4_request", r.region, r.service);
    let sts = string_to_sign(&amz_date, &scope, &canonical);
    let key = signing_key(r.secret.as_bytes(), date, r.region, r.service);
    let signature = hex::encode(hmac_sha256(&key, sts.as_bytes()));
    let names: Vec<&str> = borrowed.iter().map(|(n, _)| *n).collect();
    let auth = format!(
        "{ALGORITHM} Credential={}/{scope}, SignedHeaders={}, Signature={signature}",
        r.access_key_id,
        names.join(";")
    );
    (amz_date, auth)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    fn t(s: &str) -> OffsetDateTime {
        parse_amz_date(s).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// The AWS SigV4 test suite's `get-vanilla` case and the IAM ListUsers example of the AWS General
    /// Reference: published inputs and signatures.
    #[test]
    fn published_vectors() {
        let (_, auth) = sign(&ToSign {
            method: "GET",
            path: "/",
            query: None,
            headers: &[("host", "example.amazonaws.com")],
            body: b"",
            access_key_id: "AKIDEXAMPLE",
            secret: SECRET,
            region: "us-east-1",
            service: "service",
            time: t("20150830T123600Z"),
        });
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
        assert_eq!(
            hex::encode(signing_key(SECRET.as_bytes(), "20150830", "us-east-1", "iam")),
            "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"
        );
        let (_, auth) = sign(&ToSign {
            method: "GET",
            path: "/",
            query: Some("Version=2010-05-08&Action=ListUsers"),
            headers: &[
                ("Content-Type", "application/x-www-form-urlencoded; charset=utf-8"),
                ("Host", "iam.amazonaws.com"),
            ],
            body: b"",
            access_key_id: "AKIDEXAMPLE",
            secret: SECRET,
            region: "us-east-1",
            service: "iam",
            time: t("20150830T123600Z"),
        });
        assert!(auth.ends_with("Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"), "{auth}");
    }

    #[test]
    fn canonical_forms() {
        assert_eq!(canonical_uri(""), "/");
        assert_eq!(canonical_uri("/p/kms/xks/v1/keys/k-1.a_b~/encrypt"), "/p/kms/xks/v1/keys/k-1.a_b~/encrypt");
        // Non-S3 services encode the already-encoded path again.
        assert_eq!(canonical_uri("/documents%20and%20settings/"), "/documents%2520and%2520settings/");
        assert_eq!(canonical_query(Some("b=2&a=%2F x&a=1")), "a=%2F%20x&a=1&b=2");
        assert_eq!(canonical_query(Some("")), "");
        assert_eq!(canonical_query(Some("flag")), "flag=");
        let mut s = String::new();
        push_collapsed(&mut s, "  a   b \t c  ");
        assert_eq!(s, "a b c");
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            if let (Ok(n), Ok(v)) = (axum::http::HeaderName::try_from(*n), HeaderValue::from_str(v)) {
                h.append(n, v);
            }
        }
        h
    }

    struct Case {
        path: &'static str,
        body: Vec<u8>,
        headers: HeaderMap,
    }

    fn signed_case(now: OffsetDateTime, region: &str, secret: &str, extra: &[(&str, &str)]) -> Case {
        let body = br#"{"requestMetadata":{"kmsRequestId":"r","kmsOperation":"KmsHealthCheck"}}"#.to_vec();
        let path = "/example/kms/xks/v1/health";
        let mut to_sign: Vec<(&str, &str)> =
            vec![("host", "xks.example.com:8443"), ("content-type", "application/json")];
        to_sign.extend_from_slice(extra);
        let (date, auth) = sign(&ToSign {
            method: "POST",
            path,
            query: None,
            headers: &to_sign,
            body: &body,
            access_key_id: "AKIAI2SFODNN7EXAMPLE",
            secret,
            region,
            service: SERVICE,
            time: now,
        });
        let mut all = to_sign.clone();
        all.push(("x-amz-date", &date));
        all.push(("authorization", &auth));
        let h = headers(&all);
        Case { path, body, headers: h }
    }

    fn check(c: &Case, now: OffsetDateTime, secret: &str) -> Result<(), Failure> {
        let parts = RequestParts {
            method: "POST",
            path: c.path,
            query: None,
            headers: &c.headers,
            authority: None,
            body: &c.body,
        };
        let p = prepare(&parts, now, 300, |r| r == "eu-west-1")?;
        let key = signing_key(secret.as_bytes(), &p.authorization.date, &p.authorization.region, SERVICE);
        verify(&p, &key)
    }

    #[test]
    fn verifies_and_rejects() {
        let now = t("20240229T235930Z");
        let secret = "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE";
        let good = signed_case(now, "eu-west-1", secret, &[]);
        assert_eq!(check(&good, now, secret), Ok(()));
        // 4 minutes later is still fine, 6 is not; the future the same.
        assert_eq!(check(&good, now + time::Duration::minutes(4), secret), Ok(()));
        assert_eq!(check(&good, now + time::Duration::minutes(6), secret), Err(Failure::ClockSkew));
        assert_eq!(check(&good, now - time::Duration::minutes(6), secret), Err(Failure::ClockSkew));
        assert_eq!(check(&good, now, "another secret"), Err(Failure::SignatureMismatch));

        let mut tampered = signed_case(now, "eu-west-1", secret, &[]);
        tampered.body[5] ^= 1;
        assert_eq!(check(&tampered, now, secret), Err(Failure::SignatureMismatch));
        let mut tampered = signed_case(now, "eu-west-1", secret, &[]);
        tampered.path = "/example/kms/xks/v1/keys/a/encrypt";
        assert_eq!(check(&tampered, now, secret), Err(Failure::SignatureMismatch));
        let mut tampered = signed_case(now, "eu-west-1", secret, &[]);
        tampered.headers.insert("content-type", HeaderValue::from_static("text/plain"));
        assert_eq!(check(&tampered, now, secret), Err(Failure::SignatureMismatch));
        let mut tampered = signed_case(now, "eu-west-1", secret, &[]);
        tampered.headers.insert("host", HeaderValue::from_static("xks.example.com"));
        assert_eq!(check(&tampered, now, secret), Err(Failure::SignatureMismatch));
        let mut tampered = signed_case(now, "eu-west-1", secret, &[]);
        tampered.headers.insert("x-amz-date", HeaderValue::from_static("20240229T235931Z"));
        assert_eq!(check(&tampered, now, secret), Err(Failure::SignatureMismatch));
        // A date in the window but another day than the scope.
        let mut tampered = signed_case(now, "eu-west-1", secret, &[]);
        tampered.headers.insert("x-amz-date", HeaderValue::from_static("20240301T000010Z"));
        assert_eq!(check(&tampered, now, secret), Err(Failure::ScopeDateMismatch));

        let wrong_region = signed_case(now, "us-east-1", secret, &[]);
        assert_eq!(check(&wrong_region, now, secret), Err(Failure::RegionNotAllowed));

        // Unsigned extra headers do not matter; signed ones must be present.
        let mut extra = signed_case(now, "eu-west-1", secret, &[]);
        extra.headers.insert("user-agent", HeaderValue::from_static("x"));
        assert_eq!(check(&extra, now, secret), Ok(()));
        let mut missing = signed_case(now, "eu-west-1", secret, &[]);
        missing.headers.remove("content-type");
        assert_eq!(check(&missing, now, secret), Err(Failure::SignedHeaderMissing));

        // A declared payload hash must be the body's.
        let hash = hex::encode(Sha256::digest(&good.body));
        let mut declared = signed_case(now, "eu-west-1", secret, &[("x-amz-content-sha256", &hash)]);
        assert_eq!(check(&declared, now, secret), Ok(()));
        declared.headers.insert("x-amz-content-sha256", HeaderValue::from_static("UNSIGNED-PAYLOAD"));
        assert_eq!(check(&declared, now, secret), Err(Failure::PayloadHashMismatch));
    }

    #[test]
    fn host_from_authority_on_http2() {
        let now = t("20240101T000000Z");
        let secret = "s";
        let mut c = signed_case(now, "eu-west-1", secret, &[]);
        c.headers.remove("host");
        let parts = RequestParts {
            method: "POST",
            path: c.path,
            query: None,
            headers: &c.headers,
            authority: Some("xks.example.com:8443"),
            body: &c.body,
        };
        let p = prepare(&parts, now, 300, |_| true);
        let p = p.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(verify(&p, &signing_key(b"s", "20240101", "eu-west-1", SERVICE)), Ok(()));
    }

    #[test]
    fn malformed_headers() {
        let sig = "a".repeat(64);
        let ok = format!(
            "AWS4-HMAC-SHA256 Credential=AK/20240101/r/kms-xks-proxy/aws4_request, SignedHeaders=host;x-amz-date, Signature={sig}"
        );
        assert!(Authorization::parse(&ok).is_ok());
        // No spaces after commas is accepted too.
        assert!(Authorization::parse(&ok.replace(", ", ",")).is_ok());
        for bad in [
            ok.replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA1"),
            ok.replace("aws4_request", "aws5_request"),
            ok.replace("host;x-amz-date", "x-amz-date;host"),
            ok.replace("host;x-amz-date", "Host;x-amz-date"),
            ok.replace("host;x-amz-date", "host;host;x-amz-date"),
            ok.replace(&sig, "zz"),
            ok.replace(&sig, &"A".repeat(64)),
            ok.replace("20240101", "2024011"),
            format!("{ok}, Signature={sig}"),
            "AWS4-HMAC-SHA256".to_owned(),
            String::new(),
        ] {
            assert!(Authorization::parse(&bad).is_err(), "{bad}");
        }
        let h = headers(&[
            ("authorization", &ok.replace("kms-xks-proxy", "kms")),
            ("x-amz-date", "20240101T000000Z"),
            ("host", "h"),
        ]);
        let parts = RequestParts { method: "POST", path: "/", query: None, headers: &h, authority: None, body: b"" };
        assert_eq!(prepare(&parts, t("20240101T000000Z"), 300, |_| true).err(), Some(Failure::WrongService));
        let h = headers(&[
            ("authorization", &ok.replace("host;x-amz-date", "x-amz-date")),
            ("x-amz-date", "20240101T000000Z"),
        ]);
        let parts = RequestParts { method: "POST", path: "/", query: None, headers: &h, authority: None, body: b"" };
        assert_eq!(prepare(&parts, t("20240101T000000Z"), 300, |_| true).err(), Some(Failure::RequiredHeaderNotSigned));
        for d in ["2024-01-01T00:00:00Z", "20241301T000000Z", "20240101T250000Z", "20240101T000000"] {
            assert!(parse_amz_date(d).is_none(), "{d}");
        }
        assert_eq!(format_amz_date(t("20240229T235930Z")), "20240229T235930Z");
    }
}

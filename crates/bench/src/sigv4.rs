//! AWS Signature Version 4, client side: the third independent signer of the project (beside curl's and
//! botocore's), written from the published algorithm. kmsgate verifies every signature, so a mistake here shows up
//! as `401 AuthenticationFailedException` in the benchmark's error table, never as silently wrong numbers.
//!
//! The derived signing key is cached per (date, region, service), as real KMS clients do; the signature itself
//! is computed afresh for every request, over a body that is different for every request.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// The algorithm name in the `Authorization` header and the string to sign.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// The service name of every XKS request.
pub const XKS_SERVICE: &str = "kms-xks-proxy";

/// What one signature covers.
#[derive(Debug, Clone, Copy)]
pub struct SignInput<'a> {
    pub method: &'a str,
    /// The path exactly as it goes on the wire (already percent-encoded where needed).
    pub path: &'a str,
    /// The query string as it goes on the wire, without `?`; its pairs must already be encoded. XKS sends none.
    pub query: &'a str,
    /// The headers to sign, names in any case. Each name must appear once.
    pub headers: &'a [(&'a str, &'a str)],
    pub payload: &'a [u8],
    /// `yyyymmddTHHMMSSZ`, the value of `X-Amz-Date`.
    pub amz_date: &'a str,
}

/// Lower-case hex of SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail; the fallback keeps the signer total anyway.
    let Ok(mut mac) = <HmacSha256 as KeyInit>::new_from_slice(key) else {
        return [0; 32];
    };
    mac.update(data);
    let mut out = [0u8; 32];
    out.copy_from_slice(&mac.finalize().into_bytes());
    out
}

/// kSigning = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service), "aws4_request").
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    hmac(&k_service, b"aws4_request")
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Percent-encodes everything but RFC 3986 unreserved characters, upper-case hex.
fn uri_encode(segment: &str, out: &mut String) {
    for &b in segment.as_bytes() {
        if is_unreserved(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// Canonical URI of every service but S3: each segment of the wire path is encoded once more (so a `%20` on
/// the wire becomes `%2520`); an empty path is `/`.
pub fn canonical_uri(path: &str) -> String {
    if path.is_empty() {
        return "/".to_owned();
    }
    let mut out = String::with_capacity(path.len() + 8);
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        uri_encode(seg, &mut out);
    }
    out
}

/// Canonical query: pairs sorted by name, then value. A name without `=` gets an empty value.
pub fn canonical_query(query: &str) -> String {
    if query.is_empty() {
        return String::new();
    }
    let mut pairs: Vec<(&str, &str)> =
        query.split('&').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, ""))).collect();
    pairs.sort_unstable();
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
}

/// Header value as SigV4 wants it: trimmed, runs of spaces collapsed to one.
fn canonical_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for word in v.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// The canonical request and the `SignedHeaders` list.
pub fn canonical_request(input: &SignInput<'_>) -> (String, String) {
    let mut headers: Vec<(String, String)> =
        input.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), canonical_value(v))).collect();
    headers.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let signed = headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(";");
    let mut creq = String::with_capacity(256 + input.path.len());
    creq.push_str(input.method);
    creq.push('\n');
    creq.push_str(&canonical_uri(input.path));
    creq.push('\n');
    creq.push_str(&canonical_query(input.query));
    creq.push('\n');
    for (k, v) in &headers {
        creq.push_str(k);
        creq.push(':');
        creq.push_str(v);
        creq.push('\n');
    }
    creq.push('\n');
    creq.push_str(&signed);
    creq.push('\n');
    creq.push_str(&sha256_hex(input.payload));
    (creq, signed)
}

/// The string to sign for a canonical request.
pub fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &str) -> String {
    format!("{ALGORITHM}\n{amz_date}\n{scope}\n{}", sha256_hex(canonical_request.as_bytes()))
}

/// A signer for one credential, region and service. Cheap to clone: each load-generator connection keeps its
/// own, so the signing-key cache needs no lock.
#[derive(Clone)]
pub struct Signer {
    access_key_id: String,
    secret: String,
    region: String,
    service: String,
    cached: Option<(String, [u8; 32])>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("access_key_id", &self.access_key_id)
            .field("region", &self.region)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl Signer {
    pub fn new(access_key_id: &str, secret: &str, region: &str, service: &str) -> Self {
        Signer {
            access_key_id: access_key_id.to_owned(),
            secret: secret.to_owned(),
            region: region.to_owned(),
            service: service.to_owned(),
            cached: None,
        }
    }

    fn key_for(&mut self, date: &str) -> [u8; 32] {
        match &self.cached {
            Some((d, k)) if d == date => *k,
            _ => {
                let k = signing_key(&self.secret, date, &self.region, &self.service);
                self.cached = Some((date.to_owned(), k));
                k
            }
        }
    }

    /// The hex signature of a request.
    pub fn signature(&mut self, input: &SignInput<'_>) -> String {
        let date = input.amz_date.get(..8).unwrap_or(input.amz_date);
        let scope = format!("{date}/{}/{}/aws4_request", self.region, self.service);
        let (creq, _) = canonical_request(input);
        let sts = string_to_sign(input.amz_date, &scope, &creq);
        hex::encode(hmac(&self.key_for(date), sts.as_bytes()))
    }

    /// The full `Authorization` header value.
    pub fn authorization(&mut self, input: &SignInput<'_>) -> String {
        let date = input.amz_date.get(..8).unwrap_or(input.amz_date);
        let scope = format!("{date}/{}/{}/aws4_request", self.region, self.service);
        let (creq, signed) = canonical_request(input);
        let sts = string_to_sign(input.amz_date, &scope, &creq);
        let sig = hex::encode(hmac(&self.key_for(date), sts.as_bytes()));
        format!("{ALGORITHM} Credential={}/{scope}, SignedHeaders={signed}, Signature={sig}", self.access_key_id)
    }
}

/// `X-Amz-Date` for a moment: `yyyymmddTHHMMSSZ` in UTC.
pub fn amz_date(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
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

/// `X-Amz-Date` for now.
pub fn amz_date_now() -> String {
    amz_date(time::OffsetDateTime::now_utc())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    // The example request of the AWS General Reference's SigV4 walkthrough (IAM ListUsers, 2015-08-30). The
    // expected values below were computed independently with Python's hashlib/hmac from the published steps and
    // agree with the values the documentation prints.
    const IAM_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const IAM_HEADERS: &[(&str, &str)] = &[
        ("Content-Type", "application/x-www-form-urlencoded; charset=utf-8"),
        ("Host", "iam.amazonaws.com"),
        ("X-Amz-Date", "20150830T123600Z"),
    ];

    fn iam_input() -> SignInput<'static> {
        SignInput {
            method: "GET",
            path: "/",
            query: "Version=2010-05-08&Action=ListUsers",
            headers: IAM_HEADERS,
            payload: b"",
            amz_date: "20150830T123600Z",
        }
    }

    #[test]
    fn iam_walkthrough_canonical_request() {
        let (creq, signed) = canonical_request(&iam_input());
        assert_eq!(
            creq,
            "GET\n/\nAction=ListUsers&Version=2010-05-08\n\
             content-type:application/x-www-form-urlencoded; charset=utf-8\nhost:iam.amazonaws.com\n\
             x-amz-date:20150830T123600Z\n\ncontent-type;host;x-amz-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(signed, "content-type;host;x-amz-date");
        assert_eq!(sha256_hex(creq.as_bytes()), "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59");
    }

    #[test]
    fn iam_walkthrough_signing_key_and_signature() {
        assert_eq!(
            hex::encode(signing_key(IAM_SECRET, "20150830", "us-east-1", "iam")),
            "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"
        );
        let mut s = Signer::new("AKIDEXAMPLE", IAM_SECRET, "us-east-1", "iam");
        assert_eq!(s.signature(&iam_input()), "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7");
        assert_eq!(
            s.authorization(&iam_input()),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, \
             Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
    }

    // An XKS GetHealthStatus request signed by botocore's SigV4Auth (service kms-xks-proxy, eu-west-1, clock
    // fixed at 2025-01-02T03:04:05Z): a second, independent implementation agreeing on the XKS shape.
    #[test]
    fn xks_request_matches_botocore() {
        let body = br#"{"requestMetadata":{"kmsOperation":"KmsHealthCheck","kmsRequestId":"bench-1"}}"#;
        let headers =
            [("content-type", "application/json"), ("host", "127.0.0.1:8443"), ("x-amz-date", "20250102T030405Z")];
        let input = SignInput {
            method: "POST",
            path: "/bench/kms/xks/v1/health",
            query: "",
            headers: &headers,
            payload: body,
            amz_date: "20250102T030405Z",
        };
        let mut s = Signer::new(
            "ABCDEFGHIJKLMNOPQRSTUVWX",
            "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldC0xMjM=",
            "eu-west-1",
            XKS_SERVICE,
        );
        assert_eq!(
            s.authorization(&input),
            "AWS4-HMAC-SHA256 Credential=ABCDEFGHIJKLMNOPQRSTUVWX/20250102/eu-west-1/kms-xks-proxy/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, \
             Signature=bcfac985e70d5e30bbfe04e06e542726eaa61106f13778130c276ebaf3ae5a37"
        );
        // A one-byte change of the body changes the signature: the payload hash is really covered.
        let mut other = *body;
        other[other.len() - 3] = b'2';
        assert_ne!(s.signature(&SignInput { payload: &other, ..input }), s.signature(&input));
    }

    #[test]
    fn signing_key_cache_follows_the_date() {
        let mut s = Signer::new("AK", IAM_SECRET, "us-east-1", "iam");
        let a = s.signature(&iam_input());
        let next_day = SignInput { amz_date: "20150831T000000Z", ..iam_input() };
        let b = s.signature(&next_day);
        assert_ne!(a, b);
        assert_eq!(s.cached.as_ref().map(|c| c.0.as_str()), Some("20150831"));
        assert_eq!(s.signature(&iam_input()), a, "a cache hit for another date would sign with the wrong key");
    }

    #[test]
    fn canonical_pieces() {
        assert_eq!(canonical_uri(""), "/");
        assert_eq!(canonical_uri("/a b/%20/k-1._~"), "/a%20b/%2520/k-1._~");
        assert_eq!(canonical_query("b=2&a=1&a=0&c"), "a=0&a=1&b=2&c=");
        assert_eq!(canonical_value("  a   b  c "), "a b c");
    }

    #[test]
    fn amz_date_format() {
        let t = time::macros::datetime!(2025-01-02 03:04:05 UTC);
        assert_eq!(amz_date(t), "20250102T030405Z");
        let t = time::macros::datetime!(2025-01-02 05:04:05 +02:00);
        assert_eq!(amz_date(t), "20250102T030405Z");
    }
}

//! The XKS workload: Encrypt, Decrypt, GetKeyMetadata and GetHealthStatus against any XKS proxy, each request
//! with its own `kmsRequestId` (so no two bodies are alike) and a fresh SigV4 signature.

use std::sync::Arc;

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::client::{Endpoint, HttpConn};
use crate::load::{Body, Workload};
use crate::sigv4::{self, SignInput, Signer, XKS_SERVICE};

/// The XKS operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Encrypt,
    Decrypt,
    Metadata,
    Health,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Encrypt => "Encrypt",
            Op::Decrypt => "Decrypt",
            Op::Metadata => "GetKeyMetadata",
            Op::Health => "GetHealthStatus",
        }
    }
}

/// Where the proxy is and who we are to it.
#[derive(Debug, Clone)]
pub struct XksTarget {
    pub endpoint: Arc<Endpoint>,
    /// `XksProxyUriPath`: `[/prefix]/kms/xks/v1`.
    pub uri_path: String,
    pub access_key_id: String,
    pub secret: String,
    pub region: String,
}

/// What to send.
#[derive(Debug, Clone)]
pub struct XksOptions {
    pub op: Op,
    /// External key ids; request `n` uses key `n mod len` (many keys exercise the server's caches).
    pub key_ids: Vec<String>,
    pub plaintext_size: usize,
    /// 0: no `additionalAuthenticatedData` field.
    pub aad_size: usize,
    /// Ask for a `ciphertextDataIntegrityValue`.
    pub cdiv: bool,
}

/// One ciphertext made during warm-up, for the Decrypt workload.
#[derive(Debug, Clone)]
pub struct Sample {
    pub key: usize,
    pub ciphertext: String,
    pub iv: String,
    pub tag: String,
    pub metadata: Option<String>,
}

/// The `ciphertextDataIntegrityValue` of the XKS specification (Appendix C): SHA-256 over AAD, metadata, IV,
/// ciphertext and tag, all decoded, no length prefixes.
pub fn cdiv(aad: &[u8], metadata: &[u8], iv: &[u8], ciphertext: &[u8], tag: &[u8]) -> String {
    let mut h = Sha256::new();
    for part in [aad, metadata, iv, ciphertext, tag] {
        h.update(part);
    }
    B64.encode(h.finalize())
}

/// The workload.
#[derive(Debug)]
pub struct XksWorkload {
    target: XksTarget,
    opts: XksOptions,
    paths: Vec<String>,
    uris: Vec<String>,
    plaintext: Vec<u8>,
    plaintext_b64: String,
    aad: Vec<u8>,
    aad_b64: String,
    samples: Vec<Sample>,
    run_id: String,
    key_arn: String,
}

/// Bytes of a recognisable, non-constant pattern: real payloads are not all zeros.
pub(crate) fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt)).collect()
}

impl XksWorkload {
    pub fn new(target: XksTarget, opts: XksOptions, samples: Vec<Sample>) -> anyhow::Result<Self> {
        if opts.key_ids.is_empty() && opts.op != Op::Health {
            bail!("a key id is needed for {}", opts.op.name());
        }
        if opts.op == Op::Decrypt && samples.is_empty() {
            bail!("Decrypt needs ciphertexts made during warm-up");
        }
        for k in &opts.key_ids {
            if k.is_empty() || k.len() > 128 || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
                bail!("external key ids are 1-128 characters of A-Z a-z 0-9 - . _: {k:?}");
            }
        }
        let base = target.uri_path.trim_end_matches('/');
        let paths: Vec<String> = match opts.op {
            Op::Health => vec![format!("{base}/health")],
            op => {
                let verb = match op {
                    Op::Encrypt => "encrypt",
                    Op::Decrypt => "decrypt",
                    _ => "metadata",
                };
                opts.key_ids.iter().map(|k| format!("{base}/keys/{k}/{verb}")).collect()
            }
        };
        let uris = paths.iter().map(|p| target.endpoint.uri(p)).collect();
        let plaintext = pattern(opts.plaintext_size, 7);
        let aad = pattern(opts.aad_size, 101);
        Ok(XksWorkload {
            plaintext_b64: B64.encode(&plaintext),
            aad_b64: B64.encode(&aad),
            key_arn: format!("arn:aws:kms:{}:111122223333:key/4f1e2d3c-0b9a-4877-8665-544332211000", target.region),
            run_id: uuid::Uuid::new_v4().simple().to_string(),
            target,
            opts,
            paths,
            uris,
            plaintext,
            aad,
            samples,
        })
    }

    pub fn options(&self) -> &XksOptions {
        &self.opts
    }

    fn body(&self, seq: u64) -> (usize, String) {
        let op = self.opts.op;
        let mut b = String::with_capacity(384 + self.plaintext_b64.len() + self.aad_b64.len());
        b.push_str(r#"{"requestMetadata":{"#);
        let kms_op = match op {
            Op::Health => "KmsHealthCheck",
            Op::Metadata => "CreateKey",
            Op::Encrypt => "Encrypt",
            Op::Decrypt => "Decrypt",
        };
        if op != Op::Health {
            b.push_str(r#""awsPrincipalArn":"arn:aws:iam::111122223333:role/kmsgate-bench","#);
            if op != Op::Metadata {
                b.push_str(&format!(r#""kmsKeyArn":"{}","#, self.key_arn));
            }
        }
        b.push_str(&format!(r#""kmsOperation":"{kms_op}","kmsRequestId":"{}-{seq}"}}"#, self.run_id));
        let key = match op {
            Op::Health => 0,
            Op::Decrypt => {
                let s = &self.samples[(seq as usize) % self.samples.len()];
                b.push_str(&format!(
                    r#","encryptionAlgorithm":"AES_GCM","ciphertext":"{}","initializationVector":"{}","authenticationTag":"{}""#,
                    s.ciphertext, s.iv, s.tag
                ));
                if let Some(m) = &s.metadata {
                    b.push_str(&format!(r#","ciphertextMetadata":"{m}""#));
                }
                if self.opts.aad_size > 0 {
                    b.push_str(&format!(r#","additionalAuthenticatedData":"{}""#, self.aad_b64));
                }
                s.key
            }
            Op::Encrypt => {
                b.push_str(&format!(r#","plaintext":"{}","encryptionAlgorithm":"AES_GCM""#, self.plaintext_b64));
                if self.opts.aad_size > 0 {
                    b.push_str(&format!(r#","additionalAuthenticatedData":"{}""#, self.aad_b64));
                }
                if self.opts.cdiv {
                    b.push_str(r#","ciphertextDataIntegrityValueAlgorithm":"SHA_256""#);
                }
                (seq as usize) % self.paths.len()
            }
            Op::Metadata => (seq as usize) % self.paths.len(),
        };
        b.push('}');
        (key, b)
    }

    /// Builds request `seq`, signed now.
    pub fn build(&self, seq: u64, signer: &mut Signer) -> anyhow::Result<http::Request<Body>> {
        let (key, body) = self.body(seq);
        let amz_date = sigv4::amz_date_now();
        let authority = self.target.endpoint.authority.as_str();
        let headers = [("content-type", "application/json"), ("host", authority), ("x-amz-date", amz_date.as_str())];
        let auth = signer.authorization(&SignInput {
            method: "POST",
            path: &self.paths[key],
            query: "",
            headers: &headers,
            payload: body.as_bytes(),
            amz_date: &amz_date,
        });
        let mut req = http::Request::builder()
            .method("POST")
            .uri(&self.uris[key])
            .header("content-type", "application/json")
            .header("x-amz-date", amz_date)
            .header("authorization", auth);
        if !self.target.endpoint.http2 {
            req = req.header("host", authority);
        }
        Ok(req.body(Body::new(Bytes::from(body)))?)
    }

    /// Checks a 200 answer in depth.
    fn verify(&self, body: &[u8]) -> Result<(), String> {
        let v: Value = serde_json::from_slice(body).map_err(|_| "verify: the answer is not JSON".to_owned())?;
        let b64 = |field: &str| -> Result<Option<Vec<u8>>, String> {
            match v.get(field) {
                None => Ok(None),
                Some(Value::String(s)) => B64.decode(s).map(Some).map_err(|_| format!("verify: {field} is not Base64")),
                Some(_) => Err(format!("verify: {field} is not a string")),
            }
        };
        let need = |field: &str| -> Result<Vec<u8>, String> { b64(field)?.ok_or(format!("verify: no {field}")) };
        match self.opts.op {
            Op::Encrypt => {
                let ct = need("ciphertext")?;
                let iv = need("initializationVector")?;
                let tag = need("authenticationTag")?;
                let md = b64("ciphertextMetadata")?.unwrap_or_default();
                if ct.len() != self.plaintext.len() {
                    return Err("verify: ciphertext length differs from the plaintext's".to_owned());
                }
                if iv.len() != 12 && iv.len() != 16 {
                    return Err("verify: initializationVector is not 12 or 16 bytes".to_owned());
                }
                if tag.len() != 16 {
                    return Err("verify: authenticationTag is not 16 bytes".to_owned());
                }
                if md.len() > 20 {
                    return Err("verify: ciphertextMetadata is over 20 bytes".to_owned());
                }
                match (self.opts.cdiv, v.get("ciphertextDataIntegrityValue").and_then(Value::as_str)) {
                    (true, Some(got)) if got == cdiv(&self.aad, &md, &iv, &ct, &tag) => Ok(()),
                    (true, Some(_)) => Err("verify: ciphertextDataIntegrityValue mismatch".to_owned()),
                    (true, None) => Err("verify: no ciphertextDataIntegrityValue".to_owned()),
                    (false, Some(_)) => Err("verify: unrequested ciphertextDataIntegrityValue".to_owned()),
                    (false, None) => Ok(()),
                }
            }
            Op::Decrypt => {
                if need("plaintext")? == self.plaintext {
                    Ok(())
                } else {
                    Err("verify: Decrypt returned another plaintext".to_owned())
                }
            }
            Op::Metadata => {
                let usage: Vec<&str> = v
                    .get("keyUsage")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                if v.get("keySpec").and_then(Value::as_str) != Some("AES_256") {
                    Err("verify: keySpec is not AES_256".to_owned())
                } else if !usage.contains(&"ENCRYPT") || !usage.contains(&"DECRYPT") || usage.len() > 10 {
                    Err("verify: keyUsage lacks ENCRYPT/DECRYPT or has over 10 entries".to_owned())
                } else if v.get("keyStatus").and_then(Value::as_str) != Some("ENABLED") {
                    Err("verify: keyStatus is not ENABLED".to_owned())
                } else {
                    Ok(())
                }
            }
            Op::Health => {
                let fleet = v.get("ekmFleetDetails").and_then(Value::as_array);
                let members_ok = fleet.is_some_and(|f| {
                    (1..=10).contains(&f.len())
                        && f.iter().all(|m| {
                            m.get("id").is_some_and(Value::is_string)
                                && m.get("model").is_some_and(Value::is_string)
                                && matches!(
                                    m.get("healthStatus").and_then(Value::as_str),
                                    Some("ACTIVE" | "DEGRADED" | "UNAVAILABLE")
                                )
                        })
                });
                let strings_ok = ["xksProxyVendor", "xksProxyModel", "ekmVendor"]
                    .iter()
                    .all(|f| v.get(*f).is_some_and(Value::is_string));
                if v.get("xksProxyFleetSize").and_then(Value::as_u64).is_none_or(|n| n == 0) {
                    Err("verify: xksProxyFleetSize is not a positive integer".to_owned())
                } else if !strings_ok || !members_ok {
                    Err("verify: malformed health fields".to_owned())
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// The label of a failed answer: its status and wire `errorName`.
pub fn error_label(status: u16, body: &[u8]) -> String {
    let name = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("errorName").and_then(Value::as_str).map(str::to_owned));
    match name {
        Some(n) if n.len() <= 64 && n.bytes().all(|b| b.is_ascii_alphanumeric()) => format!("{status} {n}"),
        _ => format!("{status} (no errorName)"),
    }
}

impl Workload for XksWorkload {
    type State = Signer;

    fn state(&self) -> Signer {
        Signer::new(&self.target.access_key_id, &self.target.secret, &self.target.region, XKS_SERVICE)
    }

    fn request(&self, seq: u64, signer: &mut Signer) -> anyhow::Result<http::Request<Body>> {
        self.build(seq, signer)
    }

    fn check(&self, _seq: u64, status: u16, body: &[u8], verify: bool) -> Result<(), String> {
        if status != 200 {
            return Err(error_label(status, body));
        }
        if verify { self.verify(body) } else { Ok(()) }
    }
}

/// Sends one request on `conn` and returns the answer body, failing with the wire error if it is not a
/// verified success.
pub async fn one(w: &XksWorkload, conn: &mut HttpConn, seq: u64) -> anyhow::Result<Bytes> {
    let mut signer = w.state();
    let (status, body) = conn.roundtrip(w.build(seq, &mut signer)?).await?;
    w.check(seq, status, &body, true).map_err(|e| anyhow::anyhow!("{} failed: {e}", w.opts.op.name()))?;
    Ok(body)
}

/// Makes `n` ciphertexts (spread over the keys) for a Decrypt workload; every answer is verified.
pub async fn make_samples(target: &XksTarget, opts: &XksOptions, n: usize) -> anyhow::Result<Vec<Sample>> {
    let enc = XksWorkload::new(target.clone(), XksOptions { op: Op::Encrypt, ..opts.clone() }, Vec::new())?;
    let mut conn = target.endpoint.connect().await?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let body = one(&enc, &mut conn, i as u64).await?;
        let v: Value = serde_json::from_slice(&body).context("Encrypt answer")?;
        let s = |f: &str| v.get(f).and_then(Value::as_str).map(str::to_owned);
        out.push(Sample {
            key: i % opts.key_ids.len().max(1),
            ciphertext: s("ciphertext").context("no ciphertext")?,
            iv: s("initializationVector").context("no initializationVector")?,
            tag: s("authenticationTag").context("no authenticationTag")?,
            metadata: s("ciphertextMetadata"),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::client::TlsOptions;

    #[test]
    fn cdiv_matches_the_specification_example() {
        // XKS API specification, Encrypt response example and Appendix C: 86 bytes in, this digest out.
        let d = |s: &str| B64.decode(s).unwrap();
        let got = cdiv(
            &d("cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n"),
            &d("a2V5X3ZlcnNpb249MQ=="),
            &d("HMrlRw85cAJUd5Ax"),
            &d("ghxkK1txeDNn3q8Y"),
            &d("vBxN2ncH1oEkR8WVXpmyYQ=="),
        );
        assert_eq!(got, "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc=");
    }

    #[test]
    fn error_labels() {
        assert_eq!(
            error_label(401, br#"{"errorName":"AuthenticationFailedException","errorMessage":"x"}"#),
            "401 AuthenticationFailedException"
        );
        assert_eq!(error_label(502, b"<html>bad gateway</html>"), "502 (no errorName)");
        assert_eq!(error_label(400, br#"{"errorName":"a b\nc"}"#), "400 (no errorName)");
    }

    async fn workload(op: Op, http2: bool, cdiv: bool) -> XksWorkload {
        let endpoint = Endpoint::new("http://127.0.0.1:8443", &TlsOptions::default(), http2).await.unwrap();
        let target = XksTarget {
            endpoint: Arc::new(endpoint),
            uri_path: "/bench/kms/xks/v1".into(),
            access_key_id: "ABCDEFGHIJKLMNOPQRSTUVWX".into(),
            secret: "c2VjcmV0".into(),
            region: "eu-west-1".into(),
        };
        let opts = XksOptions { op, key_ids: vec!["k1".into(), "k2".into()], plaintext_size: 32, aad_size: 16, cdiv };
        let samples =
            vec![Sample { key: 1, ciphertext: "Y3Q=".into(), iv: "aXY=".into(), tag: "dGFn".into(), metadata: None }];
        XksWorkload::new(target, opts, samples).unwrap()
    }

    #[tokio::test]
    async fn requests_are_unique_and_signed_over_what_is_sent() {
        let w = workload(Op::Encrypt, false, true).await;
        let mut signer = w.state();
        let a = w.build(0, &mut signer).unwrap();
        let b = w.build(1, &mut signer).unwrap();
        assert_eq!(a.uri(), "/bench/kms/xks/v1/keys/k1/encrypt");
        assert_eq!(b.uri(), "/bench/kms/xks/v1/keys/k2/encrypt");
        assert_eq!(a.headers()["host"], "127.0.0.1:8443");
        let auth = a.headers()["authorization"].to_str().unwrap().to_owned();
        assert!(auth.contains("/eu-west-1/kms-xks-proxy/aws4_request, SignedHeaders=content-type;host;x-amz-date,"));
        let body_a: Value =
            serde_json::from_slice(&http_body_util::BodyExt::collect(a.into_body()).await.unwrap().to_bytes()).unwrap();
        let body_b: Value =
            serde_json::from_slice(&http_body_util::BodyExt::collect(b.into_body()).await.unwrap().to_bytes()).unwrap();
        assert_ne!(body_a["requestMetadata"]["kmsRequestId"], body_b["requestMetadata"]["kmsRequestId"]);
        assert_eq!(B64.decode(body_a["plaintext"].as_str().unwrap()).unwrap().len(), 32);
        assert_eq!(B64.decode(body_a["additionalAuthenticatedData"].as_str().unwrap()).unwrap().len(), 16);
        assert_eq!(body_a["ciphertextDataIntegrityValueAlgorithm"], "SHA_256");
        assert_eq!(body_a["requestMetadata"]["kmsOperation"], "Encrypt");
    }

    #[tokio::test]
    async fn h2_requests_carry_the_authority_in_the_uri() {
        let w = workload(Op::Health, true, false).await;
        let r = w.build(5, &mut w.state()).unwrap();
        assert_eq!(r.uri(), "http://127.0.0.1:8443/bench/kms/xks/v1/health");
        assert!(r.headers().get("host").is_none());
        let d = workload(Op::Decrypt, false, false).await;
        let body = d.body(3).1;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["ciphertext"], "Y3Q=");
        assert_eq!(v["requestMetadata"]["kmsOperation"], "Decrypt");
        assert!(d.build(3, &mut d.state()).unwrap().uri().path().ends_with("/keys/k2/decrypt"));
    }

    #[tokio::test]
    async fn encrypt_answers_are_verified() {
        let w = workload(Op::Encrypt, false, true).await;
        let (ct, iv, tag) = (vec![1u8; 32], vec![2u8; 12], vec![3u8; 16]);
        let good = cdiv(&w.aad, b"", &iv, &ct, &tag);
        let answer = |cdiv: &str, tag: &[u8]| {
            serde_json::json!({
                "ciphertext": B64.encode(&ct), "initializationVector": B64.encode(&iv),
                "authenticationTag": B64.encode(tag), "ciphertextDataIntegrityValue": cdiv,
            })
            .to_string()
        };
        assert_eq!(w.check(0, 200, answer(&good, &tag).as_bytes(), true), Ok(()));
        assert_eq!(
            w.check(0, 200, answer("AAAA", &tag).as_bytes(), true),
            Err("verify: ciphertextDataIntegrityValue mismatch".into())
        );
        assert!(w.check(0, 200, answer(&good, &[3u8; 12]).as_bytes(), true).is_err());
        // Without verify only the status counts.
        assert_eq!(w.check(0, 200, b"not json", false), Ok(()));
        assert_eq!(
            w.check(0, 429, br#"{"errorName":"ThrottlingException"}"#, false),
            Err("429 ThrottlingException".into())
        );
    }
}

//! The Alibaba Cloud KMS instance API workload ("dkms-gcs-0.2"): protobuf `Encrypt` over `POST /`, each
//! request signed with the ClientKey's RSA key (RSASSA-PKCS1-v1_5 / SHA-256 over the string to sign, written
//! here from the published algorithm, not taken from the server). Every request carries its own sequence
//! number in the plaintext, so no two bodies, body hashes or signatures are alike: the server's replay cache
//! never sees a repeat.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use kmsgate_alibaba::proto;
use prost::Message as _;
use sha2::{Digest, Sha256};

use crate::client::Endpoint;
use crate::gateway::Gateway;
use crate::load::{Body, Workload};

pub const API_VERSION: &str = "dkms-gcs-0.2";
pub const SIGNATURE_METHOD: &str = "RSA_PKCS1_SHA_256";
/// Three "c"s: the header name is part of the protocol.
pub const ACCESS_KEY_HEADER: &str = "x-kms-acccesskeyid";

/// A ClientKey: its id and RSA private key.
#[derive(Debug, Clone)]
pub struct ClientKey {
    pub id: String,
    pub pair: Arc<RsaKeyPair>,
}

impl ClientKey {
    /// From a PEM private key (PKCS#1 `RSA PRIVATE KEY`, as `kmsgate alibaba client-keys create` writes it,
    /// or PKCS#8 `PRIVATE KEY`).
    pub fn from_pem(id: &str, pem: &str) -> anyhow::Result<ClientKey> {
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).map(str::trim).collect();
        let der = B64.decode(b64).context("the private key PEM is not Base64")?;
        let pair = if pem.contains("BEGIN RSA PRIVATE KEY") {
            RsaKeyPair::from_der(&der)
        } else {
            RsaKeyPair::from_pkcs8(&der)
        }
        .map_err(|e| anyhow::anyhow!("unreadable RSA private key: {e}"))?;
        Ok(ClientKey { id: id.to_owned(), pair: Arc::new(pair) })
    }
}

/// Issues a ClientKey on the gateway's store with its CLI (identity `kmsgate-bench`, the tenant's default
/// limits: `alibaba.client_key_qps = 0` is unlimited).
pub fn setup(gw: &mut Gateway, dir: &Path) -> anyhow::Result<ClientKey> {
    let out_dir = dir.join("alibaba");
    std::fs::create_dir_all(&out_dir)?;
    let out_dir_s = out_dir.to_string_lossy().into_owned();
    let out = gw.cli(&[
        "--json",
        "alibaba",
        "client-keys",
        "create",
        "--identity",
        "kmsgate-bench",
        "--out-dir",
        &out_dir_s,
    ])?;
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("unreadable client-keys output: {out}"))?;
    let id = v.get("id").and_then(|x| x.as_str()).context("no ClientKey id")?;
    let pem_path = v.get("private_key_file").and_then(|x| x.as_str()).context("no private_key_file")?;
    ClientKey::from_pem(id, &std::fs::read_to_string(pem_path)?)
}

/// RFC 1123 date in GMT, as the SDKs send it: `Sun, 22 Nov 2026 02:38:23 GMT`.
pub fn http_date(t: time::OffsetDateTime) -> String {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[usize::from(t.weekday().number_days_from_monday())],
        t.day(),
        MONTHS[usize::from(u8::from(t.month()) - 1)],
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The string to sign: `POST`, the body hash, content type, date, the `x-kms-*` headers sorted by name as
/// `name:value` lines, and the literal resource `/`.
pub fn string_to_sign(content_sha256: &str, content_type: &str, date: &str, kms: &[(&str, &str)]) -> String {
    let mut sorted: Vec<&(&str, &str)> = kms.iter().collect();
    sorted.sort();
    let mut s = format!("POST\n{content_sha256}\n{content_type}\n{date}\n");
    for (n, v) in sorted {
        s.push_str(n);
        s.push(':');
        s.push_str(v.trim());
        s.push('\n');
    }
    s.push('/');
    s
}

/// Instance API Encrypt (AES-GCM, the server picks the IV).
#[derive(Debug)]
pub struct AlibabaWorkload {
    endpoint: Arc<Endpoint>,
    client_key: ClientKey,
    key_id: String,
    plaintext: Vec<u8>,
    aad: Vec<u8>,
    uri: String,
    rng: SystemRandom,
    /// Requests built so far: load runs restart their sequence numbers, this does not.
    sent: AtomicU64,
}

impl AlibabaWorkload {
    pub fn new(
        endpoint: Arc<Endpoint>,
        client_key: ClientKey,
        key_id: &str,
        plaintext_size: usize,
        aad_size: usize,
    ) -> anyhow::Result<Self> {
        if plaintext_size < 16 {
            bail!("the Alibaba workload needs a plaintext of at least 16 bytes (it carries a run id and a number)");
        }
        let mut plaintext = crate::xks::pattern(plaintext_size, 7);
        aws_lc_rs::rand::fill(&mut plaintext[8..16]).map_err(|_| anyhow::anyhow!("no random run id"))?;
        Ok(AlibabaWorkload {
            uri: endpoint.uri("/"),
            endpoint,
            client_key,
            key_id: key_id.to_owned(),
            plaintext,
            aad: crate::xks::pattern(aad_size, 101),
            rng: SystemRandom::new(),
            sent: AtomicU64::new(0),
        })
    }

    fn plaintext(&self) -> Vec<u8> {
        let mut p = self.plaintext.clone();
        p[..8].copy_from_slice(&self.sent.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        p
    }

    pub fn build(&self) -> anyhow::Result<http::Request<Body>> {
        let msg = proto::EncryptRequest {
            key_id: self.key_id.clone(),
            plaintext: self.plaintext(),
            algorithm: "AES_GCM".to_owned(),
            aad: self.aad.clone(),
            iv: Vec::new(),
            padding_mode: String::new(),
        };
        let body = msg.encode_to_vec();
        let sha = hex::encode_upper(Sha256::digest(&body));
        let date = http_date(time::OffsetDateTime::now_utc());
        let content_type = "application/x-protobuf";
        let kms = [
            (ACCESS_KEY_HEADER, self.client_key.id.as_str()),
            ("x-kms-apiname", "Encrypt"),
            ("x-kms-apiversion", API_VERSION),
            ("x-kms-signaturemethod", SIGNATURE_METHOD),
        ];
        let sts = string_to_sign(&sha, content_type, &date, &kms);
        let pair = &self.client_key.pair;
        let mut sig = vec![0; pair.public_modulus_len()];
        pair.sign(&RSA_PKCS1_SHA256, &self.rng, sts.as_bytes(), &mut sig)
            .map_err(|_| anyhow::anyhow!("RSA signing failed"))?;
        let mut req = http::Request::builder()
            .method("POST")
            .uri(&self.uri)
            .header("accept", content_type)
            .header("content-type", content_type)
            .header("content-sha256", sha)
            .header("date", date)
            .header("authorization", format!("Bearer {}", B64.encode(sig)));
        for (n, v) in kms {
            req = req.header(n, v);
        }
        if !self.endpoint.http2 {
            req = req.header("host", self.endpoint.authority.as_str());
        }
        Ok(req.body(Body::new(Bytes::from(body)))?)
    }

    fn verify(&self, body: &[u8]) -> Result<(), String> {
        let r = proto::EncryptResponse::decode(body).map_err(|_| "verify: not an EncryptResponse".to_owned())?;
        if r.ciphertext_blob.len() != self.plaintext.len() + 16 {
            return Err("verify: CiphertextBlob is not ciphertext + 16-byte tag".to_owned());
        }
        if r.iv.len() != 12 {
            return Err("verify: Iv is not 12 bytes".to_owned());
        }
        if r.algorithm != "AES_GCM" {
            return Err(format!("verify: Algorithm {:?}", r.algorithm));
        }
        if r.key_id.is_empty() || r.request_id.is_empty() {
            return Err("verify: no KeyId or RequestId".to_owned());
        }
        Ok(())
    }
}

impl Workload for AlibabaWorkload {
    type State = ();

    fn state(&self) {}

    fn request(&self, _seq: u64, _: &mut ()) -> anyhow::Result<http::Request<Body>> {
        self.build()
    }

    fn check(&self, _seq: u64, status: u16, body: &[u8], verify: bool) -> Result<(), String> {
        if status != 200 {
            // Errors are a protobuf `Error` with the vendor's ErrorCode.
            let code = proto::Error::decode(body).map(|e| e.error_code).unwrap_or_default();
            return Err(if code.is_empty() { status.to_string() } else { format!("{status} {code}") });
        }
        if verify { self.verify(body) } else { Ok(()) }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn date_is_rfc1123_gmt() {
        let t = time::macros::datetime!(2026-11-22 02:38:23 UTC);
        assert_eq!(http_date(t), "Sun, 22 Nov 2026 02:38:23 GMT");
        let t = time::macros::datetime!(2027-01-04 09:05:07 +02:00);
        assert_eq!(http_date(t), "Mon, 04 Jan 2027 07:05:07 GMT");
    }

    #[test]
    fn string_to_sign_matches_the_documented_capture() {
        // The captured example of the protocol reference (body hash shortened there too).
        let sts = string_to_sign(
            "1449FBDD",
            "application/x-protobuf",
            "Sun, 22 Nov 2026 02:38:23 GMT",
            &[
                ("x-kms-signaturemethod", "RSA_PKCS1_SHA_256"),
                ("x-kms-apiname", "Encrypt"),
                (ACCESS_KEY_HEADER, "KAAP.30f5"),
                ("x-kms-apiversion", " dkms-gcs-0.2 "),
            ],
        );
        assert_eq!(
            sts,
            "POST\n1449FBDD\napplication/x-protobuf\nSun, 22 Nov 2026 02:38:23 GMT\nx-kms-acccesskeyid:KAAP.30f5\n\
             x-kms-apiname:Encrypt\nx-kms-apiversion:dkms-gcs-0.2\nx-kms-signaturemethod:RSA_PKCS1_SHA_256\n/"
        );
    }

    #[tokio::test]
    async fn the_signature_is_what_the_server_verifies() {
        // Cross-check with the frontend's own verifier: a string to sign that did not match the server's would
        // fail here rather than as a wall of 400s in a benchmark.
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let der: aws_lc_rs::encoding::Pkcs8V1Der = aws_lc_rs::encoding::AsDer::as_der(&pair).unwrap();
        let pem = format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", B64.encode(der.as_ref()));
        let key = ClientKey::from_pem("KAAP.bench", &pem).unwrap();
        let endpoint =
            Arc::new(Endpoint::new("http://127.0.0.1:1", &crate::client::TlsOptions::default(), false).await.unwrap());
        let w = AlibabaWorkload::new(endpoint, key.clone(), "k1", 32, 16).unwrap();
        let a = w.build().unwrap();
        let b = w.build().unwrap();
        let collect = |b: &Body| b.clone();
        let (body_a, body_b) = (collect(a.body()), collect(b.body()));
        let bytes = http_body_util::BodyExt::collect(body_a).await.unwrap().to_bytes();
        let other = http_body_util::BodyExt::collect(body_b).await.unwrap().to_bytes();
        assert_ne!(bytes, other, "every request is unique");
        assert_ne!(a.headers()["authorization"], b.headers()["authorization"]);
        let public = kmsgate_alibaba::clientkey::ClientKeyBody {
            identity: "bench".to_owned(),
            public_key: B64.encode(aws_lc_rs::signature::KeyPair::public_key(key.pair.as_ref()).as_ref()),
            revoked_at: None,
            description: String::new(),
            qps: None,
        };
        kmsgate_alibaba::auth::precheck(
            a.headers(),
            &bytes,
            std::time::SystemTime::now(),
            std::time::Duration::from_secs(60),
        )
        .expect("headers and body hash pass the server's checks");
        kmsgate_alibaba::auth::verify_signature(a.headers(), &public).expect("the server accepts the signature");
    }
}

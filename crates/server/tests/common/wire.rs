//! Signed requests of the vendor frontends over real sockets, for tests that drive a running server: XKS
//! (SigV4 with the crate's own signer) and the Alibaba instance API (RSA-SHA256 over the crate's own
//! string-to-sign).

use std::net::SocketAddr;

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http_body_util::Full;
use hyper::body::Bytes;
use serde_json::{Value, json};

use super::{Reply, send_on};

/// The SigV4 region the XKS helpers sign for.
pub const XKS_REGION: &str = "eu-west-1";

/// An XKS credential as `kmsgate xks credentials create` prints it.
#[derive(Debug, Clone)]
pub struct XksCred {
    pub akid: String,
    pub secret: String,
    pub uri_path: String,
}

impl XksCred {
    /// From the AWS console's JSON credential file.
    pub fn from_file(file: &Value) -> XksCred {
        let c = &file["XksProxyAuthenticationCredential"];
        XksCred {
            akid: c["AccessKeyId"].as_str().unwrap().to_owned(),
            secret: c["RawSecretAccessKey"].as_str().unwrap().to_owned(),
            uri_path: file["XksProxyUriPath"].as_str().unwrap().to_owned(),
        }
    }
}

/// One SigV4-signed XKS call (`op` is the path below the key store's URI path, e.g. `/health`) over plain
/// HTTP/1.1 on a fresh connection.
pub async fn xks_call(addr: SocketAddr, cred: &XksCred, op: &str, body: &Value) -> Reply {
    let host = addr.to_string();
    let path = format!("{}{op}", cred.uri_path);
    let bytes = body.to_string().into_bytes();
    let (date, auth) = kmsgate_xks::sigv4::sign(&kmsgate_xks::sigv4::ToSign {
        method: "POST",
        path: &path,
        query: None,
        headers: &[("host", &host), ("content-type", "application/json")],
        body: &bytes,
        access_key_id: &cred.akid,
        secret: &cred.secret,
        region: XKS_REGION,
        service: "kms-xks-proxy",
        time: time::OffsetDateTime::now_utc(),
    });
    let req = hyper::Request::builder()
        .method("POST")
        .uri(&path)
        .header("host", &host)
        .header("content-type", "application/json")
        .header("x-amz-date", date)
        .header("authorization", auth)
        .body(Full::new(Bytes::from(bytes)))
        .unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    send_on(stream, false, req).await.unwrap()
}

/// XKS `requestMetadata` for `op`.
pub fn xks_metadata(op: &str, request_id: &str) -> Value {
    json!({
        "awsPrincipalArn": "arn:aws:iam::123456789012:user/ReplicaProbe",
        "kmsKeyArn": "arn:aws:kms:eu-west-1:123456789012:key/1234abcd",
        "kmsOperation": op,
        "kmsRequestId": request_id,
    })
}

/// XKS Encrypt of `plaintext` under `key_id` (AES-GCM).
pub async fn xks_encrypt(addr: SocketAddr, cred: &XksCred, key_id: &str, plaintext: &[u8]) -> Reply {
    let body = json!({"requestMetadata": xks_metadata("Encrypt", "probe"),
        "plaintext": STANDARD.encode(plaintext), "encryptionAlgorithm": "AES_GCM"});
    xks_call(addr, cred, &format!("/keys/{key_id}/encrypt"), &body).await
}

/// XKS GetHealthStatus.
pub async fn xks_health(addr: SocketAddr, cred: &XksCred) -> Reply {
    let body = json!({"requestMetadata": {"kmsOperation": "KmsHealthCheck", "kmsRequestId": "health"}});
    xks_call(addr, cred, "/health", &body).await
}

/// Headers of an Alibaba instance API request signed like the SDK: RSA PKCS#1 v1.5 SHA-256 over the
/// string to sign that the frontend itself computes from the headers.
pub fn alibaba_headers(pair: &RsaKeyPair, client_key_id: &str, api: &str, body: &[u8]) -> hyper::HeaderMap {
    let sha = hex::encode_upper(digest::digest(&digest::SHA256, body));
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let mut h = hyper::HeaderMap::new();
    for (k, v) in [
        ("content-type", "application/x-protobuf"),
        ("content-sha256", &sha),
        ("date", &date),
        ("x-kms-acccesskeyid", client_key_id),
        ("x-kms-apiname", api),
        ("x-kms-apiversion", "dkms-gcs-0.2"),
        ("x-kms-signaturemethod", "RSA_PKCS1_SHA_256"),
    ] {
        h.insert(k, v.parse().unwrap());
    }
    let sts = kmsgate_alibaba::auth::string_to_sign(&h);
    let mut sig = vec![0; pair.public_modulus_len()];
    pair.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), sts.as_bytes(), &mut sig).unwrap();
    h.insert("authorization", format!("Bearer {}", STANDARD.encode(sig)).parse().unwrap());
    h
}

/// One signed Alibaba instance API call (`POST /`) over plain HTTP/1.1 on a fresh connection.
pub async fn alibaba_call(addr: SocketAddr, pair: &RsaKeyPair, client_key_id: &str, api: &str, body: Vec<u8>) -> Reply {
    let mut b = hyper::Request::builder().method("POST").uri("/").header("host", addr.to_string());
    for (k, v) in &alibaba_headers(pair, client_key_id, api, &body) {
        b = b.header(k, v);
    }
    let req = b.body(Full::new(Bytes::from(body))).unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    send_on(stream, false, req).await.unwrap()
}

/// The RSA key pair of a ClientKey from its PEM file as `kmsgate alibaba client-keys create` writes it
/// (PKCS#1 `RSA PRIVATE KEY`, what the SDKs take; PKCS#8 `PRIVATE KEY` is accepted too).
pub fn alibaba_key_pair(pem: &str) -> RsaKeyPair {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = STANDARD.decode(b64).unwrap();
    if pem.contains("BEGIN RSA PRIVATE KEY") {
        RsaKeyPair::from_der(&der).unwrap()
    } else {
        RsaKeyPair::from_pkcs8(&der).unwrap()
    }
}

//! The request path: size and content-type checks, authentication, then one dispatcher call per API.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use aws_lc_rs::digest;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kmsgate_core::metrics::WireLabels;
use kmsgate_core::{
    BlockPadding, Caller, DecryptRequest, Dispatcher, Document, EncryptReply, EncryptRequest, EncryptionAlgorithm,
    ErrorKind, Frontend, KeyRef, KeySpec, Precondition, SecretPath, SecretSelector, SignInput, SignRequest,
    SigningAlgorithm, TenantId,
};
use prost::Message;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::auth::{self, ReplayCache};
use crate::blob;
use crate::clientkey;
use crate::config::AlibabaConfig;
use crate::error::AliError;
use crate::proto;

/// Document kind of the (key version id → key id) index that lets AdvanceDecrypt find the key of a blob.
pub const KIND_VERSION_INDEX: &str = "alibaba.key_version";
pub const MIGRATION_HEADER: &str = "x-kms-migrationkeyversionid";

/// Shared state of the instance API frontend.
pub struct AlibabaState {
    pub(crate) dispatcher: Dispatcher,
    pub(crate) config: AlibabaConfig,
    replays: ReplayCache,
    limits: crate::limit::QpsLimiter,
}

impl std::fmt::Debug for AlibabaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlibabaState").field("config", &self.config).finish_non_exhaustive()
    }
}

impl AlibabaState {
    pub fn new(dispatcher: Dispatcher, config: AlibabaConfig) -> Self {
        let replays = ReplayCache::new(Duration::from_secs(config.max_clock_skew_secs));
        AlibabaState { dispatcher, config, replays, limits: crate::limit::QpsLimiter::default() }
    }
}

/// A successful reply: the encoded message and, for crypto/sign APIs, the key version for
/// `x-kms-migrationkeyversionid` (the TransferClient wrapper fails without it).
struct Reply {
    body: Vec<u8>,
    key_version: Option<Uuid>,
}

impl Reply {
    fn of(msg: &impl Message, key_version: Option<Uuid>) -> Self {
        Reply { body: msg.encode_to_vec(), key_version }
    }
}

pub async fn handle(State(state): State<Arc<AlibabaState>>, req: Request<Body>) -> Response {
    let started = Instant::now();
    let request_id = Uuid::new_v4().to_string();
    let api = req.headers().get("x-kms-apiname").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let mut key_id = String::new();
    let result = process(&state, req, &request_id, &api, &mut key_id).await;
    let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let labels = WireLabels {
        frontend: Frontend::AlibabaInstance,
        operation: api_label(&api),
        code: result.as_ref().err().map_or("ok", |e| e.code),
    };
    let mut response = match result {
        Ok(reply) => {
            let mut r = (StatusCode::OK, reply.body).into_response();
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
            if let Some(v) = reply.key_version.and_then(|v| HeaderValue::from_str(&v.to_string()).ok()) {
                h.insert(MIGRATION_HEADER, v);
            }
            r
        }
        Err(e) => e.into_response_with(&request_id),
    };
    response.extensions_mut().insert(labels);
    let status = response.status().as_u16();
    let api_shown = if api.len() <= 64 && api.bytes().all(|b| b.is_ascii_graphic()) { api.as_str() } else { "?" };
    if status >= 500 {
        tracing::warn!(target: "alibaba", api = api_shown, client_key = %key_id, request_id, status, latency_us, "alibaba request");
    } else {
        tracing::info!(target: "alibaba", api = api_shown, client_key = %key_id, request_id, status, latency_us, "alibaba request");
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-kms-request-id", v);
    }
    response
}

/// The API names `process` answers, for the request metrics' `operation` label (bounded: anything else a
/// caller sends is `unknown`).
const API_NAMES: &[&str] = &[
    "AdvanceDecrypt",
    "AdvanceEncrypt",
    "AdvanceGenerateDataKey",
    "AdvanceGenerateDataKeyPair",
    "AdvanceGenerateDataKeyPairWithoutPlaintext",
    "Decrypt",
    "Encrypt",
    "GenerateDataKey",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "GenerateRandom",
    "GetPublicKey",
    "GetSecretValue",
    "Hash",
    "Hmac",
    "Sign",
    "Verify",
];

fn api_label(api: &str) -> &'static str {
    API_NAMES.iter().find(|n| **n == api).copied().unwrap_or("unknown")
}

async fn process(
    state: &AlibabaState,
    req: Request<Body>,
    request_id: &str,
    api: &str,
    client_key_out: &mut String,
) -> Result<Reply, AliError> {
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    let body = read_body(body, state.config.max_body_bytes).await?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if content_type.split(';').next().map(str::trim) != Some("application/x-protobuf") {
        return Err(AliError::invalid_content_type());
    }
    if api.is_empty() {
        return Err(AliError::invalid_api_name(""));
    }
    let skew = Duration::from_secs(state.config.max_clock_skew_secs);
    let client_key = auth::precheck(&headers, &body, SystemTime::now(), skew)?;
    *client_key_out = client_key.chars().take(64).collect();
    let (tenant, key) =
        clientkey::lookup(&state.dispatcher, client_key).await?.ok_or_else(|| AliError::unauthorized(client_key))?;
    let signature = auth::verify_signature(&headers, &key)?;
    if !state.replays.first_use(client_key, &signature).await {
        // The signature is deterministic and the date has one-second resolution, so a legitimate client
        // repeating an identical request within a second produces the same bytes as a replay. Answering
        // Rejected.Throttling makes the SDK retry a second later with a fresh date (a new signature), while a
        // replayed capture, whose date cannot change, is refused every time.
        return Err(AliError::duplicate_signature());
    }
    // Only authenticated requests count against (and may exhaust) a ClientKey's budget.
    let qps = key.qps.unwrap_or(state.config.client_key_qps);
    if qps > 0 && !state.limits.admit(client_key, qps, Instant::now()) {
        return Err(AliError::throttled());
    }
    let caller = Caller {
        tenant,
        identity: key.identity.clone(),
        frontend: Frontend::AlibabaInstance,
        request_id: request_id.to_owned(),
        metadata: [("client_key".to_owned(), client_key.to_owned())].into_iter().collect(),
    };
    let ctx = Ctx { state, caller: &caller, headers: &headers, request_id, alias: AtomicBool::new(false) };
    let result = ctx.dispatch(api, &body).await;
    // The core reports an unknown alias as an unknown key; the vendor names the alias.
    match result {
        Err(e) if e.code == "Forbidden.KeyNotFound" && ctx.alias.load(Ordering::Relaxed) => {
            Err(AliError::alias_not_found())
        }
        other => other,
    }
}

impl Ctx<'_> {
    async fn dispatch(&self, api: &str, body: &[u8]) -> Result<Reply, AliError> {
        let ctx = self;
        match api {
            "Encrypt" => ctx.encrypt(decode(body)?).await,
            "Decrypt" => ctx.decrypt(decode(body)?).await,
            "GenerateDataKey" => ctx.generate_data_key(decode(body)?).await,
            "GenerateRandom" => ctx.generate_random(decode(body)?).await,
            "Sign" => ctx.sign(decode(body)?).await,
            "Verify" => ctx.verify(decode(body)?).await,
            "GetPublicKey" => ctx.get_public_key(decode(body)?).await,
            "Hmac" => ctx.hmac(decode(body)?).await,
            "Hash" => ctx.hash(decode(body)?),
            "GetSecretValue" => ctx.get_secret_value(decode(body)?).await,
            "AdvanceEncrypt" => ctx.advance_encrypt(decode(body)?).await,
            "AdvanceDecrypt" => ctx.advance_decrypt(decode(body)?).await,
            "AdvanceGenerateDataKey" => ctx.advance_generate_data_key(decode(body)?).await,
            "GenerateDataKeyPair" => {
                let r: proto::GenerateDataKeyPairRequest = decode(body)?;
                let p =
                    ctx.data_key_pair(&r.key_id, &r.algorithm, &r.key_pair_spec, &r.key_format, r.aad, false).await?;
                let msg = proto::GenerateDataKeyPairResponse {
                    key_id: p.key_id,
                    iv: p.iv,
                    key_pair_spec: r.key_pair_spec,
                    private_key_plaintext: p.private_plaintext.to_vec(),
                    private_key_ciphertext_blob: p.private_ciphertext,
                    public_key: p.public_key,
                    request_id: ctx.rid(),
                    algorithm: "AES_GCM".to_owned(),
                };
                Ok(Reply::of(&msg, None))
            }
            "GenerateDataKeyPairWithoutPlaintext" => {
                let r: proto::GenerateDataKeyPairWithoutPlaintextRequest = decode(body)?;
                let p =
                    ctx.data_key_pair(&r.key_id, &r.algorithm, &r.key_pair_spec, &r.key_format, r.aad, false).await?;
                let msg = proto::GenerateDataKeyPairWithoutPlaintextResponse {
                    key_id: p.key_id,
                    iv: p.iv,
                    key_pair_spec: r.key_pair_spec,
                    private_key_ciphertext_blob: p.private_ciphertext,
                    public_key: p.public_key,
                    request_id: ctx.rid(),
                    algorithm: "AES_GCM".to_owned(),
                };
                Ok(Reply::of(&msg, None))
            }
            "AdvanceGenerateDataKeyPair" => {
                let r: proto::AdvanceGenerateDataKeyPairRequest = decode(body)?;
                let p = ctx.data_key_pair(&r.key_id, "", &r.key_pair_spec, &r.key_format, r.aad, true).await?;
                let msg = proto::AdvanceGenerateDataKeyPairResponse {
                    key_id: p.key_id,
                    iv: p.iv,
                    key_pair_spec: r.key_pair_spec,
                    private_key_plaintext: p.private_plaintext.to_vec(),
                    private_key_ciphertext_blob: p.private_ciphertext,
                    public_key: p.public_key,
                    request_id: ctx.rid(),
                    algorithm: "AES_GCM".to_owned(),
                    key_version_id: p.version.to_string(),
                };
                Ok(Reply::of(&msg, None))
            }
            "AdvanceGenerateDataKeyPairWithoutPlaintext" => {
                let r: proto::AdvanceGenerateDataKeyPairWithoutPlaintextRequest = decode(body)?;
                let p = ctx.data_key_pair(&r.key_id, "", &r.key_pair_spec, &r.key_format, r.aad, true).await?;
                let msg = proto::AdvanceGenerateDataKeyPairWithoutPlaintextResponse {
                    key_id: p.key_id,
                    iv: p.iv,
                    key_pair_spec: r.key_pair_spec,
                    private_key_ciphertext_blob: p.private_ciphertext,
                    public_key: p.public_key,
                    request_id: ctx.rid(),
                    algorithm: "AES_GCM".to_owned(),
                    key_version_id: p.version.to_string(),
                };
                Ok(Reply::of(&msg, None))
            }
            other => Err(AliError::invalid_api_name(other)),
        }
    }
}

/// Reads the body up to `limit` bytes. A larger body is drained (up to twice the limit) before the 413 goes
/// out: answering while the client is still sending makes it see a connection reset instead of our error.
async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, AliError> {
    use http_body_util::BodyExt as _;
    let mut body = body;
    let mut out = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| AliError::invalid_parameter("The request body could not be read."))?;
        let Ok(data) = frame.into_data() else { continue };
        seen = seen.saturating_add(data.len());
        if seen <= limit {
            out.extend_from_slice(&data);
        } else if seen > limit.saturating_mul(2) {
            break;
        }
    }
    if seen > limit {
        return Err(AliError::body_too_large());
    }
    Ok(out.freeze())
}

fn decode<M: Message + Default>(body: &[u8]) -> Result<M, AliError> {
    M::decode(body).map_err(|_| AliError::invalid_parameter("The request body is not a valid protobuf message."))
}

fn parse_key_ref(key_id: &str) -> Result<KeyRef, AliError> {
    if key_id.is_empty() {
        return Err(AliError::missing_parameter("KeyId"));
    }
    KeyRef::parse(key_id).map_err(|_| AliError::invalid_parameter("The specified parameter KeyId is not valid."))
}

fn encryption_algorithm(name: &str, padding: &str) -> Result<Option<EncryptionAlgorithm>, AliError> {
    let block_padding = || match padding {
        // PKCS7_PADDING is the documented default of the block modes.
        "" | "PKCS7_PADDING" => Ok(BlockPadding::Pkcs7),
        "NO_PADDING" => Ok(BlockPadding::NoPadding),
        _ => Err(AliError::invalid_parameter("The specified parameter PaddingMode is not valid.")),
    };
    match name {
        "" => Ok(None),
        "AES_GCM" if padding.is_empty() => Ok(Some(EncryptionAlgorithm::AesGcm)),
        "RSAES_OAEP_SHA_256" => Ok(Some(EncryptionAlgorithm::RsaOaepSha256)),
        "AES_CBC" => Ok(Some(EncryptionAlgorithm::AesCbc(block_padding()?))),
        "AES_ECB" => Ok(Some(EncryptionAlgorithm::AesEcb(block_padding()?))),
        "AES_GCM" => Err(AliError::invalid_parameter("The specified parameter PaddingMode is not valid.")),
        "SM4_GCM" | "SM4_CBC" | "SM4_ECB" | "SM2PKE" | "RSAES_OAEP_SHA_1" | "ECIES_DH_SHA_1_XOR_HMAC" => {
            Err(AliError::unsupported("Rejected.UnsupportedOperation"))
        }
        _ => Err(AliError::invalid_parameter("The specified parameter Algorithm is not valid.")),
    }
}

fn algorithm_name(alg: EncryptionAlgorithm) -> &'static str {
    match alg {
        EncryptionAlgorithm::AesGcm => "AES_GCM",
        EncryptionAlgorithm::RsaOaepSha256 => "RSAES_OAEP_SHA_256",
        EncryptionAlgorithm::AesCbc(_) => "AES_CBC",
        EncryptionAlgorithm::AesEcb(_) => "AES_ECB",
    }
}

/// The `PaddingMode` a response names: the block modes' padding, nothing for the others.
fn padding_name(alg: EncryptionAlgorithm) -> &'static str {
    match alg.block_mode() {
        Some((_, BlockPadding::Pkcs7)) => "PKCS7_PADDING",
        Some((_, BlockPadding::NoPadding)) => "NO_PADDING",
        None => "",
    }
}

fn signing_algorithm(name: &str) -> Result<SigningAlgorithm, AliError> {
    match name {
        "RSA_PKCS1_SHA_256" => Ok(SigningAlgorithm::RsaPkcs1Sha256),
        "RSA_PSS_SHA_256" => Ok(SigningAlgorithm::RsaPssSha256),
        "ECDSA_SHA_256" => Ok(SigningAlgorithm::EcdsaSha256),
        "" => Err(AliError::missing_parameter("Algorithm")),
        "SM2DSA" => Err(AliError::unsupported("Rejected.UnsupportedOperation")),
        _ => Err(AliError::invalid_parameter("The specified parameter Algorithm is not valid.")),
    }
}

fn sign_input(message_type: &str, message: Vec<u8>, digest: Vec<u8>) -> Result<SignInput, AliError> {
    match message_type {
        "RAW" => Ok(SignInput::Message(message)),
        "" | "DIGEST" if !digest.is_empty() => Ok(SignInput::Digest(digest)),
        // The SDK sends Message with MessageType DIGEST when the caller passed a digest as the message.
        "DIGEST" => Ok(SignInput::Digest(message)),
        "" => Err(AliError::missing_parameter("Digest")),
        _ => Err(AliError::invalid_parameter("The specified parameter MessageType is not valid.")),
    }
}

/// The ascii name of a data key length; the SDK default is 32 bytes.
fn data_key_len(n: i32) -> Result<usize, AliError> {
    match n {
        0 => Ok(32),
        1..=1024 => Ok(usize::try_from(n).unwrap_or(32)),
        _ => Err(AliError::invalid_parameter("The specified parameter NumberOfBytes is not valid.")),
    }
}

/// A data key pair with its private half encrypted under a master key.
struct SealedPair {
    key_id: String,
    version: Uuid,
    iv: Vec<u8>,
    private_plaintext: Zeroizing<Vec<u8>>,
    private_ciphertext: Vec<u8>,
    public_key: Vec<u8>,
}

struct Ctx<'a> {
    state: &'a AlibabaState,
    caller: &'a Caller,
    headers: &'a HeaderMap,
    request_id: &'a str,
    /// Whether the request named its key by alias (for the not-found message).
    alias: AtomicBool,
}

impl Ctx<'_> {
    fn key_ref(&self, key_id: &str) -> Result<KeyRef, AliError> {
        let key = parse_key_ref(key_id)?;
        self.alias.store(matches!(key, KeyRef::Alias(_)), Ordering::Relaxed);
        Ok(key)
    }

    fn d(&self) -> &Dispatcher {
        &self.state.dispatcher
    }

    fn rid(&self) -> String {
        self.request_id.to_owned()
    }

    /// The symmetric (6 KB) or asymmetric (1 KB) payload limit of the key's spec.
    async fn check_payload(&self, key: &KeyRef, len: usize) -> Result<(), AliError> {
        let k = self.d().resolve(&self.caller.tenant, key).await?;
        let limit = if k.spec.is_symmetric() {
            self.state.config.max_symmetric_plaintext_bytes
        } else {
            self.state.config.max_asymmetric_plaintext_bytes
        };
        if len > limit {
            return Err(AliError::invalid_parameter(format!("The payload exceeds {limit} bytes.")));
        }
        Ok(())
    }

    async fn encrypt_core(
        &self,
        key_id: &str,
        plaintext: Vec<u8>,
        algorithm: &str,
        padding: &str,
        aad: Vec<u8>,
        iv: Vec<u8>,
    ) -> Result<EncryptReply, AliError> {
        let plaintext = Zeroizing::new(plaintext);
        let key = self.key_ref(key_id)?;
        self.check_payload(&key, plaintext.len()).await?;
        let algorithm = encryption_algorithm(algorithm, padding)?;
        let iv = if iv.is_empty() { None } else { Some(iv) };
        Ok(self.d().encrypt(self.caller, EncryptRequest { key, algorithm, plaintext, aad, iv }).await?)
    }

    async fn encrypt(&self, r: proto::EncryptRequest) -> Result<Reply, AliError> {
        let e = self.encrypt_core(&r.key_id, r.plaintext, &r.algorithm, &r.padding_mode, r.aad, r.iv).await?;
        let mut ciphertext_blob = e.ciphertext;
        ciphertext_blob.extend_from_slice(&e.tag);
        let msg = proto::EncryptResponse {
            key_id: e.key_id.to_string(),
            ciphertext_blob,
            iv: e.iv,
            request_id: self.rid(),
            algorithm: algorithm_name(e.algorithm).to_owned(),
            padding_mode: padding_name(e.algorithm).to_owned(),
        };
        Ok(Reply::of(&msg, Some(e.version)))
    }

    async fn decrypt(&self, r: proto::DecryptRequest) -> Result<Reply, AliError> {
        let key = self.key_ref(&r.key_id)?;
        let algorithm = encryption_algorithm(&r.algorithm, &r.padding_mode)?;
        let k = self.d().resolve(&self.caller.tenant, &key).await?;
        let alg = algorithm.or_else(|| EncryptionAlgorithm::default_for(k.spec));
        let (ciphertext, tag) = if alg == Some(EncryptionAlgorithm::AesGcm) {
            if r.ciphertext_blob.len() < blob::TAG_LEN {
                return Err(AliError::invalid_parameter("The specified parameter CiphertextBlob is not valid."));
            }
            let (c, t) = r.ciphertext_blob.split_at(r.ciphertext_blob.len() - blob::TAG_LEN);
            (c.to_vec(), t.to_vec())
        } else {
            (r.ciphertext_blob, Vec::new())
        };
        // The wrapper passes the version it got from Encrypt; without it, try the primary then older versions
        // (the vendor's Encrypt is tied to one version too, so old blobs keep opening after a rotation).
        let named = self
            .headers
            .get(MIGRATION_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Uuid::parse_str(v).ok())
            .filter(|v| k.version(*v).is_some());
        let authenticated = matches!(alg, Some(EncryptionAlgorithm::AesGcm | EncryptionAlgorithm::RsaOaepSha256));
        let mut candidates: Vec<Uuid> = match named {
            Some(v) => vec![v],
            // CBC and ECB carry no tag: a wrong version would "decrypt" to garbage, so only the primary is tried.
            None if !authenticated => vec![k.primary_version],
            None => std::iter::once(k.primary_version)
                .chain(k.versions.iter().rev().map(|v| v.id).filter(|v| *v != k.primary_version))
                .collect(),
        };
        candidates.truncate(16);
        let mut last = None;
        for version in candidates {
            let req = DecryptRequest {
                key: key.clone(),
                version: Some(version),
                algorithm: alg,
                iv: r.iv.clone(),
                aad: r.aad.clone(),
                ciphertext: ciphertext.clone(),
                tag: tag.clone(),
            };
            match self.d().decrypt(self.caller, req).await {
                Ok(p) => {
                    let msg = proto::DecryptResponse {
                        key_id: p.key_id.to_string(),
                        plaintext: p.plaintext.to_vec(),
                        request_id: self.rid(),
                        algorithm: alg.map(algorithm_name).unwrap_or_default().to_owned(),
                        padding_mode: alg.map(padding_name).unwrap_or_default().to_owned(),
                    };
                    return Ok(Reply::of(&msg, Some(p.version)));
                }
                Err(e) if e.kind() == ErrorKind::InvalidCiphertext => last = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last.map(AliError::from).unwrap_or_else(AliError::internal))
    }

    async fn generate_data_key(&self, r: proto::GenerateDataKeyRequest) -> Result<Reply, AliError> {
        let key = self.key_ref(&r.key_id)?;
        if !matches!(r.algorithm.as_str(), "" | "AES_GCM") {
            return Err(AliError::unsupported("Rejected.UnsupportedOperation"));
        }
        let len = data_key_len(r.number_of_bytes)?;
        let dk = self.d().generate_data_key(self.caller, &key, len, r.aad).await?;
        let e = dk.encrypted;
        let mut ciphertext_blob = e.ciphertext;
        ciphertext_blob.extend_from_slice(&e.tag);
        let msg = proto::GenerateDataKeyResponse {
            key_id: e.key_id.to_string(),
            iv: e.iv,
            plaintext: dk.plaintext.to_vec(),
            ciphertext_blob,
            request_id: self.rid(),
            algorithm: algorithm_name(e.algorithm).to_owned(),
        };
        Ok(Reply::of(&msg, Some(e.version)))
    }

    async fn generate_random(&self, r: proto::GenerateRandomRequest) -> Result<Reply, AliError> {
        let len = match r.length {
            0 => return Err(AliError::missing_parameter("Length")),
            1..=1024 => usize::try_from(r.length).unwrap_or(1),
            _ => return Err(AliError::invalid_parameter("The specified parameter Length is not valid.")),
        };
        let random = self.d().random(self.caller, len).await?;
        Ok(Reply::of(&proto::GenerateRandomResponse { random, request_id: self.rid() }, None))
    }

    async fn sign(&self, r: proto::SignRequest) -> Result<Reply, AliError> {
        let key = self.key_ref(&r.key_id)?;
        let algorithm = signing_algorithm(&r.algorithm)?;
        self.check_payload(&key, r.message.len()).await?;
        let input = sign_input(&r.message_type, r.message, r.digest)?;
        let s = self.d().sign(self.caller, SignRequest { key, algorithm, input, version: None }).await?;
        let msg = proto::SignResponse {
            key_id: s.key_id.to_string(),
            signature: s.signature,
            request_id: self.rid(),
            algorithm: r.algorithm,
            message_type: r.message_type,
        };
        Ok(Reply::of(&msg, Some(s.version)))
    }

    async fn verify(&self, r: proto::VerifyRequest) -> Result<Reply, AliError> {
        let key = self.key_ref(&r.key_id)?;
        let algorithm = signing_algorithm(&r.algorithm)?;
        self.check_payload(&key, r.message.len()).await?;
        let k = self.d().resolve(&self.caller.tenant, &key).await?;
        let input = sign_input(&r.message_type, r.message, r.digest)?;
        let version = Some(k.primary_version);
        let value = self.d().verify(self.caller, SignRequest { key, algorithm, input, version }, &r.signature).await?;
        let msg = proto::VerifyResponse {
            key_id: k.id.to_string(),
            value,
            request_id: self.rid(),
            algorithm: r.algorithm,
            message_type: r.message_type,
        };
        Ok(Reply::of(&msg, version))
    }

    async fn get_public_key(&self, r: proto::GetPublicKeyRequest) -> Result<Reply, AliError> {
        let key = self.key_ref(&r.key_id)?;
        let p = self.d().get_public_key(self.caller, &key, None).await?;
        let msg = proto::GetPublicKeyResponse {
            key_id: p.key_id.to_string(),
            public_key: pem("PUBLIC KEY", &p.der),
            request_id: self.rid(),
        };
        Ok(Reply::of(&msg, Some(p.version)))
    }

    async fn hmac(&self, r: proto::HmacRequest) -> Result<Reply, AliError> {
        let key = self.key_ref(&r.key_id)?;
        if r.message.len() > self.state.config.max_symmetric_plaintext_bytes {
            return Err(AliError::invalid_parameter("The payload is too large."));
        }
        let (key_id, signature) = self.d().hmac(self.caller, &key, &r.message).await?;
        Ok(Reply::of(&proto::HmacResponse { key_id: key_id.to_string(), signature, request_id: self.rid() }, None))
    }

    fn hash(&self, r: proto::HashRequest) -> Result<Reply, AliError> {
        match r.algorithm.as_str() {
            "" | "SHA_256" | "SHA256" => {}
            "SM3" => return Err(AliError::unsupported("Rejected.UnsupportedOperation")),
            _ => return Err(AliError::invalid_parameter("The specified parameter Algorithm is not valid.")),
        }
        if r.message.len() > self.state.config.max_symmetric_plaintext_bytes {
            return Err(AliError::invalid_parameter("The payload is too large."));
        }
        let d = digest::digest(&digest::SHA256, &r.message).as_ref().to_vec();
        Ok(Reply::of(&proto::HashResponse { digest: d, request_id: self.rid() }, None))
    }

    async fn get_secret_value(&self, r: proto::GetSecretValueRequest) -> Result<Reply, AliError> {
        if r.secret_name.is_empty() {
            return Err(AliError::missing_parameter("SecretName"));
        }
        let path = SecretPath::parse(&r.secret_name)
            .map_err(|_| AliError::invalid_parameter("The specified parameter SecretName is not valid."))?;
        let selector = if !r.version_id.is_empty() {
            SecretSelector::VersionId(r.version_id)
        } else {
            match r.version_stage.as_str() {
                "" | "ACSCurrent" => SecretSelector::Current,
                "ACSPrevious" => SecretSelector::Stage(kmsgate_core::STAGE_PREVIOUS.to_owned()),
                other => SecretSelector::Stage(other.to_owned()),
            }
        };
        let v = self.d().get_secret_value(self.caller, &path, &selector).await?;
        let (data, data_type) = match std::str::from_utf8(&v.data) {
            Ok(s) => (s.to_owned(), "text"),
            Err(_) => (STANDARD.encode(&*v.data), "binary"),
        };
        let stages = v
            .version
            .stages
            .iter()
            .map(|s| match s.as_str() {
                kmsgate_core::STAGE_CURRENT => "ACSCurrent".to_owned(),
                kmsgate_core::STAGE_PREVIOUS => "ACSPrevious".to_owned(),
                other => other.to_owned(),
            })
            .collect();
        let msg = proto::GetSecretValueResponse {
            secret_name: v.secret.path.to_string(),
            secret_type: v.secret.secret_type.clone(),
            secret_data: data,
            secret_data_type: data_type.to_owned(),
            version_stages: stages,
            version_id: v.version.version_id.clone(),
            create_time: v.version.created_at.to_rfc3339(),
            request_id: self.rid(),
            automatic_rotation: "Disabled".to_owned(),
            ..Default::default()
        };
        Ok(Reply::of(&msg, None))
    }

    /// Generates a data key pair and encrypts its private key (in `KeyFormat`) with AES-GCM under the master
    /// key: as ciphertext‖tag with a separate IV, or as an Advance blob.
    async fn data_key_pair(
        &self,
        key_id: &str,
        algorithm: &str,
        spec: &str,
        format: &str,
        aad: Vec<u8>,
        advance: bool,
    ) -> Result<SealedPair, AliError> {
        let key = self.key_ref(key_id)?;
        if !matches!(algorithm, "" | "AES_GCM") {
            return Err(AliError::unsupported("Rejected.UnsupportedOperation"));
        }
        let pair = crate::keypair::generate(spec)?;
        // PEM private keys are PKCS#8 ("PRIVATE KEY") whatever the spec.
        let private_plaintext = Zeroizing::new(crate::keypair::encode(format, "PRIVATE KEY", &pair.private_pkcs8)?);
        let public_key = crate::keypair::encode(format, "PUBLIC KEY", &pair.public_spki)?;
        let req = EncryptRequest {
            key,
            algorithm: Some(EncryptionAlgorithm::AesGcm),
            plaintext: private_plaintext.clone(),
            aad,
            iv: None,
        };
        let e = self.d().encrypt(self.caller, req).await?;
        let private_ciphertext = if advance {
            self.index_version(e.version, e.key_id.as_str()).await?;
            blob::encode(e.version, &e.iv, &e.ciphertext, &e.tag)
        } else {
            let mut c = e.ciphertext;
            c.extend_from_slice(&e.tag);
            c
        };
        Ok(SealedPair {
            key_id: e.key_id.to_string(),
            version: e.version,
            iv: e.iv,
            private_plaintext,
            private_ciphertext,
            public_key,
        })
    }

    /// Records which key a version id belongs to, once per version, so AdvanceDecrypt can find it.
    async fn index_version(&self, version: Uuid, key_id: &str) -> Result<(), AliError> {
        let id = version.to_string();
        if self.d().document(KIND_VERSION_INDEX, &id).await?.is_some() {
            return Ok(());
        }
        let doc =
            Document::new(KIND_VERSION_INDEX, &id, self.caller.tenant.clone(), serde_json::json!({ "key_id": key_id }));
        // Internal bookkeeping, written as the tenant's administrator (with this request's id for the audit
        // trail) so that a policy limiting the client to crypto operations does not break AdvanceEncrypt.
        let mut admin = Caller::admin(self.caller.tenant.clone());
        admin.request_id = self.caller.request_id.clone();
        match self.d().put_document(&admin, doc, Precondition::Absent).await {
            Ok(_) => Ok(()),
            // Another request indexed it first.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn key_of_version(&self, tenant: &TenantId, version: Uuid) -> Result<KeyRef, AliError> {
        let not_found = AliError::key_version_not_found;
        let doc = self.d().document(KIND_VERSION_INDEX, &version.to_string()).await?.ok_or_else(not_found)?;
        if &doc.tenant != tenant {
            return Err(not_found());
        }
        let id = doc.body.get("key_id").and_then(|v| v.as_str()).ok_or_else(AliError::internal)?;
        KeyRef::parse(id).map_err(|_| AliError::internal())
    }

    async fn advance_encrypt(&self, r: proto::AdvanceEncryptRequest) -> Result<Reply, AliError> {
        if !matches!(r.algorithm.as_str(), "" | "AES_GCM") {
            return Err(AliError::unsupported("Rejected.UnsupportedOperation"));
        }
        let e = self.encrypt_core(&r.key_id, r.plaintext, "AES_GCM", &r.padding_mode, r.aad, r.iv).await?;
        self.index_version(e.version, e.key_id.as_str()).await?;
        let msg = proto::AdvanceEncryptResponse {
            key_id: e.key_id.to_string(),
            ciphertext_blob: blob::encode(e.version, &e.iv, &e.ciphertext, &e.tag),
            iv: e.iv,
            request_id: self.rid(),
            algorithm: "AES_GCM".to_owned(),
            padding_mode: r.padding_mode,
            key_version_id: e.version.to_string(),
        };
        Ok(Reply::of(&msg, None))
    }

    async fn advance_decrypt(&self, r: proto::AdvanceDecryptRequest) -> Result<Reply, AliError> {
        let b = blob::decode(&r.ciphertext_blob)
            .ok_or_else(|| AliError::invalid_parameter("The specified parameter CiphertextBlob is not valid."))?;
        let key = match r.key_id.as_str() {
            "" => self.key_of_version(&self.caller.tenant, b.version).await?,
            id => self.key_ref(id)?,
        };
        let req = DecryptRequest {
            key,
            version: Some(b.version),
            algorithm: Some(EncryptionAlgorithm::AesGcm),
            iv: b.iv,
            aad: r.aad,
            ciphertext: b.ciphertext,
            tag: b.tag,
        };
        let p = self.d().decrypt(self.caller, req).await?;
        let msg = proto::AdvanceDecryptResponse {
            key_id: p.key_id.to_string(),
            plaintext: p.plaintext.to_vec(),
            request_id: self.rid(),
            algorithm: "AES_GCM".to_owned(),
            padding_mode: r.padding_mode,
            key_version_id: p.version.to_string(),
        };
        Ok(Reply::of(&msg, None))
    }

    async fn advance_generate_data_key(&self, r: proto::AdvanceGenerateDataKeyRequest) -> Result<Reply, AliError> {
        let key = self.key_ref(&r.key_id)?;
        let len = data_key_len(r.number_of_bytes)?;
        let k = self.d().resolve(&self.caller.tenant, &key).await?;
        if k.spec != KeySpec::Aes256 {
            return Err(AliError::from(kmsgate_core::Error::new(
                ErrorKind::InvalidKeyUsage,
                "the key is not symmetric",
            )));
        }
        let dk = self.d().generate_data_key(self.caller, &key, len, r.aad).await?;
        let e = dk.encrypted;
        self.index_version(e.version, e.key_id.as_str()).await?;
        let msg = proto::AdvanceGenerateDataKeyResponse {
            key_id: e.key_id.to_string(),
            ciphertext_blob: blob::encode(e.version, &e.iv, &e.ciphertext, &e.tag),
            iv: e.iv,
            plaintext: dk.plaintext.to_vec(),
            request_id: self.rid(),
            algorithm: "AES_GCM".to_owned(),
            key_version_id: e.version.to_string(),
        };
        Ok(Reply::of(&msg, None))
    }
}

pub(crate) fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

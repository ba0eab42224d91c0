//! The request path: route by URI path to a key store, authenticate with SigV4, throttle, parse, authorize
//! on request metadata, then one dispatcher call per operation; one log line per request.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kmsgate_core::metrics::{Limiter, WireLabels};
use kmsgate_core::{
    Caller, Change, ChangeKind, DecryptRequest, Dispatcher, Document, EncryptRequest, EncryptionAlgorithm, ErrorKind,
    Frontend, Key, KeyId, KeyRef, KeySpec, KeyState, KeyUsage, TenantId, constant_time_eq,
};
use moka::future::Cache;
use serde_json::json;

use crate::config::XksConfig;
use crate::crypto;
use crate::error::{ErrorName, XksError};
use crate::health::{HealthCache, is_internal};
use crate::keystore::{API_SUFFIX, CredentialBody, KIND_CREDENTIAL, KIND_PATH, KIND_STORE, KeyStoreBody, Quota};
use crate::rules::{Decision, XksOperation};
use crate::sigv4::{self, Failure};
use crate::wire::{self, Route};

/// Signing keys cached per (access key id, credential revision, date, region): derived once, and a changed
/// credential document (new revision) can never reuse an old entry.
type SigningKeyId = (String, i64, String, String);

/// Shared state of the XKS frontend.
pub struct XksState {
    pub(crate) dispatcher: Dispatcher,
    pub(crate) config: XksConfig,
    signing_keys: Cache<SigningKeyId, Arc<[u8; 32]>>,
    /// Key store configurations parsed once per (name, revision), not once per request.
    parsed_stores: Cache<(String, i64), Arc<KeyStoreBody>>,
    buckets: Mutex<HashMap<String, Bucket>>,
    pub(crate) health: HealthCache,
}

impl std::fmt::Debug for XksState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XksState").field("config", &self.config).finish_non_exhaustive()
    }
}

/// A token bucket of one key store on this replica.
#[derive(Debug)]
struct Bucket {
    quota: Quota,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, quota: Quota, now: Instant) -> bool {
        if self.quota != quota {
            // The quota was edited: start over with a full bucket of the new size.
            *self = Bucket { quota, tokens: f64::from(quota.burst), last: now };
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(quota.rps)).min(f64::from(quota.burst));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl XksState {
    pub fn new(dispatcher: Dispatcher, config: XksConfig) -> Self {
        XksState {
            dispatcher,
            config,
            signing_keys: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(24 * 3600))
                .support_invalidation_closures()
                .build(),
            parsed_stores: Cache::builder().max_capacity(10_000).build(),
            buckets: Mutex::new(HashMap::new()),
            health: HealthCache::default(),
        }
    }

    /// Drops derived signing keys of a credential that changed or went away (belt and braces: the revision
    /// in the cache key already keeps stale entries unused).
    pub(crate) fn on_change(&self, change: &Change) {
        if change.kind != ChangeKind::Document {
            return;
        }
        if let Some(akid) = change.id.strip_prefix(KIND_CREDENTIAL).and_then(|r| r.strip_prefix('/')) {
            let akid = akid.to_owned();
            let _ = self.signing_keys.invalidate_entries_if(move |k, _| k.0 == akid);
        }
    }

    pub(crate) fn forget_signing_keys(&self) {
        self.signing_keys.invalidate_all();
    }

    fn admit(&self, store: &str, quota: Option<Quota>) -> bool {
        let Some(q) = quota else { return true };
        let now = Instant::now();
        let Ok(mut map) = self.buckets.lock() else { return true };
        let bucket =
            map.entry(store.to_owned()).or_insert_with(|| Bucket { quota: q, tokens: f64::from(q.burst), last: now });
        bucket.take(q, now)
    }

    /// Request bodies larger than this cannot be valid for our size limits.
    fn body_limit(&self) -> usize {
        wire::b64_len(self.config.max_plaintext_bytes)
            .saturating_add(wire::b64_len(self.config.max_aad_bytes))
            .saturating_add(64 * 1024)
    }
}

/// What the request log line says.
#[derive(Debug, Default)]
struct LogLine {
    uri_path: String,
    store: String,
    operation: &'static str,
    key_id: String,
    access_key_id: String,
    kms_operation: String,
    kms_request_id: String,
    aws_principal_arn: String,
    rule: String,
    auth_failure: &'static str,
}

pub async fn handle(State(state): State<Arc<XksState>>, req: Request<Body>) -> Response {
    let started = Instant::now();
    let mut log = LogLine { operation: "Unknown", ..LogLine::default() };
    let (response, outcome) = match process(&state, req, &mut log).await {
        Ok(r) if r.status() == StatusCode::METHOD_NOT_ALLOWED => (r, "MethodNotAllowed"),
        Ok(r) => (r, "ok"),
        Err(e) => {
            let name = e.name.as_str();
            (e.into_response(), name)
        }
    };
    let mut response = response;
    response.extensions_mut().insert(WireLabels { frontend: Frontend::Xks, operation: log.operation, code: outcome });
    let status = response.status();
    let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    macro_rules! line {
        ($level:ident) => {
            tracing::$level!(
                target: "xks",
                uri_path = %log.uri_path,
                store = %log.store,
                operation = log.operation,
                key_id = %log.key_id,
                access_key_id = %log.access_key_id,
                kms_operation = %log.kms_operation,
                kms_request_id = %log.kms_request_id,
                aws_principal_arn = %log.aws_principal_arn,
                rule = %log.rule,
                auth_failure = log.auth_failure,
                status = status.as_u16(),
                outcome,
                latency_us,
                "xks request"
            )
        };
    }
    if status.is_server_error() {
        line!(warn);
    } else {
        line!(info);
    }
    response
}

fn json_response(body: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => {
            let mut r = (StatusCode::OK, bytes).into_response();
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(_) => XksError::internal("cannot encode the response").into_response(),
    }
}

/// Candidate URI paths of a request path: each place `/kms/xks/v1` ends a prefix, longest first.
fn candidates(path: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(pos) = path[from..].find(API_SUFFIX) {
        let end = from + pos + API_SUFFIX.len();
        if end > 128 {
            break;
        }
        if path[end..].is_empty() || path[end..].starts_with('/') {
            out.push((end, &path[..end]));
        }
        from = from + pos + 1;
        if out.len() >= 8 {
            break;
        }
    }
    out.reverse();
    out
}

/// The key store serving `path`, its URI path and the rest of the path.
async fn find_store<'p>(d: &Dispatcher, path: &'p str) -> Result<Option<(Arc<Document>, &'p str, &'p str)>, XksError> {
    for (end, uri_path) in candidates(path) {
        let Some(index) = d.document(KIND_PATH, uri_path).await? else { continue };
        let Some(name) = index.body.get("store").and_then(|s| s.as_str()) else { continue };
        let Some(store) = d.document(KIND_STORE, name).await? else { continue };
        if store.body.get("uri_path").and_then(|s| s.as_str()) != Some(uri_path) {
            continue;
        }
        return Ok(Some((store, uri_path, &path[end..])));
    }
    Ok(None)
}

async fn read_body(state: &XksState, body: Body, headers: &axum::http::HeaderMap) -> Result<Vec<u8>, XksError> {
    let limit = state.body_limit();
    let too_large = || XksError::unsupported("the request is larger than this proxy's configured limits");
    if let Some(len) =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok())
        && len > limit
    {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map(|b| b.to_vec()).map_err(|_| too_large())
}

fn auth_failed(log: &mut LogLine, f: Failure) -> XksError {
    log.auth_failure = f.as_str();
    XksError::authentication()
}

/// SigV4 against the key store's credentials; returns the access key id.
async fn authenticate(
    state: &XksState,
    store: &Document,
    parts: &sigv4::RequestParts<'_>,
    log: &mut LogLine,
) -> Result<String, XksError> {
    let now = time::OffsetDateTime::now_utc();
    let prepared = sigv4::prepare(parts, now, state.config.clock_skew_secs, |r| state.config.region_allowed(r))
        .map_err(|f| auth_failed(log, f))?;
    let auth = &prepared.authorization;
    log.access_key_id.clone_from(&auth.access_key_id);
    let d = &state.dispatcher;
    let Some(cred) = d.document(KIND_CREDENTIAL, &auth.access_key_id).await? else {
        return Err(auth_failed(log, Failure::UnknownCredential));
    };
    // Credentials are per key store: one store's credential never opens another's prefix.
    if cred.body.get("store").and_then(|s| s.as_str()) != Some(store.id.as_str()) || cred.tenant != store.tenant {
        return Err(auth_failed(log, Failure::UnknownCredential));
    }
    let id: SigningKeyId = (auth.access_key_id.clone(), cred.revision, auth.date.clone(), auth.region.clone());
    let tenant = store.tenant.clone();
    let akid = auth.access_key_id.clone();
    let (date, region) = (auth.date.clone(), auth.region.clone());
    let key = state
        .signing_keys
        .try_get_with(id, async move {
            let body: CredentialBody = serde_json::from_value(cred.body.clone())
                .map_err(|_| XksError::internal("a stored credential is unreadable"))?;
            let sealed = STANDARD
                .decode(&body.sealed_secret)
                .map_err(|_| XksError::internal("a stored credential is unreadable"))?;
            let caller = Caller {
                tenant,
                identity: akid.clone(),
                frontend: Frontend::Xks,
                request_id: uuid::Uuid::new_v4().to_string(),
                metadata: BTreeMap::new(),
            };
            let secret = d.unseal(&caller, &crate::keystore::seal_purpose(&akid), &sealed).await.map_err(|e| {
                tracing::error!(target: "xks", access_key_id = %akid, error = %e, "cannot unseal an XKS credential");
                XksError::from(e)
            })?;
            Ok::<_, XksError>(Arc::new(sigv4::signing_key(&secret, &date, &region, sigv4::SERVICE)))
        })
        .await
        .map_err(|e: Arc<XksError>| (*e).clone())?;
    sigv4::verify(&prepared, &key).map_err(|f| auth_failed(log, f))?;
    Ok(auth.access_key_id.clone())
}

async fn process(state: &XksState, req: Request<Body>, log: &mut LogLine) -> Result<Response, XksError> {
    let d = &state.dispatcher;
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    // Unknown prefixes are refused before authentication: credentials belong to a key store.
    let Some((store_doc, uri_path, rest)) = find_store(d, path).await? else {
        log.uri_path = path.chars().take(256).collect();
        return Err(XksError::uri_path());
    };
    log.uri_path = uri_path.to_owned();
    log.store.clone_from(&store_doc.id);
    let route = Route::parse(rest);
    log.operation = route.name();
    if let Some(k) = route.key_id() {
        // Only an overlong id pays for the character walk; request ids are short.
        log.key_id = if k.len() <= 128 { k.to_owned() } else { k.chars().take(128).collect() };
    }
    if route != Route::Unknown && parts.method != Method::POST {
        let mut r = StatusCode::METHOD_NOT_ALLOWED.into_response();
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
        return Ok(r);
    }
    let store = state
        .parsed_stores
        .try_get_with((store_doc.id.clone(), store_doc.revision), async {
            serde_json::from_value::<KeyStoreBody>(store_doc.body.clone()).map(Arc::new)
        })
        .await
        .map_err(|_| XksError::internal("the key store configuration is unreadable"))?;
    let body = read_body(state, body, &parts.headers).await?;
    let sig_parts = sigv4::RequestParts {
        method: parts.method.as_str(),
        path,
        query: parts.uri.query(),
        headers: &parts.headers,
        authority: parts.uri.authority().map(|a| a.as_str()),
        body: &body,
    };
    let access_key_id = authenticate(state, &store_doc, &sig_parts, log).await?;
    if route == Route::Unknown {
        return Err(XksError::uri_path());
    }
    if !state.admit(&store_doc.id, store.quota) {
        state.dispatcher.metrics().rate_limited(Frontend::Xks, Limiter::Frontend);
        return Err(XksError::new(ErrorName::ThrottlingException, "the key store's request quota is exceeded"));
    }

    let fallback_request_id = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned);
    let ctx = Ctx { state, store: store.as_ref(), store_name: &store_doc.id, tenant: &store_doc.tenant };
    let note = |md: &BTreeMap<String, String>, log: &mut LogLine| {
        log.kms_operation = md.get("kmsOperation").cloned().unwrap_or_default();
        log.kms_request_id = md.get("kmsRequestId").cloned().unwrap_or_default();
        log.aws_principal_arn = md.get("awsPrincipalArn").cloned().unwrap_or_default();
    };
    // Built once authorization passed, from the metadata itself (no copy of it).
    let make_caller = |mut metadata: BTreeMap<String, String>| {
        let request_id = metadata
            .get("kmsRequestId")
            .cloned()
            .or_else(|| fallback_request_id.clone())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        metadata.insert("xksKeyStore".to_owned(), store_doc.id.clone());
        Caller {
            tenant: store_doc.tenant.clone(),
            identity: access_key_id.clone(),
            frontend: Frontend::Xks,
            request_id,
            metadata,
        }
    };

    match &route {
        Route::Health => {
            // The spec's error table excludes ValidationException from GetHealthStatus: the proxy's health does
            // not depend on the metadata, so a malformed body is logged (empty fields) and answered anyway.
            let md = wire::parse_json::<wire::MetadataOnly>(&body)
                .and_then(|b| wire::request_metadata(&route, b.request_metadata.as_ref()))
                .unwrap_or_default();
            note(&md, log);
            let health = state.health.get(d, &state.config, &store_doc.tenant).await;
            Ok(json_response(health.as_ref()))
        }
        Route::Metadata(key_id) => {
            let b: wire::MetadataOnly = wire::parse_json(&body)?;
            let md = wire::request_metadata(&route, b.request_metadata.as_ref())?;
            note(&md, log);
            ctx.authorize(XksOperation::Metadata, &md, log)?;
            let caller = make_caller(md);
            let key = ctx.allowed_key(key_id).await?;
            let key = d.describe_key(&caller, &KeyRef::Id(key.id.clone())).await?;
            let usage: Vec<&str> = key.usage.iter().take(10).map(|u| u.as_str()).collect();
            Ok(json_response(&json!({
                "keySpec": key.spec.as_str(),
                "keyUsage": usage,
                "keyStatus": if key.state == KeyState::Enabled { "ENABLED" } else { "DISABLED" },
            })))
        }
        Route::Encrypt(key_id) => {
            let b: wire::EncryptBody = wire::parse_json(&body)?;
            let md = wire::request_metadata(&route, b.request_metadata.as_ref())?;
            note(&md, log);
            let plaintext = wire::b64_secret("plaintext", b.plaintext.as_deref())?;
            wire::require_aes_gcm(b.encryption_algorithm.as_deref())?;
            let aad = wire::b64("additionalAuthenticatedData", b.additional_authenticated_data.as_deref(), false)?
                .unwrap_or_default();
            let integrity = match b.ciphertext_data_integrity_value_algorithm.as_deref() {
                None => false,
                Some("SHA_256") => true,
                Some(_) => return Err(XksError::validation("ciphertextDataIntegrityValueAlgorithm must be SHA_256")),
            };
            ctx.check_sizes(plaintext.len(), aad.len())?;
            ctx.authorize(XksOperation::Encrypt, &md, log)?;
            let caller = make_caller(md);
            let key = ctx.allowed_key(key_id).await?;
            ctx.encrypt(&caller, key, plaintext, &aad, integrity).await
        }
        Route::Decrypt(key_id) => {
            let b: wire::DecryptBody = wire::parse_json(&body)?;
            let md = wire::request_metadata(&route, b.request_metadata.as_ref())?;
            note(&md, log);
            let ciphertext = wire::b64("ciphertext", b.ciphertext.as_deref(), true)?.unwrap_or_default();
            let metadata = wire::b64("ciphertextMetadata", b.ciphertext_metadata.as_deref(), false)?;
            wire::require_aes_gcm(b.encryption_algorithm.as_deref())?;
            let aad = wire::b64("additionalAuthenticatedData", b.additional_authenticated_data.as_deref(), false)?
                .unwrap_or_default();
            let iv = wire::b64("initializationVector", b.initialization_vector.as_deref(), true)?.unwrap_or_default();
            let tag = wire::b64("authenticationTag", b.authentication_tag.as_deref(), true)?.unwrap_or_default();
            if iv.len() != 12 && iv.len() != 16 {
                return Err(XksError::validation("initializationVector must be 12 or 16 bytes"));
            }
            // The spec states the tag size as an input rule ("MUST be 16 bytes"), like the IV length: a tag
            // of another size is malformed input, while a 16-byte tag that fails to verify is an invalid
            // ciphertext.
            if tag.len() != 16 {
                return Err(XksError::validation("authenticationTag must be 16 bytes"));
            }
            if metadata.as_ref().is_some_and(|m| m.len() > crypto::METADATA_MAX) {
                return Err(XksError::validation("ciphertextMetadata must be at most 20 bytes"));
            }
            ctx.check_sizes(ciphertext.len(), aad.len())?;
            ctx.authorize(XksOperation::Decrypt, &md, log)?;
            let caller = make_caller(md);
            let key = ctx.allowed_key(key_id).await?;
            // Ours always carry metadata naming the key version; a 16-byte IV was never produced here.
            let Some(metadata) = metadata else { return Err(XksError::invalid_ciphertext()) };
            let Some(version) = crypto::parse_metadata(&metadata) else { return Err(XksError::invalid_ciphertext()) };
            if iv.len() != 12 {
                return Err(XksError::invalid_ciphertext());
            }
            let hsm_aad = crypto::backend_aad(&aad, &metadata)
                .ok_or_else(|| XksError::unsupported("the additional authenticated data is too large"))?;
            let reply = d
                .decrypt(
                    &caller,
                    DecryptRequest {
                        key: KeyRef::Id(key.id.clone()),
                        // The version comes from the metadata but is looked up among the URI key's versions
                        // only: metadata can never select another key.
                        version: Some(version),
                        algorithm: Some(EncryptionAlgorithm::AesGcm),
                        iv,
                        aad: hsm_aad,
                        ciphertext,
                        tag,
                    },
                )
                .await?;
            let plaintext = zeroize::Zeroizing::new(STANDARD.encode(reply.plaintext.as_slice()));
            Ok(json_response(&json!({ "plaintext": plaintext.as_str() })))
        }
        Route::Unknown => Err(XksError::uri_path()),
    }
}

/// Per-request view of the key store.
struct Ctx<'a> {
    state: &'a XksState,
    store: &'a KeyStoreBody,
    store_name: &'a str,
    tenant: &'a TenantId,
}

impl Ctx<'_> {
    fn check_sizes(&self, data: usize, aad: usize) -> Result<(), XksError> {
        if data > self.state.config.max_plaintext_bytes {
            return Err(XksError::unsupported(format!(
                "the data is larger than this proxy's limit of {} bytes",
                self.state.config.max_plaintext_bytes
            )));
        }
        if aad > self.state.config.max_aad_bytes {
            return Err(XksError::unsupported(format!(
                "the additional authenticated data is larger than this proxy's limit of {} bytes",
                self.state.config.max_aad_bytes
            )));
        }
        Ok(())
    }

    fn authorize(&self, op: XksOperation, md: &BTreeMap<String, String>, log: &mut LogLine) -> Result<(), XksError> {
        match self.store.rules.evaluate(op, md) {
            Decision::Allow(rule) => {
                log.rule = rule.unwrap_or_default();
                Ok(())
            }
            Decision::Deny(rule) => {
                let rule = rule.unwrap_or_else(|| "(no allow rule matched)".to_owned());
                tracing::info!(
                    target: "xks",
                    store = %self.store_name,
                    operation = op.as_str(),
                    rule = %rule,
                    aws_principal_arn = md.get("awsPrincipalArn").map(String::as_str).unwrap_or(""),
                    kms_operation = md.get("kmsOperation").map(String::as_str).unwrap_or(""),
                    kms_via_service = md.get("kmsViaService").map(String::as_str).unwrap_or(""),
                    "secondary authorization denied the request"
                );
                log.rule.clone_from(&rule);
                Err(XksError::new(
                    ErrorName::AccessDeniedException,
                    format!("secondary authorization denied the request (rule {rule})"),
                ))
            }
        }
    }

    /// The URI's key if this key store serves it: in the store's tenant, allowed by its key list (or any
    /// AES key when all keys are allowed), and never one of kmsgate's internal keys.
    async fn allowed_key(&self, key_id: &str) -> Result<Arc<Key>, XksError> {
        let d = &self.state.dispatcher;
        let id = KeyId::parse(key_id).map_err(|_| XksError::key_not_found())?;
        let key = match d.resolve(self.tenant, &KeyRef::Id(id)).await {
            Ok(k) => k,
            Err(e) if matches!(e.kind(), ErrorKind::KeyNotFound | ErrorKind::AliasNotFound) => {
                return Err(XksError::key_not_found());
            }
            Err(e) => return Err(e.into()),
        };
        if is_internal(&key) {
            return Err(XksError::key_not_found());
        }
        let allowed = if self.store.all_keys {
            key.spec == KeySpec::Aes256
        } else if self.store.keys.iter().any(|k| k == key_id) {
            true
        } else {
            let mut found = false;
            for entry in self.store.keys.iter().filter(|k| k.starts_with("alias/")) {
                if let Ok(r) = KeyRef::parse(entry)
                    && let Ok(target) = d.resolve(self.tenant, &r).await
                    && target.id == key.id
                {
                    found = true;
                    break;
                }
            }
            found
        };
        if allowed { Ok(key) } else { Err(XksError::key_not_found()) }
    }

    async fn encrypt(
        &self,
        caller: &Caller,
        key: Arc<Key>,
        plaintext: zeroize::Zeroizing<Vec<u8>>,
        aad: &[u8],
        integrity: bool,
    ) -> Result<Response, XksError> {
        let d = &self.state.dispatcher;
        // Checked before encrypting: KMS relies on the integrity value meaning "this will decrypt".
        if integrity && !key.usage.contains(KeyUsage::Decrypt) {
            return Err(XksError::new(
                ErrorName::InvalidKeyUsageException,
                "a ciphertext data integrity value needs a key that can also decrypt",
            ));
        }
        // The metadata (and so the AAD) names the version before the backend runs, and the dispatcher encrypts
        // under exactly that version: a rotation landing in between changes nothing for this request.
        let version = key.primary_version;
        let metadata = crypto::metadata(version);
        let hsm_aad = crypto::backend_aad(aad, &metadata)
            .ok_or_else(|| XksError::unsupported("the additional authenticated data is too large"))?;
        let req = EncryptRequest {
            key: KeyRef::Id(key.id.clone()),
            algorithm: Some(EncryptionAlgorithm::AesGcm),
            plaintext,
            aad: hsm_aad,
            iv: None,
        };
        let reply = d.encrypt_version(caller, &req, version).await?;
        if reply.version != version
            || reply.iv.len() != 12
            || reply.tag.len() != 16
            || reply.ciphertext.len() != req.plaintext.len()
        {
            return Err(XksError::internal("the key manager returned a malformed ciphertext"));
        }
        let b64 = |bytes: &[u8]| STANDARD.encode(bytes);
        let mut cdiv_b64 = None;
        if integrity {
            // Appendix C: the value is computed before the trial decrypt, so a corruption after it shows.
            let cdiv = crypto::integrity_value(aad, &metadata, &reply.iv, &reply.ciphertext, &reply.tag);
            let EncryptRequest { plaintext, aad: hsm_aad, .. } = req;
            let trial = d
                .decrypt(
                    caller,
                    DecryptRequest {
                        key: KeyRef::Id(key.id.clone()),
                        version: Some(version),
                        algorithm: Some(EncryptionAlgorithm::AesGcm),
                        iv: reply.iv.clone(),
                        aad: hsm_aad,
                        ciphertext: reply.ciphertext.clone(),
                        tag: reply.tag.clone(),
                    },
                )
                .await;
            match trial {
                Ok(p) if constant_time_eq(p.plaintext.as_slice(), plaintext.as_slice()) => {}
                Err(e) if e.kind() == ErrorKind::DependencyTimeout => return Err(e.into()),
                Ok(_) | Err(_) => {
                    tracing::error!(target: "xks", key_id = %key.id, "the trial decrypt after encrypt failed");
                    return Err(XksError::internal("the encryption could not be verified; retry"));
                }
            }
            cdiv_b64 = Some(b64(&cdiv));
        }
        Ok(json_response(&EncryptAnswer {
            authentication_tag: &b64(&reply.tag),
            ciphertext: &b64(&reply.ciphertext),
            ciphertext_data_integrity_value: cdiv_b64.as_deref(),
            ciphertext_metadata: &b64(&metadata),
            initialization_vector: &b64(&reply.iv),
        }))
    }
}

/// The Encrypt answer, serialised straight from borrowed strings (no intermediate JSON map).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct EncryptAnswer<'a> {
    authentication_tag: &'a str,
    ciphertext: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ciphertext_data_integrity_value: Option<&'a str>,
    ciphertext_metadata: &'a str,
    initialization_vector: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_prefixes() {
        assert_eq!(candidates("/kms/xks/v1/health"), vec![(11, "/kms/xks/v1")]);
        assert_eq!(candidates("/a/b/kms/xks/v1/keys/k/encrypt"), vec![(15, "/a/b/kms/xks/v1")]);
        assert_eq!(
            candidates("/kms/xks/v1/kms/xks/v1/health"),
            vec![(22, "/kms/xks/v1/kms/xks/v1"), (11, "/kms/xks/v1")]
        );
        assert!(candidates("/kms/xks/v10/health").is_empty());
        assert!(candidates("/healthz").is_empty());
        assert!(candidates(&format!("/{}/kms/xks/v1/health", "a".repeat(200))).is_empty());
    }

    #[test]
    fn token_bucket() {
        let q = Quota { rps: 10, burst: 3 };
        let t0 = Instant::now();
        let mut b = Bucket { quota: q, tokens: 3.0, last: t0 };
        assert!(b.take(q, t0));
        assert!(b.take(q, t0));
        assert!(b.take(q, t0));
        assert!(!b.take(q, t0));
        assert!(b.take(q, t0 + Duration::from_millis(110)));
        assert!(!b.take(q, t0 + Duration::from_millis(110)));
        // A new quota starts a full bucket.
        let q2 = Quota { rps: 1, burst: 5 };
        for _ in 0..5 {
            assert!(b.take(q2, t0 + Duration::from_millis(120)));
        }
        assert!(!b.take(q2, t0 + Duration::from_millis(120)));
    }
}

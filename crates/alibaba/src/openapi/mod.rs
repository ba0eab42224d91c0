//! The Alibaba Cloud KMS OpenAPI (RPC style, `Version=2016-01-20`) on the same listener and path as the
//! instance API: a `POST /` with `x-kms-*` headers or a protobuf body is the instance API, every other request
//! to `/` (GET or POST, action in `Action` or `x-acs-action`) is the OpenAPI. Parameters come from the query string
//! and an `application/x-www-form-urlencoded` body; answers are JSON, or XML with `Format=XML`.

pub mod accesskey;
mod actions;
pub mod error;
mod import;
pub mod params;
mod render;
pub mod sign;

use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use axum::response::Response;
use kmsgate_core::{Caller, Dispatcher, Frontend};
use uuid::Uuid;

use crate::config::AlibabaConfig;
use crate::limit::QpsLimiter;
pub use error::{OapiError, status_and_code};
use params::Params;
use render::Format;

pub const VERSION: &str = "2016-01-20";

/// Shared state of the OpenAPI frontend.
pub struct OpenApiState {
    pub(crate) dispatcher: Dispatcher,
    pub(crate) config: AlibabaConfig,
    nonces: sign::NonceCache,
    limits: QpsLimiter,
}

impl std::fmt::Debug for OpenApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenApiState").field("config", &self.config).finish_non_exhaustive()
    }
}

impl OpenApiState {
    pub fn new(dispatcher: Dispatcher, config: AlibabaConfig) -> Self {
        let nonces = sign::NonceCache::new(Duration::from_secs(config.max_clock_skew_secs));
        OpenApiState { dispatcher, config, nonces, limits: QpsLimiter::default() }
    }
}

/// The actions the OpenAPI answers: the bounded `operation` values of the request metrics (anything else is
/// `unknown`, never the caller's text).
pub const ACTIONS: &[&str] = &[
    "CreateKey",
    "DescribeKey",
    "ListKeys",
    "EnableKey",
    "DisableKey",
    "ScheduleKeyDeletion",
    "CancelKeyDeletion",
    "UpdateKeyDescription",
    "CreateKeyVersion",
    "ListKeyVersions",
    "DescribeKeyVersion",
    "TagResource",
    "UntagResource",
    "ListResourceTags",
    "CreateAlias",
    "UpdateAlias",
    "DeleteAlias",
    "ListAliases",
    "ListAliasesByKeyId",
    "Encrypt",
    "Decrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "ReEncrypt",
    "AsymmetricSign",
    "AsymmetricVerify",
    "AsymmetricEncrypt",
    "AsymmetricDecrypt",
    "GetPublicKey",
    "GenerateMac",
    "VerifyMac",
    "CreateSecret",
    "PutSecretValue",
    "GetSecretValue",
    "DescribeSecret",
    "ListSecrets",
    "DeleteSecret",
    "RestoreSecret",
    "ListSecretVersionIds",
    "UpdateSecretVersionStage",
    "GetRandomPassword",
    "GetParametersForImport",
    "ImportKeyMaterial",
    "DeleteKeyMaterial",
    "Generic",
    "SecretName",
    "Description",
    "TagKey",
];

/// The metrics operation label of an action.
pub fn action_label(action: &str) -> &'static str {
    ACTIONS.iter().find(|a| **a == action).copied().unwrap_or("unknown")
}

/// One OpenAPI request, answered in the requested format.
pub async fn handle(state: &OpenApiState, req: Request<Body>) -> Response {
    let started = Instant::now();
    let request_id = Uuid::new_v4().to_string().to_uppercase();
    let query = req.uri().query().unwrap_or("").to_owned();
    // The format is known before anything else can fail, so even a bad signature answers in XML when asked.
    let format = Format::of_query(&query);
    let mut action = String::new();
    let mut access_key = String::new();
    let result = process(state, req, &query, &request_id, &mut action, &mut access_key).await;
    let labels = kmsgate_core::metrics::WireLabels {
        frontend: kmsgate_core::Frontend::AlibabaOpenApi,
        operation: action_label(&action),
        code: result.as_ref().err().map_or("ok", |e| e.code),
    };
    let mut response = match result {
        Ok(body) => render::success(format, &action, body, &request_id),
        Err(e) => render::error(format, &e, &request_id),
    };
    response.extensions_mut().insert(labels);
    let status = response.status().as_u16();
    let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let action = error::shown(&action);
    let access_key = error::shown(&access_key);
    if status >= 500 {
        tracing::warn!(target: "alibaba_openapi", action, access_key, request_id, status, latency_us, "openapi request");
    } else {
        tracing::info!(target: "alibaba_openapi", action, access_key, request_id, status, latency_us, "openapi request");
    }
    response
}

/// Reads the body up to `limit` bytes. A larger body is drained (up to twice the limit) before the 413 goes
/// out: answering while the client is still sending makes it see a connection reset instead of our error.
async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, OapiError> {
    use http_body_util::BodyExt as _;
    let mut body = body;
    let mut out = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| OapiError::parse_failure("The request body could not be read."))?;
        let Ok(data) = frame.into_data() else { continue };
        seen = seen.saturating_add(data.len());
        if seen <= limit {
            out.extend_from_slice(&data);
        } else if seen > limit.saturating_mul(2) {
            break;
        }
    }
    if seen > limit {
        return Err(OapiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "InvalidParameter",
            "The request body is too large.",
        ));
    }
    Ok(out.freeze())
}

async fn process(
    state: &OpenApiState,
    req: Request<Body>,
    query: &str,
    request_id: &str,
    action_out: &mut String,
    access_key_out: &mut String,
) -> Result<serde_json::Value, OapiError> {
    let (parts, body) = req.into_parts();
    if parts.method != Method::GET && parts.method != Method::POST {
        return Err(OapiError::unsupported_method());
    }
    let headers: HeaderMap = parts.headers;
    let body = read_body(body, state.config.max_body_bytes).await?;
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim_start().starts_with("application/x-www-form-urlencoded"));
    let query_only = Params::parse(query, None)?;
    let params = Params::parse(query, form.then_some(&body[..]))?;
    let acs_action = headers.get("x-acs-action").and_then(|v| v.to_str().ok());
    let action = params.opt("Action").or(acs_action).ok_or_else(|| OapiError::missing("Action"))?.to_owned();
    *action_out = action.chars().take(64).collect();
    let version = params.opt("Version").or_else(|| headers.get("x-acs-version").and_then(|v| v.to_str().ok()));
    match version {
        Some(VERSION) => {}
        Some(_) => return Err(OapiError::invalid("Version")),
        None => return Err(OapiError::missing("Version")),
    }
    let window = Duration::from_secs(state.config.max_clock_skew_secs);
    let claim = sign::claim(&headers, &params, &body, SystemTime::now(), window)?;
    *access_key_out = claim.access_key_id.chars().take(64).collect();
    let (tenant, identity, secret) = match accesskey::lookup(&state.dispatcher, &claim.access_key_id).await? {
        accesskey::Lookup::Active { tenant, identity, secret } => (tenant, identity, secret),
        accesskey::Lookup::Revoked => return Err(OapiError::access_key_revoked()),
        accesskey::Lookup::Unknown => return Err(OapiError::access_key_not_found()),
    };
    sign::verify(&claim, &secret, &parts.method, parts.uri.path(), &query_only.0, &params.0, &headers)?;
    drop(secret);
    // Only after the signature verified, so nobody can spend another key's nonces.
    if !state.nonces.first_use(&claim.access_key_id, &claim.nonce).await {
        return Err(OapiError::nonce_used());
    }
    let qps = state.config.access_key_qps;
    if qps > 0 && !state.limits.admit(&claim.access_key_id, qps, Instant::now()) {
        return Err(OapiError::throttled());
    }
    let caller = Caller {
        tenant,
        identity,
        frontend: Frontend::AlibabaOpenApi,
        request_id: request_id.to_owned(),
        metadata: [("access_key_id".to_owned(), claim.access_key_id.clone())].into_iter().collect(),
    };
    let region = params.opt("RegionId").unwrap_or("cn-hangzhou").to_owned();
    let ctx = actions::Ctx { state, caller: &caller, p: &params, region, alias_used: Default::default() };
    ctx.dispatch(&action).await
}

#[cfg(test)]
mod label_tests {
    #[test]
    fn action_labels_are_bounded() {
        assert_eq!(super::action_label("Encrypt"), "Encrypt");
        assert_eq!(super::action_label("GetSecretValue"), "GetSecretValue");
        for bad in ["", "encrypt", "Encrypt ", "x".repeat(300).as_str()] {
            assert_eq!(super::action_label(bad), "unknown", "{bad:?}");
        }
        let mut sorted = super::ACTIONS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), super::ACTIONS.len(), "no duplicates");
    }
}

//! The online admin API: JSON over HTTP on the admin listener, what `kmsgate --server URL ...` talks to.
//!
//! Authentication is one bearer token (`Authorization: Bearer <token>`): generated at the first start into
//! `admin.token_file` (default `<data_dir>/admin.token`, mode 0600) and compared in constant time. Every
//! change goes through the dispatcher as the `admin` frontend, so it is authorized, audited and announced on
//! the change feed like a change made by the local CLI; unlike the local CLI, this server's own caches see it
//! at once. Routes are documented in docs/admin-api.md.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequest, Path as UrlPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use kmsgate_core::metrics::WireLabels;
use kmsgate_core::{
    AliasName, Caller, CreateKeyRequest, ErrorKind, Frontend, KeyId, KeyRef, KeySpec, KeyState, KeyUsageSet,
    PageRequest, TenantId,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::App;
use crate::config::Config;
use crate::http::RequestId;

/// The header that picks the tenant a request acts on (default: the configured default tenant).
pub const TENANT_HEADER: &str = "x-kmsgate-tenant";

/// The admin token: `kmsgate_` and 43 characters of base64url (256 random bits).
#[derive(Clone)]
pub struct AdminToken(Arc<str>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

impl AdminToken {
    /// Constant-time comparison with what a caller presented.
    fn matches(&self, presented: &[u8]) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(self.0.as_bytes(), presented).is_ok()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Reads the admin token file, creating it (mode 0600, never overwriting) with a fresh token when missing.
pub fn load_or_create_token(config: &Config) -> anyhow::Result<AdminToken> {
    let path = config.admin_token_file();
    if let Some(t) = read_token(&path)? {
        return Ok(t);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| anyhow::anyhow!("no randomness for the admin token"))?;
    let token = format!("kmsgate_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
    let created = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path);
    match created {
        Ok(mut f) => {
            f.write_all(token.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            tracing::info!(path = %path.display(), "generated the admin API token");
            Ok(AdminToken(token.into()))
        }
        // Another replica on the same volume won the race: use its token.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read_token(&path)?.ok_or_else(|| anyhow::anyhow!("{} is empty", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("cannot create the admin token file {}", path.display())),
    }
}

/// The token in `path`, if the file exists.
pub fn read_token(path: &Path) -> anyhow::Result<Option<AdminToken>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read the admin token file {}", path.display())),
    };
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "the admin token file is readable by others; chmod 600 it");
    }
    let token = text.trim();
    if token.len() < 16 {
        anyhow::bail!("the admin token in {} is shorter than 16 characters", path.display());
    }
    Ok(Some(AdminToken(token.into())))
}

#[derive(Debug)]
struct ApiState {
    app: App,
    token: AdminToken,
}

/// The `/v1/...` routes, authenticated; merged into the admin listener's router.
pub fn routes(app: &App, token: AdminToken) -> Router {
    let state = Arc::new(ApiState { app: app.clone(), token });
    Router::new()
        .route("/v1/keys", get(list_keys).post(create_key))
        .route("/v1/keys/{key}", get(describe_key))
        .route("/v1/keys/{key}/{action}", post(key_action))
        .route("/v1/aliases", get(list_aliases).post(create_alias))
        .route("/v1/aliases/{*alias}", axum::routing::put(update_alias).delete(delete_alias))
        .route("/v1/xks/stores", get(xks_stores))
        .route("/v1/xks/credentials", get(xks_credentials))
        .route("/v1/xks/credentials/{id}/revoke", post(xks_revoke))
        .route("/v1/alibaba/client-keys", get(client_keys))
        .route("/v1/alibaba/client-keys/{id}/revoke", post(client_key_revoke))
        .route("/v1/hsm/status", get(hsm_status))
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(app.metrics.clone(), crate::metrics::track))
}

async fn method_not_allowed() -> Response {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "the route does not take this method")
        .into_response()
}

/// An error of the admin API: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }

    fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

/// The one mapping of core errors to the admin API's HTTP status (the code is the error kind's name).
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidRequest | ErrorKind::InvalidKeyUsage | ErrorKind::InvalidCiphertext => {
            StatusCode::BAD_REQUEST
        }
        ErrorKind::UnknownOperation => StatusCode::NOT_FOUND,
        ErrorKind::AuthenticationFailed | ErrorKind::RequestTimeSkewed => StatusCode::UNAUTHORIZED,
        ErrorKind::AccessDenied => StatusCode::FORBIDDEN,
        ErrorKind::KeyNotFound
        | ErrorKind::AliasNotFound
        | ErrorKind::SecretNotFound
        | ErrorKind::SecretVersionNotFound => StatusCode::NOT_FOUND,
        ErrorKind::AlreadyExists
        | ErrorKind::SecretExists
        | ErrorKind::VersionConflict
        | ErrorKind::InvalidKeyState(_)
        | ErrorKind::SecretExpired => StatusCode::CONFLICT,
        ErrorKind::Throttled | ErrorKind::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Unsupported => StatusCode::NOT_IMPLEMENTED,
        ErrorKind::DependencyTimeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::DependencyFailure | ErrorKind::StorageFailure => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        // `ErrorKind` is non-exhaustive: a kind added later is a server-side failure until mapped.
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<kmsgate_core::Error> for ApiError {
    fn from(e: kmsgate_core::Error) -> Self {
        // The safe message only: internal sources go to the log (the dispatcher logs them).
        ApiError::new(status_of(e.kind()), e.kind().as_str(), e.message())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp =
            (self.status, axum::Json(json!({"error": {"code": self.code, "message": self.message}}))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

type ApiResult = Result<Response, ApiError>;

/// Checks the bearer token before any route runs.
async fn authenticate(State(s): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let answer = match presented {
        None => Some("the admin API needs `Authorization: Bearer <token>` (the token is in admin.token_file)"),
        Some(t) if !s.token.matches(t.as_bytes()) => Some("the admin token is not valid"),
        Some(_) => None,
    };
    match answer {
        Some(message) => {
            // Never the presented value: a near miss of the token is still most of the token.
            let peer = req.extensions().get::<crate::http::ConnInfo>().map(|c| c.peer.to_string()).unwrap_or_default();
            tracing::warn!(%peer, path = %req.uri().path(), reason = message, "admin API request refused");
            let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
            resp.extensions_mut().insert(WireLabels {
                frontend: Frontend::Admin,
                operation: "unknown",
                code: "unauthorized",
            });
            resp
        }
        None => next.run(req).await,
    }
}

/// The caller of one request: the admin of the tenant in `X-Kmsgate-Tenant` (default: the default tenant).
fn caller(s: &ApiState, headers: &HeaderMap, request_id: Option<&RequestId>) -> Result<Caller, ApiError> {
    let tenant = match headers.get(TENANT_HEADER) {
        None => s.app.tenant.clone(),
        Some(v) => {
            let v = v.to_str().map_err(|_| ApiError::invalid("X-Kmsgate-Tenant is not a valid tenant id"))?;
            TenantId::parse(v).map_err(|e| ApiError::invalid(format!("X-Kmsgate-Tenant: {}", e.message())))?
        }
    };
    let mut c = Caller::admin(tenant);
    c.identity = "admin-api".to_owned();
    if let Some(id) = request_id {
        c.request_id = id.0.clone();
    }
    Ok(c)
}

/// What each handler gets: the caller (authenticated, tenant picked) and the state.
struct Ctx {
    s: Arc<ApiState>,
    caller: Caller,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Ctx
where
    Arc<ApiState>: axum::extract::FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::FromRef;
        let s = Arc::<ApiState>::from_ref(state);
        let caller = caller(&s, &parts.headers, parts.extensions.get::<RequestId>())?;
        Ok(Ctx { s, caller })
    }
}

/// A JSON body whose rejection is the API's own error envelope.
struct Body_<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body_<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request<Body>, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Body_(v)),
            Err(e) => Err(ApiError::invalid(format!("invalid JSON body: {}", e.body_text()))),
        }
    }
}

/// A JSON answer labelled for the request metrics.
fn reply(operation: &'static str, status: StatusCode, body: Value) -> Response {
    let mut resp = (status, axum::Json(body)).into_response();
    resp.extensions_mut().insert(WireLabels { frontend: Frontend::Admin, operation, code: "ok" });
    resp
}

/// Labels an error answer for the request metrics.
fn labelled(operation: &'static str, r: ApiResult) -> Response {
    match r {
        Ok(resp) => resp,
        Err(e) => {
            let code = e.code;
            let mut resp = e.into_response();
            resp.extensions_mut().insert(WireLabels { frontend: Frontend::Admin, operation, code });
            resp
        }
    }
}

fn key_ref(s: &str) -> Result<KeyRef, ApiError> {
    KeyRef::parse(s).map_err(|e| ApiError::invalid(format!("key: {}", e.message())))
}

fn page(limit: Option<u32>, after: Option<String>) -> Result<PageRequest, ApiError> {
    let limit = limit.unwrap_or(100);
    if limit == 0 || limit > PageRequest::MAX_LIMIT {
        return Err(ApiError::invalid(format!("limit must be 1 to {}", PageRequest::MAX_LIMIT)));
    }
    Ok(PageRequest { after, limit })
}

async fn key_body(s: &ApiState, caller: &Caller, key: &kmsgate_core::Key) -> Value {
    let aliases = match s
        .app
        .dispatcher
        .list_aliases(caller, Some(&KeyRef::Id(key.id.clone())), &PageRequest::first(PageRequest::MAX_LIMIT))
        .await
    {
        Ok(p) => p.items.into_iter().map(|a| a.alias.to_string()).collect(),
        Err(_) => Vec::new(),
    };
    crate::cli::key_json(key, &aliases)
}

/// The query string as a map, percent-decoded; unknown parameters are refused (typos never pass silently).
struct Query<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        let mut map = serde_json::Map::new();
        for pair in parts.uri.query().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (percent_decode(k)?, percent_decode(v)?);
            // Numbers stay numbers for `limit`; everything else is a string.
            let value = match v.parse::<u64>() {
                Ok(n) if k == "limit" => Value::from(n),
                _ => Value::String(v),
            };
            if map.insert(k.clone(), value).is_some() {
                return Err(ApiError::invalid(format!("query parameter {k} given twice")));
            }
        }
        serde_json::from_value(Value::Object(map))
            .map(Query)
            .map_err(|e| ApiError::invalid(format!("invalid query: {e}")))
    }
}

fn percent_decode(s: &str) -> Result<String, ApiError> {
    let bad = || ApiError::invalid("invalid percent-encoding in the query");
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3).ok_or_else(bad)?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<u32>,
    after: Option<String>,
}

async fn list_keys(ctx: Ctx, q: Result<Query<ListQuery>, ApiError>) -> Response {
    labelled(
        "ListKeys",
        async {
            let Query(q) = q?;
            let p = page(q.limit, q.after)?;
            let got = ctx.s.app.dispatcher.list_keys(&ctx.caller, &p).await?;
            let mut items = Vec::with_capacity(got.items.len());
            for k in &got.items {
                items.push(key_body(&ctx.s, &ctx.caller, k).await);
            }
            Ok(reply("ListKeys", StatusCode::OK, json!({"keys": items, "next": got.next})))
        }
        .await,
    )
}

/// `POST /v1/keys`: what `kmsgate keys create` takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyBody {
    #[serde(default = "default_spec")]
    pub spec: String,
    /// Comma-separated usages or `none`; absent: the spec's usual set.
    #[serde(default)]
    pub usage: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub backend: Option<String>,
}

fn default_spec() -> String {
    "AES_256".to_owned()
}

fn create_request(b: CreateKeyBody) -> Result<CreateKeyRequest, ApiError> {
    let spec: KeySpec =
        b.spec.parse().map_err(|e: kmsgate_core::Error| ApiError::invalid(format!("spec: {}", e.message())))?;
    let mut req = CreateKeyRequest::new(spec);
    if let Some(u) = &b.usage {
        let usage = KeyUsageSet::parse_list(u).map_err(|e| ApiError::invalid(format!("usage: {}", e.message())))?;
        req.usage = Some(usage);
    }
    req.description = b.description;
    req.aliases = b
        .aliases
        .iter()
        .map(|a| AliasName::parse(a).map_err(|e| ApiError::invalid(format!("aliases: {}", e.message()))))
        .collect::<Result<_, _>>()?;
    if b.tags.keys().any(String::is_empty) {
        return Err(ApiError::invalid("tags: keys must not be empty"));
    }
    req.tags = b.tags;
    req.id =
        b.id.as_deref().map(KeyId::parse).transpose().map_err(|e| ApiError::invalid(format!("id: {}", e.message())))?;
    req.backend = b.backend;
    Ok(req)
}

async fn create_key(ctx: Ctx, body: Result<Body_<CreateKeyBody>, ApiError>) -> Response {
    labelled(
        "CreateKey",
        async {
            let Body_(b) = body?;
            let req = create_request(b)?;
            let key = ctx.s.app.dispatcher.create_key(&ctx.caller, req).await?;
            Ok(reply("CreateKey", StatusCode::CREATED, key_body(&ctx.s, &ctx.caller, &key).await))
        }
        .await,
    )
}

async fn describe_key(ctx: Ctx, UrlPath(key): UrlPath<String>) -> Response {
    labelled(
        "DescribeKey",
        async {
            let k = key_ref(&key)?;
            let key = ctx.s.app.dispatcher.describe_key(&ctx.caller, &k).await?;
            Ok(reply("DescribeKey", StatusCode::OK, key_body(&ctx.s, &ctx.caller, &key).await))
        }
        .await,
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyActionBody {
    /// `schedule-deletion`: the waiting period in days (7-366, default 30).
    days: Option<u32>,
    /// `cancel-deletion`: enable the key again instead of leaving it disabled.
    #[serde(default)]
    enable: bool,
}

/// `POST /v1/keys/{key}/{enable|disable|rotate|schedule-deletion|cancel-deletion}`.
async fn key_action(ctx: Ctx, UrlPath((key, action)): UrlPath<(String, String)>, body: axum::body::Bytes) -> Response {
    let operation = match action.as_str() {
        "enable" => "EnableKey",
        "disable" => "DisableKey",
        "rotate" => "RotateKey",
        "schedule-deletion" => "ScheduleKeyDeletion",
        "cancel-deletion" => "CancelKeyDeletion",
        _ => "unknown",
    };
    labelled(
        operation,
        async {
            if operation == "unknown" {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "unknown_operation",
                    "no such key action (enable, disable, rotate, schedule-deletion, cancel-deletion)",
                ));
            }
            let b: KeyActionBody = if body.iter().all(u8::is_ascii_whitespace) {
                KeyActionBody::default()
            } else {
                serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))?
            };
            let k = key_ref(&key)?;
            let d = &ctx.s.app.dispatcher;
            let c = &ctx.caller;
            let key = match action.as_str() {
                "enable" => d.enable_key(c, &k).await?,
                "disable" => d.disable_key(c, &k).await?,
                "rotate" => d.rotate_key(c, &k).await?,
                "schedule-deletion" => {
                    let days = b.days.unwrap_or(30);
                    if !(7..=366).contains(&days) {
                        return Err(ApiError::invalid("days must be 7 to 366"));
                    }
                    d.schedule_key_deletion(c, &k, days).await?
                }
                _ => {
                    let then = if b.enable { KeyState::Enabled } else { KeyState::Disabled };
                    d.cancel_key_deletion(c, &k, then).await?
                }
            };
            Ok(reply(operation, StatusCode::OK, key_body(&ctx.s, c, &key).await))
        }
        .await,
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AliasQuery {
    key: Option<String>,
    limit: Option<u32>,
    after: Option<String>,
}

fn alias_json(e: &kmsgate_core::AliasEntry) -> Value {
    json!({"alias": e.alias, "key_id": e.key_id, "created_at": e.created_at.to_rfc3339()})
}

async fn list_aliases(ctx: Ctx, q: Result<Query<AliasQuery>, ApiError>) -> Response {
    labelled(
        "ListAliases",
        async {
            let Query(q) = q?;
            let key = q.key.as_deref().map(key_ref).transpose()?;
            let p = page(q.limit, q.after)?;
            let got = ctx.s.app.dispatcher.list_aliases(&ctx.caller, key.as_ref(), &p).await?;
            let items: Vec<_> = got.items.iter().map(alias_json).collect();
            Ok(reply("ListAliases", StatusCode::OK, json!({"aliases": items, "next": got.next})))
        }
        .await,
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AliasBody {
    alias: Option<String>,
    key: String,
}

fn alias_name(s: &str) -> Result<AliasName, ApiError> {
    AliasName::parse(s).map_err(|e| ApiError::invalid(format!("alias: {}", e.message())))
}

async fn create_alias(ctx: Ctx, body: Result<Body_<AliasBody>, ApiError>) -> Response {
    labelled(
        "CreateAlias",
        async {
            let Body_(b) = body?;
            let alias = alias_name(b.alias.as_deref().ok_or_else(|| ApiError::invalid("alias is required"))?)?;
            let key = key_ref(&b.key)?;
            let e = ctx.s.app.dispatcher.create_alias(&ctx.caller, &alias, &key).await?;
            Ok(reply("CreateAlias", StatusCode::CREATED, alias_json(&e)))
        }
        .await,
    )
}

async fn update_alias(ctx: Ctx, UrlPath(alias): UrlPath<String>, body: Result<Body_<AliasBody>, ApiError>) -> Response {
    labelled(
        "UpdateAlias",
        async {
            let Body_(b) = body?;
            let alias = alias_name(&alias)?;
            if b.alias.as_deref().is_some_and(|a| a != alias.as_str()) {
                return Err(ApiError::invalid("the body's alias differs from the path's"));
            }
            let key = key_ref(&b.key)?;
            let e = ctx.s.app.dispatcher.update_alias(&ctx.caller, &alias, &key).await?;
            Ok(reply("UpdateAlias", StatusCode::OK, alias_json(&e)))
        }
        .await,
    )
}

async fn delete_alias(ctx: Ctx, UrlPath(alias): UrlPath<String>) -> Response {
    labelled(
        "DeleteAlias",
        async {
            let alias = alias_name(&alias)?;
            ctx.s.app.dispatcher.delete_alias(&ctx.caller, &alias).await?;
            Ok(reply("DeleteAlias", StatusCode::OK, json!({"deleted": alias})))
        }
        .await,
    )
}

async fn xks_stores(ctx: Ctx) -> Response {
    labelled(
        "ListXksKeyStores",
        async {
            let list = kmsgate_xks::admin::list_stores(&ctx.s.app.dispatcher, Some(&ctx.caller.tenant)).await?;
            Ok(reply("ListXksKeyStores", StatusCode::OK, json!({"stores": list})))
        }
        .await,
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreQuery {
    store: Option<String>,
}

async fn xks_credentials(ctx: Ctx, q: Result<Query<StoreQuery>, ApiError>) -> Response {
    labelled(
        "ListXksCredentials",
        async {
            let Query(q) = q?;
            let list = kmsgate_xks::admin::list_credentials(
                &ctx.s.app.dispatcher,
                Some(&ctx.caller.tenant),
                q.store.as_deref(),
            )
            .await?;
            Ok(reply("ListXksCredentials", StatusCode::OK, json!({"credentials": list})))
        }
        .await,
    )
}

async fn xks_revoke(ctx: Ctx, UrlPath(id): UrlPath<String>) -> Response {
    labelled(
        "RevokeXksCredential",
        async {
            let info = kmsgate_xks::admin::revoke_credential(&ctx.s.app.dispatcher, &ctx.caller, &id).await?;
            Ok(reply(
                "RevokeXksCredential",
                StatusCode::OK,
                json!({"revoked": info.access_key_id, "store": info.store}),
            ))
        }
        .await,
    )
}

async fn client_keys(ctx: Ctx) -> Response {
    labelled(
        "ListClientKeys",
        async {
            let list = kmsgate_alibaba::clientkey::list(&ctx.s.app.dispatcher, Some(&ctx.caller.tenant)).await?;
            Ok(reply("ListClientKeys", StatusCode::OK, json!({"client_keys": list})))
        }
        .await,
    )
}

async fn client_key_revoke(ctx: Ctx, UrlPath(id): UrlPath<String>) -> Response {
    labelled(
        "RevokeClientKey",
        async {
            kmsgate_alibaba::clientkey::revoke(&ctx.s.app.dispatcher, &ctx.caller, &id).await?;
            Ok(reply("RevokeClientKey", StatusCode::OK, json!({"revoked": id})))
        }
        .await,
    )
}

/// The running server's own PKCS#11 members: their pools and a real health probe.
async fn hsm_status(ctx: Ctx) -> Response {
    labelled(
        "HsmStatus",
        async {
            let mut members = Vec::with_capacity(ctx.s.app.pkcs11.len());
            for m in &ctx.s.app.pkcs11 {
                let s = m.status().await;
                members.push(serde_json::to_value(&s).map_err(|e| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        format!("cannot encode the status: {e}"),
                    )
                })?);
            }
            Ok(reply("HsmStatus", StatusCode::OK, json!({"members": members})))
        }
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_has_a_status_and_its_own_code() {
        for k in ErrorKind::ALL {
            let e = ApiError::from(kmsgate_core::Error::new(*k, "m"));
            assert_eq!(e.code, k.as_str());
            assert!(e.status.is_client_error() || e.status.is_server_error(), "{k:?}");
            let server_side = matches!(
                k,
                ErrorKind::Internal
                    | ErrorKind::DependencyTimeout
                    | ErrorKind::DependencyFailure
                    | ErrorKind::StorageFailure
                    | ErrorKind::Unsupported
            );
            assert_eq!(e.status.is_server_error(), server_side, "{k:?}");
        }
        assert_eq!(status_of(ErrorKind::KeyNotFound), StatusCode::NOT_FOUND);
        assert_eq!(status_of(ErrorKind::InvalidKeyState(KeyState::Disabled)), StatusCode::CONFLICT);
        assert_eq!(status_of(ErrorKind::AccessDenied), StatusCode::FORBIDDEN);
    }

    #[test]
    fn token_comparison() {
        let t = AdminToken("kmsgate_abcdefghijklmnop".into());
        assert!(t.matches(b"kmsgate_abcdefghijklmnop"));
        assert!(!t.matches(b"kmsgate_abcdefghijklmnoq"));
        assert!(!t.matches(b"kmsgate_abcdefghijklmno"));
        assert!(!t.matches(b""));
        assert_eq!(format!("{t:?}"), "AdminToken(***)");
    }
}

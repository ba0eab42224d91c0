//! The request pipeline: request id, maintenance switch, routing (with the `/v1/t/{tenant}` prefix and
//! `{path}:verb` suffixes), authentication, tenant resolution, rate limits, and the rendering of every answer
//! (success or envelope) with `X-Request-ID` and `X-RateLimit-*`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use kmsgate_core::{Caller, Dispatcher, Document, Frontend, PageRequest, Precondition, TenantId, Timestamp};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::OnceCell;

use crate::SecretsConfig;
use crate::code::ErrorCode;
use crate::crypto::{Claims, Cursor, Keys, filter_hash};
use crate::error::ApiError;
use crate::model::{
    IdentityDoc, KIND_IDENTITY, KIND_SIGNING, KIND_TENANT, KIND_TOKEN, PARTNER, ROLE_ADMIN, ROLE_PARTNER_ADMIN,
    TenantDoc, TokenDoc,
};
use crate::ratelimit::{Category, Limiter, RateInfo};
use crate::values::{new_id, ulid, valid_request_id};

pub type ApiResult<T = Response> = Result<T, ApiError>;

/// Shared state of the frontend.
#[derive(Debug)]
pub struct SecretsState {
    pub dispatcher: Dispatcher,
    pub config: SecretsConfig,
    keys: OnceCell<Arc<Keys>>,
    pub limiter: Limiter,
    /// The tenant that owns installation-wide records (the signing key).
    pub home: TenantId,
    /// Each tenant's bindings, for policy evaluation on the request path. Local binding writes invalidate
    /// their tenant at once; other processes' writes arrive through the change feed (see [`crate::router`]);
    /// the TTL is a backstop should the feed ever be missed.
    bindings: moka::future::Cache<TenantId, Arc<Vec<crate::model::BindingDoc>>>,
}

impl SecretsState {
    pub fn new(dispatcher: Dispatcher, config: SecretsConfig, home: TenantId) -> Self {
        SecretsState {
            dispatcher,
            config,
            keys: OnceCell::new(),
            limiter: Limiter::default(),
            home,
            bindings: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(std::time::Duration::from_secs(60))
                .build(),
        }
    }

    /// Whether the operator switch is on: `secrets.maintenance_mode` in the configuration, or the
    /// installation-wide record `kmsgate secrets maintenance on` writes (every replica sees it through the
    /// change feed, no restart). A store failure reading the switch counts as off: requests then meet the store
    /// error themselves.
    pub async fn in_maintenance(&self) -> bool {
        if self.config.maintenance_mode {
            return true;
        }
        match self.dispatcher.document(crate::model::KIND_SETTINGS, crate::model::MAINTENANCE_ID).await {
            Ok(Some(doc)) => doc.body.get("enabled").and_then(Value::as_bool).unwrap_or(false),
            _ => false,
        }
    }

    /// The tenant's bindings, through the cache.
    pub async fn tenant_bindings(&self, tenant: &TenantId) -> ApiResult<Arc<Vec<crate::model::BindingDoc>>> {
        if let Some(b) = self.bindings.get(tenant).await {
            return Ok(b);
        }
        let mut out = Vec::new();
        for doc in self.all_documents(crate::model::KIND_BINDING, tenant).await? {
            out.push(parse_body(&doc)?);
        }
        let out = Arc::new(out);
        self.bindings.insert(tenant.clone(), out.clone()).await;
        Ok(out)
    }

    pub fn invalidate_all_bindings(&self) {
        self.bindings.invalidate_all();
    }

    /// Drops a tenant's cached bindings (after a local write, or a change-feed entry).
    pub async fn invalidate_bindings(&self, tenant: &TenantId) {
        self.bindings.invalidate(tenant).await;
    }

    /// The installation's signing keys: loaded (unsealed by the key backend) once per process, created by the
    /// first process that needs them.
    pub async fn keys(&self) -> ApiResult<Arc<Keys>> {
        self.keys.get_or_try_init(|| load_or_create_keys(&self.dispatcher, &self.home)).await.cloned()
    }
}

const SIGNING_ID: &str = "hmac";

async fn load_or_create_keys(d: &Dispatcher, home: &TenantId) -> ApiResult<Arc<Keys>> {
    let admin = Caller::admin(home.clone());
    let purpose = format!("{KIND_SIGNING}/{SIGNING_ID}");
    for _ in 0..3 {
        if let Some(doc) = d.store().get_document(KIND_SIGNING, SIGNING_ID).await? {
            let sealed = doc
                .body
                .get("sealed")
                .and_then(Value::as_str)
                .and_then(base64_decode)
                .ok_or_else(|| ApiError::new(ErrorCode::InternalError, "the signing key record is malformed"))?;
            let owner = Caller::admin(doc.tenant.clone());
            let root = d.unseal(&owner, &purpose, &sealed).await?;
            return Ok(Arc::new(Keys::derive(&root)));
        }
        let mut root = zeroize::Zeroizing::new([0u8; 32]);
        aws_lc_rs::rand::fill(root.as_mut())
            .map_err(|_| ApiError::new(ErrorCode::InternalError, "the random generator failed"))?;
        let sealed = d.seal(&admin, &purpose, root.as_ref()).await?;
        let body = serde_json::json!({"sealed": base64_encode(&sealed), "created_at": Timestamp::now().to_rfc3339()});
        let doc = Document::new(KIND_SIGNING, SIGNING_ID, home.clone(), body);
        match d.put_document(&admin, doc, Precondition::Absent).await {
            Ok(_) => return Ok(Arc::new(Keys::derive(root.as_ref()))),
            // Another replica created it first: use theirs.
            Err(e) if e.kind() == kmsgate_core::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(ErrorCode::InternalError, "cannot establish the signing key"))
}

pub fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// One request as the handlers see it.
#[derive(Debug)]
pub struct Ctx {
    pub request_id: String,
    pub method: Method,
    /// The path after `/v1` (and after a `/t/{tenant}` prefix), without the leading `/`.
    pub path: String,
    pub path_tenant: Option<String>,
    pub query: Vec<(String, String)>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub peer: Option<IpAddr>,
    pub rate: Option<RateInfo>,
    /// Who the token says the caller is and the tenant acted in, once known (for the audit of refusals).
    pub principal: Option<(String, String)>,
}

impl Ctx {
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn if_match(&self) -> Option<String> {
        self.headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()).map(|s| s.trim().to_owned())
    }
}

/// The authenticated caller of one request.
#[derive(Debug, Clone)]
pub struct Auth {
    pub claims: Claims,
    pub identity: IdentityDoc,
    /// The tenant the request acts in.
    pub tenant: TenantId,
    pub tenant_doc: TenantDoc,
    pub caller: Caller,
}

impl Auth {
    pub fn is_admin(&self) -> bool {
        self.identity.has_role(ROLE_ADMIN) || self.is_partner_admin()
    }

    pub fn is_partner_admin(&self) -> bool {
        self.identity.has_role(ROLE_PARTNER_ADMIN)
    }

    pub fn has_scope(&self, needed: &str) -> bool {
        scope_covers(&self.claims.scopes, needed)
    }

    /// `insufficient_scope` unless the token carries `needed`.
    pub fn require_scope(&self, needed: &str) -> ApiResult<()> {
        if self.has_scope(needed) {
            Ok(())
        } else {
            Err(ApiError::new(ErrorCode::InsufficientScope, format!("the token lacks the scope {needed}"))
                .detail("required_scope", needed))
        }
    }

    /// Admin-role routes: `forbidden` without the role, then `insufficient_scope`.
    pub fn require_admin(&self, scope: &str) -> ApiResult<()> {
        if !self.is_admin() {
            return Err(ApiError::new(ErrorCode::Forbidden, "this route needs the admin role"));
        }
        self.require_scope(scope)
    }

    pub fn require_partner_admin(&self) -> ApiResult<()> {
        if !self.is_partner_admin() {
            return Err(ApiError::new(ErrorCode::Forbidden, "this route needs the partner admin role"));
        }
        self.require_scope("admin")
    }
}

/// Whether `scopes` grant `needed`: `admin` grants everything, `x:*` every `x:...`.
pub fn scope_covers(scopes: &[String], needed: &str) -> bool {
    scopes.iter().any(|s| {
        s == "admin"
            || s == needed
            || s.strip_suffix(":*").is_some_and(|family| needed.split_once(':').is_some_and(|(f, _)| f == family))
    })
}

/// Phase-2 and phase-3 resources: known to the contract, not shipped. They answer `feature_disabled` after
/// authentication, never pretend to work.
const UNSHIPPED: &[&str] = &[
    "rotation",
    "secret-policies",
    "webhooks",
    "subscriptions",
    "audit",
    "exports",
    "dynamic",
    "pki",
    "dns",
    "federation",
    "partner",
];

/// The single entry point of `/v1` and everything below it.
pub async fn handle(State(st): State<Arc<SecretsState>>, req: Request) -> Response {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_request_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("req_{}", ulid()));
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let operation = crate::labels::operation(req.method(), req.uri().path());
    let (parts, body) = req.into_parts();
    let mut ctx = Ctx {
        request_id,
        method: parts.method.clone(),
        path: String::new(),
        path_tenant: None,
        query: parts
            .uri
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default(),
        headers: parts.headers,
        body: Bytes::new(),
        peer,
        rate: None,
        principal: None,
    };
    let result = run(&st, &mut ctx, parts.uri.path(), body).await;
    let code = result.as_ref().err().map_or("ok", |e| e.code.as_str());
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            audit_refusal(&st, &ctx, uri_path_for_audit(&ctx), &e);
            render_error(&e, &ctx.request_id)
        }
    };
    if ctx.rate.is_none() {
        // Nothing authenticated this request (a 401, an unknown route): it counts against its client address
        // and still reports that budget. Its answer stays the one the check order gives.
        let _ = st.limit_by_ip(&mut ctx);
    }
    finish(&mut resp, &ctx);
    resp.extensions_mut().insert(kmsgate_core::metrics::WireLabels { frontend: Frontend::Secrets, operation, code });
    resp
}

fn uri_path_for_audit(ctx: &Ctx) -> Option<String> {
    (!ctx.path.is_empty()).then(|| ctx.path.clone())
}

/// Refusals of authentication, tenant or authorization never reach the dispatcher, which audits operations:
/// record them here so denied attempts show in the audit trail.
fn audit_refusal(st: &SecretsState, ctx: &Ctx, resource: Option<String>, e: &ApiError) {
    let status = e.code.http_status().as_u16();
    if status != 401 && status != 403 {
        return;
    }
    let (tenant, identity) = ctx.principal.clone().unwrap_or_else(|| (String::new(), "anonymous".to_owned()));
    let mut metadata = std::collections::BTreeMap::new();
    if let Some(ip) = ctx.peer {
        metadata.insert("source_ip".to_owned(), ip.to_string());
    }
    metadata.insert("method".to_owned(), ctx.method.to_string());
    st.dispatcher.audit_sink().record(&kmsgate_core::AuditEvent {
        at: Timestamp::now(),
        request_id: ctx.request_id.clone(),
        tenant,
        identity,
        frontend: Frontend::Secrets,
        operation: kmsgate_core::Operation::AccessCheck,
        resource,
        outcome: kmsgate_core::Outcome::Error { kind: e.code.as_str() },
        latency_us: 0,
        metadata,
    });
}

fn render_error(e: &ApiError, request_id: &str) -> Response {
    let mut r = (e.code.http_status(), axum::Json(e.body(request_id))).into_response();
    if let Some(after) = e.retry_after {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    r
}

fn finish(resp: &mut Response, ctx: &Ctx) {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
        h.insert("x-request-id", v);
    }
    if let Some(r) = ctx.rate {
        h.insert("x-ratelimit-limit", HeaderValue::from(r.limit));
        h.insert("x-ratelimit-remaining", HeaderValue::from(r.remaining));
        h.insert("x-ratelimit-reset", HeaderValue::from(r.reset));
    }
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
}

async fn run(st: &SecretsState, ctx: &mut Ctx, uri_path: &str, body: Body) -> ApiResult {
    let Some(rest) = uri_path.strip_prefix("/v1") else {
        return Err(route_not_found());
    };
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    // Health is exempt from the maintenance switch and needs no token.
    if rest == "health" || rest == "health/ready" || rest == "openapi.json" {
        if ctx.method != Method::GET {
            return Err(method_not_allowed());
        }
        // Routes without a token are limited per client address.
        st.limit_by_ip(ctx)?;
        if rest == "openapi.json" {
            return Ok(json(StatusCode::OK, crate::openapi::document()));
        }
        return crate::health::handle(st, ctx, rest == "health/ready").await;
    }
    if st.in_maintenance().await {
        return Err(maintenance());
    }
    let mut path = rest.to_owned();
    if let Some(after_t) = rest.strip_prefix("t/") {
        let (tenant, tail) = after_t.split_once('/').unwrap_or((after_t, ""));
        ctx.path_tenant = Some(percent_decode(tenant));
        path = tail.to_owned();
    }
    ctx.path = path;
    ctx.body = axum::body::to_bytes(body, st.config.max_body_bytes).await.map_err(|_| {
        ApiError::invalid_request(format!(
            "the request body is unreadable or larger than {} bytes",
            st.config.max_body_bytes
        ))
    })?;
    crate::routes::dispatch(st, ctx).await
}

pub fn maintenance() -> ApiError {
    ApiError::new(ErrorCode::MaintenanceMode, "the secrets API is in maintenance; retry later")
        .retry_after(std::time::Duration::from_secs(60))
}

pub fn route_not_found() -> ApiError {
    ApiError::new(ErrorCode::RouteNotFound, "no route serves this path")
}

pub fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, "this route does not allow this method")
}

pub fn feature_disabled(what: &str) -> ApiError {
    ApiError::new(ErrorCode::FeatureDisabled, format!("{what} is not available in this deployment"))
        .detail("feature", what.to_owned())
}

pub fn is_unshipped(first_segment: &str) -> bool {
    UNSHIPPED.contains(&first_segment)
}

/// Percent-decoding of one path segment (`%2F` stays a byte of the segment).
pub fn percent_decode(s: &str) -> String {
    percent_decode_bytes(s.as_bytes())
}

fn percent_decode_bytes(b: &[u8]) -> String {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

// ---- authentication, tenant resolution, rate limits (check order steps 2-5) ----------------------------

impl SecretsState {
    /// The per-client-address bucket of requests without a token; `rate_limited` when it is empty.
    pub fn limit_by_ip(&self, ctx: &mut Ctx) -> ApiResult<()> {
        let who = ctx.peer.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
        let per_minute = self.config.rate_limit(Category::Unauthenticated, None);
        let info = self.limiter.take(&format!("ip:{who}"), Category::Unauthenticated, per_minute);
        ctx.rate = Some(info);
        match info.retry_after {
            None => Ok(()),
            Some(after) => Err(ApiError::new(ErrorCode::RateLimited, "too many requests; retry later")
                .detail("category", Category::Unauthenticated.as_str())
                .detail("limit", info.limit)
                .detail("window_seconds", 60)
                .retry_after(after)),
        }
    }

    /// Steps 2-5 of the check order: `authentication_required`, `token_invalid` → `token_expired` →
    /// `token_revoked`, the tenant checks, then `rate_limited` in `category`.
    pub async fn authenticate(&self, ctx: &mut Ctx, category: Category) -> ApiResult<Auth> {
        let claims = self.verify_bearer(ctx.headers.get(header::AUTHORIZATION)).await?;
        let home = TenantId::parse(&claims.tenant).map_err(|_| token_invalid())?;
        ctx.principal = Some((claims.tenant.clone(), format!("{}:{}", claims.typ, claims.sub)));
        let identity = self
            .identity_of(&claims)
            .await?
            .ok_or_else(|| ApiError::new(ErrorCode::TokenRevoked, "the token's identity no longer exists"))?;
        // Tenant: the /v1/t/{tenant} prefix, then X-Tenant-ID, then the token's own tenant.
        let asked = ctx
            .path_tenant
            .clone()
            .or_else(|| ctx.headers.get("x-tenant-id").and_then(|v| v.to_str().ok()).map(str::to_owned));
        let tenant = match asked {
            None => home.clone(),
            Some(t) if t == home.as_str() => home.clone(),
            Some(t) => {
                if !identity.has_role(ROLE_PARTNER_ADMIN) {
                    return Err(ApiError::new(
                        ErrorCode::TenantAccessDenied,
                        "acting in another tenant needs the partner admin role",
                    ));
                }
                TenantId::parse(&t).map_err(|_| tenant_not_found())?
            }
        };
        ctx.principal = Some((tenant.to_string(), format!("{}:{}", claims.typ, claims.sub)));
        let tenant_doc = self.tenant_doc(&tenant).await?.ok_or_else(tenant_not_found)?;
        // Per (identity, category) in the tenant acted in: a partner admin's traffic in one tenant does not
        // spend another tenant's budget.
        let subject = format!("{}|{}/{}/{}", tenant, claims.tenant, claims.typ, claims.sub);
        let per_minute = self.config.rate_limit(category, Some(&tenant_doc));
        let info = self.limiter.take(&subject, category, per_minute);
        ctx.rate = Some(info);
        if let Some(after) = info.retry_after {
            return Err(ApiError::new(ErrorCode::RateLimited, "too many requests; retry later")
                .detail("category", category.as_str())
                .detail("limit", info.limit)
                .detail("window_seconds", 60)
                .retry_after(after));
        }
        let mut metadata = std::collections::BTreeMap::new();
        metadata.insert("token_id".to_owned(), claims.jti.clone());
        if let Some(ip) = ctx.peer {
            metadata.insert("source_ip".to_owned(), ip.to_string());
        }
        let caller = Caller {
            tenant: tenant.clone(),
            identity: format!("{}:{}", claims.typ, claims.sub),
            frontend: Frontend::Secrets,
            request_id: ctx.request_id.clone(),
            metadata,
        };
        Ok(Auth { claims, identity: (*identity).clone(), tenant, tenant_doc, caller })
    }

    /// Verifies a bearer token: signature, expiry, then revocation by `jti` (the token record, cached and
    /// invalidated through the change feed, so a revocation reaches every replica).
    pub async fn verify_bearer(&self, header: Option<&HeaderValue>) -> ApiResult<Claims> {
        let token = header
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::AuthenticationRequired,
                    "a bearer token is required (Authorization: Bearer ...)",
                )
            })?;
        self.verify_token(token).await
    }

    pub async fn verify_token(&self, token: &str) -> ApiResult<Claims> {
        let keys = self.keys().await?;
        let claims = keys.verify_token(token).ok_or_else(token_invalid)?;
        if claims.exp <= Timestamp::now().0 / 1000 {
            return Err(ApiError::new(ErrorCode::TokenExpired, "the token has expired"));
        }
        let record = self.dispatcher.document(KIND_TOKEN, &claims.jti).await?;
        let revoked = match record {
            None => true,
            Some(doc) => doc.body.get("revoked_at").is_some_and(|v| !v.is_null()),
        };
        if revoked {
            return Err(ApiError::new(ErrorCode::TokenRevoked, "the token has been revoked"));
        }
        Ok(claims)
    }

    pub(crate) async fn identity_of(&self, claims: &Claims) -> ApiResult<Option<Arc<IdentityDoc>>> {
        let id = IdentityDoc::doc_id(&claims.tenant, &claims.typ, &claims.sub);
        match self.dispatcher.document(KIND_IDENTITY, &id).await? {
            None => Ok(None),
            Some(doc) => Ok(Some(Arc::new(parse_body(&doc)?))),
        }
    }

    pub async fn tenant_doc(&self, tenant: &TenantId) -> ApiResult<Option<TenantDoc>> {
        match self.dispatcher.document(KIND_TENANT, tenant.as_str()).await? {
            None => Ok(None),
            Some(doc) => Ok(Some(parse_body(&doc)?)),
        }
    }

    /// Every document of `kind` in `tenant` (admin listings and policy evaluation of small sets).
    pub async fn all_documents(&self, kind: &str, tenant: &TenantId) -> ApiResult<Vec<Document>> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self.dispatcher.list_documents(kind, Some(tenant), &PageRequest { after, limit: 1000 }).await?;
            out.extend(page.items);
            match page.next {
                Some(n) => after = Some(n),
                None => return Ok(out),
            }
        }
    }

    // ---- cursors ----

    /// A signed cursor continuing after `last` for this tenant and these filters, valid for an hour.
    pub async fn cursor(&self, tenant: &TenantId, filters: &[&str], last: Option<String>) -> ApiResult<Option<String>> {
        let Some(last) = last else { return Ok(None) };
        let keys = self.keys().await?;
        let c = Cursor { k: last, f: filter_hash(filters), t: tenant.to_string(), e: Timestamp::now().0 / 1000 + 3600 };
        Ok(Some(keys.sign_cursor(&c)))
    }

    /// The position a `?cursor` names; tampered, foreign, stale or re-filtered cursors are `invalid_cursor`.
    pub async fn read_cursor(&self, ctx: &Ctx, tenant: &TenantId, filters: &[&str]) -> ApiResult<Option<String>> {
        let Some(raw) = ctx.query("cursor").filter(|c| !c.is_empty()) else { return Ok(None) };
        let keys = self.keys().await?;
        let bad = |why: &str| ApiError::new(ErrorCode::InvalidCursor, format!("invalid cursor: {why}"));
        let c = keys.verify_cursor(raw).ok_or_else(|| bad("not a cursor this service issued"))?;
        if c.t != tenant.as_str() {
            return Err(bad("issued for another tenant"));
        }
        if c.f != filter_hash(filters) {
            return Err(bad("the filters changed"));
        }
        if c.e <= Timestamp::now().0 / 1000 {
            return Err(bad("expired (cursors live one hour)"));
        }
        Ok(Some(c.k))
    }
}

pub fn parse_body<T: DeserializeOwned>(doc: &Document) -> ApiResult<T> {
    serde_json::from_value(doc.body.clone()).map_err(|e| {
        tracing::error!(kind = %doc.kind, id = %doc.id, error = %e, "malformed record");
        ApiError::new(ErrorCode::InternalError, "internal error")
    })
}

pub fn token_invalid() -> ApiError {
    ApiError::new(ErrorCode::TokenInvalid, "the token is malformed or its signature does not verify")
}

pub fn tenant_not_found() -> ApiError {
    ApiError::new(ErrorCode::TenantNotFound, "no such tenant")
}

/// `?limit`: 1-1000, default 100.
pub fn limit(ctx: &Ctx) -> ApiResult<u32> {
    match ctx.query("limit") {
        None => Ok(100),
        Some(s) => match s.parse::<u32>() {
            Ok(n) if (1..=1000).contains(&n) => Ok(n),
            _ => Err(ApiError::validation("limit", "out_of_range", "limit must be an integer from 1 to 1000")),
        },
    }
}

/// A JSON response with a status.
pub fn json(status: StatusCode, v: Value) -> Response {
    (status, axum::Json(v)).into_response()
}

pub fn rfc3339(t: Timestamp) -> String {
    t.to_rfc3339()
}

pub fn now_rfc3339() -> String {
    Timestamp::now().to_rfc3339()
}

/// Parses an RFC 3339 time into a core timestamp.
pub fn parse_time(field: &str, s: &str) -> ApiResult<Timestamp> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|_| ApiError::validation(field, "invalid_time", "must be an RFC 3339 time"))?;
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    Ok(Timestamp(i64::try_from(ms).map_err(|_| ApiError::validation(field, "invalid_time", "out of range"))?))
}

/// Unix seconds of an RFC 3339 time we wrote ourselves.
pub fn unix_of(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok().map(|t| t.unix_timestamp())
}

/// Creates the first tenant's settings, an admin identity and an admin token. Returns the token (shown once)
/// or `None` when the tenant is already bootstrapped.
pub async fn bootstrap(st: &SecretsState, tenant: &TenantId, ttl_secs: i64) -> ApiResult<Option<(String, TokenDoc)>> {
    let d = &st.dispatcher;
    let admin = Caller::admin(tenant.clone());
    d.ensure_tenant(tenant).await?;
    let now = now_rfc3339();
    let tdoc = TenantDoc {
        tenant_id: tenant.to_string(),
        name: tenant.to_string(),
        retention: "30d".to_owned(),
        quotas: Default::default(),
        rate_limits: Default::default(),
        created_at: now.clone(),
    };
    let doc =
        Document::new(KIND_TENANT, tenant.as_str(), tenant.clone(), serde_json::to_value(&tdoc).unwrap_or_default());
    match d.put_document(&admin, doc, Precondition::Absent).await {
        Ok(_) => {}
        Err(e) if e.kind() == kmsgate_core::ErrorKind::AlreadyExists => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let identity = IdentityDoc {
        identity_type: "service_account".to_owned(),
        identity_id: "admin".to_owned(),
        display_name: "bootstrap administrator".to_owned(),
        groups: Vec::new(),
        roles: vec![ROLE_ADMIN.to_owned(), ROLE_PARTNER_ADMIN.to_owned()],
        created_at: now,
    };
    let id = IdentityDoc::doc_id(tenant.as_str(), "service_account", "admin");
    let doc = Document::new(KIND_IDENTITY, &id, tenant.clone(), serde_json::to_value(&identity).unwrap_or_default());
    d.put_document(&admin, doc, Precondition::Any).await?;
    let minted = mint(st, &admin, tenant, &identity, "bootstrap", vec!["admin".to_owned()], ttl_secs, None).await?;
    Ok(Some(minted))
}

/// Records and signs a token.
#[allow(clippy::too_many_arguments)]
pub async fn mint(
    st: &SecretsState,
    caller: &Caller,
    tenant: &TenantId,
    identity: &IdentityDoc,
    name: &str,
    scopes: Vec<String>,
    ttl_secs: i64,
    mfa_verified_at: Option<i64>,
) -> ApiResult<(String, TokenDoc)> {
    let keys = st.keys().await?;
    let now = Timestamp::now();
    let iat = now.0 / 1000;
    let exp = iat.saturating_add(ttl_secs);
    let jti = new_id("tok");
    let record = TokenDoc {
        token_id: jti.clone(),
        tenant: tenant.to_string(),
        name: name.to_owned(),
        identity_type: identity.identity_type.clone(),
        identity_id: identity.identity_id.clone(),
        scopes: scopes.clone(),
        created_at: now.to_rfc3339(),
        expires_at: Timestamp(exp.saturating_mul(1000)).to_rfc3339(),
        created_by: caller.identity.clone(),
        revoked_at: None,
    };
    let doc = Document::new(KIND_TOKEN, &jti, tenant.clone(), serde_json::to_value(&record).unwrap_or_default());
    st.dispatcher.put_document(caller, doc, Precondition::Absent).await?;
    let mut amr = vec!["token".to_owned()];
    if mfa_verified_at.is_some() {
        amr.push("mfa".to_owned());
    }
    let claims = Claims {
        jti,
        sub: identity.identity_id.clone(),
        typ: identity.identity_type.clone(),
        tenant: tenant.to_string(),
        partner: PARTNER.to_owned(),
        scopes,
        iat,
        exp,
        amr,
        mfa_verified_at,
    };
    Ok((keys.sign_token(&claims), record))
}

/// Turns the run-time maintenance switch on or off (every replica follows within its change-poll interval).
pub async fn set_maintenance(st: &SecretsState, on: bool) -> ApiResult<()> {
    let admin = Caller::admin(st.home.clone());
    let body = serde_json::json!({"enabled": on, "changed_at": now_rfc3339()});
    let doc = Document::new(crate::model::KIND_SETTINGS, crate::model::MAINTENANCE_ID, st.home.clone(), body);
    st.dispatcher.put_document(&admin, doc, Precondition::Any).await?;
    Ok(())
}

//! Routing of `/v1` and the phase-1 handlers. Each handler follows the contract's check order: authenticate
//! (steps 2-5, in `SecretsState::authenticate`), parse and validate (7), admin role then scope (8), policy (9),
//! existence (10), conflicts (11), dependencies (12).

use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use kmsgate_core::{Caller, Document, Precondition, TenantId};
use serde_json::{Map, Value, json};

use crate::code::ErrorCode;
use crate::error::ApiError;
use crate::model::{PolicyDoc, RequestContext};
use crate::ratelimit::Category;
use crate::service::{
    ApiResult, Auth, Ctx, SecretsState, feature_disabled, is_unshipped, method_not_allowed, percent_decode,
    route_not_found,
};

mod access;
mod secrets;

pub async fn dispatch(st: &SecretsState, ctx: &mut Ctx) -> ApiResult {
    let path = ctx.path.clone();
    let segs: Vec<&str> = if path.is_empty() { Vec::new() } else { path.split('/').collect() };
    let m = ctx.method.clone();
    match segs.as_slice() {
        ["auth", "whoami"] => only(&m, &[Method::GET])?.then(access::whoami(st, ctx)).await,
        ["auth", "introspect"] => only(&m, &[Method::POST])?.then(access::introspect(st, ctx)).await,
        ["auth", "tokens"] => match m {
            Method::POST => access::mint_token(st, ctx).await,
            Method::GET => access::list_tokens(st, ctx).await,
            _ => Err(method_not_allowed()),
        },
        ["auth", "tokens", id] => {
            let id = percent_decode(id);
            match m {
                Method::GET => access::get_token(st, ctx, &id).await,
                Method::DELETE => access::revoke_token(st, ctx, &id).await,
                _ => Err(method_not_allowed()),
            }
        }
        ["identities"] => match m {
            Method::POST => access::create_identity(st, ctx).await,
            Method::GET => access::list_identities(st, ctx).await,
            _ => Err(method_not_allowed()),
        },
        ["identities", typ, id] => {
            let (typ, id) = (percent_decode(typ), percent_decode(id));
            match m {
                Method::GET => access::get_identity(st, ctx, &typ, &id).await,
                Method::DELETE => access::delete_identity(st, ctx, &typ, &id).await,
                _ => Err(method_not_allowed()),
            }
        }
        ["tenants"] => match m {
            Method::POST => access::create_tenant(st, ctx).await,
            Method::GET => access::list_tenants(st, ctx).await,
            _ => Err(method_not_allowed()),
        },
        ["tenants", id] => {
            let id = percent_decode(id);
            match m {
                Method::GET => access::get_tenant(st, ctx, &id).await,
                Method::PATCH => access::patch_tenant(st, ctx, &id).await,
                Method::DELETE => access::delete_tenant(st, ctx, &id).await,
                _ => Err(method_not_allowed()),
            }
        }
        ["policies"] => match m {
            Method::POST => access::create_policy(st, ctx).await,
            Method::GET => access::list_policies(st, ctx).await,
            _ => Err(method_not_allowed()),
        },
        ["policies:test"] => only(&m, &[Method::POST])?.then(access::test_policy(st, ctx)).await,
        ["policies", id] => {
            let id = percent_decode(id);
            match m {
                Method::GET => access::get_policy(st, ctx, &id).await,
                Method::PUT => access::update_policy(st, ctx, &id, true).await,
                Method::PATCH => access::update_policy(st, ctx, &id, false).await,
                Method::DELETE => access::delete_policy(st, ctx, &id).await,
                _ => Err(method_not_allowed()),
            }
        }
        ["policies", id, "bindings"] => {
            let id = percent_decode(id);
            match m {
                Method::POST => access::create_binding(st, ctx, &id).await,
                Method::GET => access::list_bindings(st, ctx, &id).await,
                _ => Err(method_not_allowed()),
            }
        }
        ["policies", id, "bindings", bid] => {
            let (id, bid) = (percent_decode(id), percent_decode(bid));
            only(&m, &[Method::DELETE])?.then(access::delete_binding(st, ctx, &id, &bid)).await
        }
        ["secrets"] => only(&m, &[Method::GET])?.then(secrets::list(st, ctx)).await,
        ["secrets:batch-read"] => only(&m, &[Method::POST])?.then(secrets::batch_read(st, ctx)).await,
        ["secrets", ..] => {
            let raw = percent_decode(&path["secrets/".len()..]);
            let (p, verb) = match raw.rsplit_once(':') {
                Some((p, v)) => (p.to_owned(), Some(v.to_owned())),
                None => (raw.clone(), None),
            };
            match (verb.as_deref(), m) {
                (None, Method::GET) => secrets::get(st, ctx, &p).await,
                (None, Method::PUT) => secrets::put(st, ctx, &p).await,
                (None, Method::DELETE) => secrets::delete(st, ctx, &p).await,
                (Some("metadata"), Method::GET) => secrets::get_metadata(st, ctx, &p).await,
                (Some("metadata"), Method::PATCH) => secrets::patch_metadata(st, ctx, &p).await,
                (Some("versions"), Method::GET) => secrets::versions(st, ctx, &p).await,
                (Some("restore"), Method::POST) => secrets::restore(st, ctx, &p).await,
                (Some("rollback"), Method::POST) => secrets::rollback(st, ctx, &p).await,
                (Some("rotate"), Method::POST) => {
                    // Rotation is phase 2: authenticated callers learn it is not deployed.
                    st.authenticate(ctx, Category::Write).await?;
                    Err(feature_disabled("rotation"))
                }
                (None | Some("metadata" | "versions" | "restore" | "rollback"), _) => Err(method_not_allowed()),
                (Some(_), _) => Err(route_not_found()),
            }
        }
        [first, ..] if is_unshipped(first.split(':').next().unwrap_or(first)) => {
            st.authenticate(ctx, Category::Read).await?;
            Err(feature_disabled(first.split(':').next().unwrap_or(first)))
        }
        _ => Err(route_not_found()),
    }
}

/// A method guard that reads well in the dispatch table.
struct Allowed;

impl Allowed {
    async fn then(self, f: impl Future<Output = ApiResult>) -> ApiResult {
        f.await
    }
}

fn only(m: &Method, allowed: &[Method]) -> ApiResult<Allowed> {
    if allowed.contains(m) { Ok(Allowed) } else { Err(method_not_allowed()) }
}

// ---- shared helpers ----------------------------------------------------------------------------------

/// The body as a JSON object; malformed JSON or another JSON type is `invalid_request`.
pub fn body_object(ctx: &Ctx) -> ApiResult<Map<String, Value>> {
    if ctx.body.is_empty() {
        return Err(ApiError::invalid_request("a JSON body is required"));
    }
    match serde_json::from_slice::<Value>(&ctx.body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::invalid_request("the body must be a JSON object")),
        Err(e) => Err(ApiError::invalid_request(format!("malformed JSON at line {} column {}", e.line(), e.column()))),
    }
}

/// An optional string field; another JSON type is `invalid_request`.
pub fn opt_str<'a>(m: &'a Map<String, Value>, field: &str) -> ApiResult<Option<&'a str>> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::invalid_request(format!("{field} must be a string"))),
    }
}

pub fn req_str<'a>(m: &'a Map<String, Value>, field: &str) -> ApiResult<&'a str> {
    match opt_str(m, field)? {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(ApiError::validation(field, "required", "is required")),
    }
}

pub fn opt_u64(m: &Map<String, Value>, field: &str) -> ApiResult<Option<u64>> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::invalid_request(format!("{field} must be a non-negative integer"))),
    }
}

pub fn opt_bool(m: &Map<String, Value>, field: &str) -> ApiResult<Option<bool>> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::invalid_request(format!("{field} must be a boolean"))),
    }
}

pub fn str_list(m: &Map<String, Value>, field: &str) -> ApiResult<Option<Vec<String>>> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(|| ApiError::invalid_request(format!("{field} must be an array of strings"))),
        Some(_) => Err(ApiError::invalid_request(format!("{field} must be an array of strings"))),
    }
}

/// The scope a policy permission needs on the token.
pub fn scope_for(permission: &str) -> String {
    if permission == "admin" { "admin".to_owned() } else { format!("secrets:{permission}") }
}

impl SecretsState {
    /// Steps 8-9 for a secret path: the scope, then the policies bound to the caller (admins pass).
    pub async fn authorize(&self, ctx: &Ctx, auth: &Auth, permission: &str, path: &str) -> ApiResult<()> {
        auth.require_scope(&scope_for(permission))?;
        if auth.is_admin() {
            return Ok(());
        }
        let policies =
            self.bound_policies(&auth.tenant, &auth.claims.typ, &auth.claims.sub, &auth.identity.groups).await?;
        let refs: Vec<&PolicyDoc> = policies.iter().collect();
        crate::model::evaluate(&refs, path, permission, &request_context(ctx, auth)).into_result()
    }

    /// The active policies bound (unexpired) to the identity or one of its groups in `tenant`.
    pub async fn bound_policies(
        &self,
        tenant: &TenantId,
        typ: &str,
        id: &str,
        groups: &[String],
    ) -> ApiResult<Vec<PolicyDoc>> {
        let now = kmsgate_core::Timestamp::now().0 / 1000;
        let mut out: Vec<PolicyDoc> = Vec::new();
        for b in self.tenant_bindings(tenant).await?.iter() {
            let mine = (b.identity_type == typ && b.identity_id == id)
                || (b.identity_type == "group" && groups.contains(&b.identity_id));
            let live = b.expires_at.as_deref().and_then(crate::service::unix_of).is_none_or(|t| t > now);
            if !mine || !live || out.iter().any(|p| p.id == b.policy_id) {
                continue;
            }
            if let Some(p) = self.dispatcher.document(crate::model::KIND_POLICY, &b.policy_id).await? {
                let p: PolicyDoc = crate::service::parse_body(&p)?;
                if p.is_active && p.tenant == tenant.as_str() {
                    out.push(p);
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

pub fn request_context(ctx: &Ctx, auth: &Auth) -> RequestContext {
    RequestContext {
        ip: ctx.peer,
        mfa_verified_at: auth.claims.mfa_verified_at,
        at: kmsgate_core::Timestamp::now().0 / 1000,
    }
}

/// Writes a document, mapping a failed revision precondition to `version_conflict`.
pub async fn put_doc(st: &SecretsState, caller: &Caller, doc: Document, pre: Precondition) -> ApiResult<Document> {
    let expected = match pre {
        Precondition::Revision(r) => Some(r),
        _ => None,
    };
    match st.dispatcher.put_document(caller, doc, pre).await? {
        Some(d) => Ok(d),
        None => {
            let mut e = ApiError::new(ErrorCode::VersionConflict, "the record changed since it was read");
            if let Some(r) = expected {
                e = e.detail("expected", r);
            }
            Err(e)
        }
    }
}

pub fn with_etag(mut r: Response, etag: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(etag) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

/// An `If-Match` value as the revision it names (`"12"` or `W/"12"`), or `version_conflict` if unparsable.
pub fn if_match_number(ctx: &Ctx) -> ApiResult<Option<i64>> {
    let Some(v) = ctx.if_match() else { return Ok(None) };
    if v == "*" {
        // "Any current representation": no revision to compare (a missing resource still fails as not found).
        return Ok(None);
    }
    let v = v.strip_prefix("W/").unwrap_or(&v);
    let inner = v.trim_matches('"');
    inner.parse::<i64>().map(Some).map_err(|_| {
        ApiError::new(ErrorCode::VersionConflict, "If-Match does not name a current ETag")
            .detail("expected", inner.to_owned())
    })
}

pub fn etag(n: i64) -> String {
    format!("\"{n}\"")
}

pub fn created(v: Value) -> Response {
    crate::service::json(StatusCode::CREATED, v)
}

pub fn ok(v: Value) -> Response {
    crate::service::json(StatusCode::OK, v)
}

pub fn no_content() -> Response {
    axum::response::IntoResponse::into_response(StatusCode::NO_CONTENT)
}

pub fn list_reply(items_key: &str, items: Vec<Value>, cursor: Option<String>) -> Response {
    let has_more = cursor.is_some();
    ok(json!({ items_key: items, "cursor": cursor, "has_more": has_more }))
}

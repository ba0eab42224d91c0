//! `/v1/secrets...`: versioned secrets over core's secret inventory.

use std::time::Duration;

use axum::http::StatusCode;
use kmsgate_core::{
    DeleteMode, DeletedFilter, PageRequest, PutSecretRequest, Secret, SecretFilter, SecretListFilter, SecretPatch,
    SecretPath, SecretSelector, Timestamp,
};
use serde_json::{Map, Value, json};

use super::{
    body_object, created, etag, if_match_number, list_reply, no_content, ok, opt_str, opt_u64, str_list, with_etag,
};
use crate::code::ErrorCode;
use crate::error::ApiError;
use crate::model::SECRET_TYPES;
use crate::ratelimit::Category;
use crate::service::{ApiResult, Auth, Ctx, SecretsState, limit, parse_time, rfc3339};
use crate::values::parse_duration;

/// Most paths one batch read takes.
pub const MAX_BATCH: usize = 100;

fn parse_path(p: &str) -> ApiResult<SecretPath> {
    SecretPath::parse(p).map_err(|e| {
        ApiError::new(ErrorCode::InvalidPath, e.message().to_owned()).detail("path", crate::values::truncate(p, 512))
    })
}

fn check_type(t: &str) -> ApiResult<()> {
    if SECRET_TYPES.contains(&t) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidSecretType,
            format!("secret_type must be one of {}", SECRET_TYPES.join(", ")),
        )
        .detail("secret_type", crate::values::truncate(t, 64)))
    }
}

/// `metadata{description, tags[], owner, custom{}}`: any other field or type is a validation error.
fn check_metadata(m: &Value) -> ApiResult<()> {
    let Some(obj) = m.as_object() else {
        return Err(ApiError::invalid_request("metadata must be an object"));
    };
    for (k, v) in obj {
        let ok = match k.as_str() {
            "description" | "owner" => v.is_string(),
            "tags" => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
            "custom" => v.is_object(),
            _ => {
                return Err(ApiError::validation(&format!("metadata.{k}"), "unknown_field", "is not a metadata field"));
            }
        };
        if !ok {
            return Err(ApiError::validation(&format!("metadata.{k}"), "invalid_type", "has the wrong type"));
        }
    }
    Ok(())
}

fn check_max_versions(n: u64) -> ApiResult<u32> {
    u32::try_from(n)
        .ok()
        .filter(|n| (1..=100).contains(n))
        .ok_or_else(|| ApiError::validation("options.max_versions", "out_of_range", "must be 1 to 100"))
}

/// `expires_in` / `expires_at` (at most one) as an absolute time.
fn expiry(m: &Map<String, Value>, prefix: &str) -> ApiResult<Option<Timestamp>> {
    let within = opt_str(m, "expires_in")?;
    let at = opt_str(m, "expires_at")?;
    match (within, at) {
        (Some(_), Some(_)) => Err(ApiError::validation(
            &format!("{prefix}expires_at"),
            "conflict",
            "give expires_in or expires_at, not both",
        )),
        (Some(d), None) => {
            let d = parse_duration(&format!("{prefix}expires_in"), d)?;
            let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
            Ok(Some(Timestamp(Timestamp::now().0.saturating_add(ms))))
        }
        (None, Some(t)) => Ok(Some(parse_time(&format!("{prefix}expires_at"), t)?)),
        (None, None) => Ok(None),
    }
}

/// The record as the API shows it (never values).
pub fn metadata_json(s: &Secret) -> Value {
    let now = Timestamp::now();
    json!({
        "path": s.path.as_str(),
        "secret_type": s.secret_type,
        "metadata": s.metadata,
        "max_versions": s.max_versions,
        "current_version": s.current_version,
        "versions": s.versions.iter().map(|v| json!({
            "version": v.version,
            "created_at": rfc3339(v.created_at),
            "created_by": v.created_by,
        })).collect::<Vec<_>>(),
        "created_at": rfc3339(s.created_at),
        "updated_at": rfc3339(s.updated_at),
        "expires_at": s.expires_at.map(rfc3339),
        "expired": s.is_expired(now),
        "deleted": s.is_deleted(),
        "deleted_at": s.deleted_at.map(rfc3339),
        "recoverable_until": s.recoverable_until.map(rfc3339),
        "last_accessed_at": Value::Null,
        "rotation_policy_id": Value::Null,
        "secret_policy_id": Value::Null,
    })
}

/// Stored bytes as the API's `data` object. Secrets written here are JSON objects; a value written by
/// another frontend (Alibaba `SecretData` text) shows as `{"value": "..."}`.
fn data_json(bytes: &[u8]) -> Value {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({ "value": String::from_utf8_lossy(bytes) }),
    }
}

/// The tenant's soft-delete retention.
fn retention(auth: &Auth) -> Duration {
    parse_duration("retention", &auth.tenant_doc.retention).unwrap_or(Duration::from_secs(30 * 86_400))
}

async fn tenant_quota_allows_one_more(st: &SecretsState, auth: &Auth) -> ApiResult<()> {
    let Some(limit) = auth.tenant_doc.quotas.secrets else { return Ok(()) };
    let current = st.dispatcher.store().count_secrets(&auth.tenant).await?;
    if current >= limit {
        return Err(ApiError::new(ErrorCode::QuotaExceeded, "the tenant's secret quota is exhausted")
            .detail("quota", "secrets")
            .detail("limit", limit)
            .detail("current", current));
    }
    Ok(())
}

pub async fn put(st: &SecretsState, ctx: &mut Ctx, raw: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::Write).await?;
    let body = body_object(ctx)?;
    let path = parse_path(raw)?;
    let secret_type = opt_str(&body, "secret_type")?;
    if let Some(t) = secret_type {
        check_type(t)?;
    }
    let options = match body.get("options") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(_) => return Err(ApiError::invalid_request("options must be an object")),
    };
    let expires_at = expiry(&options, "options.")?;
    let data = match body.get("data") {
        Some(v @ Value::Object(_)) => v,
        Some(_) => return Err(ApiError::validation("data", "invalid_type", "must be a JSON object")),
        None => return Err(ApiError::validation("data", "required", "is required")),
    };
    if let Some(m) = body.get("metadata").filter(|m| !m.is_null()) {
        check_metadata(m)?;
    }
    let max_versions = opt_u64(&options, "max_versions")?.map(check_max_versions).transpose()?;
    let cas_body = opt_u64(&options, "cas")?;
    let cas_header = if_match_number(ctx)?;
    let cas = match (cas_body, cas_header) {
        (Some(a), Some(b)) if i64::try_from(a).ok() != Some(b) => {
            return Err(ApiError::validation("options.cas", "conflict", "differs from If-Match"));
        }
        (Some(a), _) => {
            Some(u32::try_from(a).map_err(|_| ApiError::validation("options.cas", "out_of_range", "too large"))?)
        }
        (None, Some(b)) => Some(u32::try_from(b).map_err(|_| {
            ApiError::new(ErrorCode::VersionConflict, "If-Match does not name a version").detail("expected", b)
        })?),
        (None, None) => None,
    };
    let rotation_policy_id = opt_str(&options, "rotation_policy_id")?;
    let secret_policy_id = opt_str(&options, "secret_policy_id")?;
    st.authorize(ctx, &auth, "write", path.as_str()).await?;
    // Rotation and secret policies are phase-2 resources: none exists, so any reference names nothing.
    if let Some(id) = rotation_policy_id {
        return Err(ApiError::new(ErrorCode::RotationPolicyNotFound, "no such rotation policy")
            .detail("rotation_policy_id", crate::values::truncate(id, 128)));
    }
    if let Some(id) = secret_policy_id {
        return Err(ApiError::new(ErrorCode::SecretPolicyNotFound, "no such secret policy")
            .detail("secret_policy_id", crate::values::truncate(id, 128)));
    }
    if cas.is_none_or(|c| c == 0) && st.dispatcher.store().get_secret(&auth.tenant, &path).await?.is_none() {
        tenant_quota_allows_one_more(st, &auth).await?;
    }
    let mut req = PutSecretRequest::new(path.clone(), serde_json::to_vec(data).unwrap_or_default());
    req.secret_type = secret_type.map(str::to_owned);
    req.metadata = body.get("metadata").filter(|m| !m.is_null()).cloned();
    req.max_versions = max_versions;
    // A PUT without an expiry keeps none: `expires_at` is per write (a new PUT resets it).
    req.expires_at = Some(expires_at);
    req.cas = cas;
    let w = st.dispatcher.put_secret(&auth.caller, req).await?;
    let v = json!({
        "path": path.as_str(),
        "version": w.version.version,
        "created_at": rfc3339(w.version.created_at),
        "expires_at": w.secret.expires_at.map(rfc3339),
    });
    let r = if w.created { created(v) } else { ok(v) };
    Ok(with_etag(r, &etag(i64::from(w.secret.current_version))))
}

fn version_param(ctx: &Ctx) -> ApiResult<Option<u32>> {
    match ctx.query("version") {
        None => Ok(None),
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .map(Some)
            .ok_or_else(|| ApiError::validation("version", "invalid", "must be a positive integer")),
    }
}

pub async fn get(st: &SecretsState, ctx: &mut Ctx, raw: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::Read).await?;
    let path = parse_path(raw)?;
    let version = version_param(ctx)?;
    st.authorize(ctx, &auth, "read", path.as_str()).await?;
    let sel = version.map_or(SecretSelector::Current, SecretSelector::Version);
    let v = st.dispatcher.get_secret_value(&auth.caller, &path, &sel).await?;
    let s = &v.secret;
    let body = json!({
        "path": s.path.as_str(),
        "secret_type": s.secret_type,
        "version": v.version.version,
        "data": data_json(&v.data),
        "metadata": s.metadata,
        "created_at": rfc3339(v.version.created_at),
        "updated_at": rfc3339(s.updated_at),
        "expires_at": s.expires_at.map(rfc3339),
        "last_accessed_at": Value::Null,
        "rotation_policy_id": Value::Null,
        "secret_policy_id": Value::Null,
    });
    Ok(with_etag(ok(body), &etag(i64::from(v.version.version))))
}

pub async fn get_metadata(st: &SecretsState, ctx: &mut Ctx, raw: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::Read).await?;
    let path = parse_path(raw)?;
    st.authorize(ctx, &auth, "list", path.as_str()).await?;
    let s = st.dispatcher.describe_secret(&auth.caller, &path, false).await?;
    Ok(with_etag(ok(metadata_json(&s)), &etag(s.revision)))
}

pub async fn patch_metadata(st: &SecretsState, ctx: &mut Ctx, raw: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::Write).await?;
    let body = body_object(ctx)?;
    let path = parse_path(raw)?;
    let mut patch = SecretPatch::default();
    if let Some(t) = opt_str(&body, "secret_type")? {
        check_type(t)?;
        patch.secret_type = Some(t.to_owned());
    }
    if body.get("expires_at").is_some_and(Value::is_null) && !body.contains_key("expires_in") {
        patch.expires_at = Some(None);
    } else if let Some(t) = expiry(&body, "")? {
        patch.expires_at = Some(Some(t));
    }
    let metadata_patch = match body.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            let set: serde_json::Map<String, Value> =
                m.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
            check_metadata(&Value::Object(set))?;
            Some(m.clone())
        }
        Some(_) => return Err(ApiError::invalid_request("metadata must be an object")),
    };
    patch.max_versions = opt_u64(&body, "max_versions")?.map(check_max_versions).transpose()?;
    patch.expected_revision = if_match_number(ctx)?;
    st.authorize(ctx, &auth, "write", path.as_str()).await?;
    if let Some(changes) = metadata_patch {
        // JSON merge patch on the metadata object: given fields replace, `null` removes, others stay. The
        // write is conditional on the record merged into.
        let current = st.dispatcher.describe_secret(&auth.caller, &path, false).await?;
        if let Some(e) = patch.expected_revision.filter(|e| *e != current.revision) {
            return Err(ApiError::new(ErrorCode::VersionConflict, "the secret changed since it was read")
                .detail("expected", e)
                .detail("current", current.revision));
        }
        let mut merged = current.metadata.as_object().cloned().unwrap_or_default();
        for (k, v) in changes {
            if v.is_null() {
                merged.remove(&k);
            } else {
                merged.insert(k, v);
            }
        }
        let merged = Value::Object(merged);
        check_metadata(&merged)?;
        patch.metadata = Some(merged);
        patch.expected_revision = Some(current.revision);
    }
    let s = st.dispatcher.update_secret_metadata(&auth.caller, &path, patch).await?;
    Ok(with_etag(ok(metadata_json(&s)), &etag(s.revision)))
}

pub async fn versions(st: &SecretsState, ctx: &mut Ctx, raw: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::List).await?;
    let path = parse_path(raw)?;
    let limit = limit(ctx)?;
    let filters = ["versions", path.as_str()];
    let after = st.read_cursor(ctx, &auth.tenant, &filters).await?;
    st.authorize(ctx, &auth, "list", path.as_str()).await?;
    let s = st.dispatcher.describe_secret(&auth.caller, &path, false).await?;
    let after: u32 = after.and_then(|a| a.parse().ok()).unwrap_or(0);
    // Newest first; pruned versions are gone from the record (their data is destroyed).
    let mut all: Vec<_> = s.versions.iter().filter(|v| after == 0 || v.version < after).collect();
    all.sort_by_key(|v| std::cmp::Reverse(v.version));
    let n = usize::try_from(limit).unwrap_or(100);
    let more = all.len() > n;
    all.truncate(n);
    let items: Vec<Value> = all
        .iter()
        .map(|v| {
            json!({
                "version": v.version,
                "state": "active",
                "current": v.version == s.current_version,
                "created_at": rfc3339(v.created_at),
                "created_by": v.created_by,
            })
        })
        .collect();
    let last = if more { all.last().map(|v| v.version.to_string()) } else { None };
    let cursor = st.cursor(&auth.tenant, &filters, last).await?;
    Ok(list_reply("versions", items, cursor))
}

pub async fn list(st: &SecretsState, ctx: &mut Ctx) -> ApiResult {
    let auth = st.authenticate(ctx, Category::List).await?;
    let prefix = match ctx.query("prefix").filter(|p| !p.is_empty()) {
        Some(p) => Some(parse_path(p.trim_end_matches('/'))?),
        None => None,
    };
    let secret_type = ctx.query("secret_type").map(str::to_owned);
    if let Some(t) = &secret_type {
        check_type(t)?;
    }
    let expiring = match ctx.query("expiring_within") {
        Some(d) => Some(parse_duration("expiring_within", d)?),
        None => None,
    };
    let deleted = match ctx.query("include_deleted") {
        None | Some("false") => DeletedFilter::Exclude,
        Some("true") => DeletedFilter::Include,
        Some("only") => DeletedFilter::Only,
        Some(_) => return Err(ApiError::validation("include_deleted", "invalid", "must be false, true or only")),
    };
    let tag = ctx.query("tag").map(str::to_owned);
    let limit = limit(ctx)?;
    let filters = [
        "secrets",
        prefix.as_ref().map_or("", |p| p.as_str()),
        secret_type.as_deref().unwrap_or(""),
        tag.as_deref().unwrap_or(""),
        ctx.query("include_deleted").unwrap_or("false"),
        ctx.query("expiring_within").unwrap_or(""),
    ];
    let after = st.read_cursor(ctx, &auth.tenant, &filters).await?;
    auth.require_scope("secrets:list")?;
    // Admins see everything; others see the secrets their policies let them list, and need at least one
    // rule granting `list` somewhere.
    let policies = if auth.is_admin() {
        None
    } else {
        let p = st.bound_policies(&auth.tenant, &auth.claims.typ, &auth.claims.sub, &auth.identity.groups).await?;
        let any_list =
            p.iter().any(|p| p.rules.iter().any(|r| r.permissions.iter().any(|x| x == "list" || x == "admin")));
        if !any_list {
            return Err(ApiError::new(ErrorCode::AccessDenied, "no policy rule grants list"));
        }
        Some(p)
    };
    let filter = SecretListFilter {
        store: SecretFilter { prefix: prefix.clone(), deleted },
        secret_type: secret_type.clone(),
        tag: tag.clone(),
        expiring_within: expiring,
    };
    let page = st.dispatcher.list_secrets(&auth.caller, &filter, &PageRequest { after, limit }).await?;
    let rctx = super::request_context(ctx, &auth);
    let items: Vec<Value> = page
        .items
        .iter()
        .filter(|s| match &policies {
            None => true,
            Some(p) => {
                let refs: Vec<_> = p.iter().collect();
                crate::model::evaluate(&refs, s.path.as_str(), "list", &rctx).allowed
            }
        })
        .map(metadata_json)
        .collect();
    let cursor = st.cursor(&auth.tenant, &filters, page.next).await?;
    Ok(list_reply("secrets", items, cursor))
}

pub async fn batch_read(st: &SecretsState, ctx: &mut Ctx) -> ApiResult {
    let auth = st.authenticate(ctx, Category::BatchRead).await?;
    let body = body_object(ctx)?;
    let paths = str_list(&body, "paths")?.ok_or_else(|| ApiError::validation("paths", "required", "is required"))?;
    if paths.is_empty() || paths.len() > MAX_BATCH {
        return Err(ApiError::validation("paths", "out_of_range", "must hold 1 to 100 paths"));
    }
    let parsed = paths.iter().map(|p| parse_path(p)).collect::<ApiResult<Vec<_>>>()?;
    auth.require_scope("secrets:read")?;
    let mut secrets = Map::new();
    let mut errors = Map::new();
    for path in parsed {
        let key = path.to_string();
        if secrets.contains_key(&key) || errors.contains_key(&key) {
            continue;
        }
        let res: ApiResult<Value> = async {
            st.authorize(ctx, &auth, "read", path.as_str()).await?;
            let v = st.dispatcher.get_secret_value(&auth.caller, &path, &SecretSelector::Current).await?;
            Ok(json!({
                "path": key,
                "secret_type": v.secret.secret_type,
                "version": v.version.version,
                "data": data_json(&v.data),
                "metadata": v.secret.metadata,
                "created_at": rfc3339(v.version.created_at),
                "expires_at": v.secret.expires_at.map(rfc3339),
            }))
        }
        .await;
        match res {
            Ok(v) => {
                secrets.insert(key, v);
            }
            Err(e) => {
                errors.insert(key, json!({"code": e.code.as_str(), "message": e.message}));
            }
        }
    }
    Ok(ok(json!({"secrets": secrets, "errors": errors})))
}

pub async fn delete(st: &SecretsState, ctx: &mut Ctx, raw: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::Delete).await?;
    let path = parse_path(raw)?;
    let permanent = match ctx.query("permanent") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::validation("permanent", "invalid", "must be true or false")),
    };
    st.authorize(ctx, &auth, "delete", path.as_str()).await?;
    if permanent {
        // Destroying every version for good needs the `admin` permission on the path as well.
        st.authorize(ctx, &auth, "admin", path.as_str()).await?;
        st.dispatcher.delete_secret(&auth.caller, &path, DeleteMode::Permanent).await?;
        return Ok(no_content());
    }
    let s = st.dispatcher.delete_secret(&auth.caller, &path, DeleteMode::Soft { retention: retention(&auth) }).await?;
    Ok(ok(json!({
        "path": s.path.as_str(),
        "deleted_at": s.deleted_at.map(rfc3339),
        "recoverable_until": s.recoverable_until.map(rfc3339),
    })))
}

pub async fn restore(st: &SecretsState, ctx: &mut Ctx, raw: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::Write).await?;
    let path = parse_path(raw)?;
    st.authorize(ctx, &auth, "write", path.as_str()).await?;
    let existing = st.dispatcher.store().get_secret(&auth.tenant, &path).await?;
    match &existing {
        Some(s) if s.is_recoverable(Timestamp::now()) => tenant_quota_allows_one_more(st, &auth).await?,
        _ => {}
    }
    let s = st.dispatcher.restore_secret(&auth.caller, &path).await?;
    Ok(ok(metadata_json(&s)))
}

pub async fn rollback(st: &SecretsState, ctx: &mut Ctx, raw: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::Write).await?;
    let body = body_object(ctx)?;
    let path = parse_path(raw)?;
    let version = opt_u64(&body, "version")?
        .and_then(|v| u32::try_from(v).ok())
        .filter(|v| *v > 0)
        .ok_or_else(|| ApiError::validation("version", "required", "a positive version number is required"))?;
    let cas = match (opt_u64(&body, "cas")?, if_match_number(ctx)?) {
        (Some(c), _) => u32::try_from(c).ok(),
        (None, Some(c)) => Some(u32::try_from(c).map_err(|_| {
            ApiError::new(ErrorCode::VersionConflict, "If-Match does not name a version").detail("expected", c)
        })?),
        (None, None) => None,
    };
    st.authorize(ctx, &auth, "write", path.as_str()).await?;
    let w = st.dispatcher.rollback_secret(&auth.caller, &path, version, cas).await?;
    let r = crate::service::json(
        StatusCode::OK,
        json!({
            "path": path.as_str(),
            "version": w.version.version,
            "rolled_back_to": version,
            "created_at": rfc3339(w.version.created_at),
            "expires_at": w.secret.expires_at.map(rfc3339),
        }),
    );
    Ok(with_etag(r, &etag(i64::from(w.version.version))))
}

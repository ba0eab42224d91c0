//! Auth, tokens, identities, tenants, policies and bindings.

use kmsgate_core::{Caller, Document, PageRequest, Precondition, TenantId};
use serde_json::{Map, Value, json};

use super::{
    body_object, created, etag, if_match_number, list_reply, no_content, ok, opt_bool, opt_str, put_doc, req_str,
    str_list, with_etag,
};
use crate::code::ErrorCode;
use crate::error::ApiError;
use crate::model::{
    BindingDoc, IDENTITY_TYPES, IdentityDoc, KIND_BINDING, KIND_BINDING_KEY, KIND_IDENTITY, KIND_POLICY,
    KIND_POLICY_NAME, KIND_TENANT, KIND_TOKEN, PolicyDoc, Quotas, RequestContext, Rule, TenantDoc, TokenDoc, evaluate,
    validate_rules,
};
use crate::ratelimit::Category;
use crate::service::{
    ApiResult, Auth, Ctx, SecretsState, mint, now_rfc3339, parse_body, parse_time, scope_covers, tenant_not_found,
    unix_of,
};
use crate::values::{new_id, parse_duration, truncate};

fn identity_not_found() -> ApiError {
    ApiError::new(ErrorCode::IdentityNotFound, "no such identity")
}

fn policy_not_found() -> ApiError {
    ApiError::new(ErrorCode::PolicyNotFound, "no such policy")
}

fn name_conflict(what: &str) -> ApiError {
    ApiError::new(ErrorCode::NameConflict, format!("{what} already exists"))
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// `[A-Za-z0-9._@-]{1,128}`: identity ids, names of policies and tokens are printable and bounded.
fn check_name(field: &str, s: &str, max: usize) -> ApiResult<()> {
    let ok = (1..=max).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@' | b' '));
    if ok {
        Ok(())
    } else {
        Err(ApiError::validation(field, "invalid", format!("must be 1-{max} of A-Z a-z 0-9 . _ - @ and space")))
    }
}

fn check_identity_type(field: &str, t: &str, allow_group: bool) -> ApiResult<()> {
    if IDENTITY_TYPES.contains(&t) && (allow_group || t != "group") {
        Ok(())
    } else {
        Err(ApiError::validation(field, "unknown_value", "must be user, service_account or group"))
    }
}

// ---- whoami / introspect -----------------------------------------------------------------------------

pub async fn whoami(st: &SecretsState, ctx: &mut Ctx) -> ApiResult {
    let auth = st.authenticate(ctx, Category::Whoami).await?;
    let c = &auth.claims;
    Ok(ok(json!({
        "identity_id": c.sub,
        "identity_type": c.typ,
        "tenant_id": auth.tenant.as_str(),
        "home_tenant_id": c.tenant,
        "partner_id": c.partner,
        "token_id": c.jti,
        "scopes": c.scopes,
        "groups": auth.identity.groups,
        "roles": auth.identity.roles,
        "mfa_verified_at": c.mfa_verified_at.map(|t| kmsgate_core::Timestamp(t.saturating_mul(1000)).to_rfc3339()),
        "token_expires_at": kmsgate_core::Timestamp(c.exp.saturating_mul(1000)).to_rfc3339(),
    })))
}

pub async fn introspect(st: &SecretsState, ctx: &mut Ctx) -> ApiResult {
    let auth = st.authenticate(ctx, Category::Whoami).await?;
    let body = body_object(ctx)?;
    let token = req_str(&body, "token")?.to_owned();
    auth.require_admin("admin")?;
    let inactive = || ok(json!({"active": false}));
    let Ok(c) = st.verify_token(&token).await else { return Ok(inactive()) };
    // Admins see their own tenant's tokens; partner admins every tenant's.
    if c.tenant != auth.tenant.as_str() && !auth.is_partner_admin() {
        return Ok(inactive());
    }
    Ok(ok(json!({
        "active": true,
        "token_id": c.jti,
        "identity_id": c.sub,
        "identity_type": c.typ,
        "tenant_id": c.tenant,
        "scopes": c.scopes,
        "expires_at": kmsgate_core::Timestamp(c.exp.saturating_mul(1000)).to_rfc3339(),
    })))
}

// ---- tokens ------------------------------------------------------------------------------------------

fn token_json(t: &TokenDoc) -> Value {
    json!({
        "token_id": t.token_id,
        "name": t.name,
        "identity_type": t.identity_type,
        "identity_id": t.identity_id,
        "tenant_id": t.tenant,
        "scopes": t.scopes,
        "created_at": t.created_at,
        "created_by": t.created_by,
        "expires_at": t.expires_at,
        "revoked": t.revoked_at.is_some(),
        "revoked_at": t.revoked_at,
    })
}

/// A token is "live" for quota purposes until it expires or is revoked.
fn live(t: &TokenDoc) -> bool {
    t.revoked_at.is_none() && unix_of(&t.expires_at).is_some_and(|e| e > kmsgate_core::Timestamp::now().0 / 1000)
}

pub async fn mint_token(st: &SecretsState, ctx: &mut Ctx) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyOps).await?;
    let body = body_object(ctx)?;
    let name = req_str(&body, "name")?.to_owned();
    check_name("name", &name, 128)?;
    let ttl = match opt_str(&body, "ttl")? {
        Some(t) => {
            let d = parse_duration("ttl", t)?;
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
        }
        None => st.config.default_ttl_secs(),
    };
    if ttl <= 0 || ttl > st.config.max_ttl_secs() {
        return Err(ApiError::validation("ttl", "out_of_range", format!("must be 1s to {}", st.config.max_token_ttl)));
    }
    let scopes = str_list(&body, "scopes")?.ok_or_else(|| ApiError::validation("scopes", "required", "is required"))?;
    if scopes.is_empty() || scopes.len() > 50 {
        return Err(ApiError::validation("scopes", "out_of_range", "must hold 1 to 50 scopes"));
    }
    for (i, s) in scopes.iter().enumerate() {
        if !valid_scope(s) {
            return Err(ApiError::validation(&format!("scopes[{i}]"), "unknown_value", "is not a known scope"));
        }
    }
    let identity_type = opt_str(&body, "identity_type")?.unwrap_or("service_account").to_owned();
    check_identity_type("identity_type", &identity_type, false)?;
    let identity_id = opt_str(&body, "identity_id")?.map(str::to_owned);
    let mfa = opt_bool(&body, "mfa")?.unwrap_or(false);
    auth.require_admin("admin")?;
    // Never mint more than the caller holds.
    if let Some(s) = scopes.iter().find(|s| !scope_covers(&auth.claims.scopes, s)) {
        return Err(ApiError::new(ErrorCode::InsufficientScope, "the new token would be broader than the caller's")
            .detail("scope", s.clone()));
    }
    let identity = match identity_id {
        None => auth.identity.clone(),
        Some(id) => {
            let doc = st
                .dispatcher
                .document(KIND_IDENTITY, &IdentityDoc::doc_id(auth.tenant.as_str(), &identity_type, &id))
                .await?
                .ok_or_else(identity_not_found)?;
            parse_body(&doc)?
        }
    };
    if let Some(limit) = auth.tenant_doc.quotas.tokens {
        let current = st
            .all_documents(KIND_TOKEN, &auth.tenant)
            .await?
            .iter()
            .filter_map(|d| parse_body::<TokenDoc>(d).ok())
            .filter(live)
            .count() as u64;
        if current >= limit {
            return Err(ApiError::new(ErrorCode::QuotaExceeded, "the tenant's token quota is exhausted")
                .detail("quota", "tokens")
                .detail("limit", limit)
                .detail("current", current));
        }
    }
    // MFA freshness comes from the issuer: a token minted with `mfa` carries the caller's own MFA time.
    let mfa_at = if mfa { auth.claims.mfa_verified_at.or(Some(kmsgate_core::Timestamp::now().0 / 1000)) } else { None };
    let (token, record) = mint(st, &auth.caller, &auth.tenant, &identity, &name, scopes, ttl, mfa_at).await?;
    let mut v = token_json(&record);
    v["token"] = Value::from(token);
    Ok(created(v))
}

fn valid_scope(s: &str) -> bool {
    const FAMILIES: &[(&str, &[&str])] = &[
        ("secrets", &["read", "write", "delete", "list", "rotate", "*"]),
        ("policies", &["read", "write", "*"]),
        ("audit", &["read", "*"]),
        ("pki", &["read", "write", "*"]),
        ("dynamic", &["read", "write", "*"]),
        ("federation", &["read", "write", "*"]),
    ];
    s == "admin" || s.split_once(':').is_some_and(|(f, a)| FAMILIES.iter().any(|(ff, aa)| *ff == f && aa.contains(&a)))
}

async fn list_docs_page(
    st: &SecretsState,
    ctx: &Ctx,
    kind: &str,
    tenant: Option<&TenantId>,
    cursor_tenant: &TenantId,
    filters: &[&str],
) -> ApiResult<(Vec<Document>, Option<String>)> {
    let limit = crate::service::limit(ctx)?;
    let after = st.read_cursor(ctx, cursor_tenant, filters).await?;
    let page = st.dispatcher.list_documents(kind, tenant, &PageRequest { after, limit }).await?;
    let cursor = st.cursor(cursor_tenant, filters, page.next).await?;
    Ok((page.items, cursor))
}

pub async fn list_tokens(st: &SecretsState, ctx: &mut Ctx) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyOps).await?;
    crate::service::limit(ctx)?;
    let filters = ["tokens"];
    st.read_cursor(ctx, &auth.tenant, &filters).await?;
    auth.require_admin("admin")?;
    let (docs, cursor) = list_docs_page(st, ctx, KIND_TOKEN, Some(&auth.tenant), &auth.tenant, &filters).await?;
    let items = docs.iter().map(|d| parse_body::<TokenDoc>(d).map(|t| token_json(&t))).collect::<ApiResult<_>>()?;
    Ok(list_reply("tokens", items, cursor))
}

/// An unknown token id is `forbidden` (the contract: no probing of token ids).
async fn token_of(st: &SecretsState, auth: &Auth, id: &str) -> ApiResult<(Document, TokenDoc)> {
    let unknown = || ApiError::new(ErrorCode::Forbidden, "no access to this token");
    let doc = st.dispatcher.store().get_document(KIND_TOKEN, id).await?.ok_or_else(unknown)?;
    if doc.tenant != auth.tenant {
        return Err(unknown());
    }
    let t = parse_body(&doc)?;
    Ok((doc, t))
}

pub async fn get_token(st: &SecretsState, ctx: &mut Ctx, id: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyOps).await?;
    auth.require_admin("admin")?;
    let (_, t) = token_of(st, &auth, id).await?;
    Ok(ok(token_json(&t)))
}

pub async fn revoke_token(st: &SecretsState, ctx: &mut Ctx, id: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyOps).await?;
    auth.require_admin("admin")?;
    let (doc, mut t) = token_of(st, &auth, id).await?;
    if t.revoked_at.is_none() {
        t.revoked_at = Some(now_rfc3339());
        let mut d = doc.clone();
        d.body = to_value(&t);
        put_doc(st, &auth.caller, d, Precondition::Revision(doc.revision)).await?;
    }
    Ok(no_content())
}

// ---- identities --------------------------------------------------------------------------------------

fn identity_json(i: &IdentityDoc) -> Value {
    to_value(i)
}

pub async fn create_identity(st: &SecretsState, ctx: &mut Ctx) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyOps).await?;
    let body = body_object(ctx)?;
    let typ = req_str(&body, "identity_type")?.to_owned();
    check_identity_type("identity_type", &typ, true)?;
    let id = req_str(&body, "identity_id")?.to_owned();
    check_name("identity_id", &id, 128)?;
    let display_name = opt_str(&body, "display_name")?.unwrap_or_default().to_owned();
    let groups = str_list(&body, "groups")?.unwrap_or_default();
    for (i, g) in groups.iter().enumerate() {
        check_name(&format!("groups[{i}]"), g, 128)?;
    }
    let roles = str_list(&body, "roles")?.unwrap_or_default();
    for (i, r) in roles.iter().enumerate() {
        if r != crate::model::ROLE_ADMIN && r != crate::model::ROLE_PARTNER_ADMIN {
            return Err(ApiError::validation(
                &format!("roles[{i}]"),
                "unknown_value",
                "must be admin or partner_admin",
            ));
        }
    }
    auth.require_admin("admin")?;
    if roles.iter().any(|r| r == crate::model::ROLE_PARTNER_ADMIN) && !auth.is_partner_admin() {
        return Err(ApiError::new(ErrorCode::Forbidden, "only partner admins grant partner_admin"));
    }
    let doc_id = IdentityDoc::doc_id(auth.tenant.as_str(), &typ, &id);
    let record =
        IdentityDoc { identity_type: typ, identity_id: id, display_name, groups, roles, created_at: now_rfc3339() };
    let doc = Document::new(KIND_IDENTITY, &doc_id, auth.tenant.clone(), to_value(&record));
    match st.dispatcher.put_document(&auth.caller, doc, Precondition::Absent).await {
        Ok(_) => Ok(created(identity_json(&record))),
        Err(e) if e.kind() == kmsgate_core::ErrorKind::AlreadyExists => Err(name_conflict("the identity")),
        Err(e) => Err(e.into()),
    }
}

pub async fn list_identities(st: &SecretsState, ctx: &mut Ctx) -> ApiResult {
    let auth = st.authenticate(ctx, Category::IdentityRead).await?;
    crate::service::limit(ctx)?;
    let filters = ["identities"];
    st.read_cursor(ctx, &auth.tenant, &filters).await?;
    auth.require_admin("admin")?;
    let (docs, cursor) = list_docs_page(st, ctx, KIND_IDENTITY, Some(&auth.tenant), &auth.tenant, &filters).await?;
    let items =
        docs.iter().map(|d| parse_body::<IdentityDoc>(d).map(|i| identity_json(&i))).collect::<ApiResult<_>>()?;
    Ok(list_reply("identities", items, cursor))
}

async fn identity_doc(st: &SecretsState, auth: &Auth, typ: &str, id: &str) -> ApiResult<Document> {
    st.dispatcher
        .store()
        .get_document(KIND_IDENTITY, &IdentityDoc::doc_id(auth.tenant.as_str(), typ, id))
        .await?
        .ok_or_else(identity_not_found)
}

pub async fn get_identity(st: &SecretsState, ctx: &mut Ctx, typ: &str, id: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::IdentityRead).await?;
    auth.require_admin("admin")?;
    let doc = identity_doc(st, &auth, typ, id).await?;
    Ok(ok(identity_json(&parse_body(&doc)?)))
}

pub async fn delete_identity(st: &SecretsState, ctx: &mut Ctx, typ: &str, id: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyOps).await?;
    auth.require_admin("admin")?;
    let doc = identity_doc(st, &auth, typ, id).await?;
    // Tokens of a deleted identity stop working at once (`token_revoked`): authentication looks it up.
    st.dispatcher.delete_document(&auth.caller, KIND_IDENTITY, &doc.id).await?;
    Ok(no_content())
}

// ---- tenants -----------------------------------------------------------------------------------------

fn tenant_json(t: &TenantDoc) -> Value {
    to_value(t)
}

fn parse_quotas(body: &Map<String, Value>) -> ApiResult<Option<Quotas>> {
    match body.get("quotas") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|_| ApiError::validation("quotas", "invalid", "quotas are {secrets, tokens, policies}: integers")),
    }
}

fn parse_rate_limits(body: &Map<String, Value>) -> ApiResult<Option<Map<String, Value>>> {
    match body.get("rate_limits") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => {
            for (k, v) in m {
                if Category::parse(k).is_none() || k == "unauthenticated" {
                    return Err(ApiError::validation(&format!("rate_limits.{k}"), "unknown_value", "unknown category"));
                }
                if !v.as_u64().is_some_and(|n| (1..=1_000_000).contains(&n)) {
                    return Err(ApiError::validation(
                        &format!("rate_limits.{k}"),
                        "out_of_range",
                        "must be 1 to 1000000",
                    ));
                }
            }
            Ok(Some(m.clone()))
        }
        Some(_) => Err(ApiError::invalid_request("rate_limits must be an object")),
    }
}

pub async fn create_tenant(st: &SecretsState, ctx: &mut Ctx) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyOps).await?;
    let body = body_object(ctx)?;
    let id = req_str(&body, "tenant_id")?.to_owned();
    let tenant = TenantId::parse(&id)
        .map_err(|_| ApiError::validation("tenant_id", "invalid", "must be 1-64 of a-z 0-9 - _"))?;
    let name = opt_str(&body, "name")?.unwrap_or(&id).to_owned();
    let retention = opt_str(&body, "retention")?.unwrap_or("30d").to_owned();
    check_retention(&retention)?;
    let quotas = parse_quotas(&body)?.unwrap_or_default();
    let rate_limits = parse_rate_limits(&body)?.unwrap_or_default();
    auth.require_partner_admin()?;
    let record = TenantDoc { tenant_id: id.clone(), name, retention, quotas, rate_limits, created_at: now_rfc3339() };
    let admin = Caller { tenant: tenant.clone(), ..auth.caller.clone() };
    let doc = Document::new(KIND_TENANT, &id, tenant.clone(), to_value(&record));
    match st.dispatcher.put_document(&admin, doc, Precondition::Absent).await {
        Ok(_) => {}
        Err(e) if e.kind() == kmsgate_core::ErrorKind::AlreadyExists => return Err(name_conflict("the tenant")),
        Err(e) => return Err(e.into()),
    }
    st.dispatcher.ensure_tenant(&tenant).await?;
    Ok(created(tenant_json(&record)))
}

fn check_retention(r: &str) -> ApiResult<()> {
    let d = parse_duration("retention", r)?;
    if d.is_zero() || d > kmsgate_core::secret::MAX_RETENTION {
        return Err(ApiError::validation("retention", "out_of_range", "must be 1s to 365d"));
    }
    Ok(())
}

pub async fn list_tenants(st: &SecretsState, ctx: &mut Ctx) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyOps).await?;
    crate::service::limit(ctx)?;
    let filters = ["tenants"];
    st.read_cursor(ctx, &auth.tenant, &filters).await?;
    auth.require_partner_admin()?;
    let (docs, cursor) = list_docs_page(st, ctx, KIND_TENANT, None, &auth.tenant, &filters).await?;
    let items = docs.iter().map(|d| parse_body::<TenantDoc>(d).map(|t| tenant_json(&t))).collect::<ApiResult<_>>()?;
    Ok(list_reply("tenants", items, cursor))
}

async fn tenant_record(st: &SecretsState, id: &str) -> ApiResult<(Document, TenantDoc)> {
    let doc = st.dispatcher.store().get_document(KIND_TENANT, id).await?.ok_or_else(tenant_not_found)?;
    let t = parse_body(&doc)?;
    Ok((doc, t))
}

pub async fn get_tenant(st: &SecretsState, ctx: &mut Ctx, id: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyOps).await?;
    auth.require_partner_admin()?;
    let (doc, t) = tenant_record(st, id).await?;
    Ok(with_etag(ok(tenant_json(&t)), &etag(doc.revision)))
}

pub async fn patch_tenant(st: &SecretsState, ctx: &mut Ctx, id: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyOps).await?;
    let body = body_object(ctx)?;
    let name = opt_str(&body, "name")?.map(str::to_owned);
    let retention = opt_str(&body, "retention")?.map(str::to_owned);
    if let Some(r) = &retention {
        check_retention(r)?;
    }
    let quotas = parse_quotas(&body)?;
    let rate_limits = parse_rate_limits(&body)?;
    let expected = if_match_number(ctx)?;
    auth.require_partner_admin()?;
    let (doc, mut t) = tenant_record(st, id).await?;
    if let Some(e) = expected.filter(|e| *e != doc.revision) {
        return Err(ApiError::new(ErrorCode::VersionConflict, "the tenant changed since it was read")
            .detail("expected", e)
            .detail("current", doc.revision));
    }
    if let Some(n) = name {
        t.name = n;
    }
    if let Some(r) = retention {
        t.retention = r;
    }
    if let Some(q) = quotas {
        t.quotas = q;
    }
    if let Some(r) = rate_limits {
        t.rate_limits = r;
    }
    let mut d = doc.clone();
    d.body = to_value(&t);
    let stored = put_doc(st, &auth.caller, d, Precondition::Revision(doc.revision)).await?;
    Ok(with_etag(ok(tenant_json(&t)), &etag(stored.revision)))
}

pub async fn delete_tenant(st: &SecretsState, ctx: &mut Ctx, id: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyOps).await?;
    auth.require_partner_admin()?;
    let (doc, _) = tenant_record(st, id).await?;
    if doc.tenant.as_str() == auth.claims.tenant {
        return Err(ApiError::validation("tenant_id", "in_use", "a partner admin cannot delete their own tenant"));
    }
    // The settings go; the tenant's secrets and keys stay in the store (recreating the tenant brings them
    // back). Requests naming it get `tenant_not_found` meanwhile.
    st.dispatcher.delete_document(&auth.caller, KIND_TENANT, id).await?;
    Ok(no_content())
}

// ---- policies ----------------------------------------------------------------------------------------

fn parse_rules(v: &Value) -> ApiResult<Vec<Rule>> {
    let rules: Vec<Rule> = serde_json::from_value(v.clone()).map_err(|e| {
        ApiError::new(ErrorCode::InvalidPolicy, format!("invalid rules: {}", truncate(&e.to_string(), 200)))
    })?;
    validate_rules(&rules)?;
    Ok(rules)
}

async fn policy_record(st: &SecretsState, auth: &Auth, id: &str) -> ApiResult<(Document, PolicyDoc)> {
    let doc = st.dispatcher.store().get_document(KIND_POLICY, id).await?.ok_or_else(policy_not_found)?;
    if doc.tenant != auth.tenant {
        return Err(policy_not_found());
    }
    let p = parse_body(&doc)?;
    Ok((doc, p))
}

async fn bindings_of(st: &SecretsState, tenant: &TenantId, policy: &str) -> ApiResult<Vec<BindingDoc>> {
    // Fresh from the store: admin reads and `policy_in_use` must not trust a cache.
    let mut out = Vec::new();
    for d in st.all_documents(KIND_BINDING, tenant).await? {
        let b: BindingDoc = parse_body(&d)?;
        if b.policy_id == policy {
            out.push(b);
        }
    }
    Ok(out)
}

async fn policy_json(st: &SecretsState, p: &PolicyDoc, full: bool) -> ApiResult<Value> {
    let binding_count = bindings_of(st, &TenantId::parse(&p.tenant)?, &p.id).await?.len();
    Ok(if full {
        let mut v = to_value(p);
        v["rule_count"] = Value::from(p.rules.len());
        v["binding_count"] = Value::from(binding_count);
        v
    } else {
        json!({"id": p.id, "name": p.name, "description": p.description, "rule_count": p.rules.len(),
               "binding_count": binding_count, "is_active": p.is_active})
    })
}

pub async fn create_policy(st: &SecretsState, ctx: &mut Ctx) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyOps).await?;
    let body = body_object(ctx)?;
    let name = req_str(&body, "name")?.to_owned();
    check_name("name", &name, 128)?;
    let rules = parse_rules(body.get("rules").unwrap_or(&Value::Null))?;
    let description = opt_str(&body, "description")?.unwrap_or_default().to_owned();
    let scope = opt_str(&body, "scope")?.unwrap_or_default().to_owned();
    let is_active = opt_bool(&body, "is_active")?.unwrap_or(true);
    auth.require_admin("policies:write")?;
    if let Some(limit) = auth.tenant_doc.quotas.policies {
        let current = st.all_documents(KIND_POLICY, &auth.tenant).await?.len() as u64;
        if current >= limit {
            return Err(ApiError::new(ErrorCode::QuotaExceeded, "the tenant's policy quota is exhausted")
                .detail("quota", "policies")
                .detail("limit", limit)
                .detail("current", current));
        }
    }
    let id = new_id("pol");
    reserve_name(st, &auth, &name, &id).await?;
    let now = now_rfc3339();
    let p = PolicyDoc {
        id: id.clone(),
        tenant: auth.tenant.to_string(),
        name,
        description,
        scope,
        rules,
        is_active,
        created_at: now.clone(),
        updated_at: now,
    };
    let stored = put_doc(
        st,
        &auth.caller,
        Document::new(KIND_POLICY, &id, auth.tenant.clone(), to_value(&p)),
        Precondition::Absent,
    )
    .await?;
    Ok(with_etag(created(policy_json(st, &p, true).await?), &etag(stored.revision)))
}

/// Policy names are unique per tenant: a name record claimed with an insert-only write decides races.
async fn reserve_name(st: &SecretsState, auth: &Auth, name: &str, id: &str) -> ApiResult<()> {
    let key = format!("{}/{}", auth.tenant, name);
    let doc = Document::new(KIND_POLICY_NAME, &key, auth.tenant.clone(), json!({"policy_id": id}));
    match st.dispatcher.put_document(&auth.caller, doc, Precondition::Absent).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == kmsgate_core::ErrorKind::AlreadyExists => {
            Err(name_conflict("a policy with this name").detail("name", name.to_owned()))
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn list_policies(st: &SecretsState, ctx: &mut Ctx) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyOps).await?;
    crate::service::limit(ctx)?;
    let filters = ["policies"];
    st.read_cursor(ctx, &auth.tenant, &filters).await?;
    auth.require_admin("policies:read")?;
    let (docs, cursor) = list_docs_page(st, ctx, KIND_POLICY, Some(&auth.tenant), &auth.tenant, &filters).await?;
    let mut items = Vec::with_capacity(docs.len());
    for d in &docs {
        items.push(policy_json(st, &parse_body(d)?, false).await?);
    }
    Ok(list_reply("policies", items, cursor))
}

pub async fn get_policy(st: &SecretsState, ctx: &mut Ctx, id: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyOps).await?;
    auth.require_admin("policies:read")?;
    let (doc, p) = policy_record(st, &auth, id).await?;
    Ok(with_etag(ok(policy_json(st, &p, true).await?), &etag(doc.revision)))
}

pub async fn update_policy(st: &SecretsState, ctx: &mut Ctx, id: &str, replace: bool) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyOps).await?;
    let body = body_object(ctx)?;
    let name =
        if replace { Some(req_str(&body, "name")?.to_owned()) } else { opt_str(&body, "name")?.map(str::to_owned) };
    if let Some(n) = &name {
        check_name("name", n, 128)?;
    }
    let rules = match body.get("rules") {
        Some(v) if !v.is_null() => Some(parse_rules(v)?),
        _ if replace => Some(parse_rules(&Value::Null)?),
        _ => None,
    };
    let description = opt_str(&body, "description")?.map(str::to_owned);
    let scope = opt_str(&body, "scope")?.map(str::to_owned);
    let is_active = opt_bool(&body, "is_active")?;
    let expected = if_match_number(ctx)?;
    auth.require_admin("policies:write")?;
    let (doc, mut p) = policy_record(st, &auth, id).await?;
    if let Some(e) = expected.filter(|e| *e != doc.revision) {
        return Err(ApiError::new(ErrorCode::VersionConflict, "the policy changed since it was read")
            .detail("expected", e)
            .detail("current", doc.revision));
    }
    if let Some(n) = name.filter(|n| *n != p.name) {
        reserve_name(st, &auth, &n, &p.id).await?;
        let old = format!("{}/{}", auth.tenant, p.name);
        st.dispatcher.delete_document(&auth.caller, KIND_POLICY_NAME, &old).await?;
        p.name = n;
    }
    if let Some(r) = rules {
        p.rules = r;
    }
    if replace {
        p.description = description.unwrap_or_default();
        p.scope = scope.unwrap_or_default();
        p.is_active = is_active.unwrap_or(true);
    } else {
        if let Some(d) = description {
            p.description = d;
        }
        if let Some(s) = scope {
            p.scope = s;
        }
        if let Some(a) = is_active {
            p.is_active = a;
        }
    }
    p.updated_at = now_rfc3339();
    let mut d = doc.clone();
    d.body = to_value(&p);
    let stored = put_doc(st, &auth.caller, d, Precondition::Revision(doc.revision)).await?;
    Ok(with_etag(ok(policy_json(st, &p, true).await?), &etag(stored.revision)))
}

pub async fn delete_policy(st: &SecretsState, ctx: &mut Ctx, id: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyOps).await?;
    let force = match ctx.query("force") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(ApiError::validation("force", "invalid", "must be true or false")),
    };
    auth.require_admin("policies:write")?;
    let (_, p) = policy_record(st, &auth, id).await?;
    let bindings = bindings_of(st, &auth.tenant, id).await?;
    if !bindings.is_empty() && !force {
        return Err(ApiError::new(ErrorCode::PolicyInUse, "the policy has bindings; delete them or use ?force=true")
            .detail("binding_count", bindings.len()));
    }
    for b in &bindings {
        delete_binding_records(st, &auth, b).await?;
    }
    st.dispatcher.delete_document(&auth.caller, KIND_POLICY, id).await?;
    st.dispatcher.delete_document(&auth.caller, KIND_POLICY_NAME, &format!("{}/{}", auth.tenant, p.name)).await?;
    Ok(no_content())
}

// ---- bindings ----------------------------------------------------------------------------------------

fn binding_json(b: &BindingDoc) -> Value {
    to_value(b)
}

pub async fn create_binding(st: &SecretsState, ctx: &mut Ctx, policy: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyOps).await?;
    let body = body_object(ctx)?;
    let typ = req_str(&body, "identity_type")?.to_owned();
    check_identity_type("identity_type", &typ, true)?;
    let id = req_str(&body, "identity_id")?.to_owned();
    let expires_at = match opt_str(&body, "expires_at")? {
        Some(t) => Some(parse_time("expires_at", t)?.to_rfc3339()),
        None => None,
    };
    auth.require_admin("policies:write")?;
    policy_record(st, &auth, policy).await?;
    // Groups are names, not registered identities; users and service accounts must exist.
    if typ != "group"
        && st
            .dispatcher
            .store()
            .get_document(KIND_IDENTITY, &IdentityDoc::doc_id(auth.tenant.as_str(), &typ, &id))
            .await?
            .is_none()
    {
        return Err(identity_not_found());
    }
    let bid = new_id("bnd");
    let key = format!("{policy}/{typ}/{id}");
    let claim = Document::new(KIND_BINDING_KEY, &key, auth.tenant.clone(), json!({"binding_id": bid}));
    match st.dispatcher.put_document(&auth.caller, claim, Precondition::Absent).await {
        Ok(_) => {}
        Err(e) if e.kind() == kmsgate_core::ErrorKind::AlreadyExists => {
            return Err(ApiError::new(ErrorCode::BindingConflict, "the identity is already bound to this policy"));
        }
        Err(e) => return Err(e.into()),
    }
    let b = BindingDoc {
        id: bid.clone(),
        tenant: auth.tenant.to_string(),
        policy_id: policy.to_owned(),
        identity_type: typ,
        identity_id: id,
        expires_at,
        created_at: now_rfc3339(),
    };
    put_doc(
        st,
        &auth.caller,
        Document::new(KIND_BINDING, &bid, auth.tenant.clone(), to_value(&b)),
        Precondition::Absent,
    )
    .await?;
    st.invalidate_bindings(&auth.tenant).await;
    Ok(created(binding_json(&b)))
}

pub async fn list_bindings(st: &SecretsState, ctx: &mut Ctx, policy: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyOps).await?;
    auth.require_admin("policies:read")?;
    policy_record(st, &auth, policy).await?;
    let items = bindings_of(st, &auth.tenant, policy).await?.iter().map(binding_json).collect();
    Ok(list_reply("bindings", items, None))
}

async fn delete_binding_records(st: &SecretsState, auth: &Auth, b: &BindingDoc) -> ApiResult<()> {
    st.dispatcher.delete_document(&auth.caller, KIND_BINDING, &b.id).await?;
    let key = format!("{}/{}/{}", b.policy_id, b.identity_type, b.identity_id);
    st.dispatcher.delete_document(&auth.caller, KIND_BINDING_KEY, &key).await?;
    st.invalidate_bindings(&auth.tenant).await;
    Ok(())
}

pub async fn delete_binding(st: &SecretsState, ctx: &mut Ctx, policy: &str, bid: &str) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyOps).await?;
    auth.require_admin("policies:write")?;
    policy_record(st, &auth, policy).await?;
    let not_found = || ApiError::new(ErrorCode::BindingNotFound, "no such binding");
    let doc = st.dispatcher.store().get_document(KIND_BINDING, bid).await?.ok_or_else(not_found)?;
    let b: BindingDoc = parse_body(&doc)?;
    if b.policy_id != policy || doc.tenant != auth.tenant {
        return Err(not_found());
    }
    delete_binding_records(st, &auth, &b).await?;
    Ok(no_content())
}

// ---- policy test -------------------------------------------------------------------------------------

pub async fn test_policy(st: &SecretsState, ctx: &mut Ctx) -> ApiResult {
    let auth = st.authenticate(ctx, Category::PolicyTest).await?;
    let body = body_object(ctx)?;
    let typ = req_str(&body, "identity_type")?.to_owned();
    check_identity_type("identity_type", &typ, false)?;
    let id = req_str(&body, "identity_id")?.to_owned();
    let path = req_str(&body, "path")?.to_owned();
    kmsgate_core::SecretPath::parse(&path)
        .map_err(|e| ApiError::new(ErrorCode::InvalidPath, e.message().to_owned()))?;
    let permission = req_str(&body, "permission")?.to_owned();
    if !crate::model::PERMISSIONS.contains(&permission.as_str()) {
        return Err(ApiError::validation("permission", "unknown_value", "unknown permission"));
    }
    let context = match body.get("context") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(ApiError::invalid_request("context must be an object")),
    };
    let ip = match opt_str(&context, "ip")? {
        Some(s) => Some(s.parse().map_err(|_| ApiError::validation("context.ip", "invalid", "not an IP address"))?),
        None => None,
    };
    let mfa = match opt_str(&context, "mfa_verified_at")? {
        Some(t) => Some(parse_time("context.mfa_verified_at", t)?.0 / 1000),
        None => None,
    };
    let at = match opt_str(&context, "at")? {
        Some(t) => parse_time("context.at", t)?.0 / 1000,
        None => kmsgate_core::Timestamp::now().0 / 1000,
    };
    auth.require_admin("policies:read")?;
    let doc = st
        .dispatcher
        .store()
        .get_document(KIND_IDENTITY, &IdentityDoc::doc_id(auth.tenant.as_str(), &typ, &id))
        .await?
        .ok_or_else(identity_not_found)?;
    let identity: IdentityDoc = parse_body(&doc)?;
    if identity.has_role(crate::model::ROLE_ADMIN) || identity.has_role(crate::model::ROLE_PARTNER_ADMIN) {
        return Ok(ok(json!({"allowed": true, "code": Value::Null, "matched_policy": Value::Null,
                            "matched_rule": Value::Null, "reason": "admin role"})));
    }
    let policies = st.bound_policies(&auth.tenant, &typ, &id, &identity.groups).await?;
    let refs: Vec<&PolicyDoc> = policies.iter().collect();
    let d = evaluate(&refs, &path, &permission, &RequestContext { ip, mfa_verified_at: mfa, at });
    Ok(ok(json!({
        "allowed": d.allowed,
        "code": d.code.map(|c| c.as_str()),
        "condition": d.condition,
        "matched_policy": d.matched_policy,
        "matched_rule": d.matched_rule,
    })))
}

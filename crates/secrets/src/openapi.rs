//! The OpenAPI 3.1 document of `/v1`, generated from the route table below, which lists exactly the routes
//! `routes::dispatch` serves (a unit test walks the table against the dispatcher's behaviour).

use serde_json::{Map, Value, json};

use crate::code::ErrorCode;

/// One operation: method, path template, operation id, summary, request body schema, success status and
/// response schema, the error codes it documents beyond the common ones, whether it needs a token.
#[derive(Debug)]
pub struct Op {
    pub method: &'static str,
    pub path: &'static str,
    pub id: &'static str,
    pub summary: &'static str,
    pub body: Option<fn() -> Value>,
    pub status: u16,
    pub response: fn() -> Value,
    pub query: &'static [(&'static str, &'static str)],
    pub auth: bool,
}

fn obj(props: Value, required: &[&str]) -> Value {
    json!({"type": "object", "properties": props, "required": required})
}

fn any_obj() -> Value {
    json!({"type": "object"})
}

fn str_list() -> Value {
    json!({"type": "array", "items": {"type": "string"}})
}

fn nullable_str() -> Value {
    json!({"type": ["string", "null"]})
}

fn list_of(key: &str) -> Value {
    obj(
        json!({ key: {"type": "array", "items": any_obj()}, "cursor": nullable_str(), "has_more": {"type": "boolean"} }),
        &[key, "cursor", "has_more"],
    )
}

fn health() -> Value {
    obj(json!({"status": {"type": "string"}, "version": {"type": "string"}}), &["status", "version"])
}
fn whoami() -> Value {
    obj(
        json!({"identity_id": {"type": "string"}, "identity_type": {"type": "string"}, "tenant_id": {"type": "string"},
               "partner_id": {"type": "string"}, "scopes": str_list(), "groups": str_list(), "roles": str_list(),
               "mfa_verified_at": nullable_str(), "token_expires_at": {"type": "string"}}),
        &["identity_id", "identity_type", "tenant_id", "scopes", "token_expires_at"],
    )
}
fn introspect_req() -> Value {
    obj(json!({"token": {"type": "string"}}), &["token"])
}
fn introspect() -> Value {
    obj(json!({"active": {"type": "boolean"}}), &["active"])
}
fn token_req() -> Value {
    obj(
        json!({"name": {"type": "string"}, "identity_id": {"type": "string"},
               "identity_type": {"enum": ["user", "service_account"]}, "scopes": str_list(),
               "ttl": {"type": "string", "pattern": "^[0-9]+(s|m|h|d|w)$"}, "mfa": {"type": "boolean"}}),
        &["name", "scopes"],
    )
}
fn token() -> Value {
    obj(
        json!({"token_id": {"type": "string"}, "name": {"type": "string"}, "scopes": str_list(),
               "expires_at": {"type": "string"}, "revoked": {"type": "boolean"}}),
        &["token_id", "scopes", "expires_at"],
    )
}
fn identity_req() -> Value {
    obj(
        json!({"identity_type": {"enum": ["user", "service_account", "group"]}, "identity_id": {"type": "string"},
               "display_name": {"type": "string"}, "groups": str_list(), "roles": str_list()}),
        &["identity_type", "identity_id"],
    )
}
fn identity() -> Value {
    obj(
        json!({"identity_type": {"type": "string"}, "identity_id": {"type": "string"}}),
        &["identity_type", "identity_id"],
    )
}
fn tenant_req() -> Value {
    obj(
        json!({"tenant_id": {"type": "string"}, "name": {"type": "string"}, "retention": {"type": "string"},
               "quotas": any_obj(), "rate_limits": any_obj()}),
        &["tenant_id"],
    )
}
fn tenant_patch() -> Value {
    obj(
        json!({"name": {"type": "string"}, "retention": {"type": "string"}, "quotas": any_obj(), "rate_limits": any_obj()}),
        &[],
    )
}
fn tenant() -> Value {
    obj(
        json!({"tenant_id": {"type": "string"}, "name": {"type": "string"}, "retention": {"type": "string"}}),
        &["tenant_id"],
    )
}
fn secret_put() -> Value {
    obj(
        json!({"data": any_obj(), "secret_type": {"enum": ["kv", "json", "certificate", "ssh_key", "api_key"]},
               "metadata": obj(json!({"description": {"type": "string"}, "tags": str_list(), "owner": {"type": "string"},
                                      "custom": any_obj()}), &[]),
               "options": obj(json!({"max_versions": {"type": "integer", "minimum": 1, "maximum": 100},
                                     "expires_in": {"type": "string"}, "expires_at": {"type": "string"},
                                     "cas": {"type": "integer", "minimum": 0}}), &[])}),
        &["data"],
    )
}
fn secret_written() -> Value {
    obj(
        json!({"path": {"type": "string"}, "version": {"type": "integer"}, "created_at": {"type": "string"},
               "expires_at": nullable_str()}),
        &["path", "version", "created_at"],
    )
}
fn secret() -> Value {
    obj(
        json!({"path": {"type": "string"}, "version": {"type": "integer"}, "data": any_obj(), "secret_type": {"type": "string"},
               "metadata": any_obj(), "expires_at": nullable_str()}),
        &["path", "version", "data"],
    )
}
fn secret_meta() -> Value {
    obj(
        json!({"path": {"type": "string"}, "secret_type": {"type": "string"}, "current_version": {"type": "integer"},
               "versions": {"type": "array"}, "expired": {"type": "boolean"}, "deleted": {"type": "boolean"}}),
        &["path", "current_version", "versions"],
    )
}
fn meta_patch() -> Value {
    obj(
        json!({"metadata": any_obj(), "expires_at": nullable_str(), "expires_in": {"type": "string"},
               "max_versions": {"type": "integer"}, "secret_type": {"type": "string"}}),
        &[],
    )
}
fn batch_req() -> Value {
    obj(json!({"paths": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 100}}), &["paths"])
}
fn batch() -> Value {
    obj(json!({"secrets": any_obj(), "errors": any_obj()}), &["secrets", "errors"])
}
fn deleted() -> Value {
    obj(
        json!({"path": {"type": "string"}, "deleted_at": {"type": "string"}, "recoverable_until": {"type": "string"}}),
        &["path"],
    )
}
fn rollback_req() -> Value {
    obj(json!({"version": {"type": "integer", "minimum": 1}, "cas": {"type": "integer"}}), &["version"])
}
fn policy_req() -> Value {
    obj(
        json!({"name": {"type": "string"}, "description": {"type": "string"}, "scope": {"type": "string"},
               "is_active": {"type": "boolean"},
               "rules": {"type": "array", "items": obj(json!({"path_pattern": {"type": "string"},
                   "permissions": {"type": "array", "items": {"enum": ["read", "write", "delete", "list", "rotate", "admin"]}},
                   "conditions": any_obj()}), &["path_pattern", "permissions"])}}),
        &["name", "rules"],
    )
}
fn policy_patch() -> Value {
    obj(
        json!({"name": {"type": "string"}, "description": {"type": "string"}, "rules": {"type": "array"}, "is_active": {"type": "boolean"}}),
        &[],
    )
}
fn policy() -> Value {
    obj(
        json!({"id": {"type": "string"}, "name": {"type": "string"}, "rule_count": {"type": "integer"}}),
        &["id", "name"],
    )
}
fn binding_req() -> Value {
    obj(
        json!({"identity_type": {"enum": ["user", "service_account", "group"]}, "identity_id": {"type": "string"},
               "expires_at": {"type": "string"}}),
        &["identity_type", "identity_id"],
    )
}
fn binding() -> Value {
    obj(json!({"id": {"type": "string"}, "policy_id": {"type": "string"}}), &["id", "policy_id"])
}
fn test_req() -> Value {
    obj(
        json!({"identity_type": {"enum": ["user", "service_account"]}, "identity_id": {"type": "string"},
               "path": {"type": "string"}, "permission": {"type": "string"},
               "context": obj(json!({"ip": {"type": "string"}, "mfa_verified_at": {"type": "string"}, "at": {"type": "string"}}), &[])}),
        &["identity_type", "identity_id", "path", "permission"],
    )
}
fn test_resp() -> Value {
    obj(json!({"allowed": {"type": "boolean"}, "code": nullable_str()}), &["allowed"])
}
fn empty() -> Value {
    Value::Null
}
fn tokens() -> Value {
    list_of("tokens")
}
fn identities() -> Value {
    list_of("identities")
}
fn tenants() -> Value {
    list_of("tenants")
}
fn secrets_list() -> Value {
    list_of("secrets")
}
fn versions() -> Value {
    list_of("versions")
}
fn policies() -> Value {
    list_of("policies")
}
fn bindings() -> Value {
    list_of("bindings")
}
fn openapi_doc() -> Value {
    any_obj()
}

const PAGE: &[(&str, &str)] = &[("limit", "integer"), ("cursor", "string")];

macro_rules! op {
    ($m:literal, $p:literal, $id:literal, $s:literal, $body:expr, $st:literal, $resp:expr, $q:expr, $auth:expr) => {
        Op {
            method: $m,
            path: $p,
            id: $id,
            summary: $s,
            body: $body,
            status: $st,
            response: $resp,
            query: $q,
            auth: $auth,
        }
    };
}

/// Every phase-1 route.
pub static OPS: &[Op] = &[
    op!("get", "/v1/health", "health", "Liveness", None, 200, health, &[], false),
    op!("get", "/v1/health/ready", "ready", "Readiness: probes the store and the KMS", None, 200, health, &[], false),
    op!("get", "/v1/openapi.json", "openapi", "This document", None, 200, openapi_doc, &[], false),
    op!("get", "/v1/auth/whoami", "whoami", "The caller", None, 200, whoami, &[], true),
    op!(
        "post",
        "/v1/auth/introspect",
        "introspect",
        "Inspect a token (admin)",
        Some(introspect_req),
        200,
        introspect,
        &[],
        true
    ),
    op!("post", "/v1/auth/tokens", "mintToken", "Mint a token (shown once)", Some(token_req), 201, token, &[], true),
    op!("get", "/v1/auth/tokens", "listTokens", "List tokens", None, 200, tokens, PAGE, true),
    op!("get", "/v1/auth/tokens/{token_id}", "getToken", "Token metadata", None, 200, token, &[], true),
    op!("delete", "/v1/auth/tokens/{token_id}", "revokeToken", "Revoke a token", None, 204, empty, &[], true),
    op!(
        "post",
        "/v1/identities",
        "createIdentity",
        "Register an identity",
        Some(identity_req),
        201,
        identity,
        &[],
        true
    ),
    op!("get", "/v1/identities", "listIdentities", "List identities", None, 200, identities, PAGE, true),
    op!(
        "get",
        "/v1/identities/{identity_type}/{identity_id}",
        "getIdentity",
        "One identity",
        None,
        200,
        identity,
        &[],
        true
    ),
    op!(
        "delete",
        "/v1/identities/{identity_type}/{identity_id}",
        "deleteIdentity",
        "Delete an identity",
        None,
        204,
        empty,
        &[],
        true
    ),
    op!(
        "post",
        "/v1/tenants",
        "createTenant",
        "Create a tenant (partner admin)",
        Some(tenant_req),
        201,
        tenant,
        &[],
        true
    ),
    op!("get", "/v1/tenants", "listTenants", "List tenants", None, 200, tenants, PAGE, true),
    op!("get", "/v1/tenants/{tenant_id}", "getTenant", "One tenant", None, 200, tenant, &[], true),
    op!(
        "patch",
        "/v1/tenants/{tenant_id}",
        "patchTenant",
        "Change a tenant",
        Some(tenant_patch),
        200,
        tenant,
        &[],
        true
    ),
    op!("delete", "/v1/tenants/{tenant_id}", "deleteTenant", "Delete a tenant's settings", None, 204, empty, &[], true),
    op!(
        "get",
        "/v1/secrets",
        "listSecrets",
        "List secrets (metadata only)",
        None,
        200,
        secrets_list,
        &[
            ("prefix", "string"),
            ("secret_type", "string"),
            ("tag", "string"),
            ("include_deleted", "string"),
            ("expiring_within", "string"),
            ("limit", "integer"),
            ("cursor", "string")
        ],
        true
    ),
    op!(
        "post",
        "/v1/secrets:batch-read",
        "batchRead",
        "Read up to 100 secrets",
        Some(batch_req),
        200,
        batch,
        &[],
        true
    ),
    op!(
        "put",
        "/v1/secrets/{path}",
        "putSecret",
        "Write a new version",
        Some(secret_put),
        201,
        secret_written,
        &[],
        true
    ),
    op!("get", "/v1/secrets/{path}", "getSecret", "Read a version", None, 200, secret, &[("version", "integer")], true),
    op!(
        "delete",
        "/v1/secrets/{path}",
        "deleteSecret",
        "Soft or permanent delete",
        None,
        200,
        deleted,
        &[("permanent", "boolean")],
        true
    ),
    op!(
        "get",
        "/v1/secrets/{path}:metadata",
        "getSecretMetadata",
        "Metadata and version summary",
        None,
        200,
        secret_meta,
        &[],
        true
    ),
    op!(
        "patch",
        "/v1/secrets/{path}:metadata",
        "patchSecretMetadata",
        "Change metadata, expiry, max_versions",
        Some(meta_patch),
        200,
        secret_meta,
        &[],
        true
    ),
    op!(
        "get",
        "/v1/secrets/{path}:versions",
        "listSecretVersions",
        "Versions, newest first",
        None,
        200,
        versions,
        PAGE,
        true
    ),
    op!("post", "/v1/secrets/{path}:restore", "restoreSecret", "Undo a soft delete", None, 200, secret_meta, &[], true),
    op!(
        "post",
        "/v1/secrets/{path}:rollback",
        "rollbackSecret",
        "New version with an old version's data",
        Some(rollback_req),
        200,
        secret_written,
        &[],
        true
    ),
    op!("post", "/v1/policies", "createPolicy", "Create a policy", Some(policy_req), 201, policy, &[], true),
    op!("get", "/v1/policies", "listPolicies", "List policies", None, 200, policies, PAGE, true),
    op!(
        "post",
        "/v1/policies:test",
        "testPolicy",
        "Evaluate policies for an identity",
        Some(test_req),
        200,
        test_resp,
        &[],
        true
    ),
    op!("get", "/v1/policies/{policy_id}", "getPolicy", "One policy", None, 200, policy, &[], true),
    op!(
        "put",
        "/v1/policies/{policy_id}",
        "replacePolicy",
        "Replace a policy",
        Some(policy_req),
        200,
        policy,
        &[],
        true
    ),
    op!(
        "patch",
        "/v1/policies/{policy_id}",
        "patchPolicy",
        "Change a policy",
        Some(policy_patch),
        200,
        policy,
        &[],
        true
    ),
    op!(
        "delete",
        "/v1/policies/{policy_id}",
        "deletePolicy",
        "Delete a policy",
        None,
        204,
        empty,
        &[("force", "boolean")],
        true
    ),
    op!(
        "post",
        "/v1/policies/{policy_id}/bindings",
        "createBinding",
        "Bind a policy",
        Some(binding_req),
        201,
        binding,
        &[],
        true
    ),
    op!(
        "get",
        "/v1/policies/{policy_id}/bindings",
        "listBindings",
        "A policy's bindings",
        None,
        200,
        bindings,
        &[],
        true
    ),
    op!(
        "delete",
        "/v1/policies/{policy_id}/bindings/{binding_id}",
        "deleteBinding",
        "Remove a binding",
        None,
        204,
        empty,
        &[],
        true
    ),
];

fn error_schema() -> Value {
    let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    json!({
        "type": "object",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["code", "message", "request_id"],
            "properties": {
                "code": {"type": "string", "enum": codes},
                "message": {"type": "string"},
                "details": {"type": "object"},
                "request_id": {"type": "string"}
            }
        }}
    })
}

/// The document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for op in OPS {
        let mut params = Vec::new();
        for seg in op.path.split('/') {
            let name = seg.split(':').next().unwrap_or(seg);
            if let Some(n) = name.strip_prefix('{').and_then(|n| n.strip_suffix('}')) {
                params.push(json!({"name": n, "in": "path", "required": true, "schema": {"type": "string"}}));
            }
        }
        for (q, t) in op.query {
            params.push(json!({"name": q, "in": "query", "required": false, "schema": {"type": t}}));
        }
        let mut responses = Map::new();
        let resp = (op.response)();
        let success = if resp.is_null() {
            json!({"description": "done"})
        } else {
            json!({"description": "success", "content": {"application/json": {"schema": resp}}})
        };
        responses.insert(op.status.to_string(), success);
        if op.path.starts_with("/v1/secrets/{path}") && op.method == "put" {
            responses.insert(
                "200".into(),
                json!({"description": "updated", "content": {"application/json": {"schema": secret_written()}}}),
            );
        }
        if op.id == "deleteSecret" {
            responses.insert("204".into(), json!({"description": "permanently deleted"}));
        }
        responses.insert(
            "default".into(),
            json!({"description": "error envelope", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
        );
        let mut o = json!({
            "operationId": op.id,
            "summary": op.summary,
            "parameters": params,
            "responses": responses,
        });
        if !op.auth {
            o["security"] = json!([]);
        }
        if let Some(b) = op.body {
            o["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": b()}}});
        }
        let entry = paths.entry(op.path.to_owned()).or_insert_with(|| json!({}));
        entry[op.method] = o;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "kmsgate secrets API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Versioned secrets, tokens, policies and tenants with ScaiVault's error vocabulary. See docs/secrets-api.md."
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": error_schema()}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_lists_every_route_once() {
        let d = document();
        assert_eq!(d["openapi"], "3.1.0");
        let mut seen = std::collections::HashSet::new();
        for op in OPS {
            assert!(seen.insert((op.method, op.path)), "{} {} twice", op.method, op.path);
            assert!(d["paths"][op.path][op.method].is_object());
        }
        assert!(
            d["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c == "secret_expired")
        );
    }
}

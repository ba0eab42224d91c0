//! The request-metrics labels of `/v1` requests: an operation name from the fixed route table below (never a
//! path, id or tenant the caller sent) and the vocabulary's error code.

use axum::http::Method;

/// The operation label of `method` on `uri_path` (the whole path, `/v1/...`); `unknown` for anything the
/// router does not serve.
pub fn operation(method: &Method, uri_path: &str) -> &'static str {
    let Some(rest) = uri_path.strip_prefix("/v1") else { return "unknown" };
    let mut rest = rest.strip_prefix('/').unwrap_or(rest);
    if let Some(after_t) = rest.strip_prefix("t/") {
        rest = after_t.split_once('/').map_or("", |(_, tail)| tail);
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let m = method.as_str();
    match (segs.as_slice(), m) {
        (["health"], _) => "Health",
        (["health", "ready"], _) => "HealthReady",
        (["openapi.json"], _) => "OpenApi",
        (["auth", "whoami"], _) => "Whoami",
        (["auth", "introspect"], _) => "Introspect",
        (["auth", "tokens"], "POST") => "MintToken",
        (["auth", "tokens"], _) => "ListTokens",
        (["auth", "tokens", _], "DELETE") => "RevokeToken",
        (["auth", "tokens", _], _) => "GetToken",
        (["identities"], "POST") => "CreateIdentity",
        (["identities"], _) => "ListIdentities",
        (["identities", _, _], "DELETE") => "DeleteIdentity",
        (["identities", _, _], _) => "GetIdentity",
        (["tenants"], "POST") => "CreateTenant",
        (["tenants"], _) => "ListTenants",
        (["tenants", _], "PATCH") => "UpdateTenant",
        (["tenants", _], "DELETE") => "DeleteTenant",
        (["tenants", _], _) => "GetTenant",
        (["policies"], "POST") => "CreatePolicy",
        (["policies"], _) => "ListPolicies",
        (["policies:test"], _) => "TestPolicy",
        (["policies", _], "PUT" | "PATCH") => "UpdatePolicy",
        (["policies", _], "DELETE") => "DeletePolicy",
        (["policies", _], _) => "GetPolicy",
        (["policies", _, "bindings"], "POST") => "CreateBinding",
        (["policies", _, "bindings"], _) => "ListBindings",
        (["policies", _, "bindings", _], "DELETE") => "DeleteBinding",
        (["policies", _, "bindings", _], _) => "GetBinding",
        (["secrets"], _) => "ListSecrets",
        (["secrets:batch-read"], _) => "BatchReadSecrets",
        (["secrets", ..], _) => secret_operation(rest, m),
        ([first, ..], _) if crate::service::is_unshipped(first) => "Unshipped",
        _ => "unknown",
    }
}

/// `secrets/{path}[:verb]`: the verb after the last `:` of the decoded path, as the router reads it.
fn secret_operation(rest: &str, m: &str) -> &'static str {
    let raw = crate::service::percent_decode(rest.get("secrets/".len()..).unwrap_or(""));
    let verb = raw.rsplit_once(':').map(|(_, v)| v);
    match (verb, m) {
        (None, "GET") => "GetSecret",
        (None, "PUT") => "PutSecret",
        (None, "DELETE") => "DeleteSecret",
        (Some("metadata"), "PATCH") => "UpdateSecretMetadata",
        (Some("metadata"), _) => "GetSecretMetadata",
        (Some("versions"), _) => "ListSecretVersions",
        (Some("restore"), _) => "RestoreSecret",
        (Some("rollback"), _) => "RollbackSecret",
        (Some("rotate"), _) => "RotateSecret",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_have_fixed_labels() {
        let op = |m: Method, p: &str| operation(&m, p);
        assert_eq!(op(Method::GET, "/v1/secrets/app/db"), "GetSecret");
        assert_eq!(op(Method::PUT, "/v1/t/acme/secrets/app/db"), "PutSecret");
        assert_eq!(op(Method::GET, "/v1/secrets/app/db:versions"), "ListSecretVersions");
        assert_eq!(op(Method::POST, "/v1/secrets/app/db:rollback"), "RollbackSecret");
        assert_eq!(op(Method::GET, "/v1/secrets"), "ListSecrets");
        assert_eq!(op(Method::DELETE, "/v1/auth/tokens/tok_123"), "RevokeToken");
        assert_eq!(op(Method::POST, "/v1/policies/pol_1/bindings"), "CreateBinding");
        assert_eq!(op(Method::GET, "/v1/health"), "Health");
        assert_eq!(op(Method::GET, "/v1/webhooks"), "Unshipped");
        for p in ["/v1/nothing/here", "/v2/secrets", "/v1/secrets/a:bogus", "/v1/identities/x"] {
            assert_eq!(op(Method::GET, p), "unknown", "{p}");
        }
    }
}

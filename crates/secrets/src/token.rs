//! Token verification for other frontends (the gRPC API): the same `svt_` tokens, revocation, identities,
//! scopes and policies as `/v1`, behind a small API that speaks core errors, so a frontend can accept the
//! secrets API's bearer tokens without depending on this crate's HTTP routes (the server wires them together).

use std::net::IpAddr;
use std::sync::Arc;

use kmsgate_core::{Dispatcher, Error, ErrorKind, TenantId};

use crate::SecretsConfig;
use crate::error::ApiError;
use crate::model::{PolicyDoc, RequestContext};
use crate::service::{ApiResult, SecretsState};

/// Who a verified token acts as.
#[derive(Debug, Clone)]
pub struct TokenPrincipal {
    /// The token's own tenant (acting in another tenant is a `/v1/t/{tenant}` feature of the REST API only).
    pub tenant: TenantId,
    /// `TYPE:ID`, as the REST API names the caller in audit records.
    pub identity: String,
    pub scopes: Vec<String>,
    /// The token id (`jti`), for audit; never the token itself.
    pub token_id: String,
    /// The identity holds the admin (or partner admin) role.
    pub admin: bool,
    typ: String,
    sub: String,
    groups: Vec<String>,
    mfa_verified_at: Option<i64>,
}

impl TokenPrincipal {
    /// Whether the token's scopes grant `scope` (`admin` grants everything, `x:*` every `x:...`).
    pub fn has_scope(&self, scope: &str) -> bool {
        crate::service::scope_covers(&self.scopes, scope)
    }
}

/// Verifies tokens and evaluates policies against the installation's records. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TokenVerifier {
    state: Arc<SecretsState>,
}

impl TokenVerifier {
    /// A verifier over `dispatcher`'s store; `home` owns the signing key (the server's default tenant). It
    /// follows the change feed like the REST router, so revocations and binding changes made by any replica
    /// apply here within the feed's poll interval.
    pub fn new(dispatcher: Dispatcher, config: SecretsConfig, home: TenantId) -> Self {
        let state = Arc::new(SecretsState::new(dispatcher, config, home));
        crate::follow_changes(&state);
        TokenVerifier { state }
    }

    /// Signature, expiry, revocation (by `jti`), then the identity and its tenant: any failure is
    /// `AuthenticationFailed` with the REST API's reason in the message (never the token or key material).
    pub async fn verify(&self, token: &str) -> Result<TokenPrincipal, Error> {
        let st = &self.state;
        let claims = st.verify_token(token).await.map_err(core_error)?;
        let tenant = TenantId::parse(&claims.tenant)
            .map_err(|_| Error::new(ErrorKind::AuthenticationFailed, "the token is invalid"))?;
        let identity = st.identity_of(&claims).await.map_err(core_error)?.ok_or_else(|| {
            Error::new(ErrorKind::AuthenticationFailed, "the token has been revoked: its identity no longer exists")
        })?;
        if st.tenant_doc(&tenant).await.map_err(core_error)?.is_none() {
            return Err(Error::new(ErrorKind::AuthenticationFailed, "the token's tenant no longer exists"));
        }
        Ok(TokenPrincipal {
            tenant,
            identity: format!("{}:{}", claims.typ, claims.sub),
            admin: identity.has_role(crate::model::ROLE_ADMIN) || identity.has_role(crate::model::ROLE_PARTNER_ADMIN),
            scopes: claims.scopes,
            token_id: claims.jti,
            typ: claims.typ,
            sub: claims.sub,
            groups: identity.groups.clone(),
            mfa_verified_at: claims.mfa_verified_at,
        })
    }

    /// The REST API's check for a secret path: the scope `secrets:PERMISSION`, then (unless the identity is an
    /// admin) the policies bound to it or its groups. `AccessDenied` when refused.
    pub async fn authorize_secret(
        &self,
        p: &TokenPrincipal,
        permission: &str,
        path: &str,
        peer: Option<IpAddr>,
    ) -> Result<(), Error> {
        let scope = crate::routes::scope_for(permission);
        if !p.has_scope(&scope) {
            return Err(Error::new(ErrorKind::AccessDenied, format!("the token lacks the scope {scope}")));
        }
        if p.admin {
            return Ok(());
        }
        let policies = self.policies(p).await.map_err(core_error)?;
        let refs: Vec<&PolicyDoc> = policies.iter().collect();
        let ctx = RequestContext {
            ip: peer,
            mfa_verified_at: p.mfa_verified_at,
            at: kmsgate_core::Timestamp::now().0 / 1000,
        };
        crate::model::evaluate(&refs, path, permission, &ctx).into_result().map_err(core_error)
    }

    /// Key operations: the admin role and the `admin` scope, like the REST API's admin routes.
    pub fn authorize_admin(&self, p: &TokenPrincipal) -> Result<(), Error> {
        if !p.admin {
            return Err(Error::new(ErrorKind::AccessDenied, "key operations need an identity with the admin role"));
        }
        if !p.has_scope("admin") {
            return Err(Error::new(ErrorKind::AccessDenied, "key operations need a token with the admin scope"));
        }
        Ok(())
    }

    async fn policies(&self, p: &TokenPrincipal) -> ApiResult<Vec<PolicyDoc>> {
        self.state.bound_policies(&p.tenant, &p.typ, &p.sub, &p.groups).await
    }
}

/// The REST error as a core error of the same class: 401 codes → `AuthenticationFailed`, 403 →
/// `AccessDenied`, 429 → `Throttled`, 503 → `DependencyTimeout`, the rest → `Internal`. The REST message is
/// kept: it names a reason (`the token has expired`), never a secret.
fn core_error(e: ApiError) -> Error {
    let kind = match e.code.http_status().as_u16() {
        401 => ErrorKind::AuthenticationFailed,
        403 => ErrorKind::AccessDenied,
        429 => ErrorKind::Throttled,
        503 => ErrorKind::DependencyTimeout,
        _ => ErrorKind::Internal,
    };
    Error::new(kind, e.message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::code::ErrorCode;

    #[test]
    fn rest_errors_keep_their_class() {
        let k = |c: ErrorCode| core_error(ApiError::new(c, "m")).kind();
        for c in [ErrorCode::TokenInvalid, ErrorCode::TokenExpired, ErrorCode::TokenRevoked] {
            assert_eq!(k(c), ErrorKind::AuthenticationFailed, "{c:?}");
        }
        for c in [ErrorCode::AccessDenied, ErrorCode::InsufficientScope, ErrorCode::Forbidden] {
            assert_eq!(k(c), ErrorKind::AccessDenied, "{c:?}");
        }
        assert_eq!(k(ErrorCode::RateLimited), ErrorKind::Throttled);
        assert_eq!(k(ErrorCode::StorageError), ErrorKind::Internal);
    }
}

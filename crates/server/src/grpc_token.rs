//! Bearer tokens of the secrets API on the gRPC API: the glue between kmsgate-grpc's authentication chain
//! and kmsgate-secrets' token verifier (frontends never depend on each other; the server wires them).
//!
//! A call carrying `authorization: Bearer svt_...` metadata is authenticated by the token (signature, expiry,
//! revocation by `jti` through the change feed, the identity and its tenant), and every RPC then passes the
//! same checks as the REST API (docs/grpc.md, "Bearer tokens"):
//! - secret RPCs: the scope `secrets:PERMISSION` and, unless the identity has the admin role, the policies
//!   bound to it, on the secret's path (`GetSecret` read, `PutSecret` write, `DeleteSecret` delete,
//!   `ListSecrets` list, each listed path filtered by `list`);
//! - key RPCs (cryptography, keys, aliases): the admin role and the `admin` scope, since the secrets API's
//!   scope vocabulary has no key family;
//! - `Health`: any valid token.

use std::sync::Arc;

use async_trait::async_trait;
use kmsgate_core::{Error, ErrorKind, Result};
use kmsgate_grpc::auth::{Action, Authenticator, CallContext, Guard, Principal};
use kmsgate_secrets::{TokenPrincipal, TokenVerifier};

/// Recognises `authorization: Bearer ...` metadata.
#[derive(Debug, Clone)]
pub struct TokenAuthenticator {
    verifier: TokenVerifier,
}

impl TokenAuthenticator {
    pub fn new(verifier: TokenVerifier) -> Self {
        TokenAuthenticator { verifier }
    }
}

#[async_trait]
impl Authenticator for TokenAuthenticator {
    async fn authenticate(&self, call: CallContext<'_>) -> Result<Option<Principal>> {
        let Some(value) = call.metadata.get("authorization") else { return Ok(None) };
        // An authorization header that is not a bearer token is a credential we cannot verify: refused, so it
        // never falls through to a weaker authenticator.
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Error::new(ErrorKind::AuthenticationFailed, "authorization metadata must be `Bearer <token>`")
            })?;
        let p = self.verifier.verify(token).await?;
        // The client's address, for policies with IP-range conditions (as over REST).
        let peer = call.extensions.get::<crate::http::ConnInfo>().map(|c| c.peer.ip());
        let metadata = [("token_id".to_owned(), p.token_id.clone())].into();
        Ok(Some(Principal {
            tenant: p.tenant.clone(),
            identity: p.identity.clone(),
            metadata,
            guard: Some(Arc::new(TokenGuard { verifier: self.verifier.clone(), principal: p, peer })),
        }))
    }
}

/// The per-call checks of a token principal.
#[derive(Debug)]
struct TokenGuard {
    verifier: TokenVerifier,
    principal: TokenPrincipal,
    peer: Option<std::net::IpAddr>,
}

#[async_trait]
impl Guard for TokenGuard {
    async fn check(&self, action: Action<'_>) -> Result<()> {
        let p = &self.principal;
        match action {
            Action::Health => Ok(()),
            Action::Key(_) => self.verifier.authorize_admin(p),
            Action::ListSecrets => {
                if p.has_scope("secrets:list") {
                    Ok(())
                } else {
                    Err(Error::new(ErrorKind::AccessDenied, "the token lacks the scope secrets:list"))
                }
            }
            Action::Secret { permission, path } => self.verifier.authorize_secret(p, permission, path, self.peer).await,
        }
    }
}

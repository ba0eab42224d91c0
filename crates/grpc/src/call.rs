//! What every RPC does first and last: authenticate, build the core `Caller`, honour the call's
//! `grpc-timeout` (the dispatcher's dependency calls are bounded by it, see `kmsgate_core::deadline`), and map
//! the result.

use std::future::Future;
use std::time::{Duration, Instant};

use kmsgate_core::{Caller, Dispatcher, Error, ErrorKind, Frontend};
use tonic::{Request, Status};
use tracing::Instrument as _;

use crate::auth::{Action, AuthChain, CallContext, Guard};
use crate::error::{deadline_exceeded, frontend_error, status_of};
use crate::proto::kmsgate_v1 as pb;

/// Beyond the caller's deadline, how long the dispatcher may take to notice it on its own before the call is
/// cut: every dependency call inside is already bounded by the deadline, so this only covers the bookkeeping
/// between them (and keeps an operation from being dropped halfway through a mutation in the usual case).
const DEADLINE_SLACK: Duration = Duration::from_millis(25);

/// The longest `grpc-timeout` honoured; longer is treated as this.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// One authenticated call.
#[derive(Debug, Clone)]
pub struct CallCtx {
    pub caller: Caller,
    pub deadline: Option<Instant>,
    /// The credential's permission check (see [`Guard`]).
    pub guard: Option<std::sync::Arc<dyn Guard>>,
}

impl CallCtx {
    /// Asks the credential's guard, if any, under the call's deadline. A refusal never reaches the dispatcher
    /// (which audits operations), so it is audited here as an `AccessCheck`, as the secrets REST API does.
    pub async fn check_audited(&self, dispatcher: &Dispatcher, action: Action<'_>) -> Result<(), Status> {
        let started = Instant::now();
        let checked = self.check(action).await;
        if let Err(status) = &checked
            && status.code() == tonic::Code::PermissionDenied
        {
            let (resource, rpc) = match action {
                Action::Key(rpc) => (None, rpc),
                Action::Secret { path, .. } => (Some(path.to_owned()), "secret"),
                Action::ListSecrets => (None, "ListSecrets"),
                Action::Health => (None, "Health"),
            };
            let mut metadata = self.caller.metadata.clone();
            metadata.insert("rpc".to_owned(), rpc.to_owned());
            dispatcher.audit_sink().record(&kmsgate_core::AuditEvent {
                at: kmsgate_core::Timestamp::now(),
                request_id: self.caller.request_id.clone(),
                tenant: self.caller.tenant.to_string(),
                identity: self.caller.identity.clone(),
                frontend: self.caller.frontend,
                operation: kmsgate_core::Operation::AccessCheck,
                resource,
                outcome: kmsgate_core::Outcome::Error { kind: ErrorKind::AccessDenied.as_str() },
                latency_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                metadata,
            });
        }
        checked
    }

    /// Asks the credential's guard, if any, under the call's deadline.
    pub async fn check(&self, action: Action<'_>) -> Result<(), Status> {
        let Some(g) = &self.guard else { return Ok(()) };
        let checked = match self.deadline {
            Some(d) => kmsgate_core::deadline::with_deadline(d, g.check(action)).await,
            None => g.check(action).await,
        };
        checked.map_err(|e| match self.deadline {
            Some(d) if e.kind() == ErrorKind::DependencyTimeout && Instant::now() >= d => deadline_exceeded(),
            _ => status_of(&e),
        })
    }
}

/// What a request message asks to do, for the caller's [`Guard`].
pub trait Guarded {
    fn action(&self) -> Action<'_>;
}

macro_rules! key_actions {
    ($($msg:ident => $rpc:literal),* $(,)?) => {
        $(impl Guarded for pb::$msg {
            fn action(&self) -> Action<'_> {
                Action::Key($rpc)
            }
        })*
    };
}

key_actions! {
    EncryptRequest => "Encrypt",
    DecryptRequest => "Decrypt",
    GenerateDataKeyRequest => "GenerateDataKey",
    SignRequest => "Sign",
    VerifyRequest => "Verify",
    GetPublicKeyRequest => "GetPublicKey",
    RandomRequest => "Random",
    HmacRequest => "Hmac",
    VerifyHmacRequest => "VerifyHmac",
    CreateKeyRequest => "CreateKey",
    DescribeKeyRequest => "DescribeKey",
    ListKeysRequest => "ListKeys",
    EnableKeyRequest => "EnableKey",
    DisableKeyRequest => "DisableKey",
    ScheduleKeyDeletionRequest => "ScheduleKeyDeletion",
    CancelKeyDeletionRequest => "CancelKeyDeletion",
    RotateKeyRequest => "RotateKey",
    CreateAliasRequest => "CreateAlias",
    UpdateAliasRequest => "UpdateAlias",
    DeleteAliasRequest => "DeleteAlias",
    ListAliasesRequest => "ListAliases",
}

impl Guarded for pb::HealthRequest {
    fn action(&self) -> Action<'_> {
        Action::Health
    }
}

impl Guarded for pb::GetSecretRequest {
    fn action(&self) -> Action<'_> {
        Action::Secret { permission: "read", path: &self.path }
    }
}

impl Guarded for pb::PutSecretRequest {
    fn action(&self) -> Action<'_> {
        Action::Secret { permission: "write", path: &self.path }
    }
}

impl Guarded for pb::DeleteSecretRequest {
    fn action(&self) -> Action<'_> {
        Action::Secret { permission: "delete", path: &self.path }
    }
}

impl Guarded for pb::ListSecretsRequest {
    fn action(&self) -> Action<'_> {
        Action::ListSecrets
    }
}

/// `grpc-timeout`: 1-8 ASCII digits and a unit (H, M, S, m, u, n), per the gRPC over HTTP/2 spec.
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Some(d.min(MAX_TIMEOUT))
}

/// The request id: the caller's `x-request-id` when it is sane, else a fresh UUID.
fn request_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// The deadline of the call, from `grpc-timeout` (a malformed value is refused, as the spec wants).
pub fn deadline_of<T>(req: &Request<T>) -> Result<Option<Instant>, Status> {
    match req.metadata().get("grpc-timeout") {
        None => Ok(None),
        Some(v) => match v.to_str().ok().and_then(parse_grpc_timeout) {
            Some(d) => Ok(Some(Instant::now() + d)),
            None => Err(frontend_error(ErrorKind::InvalidRequest, "malformed grpc-timeout")),
        },
    }
}

/// Authenticates the call and builds its caller.
pub async fn begin<T>(auth: &AuthChain, req: &Request<T>, frontend: Frontend) -> Result<CallCtx, Status> {
    let deadline = deadline_of(req)?;
    let ctx = CallContext { metadata: req.metadata(), extensions: req.extensions() };
    // Credential lookups are store calls: the caller's deadline bounds them too.
    let principal = match deadline {
        Some(d) => kmsgate_core::deadline::with_deadline(d, auth.authenticate(ctx)).await,
        None => auth.authenticate(ctx).await,
    };
    let principal = principal.map_err(|e| match deadline {
        Some(d) if e.kind() == ErrorKind::DependencyTimeout && Instant::now() >= d => deadline_exceeded(),
        _ => status_of(&e),
    })?;
    Ok(CallCtx {
        caller: Caller {
            tenant: principal.tenant,
            identity: principal.identity,
            frontend,
            request_id: request_id(req),
            metadata: principal.metadata,
        },
        deadline,
        guard: principal.guard,
    })
}

/// Runs a dispatcher operation under the call's deadline and maps its error.
///
/// The operation runs as its own task: when the client goes away (or its deadline passes first on its side,
/// which cancels the HTTP/2 stream), the operation still finishes, bounded by its dependency deadlines, and
/// is audited; a mutation is never dropped halfway.
pub async fn run<T: Send + 'static>(
    deadline: Option<Instant>,
    work: impl Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Status> {
    // The request's span (request id, method) follows the work into its task, so its log lines carry it.
    let task = tokio::spawn(
        async move {
            match deadline {
                Some(d) => kmsgate_core::deadline::with_deadline(d, work).await,
                None => work.await,
            }
        }
        .instrument(tracing::Span::current()),
    );
    let joined = match deadline {
        None => task.await,
        // Dropping the handle does not stop the task: it ends on its own, bounded by the same deadline.
        Some(d) => match tokio::time::timeout_at((d + DEADLINE_SLACK).into(), task).await {
            Ok(j) => j,
            Err(_) => return Err(deadline_exceeded()),
        },
    };
    match joined {
        Ok(Ok(v)) => Ok(v),
        // A dependency cut short by the caller's deadline: the caller's own deadline is what passed.
        Ok(Err(e)) if e.kind() == ErrorKind::DependencyTimeout && deadline.is_some_and(|d| Instant::now() >= d) => {
            Err(deadline_exceeded())
        }
        Ok(Err(e)) => Err(status_of(&e)),
        Err(join) => {
            tracing::error!(error = %join, "a gRPC operation panicked");
            Err(status_of(&Error::internal("the operation failed")))
        }
    }
}

/// Convenience for handlers: `begin`, the guard's check of the request's action, then `run` with the
/// dispatcher.
pub async fn with_caller<Q: Guarded, T, F, Fut>(
    auth: &AuthChain,
    dispatcher: &Dispatcher,
    req: Request<Q>,
    work: F,
) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(Dispatcher, Caller, Q) -> Fut,
    Fut: Future<Output = Result<T, Error>> + Send + 'static,
{
    let ctx = begin(auth, &req, Frontend::Grpc).await?;
    ctx.check_audited(dispatcher, req.get_ref().action()).await?;
    run(ctx.deadline, work(dispatcher.clone(), ctx.caller, req.into_inner())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(parse_grpc_timeout("50m"), Some(Duration::from_millis(50)));
        assert_eq!(parse_grpc_timeout("1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("99999999H"), Some(MAX_TIMEOUT));
        for bad in ["", "m", "5", "123456789m", "5x", "-5m", "5 m", "+5m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}

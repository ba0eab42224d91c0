//! Authorization and rate-limit hooks every operation passes through.

use std::fmt;

use crate::audit::Operation;
use crate::error::Result;
use crate::model::Caller;

/// Decides whether a caller may perform an operation on a resource. Tenant isolation is not the
/// authorizer's job: every store query is scoped to the caller's tenant.
pub trait Authorizer: Send + Sync + fmt::Debug {
    fn authorize(&self, caller: &Caller, operation: Operation, resource: Option<&str>) -> Result<()>;
}

/// Allows every operation inside the caller's own tenant. Frontends with their own rules (XKS secondary
/// authorization, REST policies) layer them on top.
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowWithinTenant;

impl Authorizer for AllowWithinTenant {
    fn authorize(&self, _caller: &Caller, _operation: Operation, _resource: Option<&str>) -> Result<()> {
        Ok(())
    }
}

/// Admits or refuses a request before it costs anything. A refusal is `Throttled` or `QuotaExceeded` with a
/// retry-after where one is known.
pub trait RateLimiter: Send + Sync + fmt::Debug {
    fn check(&self, caller: &Caller, operation: Operation) -> Result<()>;
}

/// No limits: the default until a frontend or tenant configures some.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unlimited;

impl RateLimiter for Unlimited {
    fn check(&self, _caller: &Caller, _operation: Operation) -> Result<()> {
        Ok(())
    }
}

//! The one error type every layer below the frontends returns.
//!
//! A frontend never branches on message text: it matches on [`ErrorKind`] in exactly one mapping function
//! that turns a kind into its wire envelope. The message is safe to show a client; the source is only logged.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use crate::model::KeyState;

/// What went wrong, as a closed set of cases every frontend must map.
///
/// Adding a variant breaks every frontend's exhaustive mapping test on purpose: a new kind must get a wire
/// form everywhere before it can ship.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A parameter is missing, malformed or out of range.
    InvalidRequest,
    /// The frontend does not know the operation or route.
    UnknownOperation,
    /// The credential, signature or token did not verify.
    AuthenticationFailed,
    /// The request's timestamp is outside the allowed clock skew.
    RequestTimeSkewed,
    /// The caller is authenticated but a policy denies the operation.
    AccessDenied,
    /// No key with that id or alias exists for the caller's tenant.
    KeyNotFound,
    /// No alias with that name exists for the caller's tenant.
    AliasNotFound,
    /// The resource (alias, key id, tenant...) already exists.
    AlreadyExists,
    /// The key exists but its state forbids the operation.
    InvalidKeyState(KeyState),
    /// The key's usage set does not allow the operation.
    InvalidKeyUsage,
    /// No secret at that path for the caller's tenant (soft-deleted secrets included).
    SecretNotFound,
    /// The secret exists but not the requested version (or version id, or stage).
    SecretVersionNotFound,
    /// A write to a path whose secret is soft-deleted and still recoverable.
    SecretExists,
    /// A compare-and-set precondition (`cas`, `If-Match`, expected revision) did not hold.
    VersionConflict,
    /// The secret's expiry has passed: its value is gone for readers, its metadata is not.
    SecretExpired,
    /// Ciphertext, tag, IV or AAD did not authenticate, or the blob is malformed.
    InvalidCiphertext,
    /// Too many requests right now; retry after a while.
    Throttled,
    /// A quota (count of keys, secrets, tokens...) is exhausted.
    QuotaExceeded,
    /// The operation, algorithm or size is not supported by this gateway.
    Unsupported,
    /// A dependency (HSM, store) did not answer within the deadline.
    DependencyTimeout,
    /// The HSM or key backend failed.
    DependencyFailure,
    /// The store failed.
    StorageFailure,
    /// A bug: an invariant did not hold.
    Internal,
}

impl ErrorKind {
    /// Every kind, with a representative payload, for the exhaustive mapping tests each frontend owns.
    pub const ALL: &'static [ErrorKind] = &[
        ErrorKind::InvalidRequest,
        ErrorKind::UnknownOperation,
        ErrorKind::AuthenticationFailed,
        ErrorKind::RequestTimeSkewed,
        ErrorKind::AccessDenied,
        ErrorKind::KeyNotFound,
        ErrorKind::AliasNotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::InvalidKeyState(KeyState::Enabled),
        ErrorKind::InvalidKeyState(KeyState::Disabled),
        ErrorKind::InvalidKeyState(KeyState::PendingDeletion),
        ErrorKind::InvalidKeyState(KeyState::PendingImport),
        ErrorKind::InvalidKeyUsage,
        ErrorKind::SecretNotFound,
        ErrorKind::SecretVersionNotFound,
        ErrorKind::SecretExists,
        ErrorKind::VersionConflict,
        ErrorKind::SecretExpired,
        ErrorKind::InvalidCiphertext,
        ErrorKind::Throttled,
        ErrorKind::QuotaExceeded,
        ErrorKind::Unsupported,
        ErrorKind::DependencyTimeout,
        ErrorKind::DependencyFailure,
        ErrorKind::StorageFailure,
        ErrorKind::Internal,
    ];

    /// A short stable name used in audit events, logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::UnknownOperation => "unknown_operation",
            ErrorKind::AuthenticationFailed => "authentication_failed",
            ErrorKind::RequestTimeSkewed => "request_time_skewed",
            ErrorKind::AccessDenied => "access_denied",
            ErrorKind::KeyNotFound => "key_not_found",
            ErrorKind::AliasNotFound => "alias_not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::InvalidKeyState(_) => "invalid_key_state",
            ErrorKind::InvalidKeyUsage => "invalid_key_usage",
            ErrorKind::SecretNotFound => "secret_not_found",
            ErrorKind::SecretVersionNotFound => "secret_version_not_found",
            ErrorKind::SecretExists => "secret_exists",
            ErrorKind::VersionConflict => "version_conflict",
            ErrorKind::SecretExpired => "secret_expired",
            ErrorKind::InvalidCiphertext => "invalid_ciphertext",
            ErrorKind::Throttled => "throttled",
            ErrorKind::QuotaExceeded => "quota_exceeded",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::DependencyTimeout => "dependency_timeout",
            ErrorKind::DependencyFailure => "dependency_failure",
            ErrorKind::StorageFailure => "storage_failure",
            ErrorKind::Internal => "internal",
        }
    }

    /// Whether a client may usefully retry the same request later.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Throttled
                | ErrorKind::DependencyTimeout
                | ErrorKind::DependencyFailure
                | ErrorKind::StorageFailure
        )
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A core error: kind, client-safe message, internal source (logged only), optional retry-after and
/// structured details.
pub struct Error {
    kind: ErrorKind,
    message: Cow<'static, str>,
    source: Option<Source>,
    retry_after: Option<Duration>,
    /// Client-safe facts a frontend may render structurally (REST `details`): `recoverable_until`,
    /// `expected`/`current`, `expired_at`, `limit`... Never values, key material or verifier internals.
    details: Vec<(&'static str, String)>,
}

/// The result type of every core operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error. `message` is shown to clients: keep secrets, key material and verifier internals out of it.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self { kind, message: sanitize(message.into()), source: None, retry_after: None, details: Vec::new() }
    }

    /// Attach the internal cause. It is logged, never rendered to a client.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Ask the client to wait before retrying.
    #[must_use]
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Attach a structured detail. The value is shown to clients (sanitized like the message); a detail of
    /// the same name is replaced.
    #[must_use]
    pub fn with_detail(mut self, name: &'static str, value: impl Into<String>) -> Self {
        let value = sanitize(Cow::Owned(value.into())).into_owned();
        match self.details.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.details.push((name, value)),
        }
        self
    }

    /// The structured details, in the order they were attached.
    pub fn details(&self) -> &[(&'static str, String)] {
        &self.details
    }

    /// One detail by name.
    pub fn detail(&self, name: &str) -> Option<&str> {
        self.details.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The client-safe message (printable ASCII, under 512 characters).
    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The internal cause, for logs only.
    pub fn internal_source(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }

    pub fn invalid(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message)
    }

    pub fn internal(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    pub fn storage(source: impl Into<Source>) -> Self {
        Self::new(ErrorKind::StorageFailure, "the store failed").with_source(source)
    }

    pub fn backend(source: impl Into<Source>) -> Self {
        Self::new(ErrorKind::DependencyFailure, "the key backend failed").with_source(source)
    }

    pub fn key_not_found() -> Self {
        Self::new(ErrorKind::KeyNotFound, "the key does not exist")
    }

    pub fn invalid_ciphertext() -> Self {
        Self::new(ErrorKind::InvalidCiphertext, "the ciphertext, IV, tag or additional data is invalid")
    }
}

/// Messages travel in HTTP bodies of several protocols; XKS demands printable ASCII under 512 characters.
fn sanitize(message: Cow<'static, str>) -> Cow<'static, str> {
    let clean = message.len() < 512 && message.bytes().all(|b| (0x20..=0x7e).contains(&b));
    if clean {
        return message;
    }
    let mut out: String = message.chars().map(|c| if (' '..='~').contains(&c) { c } else { '?' }).collect();
    out.truncate(511);
    Cow::Owned(out)
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(s) = &self.source {
            d.field("source", &format_args!("{s}"));
        }
        if let Some(r) = self.retry_after {
            d.field("retry_after", &r);
        }
        if !self.details.is_empty() {
            d.field("details", &self.details);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_printable_ascii_under_512() {
        let e = Error::invalid("bad\nvalue \u{e9}");
        assert_eq!(e.message(), "bad?value ?");
        let long = "x".repeat(2000);
        assert_eq!(Error::invalid(long).message().len(), 511);
    }

    #[test]
    fn display_never_shows_source() {
        let e = Error::storage(std::io::Error::other("secret path /x"));
        assert_eq!(e.to_string(), "storage_failure: the store failed");
        assert!(format!("{e:?}").contains("secret path"));
    }

    #[test]
    fn details_are_sanitized_and_replaced_by_name() {
        let e = Error::new(ErrorKind::VersionConflict, "conflict")
            .with_detail("expected", "3")
            .with_detail("current", "4\n")
            .with_detail("expected", "5");
        assert_eq!(e.details(), &[("expected", "5".to_owned()), ("current", "4?".to_owned())]);
        assert_eq!(e.detail("current"), Some("4?"));
        assert_eq!(e.detail("nope"), None);
        assert!(!e.to_string().contains('5'), "Display shows kind and message only");
    }

    #[test]
    fn kind_names_are_unique() {
        let mut names: Vec<_> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        names.dedup();
        assert!(names.len() >= 18);
    }
}

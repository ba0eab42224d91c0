//! The error envelope `{"error":{"code","message","details"?,"request_id"}}` and THE mapping from core error
//! kinds to the vocabulary.

use std::time::Duration;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use kmsgate_core::{Error, ErrorKind};
use serde_json::{Map, Value, json};

use crate::code::ErrorCode;

/// A wire error. The request id is filled in by the conventions middleware, which knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub details: Map<String, Value>,
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), details: Map::new(), retry_after: None }
    }

    #[must_use]
    pub fn detail(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.details.insert(name.to_owned(), value.into());
        self
    }

    #[must_use]
    pub fn retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }

    /// 422 with `details.fields=[{field, code, message}]`.
    pub fn validation(field: &str, code: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        ApiError::new(ErrorCode::ValidationError, format!("{field}: {message}"))
            .detail("fields", json!([{"field": field, "code": code, "message": message}]))
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::InvalidRequest, message)
    }

    /// The JSON body, with the request id.
    pub fn body(&self, request_id: &str) -> Value {
        let mut e = Map::new();
        e.insert("code".into(), self.code.as_str().into());
        e.insert("message".into(), self.message.clone().into());
        if !self.details.is_empty() {
            e.insert("details".into(), Value::Object(self.details.clone()));
        }
        e.insert("request_id".into(), request_id.into());
        json!({ "error": e })
    }
}

/// Carried in a response's extensions until the middleware renders the body with the request id.
#[derive(Debug, Clone)]
pub struct PendingError(pub ApiError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = self.code.http_status().into_response();
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r.extensions_mut().insert(PendingError(self));
        r
    }
}

/// THE mapping from a core kind to the vocabulary. Every kind is decided here and pinned by a unit test.
pub fn code_for(kind: ErrorKind) -> ErrorCode {
    use ErrorCode as C;
    match kind {
        ErrorKind::InvalidRequest => C::InvalidRequest,
        ErrorKind::UnknownOperation => C::RouteNotFound,
        ErrorKind::AuthenticationFailed | ErrorKind::RequestTimeSkewed => C::TokenInvalid,
        ErrorKind::AccessDenied => C::AccessDenied,
        // The internal secrets key is created on demand: a missing one means the KMS side is broken.
        ErrorKind::KeyNotFound | ErrorKind::AliasNotFound => C::EncryptionError,
        ErrorKind::AlreadyExists => C::NameConflict,
        ErrorKind::InvalidKeyState(_) | ErrorKind::InvalidKeyUsage | ErrorKind::InvalidCiphertext => C::EncryptionError,
        ErrorKind::SecretNotFound => C::SecretNotFound,
        ErrorKind::SecretVersionNotFound => C::VersionNotFound,
        ErrorKind::SecretExists => C::SecretExists,
        ErrorKind::VersionConflict => C::VersionConflict,
        ErrorKind::SecretExpired => C::SecretExpired,
        ErrorKind::Throttled => C::RateLimited,
        ErrorKind::QuotaExceeded => C::QuotaExceeded,
        ErrorKind::Unsupported => C::InvalidRequest,
        ErrorKind::DependencyTimeout => C::ServiceUnavailable,
        ErrorKind::DependencyFailure => C::EncryptionError,
        ErrorKind::StorageFailure => C::StorageError,
        ErrorKind::Internal => C::InternalError,
        // `ErrorKind` is non-exhaustive across crates: a kind added later is an internal error here until
        // mapped (the unit test over `ErrorKind::ALL` fails first).
        _ => C::InternalError,
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let code = code_for(e.kind());
        if let Some(src) = e.internal_source() {
            tracing::warn!(code = code.as_str(), source = %src, "request failed");
        }
        // Messages of dependency failures are generic on purpose: no backend or database text reaches clients.
        let message = match code {
            ErrorCode::EncryptionError => "the key management service rejected the operation".to_owned(),
            ErrorCode::StorageError => "the store failed".to_owned(),
            ErrorCode::ServiceUnavailable => "a dependency is unavailable; retry later".to_owned(),
            ErrorCode::InternalError => "internal error".to_owned(),
            _ => e.message().to_owned(),
        };
        let mut out = ApiError::new(code, message);
        for (name, value) in e.details() {
            let v = value.parse::<i64>().map(Value::from).unwrap_or_else(|_| Value::from(value.clone()));
            out.details.insert((*name).to_owned(), v);
        }
        if let Some(r) = e.retry_after() {
            out.retry_after = Some(r);
        } else if code == ErrorCode::ServiceUnavailable {
            out.retry_after = Some(Duration::from_secs(1));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmsgate_core::KeyState;

    #[test]
    fn every_core_kind_is_mapped() {
        let got: Vec<(ErrorKind, &str, u16)> = ErrorKind::ALL
            .iter()
            .map(|k| {
                let c = code_for(*k);
                (*k, c.as_str(), c.http_status().as_u16())
            })
            .collect();
        let want: Vec<(ErrorKind, &str, u16)> = vec![
            (ErrorKind::InvalidRequest, "invalid_request", 400),
            (ErrorKind::UnknownOperation, "route_not_found", 404),
            (ErrorKind::AuthenticationFailed, "token_invalid", 401),
            (ErrorKind::RequestTimeSkewed, "token_invalid", 401),
            (ErrorKind::AccessDenied, "access_denied", 403),
            (ErrorKind::KeyNotFound, "encryption_error", 500),
            (ErrorKind::AliasNotFound, "encryption_error", 500),
            (ErrorKind::AlreadyExists, "name_conflict", 409),
            (ErrorKind::InvalidKeyState(KeyState::Enabled), "encryption_error", 500),
            (ErrorKind::InvalidKeyState(KeyState::Disabled), "encryption_error", 500),
            (ErrorKind::InvalidKeyState(KeyState::PendingDeletion), "encryption_error", 500),
            (ErrorKind::InvalidKeyState(KeyState::PendingImport), "encryption_error", 500),
            (ErrorKind::InvalidKeyUsage, "encryption_error", 500),
            (ErrorKind::SecretNotFound, "secret_not_found", 404),
            (ErrorKind::SecretVersionNotFound, "version_not_found", 404),
            (ErrorKind::SecretExists, "secret_exists", 409),
            (ErrorKind::VersionConflict, "version_conflict", 409),
            (ErrorKind::SecretExpired, "secret_expired", 410),
            (ErrorKind::InvalidCiphertext, "encryption_error", 500),
            (ErrorKind::Throttled, "rate_limited", 429),
            (ErrorKind::QuotaExceeded, "quota_exceeded", 429),
            (ErrorKind::Unsupported, "invalid_request", 400),
            (ErrorKind::DependencyTimeout, "service_unavailable", 503),
            (ErrorKind::DependencyFailure, "encryption_error", 500),
            (ErrorKind::StorageFailure, "storage_error", 500),
            (ErrorKind::Internal, "internal_error", 500),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn envelope_shape_and_details() {
        let e: ApiError = Error::new(ErrorKind::VersionConflict, "cas mismatch")
            .with_detail("expected", "3")
            .with_detail("current", "4")
            .into();
        let b = e.body("req_1");
        assert_eq!(
            b,
            json!({"error": {"code": "version_conflict", "message": "cas mismatch",
                              "details": {"expected": 3, "current": 4}, "request_id": "req_1"}})
        );
        let e: ApiError = Error::storage(std::io::Error::other("disk /var/x full")).into();
        assert!(!e.body("r").to_string().contains("disk"), "no internal source text");
        let plain = ApiError::invalid_request("bad").body("r");
        assert!(plain["error"].get("details").is_none());
    }
}

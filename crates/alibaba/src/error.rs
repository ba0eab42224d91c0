//! The instance API's error envelope: protobuf `Error{StatusCode, ErrorCode, ErrorMessage, RequestId}` with the
//! HTTP status in both the status line and `StatusCode` (the SDKs read only the status line).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kmsgate_core::{ErrorKind, KeyState};
use prost::Message as _;

use crate::proto;

const KEY_NOT_FOUND: &str = "The specified Key is not found.";

/// A wire error of the instance API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl AliError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        AliError { status, code, message: message.into() }
    }

    pub fn invalid_api_name(name: &str) -> Self {
        // The name is echoed as the vendor does, but only when it is short printable ASCII.
        let shown = if name.len() <= 64 && name.bytes().all(|b| b.is_ascii_graphic()) { name } else { "?" };
        Self::new(StatusCode::BAD_REQUEST, "InvalidApiName", format!("The ApiName \"{shown}\" is invalid."))
    }

    pub fn invalid_api_version(version: &str) -> Self {
        let shown = if version.len() <= 64 && version.bytes().all(|b| b.is_ascii_graphic()) { version } else { "?" };
        Self::new(StatusCode::BAD_REQUEST, "InvalidApiVersion", format!("The ApiVersion \"{shown}\" is invalid."))
    }

    pub fn invalid_param(param: &str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "InvalidParam", format!("The Param {param} is invalid."))
    }

    pub fn missing_parameter(param: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "MissingParameter",
            format!("Parameter {param} does not exist in http header or body."),
        )
    }

    pub fn invalid_parameter(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "InvalidParameter", message)
    }

    pub fn time_skewed() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "RequestTimeTooSkewed",
            "Request time exceeds server time more than 15 minutes.",
        )
    }

    pub fn signature_not_match() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "SignatureNotMatch", "Signature is not matched.")
    }

    /// An unknown or revoked ClientKey, in the vendor's words (the id is echoed only when it is short printable
    /// ASCII).
    pub fn unauthorized(client_key: &str) -> Self {
        let shown =
            if client_key.len() <= 64 && client_key.bytes().all(|b| b.is_ascii_graphic()) { client_key } else { "?" };
        Self::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            format!("The AccessKey ID \"{shown}\" does not exist in our records."),
        )
    }

    /// The three Forbidden.KeyNotFound messages: no such key, alias, or key version.
    pub fn key_not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "Forbidden.KeyNotFound", KEY_NOT_FOUND)
    }

    pub fn alias_not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "Forbidden.KeyNotFound", "The specified Alias is not found.")
    }

    pub fn key_version_not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "Forbidden.KeyNotFound", "The specified Key version is not found.")
    }

    /// A (ClientKey, signature) pair seen before within the date window: see the replay check.
    pub fn duplicate_signature() -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Rejected.Throttling",
            "The same signed request was already received; retry with a new Date.",
        )
    }

    /// The ClientKey's QPS limit is exhausted (the vendor's text for it).
    pub fn throttled() -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "Rejected.Throttling", "QPS Limit Exceeded")
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "UnsupportedOperation", message)
    }

    pub fn body_too_large() -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "InvalidParameter", "The request body exceeds 3 MB.")
    }

    pub fn invalid_content_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "InvalidContentType",
            "The Content-Type must be application/x-protobuf.",
        )
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalFailure",
            "The request processing has failed due to some unknown error.",
        )
    }

    /// The protobuf response carrying this error.
    pub fn into_response_with(self, request_id: &str) -> Response {
        let body = proto::Error {
            status_code: i32::from(self.status.as_u16()),
            error_code: self.code.to_owned(),
            error_message: self.message,
            request_id: request_id.to_owned(),
        }
        .encode_to_vec();
        let mut r = (self.status, body).into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
        r
    }
}

/// THE mapping from a core error kind to the instance API's status and code. Every kind is decided here and
/// pinned by a unit test; the message is the core's client-safe message.
pub fn status_and_code(kind: ErrorKind) -> (StatusCode, &'static str) {
    use StatusCode as S;
    match kind {
        ErrorKind::InvalidRequest => (S::BAD_REQUEST, "InvalidParameter"),
        ErrorKind::UnknownOperation => (S::BAD_REQUEST, "InvalidApiName"),
        ErrorKind::AuthenticationFailed => (S::UNAUTHORIZED, "SignatureNotMatch"),
        ErrorKind::RequestTimeSkewed => (S::BAD_REQUEST, "RequestTimeTooSkewed"),
        ErrorKind::AccessDenied => (S::FORBIDDEN, "Forbidden.NoPermission"),
        ErrorKind::KeyNotFound | ErrorKind::AliasNotFound => (S::NOT_FOUND, "Forbidden.KeyNotFound"),
        ErrorKind::AlreadyExists => (S::BAD_REQUEST, "InvalidParameter"),
        ErrorKind::InvalidKeyState(KeyState::Disabled) => (S::CONFLICT, "Rejected.Disabled"),
        ErrorKind::InvalidKeyState(KeyState::PendingDeletion) => (S::CONFLICT, "Rejected.PendingDeletion"),
        ErrorKind::InvalidKeyState(KeyState::PendingImport) => (S::CONFLICT, "Rejected.PendingImport"),
        // An Enabled key reported as unusable is a core inconsistency, surfaced as the generic state error.
        ErrorKind::InvalidKeyState(_) => (S::CONFLICT, "Rejected.Disabled"),
        ErrorKind::InvalidKeyUsage => (S::BAD_REQUEST, "Rejected.InvalidKeyUsage"),
        ErrorKind::SecretNotFound | ErrorKind::SecretVersionNotFound => (S::NOT_FOUND, "Forbidden.ResourceNotFound"),
        ErrorKind::SecretExists | ErrorKind::VersionConflict => (S::BAD_REQUEST, "InvalidParameter"),
        ErrorKind::SecretExpired => (S::NOT_FOUND, "Forbidden.ResourceNotFound"),
        ErrorKind::InvalidCiphertext => (S::BAD_REQUEST, "InvalidParameter"),
        ErrorKind::Throttled => (S::TOO_MANY_REQUESTS, "Rejected.Throttling"),
        ErrorKind::QuotaExceeded => (S::BAD_REQUEST, "Rejected.LimitExceeded"),
        ErrorKind::Unsupported => (S::BAD_REQUEST, "UnsupportedOperation"),
        ErrorKind::DependencyTimeout => (S::SERVICE_UNAVAILABLE, "ServiceUnavailableTemporary"),
        ErrorKind::DependencyFailure | ErrorKind::StorageFailure | ErrorKind::Internal => {
            (S::INTERNAL_SERVER_ERROR, "InternalFailure")
        }
        // `ErrorKind` is non-exhaustive across crates; a kind added later is an internal failure until mapped
        // (the unit test over `ErrorKind::ALL` fails first).
        _ => (S::INTERNAL_SERVER_ERROR, "InternalFailure"),
    }
}

impl From<kmsgate_core::Error> for AliError {
    fn from(e: kmsgate_core::Error) -> Self {
        let kind = e.kind();
        let (status, code) = status_and_code(kind);
        if status.is_server_error() {
            tracing::warn!(target: "alibaba", kind = kind.as_str(), error = ?e.internal_source(), "request failed");
            // Backend and store texts stay in the log.
            return AliError::new(status, code, e.message().to_owned());
        }
        let message = match kind {
            ErrorKind::KeyNotFound => KEY_NOT_FOUND.to_owned(),
            ErrorKind::AliasNotFound => "The specified Alias is not found.".to_owned(),
            _ => e.message().to_owned(),
        };
        AliError::new(status, code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_pinned_wire_form() {
        for &kind in ErrorKind::ALL {
            let (status, code) = status_and_code(kind);
            let expected = match kind {
                ErrorKind::InvalidRequest => (400, "InvalidParameter"),
                ErrorKind::UnknownOperation => (400, "InvalidApiName"),
                ErrorKind::AuthenticationFailed => (401, "SignatureNotMatch"),
                ErrorKind::RequestTimeSkewed => (400, "RequestTimeTooSkewed"),
                ErrorKind::AccessDenied => (403, "Forbidden.NoPermission"),
                ErrorKind::KeyNotFound | ErrorKind::AliasNotFound => (404, "Forbidden.KeyNotFound"),
                ErrorKind::AlreadyExists => (400, "InvalidParameter"),
                ErrorKind::InvalidKeyState(KeyState::Disabled | KeyState::Enabled) => (409, "Rejected.Disabled"),
                ErrorKind::InvalidKeyState(KeyState::PendingDeletion) => (409, "Rejected.PendingDeletion"),
                ErrorKind::InvalidKeyState(KeyState::PendingImport) => (409, "Rejected.PendingImport"),
                ErrorKind::InvalidKeyUsage => (400, "Rejected.InvalidKeyUsage"),
                ErrorKind::SecretNotFound | ErrorKind::SecretVersionNotFound | ErrorKind::SecretExpired => {
                    (404, "Forbidden.ResourceNotFound")
                }
                ErrorKind::SecretExists | ErrorKind::VersionConflict => (400, "InvalidParameter"),
                ErrorKind::InvalidCiphertext => (400, "InvalidParameter"),
                ErrorKind::Throttled => (429, "Rejected.Throttling"),
                ErrorKind::QuotaExceeded => (400, "Rejected.LimitExceeded"),
                ErrorKind::Unsupported => (400, "UnsupportedOperation"),
                ErrorKind::DependencyTimeout => (503, "ServiceUnavailableTemporary"),
                ErrorKind::DependencyFailure | ErrorKind::StorageFailure | ErrorKind::Internal => {
                    (500, "InternalFailure")
                }
                other => panic!("kind {other:?} has no pinned Alibaba wire form"),
            };
            assert_eq!((status.as_u16(), code), expected, "{kind:?}");
        }
    }

    #[test]
    fn the_envelope_carries_the_status_twice() {
        let r = AliError::time_skewed().into_response_with("rid-1");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }
}

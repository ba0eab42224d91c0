//! The XKS error envelope: the twelve `errorName`s of the specification, their HTTP statuses, and the one
//! mapping from core error kinds.

use std::borrow::Cow;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kmsgate_core::{Error, ErrorKind};

/// Every `errorName` the XKS specification defines (section "Error codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorName {
    ValidationException,
    InvalidStateException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    AuthenticationFailedException,
    AccessDeniedException,
    KeyNotFoundException,
    InvalidUriPathException,
    ThrottlingException,
    UnsupportedOperationException,
    DependencyTimeoutException,
    InternalException,
}

impl ErrorName {
    pub const ALL: [ErrorName; 12] = [
        ErrorName::ValidationException,
        ErrorName::InvalidStateException,
        ErrorName::InvalidCiphertextException,
        ErrorName::InvalidKeyUsageException,
        ErrorName::AuthenticationFailedException,
        ErrorName::AccessDeniedException,
        ErrorName::KeyNotFoundException,
        ErrorName::InvalidUriPathException,
        ErrorName::ThrottlingException,
        ErrorName::UnsupportedOperationException,
        ErrorName::DependencyTimeoutException,
        ErrorName::InternalException,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorName::ValidationException => "ValidationException",
            ErrorName::InvalidStateException => "InvalidStateException",
            ErrorName::InvalidCiphertextException => "InvalidCiphertextException",
            ErrorName::InvalidKeyUsageException => "InvalidKeyUsageException",
            ErrorName::AuthenticationFailedException => "AuthenticationFailedException",
            ErrorName::AccessDeniedException => "AccessDeniedException",
            ErrorName::KeyNotFoundException => "KeyNotFoundException",
            ErrorName::InvalidUriPathException => "InvalidUriPathException",
            ErrorName::ThrottlingException => "ThrottlingException",
            ErrorName::UnsupportedOperationException => "UnsupportedOperationException",
            ErrorName::DependencyTimeoutException => "DependencyTimeoutException",
            ErrorName::InternalException => "InternalException",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorName::ValidationException
            | ErrorName::InvalidStateException
            | ErrorName::InvalidCiphertextException
            | ErrorName::InvalidKeyUsageException => StatusCode::BAD_REQUEST,
            ErrorName::AuthenticationFailedException => StatusCode::UNAUTHORIZED,
            ErrorName::AccessDeniedException => StatusCode::FORBIDDEN,
            ErrorName::KeyNotFoundException | ErrorName::InvalidUriPathException => StatusCode::NOT_FOUND,
            ErrorName::ThrottlingException => StatusCode::TOO_MANY_REQUESTS,
            ErrorName::UnsupportedOperationException => StatusCode::NOT_IMPLEMENTED,
            ErrorName::DependencyTimeoutException => StatusCode::SERVICE_UNAVAILABLE,
            ErrorName::InternalException => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The one mapping from a core error kind to the XKS wire error (design.md, "Errors").
pub fn error_name(kind: ErrorKind) -> ErrorName {
    match kind {
        ErrorKind::InvalidRequest => ErrorName::ValidationException,
        ErrorKind::UnknownOperation => ErrorName::InvalidUriPathException,
        ErrorKind::AuthenticationFailed | ErrorKind::RequestTimeSkewed => ErrorName::AuthenticationFailedException,
        ErrorKind::AccessDenied => ErrorName::AccessDeniedException,
        ErrorKind::KeyNotFound | ErrorKind::AliasNotFound => ErrorName::KeyNotFoundException,
        ErrorKind::InvalidKeyState(_) => ErrorName::InvalidStateException,
        ErrorKind::InvalidKeyUsage => ErrorName::InvalidKeyUsageException,
        ErrorKind::InvalidCiphertext => ErrorName::InvalidCiphertextException,
        ErrorKind::Throttled | ErrorKind::QuotaExceeded => ErrorName::ThrottlingException,
        ErrorKind::Unsupported => ErrorName::UnsupportedOperationException,
        ErrorKind::DependencyTimeout => ErrorName::DependencyTimeoutException,
        // XKS never creates anything a caller names and never touches secrets: these reaching an XKS caller
        // are our own bug.
        ErrorKind::AlreadyExists
        | ErrorKind::SecretNotFound
        | ErrorKind::SecretVersionNotFound
        | ErrorKind::SecretExists
        | ErrorKind::VersionConflict
        | ErrorKind::SecretExpired
        | ErrorKind::DependencyFailure
        | ErrorKind::StorageFailure
        | ErrorKind::Internal => ErrorName::InternalException,
        // `ErrorKind` is non-exhaustive across crates; the unit test over `ErrorKind::ALL` makes sure no known
        // kind lands here by accident.
        _ => ErrorName::InternalException,
    }
}

/// An error as it goes on the wire: name, and a message that is printable ASCII under 512 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XksError {
    pub name: ErrorName,
    pub message: Cow<'static, str>,
}

impl XksError {
    pub fn new(name: ErrorName, message: impl Into<Cow<'static, str>>) -> Self {
        XksError { name, message: sanitize(message.into()) }
    }

    pub fn validation(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorName::ValidationException, message)
    }

    /// The one message every authentication failure gets: it never says what was expected.
    pub fn authentication() -> Self {
        Self::new(ErrorName::AuthenticationFailedException, "the request signature could not be verified")
    }

    pub fn uri_path() -> Self {
        Self::new(ErrorName::InvalidUriPathException, "the URI path is not valid")
    }

    pub fn key_not_found() -> Self {
        Self::new(ErrorName::KeyNotFoundException, "the external key does not exist in this key store")
    }

    pub fn invalid_ciphertext() -> Self {
        Self::new(
            ErrorName::InvalidCiphertextException,
            "the ciphertext, ciphertext metadata, initialization vector, additional authenticated data or \
             authentication tag is invalid",
        )
    }

    pub fn unsupported(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorName::UnsupportedOperationException, message)
    }

    pub fn internal(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorName::InternalException, message)
    }
}

impl From<Error> for XksError {
    fn from(e: Error) -> Self {
        let name = error_name(e.kind());
        // Core messages are client-safe, but "internal" ones can name internals of the gateway; KMS shows
        // the message to the account owner, so keep those generic.
        let message: Cow<'static, str> = match name {
            ErrorName::InternalException => "the key manager failed to process the request".into(),
            ErrorName::DependencyTimeoutException => "the key manager did not answer in time".into(),
            _ => Cow::Owned(e.message().to_owned()),
        };
        XksError::new(name, message)
    }
}

/// XKS: `errorMessage` MUST be under 512 characters of printable ASCII (0x20-0x7e).
fn sanitize(message: Cow<'static, str>) -> Cow<'static, str> {
    if message.len() < 512 && message.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return message;
    }
    let mut out: String = message.chars().map(|c| if (' '..='~').contains(&c) { c } else { '?' }).collect();
    out.truncate(511);
    Cow::Owned(out)
}

impl IntoResponse for XksError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"errorName": self.name.as_str(), "errorMessage": self.message});
        let mut resp = (self.name.status(), body.to_string()).into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmsgate_core::KeyState;

    /// Every core kind has a deliberate XKS form; a kind added to core without one here fails this test.
    #[test]
    fn every_core_kind_maps_to_its_xks_error() {
        use ErrorName::*;
        let expected = |k: ErrorKind| -> Option<(ErrorName, u16)> {
            Some(match k {
                ErrorKind::InvalidRequest => (ValidationException, 400),
                ErrorKind::UnknownOperation => (InvalidUriPathException, 404),
                ErrorKind::AuthenticationFailed => (AuthenticationFailedException, 401),
                ErrorKind::RequestTimeSkewed => (AuthenticationFailedException, 401),
                ErrorKind::AccessDenied => (AccessDeniedException, 403),
                ErrorKind::KeyNotFound => (KeyNotFoundException, 404),
                ErrorKind::AliasNotFound => (KeyNotFoundException, 404),
                ErrorKind::AlreadyExists => (InternalException, 500),
                ErrorKind::InvalidKeyState(KeyState::Enabled)
                | ErrorKind::InvalidKeyState(KeyState::Disabled)
                | ErrorKind::InvalidKeyState(KeyState::PendingDeletion)
                | ErrorKind::InvalidKeyState(KeyState::PendingImport) => (InvalidStateException, 400),
                ErrorKind::InvalidKeyUsage => (InvalidKeyUsageException, 400),
                ErrorKind::SecretNotFound
                | ErrorKind::SecretVersionNotFound
                | ErrorKind::SecretExists
                | ErrorKind::VersionConflict
                | ErrorKind::SecretExpired => (InternalException, 500),
                ErrorKind::InvalidCiphertext => (InvalidCiphertextException, 400),
                ErrorKind::Throttled => (ThrottlingException, 429),
                ErrorKind::QuotaExceeded => (ThrottlingException, 429),
                ErrorKind::Unsupported => (UnsupportedOperationException, 501),
                ErrorKind::DependencyTimeout => (DependencyTimeoutException, 503),
                ErrorKind::DependencyFailure => (InternalException, 500),
                ErrorKind::StorageFailure => (InternalException, 500),
                ErrorKind::Internal => (InternalException, 500),
                _ => return None,
            })
        };
        for &kind in ErrorKind::ALL {
            let Some((name, status)) = expected(kind) else {
                panic!("core kind {kind:?} has no decided XKS mapping: add it to error_name and to this test");
            };
            assert_eq!(error_name(kind), name, "{kind:?}");
            assert_eq!(error_name(kind).status().as_u16(), status, "{kind:?}");
        }
    }

    #[test]
    fn the_twelve_names_and_statuses_of_the_spec() {
        let table: Vec<(&str, u16)> = ErrorName::ALL.iter().map(|n| (n.as_str(), n.status().as_u16())).collect();
        assert_eq!(
            table,
            vec![
                ("ValidationException", 400),
                ("InvalidStateException", 400),
                ("InvalidCiphertextException", 400),
                ("InvalidKeyUsageException", 400),
                ("AuthenticationFailedException", 401),
                ("AccessDeniedException", 403),
                ("KeyNotFoundException", 404),
                ("InvalidUriPathException", 404),
                ("ThrottlingException", 429),
                ("UnsupportedOperationException", 501),
                ("DependencyTimeoutException", 503),
                ("InternalException", 500),
            ]
        );
    }

    #[test]
    fn messages_are_printable_ascii_under_512_and_internals_stay_hidden() {
        let e = XksError::validation(format!("bad \u{1}{}", "x".repeat(900)));
        assert!(e.message.len() < 512);
        assert!(e.message.bytes().all(|b| (0x20..=0x7e).contains(&b)));
        let core = Error::new(ErrorKind::Internal, "slot 3 of /usr/lib/softhsm.so broke");
        let x = XksError::from(core);
        assert_eq!(x.name, ErrorName::InternalException);
        assert!(!x.message.contains("softhsm"));
    }
}

//! The one mapping from core errors to gRPC statuses (docs/architecture.md's error table), with the standard
//! rich error model: a `google.rpc.Status` in `grpc-status-details-bin` carrying a `google.rpc.ErrorInfo`
//! (reason = the core kind, domain `kmsgate`) and, when the client should wait, a `google.rpc.RetryInfo`.

use kmsgate_core::{Error, ErrorKind};
use prost::Message as _;
use tonic::{Code, Status};

use crate::proto::google_rpc;

/// The `ErrorInfo.domain` of every kmsgate error.
pub const DOMAIN: &str = "kmsgate";
pub const ERROR_INFO_TYPE: &str = "type.googleapis.com/google.rpc.ErrorInfo";
pub const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// The gRPC code of a core error kind. Exhaustive on purpose: a new kind does not compile until it has one.
pub fn code_of(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidRequest | ErrorKind::InvalidCiphertext => Code::InvalidArgument,
        ErrorKind::UnknownOperation | ErrorKind::Unsupported => Code::Unimplemented,
        ErrorKind::AuthenticationFailed | ErrorKind::RequestTimeSkewed => Code::Unauthenticated,
        ErrorKind::AccessDenied => Code::PermissionDenied,
        ErrorKind::KeyNotFound
        | ErrorKind::AliasNotFound
        | ErrorKind::SecretNotFound
        | ErrorKind::SecretVersionNotFound => Code::NotFound,
        ErrorKind::AlreadyExists | ErrorKind::SecretExists => Code::AlreadyExists,
        ErrorKind::InvalidKeyState(_) | ErrorKind::InvalidKeyUsage | ErrorKind::SecretExpired => {
            Code::FailedPrecondition
        }
        ErrorKind::VersionConflict => Code::Aborted,
        ErrorKind::Throttled | ErrorKind::QuotaExceeded => Code::ResourceExhausted,
        ErrorKind::DependencyTimeout => Code::Unavailable,
        ErrorKind::DependencyFailure | ErrorKind::StorageFailure | ErrorKind::Internal => Code::Internal,
        // `ErrorKind` is non-exhaustive across crates; a kind added to core is an internal error here until it
        // is mapped: the unit test walks `ErrorKind::ALL` and panics on a kind its table does not know.
        _ => Code::Internal,
    }
}

/// The status for a core error: code, the client-safe message, and the encoded `google.rpc.Status` details.
/// The internal source is never included (the dispatcher logs it).
pub fn status_of(e: &Error) -> Status {
    let kind = e.kind();
    let code = code_of(kind);
    let mut info = google_rpc::ErrorInfo {
        reason: kind.as_str().to_owned(),
        domain: DOMAIN.to_owned(),
        metadata: Default::default(),
    };
    if let ErrorKind::InvalidKeyState(state) = kind {
        info.metadata.insert("key_state".to_owned(), state.as_str().to_owned());
    }
    for (name, value) in e.details() {
        info.metadata.insert((*name).to_owned(), value.clone());
    }
    let mut details = vec![prost_types::Any { type_url: ERROR_INFO_TYPE.to_owned(), value: info.encode_to_vec() }];
    if let Some(after) = e.retry_after() {
        let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        details[0].value = {
            let mut info = info;
            info.metadata.insert("retry_after_ms".to_owned(), ms.to_string());
            info.encode_to_vec()
        };
        let delay = prost_types::Duration {
            seconds: i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(after.subsec_nanos()).unwrap_or(0),
        };
        let retry = google_rpc::RetryInfo { retry_delay: Some(delay) };
        details.push(prost_types::Any { type_url: RETRY_INFO_TYPE.to_owned(), value: retry.encode_to_vec() });
    }
    status_with(code, e.message(), details)
}

/// A status with a `google.rpc.Status` detail block (also for errors raised by this frontend itself).
pub fn status_with(code: Code, message: &str, details: Vec<prost_types::Any>) -> Status {
    let body = google_rpc::Status { code: code as i32, message: message.to_owned(), details };
    Status::with_details(code, message, body.encode_to_vec().into())
}

/// A frontend-level error (bad grpc-timeout, missing credential...) in the same shape as core errors.
pub fn frontend_error(kind: ErrorKind, message: &'static str) -> Status {
    status_of(&Error::new(kind, message))
}

/// The status of a call whose deadline passed: DEADLINE_EXCEEDED, whatever the dependency reported.
pub fn deadline_exceeded() -> Status {
    let info = google_rpc::ErrorInfo {
        reason: "deadline_exceeded".to_owned(),
        domain: DOMAIN.to_owned(),
        metadata: Default::default(),
    };
    status_with(
        Code::DeadlineExceeded,
        "the call's deadline passed before the operation finished",
        vec![prost_types::Any { type_url: ERROR_INFO_TYPE.to_owned(), value: info.encode_to_vec() }],
    )
}

/// Decodes the `google.rpc.Status` a kmsgate status carries (for clients and tests).
pub fn decode_details(status: &Status) -> Option<(google_rpc::Status, Option<google_rpc::ErrorInfo>)> {
    let body = google_rpc::Status::decode(status.details()).ok()?;
    let info = body
        .details
        .iter()
        .find(|a| a.type_url == ERROR_INFO_TYPE)
        .and_then(|a| google_rpc::ErrorInfo::decode(a.value.as_slice()).ok());
    Some((body, info))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::time::Duration;

    use kmsgate_core::KeyState;

    use super::*;

    #[test]
    fn every_kind_has_its_code() {
        for &kind in ErrorKind::ALL {
            let expected = match kind {
                ErrorKind::InvalidRequest | ErrorKind::InvalidCiphertext => Code::InvalidArgument,
                ErrorKind::UnknownOperation | ErrorKind::Unsupported => Code::Unimplemented,
                ErrorKind::AuthenticationFailed | ErrorKind::RequestTimeSkewed => Code::Unauthenticated,
                ErrorKind::AccessDenied => Code::PermissionDenied,
                ErrorKind::KeyNotFound
                | ErrorKind::AliasNotFound
                | ErrorKind::SecretNotFound
                | ErrorKind::SecretVersionNotFound => Code::NotFound,
                ErrorKind::AlreadyExists | ErrorKind::SecretExists => Code::AlreadyExists,
                ErrorKind::InvalidKeyState(_) | ErrorKind::InvalidKeyUsage | ErrorKind::SecretExpired => {
                    Code::FailedPrecondition
                }
                ErrorKind::VersionConflict => Code::Aborted,
                ErrorKind::Throttled | ErrorKind::QuotaExceeded => Code::ResourceExhausted,
                ErrorKind::DependencyTimeout => Code::Unavailable,
                ErrorKind::DependencyFailure | ErrorKind::StorageFailure | ErrorKind::Internal => Code::Internal,
                other => panic!("unmapped kind {other:?}"),
            };
            assert_eq!(code_of(kind), expected, "{kind:?}");

            let status = status_of(&Error::new(kind, "safe message"));
            assert_eq!(status.code(), expected);
            assert_eq!(status.message(), "safe message");
            let (body, info) = decode_details(&status).expect("google.rpc.Status details");
            assert_eq!(body.code, expected as i32);
            assert_eq!(body.message, "safe message");
            let info = info.expect("ErrorInfo");
            assert_eq!((info.reason.as_str(), info.domain.as_str()), (kind.as_str(), "kmsgate"));
        }
    }

    #[test]
    fn retry_after_state_and_details_travel_in_error_info() {
        let e = Error::new(ErrorKind::Throttled, "slow down")
            .with_retry_after(Duration::from_millis(1500))
            .with_detail("limit", "10");
        let status = status_of(&e);
        let (body, info) = decode_details(&status).unwrap();
        let info = info.unwrap();
        assert_eq!(info.metadata.get("retry_after_ms").map(String::as_str), Some("1500"));
        assert_eq!(info.metadata.get("limit").map(String::as_str), Some("10"));
        let retry = body.details.iter().find(|a| a.type_url == RETRY_INFO_TYPE).unwrap();
        let retry = google_rpc::RetryInfo::decode(retry.value.as_slice()).unwrap();
        assert_eq!(retry.retry_delay, Some(prost_types::Duration { seconds: 1, nanos: 500_000_000 }));

        let status = status_of(&Error::new(ErrorKind::InvalidKeyState(KeyState::Disabled), "disabled"));
        let info = decode_details(&status).unwrap().1.unwrap();
        assert_eq!(info.metadata.get("key_state").map(String::as_str), Some("Disabled"));
        assert!(!info.metadata.contains_key("retry_after_ms"));
    }

    #[test]
    fn sources_never_reach_the_client() {
        let e = Error::storage(std::io::Error::other("password=hunter2 at db"));
        let status = status_of(&e);
        assert!(!status.message().contains("hunter2"));
        assert!(!String::from_utf8_lossy(status.details()).contains("hunter2"));
    }
}

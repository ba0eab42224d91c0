//! The error vocabulary: ScaiVault's 73 seed codes with their exact HTTP statuses, plus the two codes kmsgate
//! adds for requests that match no route (the seed has no generic 404 or 405).

use axum::http::StatusCode;

/// How a client should treat a failed request (the contract's retry classes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    Yes,
    Once,
    Rarely,
    No,
}

macro_rules! codes {
    ($($variant:ident = ($name:literal, $status:literal)),* $(,)?) => {
        /// One code of the vocabulary. Clients branch on [`ErrorCode::as_str`]; the status only gives the class.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode { $($variant),* }

        impl ErrorCode {
            /// Every code, the seed's 73 first.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $name),* }
            }

            pub fn http_status(self) -> StatusCode {
                let n: u16 = match self { $(ErrorCode::$variant => $status),* };
                StatusCode::from_u16(n).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    };
}

codes! {
    AuthenticationRequired = ("authentication_required", 401),
    TokenInvalid = ("token_invalid", 401),
    TokenExpired = ("token_expired", 401),
    TokenRevoked = ("token_revoked", 401),
    InsufficientScope = ("insufficient_scope", 403),
    AccessDenied = ("access_denied", 403),
    MfaRequired = ("mfa_required", 403),
    IpNotAllowed = ("ip_not_allowed", 403),
    TimeWindowViolation = ("time_window_violation", 403),
    TenantAccessDenied = ("tenant_access_denied", 403),
    Forbidden = ("forbidden", 403),
    InvalidRequest = ("invalid_request", 400),
    InvalidPath = ("invalid_path", 400),
    InvalidSecretType = ("invalid_secret_type", 400),
    InvalidDuration = ("invalid_duration", 400),
    InvalidCursor = ("invalid_cursor", 400),
    InvalidPolicy = ("invalid_policy", 400),
    InvalidGlob = ("invalid_glob", 400),
    InvalidRole = ("invalid_role", 400),
    InvalidConfig = ("invalid_config", 400),
    TtlExceedsMax = ("ttl_exceeds_max", 400),
    DomainNotAllowed = ("domain_not_allowed", 400),
    KeyTypeMismatch = ("key_type_mismatch", 400),
    CsrInvalid = ("csr_invalid", 400),
    WebhookUrlInvalid = ("webhook_url_invalid", 400),
    ValidationError = ("validation_error", 422),
    SecretNotFound = ("secret_not_found", 404),
    VersionNotFound = ("version_not_found", 404),
    PolicyNotFound = ("policy_not_found", 404),
    BindingNotFound = ("binding_not_found", 404),
    WebhookNotFound = ("webhook_not_found", 404),
    SubscriptionNotFound = ("subscription_not_found", 404),
    RotationPolicyNotFound = ("rotation_policy_not_found", 404),
    SecretPolicyNotFound = ("secret_policy_not_found", 404),
    CaNotFound = ("ca_not_found", 404),
    CertificateNotFound = ("certificate_not_found", 404),
    CsrNotFound = ("csr_not_found", 404),
    TrustAnchorNotFound = ("trust_anchor_not_found", 404),
    AcmeAccountNotFound = ("acme_account_not_found", 404),
    AcmeOrderNotFound = ("acme_order_not_found", 404),
    DnsProviderNotFound = ("dns_provider_not_found", 404),
    EngineNotFound = ("engine_not_found", 404),
    RoleNotFound = ("role_not_found", 404),
    LeaseNotFound = ("lease_not_found", 404),
    TenantNotFound = ("tenant_not_found", 404),
    IdentityNotFound = ("identity_not_found", 404),
    FederationBackendNotFound = ("federation_backend_not_found", 404),
    ExportNotFound = ("export_not_found", 404),
    SecretExists = ("secret_exists", 409),
    VersionConflict = ("version_conflict", 409),
    PolicyInUse = ("policy_in_use", 409),
    EngineInUse = ("engine_in_use", 409),
    CaHasCertificates = ("ca_has_certificates", 409),
    NameConflict = ("name_conflict", 409),
    BindingConflict = ("binding_conflict", 409),
    CsrAlreadyProcessed = ("csr_already_processed", 409),
    SecretExpired = ("secret_expired", 410),
    LeaseExpired = ("lease_expired", 410),
    RateLimited = ("rate_limited", 429),
    QuotaExceeded = ("quota_exceeded", 429),
    InternalError = ("internal_error", 500),
    EncryptionError = ("encryption_error", 500),
    StorageError = ("storage_error", 500),
    BackendError = ("backend_error", 502),
    BackendRateLimited = ("backend_rate_limited", 502),
    EngineUnreachable = ("engine_unreachable", 502),
    AcmeOrderFailed = ("acme_order_failed", 502),
    WebhookDeliveryFailed = ("webhook_delivery_failed", 502),
    ServiceUnavailable = ("service_unavailable", 503),
    FeatureDisabled = ("feature_disabled", 503),
    MaintenanceMode = ("maintenance_mode", 503),
    BackendTimeout = ("backend_timeout", 504),
    WebhookDeliveryTimeout = ("webhook_delivery_timeout", 504),
    // kmsgate's additions (not in the seed): a path no route serves, and a method a route does not allow.
    RouteNotFound = ("route_not_found", 404),
    MethodNotAllowed = ("method_not_allowed", 405),
}

impl ErrorCode {
    /// The seed's codes (the vocabulary clients of ScaiVault know).
    pub fn seed() -> &'static [ErrorCode] {
        &Self::ALL[..73]
    }

    pub fn retry_class(self) -> RetryClass {
        use ErrorCode as C;
        match self {
            C::RateLimited | C::ServiceUnavailable | C::MaintenanceMode | C::BackendRateLimited | C::BackendTimeout => {
                RetryClass::Yes
            }
            C::InternalError | C::StorageError | C::EncryptionError | C::BackendError | C::EngineUnreachable => {
                RetryClass::Once
            }
            C::VersionConflict => RetryClass::Rarely,
            _ => RetryClass::No,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins every seed code to its status: a rename or a status change breaks CI.
    #[test]
    fn the_73_seed_codes_and_their_statuses() {
        let expected: &[(&str, u16)] = &[
            ("authentication_required", 401),
            ("token_invalid", 401),
            ("token_expired", 401),
            ("token_revoked", 401),
            ("insufficient_scope", 403),
            ("access_denied", 403),
            ("mfa_required", 403),
            ("ip_not_allowed", 403),
            ("time_window_violation", 403),
            ("tenant_access_denied", 403),
            ("forbidden", 403),
            ("invalid_request", 400),
            ("invalid_path", 400),
            ("invalid_secret_type", 400),
            ("invalid_duration", 400),
            ("invalid_cursor", 400),
            ("invalid_policy", 400),
            ("invalid_glob", 400),
            ("invalid_role", 400),
            ("invalid_config", 400),
            ("ttl_exceeds_max", 400),
            ("domain_not_allowed", 400),
            ("key_type_mismatch", 400),
            ("csr_invalid", 400),
            ("webhook_url_invalid", 400),
            ("validation_error", 422),
            ("secret_not_found", 404),
            ("version_not_found", 404),
            ("policy_not_found", 404),
            ("binding_not_found", 404),
            ("webhook_not_found", 404),
            ("subscription_not_found", 404),
            ("rotation_policy_not_found", 404),
            ("secret_policy_not_found", 404),
            ("ca_not_found", 404),
            ("certificate_not_found", 404),
            ("csr_not_found", 404),
            ("trust_anchor_not_found", 404),
            ("acme_account_not_found", 404),
            ("acme_order_not_found", 404),
            ("dns_provider_not_found", 404),
            ("engine_not_found", 404),
            ("role_not_found", 404),
            ("lease_not_found", 404),
            ("tenant_not_found", 404),
            ("identity_not_found", 404),
            ("federation_backend_not_found", 404),
            ("export_not_found", 404),
            ("secret_exists", 409),
            ("version_conflict", 409),
            ("policy_in_use", 409),
            ("engine_in_use", 409),
            ("ca_has_certificates", 409),
            ("name_conflict", 409),
            ("binding_conflict", 409),
            ("csr_already_processed", 409),
            ("secret_expired", 410),
            ("lease_expired", 410),
            ("rate_limited", 429),
            ("quota_exceeded", 429),
            ("internal_error", 500),
            ("encryption_error", 500),
            ("storage_error", 500),
            ("backend_error", 502),
            ("backend_rate_limited", 502),
            ("engine_unreachable", 502),
            ("acme_order_failed", 502),
            ("webhook_delivery_failed", 502),
            ("service_unavailable", 503),
            ("feature_disabled", 503),
            ("maintenance_mode", 503),
            ("backend_timeout", 504),
            ("webhook_delivery_timeout", 504),
        ];
        assert_eq!(expected.len(), 73);
        let got: Vec<(&str, u16)> = ErrorCode::seed().iter().map(|c| (c.as_str(), c.http_status().as_u16())).collect();
        assert_eq!(got, expected);
        let mut names: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len(), "codes are unique");
    }

    #[test]
    fn retry_classes() {
        assert_eq!(ErrorCode::RateLimited.retry_class(), RetryClass::Yes);
        assert_eq!(ErrorCode::StorageError.retry_class(), RetryClass::Once);
        assert_eq!(ErrorCode::VersionConflict.retry_class(), RetryClass::Rarely);
        assert_eq!(ErrorCode::SecretExists.retry_class(), RetryClass::No);
        assert_eq!(ErrorCode::PolicyInUse.retry_class(), RetryClass::No);
    }
}

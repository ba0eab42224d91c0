//! Audit events: one per operation, never carrying plaintext, secret values, AAD or credentials.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::model::{Frontend, Timestamp};

/// Every operation the dispatcher performs, named once for audit, policy, rate limits and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "PascalCase")]
#[non_exhaustive]
pub enum Operation {
    CreateKey,
    DescribeKey,
    ListKeys,
    EnableKey,
    DisableKey,
    ScheduleKeyDeletion,
    CancelKeyDeletion,
    RotateKey,
    UpdateKeyDescription,
    CreateAlias,
    UpdateAlias,
    DeleteAlias,
    ListAliases,
    Encrypt,
    Decrypt,
    GenerateDataKey,
    Sign,
    Verify,
    GetPublicKey,
    GenerateRandom,
    Hmac,
    VerifyHmac,
    Health,
    PurgeKey,
    PutDocument,
    DeleteDocument,
    CreateSecret,
    PutSecretValue,
    GetSecretValue,
    DescribeSecret,
    ListSecrets,
    UpdateSecret,
    DeleteSecret,
    RestoreSecret,
    RollbackSecret,
    UpdateSecretVersionStage,
    PurgeSecret,
    /// A request a frontend refused before any operation ran: authentication, tenant or authorization failed
    /// (the secrets REST API's 401s and 403s). The outcome names the wire code.
    AccessCheck,
    ImportKeyMaterial,
    DeleteKeyMaterial,
    TagKey,
}

impl Operation {
    /// Every operation, in declaration order: metrics index their series by it.
    pub const ALL: &'static [Operation] = &[
        Operation::CreateKey,
        Operation::DescribeKey,
        Operation::ListKeys,
        Operation::EnableKey,
        Operation::DisableKey,
        Operation::ScheduleKeyDeletion,
        Operation::CancelKeyDeletion,
        Operation::RotateKey,
        Operation::UpdateKeyDescription,
        Operation::CreateAlias,
        Operation::UpdateAlias,
        Operation::DeleteAlias,
        Operation::ListAliases,
        Operation::Encrypt,
        Operation::Decrypt,
        Operation::GenerateDataKey,
        Operation::Sign,
        Operation::Verify,
        Operation::GetPublicKey,
        Operation::GenerateRandom,
        Operation::Hmac,
        Operation::VerifyHmac,
        Operation::Health,
        Operation::PurgeKey,
        Operation::PutDocument,
        Operation::DeleteDocument,
        Operation::CreateSecret,
        Operation::PutSecretValue,
        Operation::GetSecretValue,
        Operation::DescribeSecret,
        Operation::ListSecrets,
        Operation::UpdateSecret,
        Operation::DeleteSecret,
        Operation::RestoreSecret,
        Operation::RollbackSecret,
        Operation::UpdateSecretVersionStage,
        Operation::PurgeSecret,
        Operation::AccessCheck,
        Operation::ImportKeyMaterial,
        Operation::DeleteKeyMaterial,
        Operation::TagKey,
    ];

    /// The position in [`Operation::ALL`]. An exhaustive match, so a new operation cannot compile without a
    /// place in the metrics.
    pub const fn index(self) -> usize {
        match self {
            Operation::CreateKey => 0,
            Operation::DescribeKey => 1,
            Operation::ListKeys => 2,
            Operation::EnableKey => 3,
            Operation::DisableKey => 4,
            Operation::ScheduleKeyDeletion => 5,
            Operation::CancelKeyDeletion => 6,
            Operation::RotateKey => 7,
            Operation::UpdateKeyDescription => 8,
            Operation::CreateAlias => 9,
            Operation::UpdateAlias => 10,
            Operation::DeleteAlias => 11,
            Operation::ListAliases => 12,
            Operation::Encrypt => 13,
            Operation::Decrypt => 14,
            Operation::GenerateDataKey => 15,
            Operation::Sign => 16,
            Operation::Verify => 17,
            Operation::GetPublicKey => 18,
            Operation::GenerateRandom => 19,
            Operation::Hmac => 20,
            Operation::VerifyHmac => 21,
            Operation::Health => 22,
            Operation::PurgeKey => 23,
            Operation::PutDocument => 24,
            Operation::DeleteDocument => 25,
            Operation::CreateSecret => 26,
            Operation::PutSecretValue => 27,
            Operation::GetSecretValue => 28,
            Operation::DescribeSecret => 29,
            Operation::ListSecrets => 30,
            Operation::UpdateSecret => 31,
            Operation::DeleteSecret => 32,
            Operation::RestoreSecret => 33,
            Operation::RollbackSecret => 34,
            Operation::UpdateSecretVersionStage => 35,
            Operation::PurgeSecret => 36,
            Operation::AccessCheck => 37,
            Operation::ImportKeyMaterial => 38,
            Operation::DeleteKeyMaterial => 39,
            Operation::TagKey => 40,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::CreateKey => "CreateKey",
            Operation::DescribeKey => "DescribeKey",
            Operation::ListKeys => "ListKeys",
            Operation::EnableKey => "EnableKey",
            Operation::DisableKey => "DisableKey",
            Operation::ScheduleKeyDeletion => "ScheduleKeyDeletion",
            Operation::CancelKeyDeletion => "CancelKeyDeletion",
            Operation::RotateKey => "RotateKey",
            Operation::UpdateKeyDescription => "UpdateKeyDescription",
            Operation::CreateAlias => "CreateAlias",
            Operation::UpdateAlias => "UpdateAlias",
            Operation::DeleteAlias => "DeleteAlias",
            Operation::ListAliases => "ListAliases",
            Operation::Encrypt => "Encrypt",
            Operation::Decrypt => "Decrypt",
            Operation::GenerateDataKey => "GenerateDataKey",
            Operation::Sign => "Sign",
            Operation::Verify => "Verify",
            Operation::GetPublicKey => "GetPublicKey",
            Operation::GenerateRandom => "GenerateRandom",
            Operation::Hmac => "Hmac",
            Operation::VerifyHmac => "VerifyHmac",
            Operation::Health => "Health",
            Operation::PurgeKey => "PurgeKey",
            Operation::PutDocument => "PutDocument",
            Operation::DeleteDocument => "DeleteDocument",
            Operation::CreateSecret => "CreateSecret",
            Operation::PutSecretValue => "PutSecretValue",
            Operation::GetSecretValue => "GetSecretValue",
            Operation::DescribeSecret => "DescribeSecret",
            Operation::ListSecrets => "ListSecrets",
            Operation::UpdateSecret => "UpdateSecret",
            Operation::DeleteSecret => "DeleteSecret",
            Operation::RestoreSecret => "RestoreSecret",
            Operation::RollbackSecret => "RollbackSecret",
            Operation::UpdateSecretVersionStage => "UpdateSecretVersionStage",
            Operation::PurgeSecret => "PurgeSecret",
            Operation::AccessCheck => "AccessCheck",
            Operation::ImportKeyMaterial => "ImportKeyMaterial",
            Operation::DeleteKeyMaterial => "DeleteKeyMaterial",
            Operation::TagKey => "TagKey",
        }
    }

    /// Whether the operation changes state (admin changes are audited as such).
    pub fn is_mutation(self) -> bool {
        matches!(
            self,
            Operation::CreateKey
                | Operation::EnableKey
                | Operation::DisableKey
                | Operation::ScheduleKeyDeletion
                | Operation::CancelKeyDeletion
                | Operation::RotateKey
                | Operation::UpdateKeyDescription
                | Operation::CreateAlias
                | Operation::UpdateAlias
                | Operation::DeleteAlias
                | Operation::PurgeKey
                | Operation::PutDocument
                | Operation::DeleteDocument
                | Operation::CreateSecret
                | Operation::PutSecretValue
                | Operation::UpdateSecret
                | Operation::DeleteSecret
                | Operation::RestoreSecret
                | Operation::RollbackSecret
                | Operation::UpdateSecretVersionStage
                | Operation::PurgeSecret
                | Operation::ImportKeyMaterial
                | Operation::DeleteKeyMaterial
                | Operation::TagKey
        )
    }
}

/// The outcome of one operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Error { kind: &'static str },
}

/// One audit record.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    pub at: Timestamp,
    pub request_id: String,
    pub tenant: String,
    pub identity: String,
    pub frontend: Frontend,
    pub operation: Operation,
    /// Key id, alias or secret path the operation touched (never a value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    pub outcome: Outcome,
    pub latency_us: u64,
    /// Caller metadata (e.g. XKS kmsOperation, awsPrincipalArn). Never secrets.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// Where audit events go. `record` must not block: buffer and hand off.
pub trait AuditSink: Send + Sync + fmt::Debug {
    fn record(&self, event: &AuditEvent);

    /// Whether `record` keeps events at all right now. The dispatcher asks before every operation and builds
    /// no event when the answer is no, so a sink that discards events costs nothing per operation. Must be
    /// cheap and must not block.
    fn enabled(&self) -> bool {
        true
    }
}

/// Writes each event as one structured `tracing` event on the `audit` target.
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingAuditSink;

impl AuditSink for TracingAuditSink {
    /// Whether the `audit` target is logged at info: with a stricter log filter (`KMSGATE_LOG=warn`), every
    /// event would be serialised only to be dropped.
    fn enabled(&self) -> bool {
        tracing::enabled!(target: "audit", tracing::Level::INFO)
    }

    fn record(&self, event: &AuditEvent) {
        if !self.enabled() {
            return;
        }
        match serde_json::to_string(event) {
            Ok(line) => tracing::info!(target: "audit", event = %line),
            Err(e) => tracing::error!(target: "audit", error = %e, "could not serialise an audit event"),
        }
    }
}

/// Keeps events in memory; for tests and for the CLI's own summary.
#[derive(Debug, Default)]
pub struct MemoryAuditSink {
    events: std::sync::Mutex<Vec<AuditEvent>>,
}

impl MemoryAuditSink {
    pub fn events(&self) -> Vec<AuditEvent> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl AuditSink for MemoryAuditSink {
    fn record(&self, event: &AuditEvent) {
        if let Ok(mut e) = self.events.lock() {
            e.push(event.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A subscriber that takes events up to `max` and counts the audit events it sees.
    struct Levelled {
        max: tracing::Level,
        seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl tracing::Subscriber for Levelled {
        fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
            *m.level() <= self.max
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, e: &tracing::Event<'_>) {
            if e.metadata().target() == "audit" {
                self.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    fn event() -> AuditEvent {
        AuditEvent {
            at: Timestamp(0),
            request_id: "r".to_owned(),
            tenant: "t".to_owned(),
            identity: "i".to_owned(),
            frontend: Frontend::Xks,
            operation: Operation::Encrypt,
            resource: None,
            outcome: Outcome::Ok,
            latency_us: 1,
            metadata: BTreeMap::new(),
        }
    }

    #[test]
    fn the_tracing_sink_is_enabled_exactly_when_audit_info_is_logged() {
        for (max, on) in [(tracing::Level::INFO, true), (tracing::Level::DEBUG, true), (tracing::Level::WARN, false)] {
            let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let sub = Levelled { max, seen: seen.clone() };
            tracing::subscriber::with_default(sub, || {
                assert_eq!(TracingAuditSink.enabled(), on, "{max}");
                TracingAuditSink.record(&event());
            });
            assert_eq!(seen.load(std::sync::atomic::Ordering::Relaxed), usize::from(on), "{max}");
        }
        // Sinks that keep everything say so by default.
        assert!(MemoryAuditSink::default().enabled());
    }
}

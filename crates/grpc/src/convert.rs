//! Core model ↔ kmsgate.v1 messages. Parsing of client input lives here too, so every handler reports bad
//! input the same way (INVALID_ARGUMENT with the core's message).

use kmsgate_core::backend::{EncryptionAlgorithm, HealthStatus, SigningAlgorithm};
use kmsgate_core::{
    AliasEntry, AliasName, Error, Key, KeyOrigin, KeyRef, KeySpec, KeyState, KeyUsage, KeyUsageSet, PageRequest,
    Result, Secret, SecretVersionInfo, Timestamp,
};
use uuid::Uuid;

use crate::proto::kmsgate_v1 as pb;

pub fn ts(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.0.div_euclid(1000),
        nanos: i32::try_from(t.0.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

pub fn from_ts(t: &prost_types::Timestamp) -> Result<Timestamp> {
    let ms = t
        .seconds
        .checked_mul(1000)
        .and_then(|s| s.checked_add(i64::from(t.nanos) / 1_000_000))
        .filter(|_| (0..1_000_000_000).contains(&t.nanos))
        .ok_or_else(|| Error::invalid("the timestamp is out of range"))?;
    Ok(Timestamp(ms))
}

pub fn key_ref(s: &str) -> Result<KeyRef> {
    if s.is_empty() {
        return Err(Error::invalid("key_id is required (a key id or alias/...)"));
    }
    KeyRef::parse(s)
}

pub fn alias(s: &str) -> Result<AliasName> {
    if s.is_empty() {
        return Err(Error::invalid("alias is required (alias/...)"));
    }
    AliasName::parse(s)
}

/// An optional key version: empty means the primary.
pub fn version(s: &str) -> Result<Option<Uuid>> {
    if s.is_empty() {
        return Ok(None);
    }
    Uuid::parse_str(s).map(Some).map_err(|_| Error::invalid("key_version is not a version id"))
}

pub fn page(size: u32, token: String) -> PageRequest {
    PageRequest { after: (!token.is_empty()).then_some(token), limit: if size == 0 { 100 } else { size } }
}

pub fn spec_from(v: i32) -> Result<KeySpec> {
    Ok(match pb::KeySpec::try_from(v).unwrap_or(pb::KeySpec::Unspecified) {
        pb::KeySpec::Aes256 => KeySpec::Aes256,
        pb::KeySpec::Rsa2048 => KeySpec::Rsa2048,
        pb::KeySpec::Rsa3072 => KeySpec::Rsa3072,
        pb::KeySpec::EcP256 => KeySpec::EcP256,
        pb::KeySpec::Hmac256 => KeySpec::Hmac256,
        pb::KeySpec::Unspecified => return Err(Error::invalid("spec is required")),
    })
}

pub fn spec_to(s: KeySpec) -> pb::KeySpec {
    match s {
        KeySpec::Aes256 => pb::KeySpec::Aes256,
        KeySpec::Rsa2048 => pb::KeySpec::Rsa2048,
        KeySpec::Rsa3072 => pb::KeySpec::Rsa3072,
        KeySpec::EcP256 => pb::KeySpec::EcP256,
        KeySpec::Hmac256 => pb::KeySpec::Hmac256,
    }
}

pub fn usage_from(v: i32) -> Result<KeyUsage> {
    Ok(match pb::KeyUsage::try_from(v).unwrap_or(pb::KeyUsage::Unspecified) {
        pb::KeyUsage::Encrypt => KeyUsage::Encrypt,
        pb::KeyUsage::Decrypt => KeyUsage::Decrypt,
        pb::KeyUsage::Sign => KeyUsage::Sign,
        pb::KeyUsage::Verify => KeyUsage::Verify,
        pb::KeyUsage::GenerateMac => KeyUsage::GenerateMac,
        pb::KeyUsage::VerifyMac => KeyUsage::VerifyMac,
        pb::KeyUsage::Wrap => KeyUsage::Wrap,
        pb::KeyUsage::Unwrap => KeyUsage::Unwrap,
        pb::KeyUsage::Unspecified => return Err(Error::invalid("unknown key usage")),
    })
}

fn usage_to(u: KeyUsage) -> pb::KeyUsage {
    match u {
        KeyUsage::Encrypt => pb::KeyUsage::Encrypt,
        KeyUsage::Decrypt => pb::KeyUsage::Decrypt,
        KeyUsage::Sign => pb::KeyUsage::Sign,
        KeyUsage::Verify => pb::KeyUsage::Verify,
        KeyUsage::GenerateMac => pb::KeyUsage::GenerateMac,
        KeyUsage::VerifyMac => pb::KeyUsage::VerifyMac,
        KeyUsage::Wrap => pb::KeyUsage::Wrap,
        KeyUsage::Unwrap => pb::KeyUsage::Unwrap,
    }
}

pub fn usages_from(u: &pb::KeyUsages) -> Result<KeyUsageSet> {
    let list = u.usages.iter().map(|v| usage_from(*v)).collect::<Result<Vec<_>>>()?;
    Ok(KeyUsageSet::of(&list))
}

fn state_to(s: KeyState) -> pb::KeyState {
    match s {
        KeyState::Enabled => pb::KeyState::Enabled,
        KeyState::Disabled => pb::KeyState::Disabled,
        KeyState::PendingDeletion => pb::KeyState::PendingDeletion,
        KeyState::PendingImport => pb::KeyState::PendingImport,
    }
}

fn origin_to(o: KeyOrigin) -> pb::KeyOrigin {
    match o {
        KeyOrigin::Generated => pb::KeyOrigin::Generated,
        KeyOrigin::External => pb::KeyOrigin::External,
        KeyOrigin::Adopted => pb::KeyOrigin::Adopted,
    }
}

pub fn enc_alg_from(v: i32) -> Result<Option<EncryptionAlgorithm>> {
    match pb::EncryptionAlgorithm::try_from(v) {
        Ok(pb::EncryptionAlgorithm::Unspecified) => Ok(None),
        Ok(pb::EncryptionAlgorithm::Aes256Gcm) => Ok(Some(EncryptionAlgorithm::AesGcm)),
        Ok(pb::EncryptionAlgorithm::RsaOaepSha256) => Ok(Some(EncryptionAlgorithm::RsaOaepSha256)),
        Err(_) => Err(Error::invalid("unknown encryption algorithm")),
    }
}

pub fn enc_alg_to(a: EncryptionAlgorithm) -> pb::EncryptionAlgorithm {
    match a {
        EncryptionAlgorithm::AesGcm => pb::EncryptionAlgorithm::Aes256Gcm,
        EncryptionAlgorithm::RsaOaepSha256 => pb::EncryptionAlgorithm::RsaOaepSha256,
        // The unauthenticated block modes exist for the Alibaba API; this API never asks for them, so no reply
        // of it carries one.
        EncryptionAlgorithm::AesCbc(_) | EncryptionAlgorithm::AesEcb(_) => pb::EncryptionAlgorithm::Unspecified,
    }
}

pub fn sign_alg_from(v: i32) -> Result<SigningAlgorithm> {
    match pb::SigningAlgorithm::try_from(v) {
        Ok(pb::SigningAlgorithm::RsaPkcs1Sha256) => Ok(SigningAlgorithm::RsaPkcs1Sha256),
        Ok(pb::SigningAlgorithm::RsaPssSha256) => Ok(SigningAlgorithm::RsaPssSha256),
        Ok(pb::SigningAlgorithm::EcdsaSha256) => Ok(SigningAlgorithm::EcdsaSha256),
        Ok(pb::SigningAlgorithm::Unspecified) => Err(Error::invalid("algorithm is required")),
        Err(_) => Err(Error::invalid("unknown signing algorithm")),
    }
}

pub fn key_to(k: &Key) -> pb::Key {
    pb::Key {
        key_id: k.id.to_string(),
        spec: spec_to(k.spec) as i32,
        usages: k.usage.iter().map(|u| usage_to(u) as i32).collect(),
        state: state_to(k.state) as i32,
        origin: origin_to(k.origin) as i32,
        description: k.description.clone(),
        tags: k.tags.clone().into_iter().collect(),
        primary_version: k.primary_version.to_string(),
        versions: k
            .versions
            .iter()
            .map(|v| pb::KeyVersion {
                version_id: v.id.to_string(),
                created_at: Some(ts(v.created_at)),
                backend: v.handle.backend.clone(),
            })
            .collect(),
        created_at: Some(ts(k.created_at)),
        updated_at: Some(ts(k.updated_at)),
        deletion_at: k.deletion_at.map(ts),
    }
}

pub fn alias_to(a: &AliasEntry) -> pb::Alias {
    pb::Alias {
        alias: a.alias.to_string(),
        key_id: a.key_id.to_string(),
        created_at: Some(ts(a.created_at)),
        updated_at: Some(ts(a.updated_at)),
    }
}

pub fn health_status(s: HealthStatus) -> &'static str {
    match s {
        HealthStatus::Active => "ok",
        HealthStatus::Degraded => "degraded",
        HealthStatus::Unavailable => "unavailable",
    }
}

pub fn secret_version_to(v: &SecretVersionInfo) -> pb::SecretVersion {
    pb::SecretVersion {
        version: v.version,
        version_id: v.version_id.clone(),
        stages: v.stages.clone(),
        created_at: Some(ts(v.created_at)),
        created_by: v.created_by.clone(),
    }
}

pub fn secret_to(s: &Secret) -> pb::Secret {
    pb::Secret {
        path: s.path.to_string(),
        secret_type: s.secret_type.clone(),
        metadata_json: s.metadata.to_string(),
        max_versions: s.max_versions,
        current_version: s.current_version,
        latest_version: s.latest_version,
        versions: s.versions.iter().map(secret_version_to).collect(),
        created_at: Some(ts(s.created_at)),
        updated_at: Some(ts(s.updated_at)),
        expires_at: s.expires_at.map(ts),
        deleted_at: s.deleted_at.map(ts),
        recoverable_until: s.recoverable_until.map(ts),
    }
}

/// A DER SubjectPublicKeyInfo as PEM.
pub fn pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END PUBLIC KEY-----\n");
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        for ms in [0, 1, 999, 1_700_000_000_123, -1] {
            assert_eq!(from_ts(&ts(Timestamp(ms))).unwrap(), Timestamp(ms));
        }
        assert!(from_ts(&prost_types::Timestamp { seconds: 1, nanos: -1 }).is_err());
    }

    #[test]
    fn enums_map_both_ways() {
        for s in KeySpec::ALL {
            assert_eq!(spec_from(spec_to(s) as i32).unwrap(), s);
        }
        for u in KeyUsage::ALL {
            assert_eq!(usage_from(usage_to(u) as i32).unwrap(), u);
        }
        assert!(spec_from(0).is_err() && spec_from(99).is_err());
        assert!(usage_from(0).is_err());
        assert_eq!(enc_alg_from(0).unwrap(), None);
        assert!(enc_alg_from(9).is_err() && sign_alg_from(0).is_err());
    }
}

//! The domain model shared by every frontend, backend and store.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};

/// Milliseconds since the Unix epoch. Stores keep it as a 64-bit integer on every database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        Timestamp(i64::try_from(ms).unwrap_or(i64::MAX))
    }

    pub fn plus_days(self, days: u32) -> Self {
        Timestamp(self.0.saturating_add(i64::from(days) * 86_400_000))
    }

    /// RFC 3339 in UTC with second precision, as the vendor APIs print dates.
    pub fn to_rfc3339(self) -> String {
        let nanos = i128::from(self.0) * 1_000_000;
        match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
            Ok(t) => {
                let t = t.replace_nanosecond(0).unwrap_or(t);
                t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
            }
            Err(_) => String::new(),
        }
    }
}

macro_rules! string_newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::parse(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self> {
                Self::parse(&s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
    };
}

fn check_chars(s: &str, min: usize, max: usize, allowed: impl Fn(u8) -> bool, what: &str) -> Result<()> {
    if s.len() < min || s.len() > max || !s.bytes().all(allowed) {
        return Err(Error::invalid(format!("{what} must be {min}-{max} characters of the allowed set")));
    }
    Ok(())
}

string_newtype!(
    /// A tenant name: 1-64 characters of `a-z 0-9 - _`.
    TenantId
);

impl TenantId {
    pub fn parse(s: &str) -> Result<Self> {
        check_chars(s, 1, 64, |b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_', "tenant")?;
        Ok(Self(s.to_owned()))
    }

    /// The tenant the embedded default creates and every frontend falls back to when not told otherwise.
    pub fn default_tenant() -> Self {
        Self("default".to_owned())
    }
}

string_newtype!(
    /// A key id: 1-128 characters of `A-Z a-z 0-9 - . _` (the XKS externalKeyId alphabet). Generated ids are
    /// UUIDs; adopted or imported keys may carry their own.
    KeyId
);

impl KeyId {
    pub fn parse(s: &str) -> Result<Self> {
        check_chars(s, 1, 128, |b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'), "key id")?;
        Ok(Self(s.to_owned()))
    }

    pub fn generate() -> Self {
        Self(Uuid::new_v4().to_string())
    }
}

string_newtype!(
    /// An alias: `alias/` followed by 1-250 characters of `A-Z a-z 0-9 / _ - :`.
    AliasName
);

impl AliasName {
    pub const PREFIX: &'static str = "alias/";
    /// The namespace of the gateway's own keys' aliases (see [`Key::internal`]). Parsing accepts it, so the
    /// gateway can name them, but the dispatcher refuses every caller who creates, moves, deletes or resolves
    /// an alias in it.
    pub const INTERNAL_PREFIX: &'static str = "alias/kmsgate-internal/";

    /// Whether the alias is in the gateway's reserved [`AliasName::INTERNAL_PREFIX`] namespace.
    pub fn is_internal(&self) -> bool {
        self.0.starts_with(Self::INTERNAL_PREFIX)
    }

    pub fn parse(s: &str) -> Result<Self> {
        let Some(rest) = s.strip_prefix(Self::PREFIX) else {
            return Err(Error::invalid("an alias must start with alias/"));
        };
        check_chars(
            rest,
            1,
            250,
            |b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b':'),
            "alias name",
        )?;
        if rest.starts_with("acs/") || rest.starts_with("aws/") {
            return Err(Error::invalid("aliases under alias/acs/ and alias/aws/ are reserved"));
        }
        Ok(Self(s.to_owned()))
    }
}

/// How a caller names a key: by id or by alias.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyRef {
    Id(KeyId),
    Alias(AliasName),
}

impl KeyRef {
    pub fn parse(s: &str) -> Result<Self> {
        if s.starts_with(AliasName::PREFIX) {
            AliasName::parse(s).map(KeyRef::Alias)
        } else {
            KeyId::parse(s).map(KeyRef::Id)
        }
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyRef::Id(id) => id.fmt(f),
            KeyRef::Alias(a) => a.fmt(f),
        }
    }
}

/// What kind of key material a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeySpec {
    #[serde(rename = "AES_256")]
    Aes256,
    #[serde(rename = "RSA_2048")]
    Rsa2048,
    #[serde(rename = "RSA_3072")]
    Rsa3072,
    #[serde(rename = "EC_P256")]
    EcP256,
    #[serde(rename = "HMAC_256")]
    Hmac256,
}

impl KeySpec {
    pub const ALL: [KeySpec; 5] =
        [KeySpec::Aes256, KeySpec::Rsa2048, KeySpec::Rsa3072, KeySpec::EcP256, KeySpec::Hmac256];

    pub fn as_str(self) -> &'static str {
        match self {
            KeySpec::Aes256 => "AES_256",
            KeySpec::Rsa2048 => "RSA_2048",
            KeySpec::Rsa3072 => "RSA_3072",
            KeySpec::EcP256 => "EC_P256",
            KeySpec::Hmac256 => "HMAC_256",
        }
    }

    pub fn is_symmetric(self) -> bool {
        matches!(self, KeySpec::Aes256 | KeySpec::Hmac256)
    }

    pub fn is_rsa(self) -> bool {
        matches!(self, KeySpec::Rsa2048 | KeySpec::Rsa3072)
    }

    /// The usages this spec can ever carry; a key's usage set must be a subset.
    pub fn allowed_usages(self) -> KeyUsageSet {
        use KeyUsage::*;
        match self {
            KeySpec::Aes256 => KeyUsageSet::of(&[Encrypt, Decrypt, Wrap, Unwrap]),
            KeySpec::Rsa2048 | KeySpec::Rsa3072 => KeyUsageSet::of(&[Encrypt, Decrypt, Sign, Verify, Wrap, Unwrap]),
            KeySpec::EcP256 => KeyUsageSet::of(&[Sign, Verify]),
            KeySpec::Hmac256 => KeyUsageSet::of(&[GenerateMac, VerifyMac]),
        }
    }

    /// The usages a key of this spec gets when the caller does not choose.
    pub fn default_usages(self) -> KeyUsageSet {
        use KeyUsage::*;
        match self {
            KeySpec::Aes256 => KeyUsageSet::of(&[Encrypt, Decrypt]),
            KeySpec::Rsa2048 | KeySpec::Rsa3072 | KeySpec::EcP256 => KeyUsageSet::of(&[Sign, Verify]),
            KeySpec::Hmac256 => KeyUsageSet::of(&[GenerateMac, VerifyMac]),
        }
    }
}

impl FromStr for KeySpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let norm = s.trim().to_ascii_uppercase().replace('-', "_");
        Ok(match norm.as_str() {
            "AES_256" | "AES256" | "SYMMETRIC_DEFAULT" | "ALIYUN_AES_256" => KeySpec::Aes256,
            "RSA_2048" | "RSA2048" => KeySpec::Rsa2048,
            "RSA_3072" | "RSA3072" => KeySpec::Rsa3072,
            "EC_P256" | "ECC_NIST_P256" | "EC_NIST_P256" | "P256" => KeySpec::EcP256,
            "HMAC_256" | "HMAC_SHA_256" => KeySpec::Hmac256,
            _ => return Err(Error::invalid("unknown key spec; use AES_256, RSA_2048, RSA_3072, EC_P256 or HMAC_256")),
        })
    }
}

impl fmt::Display for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing a key may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum KeyUsage {
    Encrypt,
    Decrypt,
    Sign,
    Verify,
    GenerateMac,
    VerifyMac,
    Wrap,
    Unwrap,
}

impl KeyUsage {
    pub const ALL: [KeyUsage; 8] = [
        KeyUsage::Encrypt,
        KeyUsage::Decrypt,
        KeyUsage::Sign,
        KeyUsage::Verify,
        KeyUsage::GenerateMac,
        KeyUsage::VerifyMac,
        KeyUsage::Wrap,
        KeyUsage::Unwrap,
    ];

    fn bit(self) -> u16 {
        1 << (self as u16)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyUsage::Encrypt => "ENCRYPT",
            KeyUsage::Decrypt => "DECRYPT",
            KeyUsage::Sign => "SIGN",
            KeyUsage::Verify => "VERIFY",
            KeyUsage::GenerateMac => "GENERATE_MAC",
            KeyUsage::VerifyMac => "VERIFY_MAC",
            KeyUsage::Wrap => "WRAP",
            KeyUsage::Unwrap => "UNWRAP",
        }
    }
}

impl FromStr for KeyUsage {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let norm = s.trim().to_ascii_uppercase().replace('-', "_");
        KeyUsage::ALL.into_iter().find(|u| u.as_str() == norm).ok_or_else(|| Error::invalid("unknown key usage"))
    }
}

/// A set of usages; any subset is valid, including the empty set.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct KeyUsageSet(u16);

impl KeyUsageSet {
    pub const NONE: KeyUsageSet = KeyUsageSet(0);

    pub fn of(usages: &[KeyUsage]) -> Self {
        KeyUsageSet(usages.iter().fold(0, |acc, u| acc | u.bit()))
    }

    pub fn contains(self, usage: KeyUsage) -> bool {
        self.0 & usage.bit() != 0
    }

    pub fn is_subset_of(self, other: KeyUsageSet) -> bool {
        self.0 & !other.0 == 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = KeyUsage> {
        KeyUsage::ALL.into_iter().filter(move |u| self.contains(*u))
    }

    /// Parses a comma-separated list (`encrypt,decrypt`); `none` or an empty string is the empty set.
    pub fn parse_list(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("none") {
            return Ok(KeyUsageSet::NONE);
        }
        let usages = s.split(',').map(str::parse).collect::<Result<Vec<KeyUsage>>>()?;
        Ok(KeyUsageSet::of(&usages))
    }
}

impl fmt::Debug for KeyUsageSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl Serialize for KeyUsageSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for KeyUsageSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Vec::<KeyUsage>::deserialize(d)?;
        Ok(KeyUsageSet::of(&v))
    }
}

/// The lifecycle state of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyState {
    Enabled,
    Disabled,
    PendingDeletion,
    PendingImport,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Enabled => "Enabled",
            KeyState::Disabled => "Disabled",
            KeyState::PendingDeletion => "PendingDeletion",
            KeyState::PendingImport => "PendingImport",
        }
    }
}

/// Where a key's material came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyOrigin {
    /// Generated by a kmsgate backend.
    Generated,
    /// Material imported by the customer.
    External,
    /// An existing HSM object adopted by label or id.
    Adopted,
}

/// Where a key version's material lives: the backend name (a fleet member) and that backend's opaque handle
/// (wrapped material for the software backend; object label/id for PKCS#11).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendHandle {
    pub backend: String,
    #[serde(with = "b64")]
    pub handle: Vec<u8>,
}

impl fmt::Debug for BackendHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The handle can be wrapped key material: never print it.
        f.debug_struct("BackendHandle").field("backend", &self.backend).field("handle_len", &self.handle.len()).finish()
    }
}

/// One version of a key's material. Rotation adds a version and makes it primary; old versions still decrypt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVersion {
    pub id: Uuid,
    pub created_at: Timestamp,
    pub handle: BackendHandle,
}

/// A key and everything the dispatcher needs to decide whether and how to use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    pub id: KeyId,
    pub tenant: TenantId,
    pub spec: KeySpec,
    pub usage: KeyUsageSet,
    pub state: KeyState,
    pub origin: KeyOrigin,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub versions: Vec<KeyVersion>,
    pub primary_version: Uuid,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// When a key pending deletion is destroyed.
    #[serde(default)]
    pub deletion_at: Option<Timestamp>,
    /// Optimistic-concurrency counter maintained by the store.
    #[serde(default)]
    pub revision: i64,
    /// A key the gateway made for itself (credential sealing, secret data keys, XKS health probes). Only the
    /// dispatcher's own paths use it; to every caller it does not exist. Set at creation, never by a caller.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub internal: bool,
}

impl Key {
    /// Description prefix of the gateway's internal keys; older versions marked them by it alone, so callers
    /// may not give a key a description starting with it.
    pub const INTERNAL_DESCRIPTION_PREFIX: &'static str = "kmsgate internal:";

    /// Whether the key is the gateway's own: flagged, or made by an older version (which marked its internal
    /// keys only by their description, which callers can no longer set or change on any key).
    pub fn is_internal(&self) -> bool {
        self.internal || self.description.starts_with(Self::INTERNAL_DESCRIPTION_PREFIX)
    }

    pub fn primary(&self) -> Result<&KeyVersion> {
        self.version(self.primary_version).ok_or_else(|| Error::internal("the key's primary version is missing"))
    }

    pub fn version(&self, id: Uuid) -> Option<&KeyVersion> {
        self.versions.iter().find(|v| v.id == id)
    }
}

/// Which protocol a caller arrived through; audit and metrics carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Frontend {
    Admin,
    Xks,
    AlibabaInstance,
    AlibabaOpenApi,
    Secrets,
    Grpc,
    KubernetesKms,
}

impl Frontend {
    /// Every frontend, in declaration order: metrics index their series by it.
    pub const ALL: &'static [Frontend] = &[
        Frontend::Admin,
        Frontend::Xks,
        Frontend::AlibabaInstance,
        Frontend::AlibabaOpenApi,
        Frontend::Secrets,
        Frontend::Grpc,
        Frontend::KubernetesKms,
    ];

    /// The position in [`Frontend::ALL`] (exhaustive: a new frontend needs its place).
    pub const fn index(self) -> usize {
        match self {
            Frontend::Admin => 0,
            Frontend::Xks => 1,
            Frontend::AlibabaInstance => 2,
            Frontend::AlibabaOpenApi => 3,
            Frontend::Secrets => 4,
            Frontend::Grpc => 5,
            Frontend::KubernetesKms => 6,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Frontend::Admin => "admin",
            Frontend::Xks => "xks",
            Frontend::AlibabaInstance => "alibaba_instance",
            Frontend::AlibabaOpenApi => "alibaba_openapi",
            Frontend::Secrets => "secrets",
            Frontend::Grpc => "grpc",
            Frontend::KubernetesKms => "kubernetes_kms",
        }
    }
}

/// The authenticated caller of one request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: TenantId,
    /// Stable identity name (credential owner, token subject, certificate subject).
    pub identity: String,
    pub frontend: Frontend,
    /// The request id of the caller's protocol (kmsRequestId, x-kms request id, X-Request-ID...).
    pub request_id: String,
    /// Extra request metadata for policy and audit (e.g. XKS requestMetadata). Never secrets.
    pub metadata: BTreeMap<String, String>,
}

impl Caller {
    /// The local administrator (CLI on the data store, embedded default).
    pub fn admin(tenant: TenantId) -> Self {
        Caller {
            tenant,
            identity: "admin".to_owned(),
            frontend: Frontend::Admin,
            request_id: Uuid::new_v4().to_string(),
            metadata: BTreeMap::new(),
        }
    }
}

/// A tenant: owns keys, secrets, identities and policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: TenantId,
    #[serde(default)]
    pub display_name: String,
    pub created_at: Timestamp,
}

/// One page of a listing with an opaque continuation marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass back as `after` to read the next page; `None` when this is the last page.
    pub next: Option<String>,
}

/// A request for one page: items strictly after `after` in the listing's order, at most `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    pub after: Option<String>,
    pub limit: u32,
}

impl PageRequest {
    pub const MAX_LIMIT: u32 = 1000;

    pub fn first(limit: u32) -> Self {
        PageRequest { after: None, limit }
    }

    /// The limit clamped into 1..=MAX_LIMIT.
    pub fn effective_limit(&self) -> u32 {
        self.limit.clamp(1, Self::MAX_LIMIT)
    }
}

mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_reject() {
        assert!(KeyId::parse("abc-DEF_1.2").is_ok());
        assert!(KeyId::parse("").is_err());
        assert!(KeyId::parse("a/b").is_err());
        assert!(KeyId::parse(&"a".repeat(129)).is_err());
        assert!(TenantId::parse("Acme").is_err());
        assert!(AliasName::parse("alias/app-key").is_ok());
        assert!(AliasName::parse("app-key").is_err());
        assert!(AliasName::parse("alias/aws/x").is_err());
        assert_eq!(KeyRef::parse("alias/x").ok(), Some(KeyRef::Alias(AliasName("alias/x".into()))));
    }

    #[test]
    fn usage_sets() {
        let s = KeyUsageSet::parse_list("encrypt,DECRYPT").ok();
        assert_eq!(s, Some(KeyUsageSet::of(&[KeyUsage::Encrypt, KeyUsage::Decrypt])));
        assert_eq!(KeyUsageSet::parse_list("none").ok(), Some(KeyUsageSet::NONE));
        assert!(KeyUsageSet::parse_list("encrypt,fly").is_err());
        let enc = KeyUsageSet::of(&[KeyUsage::Encrypt]);
        assert!(enc.is_subset_of(KeySpec::Aes256.allowed_usages()));
        assert!(!KeyUsageSet::of(&[KeyUsage::Sign]).is_subset_of(KeySpec::Aes256.allowed_usages()));
        let json = serde_json::to_string(&enc).unwrap_or_default();
        assert_eq!(json, r#"["ENCRYPT"]"#);
    }

    #[test]
    fn handle_base64_roundtrip() {
        for len in 0..10 {
            let h = BackendHandle {
                backend: "software".into(),
                handle: (0..len).map(|i: u8| i.wrapping_mul(37)).collect(),
            };
            let json = serde_json::to_string(&h).unwrap_or_default();
            let back: BackendHandle = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(back, h);
        }
    }

    #[test]
    fn timestamps_format() {
        assert_eq!(Timestamp(0).to_rfc3339(), "1970-01-01T00:00:00Z");
        assert_eq!(Timestamp(86_400_000 + 1500).to_rfc3339(), "1970-01-02T00:00:01Z");
    }
}

//! The secret inventory's model: paths, the metadata record, versions and their stages, the sealed form a
//! version's data takes in the store, and the requests the dispatcher's secret operations take.
//!
//! One inventory serves the generic secrets REST API and the Alibaba frontends (instance `GetSecretValue`,
//! OpenAPI `CreateSecret`/`PutSecretValue`/...). Names here are neutral: the stages `current` and `previous` are
//! what Alibaba calls `ACSCurrent`/`ACSPrevious` (its frontends translate), and a version has both the integer
//! the REST API shows and a string `version_id` Alibaba's `VersionId` uses.
//!
//! A version's data never reaches the store in plain: it is sealed with AES-256-GCM under a fresh data key,
//! and the data key is encrypted by the key backend under the tenant's internal secrets key (see
//! [`crate::Dispatcher`]). This module holds the local half (data keys and data); the dispatcher the backend half.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::backend::{GCM_IV_LEN, GCM_TAG_LEN};
use crate::error::{Error, ErrorKind, Result};
use crate::model::{KeyId, TenantId, Timestamp};

/// The stage of the version readers get by default (Alibaba `ACSCurrent`).
pub const STAGE_CURRENT: &str = "current";
/// The stage of the version that was current before the current one (Alibaba `ACSPrevious`).
pub const STAGE_PREVIOUS: &str = "previous";
/// Versions a secret retains when the writer does not say.
pub const DEFAULT_MAX_VERSIONS: u32 = 10;
/// The most versions a secret may retain.
pub const MAX_MAX_VERSIONS: u32 = 100;
/// The secret type of a secret created without one.
pub const DEFAULT_SECRET_TYPE: &str = "kv";
/// How long a soft-deleted secret stays recoverable when the caller has no tenant setting (30 days).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// The longest retention a soft delete accepts (365 days).
pub const MAX_RETENTION: Duration = Duration::from_secs(365 * 86_400);
/// Largest metadata document (serialized JSON). Metadata is stored in plain: it is for descriptions and tags,
/// not for values.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Length of a data key.
pub const DATA_KEY_LEN: usize = 32;

// ---- paths ------------------------------------------------------------------------------------------------

/// A secret's path: 1-512 characters, `/`-separated segments of 1-128 characters from `A-Z a-z 0-9 . _ - + = @`;
/// no empty segment (so no leading, trailing or doubled `/`) and no `.` or `..` segment.
///
/// `+ = @` are there for Alibaba secret names; `:` is not, because the REST API uses `{path}:verb` suffixes.
/// Every allowed byte sorts between `+` (0x2B) and `z` (0x7A), which the store's prefix ranges rely on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SecretPath(String);

impl SecretPath {
    pub const MAX_LEN: usize = 512;
    pub const MAX_SEGMENT_LEN: usize = 128;

    pub fn parse(s: &str) -> Result<Self> {
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(Error::invalid("a secret path must be 1 to 512 characters"));
        }
        for segment in s.split('/') {
            if segment.is_empty() {
                return Err(Error::invalid("a secret path has no empty segment and no leading or trailing /"));
            }
            if segment.len() > Self::MAX_SEGMENT_LEN {
                return Err(Error::invalid("a secret path segment must be at most 128 characters"));
            }
            if segment == "." || segment == ".." {
                return Err(Error::invalid("a secret path segment cannot be . or .."));
            }
            if !segment.bytes().all(is_path_byte) {
                return Err(Error::invalid("a secret path may only use A-Z a-z 0-9 . _ - + = @ and /"));
            }
        }
        Ok(SecretPath(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// Whether this path is `prefix` itself or lies below it, segment-wise: `a/b` is within `a/b` and `a/b/c`
    /// is within `a/b`, but `a/bc` is not.
    pub fn is_within(&self, prefix: &SecretPath) -> bool {
        match self.0.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

fn is_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+' | b'=' | b'@')
}

impl fmt::Display for SecretPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SecretPath {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl TryFrom<String> for SecretPath {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}

impl From<SecretPath> for String {
    fn from(p: SecretPath) -> String {
        p.0
    }
}

/// A stage name or a version id: 1-64 characters of `A-Z a-z 0-9 . _ -`.
fn check_label(s: &str, what: &str) -> Result<()> {
    let ok =
        (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok { Ok(()) } else { Err(Error::invalid(format!("{what} must be 1 to 64 characters of A-Z a-z 0-9 . _ -"))) }
}

/// Checks a stage name (`current`, `previous` or a custom one).
pub fn check_stage(stage: &str) -> Result<()> {
    check_label(stage, "a version stage")
}

/// Checks a caller-chosen version id.
pub fn check_version_id(id: &str) -> Result<()> {
    check_label(id, "a version id")
}

/// Checks a secret type: 1-64 characters of `A-Z a-z 0-9 . _ -` (REST `kv`, `json`, ...; Alibaba `Generic`).
pub fn check_secret_type(t: &str) -> Result<()> {
    check_label(t, "a secret type")
}

/// Checks a `max_versions` setting.
pub fn check_max_versions(n: u32) -> Result<()> {
    if (1..=MAX_MAX_VERSIONS).contains(&n) { Ok(()) } else { Err(Error::invalid("max_versions must be 1 to 100")) }
}

/// Checks a metadata document: a JSON object (descriptions, tags, owner, custom fields) of bounded size.
pub fn check_metadata(metadata: &serde_json::Value) -> Result<()> {
    if !metadata.is_object() {
        return Err(Error::invalid("secret metadata must be a JSON object"));
    }
    let len = serde_json::to_vec(metadata).map(|v| v.len()).unwrap_or(usize::MAX);
    if len > MAX_METADATA_BYTES {
        return Err(Error::invalid("secret metadata must be at most 16 KiB of JSON"));
    }
    Ok(())
}

// ---- the metadata record ----------------------------------------------------------------------------------

/// One retained version of a secret (its data is stored apart, sealed: [`SealedSecretVersion`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretVersionInfo {
    /// 1, 2, 3...: never reused, even after pruning.
    pub version: u32,
    /// The vendor's version id (Alibaba `VersionId`); the decimal version number unless the writer chose one.
    /// Unique among the secret's retained versions.
    pub version_id: String,
    /// Stages this version holds (`current`, `previous`, custom ones). Each stage is held by at most one version.
    #[serde(default)]
    pub stages: Vec<String>,
    pub created_at: Timestamp,
    /// The identity that wrote it.
    pub created_by: String,
}

impl SecretVersionInfo {
    pub fn has_stage(&self, stage: &str) -> bool {
        self.stages.iter().any(|s| s == stage)
    }
}

/// A secret's metadata record: everything but the values. Metadata is stored in plain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Secret {
    pub tenant: TenantId,
    pub path: SecretPath,
    /// A hint, not a schema: REST `kv`, `json`, `certificate`, `ssh_key`, `api_key`; Alibaba `Generic`.
    pub secret_type: String,
    /// A JSON object: description, tags, owner, custom fields (REST), Alibaba's description and tags.
    pub metadata: serde_json::Value,
    pub max_versions: u32,
    /// After this instant the values are unreadable (`SecretExpired`); the metadata stays readable.
    #[serde(default)]
    pub expires_at: Option<Timestamp>,
    /// Set while the secret is soft-deleted.
    #[serde(default)]
    pub deleted_at: Option<Timestamp>,
    /// Until when a soft-deleted secret can be restored; after it the sweeper purges it.
    #[serde(default)]
    pub recoverable_until: Option<Timestamp>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// The version holding [`STAGE_CURRENT`]; 0 before the first version.
    pub current_version: u32,
    /// The highest version number ever assigned (the next one is this plus one).
    pub latest_version: u32,
    /// The retained versions, oldest first.
    pub versions: Vec<SecretVersionInfo>,
    /// Optimistic-concurrency counter maintained by the store: 1 on insert, +1 on every write.
    #[serde(default)]
    pub revision: i64,
}

impl Secret {
    /// A new, empty record (no versions yet).
    pub fn new(tenant: TenantId, path: SecretPath, now: Timestamp) -> Self {
        Secret {
            tenant,
            path,
            secret_type: DEFAULT_SECRET_TYPE.to_owned(),
            metadata: serde_json::Value::Object(serde_json::Map::new()),
            max_versions: DEFAULT_MAX_VERSIONS,
            expires_at: None,
            deleted_at: None,
            recoverable_until: None,
            created_at: now,
            updated_at: now,
            current_version: 0,
            latest_version: 0,
            versions: Vec::new(),
            revision: 0,
        }
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted_at.is_some()
    }

    /// Whether the values are past their expiry at `now`.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// Whether a soft-deleted secret can still be restored at `now`.
    pub fn is_recoverable(&self, now: Timestamp) -> bool {
        self.is_deleted() && self.recoverable_until.is_some_and(|t| t > now)
    }

    pub fn version(&self, version: u32) -> Option<&SecretVersionInfo> {
        self.versions.iter().find(|v| v.version == version)
    }

    pub fn version_by_id(&self, version_id: &str) -> Option<&SecretVersionInfo> {
        self.versions.iter().find(|v| v.version_id == version_id)
    }

    pub fn version_by_stage(&self, stage: &str) -> Option<&SecretVersionInfo> {
        self.versions.iter().find(|v| v.has_stage(stage))
    }

    /// The version holding `current`.
    pub fn current(&self) -> Option<&SecretVersionInfo> {
        self.version_by_stage(STAGE_CURRENT)
    }

    /// The retained version a selector names, or `SecretVersionNotFound`.
    pub fn select(&self, selector: &SecretSelector) -> Result<&SecretVersionInfo> {
        let found = match selector {
            SecretSelector::Current => self.current(),
            SecretSelector::Version(v) => self.version(*v),
            SecretSelector::VersionId(id) => self.version_by_id(id),
            SecretSelector::Stage(stage) => self.version_by_stage(stage),
        };
        found.ok_or_else(version_not_found)
    }

    /// The retained version a [`VersionSelector`] names, or `SecretVersionNotFound`.
    pub fn select_version(&self, selector: &VersionSelector) -> Result<&SecretVersionInfo> {
        let found = match selector {
            VersionSelector::Version(v) => self.version(*v),
            VersionSelector::VersionId(id) => self.version_by_id(id),
        };
        found.ok_or_else(version_not_found)
    }

    /// The version id a new version gets when the writer names none: its decimal number, unless a retained
    /// version already uses that as an explicit id (then a UUID, which cannot collide).
    pub fn default_version_id(&self, version: u32) -> String {
        let decimal = version.to_string();
        if self.version_by_id(&decimal).is_some() { Uuid::new_v4().to_string() } else { decimal }
    }

    /// Appends a new version (numbered `latest_version + 1`) and gives it `stages`: each stage moves to it
    /// (see [`Secret::move_stage`]), so moving `current` also moves `previous` to the old current version.
    /// The first version always becomes current. Returns the new version number.
    ///
    /// `version_id` must be unique among the retained versions (`VersionConflict` otherwise, Alibaba's
    /// `Rejected.ResourceExist`); `previous` cannot be given (it follows `current`).
    pub fn add_version(
        &mut self,
        version_id: Option<&str>,
        stages: &[String],
        created_at: Timestamp,
        created_by: &str,
    ) -> Result<u32> {
        for s in stages {
            check_stage(s)?;
            if s == STAGE_PREVIOUS {
                return Err(Error::invalid("the previous stage follows the current one and cannot be set on a write"));
            }
        }
        let version = self.latest_version.checked_add(1).ok_or_else(|| Error::internal("secret version overflow"))?;
        let version_id = match version_id {
            Some(id) => {
                check_version_id(id)?;
                if self.version_by_id(id).is_some() {
                    return Err(Error::new(
                        ErrorKind::VersionConflict,
                        "the secret already has a version with that id",
                    ));
                }
                id.to_owned()
            }
            None => self.default_version_id(version),
        };
        self.versions.push(SecretVersionInfo {
            version,
            version_id,
            stages: Vec::new(),
            created_at,
            created_by: created_by.to_owned(),
        });
        self.latest_version = version;
        let mut wanted: Vec<&str> = Vec::new();
        if self.current_version == 0 && !stages.iter().any(|s| s == STAGE_CURRENT) {
            // A secret always has a current version once it has any.
            wanted.push(STAGE_CURRENT);
        }
        for s in stages {
            if !wanted.contains(&s.as_str()) {
                wanted.push(s);
            }
        }
        for s in wanted {
            self.move_stage(s, version)?;
        }
        self.updated_at = created_at;
        Ok(version)
    }

    /// Gives `stage` to version `to` (removing it from whichever version held it). Moving `current` gives
    /// `previous` to the version that was current (unless that is `to` itself, or there was none): exactly one
    /// version holds `current`, at most one `previous`.
    pub fn move_stage(&mut self, stage: &str, to: u32) -> Result<()> {
        check_stage(stage)?;
        if self.version(to).is_none() {
            return Err(version_not_found());
        }
        let old_current = self.current().map(|v| v.version);
        self.take_stage(stage);
        self.give_stage(stage, to);
        if stage == STAGE_CURRENT {
            self.current_version = to;
            if let Some(old) = old_current
                && old != to
            {
                self.take_stage(STAGE_PREVIOUS);
                self.give_stage(STAGE_PREVIOUS, old);
            }
        }
        Ok(())
    }

    /// Removes `stage` from version `from`, which must hold it. `current` cannot be removed, only moved.
    pub fn remove_stage(&mut self, stage: &str, from: u32) -> Result<()> {
        check_stage(stage)?;
        if stage == STAGE_CURRENT {
            return Err(Error::invalid("the current stage cannot be removed, only moved to another version"));
        }
        let Some(v) = self.versions.iter_mut().find(|v| v.version == from) else {
            return Err(version_not_found());
        };
        if !v.has_stage(stage) {
            return Err(Error::invalid("that version does not hold that stage"));
        }
        v.stages.retain(|s| s != stage);
        Ok(())
    }

    fn take_stage(&mut self, stage: &str) {
        for v in &mut self.versions {
            v.stages.retain(|s| s != stage);
        }
    }

    fn give_stage(&mut self, stage: &str, to: u32) {
        if let Some(v) = self.versions.iter_mut().find(|v| v.version == to) {
            v.stages.push(stage.to_owned());
        }
    }

    /// Drops the oldest versions beyond `max_versions` from the record and returns their numbers (their data
    /// rows must go too). A version holding `current` or a custom stage is never pruned, like labelled versions
    /// in the vendors' services, so a secret can retain more than `max_versions` when custom stages pin old
    /// versions; `previous` does not pin (with `max_versions = 1` exactly one version remains).
    pub fn prune(&mut self) -> Vec<u32> {
        let max = usize::try_from(self.max_versions.max(1)).unwrap_or(usize::MAX);
        let mut excess = self.versions.len().saturating_sub(max);
        let mut pruned = Vec::new();
        self.versions.sort_by_key(|v| v.version);
        self.versions.retain(|v| {
            let pinned = v.stages.iter().any(|s| s != STAGE_PREVIOUS);
            if excess > 0 && !pinned {
                excess -= 1;
                pruned.push(v.version);
                false
            } else {
                true
            }
        });
        pruned
    }
}

fn version_not_found() -> Error {
    Error::new(ErrorKind::SecretVersionNotFound, "the secret has no such version")
}

// ---- sealed version data ----------------------------------------------------------------------------------

/// Format byte of [`SealedSecretVersion`] and of the AAD it is bound with.
pub const SEALED_FORMAT: u8 = 1;

/// One version's data as the store keeps it: the data encrypted under a data key, the data key encrypted by
/// the key backend. Nothing in it is plaintext.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecretVersion {
    pub format: u8,
    pub version: u32,
    /// The key that encrypted the data key (the tenant's internal secrets key) and its version.
    pub key_id: KeyId,
    pub key_version: Uuid,
    /// `iv (12) ‖ ciphertext (32) ‖ tag (16)` from the backend's AES-256-GCM.
    #[serde(with = "b64")]
    pub wrapped_key: Vec<u8>,
    /// 12 bytes.
    #[serde(with = "b64")]
    pub iv: Vec<u8>,
    /// `ciphertext ‖ tag (16)`.
    #[serde(with = "b64")]
    pub ciphertext: Vec<u8>,
    pub created_at: Timestamp,
}

impl fmt::Debug for SealedSecretVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedSecretVersion")
            .field("format", &self.format)
            .field("version", &self.version)
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

/// The additional data both the data key and the data are bound to: format, tenant, path and version, each
/// length-prefixed. A sealed version copied to another secret, tenant or version number fails to open.
pub fn binding_aad(tenant: &TenantId, path: &SecretPath, version: u32) -> Vec<u8> {
    const LABEL: &[u8] = b"kmsgate/secret";
    let mut aad = Vec::with_capacity(LABEL.len() + 1 + 4 + tenant.as_str().len() + path.as_str().len() + 4);
    aad.extend_from_slice(LABEL);
    aad.push(SEALED_FORMAT);
    for part in [tenant.as_str().as_bytes(), path.as_str().as_bytes()] {
        // Both are at most 512 bytes, so the length always fits.
        let len = u16::try_from(part.len()).unwrap_or(u16::MAX);
        aad.extend_from_slice(&len.to_be_bytes());
        aad.extend_from_slice(part);
    }
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

/// A fresh random data key from the OS generator.
pub fn new_data_key() -> Result<Zeroizing<Vec<u8>>> {
    let mut key = Zeroizing::new(vec![0u8; DATA_KEY_LEN]);
    getrandom::fill(&mut key)
        .map_err(|e| Error::internal("the system random generator failed").with_source(e.to_string()))?;
    Ok(key)
}

fn data_cipher(key: &[u8]) -> Result<LessSafeKey> {
    if key.len() != DATA_KEY_LEN {
        return Err(Error::invalid_ciphertext());
    }
    let unbound = UnboundKey::new(&AES_256_GCM, key).map_err(|_| Error::internal("preparing a data key failed"))?;
    Ok(LessSafeKey::new(unbound))
}

/// Encrypts `plaintext` under `key` with a fresh random IV; returns `(iv, ciphertext ‖ tag)`.
pub fn seal_data(key: &[u8], aad: &[u8], plaintext: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    let cipher = data_cipher(key)?;
    let mut iv = vec![0u8; GCM_IV_LEN];
    getrandom::fill(&mut iv)
        .map_err(|e| Error::internal("the system random generator failed").with_source(e.to_string()))?;
    let nonce = Nonce::try_assume_unique_for_key(&iv).map_err(|_| Error::internal("bad IV length"))?;
    let mut out = Vec::with_capacity(plaintext.len() + GCM_TAG_LEN);
    out.extend_from_slice(plaintext);
    cipher
        .seal_in_place_append_tag(nonce, Aad::from(aad), &mut out)
        .map_err(|_| Error::internal("encrypting secret data failed"))?;
    Ok((iv, out))
}

/// Reverses [`seal_data`]. A wrong key, IV, AAD or a tampered ciphertext is `InvalidCiphertext`.
pub fn open_data(key: &[u8], iv: &[u8], aad: &[u8], ciphertext_and_tag: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    let cipher = data_cipher(key)?;
    if iv.len() != GCM_IV_LEN || ciphertext_and_tag.len() < GCM_TAG_LEN {
        return Err(Error::invalid_ciphertext());
    }
    let nonce = Nonce::try_assume_unique_for_key(iv).map_err(|_| Error::invalid_ciphertext())?;
    let mut buf = Zeroizing::new(ciphertext_and_tag.to_vec());
    let len = cipher.open_in_place(nonce, Aad::from(aad), &mut buf).map_err(|_| Error::invalid_ciphertext())?.len();
    buf.truncate(len);
    Ok(buf)
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

// ---- requests -------------------------------------------------------------------------------------------

/// Whether a write may create the secret, update it, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriteMode {
    /// Alibaba `CreateSecret`: an existing secret is `AlreadyExists`.
    CreateOnly,
    /// Alibaba `PutSecretValue`: a missing secret is `SecretNotFound`.
    UpdateOnly,
    /// REST `PUT /v1/secrets/{path}`.
    Upsert,
}

/// A write of a new version (and, on create, of the secret).
#[derive(Clone)]
pub struct PutSecretRequest {
    pub path: SecretPath,
    pub data: Zeroizing<Vec<u8>>,
    /// `None`: unchanged (on create: [`DEFAULT_SECRET_TYPE`]).
    pub secret_type: Option<String>,
    /// A JSON object; `None`: unchanged (on create: `{}`).
    pub metadata: Option<serde_json::Value>,
    /// 1-100; `None`: unchanged (on create: [`DEFAULT_MAX_VERSIONS`]).
    pub max_versions: Option<u32>,
    /// `Some(Some(t))` expires at `t`, `Some(None)` never expires, `None` keeps the expiry unless it has passed
    /// (a write after expiry revives the secret: the new value would otherwise be born expired).
    pub expires_at: Option<Option<Timestamp>>,
    /// The version the writer expects to be current (`0`: the secret must not exist); else `VersionConflict`.
    pub cas: Option<u32>,
    /// Alibaba `VersionId`; `None`: the decimal version number.
    pub version_id: Option<String>,
    /// Stages the new version takes (Alibaba `VersionStages`); `None`: `[current]`. Without `current` the new
    /// version is stored but does not become what readers get (except the first version, which always does).
    pub stages: Option<Vec<String>>,
    pub mode: WriteMode,
}

impl PutSecretRequest {
    /// An upsert of `data` with everything else left to defaults.
    pub fn new(path: SecretPath, data: impl Into<Vec<u8>>) -> Self {
        PutSecretRequest {
            path,
            data: Zeroizing::new(data.into()),
            secret_type: None,
            metadata: None,
            max_versions: None,
            expires_at: None,
            cas: None,
            version_id: None,
            stages: None,
            mode: WriteMode::Upsert,
        }
    }
}

impl fmt::Debug for PutSecretRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The data is the secret value: never print it.
        f.debug_struct("PutSecretRequest")
            .field("path", &self.path)
            .field("data_len", &self.data.len())
            .field("secret_type", &self.secret_type)
            .field("max_versions", &self.max_versions)
            .field("expires_at", &self.expires_at)
            .field("cas", &self.cas)
            .field("version_id", &self.version_id)
            .field("stages", &self.stages)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// What a write did.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretWrite {
    /// The record after the write.
    pub secret: Secret,
    /// The version written.
    pub version: SecretVersionInfo,
    /// Whether the write created the secret (REST `201` rather than `200`).
    pub created: bool,
}

/// Which version a read returns.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SecretSelector {
    /// The version holding `current`: REST `GET` without `?version`, Alibaba's default `ACSCurrent`.
    Current,
    /// REST `?version=N`.
    Version(u32),
    /// Alibaba `VersionId`.
    VersionId(String),
    /// Alibaba `VersionStage` (after mapping `ACSCurrent`/`ACSPrevious` to `current`/`previous`).
    Stage(String),
}

/// Names one version by number or by version id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VersionSelector {
    Version(u32),
    VersionId(String),
}

/// A secret value as read.
pub struct SecretValue {
    pub secret: Secret,
    pub version: SecretVersionInfo,
    pub data: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretValue")
            .field("secret", &self.secret.path)
            .field("version", &self.version.version)
            .field("data_len", &self.data.len())
            .finish()
    }
}

/// A change to a secret's metadata; writes no version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SecretPatch {
    /// Replaces the metadata object.
    pub metadata: Option<serde_json::Value>,
    pub secret_type: Option<String>,
    /// `Some(None)` removes the expiry.
    pub expires_at: Option<Option<Timestamp>>,
    /// Lowering it prunes the oldest versions at once.
    pub max_versions: Option<u32>,
    /// The record's `revision` the caller read (`If-Match`); else `VersionConflict`.
    pub expected_revision: Option<i64>,
}

/// How a secret is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeleteMode {
    /// Hidden from readers, recoverable for `retention` (REST tenant retention, Alibaba
    /// `RecoveryWindowInDays`); the sweeper purges it afterwards.
    Soft { retention: Duration },
    /// Gone at once with all its versions (REST `?permanent=true`, Alibaba `ForceDeleteWithoutRecovery`).
    Permanent,
}

/// Which secrets a listing returns with respect to soft deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeletedFilter {
    /// Active secrets only (the default).
    #[default]
    Exclude,
    /// Active and soft-deleted.
    Include,
    /// Soft-deleted only.
    Only,
}

/// The store-level filter of a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretFilter {
    /// Segment-wise: `a/b` lists `a/b` and everything below `a/b/`, never `a/bc`.
    pub prefix: Option<SecretPath>,
    pub deleted: DeletedFilter,
}

/// A listing's filters: the store's, plus those the dispatcher applies to each record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SecretListFilter {
    pub store: SecretFilter,
    /// Exact secret type.
    pub secret_type: Option<String>,
    /// A tag: matches a `metadata.tags` array holding this string, or a `metadata.tags` object with this key
    /// (`key`) or this pair (`key=value`).
    pub tag: Option<String>,
    /// Secrets whose expiry is at or before now plus this (already expired ones included).
    pub expiring_within: Option<Duration>,
}

impl SecretListFilter {
    /// Whether a record passes the dispatcher-side filters.
    pub fn matches(&self, secret: &Secret, now: Timestamp) -> bool {
        if let Some(t) = &self.secret_type
            && secret.secret_type != *t
        {
            return false;
        }
        if let Some(tag) = &self.tag
            && !has_tag(&secret.metadata, tag)
        {
            return false;
        }
        if let Some(within) = self.expiring_within {
            let ms = i64::try_from(within.as_millis()).unwrap_or(i64::MAX);
            let horizon = Timestamp(now.0.saturating_add(ms));
            if secret.expires_at.is_none_or(|t| t > horizon) {
                return false;
            }
        }
        true
    }

    /// Whether any dispatcher-side filter is set.
    pub fn filters_records(&self) -> bool {
        self.secret_type.is_some() || self.tag.is_some() || self.expiring_within.is_some()
    }
}

fn has_tag(metadata: &serde_json::Value, tag: &str) -> bool {
    match metadata.get("tags") {
        Some(serde_json::Value::Array(tags)) => tags.iter().any(|t| t.as_str() == Some(tag)),
        Some(serde_json::Value::Object(tags)) => match tag.split_once('=') {
            Some((k, v)) => tags.get(k).and_then(serde_json::Value::as_str) == Some(v),
            None => tags.contains_key(tag),
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> SecretPath {
        SecretPath::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn secret() -> Secret {
        Secret::new(TenantId::default_tenant(), path("app/db"), Timestamp(1))
    }

    fn stages_of(s: &Secret) -> Vec<(u32, Vec<String>)> {
        s.versions.iter().map(|v| (v.version, v.stages.clone())).collect()
    }

    fn st(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn paths_parse_and_reject() {
        for ok in ["a", "app/db/password", "A.b_c-d+e=f@g", "x/.hidden", "a/..b", &"a".repeat(128)] {
            assert!(SecretPath::parse(ok).is_ok(), "{ok}");
        }
        let long = format!("{}/{}", "a".repeat(128), "b/".repeat(200));
        let too_long_total = long.trim_end_matches('/');
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            ".",
            "..",
            "a/./b",
            "a/../b",
            "a:b",
            "a b",
            "a\\b",
            "é",
            "a*",
            &"a".repeat(129),
            too_long_total,
        ] {
            let err = SecretPath::parse(bad).err().map(|e| e.kind());
            assert_eq!(err, Some(ErrorKind::InvalidRequest), "{bad:?}");
        }
        assert!(SecretPath::parse(&"a/".repeat(256)[..511]).is_ok(), "511 characters");
        let p: std::result::Result<SecretPath, _> = serde_json::from_str("\"a//b\"");
        assert!(p.is_err(), "deserialization validates too");
    }

    #[test]
    fn prefixes_are_segment_wise() {
        let prefix = path("a/b");
        assert!(path("a/b").is_within(&prefix));
        assert!(path("a/b/c").is_within(&prefix));
        assert!(path("a/b/c/d").is_within(&prefix));
        assert!(!path("a/bc").is_within(&prefix));
        assert!(!path("a").is_within(&prefix));
        assert!(!path("b/a/b").is_within(&prefix));
    }

    #[test]
    fn the_first_version_is_current_and_puts_move_current_and_previous() {
        let mut s = secret();
        assert_eq!(s.add_version(None, &[], Timestamp(2), "alice").ok(), Some(1));
        assert_eq!((s.current_version, s.latest_version), (1, 1));
        assert_eq!(stages_of(&s), vec![(1, st(&["current"]))]);
        assert_eq!(s.add_version(None, &st(&["current"]), Timestamp(3), "bob").ok(), Some(2));
        assert_eq!(stages_of(&s), vec![(1, st(&["previous"])), (2, st(&["current"]))]);
        assert_eq!(s.add_version(Some("v3"), &st(&["current"]), Timestamp(4), "bob").ok(), Some(3));
        assert_eq!(stages_of(&s), vec![(1, vec![]), (2, st(&["previous"])), (3, st(&["current"]))]);
        assert_eq!(s.version_by_id("v3").map(|v| v.version), Some(3));
        assert_eq!(s.version_by_id("2").map(|v| v.version), Some(2), "default ids are decimal");
        assert_eq!(s.updated_at, Timestamp(4));
        assert_eq!(s.versions[2].created_by, "bob");
    }

    #[test]
    fn a_write_without_current_keeps_the_current_version() {
        let mut s = secret();
        s.add_version(None, &[], Timestamp(2), "a").ok();
        assert_eq!(s.add_version(None, &st(&["pending"]), Timestamp(3), "a").ok(), Some(2));
        assert_eq!(s.current_version, 1);
        assert_eq!(stages_of(&s), vec![(1, st(&["current"])), (2, st(&["pending"]))]);
        // The first version of a secret gets `current` even when asked for other stages only.
        let mut fresh = secret();
        fresh.add_version(None, &st(&["pending"]), Timestamp(2), "a").ok();
        assert_eq!(stages_of(&fresh), vec![(1, st(&["current", "pending"]))]);
    }

    #[test]
    fn version_ids_are_unique_and_checked() {
        let mut s = secret();
        s.add_version(Some("v1"), &[], Timestamp(2), "a").ok();
        let dup = s.add_version(Some("v1"), &[], Timestamp(3), "a");
        assert_eq!(dup.err().map(|e| e.kind()), Some(ErrorKind::VersionConflict));
        assert_eq!(s.latest_version, 1, "a refused write changes nothing");
        let bad = s.add_version(Some("v 2"), &[], Timestamp(3), "a");
        assert_eq!(bad.err().map(|e| e.kind()), Some(ErrorKind::InvalidRequest));
        let prev = s.add_version(None, &st(&["previous"]), Timestamp(3), "a");
        assert_eq!(prev.err().map(|e| e.kind()), Some(ErrorKind::InvalidRequest));
        // An explicit id "2" on version 1 means version 2 cannot default to "2".
        let mut t = secret();
        t.add_version(Some("2"), &[], Timestamp(2), "a").ok();
        t.add_version(None, &[], Timestamp(3), "a").ok();
        let id = t.version(2).map(|v| v.version_id.clone()).unwrap_or_default();
        assert_ne!(id, "2");
        assert!(Uuid::parse_str(&id).is_ok(), "{id}");
    }

    #[test]
    fn moving_current_back_swaps_current_and_previous() {
        let mut s = secret();
        for i in 0..3 {
            s.add_version(None, &st(&["current"]), Timestamp(i), "a").ok();
        }
        // Roll back by label: current to 2, which held previous.
        assert!(s.move_stage(STAGE_CURRENT, 2).is_ok());
        assert_eq!(stages_of(&s), vec![(1, vec![]), (2, st(&["current"])), (3, st(&["previous"]))]);
        assert_eq!(s.current_version, 2);
        // Moving current to where it already is changes nothing.
        assert!(s.move_stage(STAGE_CURRENT, 2).is_ok());
        assert_eq!(stages_of(&s), vec![(1, vec![]), (2, st(&["current"])), (3, st(&["previous"]))]);
        // Custom stages move alone; previous can be moved explicitly.
        assert!(s.move_stage("blue", 1).is_ok());
        assert!(s.move_stage("blue", 3).is_ok());
        assert!(s.move_stage(STAGE_PREVIOUS, 1).is_ok());
        assert_eq!(stages_of(&s), vec![(1, st(&["previous"])), (2, st(&["current"])), (3, st(&["blue"]))]);
        assert_eq!(s.move_stage("x", 9).err().map(|e| e.kind()), Some(ErrorKind::SecretVersionNotFound));
        // Removing: only from the holder, never current.
        assert_eq!(s.remove_stage("blue", 1).err().map(|e| e.kind()), Some(ErrorKind::InvalidRequest));
        assert_eq!(s.remove_stage(STAGE_CURRENT, 2).err().map(|e| e.kind()), Some(ErrorKind::InvalidRequest));
        assert!(s.remove_stage("blue", 3).is_ok());
        assert!(s.remove_stage(STAGE_PREVIOUS, 1).is_ok());
        assert_eq!(stages_of(&s), vec![(1, vec![]), (2, st(&["current"])), (3, vec![])]);
        for stage in [STAGE_CURRENT, STAGE_PREVIOUS] {
            let holders = s.versions.iter().filter(|v| v.has_stage(stage)).count();
            assert!(holders <= 1, "{stage}");
        }
    }

    #[test]
    fn selectors() {
        let mut s = secret();
        s.add_version(Some("a"), &[], Timestamp(1), "x").ok();
        s.add_version(Some("b"), &st(&["current", "blue"]), Timestamp(2), "x").ok();
        let sel = |sel: SecretSelector| s.select(&sel).map(|v| v.version).map_err(|e| e.kind());
        assert_eq!(sel(SecretSelector::Current), Ok(2));
        assert_eq!(sel(SecretSelector::Version(1)), Ok(1));
        assert_eq!(sel(SecretSelector::VersionId("a".into())), Ok(1));
        assert_eq!(sel(SecretSelector::Stage("previous".into())), Ok(1));
        assert_eq!(sel(SecretSelector::Stage("blue".into())), Ok(2));
        for missing in [
            SecretSelector::Version(3),
            SecretSelector::Version(0),
            SecretSelector::VersionId("c".into()),
            SecretSelector::Stage("green".into()),
        ] {
            assert_eq!(sel(missing), Err(ErrorKind::SecretVersionNotFound));
        }
        assert_eq!(s.select_version(&VersionSelector::VersionId("b".into())).map(|v| v.version).ok(), Some(2));
    }

    #[test]
    fn pruning_drops_the_oldest_unpinned_versions() {
        let mut s = secret();
        s.max_versions = 3;
        for i in 0..5 {
            s.add_version(None, &st(&["current"]), Timestamp(i), "a").ok();
        }
        assert_eq!(s.prune(), vec![1, 2]);
        assert_eq!(stages_of(&s), vec![(3, vec![]), (4, st(&["previous"])), (5, st(&["current"]))]);
        assert!(s.prune().is_empty(), "nothing left to prune");

        // A custom stage and current pin their versions; previous does not.
        let mut p = secret();
        p.max_versions = 1;
        p.add_version(None, &st(&["current", "keep"]), Timestamp(1), "a").ok();
        p.add_version(None, &st(&["current"]), Timestamp(2), "a").ok();
        p.add_version(None, &st(&["current"]), Timestamp(3), "a").ok();
        assert_eq!(p.prune(), vec![2]);
        assert_eq!(stages_of(&p), vec![(1, st(&["keep"])), (3, st(&["current"]))]);
        // Rolled back by label: current on an old version survives pruning.
        let mut r = secret();
        r.max_versions = 2;
        for i in 0..3 {
            r.add_version(None, &st(&["current"]), Timestamp(i), "a").ok();
        }
        assert!(r.move_stage(STAGE_CURRENT, 1).is_ok());
        assert_eq!(r.prune(), vec![2]);
        assert_eq!(stages_of(&r), vec![(1, st(&["current"])), (3, st(&["previous"]))]);
        assert_eq!(r.latest_version, 3, "numbers are never reused");
    }

    #[test]
    fn sealing_round_trips_and_binds_the_context() {
        let key = new_data_key().unwrap_or_else(|e| panic!("{e}"));
        let t = TenantId::default_tenant();
        let aad = binding_aad(&t, &path("a/b"), 3);
        let (iv, ct) = seal_data(&key, &aad, b"hunter2").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((iv.len(), ct.len()), (12, 7 + 16));
        assert!(!ct.windows(7).any(|w| w == b"hunter2"));
        let pt = open_data(&key, &iv, &aad, &ct).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pt.as_slice(), b"hunter2");
        let other_tenant = TenantId::parse("acme").unwrap_or_else(|e| panic!("{e}"));
        for other in [
            binding_aad(&t, &path("a/b"), 4),
            binding_aad(&t, &path("a/bb"), 3),
            binding_aad(&other_tenant, &path("a/b"), 3),
        ] {
            assert_eq!(open_data(&key, &iv, &other, &ct).err().map(|e| e.kind()), Some(ErrorKind::InvalidCiphertext));
        }
        let mut tampered = ct.clone();
        tampered[0] ^= 1;
        assert_eq!(open_data(&key, &iv, &aad, &tampered).err().map(|e| e.kind()), Some(ErrorKind::InvalidCiphertext));
        let other_key = new_data_key().unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(other_key.as_slice(), key.as_slice());
        assert_eq!(open_data(&other_key, &iv, &aad, &ct).err().map(|e| e.kind()), Some(ErrorKind::InvalidCiphertext));
        // Length prefixes keep (tenant, path) pairs that concatenate alike apart.
        let ab = TenantId::parse("ab").unwrap_or_else(|e| panic!("{e}"));
        let a = TenantId::parse("a").unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(binding_aad(&ab, &path("c"), 1), binding_aad(&a, &path("bc"), 1));
    }

    #[test]
    fn list_filters() {
        let now = Timestamp(1_000_000);
        let mut s = secret();
        s.secret_type = "json".into();
        s.metadata = serde_json::json!({"tags": ["prod", "db"]});
        let f = |tag: Option<&str>, ty: Option<&str>, within: Option<u64>| SecretListFilter {
            tag: tag.map(str::to_owned),
            secret_type: ty.map(str::to_owned),
            expiring_within: within.map(Duration::from_secs),
            ..SecretListFilter::default()
        };
        assert!(f(None, None, None).matches(&s, now));
        assert!(f(Some("prod"), Some("json"), None).matches(&s, now));
        assert!(!f(Some("dev"), None, None).matches(&s, now));
        assert!(!f(None, Some("kv"), None).matches(&s, now));
        assert!(!f(None, None, Some(10)).matches(&s, now), "no expiry never matches expiring_within");
        s.expires_at = Some(Timestamp(now.0 + 5_000));
        assert!(f(None, None, Some(10)).matches(&s, now));
        assert!(!f(None, None, Some(1)).matches(&s, now));
        s.expires_at = Some(Timestamp(now.0 - 1));
        assert!(f(None, None, Some(0)).matches(&s, now), "already expired");
        s.metadata = serde_json::json!({"tags": {"env": "prod", "team": ""}});
        assert!(f(Some("env"), None, None).matches(&s, now));
        assert!(f(Some("env=prod"), None, None).matches(&s, now));
        assert!(!f(Some("env=dev"), None, None).matches(&s, now));
        assert!(f(Some("team="), None, None).matches(&s, now));
    }

    #[test]
    fn checks() {
        assert!(check_max_versions(1).is_ok() && check_max_versions(100).is_ok());
        assert!(check_max_versions(0).is_err() && check_max_versions(101).is_err());
        assert!(check_metadata(&serde_json::json!({})).is_ok());
        assert!(check_metadata(&serde_json::json!([])).is_err());
        assert!(check_metadata(&serde_json::json!({"x": "a".repeat(MAX_METADATA_BYTES)})).is_err());
        assert!(check_secret_type("Generic").is_ok() && check_secret_type("ssh_key").is_ok());
        assert!(check_secret_type("").is_err() && check_secret_type("a/b").is_err());
    }

    #[test]
    fn debug_never_prints_values() {
        let mut req = PutSecretRequest::new(path("a"), b"hunter2".to_vec());
        req.version_id = Some("v1".into());
        assert!(!format!("{req:?}").contains("hunter2"));
        let v = SecretValue {
            secret: secret(),
            version: SecretVersionInfo {
                version: 1,
                version_id: "1".into(),
                stages: vec![],
                created_at: Timestamp(0),
                created_by: "a".into(),
            },
            data: Zeroizing::new(b"hunter2".to_vec()),
        };
        assert!(!format!("{v:?}").contains("hunter2"));
    }
}

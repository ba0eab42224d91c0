//! The secret inventory's operations, shared by the secrets REST API and the Alibaba frontends.
//!
//! Every operation runs through [`Dispatcher::run`] (rate limit, authorization, one audit event whose resource is
//! the path, never a value). Writes are optimistic: read the record, decide, write it back conditional on the
//! revision read, and start over (a few times) if another writer got there first.
//!
//! Values are sealed here, before the store sees them: AES-256-GCM under a fresh data key per version, the data
//! key encrypted by the key backend under the tenant's internal secrets key ([`Dispatcher::SECRETS_ALIAS`],
//! created on first use), both bound to (tenant, path, version). With a PKCS#11 backend the HSM thus protects
//! every secret; the store holds only ciphertext.
//!
//! Errors of the internal key keep their kind (`InvalidKeyState`, `InvalidKeyUsage`, `InvalidCiphertext` when
//! the backend rejects an unwrap; `DependencyTimeout` when it is slow); a missing internal key is
//! `DependencyFailure`. The REST frontend renders all but the timeout as `500 encryption_error`.

use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use super::{Dispatcher, EncryptRequest};
use crate::audit::Operation;
use crate::backend::{EncryptionAlgorithm, GCM_IV_LEN, GCM_TAG_LEN};
use crate::error::{Error, ErrorKind, Result};
use crate::model::{Caller, Key, KeyRef, KeyUsage, Page, PageRequest, TenantId, Timestamp};
use crate::secret::{
    DATA_KEY_LEN, DeleteMode, MAX_RETENTION, PutSecretRequest, SEALED_FORMAT, STAGE_CURRENT, STAGE_PREVIOUS,
    SealedSecretVersion, Secret, SecretListFilter, SecretPatch, SecretPath, SecretSelector, SecretValue, SecretWrite,
    VersionSelector, WriteMode, binding_aad, check_max_versions, check_metadata, check_secret_type, check_stage,
    check_version_id, new_data_key, open_data, seal_data,
};

/// Optimistic writes start over this many times before reporting a conflict.
const MAX_ATTEMPTS: usize = 5;
/// A filtered listing reads at most this many store pages per call, then returns a short page with a cursor.
const LIST_SCAN_PAGES: usize = 10;
/// Secrets the sweeper purges per store query.
const PURGE_BATCH: u32 = 100;

fn not_found() -> Error {
    Error::new(ErrorKind::SecretNotFound, "the secret does not exist")
}

fn version_not_found() -> Error {
    Error::new(ErrorKind::SecretVersionNotFound, "the secret has no such version")
}

/// A write to a soft-deleted path still in retention; `recoverable_until` is the REST `details` field.
fn secret_exists(secret: &Secret) -> Error {
    let until = secret.recoverable_until.map(Timestamp::to_rfc3339).unwrap_or_default();
    Error::new(
        ErrorKind::SecretExists,
        format!("a deleted secret at that path is recoverable until {until}; restore it or delete it permanently"),
    )
    .with_detail("path", secret.path.to_string())
    .with_detail("recoverable_until", until)
}

fn expired(at: Timestamp) -> Error {
    let at = at.to_rfc3339();
    Error::new(ErrorKind::SecretExpired, format!("the secret expired at {at}")).with_detail("expired_at", at)
}

fn cas_conflict(expected: u32, current: u32) -> Error {
    Error::new(
        ErrorKind::VersionConflict,
        format!("the secret's current version is {current}, not the expected {expected}"),
    )
    .with_detail("expected", expected.to_string())
    .with_detail("current", current.to_string())
}

fn revision_conflict(expected: i64, current: i64) -> Error {
    Error::new(ErrorKind::VersionConflict, format!("the secret's revision is {current}, not the expected {expected}"))
        .with_detail("expected", expected.to_string())
        .with_detail("current", current.to_string())
}

fn contended() -> Error {
    Error::new(ErrorKind::VersionConflict, "the secret is being changed concurrently; read it again and retry")
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Dispatcher {
    /// The alias of each tenant's internal secrets key, which encrypts the data keys of stored secrets.
    pub const SECRETS_ALIAS: &'static str = "alias/kmsgate-internal/secrets";

    async fn secrets_key(&self, caller: &Caller) -> Result<Arc<Key>> {
        self.internal_key(
            caller,
            Self::SECRETS_ALIAS,
            None,
            "kmsgate internal: encrypts the data keys of stored secrets; never delete",
        )
        .await
    }

    /// Seals `data` as `version` of the secret at (`tenant`, `path`).
    async fn seal_version(
        &self,
        key: &Key,
        tenant: &TenantId,
        path: &SecretPath,
        version: u32,
        data: &[u8],
    ) -> Result<SealedSecretVersion> {
        let aad = binding_aad(tenant, path, version);
        let data_key = new_data_key()?;
        let (iv, ciphertext) = seal_data(&data_key, &aad, data)?;
        // The request owns the data key as `Zeroizing`: it is wiped when the request drops, right after this.
        let wrap = EncryptRequest {
            key: KeyRef::Id(key.id.clone()),
            algorithm: Some(EncryptionAlgorithm::AesGcm),
            plaintext: data_key,
            aad,
            iv: None,
        };
        Self::usable_internal(key)?;
        let wrapped = self.encrypt_with(key, &wrap, None).await?;
        drop(wrap);
        let mut wrapped_key = Vec::with_capacity(wrapped.iv.len() + wrapped.ciphertext.len() + wrapped.tag.len());
        wrapped_key.extend_from_slice(&wrapped.iv);
        wrapped_key.extend_from_slice(&wrapped.ciphertext);
        wrapped_key.extend_from_slice(&wrapped.tag);
        Ok(SealedSecretVersion {
            format: SEALED_FORMAT,
            version,
            key_id: wrapped.key_id,
            key_version: wrapped.version,
            wrapped_key,
            iv,
            ciphertext,
            created_at: Timestamp::now(),
        })
    }

    /// Opens a sealed version: the backend unwraps the data key, then the data is decrypted here.
    async fn open_version(&self, secret: &Secret, sealed: &SealedSecretVersion) -> Result<Zeroizing<Vec<u8>>> {
        if sealed.format != SEALED_FORMAT || sealed.wrapped_key.len() != GCM_IV_LEN + DATA_KEY_LEN + GCM_TAG_LEN {
            return Err(Error::invalid_ciphertext());
        }
        // By the id the version recorded, not by alias: the alias could be re-pointed, the data key cannot move.
        let key = match self.resolve_any(&secret.tenant, &KeyRef::Id(sealed.key_id.clone())).await {
            Ok(k) => k,
            // To the caller this is no missing resource of theirs but a broken encryption chain.
            Err(e) if e.kind() == ErrorKind::KeyNotFound => {
                return Err(Error::new(
                    ErrorKind::DependencyFailure,
                    "the key that protects the secret's data no longer exists",
                ));
            }
            Err(e) => return Err(e),
        };
        Self::require_state(&key)?;
        Self::require_usage(&key, KeyUsage::Decrypt)?;
        let key_version = Self::version_of(&key, Some(sealed.key_version))?;
        let backend = self.inner.backends.get(&key_version.handle.backend)?;
        let (iv, wrapped) = sealed.wrapped_key.split_at(GCM_IV_LEN);
        let aad = binding_aad(&secret.tenant, &secret.path, sealed.version);
        let data_key = self
            .backend_call(backend.name(), backend.aes_gcm_decrypt(Self::material(&key, key_version), iv, &aad, wrapped))
            .await?;
        open_data(&data_key, &sealed.iv, &aad, &sealed.ciphertext)
    }

    /// The record if it exists and is not soft-deleted.
    async fn active_secret(&self, tenant: &TenantId, path: &SecretPath) -> Result<Secret> {
        match self.store_call(self.inner.store.get_secret(tenant, path)).await? {
            Some(s) if !s.is_deleted() => Ok(s),
            _ => Err(not_found()),
        }
    }

    async fn check_secret_quota(&self, tenant: &TenantId) -> Result<()> {
        let Some(limit) = self.inner.config.max_secrets_per_tenant else { return Ok(()) };
        let current = self.store_call(self.inner.store.count_secrets(tenant)).await?;
        if current >= limit {
            return Err(Error::new(ErrorKind::QuotaExceeded, "the tenant holds the maximum number of secrets")
                .with_detail("quota", "secrets")
                .with_detail("limit", limit.to_string())
                .with_detail("current", current.to_string()));
        }
        Ok(())
    }

    // ---- writes ----------------------------------------------------------------------------------------

    /// Writes a new version (creating the secret if the mode allows). Audited as `CreateSecret` for
    /// [`WriteMode::CreateOnly`], else `PutSecretValue`.
    ///
    /// Errors, in the order they are checked: `InvalidRequest` (value over `max_secret_bytes`, bad type,
    /// metadata, `max_versions`, version id or stage); `SecretNotFound` (`UpdateOnly` on a missing or
    /// soft-deleted secret); `SecretExists` (a soft-deleted secret still in retention holds the path; detail
    /// `recoverable_until`); `AlreadyExists` (`CreateOnly` on an existing secret); `VersionConflict` (`cas`
    /// mismatch with details `expected`/`current`, a duplicate `version_id`, or lasting contention);
    /// `QuotaExceeded` (creating beyond `max_secrets_per_tenant`); then the internal key's and the
    /// dependencies' errors.
    pub async fn put_secret(&self, caller: &Caller, req: PutSecretRequest) -> Result<SecretWrite> {
        let op = if req.mode == WriteMode::CreateOnly { Operation::CreateSecret } else { Operation::PutSecretValue };
        self.run(caller, op, Some(req.path.to_string()), self.put_secret_work(caller, &req)).await
    }

    async fn put_secret_work(&self, caller: &Caller, req: &PutSecretRequest) -> Result<SecretWrite> {
        let limit = self.inner.config.max_secret_bytes;
        if req.data.len() > limit {
            return Err(Error::invalid(format!("a secret value must be at most {limit} bytes"))
                .with_detail("limit", limit.to_string()));
        }
        if let Some(t) = &req.secret_type {
            check_secret_type(t)?;
        }
        if let Some(m) = &req.metadata {
            check_metadata(m)?;
        }
        if let Some(n) = req.max_versions {
            check_max_versions(n)?;
        }
        if let Some(id) = &req.version_id {
            check_version_id(id)?;
        }
        let stages = req.stages.clone().unwrap_or_else(|| vec![STAGE_CURRENT.to_owned()]);
        for s in &stages {
            check_stage(s)?;
            if s == STAGE_PREVIOUS {
                return Err(Error::invalid("the previous stage follows the current one and cannot be set on a write"));
            }
        }
        let store = &self.inner.store;
        let tenant = &caller.tenant;
        let mut key = None;
        for _ in 0..MAX_ATTEMPTS {
            let now = Timestamp::now();
            let (mut secret, created) = match self.store_call(store.get_secret(tenant, &req.path)).await? {
                Some(s) if s.is_deleted() => {
                    if s.is_recoverable(now) {
                        return Err(secret_exists(&s));
                    }
                    // Past retention but not swept yet: the path is free again. Purge it and start over.
                    self.store_call(store.delete_secret(tenant, &req.path, s.revision)).await?;
                    continue;
                }
                Some(_) if req.mode == WriteMode::CreateOnly => {
                    return Err(Error::new(ErrorKind::AlreadyExists, "a secret already exists at that path"));
                }
                Some(s) => (s, false),
                None if req.mode == WriteMode::UpdateOnly => return Err(not_found()),
                None => (Secret::new(tenant.clone(), req.path.clone(), now), true),
            };
            if let Some(expected) = req.cas
                && expected != secret.current_version
            {
                return Err(cas_conflict(expected, secret.current_version));
            }
            if created {
                self.check_secret_quota(tenant).await?;
            }
            if let Some(t) = &req.secret_type {
                secret.secret_type.clone_from(t);
            }
            if let Some(m) = &req.metadata {
                secret.metadata = m.clone();
            }
            if let Some(n) = req.max_versions {
                secret.max_versions = n;
            }
            match req.expires_at {
                Some(at) => secret.expires_at = at,
                // A write after expiry revives the secret; a pending expiry stays.
                None if secret.is_expired(now) => secret.expires_at = None,
                None => {}
            }
            let version = secret.add_version(req.version_id.as_deref(), &stages, now, &caller.identity)?;
            let prune = secret.prune();
            let k = match &key {
                Some(k) => Arc::clone(k),
                None => {
                    let k = self.secrets_key(caller).await?;
                    key = Some(Arc::clone(&k));
                    k
                }
            };
            let sealed = self.seal_version(&k, tenant, &req.path, version, &req.data).await?;
            let stored = if created {
                match self.store_call(store.create_secret(&secret, &sealed)).await {
                    Ok(s) => Some(s),
                    // Another writer created it meanwhile: read it again and update instead (or refuse).
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => None,
                    Err(e) => return Err(e),
                }
            } else {
                self.store_call(store.put_secret_version(&secret, &sealed, &prune)).await?
            };
            if let Some(stored) = stored {
                let info =
                    stored.version(version).cloned().ok_or_else(|| Error::internal("a written version is missing"))?;
                return Ok(SecretWrite { secret: stored, version: info, created });
            }
        }
        Err(contended())
    }

    /// Writes a new version holding the data of `version`, and makes it current (REST `:rollback`). `cas`:
    /// the version the caller expects to be current.
    ///
    /// Errors: `SecretNotFound`, `SecretVersionNotFound` (pruned or never written), `VersionConflict`,
    /// `SecretExpired` (the old data cannot be read), then those of the internal key.
    pub async fn rollback_secret(
        &self,
        caller: &Caller,
        path: &SecretPath,
        version: u32,
        cas: Option<u32>,
    ) -> Result<SecretWrite> {
        self.run(caller, Operation::RollbackSecret, Some(path.to_string()), async {
            let store = &self.inner.store;
            let tenant = &caller.tenant;
            for _ in 0..MAX_ATTEMPTS {
                let now = Timestamp::now();
                let mut secret = self.active_secret(tenant, path).await?;
                secret.select(&SecretSelector::Version(version))?;
                if let Some(expected) = cas
                    && expected != secret.current_version
                {
                    return Err(cas_conflict(expected, secret.current_version));
                }
                if let Some(at) = secret.expires_at.filter(|_| secret.is_expired(now)) {
                    return Err(expired(at));
                }
                let sealed = self
                    .store_call(store.get_secret_version(tenant, path, version))
                    .await?
                    .ok_or_else(version_not_found)?;
                let data = self.open_version(&secret, &sealed).await?;
                let new_version = secret.add_version(None, &[STAGE_CURRENT.to_owned()], now, &caller.identity)?;
                let prune = secret.prune();
                let key = self.secrets_key(caller).await?;
                let sealed = self.seal_version(&key, tenant, path, new_version, &data).await?;
                drop(data);
                if let Some(stored) = self.store_call(store.put_secret_version(&secret, &sealed, &prune)).await? {
                    let info = stored
                        .version(new_version)
                        .cloned()
                        .ok_or_else(|| Error::internal("a written version is missing"))?;
                    return Ok(SecretWrite { secret: stored, version: info, created: false });
                }
            }
            Err(contended())
        })
        .await
    }

    /// Reads the record, applies `change` and writes it back with its pruned versions, conditional on the
    /// revision read; starts over when another writer got there first. The record must be active.
    async fn mutate_secret(
        &self,
        tenant: &TenantId,
        path: &SecretPath,
        mut change: impl FnMut(&mut Secret) -> Result<()>,
    ) -> Result<Secret> {
        for _ in 0..MAX_ATTEMPTS {
            let mut secret = self.active_secret(tenant, path).await?;
            change(&mut secret)?;
            secret.updated_at = Timestamp::now();
            let prune = secret.prune();
            if let Some(stored) = self.store_call(self.inner.store.update_secret(&secret, &prune)).await? {
                return Ok(stored);
            }
        }
        Err(contended())
    }

    /// Changes metadata, type, expiry or `max_versions` (lowering it prunes at once); writes no version.
    ///
    /// Errors: `InvalidRequest`, `SecretNotFound`, `VersionConflict` (`expected_revision`, details
    /// `expected`/`current`).
    pub async fn update_secret_metadata(
        &self,
        caller: &Caller,
        path: &SecretPath,
        patch: SecretPatch,
    ) -> Result<Secret> {
        self.run(caller, Operation::UpdateSecret, Some(path.to_string()), async {
            if let Some(m) = &patch.metadata {
                check_metadata(m)?;
            }
            if let Some(t) = &patch.secret_type {
                check_secret_type(t)?;
            }
            if let Some(n) = patch.max_versions {
                check_max_versions(n)?;
            }
            self.mutate_secret(&caller.tenant, path, |s| {
                if let Some(expected) = patch.expected_revision
                    && expected != s.revision
                {
                    return Err(revision_conflict(expected, s.revision));
                }
                if let Some(m) = &patch.metadata {
                    s.metadata = m.clone();
                }
                if let Some(t) = &patch.secret_type {
                    s.secret_type.clone_from(t);
                }
                if let Some(at) = patch.expires_at {
                    s.expires_at = at;
                }
                if let Some(n) = patch.max_versions {
                    s.max_versions = n;
                }
                Ok(())
            })
            .await
        })
        .await
    }

    /// Moves or removes a version stage (Alibaba `UpdateSecretVersionStage`). Moving `current` also moves
    /// `previous` to the version that was current. `current` and `previous` can only be moved (`move_to` is
    /// required for them); `remove_from`, when given, must hold the stage. Returns the record.
    ///
    /// Errors: `InvalidRequest`, `SecretNotFound`, `SecretVersionNotFound`.
    pub async fn update_secret_version_stage(
        &self,
        caller: &Caller,
        path: &SecretPath,
        stage: &str,
        move_to: Option<VersionSelector>,
        remove_from: Option<VersionSelector>,
    ) -> Result<Secret> {
        self.run(caller, Operation::UpdateSecretVersionStage, Some(path.to_string()), async {
            check_stage(stage)?;
            if move_to.is_none() && remove_from.is_none() {
                return Err(Error::invalid("name the version to move the stage to, or to remove it from"));
            }
            if (stage == STAGE_CURRENT || stage == STAGE_PREVIOUS) && move_to.is_none() {
                return Err(Error::invalid("the current and previous stages can only be moved to another version"));
            }
            self.mutate_secret(&caller.tenant, path, |s| {
                let to = move_to.as_ref().map(|sel| s.select_version(sel).map(|v| v.version)).transpose()?;
                let from = remove_from.as_ref().map(|sel| s.select_version(sel)).transpose()?;
                if let Some(from) = from
                    && !from.has_stage(stage)
                {
                    return Err(Error::invalid("the version to remove the stage from does not hold it"));
                }
                let from = from.map(|v| v.version);
                match (to, from) {
                    (Some(to), _) => s.move_stage(stage, to),
                    (None, Some(from)) => s.remove_stage(stage, from),
                    (None, None) => Ok(()),
                }
            })
            .await
        })
        .await
    }

    /// Soft-deletes (recoverable for `retention`, at most [`MAX_RETENTION`]) or permanently deletes a secret.
    /// Returns the record as the delete left it (soft) or as it was (permanent). A permanent delete also
    /// takes soft-deleted secrets.
    ///
    /// Errors: `InvalidRequest` (retention), `SecretNotFound` (missing; or already soft-deleted, for a soft
    /// delete).
    pub async fn delete_secret(&self, caller: &Caller, path: &SecretPath, mode: DeleteMode) -> Result<Secret> {
        self.run(caller, Operation::DeleteSecret, Some(path.to_string()), async {
            let store = &self.inner.store;
            let tenant = &caller.tenant;
            match mode {
                DeleteMode::Soft { retention } => {
                    if retention.is_zero() || retention > MAX_RETENTION {
                        return Err(Error::invalid("the retention must be more than zero and at most 365 days"));
                    }
                    self.mutate_secret(tenant, path, |s| {
                        let now = Timestamp::now();
                        s.deleted_at = Some(now);
                        s.recoverable_until = Some(Timestamp(now.0.saturating_add(millis(retention))));
                        Ok(())
                    })
                    .await
                }
                DeleteMode::Permanent => {
                    for _ in 0..MAX_ATTEMPTS {
                        let Some(secret) = self.store_call(store.get_secret(tenant, path)).await? else {
                            return Err(not_found());
                        };
                        if self.store_call(store.delete_secret(tenant, path, secret.revision)).await? {
                            return Ok(secret);
                        }
                    }
                    Err(contended())
                }
            }
        })
        .await
    }

    /// Undoes a soft delete within retention; a no-op on an active secret.
    ///
    /// Errors: `SecretNotFound` (missing, or past retention), `QuotaExceeded` (the restored secret counts).
    pub async fn restore_secret(&self, caller: &Caller, path: &SecretPath) -> Result<Secret> {
        self.run(caller, Operation::RestoreSecret, Some(path.to_string()), async {
            let store = &self.inner.store;
            let tenant = &caller.tenant;
            for _ in 0..MAX_ATTEMPTS {
                let Some(mut secret) = self.store_call(store.get_secret(tenant, path)).await? else {
                    return Err(not_found());
                };
                if !secret.is_deleted() {
                    return Ok(secret);
                }
                let now = Timestamp::now();
                if !secret.is_recoverable(now) {
                    return Err(not_found());
                }
                self.check_secret_quota(tenant).await?;
                secret.deleted_at = None;
                secret.recoverable_until = None;
                secret.updated_at = now;
                if let Some(stored) = self.store_call(store.update_secret(&secret, &[])).await? {
                    return Ok(stored);
                }
            }
            Err(contended())
        })
        .await
    }

    /// Permanently deletes the soft-deleted secrets of every tenant whose retention has passed (the sweeper).
    /// Each purge is audited as `PurgeSecret` under the secret's tenant. Returns what was purged.
    pub async fn purge_deleted_secrets(&self, caller: &Caller) -> Result<Vec<(TenantId, SecretPath)>> {
        let store = &self.inner.store;
        let mut purged = Vec::new();
        loop {
            let due = self.store_call(store.secrets_due_for_purge(Timestamp::now(), PURGE_BATCH)).await?;
            let full = u32::try_from(due.len()).is_ok_and(|n| n >= PURGE_BATCH);
            let mut progress = false;
            for secret in due {
                let as_tenant = Caller { tenant: secret.tenant.clone(), ..caller.clone() };
                let done = self
                    .run(&as_tenant, Operation::PurgeSecret, Some(secret.path.to_string()), async {
                        // Conditional on the revision found due: a secret restored meanwhile is never purged.
                        self.store_call(store.delete_secret(&secret.tenant, &secret.path, secret.revision)).await
                    })
                    .await;
                if matches!(done, Ok(true)) {
                    progress = true;
                    purged.push((secret.tenant, secret.path));
                }
            }
            // Stop on a short batch, or when nothing in a full one could be purged (it would come back).
            if !full || !progress {
                return Ok(purged);
            }
        }
    }

    // ---- reads -----------------------------------------------------------------------------------------

    /// A version's value with the metadata record.
    ///
    /// Errors, in order: `SecretNotFound` (missing or soft-deleted), `SecretVersionNotFound` (pruned, unknown
    /// number, id or stage), `SecretExpired` (detail `expired_at`; the metadata stays readable), then the
    /// internal key's (`InvalidKeyState`, `InvalidKeyUsage`, `InvalidCiphertext`, `DependencyFailure`,
    /// `DependencyTimeout`).
    pub async fn get_secret_value(
        &self,
        caller: &Caller,
        path: &SecretPath,
        selector: &SecretSelector,
    ) -> Result<SecretValue> {
        self.run(caller, Operation::GetSecretValue, Some(path.to_string()), async {
            let secret = self.active_secret(&caller.tenant, path).await?;
            let info = secret.select(selector)?.clone();
            if let Some(at) = secret.expires_at.filter(|_| secret.is_expired(Timestamp::now())) {
                return Err(expired(at));
            }
            let sealed = self
                .store_call(self.inner.store.get_secret_version(&caller.tenant, path, info.version))
                .await?
                // Pruned between the two reads.
                .ok_or_else(version_not_found)?;
            if sealed.version != info.version {
                return Err(Error::internal("the store returned another version"));
            }
            let data = self.open_version(&secret, &sealed).await?;
            Ok(SecretValue { secret, version: info, data })
        })
        .await
    }

    /// The metadata record (with its versions' numbers, ids and stages; never values). Soft-deleted secrets
    /// only with `include_deleted`. Expired secrets are described normally.
    pub async fn describe_secret(&self, caller: &Caller, path: &SecretPath, include_deleted: bool) -> Result<Secret> {
        self.run(caller, Operation::DescribeSecret, Some(path.to_string()), async {
            match self.store_call(self.inner.store.get_secret(&caller.tenant, path)).await? {
                Some(s) if include_deleted || !s.is_deleted() => Ok(s),
                _ => Err(not_found()),
            }
        })
        .await
    }

    /// Metadata records of the caller's tenant in path order. The store applies the prefix and deletion
    /// filters; type, tag and expiry filters are applied here, reading at most a few store pages per call:
    /// a page can then be short (even empty) and still have a `next` cursor. Only `next == None` ends a listing.
    pub async fn list_secrets(
        &self,
        caller: &Caller,
        filter: &SecretListFilter,
        page: &PageRequest,
    ) -> Result<Page<Secret>> {
        let resource = filter.store.prefix.as_ref().map(ToString::to_string);
        self.run(caller, Operation::ListSecrets, resource, async {
            let store = &self.inner.store;
            let tenant = &caller.tenant;
            if let Some(t) = &filter.secret_type {
                check_secret_type(t)?;
            }
            if !filter.filters_records() {
                return self.store_call(store.list_secrets(tenant, &filter.store, page)).await;
            }
            let limit = usize::try_from(page.effective_limit()).unwrap_or(usize::MAX);
            let now = Timestamp::now();
            let mut items = Vec::new();
            let mut after = page.after.clone();
            for _ in 0..LIST_SCAN_PAGES {
                let request = PageRequest { after: after.clone(), limit: page.limit };
                let batch = self.store_call(store.list_secrets(tenant, &filter.store, &request)).await?;
                let count = batch.items.len();
                for (i, secret) in batch.items.into_iter().enumerate() {
                    after = Some(secret.path.to_string());
                    if !filter.matches(&secret, now) {
                        continue;
                    }
                    items.push(secret);
                    if items.len() == limit {
                        // Full: continue after the last item returned (records of this batch after it are
                        // read again next time), unless this was the very last record.
                        let last = i + 1 == count && batch.next.is_none();
                        return Ok(Page { items, next: if last { None } else { after } });
                    }
                }
                if batch.next.is_none() {
                    return Ok(Page { items, next: None });
                }
            }
            Ok(Page { items, next: after })
        })
        .await
    }
}

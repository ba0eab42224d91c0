//! The store seam: keys, aliases, tenants, secrets and the change feed every replica follows. SQLite is the embedded
//! default; PostgreSQL serves several replicas. Both implement this one trait.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::model::{AliasName, Key, KeyId, Page, PageRequest, Tenant, TenantId, Timestamp};
use crate::secret::{SealedSecretVersion, Secret, SecretFilter, SecretPath};

/// An alias and the key it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasEntry {
    pub tenant: TenantId,
    pub alias: AliasName,
    pub key_id: KeyId,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// What a change-feed entry invalidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ChangeKind {
    Key,
    Alias,
    Tenant,
    Credential,
    Token,
    Policy,
    Secret,
    /// A document (see [`Document`]); the change's id is `<kind>/<document id>`.
    Document,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Key => "key",
            ChangeKind::Alias => "alias",
            ChangeKind::Tenant => "tenant",
            ChangeKind::Credential => "credential",
            ChangeKind::Token => "token",
            ChangeKind::Policy => "policy",
            ChangeKind::Secret => "secret",
            ChangeKind::Document => "document",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "key" => ChangeKind::Key,
            "alias" => ChangeKind::Alias,
            "tenant" => ChangeKind::Tenant,
            "credential" => ChangeKind::Credential,
            "token" => ChangeKind::Token,
            "policy" => ChangeKind::Policy,
            "secret" => ChangeKind::Secret,
            "document" => ChangeKind::Document,
            _ => return None,
        })
    }
}

/// One entry of the change feed: written in the same transaction as the change it announces, so a replica
/// that reads the feed never misses an invalidation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub seq: i64,
    pub tenant: TenantId,
    pub kind: ChangeKind,
    /// The id of what changed (key id, alias name, credential id...).
    pub id: String,
    pub at: Timestamp,
}

/// A small JSON record owned by a subsystem: XKS key stores and SigV4 credentials, Alibaba client keys and
/// access keys, tokens, policies. Ids are unique within a kind across tenants (an access key id names exactly
/// one credential), and the tenant is an attribute for listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    /// Namespace such as `xks.credential`: 1-64 of `a-z 0-9 . _ -`.
    pub kind: String,
    /// 1-256 printable ASCII characters.
    pub id: String,
    pub tenant: TenantId,
    pub body: serde_json::Value,
    /// Maintained by the store: 1 on insert, +1 on every write.
    pub revision: i64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl Document {
    pub fn new(kind: &str, id: &str, tenant: TenantId, body: serde_json::Value) -> Self {
        let now = Timestamp::now();
        Document {
            kind: kind.to_owned(),
            id: id.to_owned(),
            tenant,
            body,
            revision: 0,
            created_at: now,
            updated_at: now,
        }
    }

    /// The change-feed id of this document.
    pub fn change_id(&self) -> String {
        format!("{}/{}", self.kind, self.id)
    }
}

/// What a document write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Insert only: an existing document of that kind and id is `AlreadyExists`.
    Absent,
    /// Replace only if the stored revision is this one; otherwise the write returns `None`.
    Revision(i64),
    /// Insert or replace.
    Any,
}

/// A live replica, as its heartbeat last recorded it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replica {
    pub id: String,
    pub info: serde_json::Value,
    pub last_seen: Timestamp,
}

/// Durable state. Every write is durable once the call returns `Ok` (an acknowledged write survives a crash).
///
/// Errors: a store failure is `StorageFailure`; a timeout talking to the database is `DependencyTimeout`;
/// uniqueness violations are `AlreadyExists`; a lost optimistic-concurrency race is `Conflict`-like and
/// reported as `AlreadyExists` only for inserts: updates return `Ok(None)` so the caller can reload and retry.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// A real round trip to the database (readiness).
    async fn ping(&self) -> Result<()>;

    /// Creates the tenant if it does not exist; returns whether it was created.
    async fn ensure_tenant(&self, tenant: &Tenant) -> Result<bool>;
    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Tenant>>;
    async fn list_tenants(&self) -> Result<Vec<Tenant>>;

    /// Inserts a key (with all its versions) and its initial aliases in one transaction.
    /// A duplicate key id or alias is `AlreadyExists` and nothing is written.
    async fn create_key(&self, key: &Key, aliases: &[AliasName]) -> Result<Key>;
    async fn get_key(&self, tenant: &TenantId, id: &KeyId) -> Result<Option<Key>>;
    /// Keys of a tenant ordered by id; `after` is the last id of the previous page.
    async fn list_keys(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<Key>>;
    /// Replaces a key if its stored revision still equals `key.revision`; returns the stored key with the new
    /// revision, or `None` if another writer got there first (or the key is gone).
    async fn update_key(&self, key: &Key) -> Result<Option<Key>>;
    /// Removes a key and its aliases for good if its stored revision is still `revision` (so a deletion
    /// cancelled meanwhile is never purged); returns whether it was removed.
    async fn delete_key(&self, tenant: &TenantId, id: &KeyId, revision: i64) -> Result<bool>;
    /// Keys of every tenant pending deletion whose deletion time is at or before `now`.
    async fn keys_due_for_deletion(&self, now: Timestamp, limit: u32) -> Result<Vec<Key>>;
    /// Number of keys a tenant holds (quotas).
    async fn count_keys(&self, tenant: &TenantId) -> Result<u64>;

    /// `AlreadyExists` if the alias exists; `KeyNotFound` if the key does not.
    async fn create_alias(&self, tenant: &TenantId, alias: &AliasName, key: &KeyId) -> Result<AliasEntry>;
    /// Points an existing alias at another key; `AliasNotFound` / `KeyNotFound` otherwise.
    async fn update_alias(&self, tenant: &TenantId, alias: &AliasName, key: &KeyId) -> Result<AliasEntry>;
    /// Returns whether the alias existed.
    async fn delete_alias(&self, tenant: &TenantId, alias: &AliasName) -> Result<bool>;
    async fn get_alias(&self, tenant: &TenantId, alias: &AliasName) -> Result<Option<AliasEntry>>;
    /// Aliases ordered by name, optionally only those of one key; `after` is the last alias of the previous page.
    async fn list_aliases(
        &self,
        tenant: &TenantId,
        key: Option<&KeyId>,
        page: &PageRequest,
    ) -> Result<Page<AliasEntry>>;

    /// Appends to the change feed outside of a store mutation (e.g. a credential managed elsewhere).
    async fn record_change(&self, tenant: &TenantId, kind: ChangeKind, id: &str) -> Result<i64>;
    /// Changes with `seq > after`, oldest first, at most `limit`.
    async fn changes_since(&self, after: i64, limit: u32) -> Result<Vec<Change>>;
    /// The highest sequence number in the feed (0 when empty).
    async fn latest_change(&self) -> Result<i64>;
    /// Deletes feed entries older than `before` but always keeps the newest one (so sequence numbers never
    /// restart); returns how many were removed. Followers further behind than the retention reload.
    async fn prune_changes(&self, before: Timestamp) -> Result<u64>;

    /// Writes a document under `precondition`; returns the stored document (new revision), or `None` when a
    /// `Revision` precondition failed or the document is gone. Appends a `Document` change in the same
    /// transaction.
    async fn put_document(&self, doc: &Document, precondition: Precondition) -> Result<Option<Document>>;
    async fn get_document(&self, kind: &str, id: &str) -> Result<Option<Document>>;
    /// Documents of a kind ordered by id, optionally of one tenant; `after` is the last id of the previous page.
    async fn list_documents(&self, kind: &str, tenant: Option<&TenantId>, page: &PageRequest)
    -> Result<Page<Document>>;
    /// Returns whether the document existed. Appends a `Document` change.
    async fn delete_document(&self, kind: &str, id: &str) -> Result<bool>;

    /// Inserts a secret's record and its first version in one transaction; returns the record with revision 1.
    /// A record at that path, soft-deleted or not, is `AlreadyExists` and nothing is written.
    async fn create_secret(&self, secret: &Secret, first: &SealedSecretVersion) -> Result<Secret>;
    /// If the stored revision still equals `secret.revision`: replaces the record, inserts `version` and
    /// deletes the data of the versions in `prune`, in one transaction; returns the record with the new
    /// revision. `None` (nothing written) if another writer got there first or the secret is gone. A version
    /// number that already has data is `AlreadyExists`.
    async fn put_secret_version(
        &self,
        secret: &Secret,
        version: &SealedSecretVersion,
        prune: &[u32],
    ) -> Result<Option<Secret>>;
    /// Like [`Store::put_secret_version`] without a new version: metadata, soft deletion and restore, stage
    /// moves, and pruning when `max_versions` was lowered.
    async fn update_secret(&self, secret: &Secret, prune: &[u32]) -> Result<Option<Secret>>;
    /// The record, soft-deleted or not.
    async fn get_secret(&self, tenant: &TenantId, path: &SecretPath) -> Result<Option<Secret>>;
    /// One version's sealed data (`None` when pruned or never written).
    async fn get_secret_version(
        &self,
        tenant: &TenantId,
        path: &SecretPath,
        version: u32,
    ) -> Result<Option<SealedSecretVersion>>;
    /// Records of a tenant ordered by path (byte order); `after` is the last path of the previous page.
    async fn list_secrets(&self, tenant: &TenantId, filter: &SecretFilter, page: &PageRequest) -> Result<Page<Secret>>;
    /// Removes a secret and all its versions for good if its stored revision is still `revision` (so a secret
    /// restored or rewritten meanwhile is never purged); returns whether it was removed.
    async fn delete_secret(&self, tenant: &TenantId, path: &SecretPath, revision: i64) -> Result<bool>;
    /// Soft-deleted secrets of every tenant whose `recoverable_until` is at or before `now`, oldest first.
    async fn secrets_due_for_purge(&self, now: Timestamp, limit: u32) -> Result<Vec<Secret>>;
    /// Number of active (not soft-deleted) secrets a tenant holds (quotas: a restore counts again).
    async fn count_secrets(&self, tenant: &TenantId) -> Result<u64>;

    /// Records that replica `id` is alive (no change-feed entry: heartbeats are frequent).
    async fn heartbeat(&self, id: &str, info: &serde_json::Value) -> Result<()>;
    /// Replicas whose last heartbeat is at or after `since`.
    async fn live_replicas(&self, since: Timestamp) -> Result<Vec<Replica>>;
}

//! The store seam: keys, aliases, tenants and the change feed every replica follows. SQLite is the embedded
//! default; PostgreSQL serves several replicas. Both implement this one trait.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::model::{AliasName, Key, KeyId, Page, PageRequest, Tenant, TenantId, Timestamp};

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
    /// Removes a key and its aliases for good; returns whether it existed.
    async fn delete_key(&self, tenant: &TenantId, id: &KeyId) -> Result<bool>;
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
}

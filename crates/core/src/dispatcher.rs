//! The dispatcher: every operation of every frontend passes through here, and only here do authorization,
//! rate limits, key resolution, state and usage checks, backend deadlines, audit and metrics happen.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use moka::future::Cache;
use sha2::{Digest, Sha256};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::audit::{AuditEvent, AuditSink, Operation, Outcome};
use crate::backend::{
    AES_BLOCK_LEN, AesBlockMode, BlockPadding, EncryptionAlgorithm, GCM_IV_LEN, GCM_TAG_LEN, HealthStatus, KeyBackend,
    KeyMaterialRef, MemberHealth, SigningAlgorithm,
};
use crate::error::{Error, ErrorKind, Result};
use crate::metrics::{BackendCall, CacheKind, CoreMetrics, Limiter};
use crate::model::{
    AliasName, Caller, Key, KeyId, KeyOrigin, KeyRef, KeySpec, KeyState, KeyUsage, KeyUsageSet, KeyVersion, Page,
    PageRequest, Tenant, TenantId, Timestamp,
};
use crate::policy::{Authorizer, RateLimiter};
use crate::store::{AliasEntry, Change, ChangeKind, Document, Precondition, Replica, Store};

mod secrets;

/// Tunables of the dispatcher; the server fills them from configuration.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Deadline of one backend (HSM) call on the request path.
    pub backend_deadline: Duration,
    /// Deadline of key generation (create, rotate): RSA generation takes hundreds of milliseconds in
    /// software and can take seconds in an HSM, far beyond a request-path deadline.
    pub keygen_deadline: Duration,
    /// Deadline of one store call.
    pub store_deadline: Duration,
    /// Entries in each resolution cache (keys, aliases).
    pub cache_capacity: u64,
    /// Backstop expiry of cached keys, should the change feed ever be missed.
    pub cache_ttl: Duration,
    /// The backend new keys go to when the request names none.
    pub default_backend: String,
    /// Largest plaintext accepted by symmetric encryption.
    pub max_plaintext: usize,
    /// Largest AAD accepted.
    pub max_aad: usize,
    /// Keys a tenant may hold (`None`: unlimited).
    pub max_keys_per_tenant: Option<u64>,
    /// Active (not soft-deleted) secrets a tenant may hold (`None`: unlimited).
    pub max_secrets_per_tenant: Option<u64>,
    /// Largest secret value accepted, in bytes; larger is `InvalidRequest`.
    pub max_secret_bytes: usize,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            backend_deadline: Duration::from_millis(200),
            keygen_deadline: Duration::from_secs(30),
            store_deadline: Duration::from_secs(2),
            cache_capacity: 100_000,
            cache_ttl: Duration::from_secs(60),
            default_backend: "software".to_owned(),
            max_plaintext: 64 * 1024,
            max_aad: 64 * 1024,
            max_keys_per_tenant: None,
            max_secrets_per_tenant: None,
            max_secret_bytes: 64 * 1024,
        }
    }
}

/// Everything `create_key` needs.
#[derive(Debug, Clone)]
pub struct CreateKeyRequest {
    pub spec: KeySpec,
    /// `None`: the spec's default usages. Any subset of the spec's allowed usages, including none.
    pub usage: Option<KeyUsageSet>,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    pub aliases: Vec<AliasName>,
    /// `None`: the configured default backend.
    pub backend: Option<String>,
    /// `None`: a generated UUID.
    pub id: Option<KeyId>,
    /// `true`: create in `PendingImport` with no usable material until `import_key_material`.
    pub external: bool,
}

impl CreateKeyRequest {
    pub fn new(spec: KeySpec) -> Self {
        CreateKeyRequest {
            spec,
            usage: None,
            description: String::new(),
            tags: BTreeMap::new(),
            aliases: Vec::new(),
            backend: None,
            id: None,
            external: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EncryptRequest {
    pub key: KeyRef,
    /// `None`: the spec's default (AES-GCM for AES keys, OAEP-SHA256 for RSA keys).
    pub algorithm: Option<EncryptionAlgorithm>,
    pub plaintext: Zeroizing<Vec<u8>>,
    pub aad: Vec<u8>,
    /// `None`: a fresh random IV (12 bytes for AES-GCM, 16 for AES-CBC; AES-ECB and RSA use none).
    pub iv: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptReply {
    pub key_id: KeyId,
    pub version: Uuid,
    pub algorithm: EncryptionAlgorithm,
    /// Empty for RSA and AES-ECB.
    pub iv: Vec<u8>,
    pub ciphertext: Vec<u8>,
    /// 16 bytes for AES-GCM, empty otherwise.
    pub tag: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct DecryptRequest {
    pub key: KeyRef,
    /// `None`: the primary version. A version the key does not have is an invalid ciphertext.
    pub version: Option<Uuid>,
    pub algorithm: Option<EncryptionAlgorithm>,
    pub iv: Vec<u8>,
    pub aad: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub tag: Vec<u8>,
}

#[derive(Debug)]
pub struct DecryptReply {
    pub key_id: KeyId,
    pub version: Uuid,
    pub plaintext: Zeroizing<Vec<u8>>,
}

#[derive(Debug)]
pub struct DataKeyReply {
    pub plaintext: Zeroizing<Vec<u8>>,
    pub encrypted: EncryptReply,
}

/// What to sign: the message (hashed here with SHA-256) or its SHA-256 digest.
#[derive(Debug, Clone)]
pub enum SignInput {
    Message(Vec<u8>),
    Digest(Vec<u8>),
}

#[derive(Debug, Clone)]
pub struct SignRequest {
    pub key: KeyRef,
    pub algorithm: SigningAlgorithm,
    pub input: SignInput,
    /// `None`: the primary version.
    pub version: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignReply {
    pub key_id: KeyId,
    pub version: Uuid,
    pub signature: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKeyReply {
    pub key_id: KeyId,
    pub version: Uuid,
    pub spec: KeySpec,
    /// DER SubjectPublicKeyInfo.
    pub der: Vec<u8>,
}

/// Health of the store and of every backend fleet member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    pub store_ok: bool,
    pub members: Vec<MemberHealth>,
}

impl HealthReport {
    pub fn ready(&self) -> bool {
        self.store_ok && self.members.iter().any(|m| m.status != HealthStatus::Unavailable)
    }
}

/// The registered backends by name (each a fleet member or a group of them).
#[derive(Debug, Clone, Default)]
pub struct Backends {
    by_name: HashMap<String, Arc<dyn KeyBackend>>,
}

impl Backends {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, backend: Arc<dyn KeyBackend>) {
        self.by_name.insert(backend.name().to_owned(), backend);
    }

    pub fn get(&self, name: &str) -> Result<&Arc<dyn KeyBackend>> {
        self.by_name.get(name).ok_or_else(|| {
            Error::new(ErrorKind::DependencyFailure, "the key's backend is not configured on this server")
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn KeyBackend>> {
        self.by_name.values()
    }
}

type KeyCacheKey = (TenantId, KeyId);
type DocCacheKey = (String, String);
type AliasCacheKey = (TenantId, AliasName);

struct Inner {
    store: Arc<dyn Store>,
    backends: Backends,
    audit: Arc<dyn AuditSink>,
    authorizer: Arc<dyn Authorizer>,
    limiter: Arc<dyn RateLimiter>,
    config: DispatcherConfig,
    keys: Cache<KeyCacheKey, Arc<Key>>,
    aliases: Cache<AliasCacheKey, KeyId>,
    /// Documents found, by (kind, id); invalidated by the change feed.
    documents: Cache<DocCacheKey, Arc<Document>>,
    /// Documents not found, briefly: unknown credential ids must not cost a store round trip each, yet a
    /// document created in another process must become visible quickly.
    missing_documents: Cache<DocCacheKey, ()>,
    /// Every applied change, for frontends that keep caches of their own.
    change_tx: tokio::sync::broadcast::Sender<Change>,
    /// Highest change-feed sequence number this process has applied.
    change_cursor: AtomicI64,
    metrics: Arc<CoreMetrics>,
}

/// The core dispatcher. Cheap to clone; clones share caches and state.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("store", &self.inner.store)
            .field("backends", &self.inner.backends.names().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Builds a [`Dispatcher`].
#[derive(Debug)]
pub struct DispatcherBuilder {
    store: Arc<dyn Store>,
    backends: Backends,
    audit: Arc<dyn AuditSink>,
    authorizer: Arc<dyn Authorizer>,
    limiter: Arc<dyn RateLimiter>,
    config: DispatcherConfig,
}

impl DispatcherBuilder {
    pub fn backend(mut self, backend: Arc<dyn KeyBackend>) -> Self {
        self.backends.add(backend);
        self
    }

    pub fn audit(mut self, audit: Arc<dyn AuditSink>) -> Self {
        self.audit = audit;
        self
    }

    pub fn authorizer(mut self, authorizer: Arc<dyn Authorizer>) -> Self {
        self.authorizer = authorizer;
        self
    }

    pub fn rate_limiter(mut self, limiter: Arc<dyn RateLimiter>) -> Self {
        self.limiter = limiter;
        self
    }

    pub fn config(mut self, config: DispatcherConfig) -> Self {
        self.config = config;
        self
    }

    /// Builds the dispatcher; the change-feed cursor starts at the feed's current end, so only later changes
    /// invalidate (the caches start empty).
    pub async fn build(self) -> Result<Dispatcher> {
        if self.backends.by_name.is_empty() {
            return Err(Error::internal("no key backend is configured"));
        }
        self.backends.get(&self.config.default_backend)?;
        let cursor = self.store.latest_change().await?;
        let cfg = &self.config;
        let inner = Inner {
            keys: Cache::builder().max_capacity(cfg.cache_capacity).time_to_live(cfg.cache_ttl).build(),
            aliases: Cache::builder().max_capacity(cfg.cache_capacity).time_to_live(cfg.cache_ttl).build(),
            documents: Cache::builder().max_capacity(cfg.cache_capacity).time_to_live(cfg.cache_ttl).build(),
            missing_documents: Cache::builder()
                .max_capacity(cfg.cache_capacity)
                .time_to_live(Duration::from_secs(1))
                .build(),
            change_tx: tokio::sync::broadcast::channel(1024).0,
            change_cursor: AtomicI64::new(cursor),
            metrics: Arc::new(CoreMetrics::new(self.backends.names())),
            store: self.store,
            backends: self.backends,
            audit: self.audit,
            authorizer: self.authorizer,
            limiter: self.limiter,
            config: self.config,
        };
        Ok(Dispatcher { inner: Arc::new(inner) })
    }
}

fn random_bytes(len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    getrandom(&mut buf)?;
    Ok(buf)
}

/// IVs come from the OS generator: unique per encryption without a round trip to the HSM.
fn getrandom(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| Error::internal("the system random generator failed").with_source(e.to_string()))
}

fn sha256(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

impl Dispatcher {
    pub fn builder(store: Arc<dyn Store>) -> DispatcherBuilder {
        DispatcherBuilder {
            store,
            backends: Backends::new(),
            audit: Arc::new(crate::audit::TracingAuditSink),
            authorizer: Arc::new(crate::policy::AllowWithinTenant),
            limiter: Arc::new(crate::policy::Unlimited),
            config: DispatcherConfig::default(),
        }
    }

    pub fn config(&self) -> &DispatcherConfig {
        &self.inner.config
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn backends(&self) -> &Backends {
        &self.inner.backends
    }

    pub fn audit_sink(&self) -> &Arc<dyn AuditSink> {
        &self.inner.audit
    }

    /// The dispatcher's metrics (operations, backend calls, caches, rate limits).
    pub fn metrics(&self) -> &Arc<CoreMetrics> {
        &self.inner.metrics
    }

    // ---- the one wrapper every operation goes through -------------------------------------------------

    /// Authorize, rate-limit, run, audit. `resource` names what the operation touches.
    async fn run<T, F>(&self, caller: &Caller, op: Operation, resource: Option<String>, work: F) -> Result<T>
    where
        F: Future<Output = Result<T>>,
    {
        self.run_checked(caller, op, resource, true, work).await
    }

    /// Bookkeeping an operation needs but its caller did not ask for (creating the tenant's internal keys):
    /// audited like any operation, but neither rate-limited nor authorized again. The operation that needs it
    /// was, and a caller allowed to write secrets must not also need the right to create keys.
    async fn run_internal<T, F>(&self, caller: &Caller, op: Operation, resource: Option<String>, work: F) -> Result<T>
    where
        F: Future<Output = Result<T>>,
    {
        self.run_checked(caller, op, resource, false, work).await
    }

    async fn run_checked<T, F>(
        &self,
        caller: &Caller,
        op: Operation,
        resource: Option<String>,
        check: bool,
        work: F,
    ) -> Result<T>
    where
        F: Future<Output = Result<T>>,
    {
        let started = Instant::now();
        let result = async {
            if check {
                if let Err(e) = self.inner.limiter.check(caller, op) {
                    self.inner.metrics.rate_limited(caller.frontend, Limiter::Dispatcher);
                    return Err(e);
                }
                self.inner.authorizer.authorize(caller, op, resource.as_deref())?;
            }
            work.await
        }
        .await;
        let elapsed = started.elapsed();
        self.inner.metrics.operation(caller.frontend, op, elapsed, result.as_ref().err().map(Error::kind));
        let latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(e) => {
                if let Some(src) = e.internal_source() {
                    tracing::warn!(operation = op.as_str(), kind = e.kind().as_str(), source = %src, "operation failed");
                }
                Outcome::Error { kind: e.kind().as_str() }
            }
        };
        // The trace fields of the request span (see the server's telemetry module). Spans that do not declare
        // them, as when tracing export is off, ignore these calls.
        let span = tracing::Span::current();
        span.record("frontend", caller.frontend.as_str());
        span.record("operation", op.as_str());
        span.record("tenant", caller.tenant.as_str());
        if let Some(r) = &resource {
            span.record("key_id", r.as_str());
        }
        span.record(
            "outcome",
            match &outcome {
                Outcome::Ok => "ok",
                Outcome::Error { kind } => kind,
            },
        );
        // Building the event copies the caller's metadata and strings: skipped when the sink would drop it.
        if self.inner.audit.enabled() {
            self.inner.audit.record(&AuditEvent {
                at: Timestamp::now(),
                request_id: caller.request_id.clone(),
                tenant: caller.tenant.to_string(),
                identity: caller.identity.clone(),
                frontend: caller.frontend,
                operation: op,
                resource,
                outcome,
                latency_us,
                metadata: caller.metadata.clone(),
            });
        }
        result
    }

    /// A store call under the store deadline.
    async fn store_call<T>(&self, fut: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(crate::deadline::bound(self.inner.config.store_deadline), fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(ErrorKind::DependencyTimeout, "the store did not answer in time")),
        }
    }

    /// Key generation under its own, longer deadline.
    async fn keygen_call<T>(&self, backend: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
        let started = Instant::now();
        let r = tokio::time::timeout(crate::deadline::bound(self.inner.config.keygen_deadline), fut).await;
        self.record_backend_call(backend, BackendCall::Keygen, started, &r);
        match r {
            Ok(r) => r,
            Err(_) => Err(Error::new(ErrorKind::DependencyTimeout, "the key backend did not generate the key in time")),
        }
    }

    /// A backend call under the backend deadline.
    async fn backend_call<T>(&self, backend: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
        let started = Instant::now();
        let r = tokio::time::timeout(crate::deadline::bound(self.inner.config.backend_deadline), fut).await;
        self.record_backend_call(backend, BackendCall::Crypto, started, &r);
        match r {
            Ok(r) => r,
            Err(_) => Err(Error::new(ErrorKind::DependencyTimeout, "the key backend did not answer in time")),
        }
    }

    fn record_backend_call<T>(
        &self,
        backend: &str,
        call: BackendCall,
        started: Instant,
        r: &std::result::Result<Result<T>, tokio::time::error::Elapsed>,
    ) {
        let m = &self.inner.metrics;
        // A refusal of the caller's input (a tag that does not authenticate, a bad signature) is the backend
        // working: only timeouts and failures of the backend itself count against it.
        let (timeout, ok) = match r {
            Err(_) => (true, false),
            Ok(Err(e)) => match e.kind() {
                ErrorKind::DependencyTimeout => (true, false),
                ErrorKind::DependencyFailure | ErrorKind::StorageFailure | ErrorKind::Internal => (false, false),
                _ => (false, true),
            },
            Ok(Ok(_)) => (false, true),
        };
        m.backend_call(m.backend_index(backend), call, started.elapsed(), timeout, ok);
    }

    // ---- resolution and caches -------------------------------------------------------------------------

    async fn resolve_id(&self, tenant: &TenantId, key: &KeyRef) -> Result<KeyId> {
        match key {
            KeyRef::Id(id) => Ok(id.clone()),
            KeyRef::Alias(alias) => {
                let ck = (tenant.clone(), alias.clone());
                let store = self.inner.store.clone();
                // The loader runs only on a miss (and once for concurrent misses of the same entry).
                let missed = std::sync::atomic::AtomicBool::new(false);
                let loaded = self
                    .inner
                    .aliases
                    .try_get_with(ck, async {
                        missed.store(true, Ordering::Relaxed);
                        match self.store_call(store.get_alias(tenant, alias)).await? {
                            Some(entry) => Ok(entry.key_id),
                            None => Err(Error::new(ErrorKind::AliasNotFound, "the alias does not exist")),
                        }
                    })
                    .await;
                self.inner.metrics.cache(CacheKind::Alias, !missed.load(Ordering::Relaxed));
                loaded.map_err(unshare)
            }
        }
    }

    /// Resolves a caller's id or alias to the key, through the cache. The gateway's internal keys
    /// ([`Key::is_internal`], aliases under [`AliasName::INTERNAL_PREFIX`]) are `KeyNotFound`, exactly as a key
    /// that does not exist, so no frontend can use or probe them. Unknown keys are not cached.
    pub async fn resolve(&self, tenant: &TenantId, key: &KeyRef) -> Result<Arc<Key>> {
        if let KeyRef::Alias(a) = key
            && a.is_internal()
        {
            return Err(Error::key_not_found());
        }
        let k = self.resolve_any(tenant, key).await?;
        if k.is_internal() {
            return Err(Error::key_not_found());
        }
        Ok(k)
    }

    /// Resolves any key, internal ones included: for the dispatcher's own paths only, never a caller's input.
    async fn resolve_any(&self, tenant: &TenantId, key: &KeyRef) -> Result<Arc<Key>> {
        let id = self.resolve_id(tenant, key).await.map_err(|e| {
            // An alias that points nowhere is, to the caller, a key that does not exist.
            if e.kind() == ErrorKind::AliasNotFound { Error::key_not_found() } else { e }
        })?;
        let store = self.inner.store.clone();
        let missed = std::sync::atomic::AtomicBool::new(false);
        let loaded = self
            .inner
            .keys
            .try_get_with((tenant.clone(), id.clone()), async {
                missed.store(true, Ordering::Relaxed);
                match self.store_call(store.get_key(tenant, &id)).await? {
                    Some(k) => Ok(Arc::new(k)),
                    None => Err(Error::key_not_found()),
                }
            })
            .await;
        self.inner.metrics.cache(CacheKind::Key, !missed.load(Ordering::Relaxed));
        loaded.map_err(unshare)
    }

    async fn invalidate_key(&self, tenant: &TenantId, id: &KeyId) {
        self.inner.keys.invalidate(&(tenant.clone(), id.clone())).await;
    }

    async fn invalidate_alias(&self, tenant: &TenantId, alias: &AliasName) {
        self.inner.aliases.invalidate(&(tenant.clone(), alias.clone())).await;
    }

    /// Applies the store's change feed to the caches: called periodically so other processes' changes
    /// (CLI, other replicas) are seen within one poll interval. Returns how many changes were applied.
    pub async fn apply_changes(&self) -> Result<usize> {
        let mut applied = 0;
        loop {
            let after = self.inner.change_cursor.load(Ordering::Acquire);
            let changes = self.store_call(self.inner.store.changes_since(after, 1000)).await?;
            if changes.is_empty() {
                return Ok(applied);
            }
            for c in &changes {
                match c.kind {
                    ChangeKind::Key => {
                        if let Ok(id) = KeyId::parse(&c.id) {
                            self.invalidate_key(&c.tenant, &id).await;
                        }
                    }
                    ChangeKind::Alias => {
                        if let Ok(a) = AliasName::parse(&c.id) {
                            self.invalidate_alias(&c.tenant, &a).await;
                        }
                    }
                    ChangeKind::Document => {
                        if let Some((kind, id)) = c.id.split_once('/') {
                            self.invalidate_document(kind, id).await;
                        }
                    }
                    _ => {}
                }
                self.inner.change_cursor.fetch_max(c.seq, Ordering::AcqRel);
                // No receiver is fine; a lagging one resynchronises from its own cache expiry.
                let _ = self.inner.change_tx.send(c.clone());
            }
            applied += changes.len();
        }
    }

    /// The sequence number of the last change applied.
    pub fn change_cursor(&self) -> i64 {
        self.inner.change_cursor.load(Ordering::Acquire)
    }

    /// Every change this process applies from the feed (its own and other processes'), for frontend caches.
    pub fn subscribe_changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.inner.change_tx.subscribe()
    }

    // ---- documents and replicas ------------------------------------------------------------------------

    async fn invalidate_document(&self, kind: &str, id: &str) {
        let k = (kind.to_owned(), id.to_owned());
        self.inner.documents.invalidate(&k).await;
        self.inner.missing_documents.invalidate(&k).await;
    }

    /// A document through the cache: the hot-path lookup of credentials and frontend configuration. Not
    /// audited (it is part of authenticating a request, which the request's own operation audits).
    pub async fn document(&self, kind: &str, id: &str) -> Result<Option<Arc<Document>>> {
        let k = (kind.to_owned(), id.to_owned());
        if let Some(d) = self.inner.documents.get(&k).await {
            self.inner.metrics.cache(CacheKind::Document, true);
            return Ok(Some(d));
        }
        if self.inner.missing_documents.contains_key(&k) {
            self.inner.metrics.cache(CacheKind::Document, true);
            return Ok(None);
        }
        self.inner.metrics.cache(CacheKind::Document, false);
        match self.store_call(self.inner.store.get_document(kind, id)).await? {
            Some(d) => {
                let d = Arc::new(d);
                self.inner.documents.insert(k, d.clone()).await;
                Ok(Some(d))
            }
            None => {
                self.inner.missing_documents.insert(k, ()).await;
                Ok(None)
            }
        }
    }

    /// Writes a document (admin change, audited).
    pub async fn put_document(&self, caller: &Caller, doc: Document, pre: Precondition) -> Result<Option<Document>> {
        self.run(caller, Operation::PutDocument, Some(doc.change_id()), async {
            let stored = self.store_call(self.inner.store.put_document(&doc, pre)).await?;
            self.invalidate_document(&doc.kind, &doc.id).await;
            Ok(stored)
        })
        .await
    }

    /// Deletes a document (admin change, audited); returns whether it existed.
    pub async fn delete_document(&self, caller: &Caller, kind: &str, id: &str) -> Result<bool> {
        self.run(caller, Operation::DeleteDocument, Some(format!("{kind}/{id}")), async {
            let existed = self.store_call(self.inner.store.delete_document(kind, id)).await?;
            self.invalidate_document(kind, id).await;
            Ok(existed)
        })
        .await
    }

    /// Documents of a kind straight from the store (admin listings).
    pub async fn list_documents(
        &self,
        kind: &str,
        tenant: Option<&TenantId>,
        page: &PageRequest,
    ) -> Result<Page<Document>> {
        self.store_call(self.inner.store.list_documents(kind, tenant, page)).await
    }

    /// Records that this replica is alive.
    pub async fn heartbeat(&self, replica: &str, info: &serde_json::Value) -> Result<()> {
        self.store_call(self.inner.store.heartbeat(replica, info)).await
    }

    /// Replicas seen within `window`.
    pub async fn live_replicas(&self, window: Duration) -> Result<Vec<Replica>> {
        let ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        let since = Timestamp(Timestamp::now().0.saturating_sub(ms));
        self.store_call(self.inner.store.live_replicas(since)).await
    }

    /// Drops change-feed entries older than `retention`.
    pub async fn prune_changes(&self, retention: Duration) -> Result<u64> {
        let ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        self.store_call(self.inner.store.prune_changes(Timestamp(Timestamp::now().0.saturating_sub(ms)))).await
    }

    // ---- sealing of stored credentials -----------------------------------------------------------------

    /// The alias of each tenant's internal sealing key.
    pub const SEALING_ALIAS: &'static str = "alias/kmsgate-internal/sealing";

    async fn sealing_key(&self, caller: &Caller) -> Result<Arc<Key>> {
        self.internal_key(
            caller,
            Self::SEALING_ALIAS,
            None,
            "kmsgate internal: seals stored credentials (SigV4 and HMAC secrets); never delete",
        )
        .await
    }

    /// The tenant's internal AES key named `alias` (under [`AliasName::INTERNAL_PREFIX`]), created in `backend`
    /// (default: the default backend) on first use, flagged [`Key::internal`]. Creation is audited as
    /// `CreateKey` but not authorized separately (see [`Dispatcher::run_internal`]).
    async fn internal_key(
        &self,
        caller: &Caller,
        alias: &str,
        backend: Option<&str>,
        description: &str,
    ) -> Result<Arc<Key>> {
        let alias = AliasName::parse(alias)?;
        if !alias.is_internal() {
            return Err(Error::internal("an internal key's alias must be in the reserved namespace"));
        }
        let by_alias = KeyRef::Alias(alias.clone());
        match self.resolve_any(&caller.tenant, &by_alias).await {
            Ok(k) => return Ok(k),
            Err(e) if e.kind() != ErrorKind::KeyNotFound => return Err(e),
            Err(_) => {}
        }
        let mut req = CreateKeyRequest::new(KeySpec::Aes256);
        req.description = description.to_owned();
        req.aliases = vec![alias.clone()];
        req.backend = backend.map(str::to_owned);
        let id = KeyId::generate();
        let created = self
            .run_internal(
                caller,
                Operation::CreateKey,
                Some(id.to_string()),
                self.create_key_work(caller, &req, &id, true),
            )
            .await;
        match created {
            Ok(_) => {}
            // Another replica created it first: use theirs.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        self.invalidate_alias(&caller.tenant, &alias).await;
        self.resolve_any(&caller.tenant, &by_alias).await
    }

    /// An internal key checked for state and AES-GCM encryption, as [`Dispatcher::usable`] checks a caller's.
    fn usable_internal(key: &Key) -> Result<()> {
        Self::require_state(key)?;
        Self::require_usage(key, KeyUsage::Encrypt)?;
        Self::require_usage(key, KeyUsage::Decrypt)
    }

    /// Encrypts a credential secret under the tenant's internal sealing key (created on first use) for
    /// storage. `purpose` (e.g. `xks.credential/AKID`) is bound as AAD, so a sealed value cannot be moved to
    /// another record. Format: `0x01 | version uuid (16) | iv (12) | ciphertext | tag (16)`.
    pub async fn seal(&self, caller: &Caller, purpose: &str, secret: &[u8]) -> Result<Vec<u8>> {
        let key = self.sealing_key(caller).await?;
        let req = EncryptRequest {
            key: KeyRef::Id(key.id.clone()),
            algorithm: Some(EncryptionAlgorithm::AesGcm),
            plaintext: Zeroizing::new(secret.to_vec()),
            aad: purpose.as_bytes().to_vec(),
            iv: None,
        };
        Self::usable_internal(&key)?;
        let r = self.encrypt_with(&key, &req, None).await?;
        let mut out = Vec::with_capacity(1 + 16 + r.iv.len() + r.ciphertext.len() + r.tag.len());
        out.push(1);
        out.extend_from_slice(r.version.as_bytes());
        out.extend_from_slice(&r.iv);
        out.extend_from_slice(&r.ciphertext);
        out.extend_from_slice(&r.tag);
        Ok(out)
    }

    /// Reverses [`Dispatcher::seal`]; anything tampered, or sealed for another purpose or tenant, is
    /// `InvalidCiphertext`.
    pub async fn unseal(&self, caller: &Caller, purpose: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        if sealed.len() < 1 + 16 + GCM_IV_LEN + GCM_TAG_LEN || sealed[0] != 1 {
            return Err(Error::invalid_ciphertext());
        }
        let version = Uuid::from_slice(&sealed[1..17]).map_err(|_| Error::invalid_ciphertext())?;
        let iv = sealed[17..17 + GCM_IV_LEN].to_vec();
        let body = &sealed[17 + GCM_IV_LEN..];
        let (ct, tag) = body.split_at(body.len() - GCM_TAG_LEN);
        let key = self.resolve_any(&caller.tenant, &KeyRef::Alias(AliasName::parse(Self::SEALING_ALIAS)?)).await?;
        Self::require_state(&key)?;
        let v = Self::version_of(&key, Some(version))?;
        let backend = self.inner.backends.get(&v.handle.backend)?;
        let mut ct_tag = Vec::with_capacity(body.len());
        ct_tag.extend_from_slice(ct);
        ct_tag.extend_from_slice(tag);
        self.backend_call(
            backend.name(),
            backend.aes_gcm_decrypt(Self::material(&key, v), &iv, purpose.as_bytes(), &ct_tag),
        )
        .await
    }

    // ---- checks ----------------------------------------------------------------------------------------

    fn require_state(key: &Key) -> Result<()> {
        match key.state {
            KeyState::Enabled => Ok(()),
            state => Err(Error::new(
                ErrorKind::InvalidKeyState(state),
                match state {
                    KeyState::Disabled => "the key is disabled",
                    KeyState::PendingDeletion => "the key is pending deletion",
                    KeyState::PendingImport => "the key is pending import of its material",
                    KeyState::Enabled => "the key is enabled",
                },
            )),
        }
    }

    fn require_usage(key: &Key, usage: KeyUsage) -> Result<()> {
        if key.usage.contains(usage) {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::InvalidKeyUsage, format!("the key's usage does not include {}", usage.as_str())))
        }
    }

    /// The usable key, checked for state and usage.
    async fn usable(&self, caller: &Caller, key: &KeyRef, usage: KeyUsage) -> Result<Arc<Key>> {
        let key = self.resolve(&caller.tenant, key).await?;
        Self::require_state(&key)?;
        Self::require_usage(&key, usage)?;
        Ok(key)
    }

    fn version_of(key: &Key, version: Option<Uuid>) -> Result<&KeyVersion> {
        match version {
            None => key.primary(),
            Some(v) => key.version(v).ok_or_else(Error::invalid_ciphertext),
        }
    }

    fn material<'a>(key: &'a Key, version: &'a KeyVersion) -> KeyMaterialRef<'a> {
        KeyMaterialRef { key_id: &key.id, version: version.id, spec: key.spec, handle: &version.handle.handle }
    }

    // ---- key management --------------------------------------------------------------------------------

    /// Creates the tenant if needed (embedded default, bootstrap).
    pub async fn ensure_tenant(&self, tenant: &TenantId) -> Result<bool> {
        let t = Tenant { id: tenant.clone(), display_name: String::new(), created_at: Timestamp::now() };
        self.store_call(self.inner.store.ensure_tenant(&t)).await
    }

    pub async fn create_key(&self, caller: &Caller, req: CreateKeyRequest) -> Result<Key> {
        let id = req.id.clone().unwrap_or_else(KeyId::generate);
        self.run(caller, Operation::CreateKey, Some(id.to_string()), async {
            Self::refuse_internal_aliases(&req.aliases)?;
            Self::refuse_internal_description(&req.description)?;
            self.create_key_work(caller, &req, &id, false).await
        })
        .await
    }

    /// Callers cannot name aliases in the reserved namespace of the gateway's own keys.
    fn refuse_internal_aliases(aliases: &[AliasName]) -> Result<()> {
        if aliases.iter().any(AliasName::is_internal) {
            return Err(Error::invalid(format!("aliases under {} are reserved", AliasName::INTERNAL_PREFIX)));
        }
        Ok(())
    }

    /// Callers cannot give a key the description that marks the gateway's own keys (see [`Key::is_internal`]).
    fn refuse_internal_description(description: &str) -> Result<()> {
        if description.starts_with(Key::INTERNAL_DESCRIPTION_PREFIX) {
            return Err(Error::invalid(format!(
                "descriptions starting with \"{}\" are reserved",
                Key::INTERNAL_DESCRIPTION_PREFIX
            )));
        }
        Ok(())
    }

    /// The work of `create_key`, without the audit wrapper. `internal`: a key for the gateway itself
    /// ([`Key::internal`]), outside the tenant's key quota (a tenant at its quota must still store secrets).
    async fn create_key_work(
        &self,
        caller: &Caller,
        req: &CreateKeyRequest,
        id: &KeyId,
        internal: bool,
    ) -> Result<Key> {
        let quota = !internal;
        let usage = req.usage.unwrap_or_else(|| req.spec.default_usages());
        if !usage.is_subset_of(req.spec.allowed_usages()) {
            return Err(Error::invalid(format!(
                "a {} key cannot have that usage; allowed: {}",
                req.spec,
                req.spec.allowed_usages().iter().map(KeyUsage::as_str).collect::<Vec<_>>().join(",")
            )));
        }
        if let Some(max) = self.inner.config.max_keys_per_tenant.filter(|_| quota) {
            let n = self.store_call(self.inner.store.count_keys(&caller.tenant)).await?;
            if n >= max {
                return Err(Error::new(ErrorKind::QuotaExceeded, "the tenant holds the maximum number of keys"));
            }
        }
        let backend_name = req.backend.clone().unwrap_or_else(|| self.inner.config.default_backend.clone());
        let backend = self
            .inner
            .backends
            .get(&backend_name)
            .map_err(|_| Error::invalid("no backend of that name is configured"))?;
        let version_id = Uuid::new_v4();
        let handle = if req.external {
            Vec::new()
        } else {
            self.keygen_call(backend.name(), backend.generate(id, version_id, req.spec, usage)).await?
        };
        let now = Timestamp::now();
        let key = Key {
            id: id.clone(),
            tenant: caller.tenant.clone(),
            spec: req.spec,
            usage,
            state: if req.external { KeyState::PendingImport } else { KeyState::Enabled },
            origin: if req.external { KeyOrigin::External } else { KeyOrigin::Generated },
            description: req.description.clone(),
            tags: req.tags.clone(),
            versions: vec![KeyVersion {
                id: version_id,
                created_at: now,
                handle: crate::model::BackendHandle { backend: backend_name, handle },
            }],
            primary_version: version_id,
            created_at: now,
            updated_at: now,
            deletion_at: None,
            revision: 0,
            internal,
        };
        let stored = self.store_call(self.inner.store.create_key(&key, &req.aliases)).await;
        match stored {
            Ok(k) => Ok(k),
            Err(e) => {
                // Do not leave orphaned HSM objects behind a failed insert.
                if !req.external {
                    let v = &key.versions[0];
                    let _ = backend.destroy(Self::material(&key, v)).await;
                }
                Err(e)
            }
        }
    }

    /// Adopts material that already exists in a backend (an HSM key found by label or id).
    pub async fn adopt_key(
        &self,
        caller: &Caller,
        req: CreateKeyRequest,
        backend: &str,
        handle: Vec<u8>,
    ) -> Result<Key> {
        let id = req.id.clone().unwrap_or_else(KeyId::generate);
        self.run(caller, Operation::CreateKey, Some(id.to_string()), async {
            Self::refuse_internal_aliases(&req.aliases)?;
            Self::refuse_internal_description(&req.description)?;
            let usage = req.usage.unwrap_or_else(|| req.spec.default_usages());
            if !usage.is_subset_of(req.spec.allowed_usages()) {
                return Err(Error::invalid("a key of that spec cannot have that usage"));
            }
            self.inner.backends.get(backend).map_err(|_| Error::invalid("no backend of that name is configured"))?;
            let now = Timestamp::now();
            let version_id = Uuid::new_v4();
            let key = Key {
                id: id.clone(),
                tenant: caller.tenant.clone(),
                spec: req.spec,
                usage,
                state: KeyState::Enabled,
                origin: KeyOrigin::Adopted,
                description: req.description.clone(),
                tags: req.tags.clone(),
                versions: vec![KeyVersion {
                    id: version_id,
                    created_at: now,
                    handle: crate::model::BackendHandle { backend: backend.to_owned(), handle },
                }],
                primary_version: version_id,
                created_at: now,
                updated_at: now,
                deletion_at: None,
                revision: 0,
                internal: false,
            };
            self.store_call(self.inner.store.create_key(&key, &req.aliases)).await
        })
        .await
    }

    pub async fn describe_key(&self, caller: &Caller, key: &KeyRef) -> Result<Arc<Key>> {
        self.run(caller, Operation::DescribeKey, Some(key.to_string()), self.resolve(&caller.tenant, key)).await
    }

    /// The tenant's keys, without the gateway's internal ones (a page may hold fewer than its limit; the
    /// cursor still moves past them).
    pub async fn list_keys(&self, caller: &Caller, page: &PageRequest) -> Result<Page<Key>> {
        self.run(caller, Operation::ListKeys, None, async {
            let mut p = self.store_call(self.inner.store.list_keys(&caller.tenant, page)).await?;
            p.items.retain(|k| !k.is_internal());
            Ok(p)
        })
        .await
    }

    /// Reads the key fresh from the store, applies `change` and writes it back with optimistic concurrency,
    /// retrying a few times if another writer raced us. `change` returns `Ok(false)` when nothing changes.
    async fn mutate_key(
        &self,
        tenant: &TenantId,
        key: &KeyRef,
        mut change: impl FnMut(&mut Key) -> Result<bool>,
    ) -> Result<Key> {
        if let KeyRef::Alias(a) = key
            && a.is_internal()
        {
            return Err(Error::key_not_found());
        }
        let id = self
            .resolve_id(tenant, key)
            .await
            .map_err(|e| if e.kind() == ErrorKind::AliasNotFound { Error::key_not_found() } else { e })?;
        for _ in 0..5 {
            let Some(mut current) = self.store_call(self.inner.store.get_key(tenant, &id)).await? else {
                return Err(Error::key_not_found());
            };
            // Callers change only their own keys: the gateway's are, to them, not there.
            if current.is_internal() {
                return Err(Error::key_not_found());
            }
            if !change(&mut current)? {
                return Ok(current);
            }
            current.updated_at = Timestamp::now();
            if let Some(stored) = self.store_call(self.inner.store.update_key(&current)).await? {
                self.invalidate_key(tenant, &id).await;
                return Ok(stored);
            }
        }
        Err(Error::new(ErrorKind::DependencyFailure, "the key is being changed concurrently; retry"))
    }

    pub async fn enable_key(&self, caller: &Caller, key: &KeyRef) -> Result<Key> {
        self.run(caller, Operation::EnableKey, Some(key.to_string()), async {
            self.mutate_key(&caller.tenant, key, |k| match k.state {
                KeyState::Enabled => Ok(false),
                KeyState::Disabled => {
                    k.state = KeyState::Enabled;
                    Ok(true)
                }
                s => Err(Error::new(ErrorKind::InvalidKeyState(s), "only a disabled key can be enabled")),
            })
            .await
        })
        .await
    }

    pub async fn disable_key(&self, caller: &Caller, key: &KeyRef) -> Result<Key> {
        self.run(caller, Operation::DisableKey, Some(key.to_string()), async {
            self.mutate_key(&caller.tenant, key, |k| match k.state {
                KeyState::Disabled => Ok(false),
                KeyState::Enabled => {
                    k.state = KeyState::Disabled;
                    Ok(true)
                }
                s => Err(Error::new(ErrorKind::InvalidKeyState(s), "only an enabled key can be disabled")),
            })
            .await
        })
        .await
    }

    /// Schedules destruction after `pending_days` (7-366). The key refuses all crypto meanwhile.
    pub async fn schedule_key_deletion(&self, caller: &Caller, key: &KeyRef, pending_days: u32) -> Result<Key> {
        self.run(caller, Operation::ScheduleKeyDeletion, Some(key.to_string()), async {
            if !(7..=366).contains(&pending_days) {
                return Err(Error::invalid("the pending window must be 7 to 366 days"));
            }
            self.mutate_key(&caller.tenant, key, |k| match k.state {
                KeyState::PendingDeletion => {
                    Err(Error::new(ErrorKind::InvalidKeyState(k.state), "the key is already pending deletion"))
                }
                _ => {
                    k.state = KeyState::PendingDeletion;
                    k.deletion_at = Some(Timestamp::now().plus_days(pending_days));
                    Ok(true)
                }
            })
            .await
        })
        .await
    }

    /// Cancels a scheduled deletion; the key returns to `then` (`Enabled` or `Disabled`).
    pub async fn cancel_key_deletion(&self, caller: &Caller, key: &KeyRef, then: KeyState) -> Result<Key> {
        self.run(caller, Operation::CancelKeyDeletion, Some(key.to_string()), async {
            if !matches!(then, KeyState::Enabled | KeyState::Disabled) {
                return Err(Error::internal("a cancelled deletion leaves the key enabled or disabled"));
            }
            self.mutate_key(&caller.tenant, key, |k| match k.state {
                KeyState::PendingDeletion => {
                    k.state = then;
                    k.deletion_at = None;
                    Ok(true)
                }
                s => Err(Error::new(ErrorKind::InvalidKeyState(s), "the key is not pending deletion")),
            })
            .await
        })
        .await
    }

    pub async fn update_key_description(&self, caller: &Caller, key: &KeyRef, description: String) -> Result<Key> {
        self.run(caller, Operation::UpdateKeyDescription, Some(key.to_string()), async {
            Self::refuse_internal_description(&description)?;
            self.mutate_key(&caller.tenant, key, |k| {
                if k.description == description {
                    return Ok(false);
                }
                k.description.clone_from(&description);
                Ok(true)
            })
            .await
        })
        .await
    }

    /// Adds a new version of the key's material and makes it primary; older versions keep decrypting.
    pub async fn rotate_key(&self, caller: &Caller, key: &KeyRef) -> Result<Key> {
        self.run(caller, Operation::RotateKey, Some(key.to_string()), async {
            let current = self.resolve(&caller.tenant, key).await?;
            Self::require_state(&current)?;
            if current.origin != KeyOrigin::Generated {
                return Err(Error::new(ErrorKind::Unsupported, "only keys generated by kmsgate can be rotated"));
            }
            let backend_name = current.primary()?.handle.backend.clone();
            let backend = self.inner.backends.get(&backend_name)?;
            let version_id = Uuid::new_v4();
            let handle = self
                .keygen_call(backend.name(), backend.generate(&current.id, version_id, current.spec, current.usage))
                .await?;
            let version = KeyVersion {
                id: version_id,
                created_at: Timestamp::now(),
                handle: crate::model::BackendHandle { backend: backend_name, handle },
            };
            let result = self
                .mutate_key(&caller.tenant, &KeyRef::Id(current.id.clone()), |k| {
                    Self::require_state(k)?;
                    if k.version(version.id).is_none() {
                        k.versions.push(version.clone());
                    }
                    k.primary_version = version.id;
                    Ok(true)
                })
                .await;
            if result.is_err() {
                let _ = backend.destroy(Self::material(&current, &version)).await;
            }
            result
        })
        .await
    }

    /// Brings customer material into a key created with `external` (origin `External`): the primary
    /// version gets the backend's handle for it and the key becomes `Enabled`. Allowed only in
    /// `PendingImport`, so material never changes under existing ciphertexts (re-importing after
    /// [`Dispatcher::delete_key_material`] is the vendor's way to restore it).
    pub async fn import_key_material(&self, caller: &Caller, key: &KeyRef, material: &[u8]) -> Result<Key> {
        self.run(caller, Operation::ImportKeyMaterial, Some(key.to_string()), async {
            let current = self.resolve(&caller.tenant, key).await?;
            if current.origin != KeyOrigin::External {
                return Err(Error::new(ErrorKind::Unsupported, "only keys created for external material take imports"));
            }
            if current.state != KeyState::PendingImport {
                return Err(Error::new(ErrorKind::InvalidKeyState(current.state), "the key already has material"));
            }
            let version = current.primary()?.clone();
            let backend = self.inner.backends.get(&version.handle.backend)?;
            let handle = self
                .keygen_call(
                    backend.name(),
                    backend.import(&current.id, version.id, current.spec, current.usage, material),
                )
                .await?;
            let stored = self
                .mutate_key(&caller.tenant, &KeyRef::Id(current.id.clone()), |k| {
                    if k.state != KeyState::PendingImport {
                        return Err(Error::new(ErrorKind::InvalidKeyState(k.state), "the key already has material"));
                    }
                    let primary = k.primary_version;
                    let v = k
                        .versions
                        .iter_mut()
                        .find(|v| v.id == primary)
                        .ok_or_else(|| Error::internal("the key's primary version is missing"))?;
                    v.handle.handle.clone_from(&handle);
                    k.state = KeyState::Enabled;
                    Ok(true)
                })
                .await;
            if stored.is_err() {
                let with = KeyVersion {
                    handle: crate::model::BackendHandle { backend: version.handle.backend.clone(), handle },
                    ..version
                };
                let _ = backend.destroy(Self::material(&current, &with)).await;
            }
            stored
        })
        .await
    }

    /// Removes imported material: the key returns to `PendingImport` and its material is destroyed.
    pub async fn delete_key_material(&self, caller: &Caller, key: &KeyRef) -> Result<Key> {
        self.run(caller, Operation::DeleteKeyMaterial, Some(key.to_string()), async {
            let current = self.resolve(&caller.tenant, key).await?;
            if current.origin != KeyOrigin::External {
                return Err(Error::new(ErrorKind::Unsupported, "only keys with imported material can lose it"));
            }
            let mut removed = Vec::new();
            let stored = self
                .mutate_key(&caller.tenant, &KeyRef::Id(current.id.clone()), |k| match k.state {
                    KeyState::PendingDeletion | KeyState::PendingImport => {
                        Err(Error::new(ErrorKind::InvalidKeyState(k.state), "the key has no material to delete"))
                    }
                    _ => {
                        removed = k.versions.clone();
                        for v in &mut k.versions {
                            v.handle.handle.clear();
                        }
                        k.state = KeyState::PendingImport;
                        Ok(true)
                    }
                })
                .await?;
            // The store no longer references the material: destroy it (an orphan left by a failure is
            // unreachable).
            for v in removed.iter().filter(|v| !v.handle.handle.is_empty()) {
                if let Ok(backend) = self.inner.backends.get(&v.handle.backend)
                    && let Err(e) =
                        self.backend_call(backend.name(), backend.destroy(Self::material(&current, v))).await
                {
                    tracing::warn!(key = %current.id, version = %v.id, error = %e, "could not destroy key material");
                }
            }
            Ok(stored)
        })
        .await
    }

    /// Sets and removes tags of a key (`remove` first, then `set`).
    pub async fn update_key_tags(
        &self,
        caller: &Caller,
        key: &KeyRef,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<Key> {
        self.run(caller, Operation::TagKey, Some(key.to_string()), async {
            self.mutate_key(&caller.tenant, key, |k| {
                let before = k.tags.clone();
                for r in remove {
                    k.tags.remove(r);
                }
                for (name, value) in set {
                    k.tags.insert(name.clone(), value.clone());
                }
                Ok(k.tags != before)
            })
            .await
        })
        .await
    }

    /// Destroys keys whose deletion window has passed. Returns the ids purged.
    ///
    /// The row goes first, conditional on the revision that was found due: a deletion cancelled meanwhile is
    /// never purged, and material is destroyed only once nothing can reference it any more.
    pub async fn purge_due_keys(&self, caller: &Caller) -> Result<Vec<KeyId>> {
        let due = self.store_call(self.inner.store.keys_due_for_deletion(Timestamp::now(), 100)).await?;
        let mut purged = Vec::new();
        for key in due {
            let done = self
                .run(caller, Operation::PurgeKey, Some(key.id.to_string()), async {
                    if !self.store_call(self.inner.store.delete_key(&key.tenant, &key.id, key.revision)).await? {
                        return Ok(false);
                    }
                    for v in &key.versions {
                        if let Ok(backend) = self.inner.backends.get(&v.handle.backend)
                            && !v.handle.handle.is_empty()
                            && let Err(e) = self.backend_call(backend.name(), backend.destroy(Self::material(&key, v))).await
                        {
                            // The key is gone from the inventory; an HSM object left behind is unreachable.
                            tracing::warn!(key = %key.id, version = %v.id, error = %e, "could not destroy key material");
                        }
                    }
                    Ok(true)
                })
                .await;
            self.invalidate_key(&key.tenant, &key.id).await;
            if matches!(done, Ok(true)) {
                purged.push(key.id.clone());
            }
        }
        Ok(purged)
    }

    // ---- aliases ---------------------------------------------------------------------------------------

    pub async fn create_alias(&self, caller: &Caller, alias: &AliasName, key: &KeyRef) -> Result<AliasEntry> {
        self.run(caller, Operation::CreateAlias, Some(alias.to_string()), async {
            Self::refuse_internal_aliases(std::slice::from_ref(alias))?;
            let target = self.resolve(&caller.tenant, key).await?;
            let entry = self.store_call(self.inner.store.create_alias(&caller.tenant, alias, &target.id)).await?;
            self.invalidate_alias(&caller.tenant, alias).await;
            Ok(entry)
        })
        .await
    }

    pub async fn update_alias(&self, caller: &Caller, alias: &AliasName, key: &KeyRef) -> Result<AliasEntry> {
        self.run(caller, Operation::UpdateAlias, Some(alias.to_string()), async {
            // The gateway's aliases are not there for callers: as for any alias that does not exist.
            if alias.is_internal() {
                return Err(Error::new(ErrorKind::AliasNotFound, "the alias does not exist"));
            }
            let target = self.resolve(&caller.tenant, key).await?;
            let entry = self.store_call(self.inner.store.update_alias(&caller.tenant, alias, &target.id)).await?;
            self.invalidate_alias(&caller.tenant, alias).await;
            Ok(entry)
        })
        .await
    }

    pub async fn delete_alias(&self, caller: &Caller, alias: &AliasName) -> Result<()> {
        self.run(caller, Operation::DeleteAlias, Some(alias.to_string()), async {
            if alias.is_internal() {
                return Err(Error::new(ErrorKind::AliasNotFound, "the alias does not exist"));
            }
            let existed = self.store_call(self.inner.store.delete_alias(&caller.tenant, alias)).await?;
            self.invalidate_alias(&caller.tenant, alias).await;
            if existed { Ok(()) } else { Err(Error::new(ErrorKind::AliasNotFound, "the alias does not exist")) }
        })
        .await
    }

    pub async fn list_aliases(
        &self,
        caller: &Caller,
        key: Option<&KeyRef>,
        page: &PageRequest,
    ) -> Result<Page<AliasEntry>> {
        self.run(caller, Operation::ListAliases, key.map(ToString::to_string), async {
            let key_id = match key {
                Some(k) => Some(self.resolve(&caller.tenant, k).await?.id.clone()),
                None => None,
            };
            let mut p = self.store_call(self.inner.store.list_aliases(&caller.tenant, key_id.as_ref(), page)).await?;
            p.items.retain(|a| !a.alias.is_internal());
            Ok(p)
        })
        .await
    }

    // ---- cryptography ----------------------------------------------------------------------------------

    fn check_sizes(&self, plaintext: usize, aad: usize) -> Result<()> {
        if plaintext > self.inner.config.max_plaintext {
            return Err(Error::new(ErrorKind::Unsupported, "the plaintext is larger than this gateway accepts"));
        }
        if aad > self.inner.config.max_aad {
            return Err(Error::new(ErrorKind::Unsupported, "the additional data is larger than this gateway accepts"));
        }
        Ok(())
    }

    /// `version`: `None` encrypts under the primary version, `Some` under that version of the key.
    async fn encrypt_inner(
        &self,
        caller: &Caller,
        req: &EncryptRequest,
        version: Option<Uuid>,
    ) -> Result<EncryptReply> {
        let key = self.usable(caller, &req.key, KeyUsage::Encrypt).await?;
        self.encrypt_with(&key, req, version).await
    }

    /// Encrypts under `key`, already resolved and checked (`req.key` is not looked at); `version` as for
    /// [`Self::encrypt_inner`].
    async fn encrypt_with(&self, key: &Key, req: &EncryptRequest, version: Option<Uuid>) -> Result<EncryptReply> {
        let alg = match req.algorithm {
            Some(a) => a,
            None => EncryptionAlgorithm::default_for(key.spec)
                .ok_or_else(|| Error::new(ErrorKind::InvalidKeyUsage, "the key cannot encrypt"))?,
        };
        if !alg.fits(key.spec) {
            return Err(Error::new(ErrorKind::InvalidKeyUsage, "the algorithm does not fit the key's spec"));
        }
        let version = match version {
            None => key.primary()?,
            Some(v) => key.version(v).ok_or_else(|| Error::invalid("the key has no such version"))?,
        };
        let backend = self.inner.backends.get(&version.handle.backend)?;
        let material = Self::material(key, version);
        match alg {
            EncryptionAlgorithm::AesGcm => {
                self.check_sizes(req.plaintext.len(), req.aad.len())?;
                let iv = match &req.iv {
                    Some(iv) if iv.len() == GCM_IV_LEN => iv.clone(),
                    Some(_) => return Err(Error::invalid("the IV must be 12 bytes")),
                    None => random_bytes(GCM_IV_LEN)?,
                };
                let mut out = self
                    .backend_call(backend.name(), backend.aes_gcm_encrypt(material, &iv, &req.aad, &req.plaintext))
                    .await?;
                if out.len() < GCM_TAG_LEN {
                    return Err(Error::internal("the backend returned a short ciphertext"));
                }
                let tag = out.split_off(out.len() - GCM_TAG_LEN);
                Ok(EncryptReply {
                    key_id: key.id.clone(),
                    version: version.id,
                    algorithm: alg,
                    iv,
                    ciphertext: out,
                    tag,
                })
            }
            EncryptionAlgorithm::AesCbc(padding) | EncryptionAlgorithm::AesEcb(padding) => {
                let mode =
                    if matches!(alg, EncryptionAlgorithm::AesCbc(_)) { AesBlockMode::Cbc } else { AesBlockMode::Ecb };
                if !req.aad.is_empty() {
                    return Err(Error::invalid("AES-CBC and AES-ECB take no additional data"));
                }
                self.check_sizes(req.plaintext.len(), 0)?;
                if padding == BlockPadding::NoPadding
                    && (req.plaintext.is_empty() || !req.plaintext.len().is_multiple_of(AES_BLOCK_LEN))
                {
                    return Err(Error::invalid("without padding the plaintext must be whole 16-byte blocks"));
                }
                let iv = match (mode, &req.iv) {
                    (AesBlockMode::Cbc, Some(iv)) if iv.len() == AES_BLOCK_LEN => iv.clone(),
                    (AesBlockMode::Cbc, Some(_)) => return Err(Error::invalid("the AES-CBC IV must be 16 bytes")),
                    (AesBlockMode::Cbc, None) => random_bytes(AES_BLOCK_LEN)?,
                    // ECB has no IV; one sent anyway is ignored, as the vendor protocols define it.
                    (AesBlockMode::Ecb, _) => Vec::new(),
                };
                let ct = self
                    .backend_call(
                        backend.name(),
                        backend.aes_block_encrypt(material, mode, padding, &iv, &req.plaintext),
                    )
                    .await?;
                Ok(EncryptReply {
                    key_id: key.id.clone(),
                    version: version.id,
                    algorithm: alg,
                    iv,
                    ciphertext: ct,
                    tag: Vec::new(),
                })
            }
            EncryptionAlgorithm::RsaOaepSha256 => {
                if !req.aad.is_empty() {
                    return Err(Error::invalid("RSA encryption takes no additional data"));
                }
                let max = match key.spec {
                    KeySpec::Rsa3072 => 384 - 66,
                    _ => 256 - 66,
                };
                if req.plaintext.len() > max {
                    return Err(Error::invalid("the plaintext is too long for RSA-OAEP with this key"));
                }
                let ct = self.backend_call(backend.name(), backend.rsa_oaep_encrypt(material, &req.plaintext)).await?;
                Ok(EncryptReply {
                    key_id: key.id.clone(),
                    version: version.id,
                    algorithm: alg,
                    iv: Vec::new(),
                    ciphertext: ct,
                    tag: Vec::new(),
                })
            }
        }
    }

    pub async fn encrypt(&self, caller: &Caller, req: EncryptRequest) -> Result<EncryptReply> {
        self.run(caller, Operation::Encrypt, Some(req.key.to_string()), self.encrypt_inner(caller, &req, None)).await
    }

    /// [`encrypt`](Self::encrypt) under a named version of the key instead of its primary. For a frontend that
    /// resolved the key and bound its primary version into the request before encrypting (XKS names the version
    /// in the ciphertext metadata, which is part of the AAD): it gets exactly that version even if a rotation
    /// lands in between, so one resolution suffices and nothing is retried. The version must be one of the key's
    /// (else `InvalidRequest`); state, usage and authorization are checked as for `encrypt`. Borrowing the
    /// request leaves its plaintext with the caller (for a trial decrypt) without a copy.
    pub async fn encrypt_version(&self, caller: &Caller, req: &EncryptRequest, version: Uuid) -> Result<EncryptReply> {
        self.run(caller, Operation::Encrypt, Some(req.key.to_string()), self.encrypt_inner(caller, req, Some(version)))
            .await
    }

    pub async fn decrypt(&self, caller: &Caller, req: DecryptRequest) -> Result<DecryptReply> {
        self.run(caller, Operation::Decrypt, Some(req.key.to_string()), async {
            let key = self.usable(caller, &req.key, KeyUsage::Decrypt).await?;
            let alg = match req.algorithm {
                Some(a) => a,
                None => EncryptionAlgorithm::default_for(key.spec)
                    .ok_or_else(|| Error::new(ErrorKind::InvalidKeyUsage, "the key cannot decrypt"))?,
            };
            if !alg.fits(key.spec) {
                return Err(Error::new(ErrorKind::InvalidKeyUsage, "the algorithm does not fit the key's spec"));
            }
            let version = Self::version_of(&key, req.version)?;
            let backend = self.inner.backends.get(&version.handle.backend)?;
            let material = Self::material(&key, version);
            let plaintext = match alg {
                EncryptionAlgorithm::AesGcm => {
                    if req.iv.len() != GCM_IV_LEN || req.tag.len() != GCM_TAG_LEN {
                        return Err(Error::invalid_ciphertext());
                    }
                    self.check_sizes(req.ciphertext.len(), req.aad.len())?;
                    let mut ct = Vec::with_capacity(req.ciphertext.len() + GCM_TAG_LEN);
                    ct.extend_from_slice(&req.ciphertext);
                    ct.extend_from_slice(&req.tag);
                    self.backend_call(backend.name(), backend.aes_gcm_decrypt(material, &req.iv, &req.aad, &ct)).await?
                }
                EncryptionAlgorithm::AesCbc(padding) | EncryptionAlgorithm::AesEcb(padding) => {
                    let cbc = matches!(alg, EncryptionAlgorithm::AesCbc(_));
                    let mode = if cbc { AesBlockMode::Cbc } else { AesBlockMode::Ecb };
                    if !req.aad.is_empty() {
                        return Err(Error::invalid("AES-CBC and AES-ECB take no additional data"));
                    }
                    if cbc && req.iv.len() != AES_BLOCK_LEN {
                        return Err(Error::invalid("the AES-CBC IV must be 16 bytes"));
                    }
                    let iv: &[u8] = if cbc { &req.iv } else { &[] };
                    if !req.tag.is_empty()
                        || req.ciphertext.is_empty()
                        || !req.ciphertext.len().is_multiple_of(AES_BLOCK_LEN)
                    {
                        return Err(Error::invalid_ciphertext());
                    }
                    self.check_sizes(req.ciphertext.len(), 0)?;
                    self.backend_call(
                        backend.name(),
                        backend.aes_block_decrypt(material, mode, padding, iv, &req.ciphertext),
                    )
                    .await?
                }
                EncryptionAlgorithm::RsaOaepSha256 => {
                    self.backend_call(backend.name(), backend.rsa_oaep_decrypt(material, &req.ciphertext)).await?
                }
            };
            Ok(DecryptReply { key_id: key.id.clone(), version: version.id, plaintext })
        })
        .await
    }

    /// A fresh data key of `len` bytes (16-1024), returned in plain and encrypted under the key.
    pub async fn generate_data_key(
        &self,
        caller: &Caller,
        key: &KeyRef,
        len: usize,
        aad: Vec<u8>,
    ) -> Result<DataKeyReply> {
        self.run(caller, Operation::GenerateDataKey, Some(key.to_string()), async {
            if !(1..=1024).contains(&len) {
                return Err(Error::invalid("the data key length must be 1 to 1024 bytes"));
            }
            let k = self.usable(caller, key, KeyUsage::Encrypt).await?;
            let backend = self.inner.backends.get(&k.primary()?.handle.backend)?;
            let plaintext = Zeroizing::new(self.backend_call(backend.name(), backend.random(len)).await?);
            let req = EncryptRequest { key: KeyRef::Id(k.id.clone()), algorithm: None, plaintext, aad, iv: None };
            let encrypted = self.encrypt_inner(caller, &req, None).await?;
            Ok(DataKeyReply { plaintext: req.plaintext, encrypted })
        })
        .await
    }

    fn digest_of(input: &SignInput) -> Result<Vec<u8>> {
        match input {
            SignInput::Message(m) => Ok(sha256(m)),
            SignInput::Digest(d) if d.len() == 32 => Ok(d.clone()),
            SignInput::Digest(_) => Err(Error::invalid("a SHA-256 digest is 32 bytes")),
        }
    }

    pub async fn sign(&self, caller: &Caller, req: SignRequest) -> Result<SignReply> {
        self.run(caller, Operation::Sign, Some(req.key.to_string()), async {
            let key = self.usable(caller, &req.key, KeyUsage::Sign).await?;
            if !req.algorithm.fits(key.spec) {
                return Err(Error::new(
                    ErrorKind::InvalidKeyUsage,
                    "the signing algorithm does not fit the key's spec",
                ));
            }
            let digest = Self::digest_of(&req.input)?;
            let version = match req.version {
                None => key.primary()?,
                Some(v) => key.version(v).ok_or_else(|| Error::invalid("the key has no such version"))?,
            };
            let backend = self.inner.backends.get(&version.handle.backend)?;
            let signature = self
                .backend_call(
                    backend.name(),
                    backend.sign_digest(Self::material(&key, version), req.algorithm, &digest),
                )
                .await?;
            Ok(SignReply { key_id: key.id.clone(), version: version.id, signature })
        })
        .await
    }

    pub async fn verify(&self, caller: &Caller, req: SignRequest, signature: &[u8]) -> Result<bool> {
        self.run(caller, Operation::Verify, Some(req.key.to_string()), async {
            let key = self.usable(caller, &req.key, KeyUsage::Verify).await?;
            if !req.algorithm.fits(key.spec) {
                return Err(Error::new(
                    ErrorKind::InvalidKeyUsage,
                    "the signing algorithm does not fit the key's spec",
                ));
            }
            let digest = Self::digest_of(&req.input)?;
            let version = match req.version {
                None => key.primary()?,
                Some(v) => key.version(v).ok_or_else(|| Error::invalid("the key has no such version"))?,
            };
            let backend = self.inner.backends.get(&version.handle.backend)?;
            self.backend_call(
                backend.name(),
                backend.verify_digest(Self::material(&key, version), req.algorithm, &digest, signature),
            )
            .await
        })
        .await
    }

    pub async fn get_public_key(&self, caller: &Caller, key: &KeyRef, version: Option<Uuid>) -> Result<PublicKeyReply> {
        self.run(caller, Operation::GetPublicKey, Some(key.to_string()), async {
            let k = self.resolve(&caller.tenant, key).await?;
            Self::require_state(&k)?;
            if k.spec.is_symmetric() {
                return Err(Error::new(ErrorKind::InvalidKeyUsage, "a symmetric key has no public key"));
            }
            let v = match version {
                None => k.primary()?,
                Some(v) => k.version(v).ok_or_else(|| Error::invalid("the key has no such version"))?,
            };
            let backend = self.inner.backends.get(&v.handle.backend)?;
            let der = self.backend_call(backend.name(), backend.public_key_der(Self::material(&k, v))).await?;
            Ok(PublicKeyReply { key_id: k.id.clone(), version: v.id, spec: k.spec, der })
        })
        .await
    }

    /// `len` random bytes (1-1024) from the default backend.
    pub async fn random(&self, caller: &Caller, len: usize) -> Result<Vec<u8>> {
        self.run(caller, Operation::GenerateRandom, None, async {
            if !(1..=1024).contains(&len) {
                return Err(Error::invalid("the random length must be 1 to 1024 bytes"));
            }
            let backend = self.inner.backends.get(&self.inner.config.default_backend)?;
            self.backend_call(backend.name(), backend.random(len)).await
        })
        .await
    }

    pub async fn hmac(&self, caller: &Caller, key: &KeyRef, data: &[u8]) -> Result<(KeyId, Vec<u8>)> {
        self.run(caller, Operation::Hmac, Some(key.to_string()), async {
            let k = self.usable(caller, key, KeyUsage::GenerateMac).await?;
            let v = k.primary()?;
            let backend = self.inner.backends.get(&v.handle.backend)?;
            let mac = self.backend_call(backend.name(), backend.hmac_sha256(Self::material(&k, v), data)).await?;
            Ok((k.id.clone(), mac))
        })
        .await
    }

    /// Verifies a MAC in constant time against every version (a MAC made before a rotation still verifies).
    pub async fn verify_hmac(&self, caller: &Caller, key: &KeyRef, data: &[u8], mac: &[u8]) -> Result<bool> {
        self.run(caller, Operation::VerifyHmac, Some(key.to_string()), async {
            let k = self.usable(caller, key, KeyUsage::VerifyMac).await?;
            let mut ok = false;
            for v in &k.versions {
                let backend = self.inner.backends.get(&v.handle.backend)?;
                let expected =
                    self.backend_call(backend.name(), backend.hmac_sha256(Self::material(&k, v), data)).await?;
                ok |= constant_time_eq(&expected, mac);
            }
            Ok(ok)
        })
        .await
    }

    /// A deep check of `backend`: a real AES-GCM encrypt and decrypt of a random probe on the tenant's
    /// internal key `alias` (which must be under [`AliasName::INTERNAL_PREFIX`]) in that backend, created on
    /// first use. Never a customer key; the key stays invisible to every caller (see [`Key::internal`]).
    pub async fn probe_backend(&self, caller: &Caller, backend: &str, alias: &AliasName) -> Result<()> {
        if !alias.is_internal() {
            return Err(Error::invalid(format!("a probe key's alias must be under {}", AliasName::INTERNAL_PREFIX)));
        }
        let key = self
            .internal_key(
                caller,
                alias.as_str(),
                Some(backend),
                "kmsgate internal: deep health check key of one backend; never use",
            )
            .await?;
        Self::usable_internal(&key)?;
        let probe = random_bytes(16)?;
        let aad = b"kmsgate backend probe".to_vec();
        let req = EncryptRequest {
            key: KeyRef::Id(key.id.clone()),
            algorithm: Some(EncryptionAlgorithm::AesGcm),
            plaintext: Zeroizing::new(probe.clone()),
            aad: aad.clone(),
            iv: None,
        };
        let enc = self.encrypt_with(&key, &req, None).await?;
        let v = Self::version_of(&key, Some(enc.version))?;
        let backend = self.inner.backends.get(&v.handle.backend)?;
        let mut ct_tag = enc.ciphertext;
        ct_tag.extend_from_slice(&enc.tag);
        let back = self
            .backend_call(backend.name(), backend.aes_gcm_decrypt(Self::material(&key, v), &enc.iv, &aad, &ct_tag))
            .await?;
        if back.as_slice() == probe.as_slice() {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::DependencyFailure, "the backend decrypted the probe to other bytes"))
        }
    }

    /// Probes the store and every backend for real, as an audited operation.
    pub async fn health(&self, caller: &Caller) -> Result<HealthReport> {
        self.run(caller, Operation::Health, None, async { Ok(self.readiness().await) }).await
    }

    /// The same probe without an audit record: for load-balancer and Kubernetes probes that call every
    /// few seconds.
    pub async fn readiness(&self) -> HealthReport {
        let store_ok = self.store_call(self.inner.store.ping()).await.is_ok();
        let mut members = Vec::new();
        for b in self.inner.backends.all() {
            match tokio::time::timeout(self.inner.config.backend_deadline * 5, b.health()).await {
                Ok(m) => members.extend(m),
                Err(_) => members.push(MemberHealth {
                    id: b.name().to_owned(),
                    model: b.kind().to_owned(),
                    status: HealthStatus::Unavailable,
                    detail: "health probe timed out".to_owned(),
                }),
            }
        }
        members.sort_by(|a, b| a.id.cmp(&b.id));
        HealthReport { store_ok, members }
    }
}

/// Constant-time equality for MACs, signatures and secrets.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    // black_box keeps the optimiser from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// moka hands shared errors to every waiter of a coalesced load; rebuild an owned one.
fn unshare(e: Arc<Error>) -> Error {
    let mut out = Error::new(e.kind(), e.message().to_owned());
    if let Some(r) = e.retry_after() {
        out = out.with_retry_after(r);
    }
    for (name, value) in e.details() {
        out = out.with_detail(name, value.clone());
    }
    if let Some(src) = e.internal_source() {
        out = out.with_source(src.to_string());
    }
    out
}

//! [`SqlStore`]: core's `Store` over SQLite or PostgreSQL, with one set of queries through sqlx's `Any` driver.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use kmsgate_core::secret::{DeletedFilter, SealedSecretVersion, Secret, SecretFilter, SecretPath};
use kmsgate_core::{
    AliasEntry, AliasName, Change, ChangeKind, Document, Error, ErrorKind, Key, KeyId, Page, PageRequest, Precondition,
    Replica, Result, Store, Tenant, TenantId, Timestamp,
};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyConnection, AnyPool, AssertSqlSafe, Connection as _, Executor, Row, Transaction};
use tokio::sync::{Mutex, MutexGuard};

use crate::dialect::{Dialect, Target, WRITER_LOCK_KEY};
use crate::errors::{db, is_foreign_key_violation, unique};
use crate::migrate;

/// Connection settings. `Default` suits the server; tests and the CLI may shrink them.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoreOptions {
    /// Pool size. Ignored for `sqlite::memory:`, which must use exactly one connection.
    pub max_connections: u32,
    /// How long a caller waits for a pooled connection before `DependencyTimeout`.
    pub acquire_timeout: Duration,
    /// SQLite: how long a statement waits for another process's (or connection's) lock.
    pub busy_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
            busy_timeout: Duration::from_secs(10),
        }
    }
}

impl StoreOptions {
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }
}

/// The SQL store: an embedded SQLite file by default, PostgreSQL for several replicas.
#[derive(Debug)]
pub struct SqlStore {
    pool: AnyPool,
    dialect: Dialect,
    /// SQLite allows one writer at a time. Queueing this process's writers here, rather than letting them
    /// poll SQLite's busy handler against each other, keeps write latency flat; the busy timeout is then
    /// only about other processes (the CLI next to the server).
    write_lock: Option<Mutex<()>>,
}

/// A write transaction and, on SQLite, this process's writer slot. Fields drop in order: the transaction
/// rolls back (if not committed) before the slot is released.
pub(crate) struct WriteTx<'a> {
    tx: Transaction<'static, Any>,
    _slot: Option<MutexGuard<'a, ()>>,
}

impl WriteTx<'_> {
    pub(crate) fn conn(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }

    pub(crate) async fn commit(self) -> Result<()> {
        self.tx.commit().await.map_err(db)
    }

    /// Ends a transaction that wrote nothing. Dropping would roll back too, but later, in the background:
    /// this frees SQLite's write lock and PostgreSQL's writer lock before the call returns.
    async fn rollback(self) -> Result<()> {
        self.tx.rollback().await.map_err(db)
    }
}

impl SqlStore {
    /// Opens (creating if needed) the store at `url` with default options and brings its schema up to date.
    ///
    /// `sqlite://<path>` or `sqlite:<path>` (the file and its parent directory are created),
    /// `sqlite::memory:` (a private in-memory database, for tests), or `postgres://user@host/db`.
    pub async fn open(url: &str) -> Result<SqlStore> {
        Self::open_with(url, StoreOptions::default()).await
    }

    pub async fn open_with(url: &str, options: StoreOptions) -> Result<SqlStore> {
        let target = Target::parse(url)?;
        let dialect = target.dialect();
        // The Any driver finds its backend from the URL scheme among installed drivers; this is idempotent.
        sqlx::any::install_default_drivers();

        if let Target::SqliteFile { path, .. } = &target
            && let Some(dir) = path.parent()
        {
            tokio::fs::create_dir_all(dir).await.map_err(Error::storage)?;
        }

        let mut pool_options = AnyPoolOptions::new().acquire_timeout(options.acquire_timeout);
        pool_options = match &target {
            // Every connection to `sqlite::memory:` is its own database: one connection, never recycled.
            Target::SqliteMemory => pool_options
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .test_before_acquire(false),
            // A local file: a broken connection is not a thing to probe for before every query.
            Target::SqliteFile { .. } => {
                pool_options.max_connections(options.max_connections.max(1)).test_before_acquire(false)
            }
            Target::Postgres { .. } => pool_options.max_connections(options.max_connections.max(1)),
        };
        // A connection that comes back still counting an open transaction never serves again. sqlx queues the
        // rollback of a dropped transaction (an error, a deadline, a client hanging up) and counts the depth
        // down only when it succeeds. On SQLite that ROLLBACK fails when SQLite already ended the transaction
        // itself (SQLITE_FULL, SQLITE_IOERR, SQLITE_BUSY, SQLITE_NOMEM, a trigger's RAISE(ROLLBACK)), and the
        // connection would then refuse every later write ("begin_with at non-zero transaction depth"). The
        // ping lets the queued rollback run first; a connection still in a transaction is closed, which
        // rolls back whatever SQLite or PostgreSQL may still hold, and the pool opens a fresh one. Not for
        // `sqlite::memory:`: closing its only connection would silently drop the whole database.
        if !matches!(target, Target::SqliteMemory) {
            pool_options = pool_options.after_release(|conn, _meta| {
                Box::pin(async move {
                    if !conn.is_in_transaction() {
                        return Ok(true);
                    }
                    conn.ping().await?;
                    let clean = !conn.is_in_transaction();
                    if !clean {
                        tracing::warn!("a pooled connection was left inside a transaction; closing it");
                    }
                    Ok(clean)
                })
            });
        }
        if dialect == Dialect::Sqlite {
            let busy_ms = options.busy_timeout.as_millis();
            pool_options = pool_options.after_connect(move |conn, _meta| {
                Box::pin(async move {
                    // Per-connection settings, so they are set on every connection the pool opens:
                    // - synchronous=FULL: in WAL mode a commit is acknowledged only after the WAL is fsynced,
                    //   so it survives power loss (NORMAL would only survive a process crash);
                    // - fullfsync: on macOS plain fsync does not flush the drive cache (no effect elsewhere);
                    // - foreign_keys: SQLite enforces them only when asked, per connection;
                    // - busy_timeout: the server and the CLI open the same file; wait for each other's locks.
                    for pragma in [
                        "PRAGMA synchronous = FULL",
                        "PRAGMA fullfsync = ON",
                        "PRAGMA checkpoint_fullfsync = ON",
                        "PRAGMA foreign_keys = ON",
                    ] {
                        conn.execute(pragma).await?;
                    }
                    conn.execute(AssertSqlSafe(format!("PRAGMA busy_timeout = {busy_ms}"))).await?;
                    Ok(())
                })
            });
        }

        let pool = pool_options.connect(target.any_url()).await.map_err(db)?;
        if let Target::SqliteFile { .. } = &target {
            enable_wal(&pool, options.busy_timeout).await?;
        }
        migrate::run(&pool, dialect).await?;
        if let Target::SqliteFile { path, .. } = &target {
            sync_parent_dir(path).await?;
        }
        let write_lock = (dialect == Dialect::Sqlite).then(|| Mutex::new(()));
        Ok(SqlStore { pool, dialect, write_lock })
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Closes the pool, waiting for connections in use to come back. Later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub(crate) async fn begin_write(&self) -> Result<WriteTx<'_>> {
        let slot = match &self.write_lock {
            Some(lock) => Some(lock.lock().await),
            None => None,
        };
        let mut tx = self.pool.begin_with(self.dialect.begin_write_sql()).await.map_err(db)?;
        if let Some(lock) = self.dialect.writer_lock_sql() {
            sqlx::query(lock).bind(WRITER_LOCK_KEY).execute(&mut *tx).await.map_err(db)?;
        }
        Ok(WriteTx { tx, _slot: slot })
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

/// WAL lets readers (the server) proceed while a writer (the CLI) commits, and with `synchronous=FULL` it is
/// durable. The mode is stored in the file, so it is set once here rather than on every connection.
async fn enable_wal(pool: &AnyPool, busy_timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + busy_timeout;
    loop {
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(pool).await.map_err(db)?;
        if mode.eq_ignore_ascii_case("wal") {
            return Ok(());
        }
        // Switching needs an exclusive lock that SQLite does not wait for with the busy timeout, so a
        // concurrent opener of a fresh file retries here.
        match sqlx::query_scalar::<_, String>("PRAGMA journal_mode = WAL").fetch_one(pool).await {
            Ok(m) if m.eq_ignore_ascii_case("wal") => return Ok(()),
            Ok(_) => {
                return Err(Error::new(ErrorKind::StorageFailure, "the sqlite file cannot use write-ahead logging"));
            }
            Err(e) => {
                let mapped = db(e);
                if mapped.kind() != ErrorKind::DependencyTimeout || tokio::time::Instant::now() >= deadline {
                    return Err(mapped);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// fsync of a file does not make a new directory entry durable on every filesystem: sync the directory once
/// the database file exists, so a freshly created store does not vanish on power loss. (SQLite syncs the
/// directory itself when it creates WAL files.)
async fn sync_parent_dir(path: &Path) -> Result<()> {
    let Some(dir) = path.parent().map(Path::to_path_buf) else { return Ok(()) };
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir).and_then(|d| d.sync_all()))
        .await
        .map_err(Error::storage)?
        .map_err(Error::storage)
}

fn key_from_row(row: &AnyRow) -> Result<Key> {
    let revision: i64 = row.try_get("revision").map_err(db)?;
    let doc: String = row.try_get("doc").map_err(db)?;
    let mut key: Key = serde_json::from_str(&doc).map_err(|e| {
        // serde's message can quote document content (wrapped key material); keep only its position.
        Error::storage(format!(
            "a stored key document does not parse ({:?} at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    key.revision = revision;
    Ok(key)
}

fn key_doc(key: &Key) -> Result<String> {
    serde_json::to_string(key).map_err(|_| Error::internal("a key cannot be serialized"))
}

fn alias_from_row(tenant: &TenantId, row: &AnyRow) -> Result<AliasEntry> {
    let name: String = row.try_get("name").map_err(db)?;
    let key_id: String = row.try_get("key_id").map_err(db)?;
    Ok(AliasEntry {
        tenant: tenant.clone(),
        alias: AliasName::parse(&name).map_err(Error::storage)?,
        key_id: KeyId::parse(&key_id).map_err(Error::storage)?,
        created_at: Timestamp(row.try_get("created_at").map_err(db)?),
        updated_at: Timestamp(row.try_get("updated_at").map_err(db)?),
    })
}

fn tenant_from_row(row: &AnyRow) -> Result<Tenant> {
    let id: String = row.try_get("id").map_err(db)?;
    Ok(Tenant {
        id: TenantId::parse(&id).map_err(Error::storage)?,
        display_name: row.try_get("display_name").map_err(db)?,
        created_at: Timestamp(row.try_get("created_at").map_err(db)?),
    })
}

/// Appends one change-feed entry; callers do it inside the transaction of the change it announces.
async fn append_change(
    conn: &mut AnyConnection,
    tenant: &TenantId,
    kind: ChangeKind,
    id: &str,
    at: Timestamp,
) -> Result<i64> {
    sqlx::query_scalar("INSERT INTO changes (tenant, kind, id, at) VALUES ($1, $2, $3, $4) RETURNING seq")
        .bind(tenant.as_str())
        .bind(kind.as_str())
        .bind(id)
        .bind(at.0)
        .fetch_one(conn)
        .await
        .map_err(db)
}

async fn key_exists(conn: &mut AnyConnection, tenant: &TenantId, id: &KeyId) -> Result<bool> {
    let row = sqlx::query("SELECT 1 AS present FROM keys WHERE tenant = $1 AND id = $2")
        .bind(tenant.as_str())
        .bind(id.as_str())
        .fetch_optional(conn)
        .await
        .map_err(db)?;
    Ok(row.is_some())
}

fn alias_not_found() -> Error {
    Error::new(ErrorKind::AliasNotFound, "the alias does not exist")
}

const DOCUMENT_EXISTS: &str = "the document already exists";

fn document_exists() -> Error {
    Error::new(ErrorKind::AlreadyExists, DOCUMENT_EXISTS)
}

/// A document kind: 1-64 of `a-z 0-9 . _ -` (so never a `/`, which keeps `<kind>/<id>` change ids unambiguous).
fn check_document_kind(kind: &str) -> Result<()> {
    let valid = (1..=64).contains(&kind.len())
        && kind.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'));
    if valid { Ok(()) } else { Err(Error::invalid("the document kind must be 1 to 64 of a-z 0-9 . _ -")) }
}

/// Document and replica ids: 1-256 printable ASCII characters (space included).
fn is_document_id(id: &str) -> bool {
    (1..=256).contains(&id.len()) && id.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

fn check_document_id(id: &str) -> Result<()> {
    if is_document_id(id) {
        Ok(())
    } else {
        Err(Error::invalid("the document id must be 1 to 256 printable ASCII characters"))
    }
}

/// Parses a stored JSON column. serde's message can quote the content (credentials live in documents), so
/// only the position is kept.
fn parse_json(text: &str, what: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| {
        Error::storage(format!(
            "a stored {what} does not parse ({:?} at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })
}

fn document_from_row(row: &AnyRow) -> Result<Document> {
    let tenant: String = row.try_get("tenant").map_err(db)?;
    let body: String = row.try_get("body").map_err(db)?;
    Ok(Document {
        kind: row.try_get("kind").map_err(db)?,
        id: row.try_get("id").map_err(db)?,
        tenant: TenantId::parse(&tenant).map_err(Error::storage)?,
        body: parse_json(&body, "document body")?,
        revision: row.try_get("revision").map_err(db)?,
        created_at: Timestamp(row.try_get("created_at").map_err(db)?),
        updated_at: Timestamp(row.try_get("updated_at").map_err(db)?),
    })
}

/// Parses a stored record. serde's message can quote the content, so only the position is kept.
fn parse_doc<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| {
        Error::storage(format!(
            "a stored {what} does not parse ({:?} at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })
}

fn secret_from_row(row: &AnyRow) -> Result<Secret> {
    let revision: i64 = row.try_get("revision").map_err(db)?;
    let doc: String = row.try_get("doc").map_err(db)?;
    let mut secret: Secret = parse_doc(&doc, "secret record")?;
    secret.revision = revision;
    Ok(secret)
}

fn secret_doc(secret: &Secret) -> Result<String> {
    serde_json::to_string(secret).map_err(|_| Error::internal("a secret record cannot be serialized"))
}

fn sealed_doc(version: &SealedSecretVersion) -> Result<String> {
    serde_json::to_string(version).map_err(|_| Error::internal("a sealed secret version cannot be serialized"))
}

/// The (exact, from, to) bounds of a listing's path condition `path = exact OR (path >= from AND path < to)`.
///
/// A prefix is segment-wise: `a/b` selects `a/b` itself and every path starting with `a/b/`, which in byte order
/// is the half-open range [`a/b/`, `a/b0`) since `0` is the byte after `/`. Without a prefix the range spans every
/// valid path (their bytes all sort below `{`) and the exact match is the empty string, which no path is.
fn prefix_bounds(prefix: Option<&SecretPath>) -> (String, String, String) {
    match prefix {
        Some(p) => (p.to_string(), format!("{p}/"), format!("{p}0")),
        None => (String::new(), String::new(), "{".to_owned()),
    }
}

/// One statement per deletion filter, so every query is a fixed string.
fn list_secrets_sql(deleted: DeletedFilter) -> &'static str {
    match deleted {
        DeletedFilter::Exclude => {
            "SELECT revision, doc FROM secrets
             WHERE tenant = $1 AND (path = $2 OR (path >= $3 AND path < $4)) AND path > $5 AND deleted_at IS NULL
             ORDER BY path LIMIT $6"
        }
        DeletedFilter::Include => {
            "SELECT revision, doc FROM secrets
             WHERE tenant = $1 AND (path = $2 OR (path >= $3 AND path < $4)) AND path > $5
             ORDER BY path LIMIT $6"
        }
        DeletedFilter::Only => {
            "SELECT revision, doc FROM secrets
             WHERE tenant = $1 AND (path = $2 OR (path >= $3 AND path < $4)) AND path > $5 AND deleted_at IS NOT NULL
             ORDER BY path LIMIT $6"
        }
    }
}

/// Replaces a secret's record if its stored revision is still `secret.revision`; returns the stored record, or
/// `None` (nothing written) when it moved or is gone.
async fn replace_secret(conn: &mut AnyConnection, secret: &Secret) -> Result<Option<Secret>> {
    let mut stored = secret.clone();
    stored.revision = secret.revision.checked_add(1).ok_or_else(|| Error::internal("secret revision overflow"))?;
    let doc = secret_doc(&stored)?;
    let updated = sqlx::query(
        "UPDATE secrets SET revision = $3, deleted_at = $4, expires_at = $5, recoverable_until = $6, updated_at = $7,
                doc = $8
         WHERE tenant = $1 AND path = $2 AND revision = $9",
    )
    .bind(stored.tenant.as_str())
    .bind(stored.path.as_str())
    .bind(stored.revision)
    .bind(stored.deleted_at.map(|t| t.0))
    .bind(stored.expires_at.map(|t| t.0))
    .bind(stored.recoverable_until.map(|t| t.0))
    .bind(stored.updated_at.0)
    .bind(doc)
    .bind(secret.revision)
    .execute(conn)
    .await
    .map_err(db)?
    .rows_affected();
    Ok((updated > 0).then_some(stored))
}

async fn insert_secret_version(
    conn: &mut AnyConnection,
    tenant: &TenantId,
    path: &SecretPath,
    version: &SealedSecretVersion,
) -> Result<()> {
    sqlx::query("INSERT INTO secret_versions (tenant, path, version, created_at, doc) VALUES ($1, $2, $3, $4, $5)")
        .bind(tenant.as_str())
        .bind(path.as_str())
        .bind(i64::from(version.version))
        .bind(version.created_at.0)
        .bind(sealed_doc(version)?)
        .execute(conn)
        .await
        .map_err(unique("that secret version already exists"))?;
    Ok(())
}

async fn delete_secret_versions(
    conn: &mut AnyConnection,
    tenant: &TenantId,
    path: &SecretPath,
    versions: &[u32],
) -> Result<()> {
    for v in versions {
        sqlx::query("DELETE FROM secret_versions WHERE tenant = $1 AND path = $2 AND version = $3")
            .bind(tenant.as_str())
            .bind(path.as_str())
            .bind(i64::from(*v))
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    Ok(())
}

/// SQL `LIMIT` for a page: one more row than asked tells whether another page follows.
fn page_fetch_limit(page: &PageRequest) -> i64 {
    i64::from(page.effective_limit()) + 1
}

fn into_page<T>(mut items: Vec<T>, page: &PageRequest, cursor: impl Fn(&T) -> String) -> Page<T> {
    let limit = usize::try_from(page.effective_limit()).unwrap_or(usize::MAX);
    let more = items.len() > limit;
    items.truncate(limit);
    let next = if more { items.last().map(cursor) } else { None };
    Page { items, next }
}

#[async_trait]
impl Store for SqlStore {
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1 AS one").fetch_one(&self.pool).await.map_err(db)?;
        Ok(())
    }

    async fn ensure_tenant(&self, tenant: &Tenant) -> Result<bool> {
        let mut w = self.begin_write().await?;
        let inserted = sqlx::query(
            "INSERT INTO tenants (id, display_name, created_at) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
        )
        .bind(tenant.id.as_str())
        .bind(tenant.display_name.as_str())
        .bind(tenant.created_at.0)
        .execute(w.conn())
        .await
        .map_err(db)?
        .rows_affected()
            > 0;
        if !inserted {
            w.rollback().await?;
            return Ok(false);
        }
        append_change(w.conn(), &tenant.id, ChangeKind::Tenant, tenant.id.as_str(), Timestamp::now()).await?;
        w.commit().await?;
        Ok(true)
    }

    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Tenant>> {
        let row = sqlx::query("SELECT id, display_name, created_at FROM tenants WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.as_ref().map(tenant_from_row).transpose()
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>> {
        let rows = sqlx::query("SELECT id, display_name, created_at FROM tenants ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter().map(tenant_from_row).collect()
    }

    async fn create_key(&self, key: &Key, aliases: &[AliasName]) -> Result<Key> {
        // Revisions start at 1 in the store, whatever the caller passed.
        let mut stored = key.clone();
        stored.revision = 1;
        let doc = key_doc(&stored)?;
        let now = Timestamp::now();
        let mut w = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO keys (tenant, id, revision, state, deletion_at, created_at, updated_at, doc)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(stored.tenant.as_str())
        .bind(stored.id.as_str())
        .bind(stored.revision)
        .bind(stored.state.as_str())
        .bind(stored.deletion_at.map(|t| t.0))
        .bind(stored.created_at.0)
        .bind(stored.updated_at.0)
        .bind(doc)
        .execute(w.conn())
        .await
        .map_err(unique("a key with that id already exists"))?;
        for alias in aliases {
            insert_alias(w.conn(), &stored.tenant, alias, &stored.id, now).await?;
        }
        append_change(w.conn(), &stored.tenant, ChangeKind::Key, stored.id.as_str(), now).await?;
        for alias in aliases {
            append_change(w.conn(), &stored.tenant, ChangeKind::Alias, alias.as_str(), now).await?;
        }
        w.commit().await?;
        Ok(stored)
    }

    async fn get_key(&self, tenant: &TenantId, id: &KeyId) -> Result<Option<Key>> {
        let row = sqlx::query("SELECT revision, doc FROM keys WHERE tenant = $1 AND id = $2")
            .bind(tenant.as_str())
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn list_keys(&self, tenant: &TenantId, page: &PageRequest) -> Result<Page<Key>> {
        // Ids are never empty, so "" is before every id and stands for "from the start".
        let after = page.after.as_deref().unwrap_or("");
        let rows = sqlx::query("SELECT revision, doc FROM keys WHERE tenant = $1 AND id > $2 ORDER BY id LIMIT $3")
            .bind(tenant.as_str())
            .bind(after)
            .bind(page_fetch_limit(page))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        let keys = rows.iter().map(key_from_row).collect::<Result<Vec<_>>>()?;
        Ok(into_page(keys, page, |k| k.id.to_string()))
    }

    async fn update_key(&self, key: &Key) -> Result<Option<Key>> {
        let mut stored = key.clone();
        stored.revision = key.revision.checked_add(1).ok_or_else(|| Error::internal("key revision overflow"))?;
        let doc = key_doc(&stored)?;
        let mut w = self.begin_write().await?;
        let updated = sqlx::query(
            "UPDATE keys SET revision = $3, state = $4, deletion_at = $5, updated_at = $6, doc = $7
             WHERE tenant = $1 AND id = $2 AND revision = $8",
        )
        .bind(stored.tenant.as_str())
        .bind(stored.id.as_str())
        .bind(stored.revision)
        .bind(stored.state.as_str())
        .bind(stored.deletion_at.map(|t| t.0))
        .bind(stored.updated_at.0)
        .bind(doc)
        .bind(key.revision)
        .execute(w.conn())
        .await
        .map_err(db)?
        .rows_affected();
        if updated == 0 {
            // Lost the race or the key is gone: the caller reloads.
            w.rollback().await?;
            return Ok(None);
        }
        append_change(w.conn(), &stored.tenant, ChangeKind::Key, stored.id.as_str(), Timestamp::now()).await?;
        w.commit().await?;
        Ok(Some(stored))
    }

    async fn delete_key(&self, tenant: &TenantId, id: &KeyId, revision: i64) -> Result<bool> {
        let mut w = self.begin_write().await?;
        // Checked before anything is touched; writers are serialized, so the revision cannot move before the
        // conditional DELETE below (which checks it again regardless).
        let stored: Option<i64> = sqlx::query_scalar("SELECT revision FROM keys WHERE tenant = $1 AND id = $2")
            .bind(tenant.as_str())
            .bind(id.as_str())
            .fetch_optional(w.conn())
            .await
            .map_err(db)?;
        if stored != Some(revision) {
            // Gone, or changed since the caller read it (a deletion cancelled meanwhile): keep it.
            w.rollback().await?;
            return Ok(false);
        }
        let aliases: Vec<String> =
            sqlx::query_scalar("SELECT name FROM aliases WHERE tenant = $1 AND key_id = $2 ORDER BY name")
                .bind(tenant.as_str())
                .bind(id.as_str())
                .fetch_all(w.conn())
                .await
                .map_err(db)?;
        // Explicit rather than relying on ON DELETE CASCADE alone: the removed names go to the change feed.
        sqlx::query("DELETE FROM aliases WHERE tenant = $1 AND key_id = $2")
            .bind(tenant.as_str())
            .bind(id.as_str())
            .execute(w.conn())
            .await
            .map_err(db)?;
        let deleted = sqlx::query("DELETE FROM keys WHERE tenant = $1 AND id = $2 AND revision = $3")
            .bind(tenant.as_str())
            .bind(id.as_str())
            .bind(revision)
            .execute(w.conn())
            .await
            .map_err(db)?
            .rows_affected()
            > 0;
        if !deleted {
            w.rollback().await?;
            return Ok(false);
        }
        let now = Timestamp::now();
        append_change(w.conn(), tenant, ChangeKind::Key, id.as_str(), now).await?;
        for alias in &aliases {
            append_change(w.conn(), tenant, ChangeKind::Alias, alias, now).await?;
        }
        w.commit().await?;
        Ok(true)
    }

    async fn keys_due_for_deletion(&self, now: Timestamp, limit: u32) -> Result<Vec<Key>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // The state literal matches the partial index's predicate, so the planner can use it.
        let rows = sqlx::query(
            "SELECT revision, doc FROM keys WHERE state = 'PendingDeletion' AND deletion_at <= $1
             ORDER BY deletion_at, tenant, id LIMIT $2",
        )
        .bind(now.0)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(key_from_row).collect()
    }

    async fn count_keys(&self, tenant: &TenantId) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM keys WHERE tenant = $1")
            .bind(tenant.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        u64::try_from(n).map_err(Error::storage)
    }

    async fn create_alias(&self, tenant: &TenantId, alias: &AliasName, key: &KeyId) -> Result<AliasEntry> {
        let now = Timestamp::now();
        let mut w = self.begin_write().await?;
        if !key_exists(w.conn(), tenant, key).await? {
            return Err(Error::key_not_found());
        }
        insert_alias(w.conn(), tenant, alias, key, now).await?;
        append_change(w.conn(), tenant, ChangeKind::Alias, alias.as_str(), now).await?;
        w.commit().await?;
        Ok(AliasEntry {
            tenant: tenant.clone(),
            alias: alias.clone(),
            key_id: key.clone(),
            created_at: now,
            updated_at: now,
        })
    }

    async fn update_alias(&self, tenant: &TenantId, alias: &AliasName, key: &KeyId) -> Result<AliasEntry> {
        let now = Timestamp::now();
        let mut w = self.begin_write().await?;
        let created_at: Option<i64> =
            sqlx::query_scalar("SELECT created_at FROM aliases WHERE tenant = $1 AND name = $2")
                .bind(tenant.as_str())
                .bind(alias.as_str())
                .fetch_optional(w.conn())
                .await
                .map_err(db)?;
        let Some(created_at) = created_at else {
            return Err(alias_not_found());
        };
        if !key_exists(w.conn(), tenant, key).await? {
            return Err(Error::key_not_found());
        }
        sqlx::query("UPDATE aliases SET key_id = $3, updated_at = $4 WHERE tenant = $1 AND name = $2")
            .bind(tenant.as_str())
            .bind(alias.as_str())
            .bind(key.as_str())
            .bind(now.0)
            .execute(w.conn())
            .await
            .map_err(|e| if is_foreign_key_violation(&e) { Error::key_not_found() } else { db(e) })?;
        append_change(w.conn(), tenant, ChangeKind::Alias, alias.as_str(), now).await?;
        w.commit().await?;
        Ok(AliasEntry {
            tenant: tenant.clone(),
            alias: alias.clone(),
            key_id: key.clone(),
            created_at: Timestamp(created_at),
            updated_at: now,
        })
    }

    async fn delete_alias(&self, tenant: &TenantId, alias: &AliasName) -> Result<bool> {
        let mut w = self.begin_write().await?;
        let deleted = sqlx::query("DELETE FROM aliases WHERE tenant = $1 AND name = $2")
            .bind(tenant.as_str())
            .bind(alias.as_str())
            .execute(w.conn())
            .await
            .map_err(db)?
            .rows_affected()
            > 0;
        if !deleted {
            w.rollback().await?;
            return Ok(false);
        }
        append_change(w.conn(), tenant, ChangeKind::Alias, alias.as_str(), Timestamp::now()).await?;
        w.commit().await?;
        Ok(true)
    }

    async fn get_alias(&self, tenant: &TenantId, alias: &AliasName) -> Result<Option<AliasEntry>> {
        let row =
            sqlx::query("SELECT name, key_id, created_at, updated_at FROM aliases WHERE tenant = $1 AND name = $2")
                .bind(tenant.as_str())
                .bind(alias.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        row.map(|r| alias_from_row(tenant, &r)).transpose()
    }

    async fn list_aliases(
        &self,
        tenant: &TenantId,
        key: Option<&KeyId>,
        page: &PageRequest,
    ) -> Result<Page<AliasEntry>> {
        let after = page.after.as_deref().unwrap_or("");
        let rows = match key {
            Some(key) => {
                sqlx::query(
                    "SELECT name, key_id, created_at, updated_at FROM aliases
                     WHERE tenant = $1 AND key_id = $2 AND name > $3 ORDER BY name LIMIT $4",
                )
                .bind(tenant.as_str())
                .bind(key.as_str())
                .bind(after)
                .bind(page_fetch_limit(page))
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query(
                    "SELECT name, key_id, created_at, updated_at FROM aliases
                     WHERE tenant = $1 AND name > $2 ORDER BY name LIMIT $3",
                )
                .bind(tenant.as_str())
                .bind(after)
                .bind(page_fetch_limit(page))
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(db)?;
        let entries = rows.iter().map(|r| alias_from_row(tenant, r)).collect::<Result<Vec<_>>>()?;
        Ok(into_page(entries, page, |a| a.alias.to_string()))
    }

    async fn record_change(&self, tenant: &TenantId, kind: ChangeKind, id: &str) -> Result<i64> {
        let mut w = self.begin_write().await?;
        let seq = append_change(w.conn(), tenant, kind, id, Timestamp::now()).await?;
        w.commit().await?;
        Ok(seq)
    }

    async fn changes_since(&self, after: i64, limit: u32) -> Result<Vec<Change>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut after = after;
        loop {
            let rows =
                sqlx::query("SELECT seq, tenant, kind, id, at FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2")
                    .bind(after)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
            let mut changes = Vec::with_capacity(rows.len());
            for row in &rows {
                let seq: i64 = row.try_get("seq").map_err(db)?;
                after = seq;
                let kind: String = row.try_get("kind").map_err(db)?;
                let Some(kind) = ChangeKind::parse(&kind) else {
                    // Written by a newer kmsgate during a rolling upgrade: this build has nothing to invalidate
                    // for it, and failing would stop this replica from following the feed at all.
                    tracing::warn!(seq, kind, "skipping a change-feed entry of an unknown kind");
                    continue;
                };
                let tenant: String = row.try_get("tenant").map_err(db)?;
                changes.push(Change {
                    seq,
                    tenant: TenantId::parse(&tenant).map_err(Error::storage)?,
                    kind,
                    id: row.try_get("id").map_err(db)?,
                    at: Timestamp(row.try_get("at").map_err(db)?),
                });
            }
            // A full batch of skipped entries must not read as "caught up": followers stop at an empty
            // answer and would never see what comes after it. Read on past them.
            let full = u32::try_from(rows.len()).is_ok_and(|n| n >= limit);
            if !changes.is_empty() || !full {
                return Ok(changes);
            }
        }
    }

    async fn latest_change(&self) -> Result<i64> {
        sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) AS latest FROM changes")
            .fetch_one(&self.pool)
            .await
            .map_err(db)
    }

    async fn prune_changes(&self, before: Timestamp) -> Result<u64> {
        let mut w = self.begin_write().await?;
        // The newest row stays: `latest_change` is MAX(seq), and followers compare their cursor with it. (The
        // sequences themselves never reuse a number: AUTOINCREMENT on SQLite, an identity on PostgreSQL.)
        // On an empty feed MAX(seq) is NULL and the comparison deletes nothing.
        let removed = sqlx::query("DELETE FROM changes WHERE at < $1 AND seq < (SELECT MAX(seq) FROM changes)")
            .bind(before.0)
            .execute(w.conn())
            .await
            .map_err(db)?
            .rows_affected();
        w.commit().await?;
        Ok(removed)
    }

    async fn put_document(&self, doc: &Document, precondition: Precondition) -> Result<Option<Document>> {
        check_document_kind(&doc.kind)?;
        check_document_id(&doc.id)?;
        let body = serde_json::to_string(&doc.body).map_err(|_| Error::internal("a document cannot be serialized"))?;
        let now = Timestamp::now();
        let mut w = self.begin_write().await?;
        // Writers are serialized (SQLite's write lock, PostgreSQL's advisory lock), so what this reads stays
        // true until the write below; the UPDATE still checks the revision it read.
        let existing = sqlx::query("SELECT tenant, revision, created_at FROM documents WHERE kind = $1 AND id = $2")
            .bind(doc.kind.as_str())
            .bind(doc.id.as_str())
            .fetch_optional(w.conn())
            .await
            .map_err(db)?;
        let existing = match existing {
            Some(row) => {
                let tenant: String = row.try_get("tenant").map_err(db)?;
                let revision: i64 = row.try_get("revision").map_err(db)?;
                let created_at: i64 = row.try_get("created_at").map_err(db)?;
                Some((tenant, revision, Timestamp(created_at)))
            }
            None => None,
        };
        let stored = match (precondition, existing) {
            (Precondition::Absent, Some(_)) => {
                w.rollback().await?;
                return Err(document_exists());
            }
            (Precondition::Revision(_), None) => {
                w.rollback().await?;
                return Ok(None);
            }
            (Precondition::Revision(expected), Some((_, revision, _))) if revision != expected => {
                w.rollback().await?;
                return Ok(None);
            }
            (Precondition::Absent | Precondition::Any, None) => {
                let stored = Document { revision: 1, created_at: now, updated_at: now, ..doc.clone() };
                sqlx::query(
                    "INSERT INTO documents (kind, id, tenant, revision, body, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $6)",
                )
                .bind(stored.kind.as_str())
                .bind(stored.id.as_str())
                .bind(stored.tenant.as_str())
                .bind(stored.revision)
                .bind(body)
                .bind(now.0)
                .execute(w.conn())
                .await
                .map_err(unique(DOCUMENT_EXISTS))?;
                append_change(w.conn(), &stored.tenant, ChangeKind::Document, &stored.change_id(), now).await?;
                stored
            }
            (Precondition::Any | Precondition::Revision(_), Some((old_tenant, revision, created_at))) => {
                let next = revision.checked_add(1).ok_or_else(|| Error::internal("document revision overflow"))?;
                let stored = Document { revision: next, created_at, updated_at: now, ..doc.clone() };
                let updated = sqlx::query(
                    "UPDATE documents SET tenant = $3, revision = $4, body = $5, updated_at = $6
                     WHERE kind = $1 AND id = $2 AND revision = $7",
                )
                .bind(stored.kind.as_str())
                .bind(stored.id.as_str())
                .bind(stored.tenant.as_str())
                .bind(stored.revision)
                .bind(body)
                .bind(now.0)
                .bind(revision)
                .execute(w.conn())
                .await
                .map_err(db)?
                .rows_affected();
                if updated == 0 {
                    w.rollback().await?;
                    return Ok(None);
                }
                let change_id = stored.change_id();
                // A document that moved to another tenant is announced to both: followers may scope their
                // invalidations by tenant.
                if old_tenant != stored.tenant.as_str() {
                    let old_tenant = TenantId::parse(&old_tenant).map_err(Error::storage)?;
                    append_change(w.conn(), &old_tenant, ChangeKind::Document, &change_id, now).await?;
                }
                append_change(w.conn(), &stored.tenant, ChangeKind::Document, &change_id, now).await?;
                stored
            }
        };
        w.commit().await?;
        Ok(Some(stored))
    }

    async fn get_document(&self, kind: &str, id: &str) -> Result<Option<Document>> {
        check_document_kind(kind)?;
        // Ids often come from clients (an access key id): one that cannot be stored does not exist, and
        // must not reach PostgreSQL, which rejects some strings (NUL) outright.
        if !is_document_id(id) {
            return Ok(None);
        }
        let row = sqlx::query(
            "SELECT kind, id, tenant, revision, body, created_at, updated_at FROM documents WHERE kind = $1 AND id = $2",
        )
        .bind(kind)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(document_from_row).transpose()
    }

    async fn list_documents(
        &self,
        kind: &str,
        tenant: Option<&TenantId>,
        page: &PageRequest,
    ) -> Result<Page<Document>> {
        check_document_kind(kind)?;
        // Ids are never empty, so "" is before every id and stands for "from the start".
        let after = page.after.as_deref().unwrap_or("");
        let rows = match tenant {
            Some(tenant) => {
                sqlx::query(
                    "SELECT kind, id, tenant, revision, body, created_at, updated_at FROM documents
                     WHERE kind = $1 AND tenant = $2 AND id > $3 ORDER BY id LIMIT $4",
                )
                .bind(kind)
                .bind(tenant.as_str())
                .bind(after)
                .bind(page_fetch_limit(page))
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query(
                    "SELECT kind, id, tenant, revision, body, created_at, updated_at FROM documents
                     WHERE kind = $1 AND id > $2 ORDER BY id LIMIT $3",
                )
                .bind(kind)
                .bind(after)
                .bind(page_fetch_limit(page))
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(db)?;
        let docs = rows.iter().map(document_from_row).collect::<Result<Vec<_>>>()?;
        Ok(into_page(docs, page, |d| d.id.clone()))
    }

    async fn delete_document(&self, kind: &str, id: &str) -> Result<bool> {
        check_document_kind(kind)?;
        if !is_document_id(id) {
            return Ok(false);
        }
        let mut w = self.begin_write().await?;
        let tenant: Option<String> =
            sqlx::query_scalar("DELETE FROM documents WHERE kind = $1 AND id = $2 RETURNING tenant")
                .bind(kind)
                .bind(id)
                .fetch_optional(w.conn())
                .await
                .map_err(db)?;
        let Some(tenant) = tenant else {
            w.rollback().await?;
            return Ok(false);
        };
        let tenant = TenantId::parse(&tenant).map_err(Error::storage)?;
        append_change(w.conn(), &tenant, ChangeKind::Document, &format!("{kind}/{id}"), Timestamp::now()).await?;
        w.commit().await?;
        Ok(true)
    }

    async fn create_secret(&self, secret: &Secret, first: &SealedSecretVersion) -> Result<Secret> {
        // Revisions start at 1 in the store, whatever the caller passed.
        let mut stored = secret.clone();
        stored.revision = 1;
        let doc = secret_doc(&stored)?;
        let mut w = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO secrets (tenant, path, revision, deleted_at, expires_at, recoverable_until, created_at,
                                  updated_at, doc)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(stored.tenant.as_str())
        .bind(stored.path.as_str())
        .bind(stored.revision)
        .bind(stored.deleted_at.map(|t| t.0))
        .bind(stored.expires_at.map(|t| t.0))
        .bind(stored.recoverable_until.map(|t| t.0))
        .bind(stored.created_at.0)
        .bind(stored.updated_at.0)
        .bind(doc)
        .execute(w.conn())
        .await
        .map_err(unique("a secret already exists at that path"))?;
        insert_secret_version(w.conn(), &stored.tenant, &stored.path, first).await?;
        append_change(w.conn(), &stored.tenant, ChangeKind::Secret, stored.path.as_str(), Timestamp::now()).await?;
        w.commit().await?;
        Ok(stored)
    }

    async fn put_secret_version(
        &self,
        secret: &Secret,
        version: &SealedSecretVersion,
        prune: &[u32],
    ) -> Result<Option<Secret>> {
        let mut w = self.begin_write().await?;
        let Some(stored) = replace_secret(w.conn(), secret).await? else {
            // Lost the race or the secret is gone: the caller reloads.
            w.rollback().await?;
            return Ok(None);
        };
        insert_secret_version(w.conn(), &stored.tenant, &stored.path, version).await?;
        delete_secret_versions(w.conn(), &stored.tenant, &stored.path, prune).await?;
        append_change(w.conn(), &stored.tenant, ChangeKind::Secret, stored.path.as_str(), Timestamp::now()).await?;
        w.commit().await?;
        Ok(Some(stored))
    }

    async fn update_secret(&self, secret: &Secret, prune: &[u32]) -> Result<Option<Secret>> {
        let mut w = self.begin_write().await?;
        let Some(stored) = replace_secret(w.conn(), secret).await? else {
            w.rollback().await?;
            return Ok(None);
        };
        delete_secret_versions(w.conn(), &stored.tenant, &stored.path, prune).await?;
        append_change(w.conn(), &stored.tenant, ChangeKind::Secret, stored.path.as_str(), Timestamp::now()).await?;
        w.commit().await?;
        Ok(Some(stored))
    }

    async fn get_secret(&self, tenant: &TenantId, path: &SecretPath) -> Result<Option<Secret>> {
        let row = sqlx::query("SELECT revision, doc FROM secrets WHERE tenant = $1 AND path = $2")
            .bind(tenant.as_str())
            .bind(path.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.as_ref().map(secret_from_row).transpose()
    }

    async fn get_secret_version(
        &self,
        tenant: &TenantId,
        path: &SecretPath,
        version: u32,
    ) -> Result<Option<SealedSecretVersion>> {
        let doc: Option<String> =
            sqlx::query_scalar("SELECT doc FROM secret_versions WHERE tenant = $1 AND path = $2 AND version = $3")
                .bind(tenant.as_str())
                .bind(path.as_str())
                .bind(i64::from(version))
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        doc.map(|d| parse_doc(&d, "secret version")).transpose()
    }

    async fn list_secrets(&self, tenant: &TenantId, filter: &SecretFilter, page: &PageRequest) -> Result<Page<Secret>> {
        let (exact, from, to) = prefix_bounds(filter.prefix.as_ref());
        // Paths are never empty, so "" is before every path and stands for "from the start".
        let after = page.after.as_deref().unwrap_or("");
        let rows = sqlx::query(list_secrets_sql(filter.deleted))
            .bind(tenant.as_str())
            .bind(exact)
            .bind(from)
            .bind(to)
            .bind(after)
            .bind(page_fetch_limit(page))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        let secrets = rows.iter().map(secret_from_row).collect::<Result<Vec<_>>>()?;
        Ok(into_page(secrets, page, |s| s.path.to_string()))
    }

    async fn delete_secret(&self, tenant: &TenantId, path: &SecretPath, revision: i64) -> Result<bool> {
        let mut w = self.begin_write().await?;
        // Explicit rather than relying on ON DELETE CASCADE alone: the data goes whatever a connection's
        // foreign-key setting. Rolled back below if the revision does not match.
        sqlx::query(
            "DELETE FROM secret_versions WHERE tenant = $1 AND path = $2
             AND EXISTS (SELECT 1 FROM secrets WHERE tenant = $1 AND path = $2 AND revision = $3)",
        )
        .bind(tenant.as_str())
        .bind(path.as_str())
        .bind(revision)
        .execute(w.conn())
        .await
        .map_err(db)?;
        let deleted = sqlx::query("DELETE FROM secrets WHERE tenant = $1 AND path = $2 AND revision = $3")
            .bind(tenant.as_str())
            .bind(path.as_str())
            .bind(revision)
            .execute(w.conn())
            .await
            .map_err(db)?
            .rows_affected()
            > 0;
        if !deleted {
            // Gone, or changed since the caller read it (restored or rewritten meanwhile): keep it.
            w.rollback().await?;
            return Ok(false);
        }
        append_change(w.conn(), tenant, ChangeKind::Secret, path.as_str(), Timestamp::now()).await?;
        w.commit().await?;
        Ok(true)
    }

    async fn secrets_due_for_purge(&self, now: Timestamp, limit: u32) -> Result<Vec<Secret>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // `deleted_at IS NOT NULL` matches the partial index's predicate, so the planner can use it.
        let rows = sqlx::query(
            "SELECT revision, doc FROM secrets WHERE deleted_at IS NOT NULL AND recoverable_until <= $1
             ORDER BY recoverable_until, tenant, path LIMIT $2",
        )
        .bind(now.0)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(secret_from_row).collect()
    }

    async fn count_secrets(&self, tenant: &TenantId) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM secrets WHERE tenant = $1 AND deleted_at IS NULL")
            .bind(tenant.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        u64::try_from(n).map_err(Error::storage)
    }

    async fn heartbeat(&self, id: &str, info: &serde_json::Value) -> Result<()> {
        if !is_document_id(id) {
            return Err(Error::invalid("the replica id must be 1 to 256 printable ASCII characters"));
        }
        let info = serde_json::to_string(info).map_err(|_| Error::internal("replica info cannot be serialized"))?;
        let mut w = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO replicas (id, info, last_seen) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET info = excluded.info, last_seen = excluded.last_seen",
        )
        .bind(id)
        .bind(info)
        .bind(Timestamp::now().0)
        .execute(w.conn())
        .await
        .map_err(db)?;
        w.commit().await
    }

    async fn live_replicas(&self, since: Timestamp) -> Result<Vec<Replica>> {
        let rows = sqlx::query("SELECT id, info, last_seen FROM replicas WHERE last_seen >= $1 ORDER BY id")
            .bind(since.0)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|row| {
                let info: String = row.try_get("info").map_err(db)?;
                Ok(Replica {
                    id: row.try_get("id").map_err(db)?,
                    info: parse_json(&info, "replica info")?,
                    last_seen: Timestamp(row.try_get("last_seen").map_err(db)?),
                })
            })
            .collect()
    }
}

async fn insert_alias(
    conn: &mut AnyConnection,
    tenant: &TenantId,
    alias: &AliasName,
    key: &KeyId,
    now: Timestamp,
) -> Result<()> {
    sqlx::query("INSERT INTO aliases (tenant, name, key_id, created_at, updated_at) VALUES ($1, $2, $3, $4, $4)")
        .bind(tenant.as_str())
        .bind(alias.as_str())
        .bind(key.as_str())
        .bind(now.0)
        .execute(conn)
        .await
        .map_err(|e| {
            if is_foreign_key_violation(&e) {
                Error::key_not_found()
            } else {
                unique("an alias of that name already exists")(e)
            }
        })?;
    Ok(())
}

#[cfg(test)]
// Tests report failures by panicking; `expect` names what failed.
#[allow(clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use kmsgate_core::{ErrorKind, Store, TenantId};

    use super::*;
    use crate::migrate::{MIGRATIONS, Migration};
    use crate::testsuite::{key_id, sample_key, sample_secret, sealed_version, tenant};

    fn temp_url(dir: &tempfile::TempDir) -> String {
        format!("sqlite://{}/kms.db", dir.path().display())
    }

    async fn open_file(url: &str, busy: Duration) -> SqlStore {
        SqlStore::open_with(url, StoreOptions::default().busy_timeout(busy)).await.expect("open")
    }

    #[tokio::test]
    async fn every_pooled_sqlite_connection_is_durable_and_enforces_foreign_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_file(&temp_url(&dir), Duration::from_millis(1234)).await;
        // Several connections at once, so the pool has to open more than one.
        let mut conns = Vec::new();
        for _ in 0..3 {
            conns.push(store.pool().acquire().await.expect("acquire"));
        }
        for conn in &mut conns {
            let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut **conn).await.expect("pragma");
            assert_eq!(mode, "wal");
            let sync: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(&mut **conn).await.expect("pragma");
            assert_eq!(sync, 2, "synchronous=FULL");
            let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys").fetch_one(&mut **conn).await.expect("pragma");
            assert_eq!(fk, 1);
            let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout").fetch_one(&mut **conn).await.expect("pragma");
            assert_eq!(busy, 1234);
        }
    }

    /// SQLite ends a transaction by itself on some statement errors (SQLITE_FULL, SQLITE_IOERR, SQLITE_BUSY,
    /// SQLITE_NOMEM, a trigger's `RAISE(ROLLBACK)`); the rollback that follows then fails ("no transaction is
    /// active") and sqlx's connection keeps counting one open transaction. Such a connection must not serve
    /// again: every later write on it would fail with "attempted to call begin_with at non-zero transaction
    /// depth". One pooled connection, so the next write gets the same one unless it was discarded.
    #[tokio::test]
    async fn a_transaction_sqlite_ended_itself_does_not_poison_the_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = StoreOptions::default().max_connections(1);
        let store = SqlStore::open_with(&temp_url(&dir), opts).await.expect("open");
        // A test-only trigger stands for a disk that fills up in the middle of a write.
        sqlx::query(
            "CREATE TRIGGER full_disk BEFORE INSERT ON documents WHEN NEW.id = 'boom'
             BEGIN SELECT RAISE(ROLLBACK, 'disk full'); END",
        )
        .execute(store.pool())
        .await
        .expect("trigger");
        let doc = |id: &str| Document::new("test.doc", id, tenant("acme"), serde_json::json!({"id": id}));
        for round in 0..3 {
            let err = store.put_document(&doc("boom"), Precondition::Any).await.expect_err("the write fails");
            assert_eq!(err.kind(), ErrorKind::StorageFailure);
            for i in 0..3 {
                let id = format!("after-{round}-{i}");
                store.put_document(&doc(&id), Precondition::Absent).await.expect("later writes succeed");
                assert!(store.get_document("test.doc", &id).await.expect("read").is_some());
            }
        }
        assert_eq!(store.get_document("test.doc", "boom").await.expect("read"), None, "nothing half-written");
    }

    /// Writes abandoned while SQLite's busy handler waits for another process's write lock (a store deadline
    /// shorter than the busy timeout) leave no transaction behind once that lock is free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_cancelled_while_waiting_for_another_writer_leave_no_transaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = temp_url(&dir);
        let a = SqlStore::open_with(&url, StoreOptions::default().max_connections(2)).await.expect("open a");
        let b = open_file(&url, Duration::from_secs(10)).await;
        let doc = |id: &str| Document::new("test.doc", id, tenant("acme"), serde_json::json!({"id": id}));
        for round in 0..5_u64 {
            let held = b.begin_write().await.expect("b holds the write lock");
            for wait in [0, 1, 5, 20] {
                let d = doc(&format!("cancelled-{round}-{wait}"));
                let w = a.put_document(&d, Precondition::Any);
                assert!(tokio::time::timeout(Duration::from_millis(wait + round), w).await.is_err(), "still waiting");
            }
            drop(held);
            for i in 0..4 {
                let id = format!("after-{round}-{i}");
                a.put_document(&doc(&id), Precondition::Absent).await.expect("later writes succeed");
            }
        }
        for round in 0..5 {
            for wait in [0, 1, 5, 20] {
                assert_eq!(a.get_document("test.doc", &format!("cancelled-{round}-{wait}")).await.expect("get"), None);
            }
        }
    }

    #[tokio::test]
    async fn a_busy_pool_is_a_dependency_timeout() {
        let opts = StoreOptions::default().acquire_timeout(Duration::from_millis(100));
        let store = SqlStore::open_with("sqlite::memory:", opts).await.expect("open");
        let held = store.pool().acquire().await.expect("the only connection");
        let err = store.get_key(&tenant("acme"), &key_id("k")).await.expect_err("no connection is free");
        assert_eq!(err.kind(), ErrorKind::DependencyTimeout);
        drop(held);
        assert_eq!(store.get_key(&tenant("acme"), &key_id("k")).await.expect("free again"), None);
    }

    #[tokio::test]
    async fn a_writer_in_another_process_beyond_the_busy_timeout_is_a_dependency_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = temp_url(&dir);
        // Two pools stand for two processes: the in-process writer queue does not span them.
        let a = open_file(&url, Duration::from_millis(100)).await;
        let b = open_file(&url, Duration::from_millis(100)).await;
        let held = a.begin_write().await.expect("a holds the write lock");
        let err = b.create_key(&sample_key("acme", "k"), &[]).await.expect_err("b cannot write");
        assert_eq!(err.kind(), ErrorKind::DependencyTimeout);
        assert_eq!(b.get_key(&tenant("acme"), &key_id("k")).await.expect("readers are not blocked"), None);
        drop(held);
        b.create_key(&sample_key("acme", "k"), &[]).await.expect("b writes once a is done");
    }

    #[tokio::test]
    async fn migrations_apply_once_and_record_each_step() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = temp_url(&dir);
        let store = SqlStore::open(&url).await.expect("open");
        assert!(migrate::run(store.pool(), Dialect::Sqlite).await.expect("rerun").is_empty());
        store.close().await;
        let store = SqlStore::open(&url).await.expect("reopen");
        let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
            .fetch_all(store.pool())
            .await
            .expect("versions");
        assert_eq!(versions, MIGRATIONS.iter().map(|m| m.version).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_failing_step_leaves_the_schema_unchanged() {
        let store = SqlStore::open("sqlite::memory:").await.expect("open");
        let mut steps: Vec<Migration> = MIGRATIONS.to_vec();
        steps.push(Migration {
            version: 1000,
            name: "broken",
            sqlite: &["CREATE TABLE extra (x INTEGER)", "THIS IS NOT SQL"],
            postgres: &["THIS IS NOT SQL"],
        });
        let err = migrate::run_steps(store.pool(), Dialect::Sqlite, &steps).await.expect_err("a broken step fails");
        assert_eq!(err.kind(), ErrorKind::StorageFailure);
        let extra: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE name = 'extra'")
            .fetch_one(store.pool())
            .await
            .expect("query");
        assert_eq!(extra, 0, "the step's first statement was rolled back");
        let latest: i64 = sqlx::query_scalar("SELECT MAX(version) FROM schema_migrations")
            .fetch_one(store.pool())
            .await
            .expect("query");
        assert_eq!(Some(latest), MIGRATIONS.last().map(|m| m.version));
        store.ping().await.expect("the store still works");
    }

    #[tokio::test]
    async fn a_database_of_an_older_build_is_upgraded_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = temp_url(&dir);
        // What the first release left behind: step 1 only, with a key in it.
        let store = SqlStore::open(&url).await.expect("open");
        sqlx::query("DROP TABLE audit_log").execute(store.pool()).await.expect("drop");
        sqlx::query("DROP TABLE secret_versions").execute(store.pool()).await.expect("drop");
        sqlx::query("DROP TABLE secrets").execute(store.pool()).await.expect("drop");
        sqlx::query("DROP TABLE documents").execute(store.pool()).await.expect("drop");
        sqlx::query("DROP TABLE replicas").execute(store.pool()).await.expect("drop");
        sqlx::query("DELETE FROM schema_migrations WHERE version > 1").execute(store.pool()).await.expect("forget");
        let key = store.create_key(&sample_key("acme", "k"), &[]).await.expect("create");
        store.close().await;

        let store = SqlStore::open(&url).await.expect("reopen upgrades");
        assert_eq!(store.get_key(&tenant("acme"), &key_id("k")).await.expect("get"), Some(key), "data is kept");
        let d = Document::new("x", "y", tenant("acme"), serde_json::json!({}));
        assert!(store.put_document(&d, Precondition::Absent).await.expect("put").is_some());
        store.heartbeat("r", &serde_json::json!({})).await.expect("heartbeat");
        let secret = sample_secret("acme", "after/upgrade");
        store.create_secret(&secret, &sealed_version(1, 1)).await.expect("secrets work after the upgrade");
        assert!(migrate::run(store.pool(), Dialect::Sqlite).await.expect("rerun").is_empty());
    }

    #[tokio::test]
    async fn a_corrupt_secret_record_is_a_storage_failure_that_does_not_leak_it() {
        let store = SqlStore::open("sqlite::memory:").await.expect("open");
        let secret = sample_secret("acme", "app/db");
        store.create_secret(&secret, &sealed_version(1, 1)).await.expect("create");
        sqlx::query("UPDATE secrets SET doc = '{\"metadata\": {\"owner\": \"hunter2'")
            .execute(store.pool())
            .await
            .expect("corrupt");
        sqlx::query("UPDATE secret_versions SET doc = '{\"wrapped_key\": \"hunter3'")
            .execute(store.pool())
            .await
            .expect("corrupt");
        let path = secret.path.clone();
        let err = store.get_secret(&tenant("acme"), &path).await.expect_err("corrupt record");
        assert_eq!((err.kind(), err.message()), (ErrorKind::StorageFailure, "the store failed"));
        assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
        let filter = kmsgate_core::SecretFilter::default();
        let err = store.list_secrets(&tenant("acme"), &filter, &PageRequest::first(1)).await.expect_err("corrupt");
        assert_eq!(err.kind(), ErrorKind::StorageFailure);
        let err = store.get_secret_version(&tenant("acme"), &path, 1).await.expect_err("corrupt version");
        assert_eq!(err.kind(), ErrorKind::StorageFailure);
        assert!(!format!("{err:?}").contains("hunter3"), "{err:?}");
    }

    #[tokio::test]
    async fn deleting_a_secret_row_cascades_to_its_versions() {
        // The foreign key is the backstop behind delete_secret's explicit delete.
        let store = SqlStore::open("sqlite::memory:").await.expect("open");
        let secret = sample_secret("acme", "app/db");
        store.create_secret(&secret, &sealed_version(1, 1)).await.expect("create");
        sqlx::query("DELETE FROM secrets").execute(store.pool()).await.expect("delete");
        let left: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM secret_versions").fetch_one(store.pool()).await.expect("count");
        assert_eq!(left, 0);
    }

    #[tokio::test]
    async fn a_corrupt_document_body_is_a_storage_failure_that_does_not_leak_it() {
        let store = SqlStore::open("sqlite::memory:").await.expect("open");
        let d = Document::new("xks.credential", "AK", tenant("acme"), serde_json::json!({"k": "v"}));
        store.put_document(&d, Precondition::Absent).await.expect("put");
        sqlx::query("UPDATE documents SET body = '{\"secret\": \"hunter2'")
            .execute(store.pool())
            .await
            .expect("corrupt");
        let err = store.get_document("xks.credential", "AK").await.expect_err("corrupt body");
        assert_eq!(err.kind(), ErrorKind::StorageFailure);
        assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
        let err = store.list_documents("xks.credential", None, &PageRequest::first(1)).await.expect_err("corrupt");
        assert_eq!(err.kind(), ErrorKind::StorageFailure);
    }

    #[tokio::test]
    async fn a_newer_or_edited_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = temp_url(&dir);
        let store = SqlStore::open(&url).await.expect("open");
        sqlx::query("INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES (999, 'future', 0, 0)")
            .execute(store.pool())
            .await
            .expect("insert");
        store.close().await;
        let err = SqlStore::open(&url).await.expect_err("newer schema");
        assert_eq!(err.kind(), ErrorKind::StorageFailure);
        assert!(err.message().contains("newer"), "{}", err.message());

        let store = SqlStore::open("sqlite::memory:").await.expect("open");
        sqlx::query("UPDATE schema_migrations SET checksum = checksum + 1 WHERE version = 1")
            .execute(store.pool())
            .await
            .expect("tamper");
        let err = migrate::run(store.pool(), Dialect::Sqlite).await.expect_err("edited step");
        assert_eq!(err.kind(), ErrorKind::StorageFailure);
    }

    #[tokio::test]
    async fn a_corrupt_document_is_a_storage_failure_that_does_not_leak_it() {
        let store = SqlStore::open("sqlite::memory:").await.expect("open");
        store.create_key(&sample_key("acme", "k"), &[]).await.expect("create");
        sqlx::query("UPDATE keys SET doc = '{\"id\": \"k\", \"handle\": \"wrapped-secret-material\"'")
            .execute(store.pool())
            .await
            .expect("corrupt");
        let err = store.get_key(&tenant("acme"), &key_id("k")).await.expect_err("corrupt doc");
        assert_eq!(err.kind(), ErrorKind::StorageFailure);
        assert_eq!(err.message(), "the store failed");
        assert!(!format!("{err:?}").contains("wrapped-secret-material"), "{err:?}");
    }

    #[tokio::test]
    async fn unknown_change_kinds_from_newer_builds_are_skipped() {
        let store = SqlStore::open("sqlite::memory:").await.expect("open");
        let t = TenantId::parse("acme").expect("tenant");
        let first = store.record_change(&t, ChangeKind::Key, "a").await.expect("record");
        sqlx::query("INSERT INTO changes (tenant, kind, id, at) VALUES ('acme', 'gadget', 'x', 0)")
            .execute(store.pool())
            .await
            .expect("insert");
        let last = store.record_change(&t, ChangeKind::Alias, "alias/b").await.expect("record");
        let seqs: Vec<i64> = store.changes_since(0, 10).await.expect("changes").iter().map(|c| c.seq).collect();
        assert_eq!(seqs, vec![first, last]);
        // A batch made only of unknown entries is read past, not reported as the end of the feed.
        let after_first: Vec<i64> =
            store.changes_since(first, 1).await.expect("changes").iter().map(|c| c.seq).collect();
        assert_eq!(after_first, vec![last]);
        assert_eq!(store.latest_change().await.expect("latest"), last);
    }
}

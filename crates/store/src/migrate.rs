//! The embedded schema migrations: numbered steps with one DDL list per dialect, recorded in
//! `schema_migrations`. All pending steps run in one write transaction, so concurrent openers (server and CLI
//! on the same file, replicas on one PostgreSQL) apply them once, and a failed step leaves the schema as it was.
//!
//! Rules: a released step is never edited (its checksum is verified at every open); a change is a new step.

use kmsgate_core::{Error, ErrorKind, Result, Timestamp};
use sqlx::AnyConnection;
use sqlx::AnyPool;

use crate::dialect::{Dialect, WRITER_LOCK_KEY};
use crate::errors::db;

#[derive(Clone)]
pub(crate) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sqlite: &'static [&'static str],
    pub postgres: &'static [&'static str],
}

impl Migration {
    fn statements(&self, dialect: Dialect) -> &'static [&'static str] {
        match dialect {
            Dialect::Sqlite => self.sqlite,
            Dialect::Postgres => self.postgres,
        }
    }

    /// FNV-1a over the dialect's statements: detects a released step that was edited afterwards.
    fn checksum(&self, dialect: Dialect) -> i64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for stmt in self.statements(dialect) {
            for b in stmt.bytes().chain(std::iter::once(0)) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        i64::from_ne_bytes(h.to_ne_bytes())
    }
}

// Conventions shared by both dialects:
// - timestamps are i64 milliseconds since the epoch; documents are JSON in TEXT columns;
// - SQLite columns are declared only as INTEGER or TEXT, the types the Any driver maps;
// - PostgreSQL text keys use COLLATE "C" so `ORDER BY id` and the `id > $after` page cursor follow byte order,
//   as on SQLite, whatever the database's default collation is.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "tenants, keys, aliases, change feed",
        sqlite: &[
            "CREATE TABLE tenants (
            id TEXT NOT NULL PRIMARY KEY,
            display_name TEXT NOT NULL,
            created_at INTEGER NOT NULL
        )",
            // `doc` is the whole Key as JSON; the other columns are the fields queries filter or sort on.
            "CREATE TABLE keys (
            tenant TEXT NOT NULL,
            id TEXT NOT NULL,
            revision INTEGER NOT NULL,
            state TEXT NOT NULL,
            deletion_at INTEGER,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            doc TEXT NOT NULL,
            PRIMARY KEY (tenant, id)
        )",
            "CREATE INDEX keys_pending_deletion ON keys (deletion_at) WHERE state = 'PendingDeletion'",
            "CREATE TABLE aliases (
            tenant TEXT NOT NULL,
            name TEXT NOT NULL,
            key_id TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            PRIMARY KEY (tenant, name),
            FOREIGN KEY (tenant, key_id) REFERENCES keys (tenant, id) ON DELETE CASCADE
        )",
            "CREATE INDEX aliases_by_key ON aliases (tenant, key_id, name)",
            // AUTOINCREMENT: a sequence number is never reused, even after the newest rows are deleted, so a
            // follower's cursor stays meaningful.
            "CREATE TABLE changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            tenant TEXT NOT NULL,
            kind TEXT NOT NULL,
            id TEXT NOT NULL,
            at INTEGER NOT NULL
        )",
        ],
        postgres: &[
            r#"CREATE TABLE tenants (
            id TEXT COLLATE "C" NOT NULL PRIMARY KEY,
            display_name TEXT NOT NULL,
            created_at BIGINT NOT NULL
        )"#,
            r#"CREATE TABLE keys (
            tenant TEXT COLLATE "C" NOT NULL,
            id TEXT COLLATE "C" NOT NULL,
            revision BIGINT NOT NULL,
            state TEXT NOT NULL,
            deletion_at BIGINT,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            doc TEXT NOT NULL,
            PRIMARY KEY (tenant, id)
        )"#,
            "CREATE INDEX keys_pending_deletion ON keys (deletion_at) WHERE state = 'PendingDeletion'",
            r#"CREATE TABLE aliases (
            tenant TEXT COLLATE "C" NOT NULL,
            name TEXT COLLATE "C" NOT NULL,
            key_id TEXT COLLATE "C" NOT NULL,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            PRIMARY KEY (tenant, name),
            FOREIGN KEY (tenant, key_id) REFERENCES keys (tenant, id) ON DELETE CASCADE
        )"#,
            "CREATE INDEX aliases_by_key ON aliases (tenant, key_id, name)",
            r#"CREATE TABLE changes (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            tenant TEXT COLLATE "C" NOT NULL,
            kind TEXT NOT NULL,
            id TEXT NOT NULL,
            at BIGINT NOT NULL
        )"#,
        ],
    },
    Migration {
        version: 2,
        name: "documents, replica heartbeats",
        sqlite: &[
            // Ids are unique within a kind across tenants; the tenant is an attribute to list by.
            "CREATE TABLE documents (
                kind TEXT NOT NULL,
                id TEXT NOT NULL,
                tenant TEXT NOT NULL,
                revision INTEGER NOT NULL,
                body TEXT NOT NULL,
                created_at INTEGER NOT NULL,
                updated_at INTEGER NOT NULL,
                PRIMARY KEY (kind, id)
            )",
            "CREATE INDEX documents_by_tenant ON documents (kind, tenant, id)",
            "CREATE TABLE replicas (
                id TEXT NOT NULL PRIMARY KEY,
                info TEXT NOT NULL,
                last_seen INTEGER NOT NULL
            )",
        ],
        postgres: &[
            r#"CREATE TABLE documents (
                kind TEXT COLLATE "C" NOT NULL,
                id TEXT COLLATE "C" NOT NULL,
                tenant TEXT COLLATE "C" NOT NULL,
                revision BIGINT NOT NULL,
                body TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                PRIMARY KEY (kind, id)
            )"#,
            "CREATE INDEX documents_by_tenant ON documents (kind, tenant, id)",
            r#"CREATE TABLE replicas (
                id TEXT COLLATE "C" NOT NULL PRIMARY KEY,
                info TEXT NOT NULL,
                last_seen BIGINT NOT NULL
            )"#,
        ],
    },
    Migration {
        version: 3,
        name: "secrets and their versions",
        sqlite: &[
            // `doc` is the whole Secret record as JSON (metadata only, never values); the other columns are the
            // fields queries filter or sort on. `deleted_at` is set while the secret is soft-deleted.
            "CREATE TABLE secrets (
                tenant TEXT NOT NULL,
                path TEXT NOT NULL,
                revision INTEGER NOT NULL,
                deleted_at INTEGER,
                expires_at INTEGER,
                recoverable_until INTEGER,
                created_at INTEGER NOT NULL,
                updated_at INTEGER NOT NULL,
                doc TEXT NOT NULL,
                PRIMARY KEY (tenant, path)
            )",
            "CREATE INDEX secrets_due_for_purge ON secrets (recoverable_until) WHERE deleted_at IS NOT NULL",
            // One row per retained version: the sealed data (JSON with base64 fields; ciphertext only).
            "CREATE TABLE secret_versions (
                tenant TEXT NOT NULL,
                path TEXT NOT NULL,
                version INTEGER NOT NULL,
                created_at INTEGER NOT NULL,
                doc TEXT NOT NULL,
                PRIMARY KEY (tenant, path, version),
                FOREIGN KEY (tenant, path) REFERENCES secrets (tenant, path) ON DELETE CASCADE
            )",
        ],
        postgres: &[
            r#"CREATE TABLE secrets (
                tenant TEXT COLLATE "C" NOT NULL,
                path TEXT COLLATE "C" NOT NULL,
                revision BIGINT NOT NULL,
                deleted_at BIGINT,
                expires_at BIGINT,
                recoverable_until BIGINT,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                doc TEXT NOT NULL,
                PRIMARY KEY (tenant, path)
            )"#,
            "CREATE INDEX secrets_due_for_purge ON secrets (recoverable_until) WHERE deleted_at IS NOT NULL",
            r#"CREATE TABLE secret_versions (
                tenant TEXT COLLATE "C" NOT NULL,
                path TEXT COLLATE "C" NOT NULL,
                version BIGINT NOT NULL,
                created_at BIGINT NOT NULL,
                doc TEXT NOT NULL,
                PRIMARY KEY (tenant, path, version),
                FOREIGN KEY (tenant, path) REFERENCES secrets (tenant, path) ON DELETE CASCADE
            )"#,
        ],
    },
    Migration {
        version: 4,
        name: "audit log",
        // One hash-chained audit log for all replicas (`[audit] destination = "store"`). `record` is the sealed
        // record exactly as hashed; `hash` repeats its hash so an append reads the head without parsing JSON.
        sqlite: &["CREATE TABLE audit_log (
                seq INTEGER NOT NULL PRIMARY KEY,
                hash TEXT NOT NULL,
                record TEXT NOT NULL
            )"],
        postgres: &["CREATE TABLE audit_log (
                seq BIGINT NOT NULL PRIMARY KEY,
                hash TEXT NOT NULL,
                record TEXT NOT NULL
            )"],
    },
];

const CREATE_SQLITE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER NOT NULL PRIMARY KEY,
    name TEXT NOT NULL,
    checksum INTEGER NOT NULL,
    applied_at INTEGER NOT NULL
)";

const CREATE_POSTGRES: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version BIGINT NOT NULL PRIMARY KEY,
    name TEXT NOT NULL,
    checksum BIGINT NOT NULL,
    applied_at BIGINT NOT NULL
)";

/// Brings the schema up to date; returns the versions it applied.
pub(crate) async fn run(pool: &AnyPool, dialect: Dialect) -> Result<Vec<i64>> {
    run_steps(pool, dialect, MIGRATIONS).await
}

pub(crate) async fn run_steps(pool: &AnyPool, dialect: Dialect, steps: &[Migration]) -> Result<Vec<i64>> {
    let mut tx = pool.begin_with(dialect.begin_write_sql()).await.map_err(db)?;
    // PostgreSQL: without the lock, two replicas starting together both run `CREATE TABLE IF NOT EXISTS`
    // and one fails on the catalog's unique index. SQLite's IMMEDIATE transaction already serializes.
    if let Some(lock) = dialect.writer_lock_sql() {
        sqlx::query(lock).bind(WRITER_LOCK_KEY).execute(&mut *tx).await.map_err(db)?;
    }
    let create = match dialect {
        Dialect::Sqlite => CREATE_SQLITE,
        Dialect::Postgres => CREATE_POSTGRES,
    };
    sqlx::query(create).execute(&mut *tx).await.map_err(db)?;
    let applied = applied_steps(&mut tx, dialect, steps).await?;

    let mut done = Vec::new();
    for step in steps.iter().filter(|s| !applied.contains(&s.version)) {
        for stmt in step.statements(dialect) {
            sqlx::query(*stmt).execute(&mut *tx).await.map_err(db)?;
        }
        sqlx::query("INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES ($1, $2, $3, $4)")
            .bind(step.version)
            .bind(step.name)
            .bind(step.checksum(dialect))
            .bind(Timestamp::now().0)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        done.push(step.version);
    }
    tx.commit().await.map_err(db)?;
    for v in &done {
        tracing::info!(dialect = dialect.as_str(), version = v, "applied store schema migration");
    }
    Ok(done)
}

/// The versions already applied, after checking they are the steps this build knows.
async fn applied_steps(conn: &mut AnyConnection, dialect: Dialect, steps: &[Migration]) -> Result<Vec<i64>> {
    let rows: Vec<(i64, i64)> = sqlx::query_as("SELECT version, checksum FROM schema_migrations ORDER BY version")
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?;
    let mut versions = Vec::with_capacity(rows.len());
    for (version, checksum) in rows {
        let Some(step) = steps.iter().find(|s| s.version == version) else {
            // A newer kmsgate migrated this database: running older code against it could corrupt data.
            return Err(Error::new(ErrorKind::StorageFailure, "the store schema is newer than this kmsgate build"));
        };
        if step.checksum(dialect) != checksum {
            return Err(Error::new(
                ErrorKind::StorageFailure,
                "an applied store schema migration differs from this build's; refusing to start",
            ));
        }
        versions.push(version);
    }
    Ok(versions)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PINNED_1_SQLITE: i64 = -6_017_179_768_745_072_154;
    const PINNED_1_POSTGRES: i64 = 8_424_781_583_339_288_560;
    const PINNED_2_SQLITE: i64 = 1_048_992_418_333_811_814;
    const PINNED_2_POSTGRES: i64 = 6_279_676_516_138_263_488;
    const PINNED_3_SQLITE: i64 = 1_415_009_626_102_336_558;
    const PINNED_3_POSTGRES: i64 = 2_042_852_113_960_645_004;

    #[test]
    fn versions_are_increasing_and_both_dialects_are_covered() {
        let mut last = 0;
        for m in MIGRATIONS {
            assert!(m.version > last, "migration versions must increase");
            last = m.version;
            assert!(!m.sqlite.is_empty() && !m.postgres.is_empty(), "step {} lacks a dialect", m.version);
            assert_ne!(m.checksum(Dialect::Sqlite), m.checksum(Dialect::Postgres));
        }
    }

    /// Released steps are frozen: a database that applied one refuses to open with a build whose step differs.
    /// A failure here means a released step was edited; add a new step instead.
    #[test]
    fn released_steps_are_unchanged() {
        let pinned: &[(i64, i64, i64)] = &[
            (1, PINNED_1_SQLITE, PINNED_1_POSTGRES),
            (2, PINNED_2_SQLITE, PINNED_2_POSTGRES),
            (3, PINNED_3_SQLITE, PINNED_3_POSTGRES),
        ];
        for (version, sqlite, postgres) in pinned {
            let step = MIGRATIONS.iter().find(|m| m.version == *version).expect("released step");
            assert_eq!(
                (step.checksum(Dialect::Sqlite), step.checksum(Dialect::Postgres)),
                (*sqlite, *postgres),
                "step {version}"
            );
        }
    }
}

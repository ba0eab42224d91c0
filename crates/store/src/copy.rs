//! Copying a whole installation into another, empty store: `kmsgate store migrate --from sqlite://… --to
//! postgres://…`. Both sides run the same schema (each store migrates itself when it opens), so the copy is
//! table by table with explicit column lists. Every table of the schema is either copied or deliberately left
//! out; a test compares these lists with the live schema, so a new table or column cannot be forgotten.

use kmsgate_core::{Error, ErrorKind, Result};
use sqlx::{AssertSqlSafe, Row};

use crate::errors::db;
use crate::sql_store::SqlStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Col {
    Int,
    OptInt,
    Text,
}

#[derive(Debug)]
pub(crate) struct Table {
    pub name: &'static str,
    pub columns: &'static [(&'static str, Col)],
    pub order_by: &'static str,
}

use Col::{Int, OptInt, Text};

/// Copied in this order, parents before children (foreign keys).
pub(crate) const COPIED: &[Table] = &[
    Table { name: "tenants", columns: &[("id", Text), ("display_name", Text), ("created_at", Int)], order_by: "id" },
    Table {
        name: "keys",
        columns: &[
            ("tenant", Text),
            ("id", Text),
            ("revision", Int),
            ("state", Text),
            ("deletion_at", OptInt),
            ("created_at", Int),
            ("updated_at", Int),
            ("doc", Text),
        ],
        order_by: "tenant, id",
    },
    Table {
        name: "aliases",
        columns: &[("tenant", Text), ("name", Text), ("key_id", Text), ("created_at", Int), ("updated_at", Int)],
        order_by: "tenant, name",
    },
    Table {
        name: "documents",
        columns: &[
            ("kind", Text),
            ("id", Text),
            ("tenant", Text),
            ("revision", Int),
            ("body", Text),
            ("created_at", Int),
            ("updated_at", Int),
        ],
        order_by: "kind, id",
    },
    Table {
        name: "secrets",
        columns: &[
            ("tenant", Text),
            ("path", Text),
            ("revision", Int),
            ("deleted_at", OptInt),
            ("expires_at", OptInt),
            ("recoverable_until", OptInt),
            ("created_at", Int),
            ("updated_at", Int),
            ("doc", Text),
        ],
        order_by: "tenant, path",
    },
    Table {
        name: "secret_versions",
        columns: &[("tenant", Text), ("path", Text), ("version", Int), ("created_at", Int), ("doc", Text)],
        order_by: "tenant, path, version",
    },
    // The audit chain moves with the installation: its records and hashes are copied verbatim, so the chain
    // still verifies in the destination and appends continue it.
    Table { name: "audit_log", columns: &[("seq", Int), ("hash", Text), ("record", Text)], order_by: "seq" },
];

/// Not copied: the change feed and heartbeats belong to the running installation (the destination's
/// followers start from its own feed), and each store records its own migrations.
#[cfg(test)]
pub(crate) const NOT_COPIED: &[&str] = &["changes", "replicas", "schema_migrations"];

/// How many rows each table contributed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    pub tables: Vec<(&'static str, u64)>,
}

impl SqlStore {
    /// Copies everything into `dest`, which must hold no tenants, keys, documents or secrets yet. One write
    /// transaction on the destination: it receives all of it or nothing.
    pub async fn copy_into(&self, dest: &SqlStore) -> Result<CopyReport> {
        for t in COPIED {
            let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT COUNT(*) AS n FROM {}", t.name)))
                .fetch_one(dest.pool())
                .await
                .map_err(db)?;
            if n > 0 {
                return Err(Error::new(
                    ErrorKind::InvalidRequest,
                    format!("the destination store is not empty (table {} has rows)", t.name),
                ));
            }
        }
        let mut report = CopyReport { tables: Vec::new() };
        let mut w = dest.begin_write().await?;
        for t in COPIED {
            let cols: Vec<&str> = t.columns.iter().map(|(c, _)| *c).collect();
            let list = cols.join(", ");
            let select = format!("SELECT {list} FROM {} ORDER BY {}", t.name, t.order_by);
            let placeholders: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
            let insert = format!("INSERT INTO {} ({list}) VALUES ({})", t.name, placeholders.join(", "));
            let rows = sqlx::query(AssertSqlSafe(select)).fetch_all(self.pool()).await.map_err(db)?;
            for row in &rows {
                let mut q = sqlx::query(AssertSqlSafe(insert.clone()));
                for (i, (_, ty)) in t.columns.iter().enumerate() {
                    q = match ty {
                        Int => q.bind(row.try_get::<i64, _>(i).map_err(db)?),
                        OptInt => q.bind(row.try_get::<Option<i64>, _>(i).map_err(db)?),
                        Text => q.bind(row.try_get::<String, _>(i).map_err(db)?),
                    };
                }
                q.execute(w.conn()).await.map_err(db)?;
            }
            report.tables.push((t.name, u64::try_from(rows.len()).unwrap_or(u64::MAX)));
        }
        w.commit().await?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every table and column of the live schema is accounted for: a migration that adds one must decide
    /// whether `store migrate` copies it.
    #[tokio::test]
    async fn the_copy_lists_match_the_schema() {
        let store = SqlStore::open("sqlite::memory:").await.expect("open");
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
        )
        .fetch_all(store.pool())
        .await
        .expect("tables");
        let mut known: Vec<String> =
            COPIED.iter().map(|t| t.name.to_owned()).chain(NOT_COPIED.iter().map(|s| (*s).to_owned())).collect();
        known.sort();
        assert_eq!(tables, known, "a table is neither copied nor deliberately left out");
        for t in COPIED {
            let rows = sqlx::query(AssertSqlSafe(format!("PRAGMA table_info({})", t.name)))
                .fetch_all(store.pool())
                .await
                .expect("columns");
            let mut live: Vec<(String, bool)> =
                rows.iter().map(|r| (r.get::<String, _>("name"), r.get::<i64, _>("notnull") == 1)).collect();
            live.sort();
            let mut listed: Vec<(String, bool)> =
                t.columns.iter().map(|(c, ty)| ((*c).to_owned(), *ty != Col::OptInt)).collect();
            listed.sort();
            assert_eq!(live, listed, "columns of {} (name, not null)", t.name);
        }
    }
}

//! The `audit_log` table: the hash-chained audit records of every replica on one store, as one chain.
//!
//! The store knows nothing of the record format: the caller seals each record against the head it is given
//! (the previous record's sequence number and hash) and the store inserts it. Appends run in a write
//! transaction, which every writer of the store takes exclusively (SQLite's `BEGIN IMMEDIATE`, PostgreSQL's
//! advisory writer lock), so reading the head and inserting after it cannot interleave with another
//! replica's append: the chain has no forks, gaps or duplicates.

use kmsgate_core::{Error, ErrorKind, Result};

use crate::errors::db;
use crate::sql_store::SqlStore;

/// One row of the `audit_log` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub seq: u64,
    /// The record's hash, also inside `record`: the head the next append chains to.
    pub hash: String,
    /// The sealed record, byte for byte as hashed.
    pub record: String,
}

fn seq_i64(seq: u64) -> Result<i64> {
    i64::try_from(seq).map_err(|_| Error::new(ErrorKind::StorageFailure, "the audit log sequence overflowed"))
}

impl SqlStore {
    /// Appends `records` after the current head in one transaction. `seal(seq, prev, record)` returns the
    /// sealed record and its hash; `genesis` is the `prev` of the first record of an empty table. Returns the
    /// new head's sequence number.
    pub async fn audit_append<T>(
        &self,
        genesis: &str,
        records: Vec<T>,
        mut seal: impl FnMut(u64, &str, T) -> (String, String),
    ) -> Result<u64> {
        let mut w = self.begin_write().await?;
        let head: Option<(i64, String)> = sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(w.conn())
            .await
            .map_err(db)?;
        let (mut seq, mut prev) = match head {
            Some((s, h)) => (
                u64::try_from(s).map_err(|_| Error::new(ErrorKind::StorageFailure, "negative audit log sequence"))?,
                h,
            ),
            None => (0, genesis.to_owned()),
        };
        for r in records {
            seq += 1;
            let (record, hash) = seal(seq, &prev, r);
            sqlx::query("INSERT INTO audit_log (seq, hash, record) VALUES ($1, $2, $3)")
                .bind(seq_i64(seq)?)
                .bind(hash.as_str())
                .bind(record)
                .execute(w.conn())
                .await
                .map_err(db)?;
            prev = hash;
        }
        w.commit().await?;
        Ok(seq)
    }

    /// Up to `limit` rows with a sequence number above `after`, in order.
    pub async fn audit_rows(&self, after: u64, limit: u32) -> Result<Vec<AuditRow>> {
        let rows: Vec<(i64, String, String)> =
            sqlx::query_as("SELECT seq, hash, record FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2")
                .bind(seq_i64(after)?)
                .bind(i64::from(limit))
                .fetch_all(self.pool())
                .await
                .map_err(db)?;
        rows.into_iter()
            .map(|(seq, hash, record)| {
                let seq = u64::try_from(seq)
                    .map_err(|_| Error::new(ErrorKind::StorageFailure, "negative audit log sequence"))?;
                Ok(AuditRow { seq, hash, record })
            })
            .collect()
    }
}

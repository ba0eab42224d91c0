//! What differs between the SQL dialects: how a store URL is opened, how a connection is prepared, how a write
//! transaction starts, and the DDL. Everything else (all queries) is one code path through sqlx's `Any` driver.

use std::path::{Path, PathBuf};

use kmsgate_core::{Error, Result};

/// The database behind a [`crate::SqlStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Dialect {
    /// An embedded SQLite file (or an in-memory database for tests).
    Sqlite,
    /// A PostgreSQL server shared by several replicas.
    Postgres,
}

impl Dialect {
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
        }
    }

    /// The statement that opens a write transaction.
    ///
    /// SQLite: `IMMEDIATE` takes the write lock up front, waiting on the busy timeout. A deferred transaction
    /// that reads first and writes later cannot wait when another connection committed in between (it fails
    /// at once with `SQLITE_BUSY_SNAPSHOT`), which would turn ordinary contention into errors.
    pub(crate) fn begin_write_sql(self) -> &'static str {
        match self {
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::Postgres => "BEGIN",
        }
    }

    /// A statement run right after `begin_write_sql`, binding [`WRITER_LOCK_KEY`] as `$1`.
    ///
    /// PostgreSQL: every write transaction takes one transaction-scoped advisory lock first. Writers are thus
    /// serialized as they are on SQLite, so change-feed sequence numbers commit in order (with concurrent
    /// writers a reader could see seq 11 before seq 10 commits and skip 10 for good), and check-then-write
    /// steps (alias exists? key exists?) cannot race. Key management writes are rare; reads are unaffected.
    /// The lock is taken first in every transaction, so it cannot deadlock with row locks.
    pub(crate) fn writer_lock_sql(self) -> Option<&'static str> {
        match self {
            Dialect::Sqlite => None,
            // pg_advisory_xact_lock returns `void`, which the Any driver cannot decode: select a constant.
            Dialect::Postgres => Some("SELECT 1 AS locked FROM (SELECT pg_advisory_xact_lock($1)) AS l"),
        }
    }
}

/// Advisory lock id of kmsgate writers on PostgreSQL ("kmsgate" in ASCII).
pub(crate) const WRITER_LOCK_KEY: i64 = 0x006b_6d73_6761_7465;

/// A store URL, checked and turned into what the `Any` driver connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// `sqlite::memory:`: one private database per connection, so the pool must hold exactly one.
    SqliteMemory,
    /// A SQLite file; `url` is the normalized URL with an absolute path and `mode=rwc`.
    SqliteFile {
        path: PathBuf,
        url: String,
    },
    Postgres {
        url: String,
    },
}

impl Target {
    pub(crate) fn dialect(&self) -> Dialect {
        match self {
            Target::SqliteMemory | Target::SqliteFile { .. } => Dialect::Sqlite,
            Target::Postgres { .. } => Dialect::Postgres,
        }
    }

    pub(crate) fn any_url(&self) -> &str {
        match self {
            Target::SqliteMemory => "sqlite::memory:",
            Target::SqliteFile { url, .. } | Target::Postgres { url } => url,
        }
    }

    /// Parses `sqlite://<path>`, `sqlite:<path>`, `sqlite::memory:` or `postgres://...` / `postgresql://...`.
    ///
    /// Error messages never repeat the URL: it may carry a password.
    pub(crate) fn parse(url: &str) -> Result<Target> {
        let url = url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Target::Postgres { url: url.to_owned() });
        }
        let Some(rest) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) else {
            return Err(Error::invalid(
                "unsupported store URL: use sqlite://<path>, sqlite::memory: or postgres://user@host/database",
            ));
        };
        let (database, params) = match rest.split_once('?') {
            Some((d, p)) => (d, Some(p)),
            None => (rest, None),
        };
        if database == ":memory:" {
            return Ok(Target::SqliteMemory);
        }
        if database.is_empty() {
            return Err(Error::invalid("the sqlite store URL has no file path"));
        }
        let decoded =
            percent_decode(database).ok_or_else(|| Error::invalid("the sqlite file path is not valid UTF-8"))?;
        let path = std::path::absolute(Path::new(&decoded))
            .map_err(|_| Error::invalid("the sqlite file path cannot be made absolute"))?;
        let Some(path_str) = path.to_str() else {
            return Err(Error::invalid("the sqlite file path is not valid UTF-8"));
        };
        // An absolute path after `sqlite://` gives the URL an empty host, so no path character is mistaken
        // for a host name; everything outside a safe set is percent-encoded and sqlx decodes it back.
        let mut any_url = format!("sqlite://{}", percent_encode_path(path_str));
        let mut query: Vec<&str> = params.map(|p| p.split('&').filter(|s| !s.is_empty()).collect()).unwrap_or_default();
        // The store creates its file unless the operator chose a mode (e.g. `mode=ro` for inspection).
        if !query.iter().any(|kv| kv.starts_with("mode=")) {
            query.push("mode=rwc");
        }
        any_url.push('?');
        any_url.push_str(&query.join("&"));
        Ok(Target::SqliteFile { path, url: any_url })
    }
}

fn percent_encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `%XX` decoding as sqlx applies it to SQLite paths; `None` if the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2))
            && let (Some(h), Some(l)) = (hex(h), hex(l))
        {
            // Two hex digits are at most 0xFF, so the narrowing cannot lose bits.
            out.push(u8::try_from(h * 16 + l).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use kmsgate_core::ErrorKind;

    use super::*;

    #[test]
    fn parses_sqlite_urls() {
        assert_eq!(Target::parse("sqlite::memory:").ok(), Some(Target::SqliteMemory));
        assert_eq!(Target::parse("sqlite://:memory:").ok(), Some(Target::SqliteMemory));

        let Ok(Target::SqliteFile { path, url }) = Target::parse("sqlite:///var/lib/kmsgate/a b%23.db") else {
            panic!("an absolute sqlite path must parse");
        };
        assert_eq!(path, PathBuf::from("/var/lib/kmsgate/a b#.db"));
        assert_eq!(url, "sqlite:///var/lib/kmsgate/a%20b%23.db?mode=rwc");

        let Ok(Target::SqliteFile { path, url }) = Target::parse("sqlite://data/kms.db?mode=ro") else {
            panic!("a relative sqlite path must parse");
        };
        assert!(path.is_absolute() && path.ends_with("data/kms.db"));
        assert!(url.ends_with("/data/kms.db?mode=ro"), "{url}");

        let Ok(Target::SqliteFile { path, .. }) = Target::parse("sqlite:rel.db") else {
            panic!("sqlite:<path> must parse");
        };
        assert!(path.ends_with("rel.db"));
    }

    #[test]
    fn rejects_other_urls_without_echoing_them() {
        for bad in ["mysql://root:hunter2@db/x", "sqlite://", "sqlite:?mode=rwc", "file.db"] {
            let Err(e) = Target::parse(bad) else { panic!("{bad} must be rejected") };
            assert_eq!(e.kind(), ErrorKind::InvalidRequest);
            assert!(!e.message().contains("hunter2"));
        }
        assert_eq!(Target::parse("sqlite:///x/%FF.db").err().map(|e| e.kind()), Some(ErrorKind::InvalidRequest));
    }

    #[test]
    fn postgres_urls_pass_through() {
        let t = Target::parse("postgres://u:p@127.0.0.1:5432/db?options=-c%20search_path%3Ds1").ok();
        assert_eq!(t.as_ref().map(Target::dialect), Some(Dialect::Postgres));
        assert_eq!(
            t.as_ref().map(Target::any_url),
            Some("postgres://u:p@127.0.0.1:5432/db?options=-c%20search_path%3Ds1")
        );
    }
}

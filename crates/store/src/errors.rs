//! sqlx errors to core errors. Client messages are fixed texts; the sqlx error (which can name tables and
//! constraints, never bound values) is attached as the internal source, which is only logged.

use kmsgate_core::{Error, ErrorKind};
use sqlx::error::{DatabaseError, ErrorKind as DbErrorKind};

/// The default mapping: unique violation, timeouts, or a storage failure.
pub(crate) fn db(e: sqlx::Error) -> Error {
    map(e, "the resource already exists")
}

/// Like [`db`], with the client message to use if the error is a uniqueness violation.
pub(crate) fn unique(already_exists: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| map(e, already_exists)
}

fn map(e: sqlx::Error, already_exists: &'static str) -> Error {
    let kind = match &e {
        sqlx::Error::PoolTimedOut => Some(ErrorKind::DependencyTimeout),
        sqlx::Error::Database(d) if d.kind() == DbErrorKind::UniqueViolation => Some(ErrorKind::AlreadyExists),
        sqlx::Error::Database(d) if is_timeout(d.as_ref()) => Some(ErrorKind::DependencyTimeout),
        _ => None,
    };
    if is_tls_failure(&e) {
        // The operator needs to know it is TLS (a CA, sslmode or hostname problem), not the database itself;
        // the verifier's details stay in the source, which is only logged.
        return Error::new(ErrorKind::StorageFailure, "the TLS connection to the database failed").with_source(e);
    }
    match kind {
        Some(ErrorKind::AlreadyExists) => Error::new(ErrorKind::AlreadyExists, already_exists).with_source(e),
        Some(ErrorKind::DependencyTimeout) => {
            Error::new(ErrorKind::DependencyTimeout, "the store did not answer in time").with_source(e)
        }
        _ => Error::storage(e),
    }
}

/// A TLS handshake or configuration failure: an unverifiable server certificate, a missing `sslrootcert`, or
/// `sslmode=require` against a server without TLS.
fn is_tls_failure(e: &sqlx::Error) -> bool {
    match e {
        // Also "server does not support TLS" (sslmode=require against a plain server) and unreadable CA files.
        sqlx::Error::Tls(_) => true,
        // A refused handshake (unknown issuer, name mismatch) surfaces as an I/O error wrapping rustls's.
        sqlx::Error::Io(io) => io.get_ref().is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()),
        _ => false,
    }
}

/// Whether a foreign key was violated (an alias pointing at a key that is gone).
pub(crate) fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.kind() == DbErrorKind::ForeignKeyViolation)
}

/// Lock waits that ran out: SQLite's busy timeout (`SQLITE_BUSY`/`SQLITE_LOCKED` and their extended codes,
/// numeric) and PostgreSQL's `lock_not_available` / `query_canceled` (statement or lock timeout, SQLSTATE).
///
/// The dialect is told by the error's type, not by the code's shape: SQLSTATEs such as `57014` are numeric too.
fn is_timeout(d: &dyn DatabaseError) -> bool {
    let Some(code) = d.code() else { return false };
    if d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some() {
        return matches!(&*code, "55P03" | "57014");
    }
    code.parse::<i32>().is_ok_and(|sqlite| matches!(sqlite & 0xff, 5 | 6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_timeout_is_a_dependency_timeout() {
        let e = db(sqlx::Error::PoolTimedOut);
        assert_eq!(e.kind(), ErrorKind::DependencyTimeout);
        assert!(e.internal_source().is_some());
    }

    #[test]
    fn tls_failures_say_so_without_details() {
        let e = db(sqlx::Error::Tls("invalid peer certificate: UnknownIssuer".into()));
        assert_eq!(e.kind(), ErrorKind::StorageFailure);
        assert_eq!(e.message(), "the TLS connection to the database failed");
        assert!(format!("{:?}", e.internal_source()).contains("UnknownIssuer"), "the cause is kept for the logs");
        let handshake = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert_eq!(db(sqlx::Error::Io(handshake)).message(), "the TLS connection to the database failed");
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        assert_eq!(db(sqlx::Error::Io(refused)).message(), "the store failed");
    }

    #[test]
    fn other_errors_are_storage_failures_with_a_fixed_message() {
        let e = db(sqlx::Error::Protocol("SELECT secret FROM x WHERE v = 'hunter2'".into()));
        assert_eq!(e.kind(), ErrorKind::StorageFailure);
        assert_eq!(e.message(), "the store failed");
        assert!(!e.to_string().contains("hunter2"));
        assert!(format!("{:?}", e.internal_source()).contains("hunter2"), "the cause is kept for the logs");
    }
}

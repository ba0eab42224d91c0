//! kmsgate-store: core's [`Store`](kmsgate_core::Store) on SQL databases.
//!
//! [`SqlStore`] runs one set of queries through sqlx's `Any` driver on two dialects: an embedded SQLite file
//! (the default: WAL, `synchronous=FULL`, one writer at a time) and PostgreSQL (several replicas). Only the
//! connection setup, the write-transaction prologue and the DDL differ per [`Dialect`]. The schema is created
//! and upgraded by a small embedded migration runner when the store opens.
//!
//! With the `testsuite` feature, [`testsuite`] holds the behavioural tests every `Store` must pass, written
//! against `&dyn Store` so each dialect runs the same suite.

mod audit_log;
mod copy;
mod dialect;
mod errors;
mod migrate;
#[cfg(feature = "testsuite")]
pub mod pgcluster;
mod sql_store;
#[cfg(feature = "testsuite")]
pub mod testsuite;

pub use audit_log::AuditRow;
pub use copy::CopyReport;
pub use dialect::Dialect;
pub use sql_store::{SqlStore, StoreOptions};

//! The kmsgate server as a library: configuration, assembly of core + backends + store, listeners, and the
//! admin CLI. The `kmsgate` binary is a thin `main` over this; integration tests drive it directly.

#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_api;
pub mod admin_client;
pub mod alibaba_cli;
pub mod app;
pub mod audit_cli;
pub mod audit_log;
pub mod cli;
pub mod config;
pub mod grpc;
pub mod grpc_cli;
pub mod grpc_token;
pub mod hsm_cli;
pub mod http;
pub mod metrics;
pub mod mtls;
pub mod secrets_cli;
pub mod serve;
pub mod store_cli;
pub mod telemetry;
pub mod xks_cli;

//! kmsgate-alibaba: the Alibaba Cloud KMS instance API ("dkms-gcs-0.2": protobuf over HTTPS, `POST /` with
//! `x-kms-apiname`), authenticated by RSA ClientKey signatures. ClientKeys are core documents, so the CLI and
//! every replica agree; every cryptographic operation goes through the core dispatcher.

#![forbid(unsafe_code)]

pub mod auth;
pub mod blob;
pub mod clientkey;
pub mod config;
pub mod error;
pub mod keypair;
pub mod limit;
pub mod pkcs12;
mod service;

/// The wire messages, generated from protos/alibaba/instance.proto.
pub mod proto {
    #![allow(missing_debug_implementations)]
    include!(concat!(env!("OUT_DIR"), "/api.rs"));
}

use std::sync::Arc;

use axum::Router;
use axum::routing::post;
use kmsgate_core::Dispatcher;

pub use config::AlibabaConfig;
pub use error::{AliError, status_and_code};
pub use service::{AlibabaState, KIND_VERSION_INDEX, MIGRATION_HEADER};

/// The instance API route (`POST /`) to merge into the main listener's router. With `enabled = false` the
/// router is empty. Only the exact path `/` is claimed, so other frontends' paths are untouched.
pub fn router(dispatcher: Dispatcher, config: AlibabaConfig) -> Router {
    if !config.enabled {
        return Router::new();
    }
    routes(Arc::new(AlibabaState::new(dispatcher, config)))
}

pub fn routes(state: Arc<AlibabaState>) -> Router {
    Router::new().route("/", post(service::handle)).with_state(state)
}

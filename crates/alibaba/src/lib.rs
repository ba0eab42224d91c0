//! kmsgate-alibaba: the Alibaba Cloud KMS instance API ("dkms-gcs-0.2": protobuf over HTTPS, `POST /` with
//! `x-kms-apiname`), authenticated by RSA ClientKey signatures, and the KMS OpenAPI (RPC style, 2016-01-20:
//! every other request to `/`), authenticated by AccessKey HMAC signatures (v1 and ACS3-HMAC-SHA256).
//! ClientKeys and AccessKeys are core documents, so the CLI and every replica agree; every cryptographic
//! operation goes through the core dispatcher.

#![forbid(unsafe_code)]

pub mod auth;
pub mod blob;
pub mod clientkey;
pub mod config;
pub mod error;
pub mod keypair;
pub mod limit;
pub mod openapi;
pub mod pkcs12;
mod service;

/// The wire messages, generated from protos/alibaba/instance.proto.
pub mod proto {
    #![allow(missing_debug_implementations)]
    include!(concat!(env!("OUT_DIR"), "/api.rs"));
}

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Method, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use kmsgate_core::Dispatcher;

pub use config::AlibabaConfig;
pub use error::{AliError, status_and_code};
pub use service::{AlibabaState, KIND_VERSION_INDEX, MIGRATION_HEADER};

/// The Alibaba routes on `/` to merge into the main listener's router: the instance API (`enabled`) and the
/// OpenAPI (`openapi_enabled`). Only the exact path `/` is claimed, so other frontends' paths are untouched.
pub fn router(dispatcher: Dispatcher, config: AlibabaConfig) -> Router {
    match (config.enabled, config.openapi_enabled) {
        (false, false) => Router::new(),
        (true, false) => routes(Arc::new(AlibabaState::new(dispatcher, config))),
        (instance, true) => {
            let both = Both {
                instance: instance.then(|| Arc::new(AlibabaState::new(dispatcher.clone(), config.clone()))),
                openapi: Arc::new(openapi::OpenApiState::new(dispatcher, config)),
            };
            Router::new().route("/", any(split)).with_state(Arc::new(both))
        }
    }
}

/// The instance API alone.
pub fn routes(state: Arc<AlibabaState>) -> Router {
    Router::new().route("/", post(service::handle)).with_state(state)
}

struct Both {
    instance: Option<Arc<AlibabaState>>,
    openapi: Arc<openapi::OpenApiState>,
}

/// One listener, two protocols told apart by request shape: the instance SDKs always send `POST /` with an
/// `x-kms-apiname` header, which no OpenAPI request carries.
async fn split(State(both): State<Arc<Both>>, req: Request<Body>) -> Response {
    if req.method() == Method::POST
        && req.headers().contains_key("x-kms-apiname")
        && let Some(instance) = &both.instance
    {
        return service::handle(State(instance.clone()), req).await.into_response();
    }
    openapi::handle(&both.openapi, req).await
}

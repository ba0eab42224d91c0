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

/// One listener, two protocols told apart by request shape: the instance SDKs always send `POST /` with
/// `x-kms-*` headers (`x-kms-apiname`, `x-kms-apiversion`, ...) and a protobuf body, none of which an OpenAPI
/// request carries. A request with either is the instance API's, so even one missing `x-kms-apiname` gets the
/// instance API's own error.
fn is_instance(req: &Request<Body>) -> bool {
    let h = req.headers();
    let protobuf = h
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim_start().starts_with("application/x-protobuf"));
    req.method() == Method::POST && (protobuf || h.keys().any(|k| k.as_str().starts_with("x-kms-")))
}

async fn split(State(both): State<Arc<Both>>, req: Request<Body>) -> Response {
    if is_instance(&req)
        && let Some(instance) = &both.instance
    {
        return service::handle(State(instance.clone()), req).await.into_response();
    }
    openapi::handle(&both.openapi, req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_protocols_are_told_apart_by_shape() {
        let req = |method: Method, headers: &[(&str, &str)]| {
            let mut b = Request::builder().method(method).uri("/?Action=ListKeys");
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            b.body(Body::empty()).unwrap_or_default()
        };
        assert!(is_instance(&req(Method::POST, &[("x-kms-apiname", "Encrypt")])));
        assert!(is_instance(&req(Method::POST, &[("x-kms-apiversion", "dkms-gcs-0.2")])), "even without the name");
        assert!(is_instance(&req(Method::POST, &[("content-type", "application/x-protobuf")])));
        assert!(!is_instance(&req(Method::POST, &[("content-type", "application/x-www-form-urlencoded")])));
        assert!(!is_instance(&req(Method::POST, &[("x-acs-action", "ListKeys")])));
        assert!(!is_instance(&req(Method::GET, &[("x-kms-apiname", "Encrypt")])), "the instance API is POST only");
    }
}

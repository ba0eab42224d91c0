//! kmsgate-grpc: the internal gRPC API (`kmsgate.v1`: cryptography, key management, aliases, secrets,
//! health) and the Kubernetes KMS v2 plugin (`v2.KeyManagementService`). Services are tonic services over the
//! core dispatcher; the server mounts them on its own listeners (TLS/mTLS TCP for the API, a unix socket for
//! the plugin), so no tonic transport is compiled in.

#![forbid(unsafe_code)]

pub mod auth;
pub mod call;
pub mod convert;
pub mod error;
pub mod health;
pub mod kms;
pub mod kms_plugin;
pub mod secrets;

/// Generated messages and services.
pub mod proto {
    #![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]

    pub mod kmsgate_v1 {
        include!(concat!(env!("OUT_DIR"), "/kmsgate.v1.rs"));
    }
    pub mod google_rpc {
        include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
    }
    /// The Kubernetes KMS v2 API (package `v2`).
    pub mod k8s_kms_v2 {
        include!(concat!(env!("OUT_DIR"), "/v2.rs"));
    }

    /// The encoded descriptor set of kmsgate.v1, for server reflection.
    pub const KMSGATE_V1_DESCRIPTOR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kmsgate_v1_descriptor.bin"));
}

use std::time::Duration;

use kmsgate_core::Dispatcher;

pub use auth::{Action, AuthChain, Authenticator, Guard, MtlsAuthenticator, Principal, TlsClientNames};
pub use kms_plugin::{KmsPlugin, KmsPluginConfig};

/// Options of the API router.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// Serve grpc.reflection (v1 and v1alpha).
    pub reflection: bool,
    /// How often a grpc.health.v1 Watch re-probes readiness.
    pub health_watch_every: Duration,
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions { reflection: true, health_watch_every: Duration::from_secs(5) }
    }
}

/// The kmsgate.v1 services, grpc.health.v1 and (optionally) reflection, as an axum router.
pub fn api_router(dispatcher: Dispatcher, auth: AuthChain, options: &ApiOptions) -> Result<axum::Router, String> {
    use proto::kmsgate_v1::key_management_service_server::KeyManagementServiceServer;
    use proto::kmsgate_v1::secrets_service_server::SecretsServiceServer;

    let mut routes = tonic::service::Routes::new(KeyManagementServiceServer::new(kms::KmsService::new(
        dispatcher.clone(),
        auth.clone(),
    )))
    .add_service(SecretsServiceServer::new(secrets::SecretsSvc::new(dispatcher.clone(), auth)))
    .add_service(tonic_health::pb::health_server::HealthServer::new(health::HealthService::new(
        dispatcher,
        options.health_watch_every,
    )));
    if options.reflection {
        let v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::KMSGATE_V1_DESCRIPTOR)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| format!("reflection: {e}"))?;
        let v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::KMSGATE_V1_DESCRIPTOR)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| format!("reflection: {e}"))?;
        routes = routes.add_service(v1).add_service(v1alpha);
    }
    Ok(routes.prepare().into_axum_router())
}

/// The Kubernetes KMS v2 plugin service as an axum router.
pub fn kms_plugin_router(plugin: KmsPlugin) -> axum::Router {
    use proto::k8s_kms_v2::key_management_service_server::KeyManagementServiceServer;
    tonic::service::Routes::new(KeyManagementServiceServer::new(plugin)).prepare().into_axum_router()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use prost::Message as _;

    #[test]
    fn reflection_descriptor_is_self_contained() {
        let fds = prost_types::FileDescriptorSet::decode(crate::proto::KMSGATE_V1_DESCRIPTOR).unwrap();
        let names: Vec<_> = fds.file.iter().map(|f| f.name()).collect();
        for needed in [
            "kmsgate/v1/kms.proto",
            "kmsgate/v1/secrets.proto",
            "kmsgate/v1/types.proto",
            "google/protobuf/timestamp.proto",
        ] {
            assert!(names.contains(&needed), "{needed} missing from {names:?}");
        }
        assert!(!names.iter().any(|n| n.starts_with("k8s/")), "the plugin's API is not reflected");
    }
}

//! kmsgate-xks: the AWS KMS External Key Store (XKS) proxy API, v1.0.3 of the public specification.
//!
//! `POST [/{prefix}]/kms/xks/v1/health` and `.../keys/{externalKeyId}/{metadata|encrypt|decrypt}`, each
//! prefix a logical key store (tenant, allowed keys, SigV4 credentials, quota, secondary-authorization rules)
//! kept in the store as core documents, so the CLI and every replica agree without restarts. Every
//! cryptographic operation goes through the core dispatcher.

#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod crypto;
pub mod error;
pub mod health;
pub mod keystore;
pub mod rules;
mod service;
pub mod sigv4;
pub mod wire;

use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::Router;
use axum::routing::any;
use kmsgate_core::{Dispatcher, TenantId};
use tokio::sync::broadcast::error::RecvError;

pub use config::XksConfig;
pub use error::{ErrorName, XksError, error_name};
pub use service::XksState;

/// The XKS routes, to merge beside the probes of the main listener; starts the background task (deep health
/// checks, credential cache invalidation) on the current Tokio runtime. With `enabled = false` the router is
/// empty.
pub fn router(dispatcher: Dispatcher, config: XksConfig) -> Router {
    if !config.enabled {
        return Router::new();
    }
    let state = Arc::new(XksState::new(dispatcher, config));
    spawn_background(&state);
    routes(state)
}

/// The routes alone (the handler resolves the key store from the path itself; the route patterns only make
/// sure every depth of prefix reaches it while other frontends' static routes keep priority).
pub fn routes(state: Arc<XksState>) -> Router {
    let mut router = Router::new();
    let mut prefix = String::new();
    for depth in 0..=keystore::MAX_PREFIX_SEGMENTS {
        router = router
            .route(&format!("{prefix}{}", keystore::API_SUFFIX), any(service::handle))
            .route(&format!("{prefix}{}/{{*xks_rest}}", keystore::API_SUFFIX), any(service::handle));
        prefix.push_str(&format!("/{{xks_p{depth}}}"));
    }
    router.with_state(state)
}

/// The background task: refreshes the deep health check of every tenant that has key stores, and drops
/// cached signing keys of credentials the change feed reports as changed. It holds the state weakly and ends
/// when the router is dropped. Without a Tokio runtime nothing is spawned and health runs inline.
fn spawn_background(state: &Arc<XksState>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let weak: Weak<XksState> = Arc::downgrade(state);
    let mut changes = state.dispatcher.subscribe_changes();
    let every = Duration::from_secs(state.config.health_refresh_secs.max(1));
    handle.spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let Some(state) = weak.upgrade() else { return };
                    refresh_health(&state, every).await;
                }
                change = changes.recv() => {
                    let Some(state) = weak.upgrade() else { return };
                    match change {
                        Ok(c) => state.on_change(&c),
                        // Missed some: forget every derived key rather than risk keeping a revoked one.
                        Err(RecvError::Lagged(_)) => state.forget_signing_keys(),
                        Err(RecvError::Closed) => return,
                    }
                }
            }
        }
    });
}

async fn refresh_health(state: &XksState, every: Duration) {
    let d = &state.dispatcher;
    let mut tenants: Vec<TenantId> = state.health.tenants();
    match admin::list_stores(d, None).await {
        Ok(stores) => tenants.extend(stores.into_iter().map(|s| s.tenant)),
        Err(e) => tracing::warn!(target: "xks", error = %e, "cannot list XKS key stores for the health check"),
    }
    tenants.sort();
    tenants.dedup();
    for t in tenants {
        // A result younger than half an interval (an inline check just ran) is fresh enough.
        state.health.refresh(d, &state.config, &t, every / 2).await;
    }
}

//! kmsgate-secrets: the generic secrets REST API (`/v1`, JSON, bearer tokens) with ScaiVault's error
//! vocabulary. Secrets live in core's secret inventory (sealed per version under data keys the key backend
//! wraps); tenants' settings, identities, tokens, policies and bindings are core documents, so every replica
//! and the admin CLI agree and the change feed carries revocations.

#![forbid(unsafe_code)]

pub mod code;
pub mod crypto;
pub mod error;
mod health;
pub mod labels;
pub mod model;
pub mod openapi;
pub mod ratelimit;
mod routes;
pub mod service;
pub mod token;
pub mod values;

use std::sync::Arc;

use axum::Router;
use axum::routing::any;
use kmsgate_core::{Dispatcher, TenantId};
use serde::{Deserialize, Serialize};

pub use code::ErrorCode;
pub use error::{ApiError, code_for};
pub use service::{SecretsState, bootstrap, set_maintenance};
pub use token::{TokenPrincipal, TokenVerifier};

use crate::model::TenantDoc;
use crate::ratelimit::Category;

/// `[secrets]` settings (docs/configuration.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// Serve `/v1/...` on the main listener.
    pub enabled: bool,
    /// Answer every route (health reports it too) with 503 `maintenance_mode`; `kmsgate secrets maintenance
    /// on|off` switches it at run time for every replica.
    pub maintenance_mode: bool,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Lifetime of a minted token when the request names none, and of the bootstrap token (a duration).
    pub default_token_ttl: String,
    /// Longest lifetime a token may be minted with.
    pub max_token_ttl: String,
    /// Whether per (identity, category) rate limits apply.
    pub rate_limits: bool,
}

impl Default for SecretsConfig {
    fn default() -> Self {
        SecretsConfig {
            enabled: true,
            maintenance_mode: false,
            max_body_bytes: 1024 * 1024,
            default_token_ttl: "90d".to_owned(),
            max_token_ttl: "365d".to_owned(),
            rate_limits: true,
        }
    }
}

impl SecretsConfig {
    pub fn validate(&self) -> Result<(), String> {
        let d = |name: &str, v: &str| {
            values::parse_duration(name, v).map_err(|_| format!("secrets.{name} must be a duration such as 90d"))
        };
        let def = d("default_token_ttl", &self.default_token_ttl)?;
        let max = d("max_token_ttl", &self.max_token_ttl)?;
        if def.is_zero() || def > max {
            return Err("secrets.default_token_ttl must be positive and at most secrets.max_token_ttl".to_owned());
        }
        if self.max_body_bytes < 1024 {
            return Err("secrets.max_body_bytes must be at least 1024".to_owned());
        }
        Ok(())
    }

    pub(crate) fn default_ttl_secs(&self) -> i64 {
        values::parse_duration("", &self.default_token_ttl).map_or(90 * 86_400, secs)
    }

    pub(crate) fn max_ttl_secs(&self) -> i64 {
        values::parse_duration("", &self.max_token_ttl).map_or(365 * 86_400, secs)
    }

    /// The per-minute limit of `category`: the tenant's override, else the contract's default. With rate
    /// limits off, a limit no client reaches.
    pub(crate) fn rate_limit(&self, category: Category, tenant: Option<&TenantDoc>) -> u32 {
        if !self.rate_limits {
            return u32::MAX / 2;
        }
        tenant
            .and_then(|t| t.rate_limits.get(category.as_str()))
            .and_then(serde_json::Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0)
            .unwrap_or_else(|| category.default_per_minute())
    }
}

fn secs(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// The `/v1` routes to merge into the main listener's router; empty when disabled. `home` owns the
/// installation-wide records (the token signing key).
pub fn router(dispatcher: Dispatcher, config: SecretsConfig, home: TenantId) -> Router {
    if !config.enabled {
        return Router::new();
    }
    let state = Arc::new(SecretsState::new(dispatcher, config, home));
    follow_changes(&state);
    routes(state)
}

/// Drops cached bindings when the change feed reports a binding written by any process. The task holds the
/// state weakly and ends with it. Without a Tokio runtime nothing is spawned (the cache TTL still applies).
fn follow_changes(state: &Arc<SecretsState>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
    let mut rx = state.dispatcher.subscribe_changes();
    let weak = Arc::downgrade(state);
    let prefix = format!("{}/", model::KIND_BINDING);
    handle.spawn(async move {
        loop {
            let change = match rx.recv().await {
                Ok(c) => c,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Missed entries: forget everything rather than guess.
                    match weak.upgrade() {
                        Some(st) => st.invalidate_all_bindings(),
                        None => return,
                    }
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            let Some(st) = weak.upgrade() else { return };
            if change.id.starts_with(&prefix) {
                st.invalidate_bindings(&change.tenant).await;
            }
        }
    });
}

pub fn routes(state: Arc<SecretsState>) -> Router {
    Router::new().route("/v1", any(service::handle)).route("/v1/{*rest}", any(service::handle)).with_state(state)
}

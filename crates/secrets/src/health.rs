//! `GET /v1/health` (liveness, no dependencies) and `GET /v1/health/ready` (a real store and KMS probe).

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use crate::code::ErrorCode;
use crate::error::ApiError;
use crate::service::{ApiResult, Ctx, SecretsState};

pub async fn handle(st: &SecretsState, _ctx: &Ctx, ready: bool) -> ApiResult<Response> {
    let version = env!("CARGO_PKG_VERSION");
    if st.in_maintenance().await {
        return Err(crate::service::maintenance());
    }
    if !ready {
        return Ok(crate::service::json(StatusCode::OK, json!({"status": "ok", "version": version})));
    }
    let report = st.dispatcher.readiness().await;
    if !report.ready() {
        let kms_ok = report.members.iter().any(|m| m.status != kmsgate_core::HealthStatus::Unavailable);
        return Err(ApiError::new(ErrorCode::ServiceUnavailable, "a dependency is not ready")
            .detail("store", if report.store_ok { "ok" } else { "unavailable" })
            .detail("kms", if kms_ok { "ok" } else { "unavailable" })
            .retry_after(std::time::Duration::from_secs(5)));
    }
    Ok(crate::service::json(
        StatusCode::OK,
        json!({"status": "ready", "version": version, "checks": {"store": "ok", "kms": "ok"}}),
    ))
}

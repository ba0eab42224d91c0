//! The admin listener: liveness, readiness and Prometheus metrics on an address of their own, apart
//! from the data listeners. Kubernetes probes and Prometheus scrapes go here; callers of the data APIs never
//! need to reach it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::app::App;
use crate::http;

/// What the admin routes read.
#[derive(Debug)]
pub struct AdminState {
    app: App,
    /// Set when shutdown begins: readiness turns 503 at once so load balancers stop sending new requests
    /// while the data listeners drain, and liveness stays 200 so nothing restarts the draining process.
    draining: Arc<AtomicBool>,
}

/// The admin listener's router.
pub fn router(app: &App, draining: Arc<AtomicBool>) -> Router {
    let state = Arc::new(AdminState { app: app.clone(), draining });
    Router::new()
        .route("/healthz", get(http::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
        .layer(axum::middleware::from_fn(http::request_context))
}

async fn readyz(State(s): State<Arc<AdminState>>) -> Response {
    if s.draining.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": "draining"}))).into_response();
    }
    http::readiness(&s.app.dispatcher).await
}

/// The text exposition format, version 0.0.4.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn metrics(State(s): State<Arc<AdminState>>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], s.app.metrics.render()).into_response()
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, axum::Json(json!({"error": "no such route"}))).into_response()
}

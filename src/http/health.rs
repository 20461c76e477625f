//! `/healthz` (the process runs) and `/readyz` (the store answers).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::app::AppState;

pub async fn healthz() -> &'static str {
    "ok"
}

/// Prometheus text format.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let body = state.metrics.render();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
        .into_response()
}

pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": "shutting down"})),
        )
            .into_response();
    }
    match tokio::time::timeout(std::time::Duration::from_secs(2), state.node.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, Json(json!({"ready": true}))).into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: store failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"ready": false, "reason": "store unavailable"})),
            )
                .into_response()
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": "store timeout"})),
        )
            .into_response(),
    }
}

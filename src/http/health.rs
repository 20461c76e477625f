//! `/healthz` (the process runs), `/readyz` (the node can serve) and `/metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::services::Services;

pub async fn healthz() -> &'static str {
    "ok"
}

/// Prometheus text format.
pub async fn metrics(State(state): State<Arc<Services>>) -> Response {
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

fn unavailable(reason: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"ready": false, "reason": reason})),
    )
        .into_response()
}

/// 200 when the store answers and the TURN listener answers STUN; 503 with the reason otherwise.
pub async fn readyz(State(state): State<Arc<Services>>) -> Response {
    match state.unready().await {
        Some(reason) => unavailable(reason),
        None => (StatusCode::OK, Json(json!({"ready": true}))).into_response(),
    }
}

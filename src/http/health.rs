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

fn unavailable(reason: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"ready": false, "reason": reason})),
    )
        .into_response()
}

/// A STUN Binding request to our own TURN listener must be answered (RFC 8489 §6).
async fn turn_answers(addr: std::net::SocketAddr) -> bool {
    let probe = async {
        let sock = tokio::net::UdpSocket::bind((addr.ip(), 0)).await.ok()?;
        let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        let mut txid = [0u8; 12];
        getrandom::fill(&mut txid).ok()?;
        req.extend_from_slice(&txid);
        sock.send_to(&req, addr).await.ok()?;
        let mut buf = [0u8; 512];
        let (n, _) = sock.recv_from(&mut buf).await.ok()?;
        Some(n >= 20 && buf[0..2] == [0x01, 0x01] && buf[8..20] == txid)
    };
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(1), probe).await,
        Ok(Some(true))
    )
}

/// 200 when the store answers and the TURN listener answers STUN; 503 with the reason otherwise.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.shutdown.is_cancelled() {
        return unavailable("shutting down");
    }
    match tokio::time::timeout(std::time::Duration::from_secs(2), state.node.store.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: store failed");
            return unavailable("store unavailable");
        }
        Err(_) => return unavailable("store timeout"),
    }
    if let Some(turn) = &state.turn {
        if !turn_answers(turn.probe_addr).await {
            return unavailable("turn listener does not answer");
        }
    }
    (StatusCode::OK, Json(json!({"ready": true}))).into_response()
}

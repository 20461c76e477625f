//! REST routes (PROTOCOL §1), one file per concern, and the `/ws` upgrade. Handlers are thin:
//! extract, call the service, map [`ApiError`] to a status with a JSON body.

pub mod auth;
pub mod chats;
pub mod client_ip;
pub mod extract;
pub mod health;
pub mod ice;
pub mod tls;
pub mod web;

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::app::AppState;
use crate::error::ApiError;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = Json(json!({"error": {"code": self.code.as_str(), "message": self.message}}));
        let mut resp = (status, body).into_response();
        if let Some(secs) = self.retry_after {
            if let Ok(v) = secs.to_string().parse() {
                resp.headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.config.http.max_body_bytes;
    let router = if state.config.http.metrics_listen.is_none() {
        Router::new().route("/metrics", get(health::metrics))
    } else {
        Router::new()
    };
    router
        .route("/api/auth/register", post(auth::register))
        .route("/api/auth/login", post(auth::login))
        .route("/api/auth/refresh", post(auth::refresh))
        .route("/api/me", get(auth::me))
        .route("/api/users", get(chats::users))
        .route("/api/ice-servers", get(ice::ice_servers))
        .route("/api/turn-credentials", get(ice::turn_credentials))
        .route("/api/chats", get(chats::list).post(chats::create))
        .route("/api/chats/{chat_id}/messages", get(chats::messages))
        .route("/", get(web::index))
        .route("/app.js", get(web::app))
        .route("/style.css", get(web::style))
        .route("/sdk/switchboard.js", get(web::sdk))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/ws", get(ws_upgrade))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                crate::error::ErrorCode::BadRequest,
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// The router of the separate metrics listener (`http.metrics_listen`).
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(health::metrics))
        .with_state(state)
}

/// The access token of a WebSocket request: `Authorization: Bearer` or `?token=`.
/// The query string is read here and nowhere logged.
fn ws_token(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(t) = extract::bearer(headers) {
        return Some(t);
    }
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == "token")
        .map(|(_, v)| percent_decode(v))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn ws_upgrade(
    State(state): State<Arc<AppState>>,
    client_ip::ClientIp(client): client_ip::ClientIp,
    headers: HeaderMap,
    uri: axum::http::Uri,
    ws: WebSocketUpgrade,
) -> Response {
    tracing::debug!(client = %client, "websocket upgrade");
    let token = ws_token(&headers, uri.query());
    let host = ice::request_host(&headers);
    let max = state.config.ws.max_frame_bytes;
    ws
        // Small buffers: most connections are idle most of the time (NOTES: 128 KiB by default).
        .read_buffer_size(2048)
        .write_buffer_size(4096)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| crate::ws::session::run(socket, state, token, host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_from_query() {
        let h = HeaderMap::new();
        assert_eq!(
            ws_token(&h, Some("a=1&token=abc.def%2Dx")),
            Some("abc.def-x".into())
        );
        assert_eq!(ws_token(&h, Some("a=1")), None);
        assert_eq!(ws_token(&h, None), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}

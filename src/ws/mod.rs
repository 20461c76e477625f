//! The WebSocket transport (PROTOCOL §2): the `/ws` upgrade, the framing of [`codec`], and the
//! glue of [`session`] that hands the socket to `client::session` as a [`Transport`] and a
//! stream of requests. Everything a request means lives in `client/`.
//!
//! Must not import `store`.
//!
//! [`Transport`]: crate::client::session::Transport

pub mod codec;
pub mod session;

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

use crate::services::Services;

/// `GET /ws`: the upgrade. The token is read here and nowhere logged.
pub async fn upgrade(
    State(services): State<Arc<Services>>,
    client: crate::http::client_ip::ClientIp,
    headers: HeaderMap,
    uri: axum::http::Uri,
    ws: WebSocketUpgrade,
) -> Response {
    tracing::debug!(client = %client.0, "websocket upgrade");
    let token = token(&headers, uri.query());
    let host = crate::http::ice::request_host(&headers);
    let max = services.config.ws.max_frame_bytes;
    ws
        // Small buffers: most connections are idle most of the time (NOTES: 128 KiB by default).
        .read_buffer_size(2048)
        .write_buffer_size(4096)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| session::run(socket, services, token, host))
}

/// The access token of a WebSocket request: `Authorization: Bearer` or `?token=`.
fn token(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    crate::http::extract::bearer(headers).or_else(|| crate::http::extract::query_token(query))
}

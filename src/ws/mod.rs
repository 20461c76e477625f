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
    if let Some(t) = crate::http::extract::bearer(headers) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_from_query() {
        let h = HeaderMap::new();
        assert_eq!(
            token(&h, Some("a=1&token=abc.def%2Dx")),
            Some("abc.def-x".into())
        );
        assert_eq!(token(&h, Some("a=1")), None);
        assert_eq!(token(&h, None), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}

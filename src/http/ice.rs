//! `/api/ice-servers` and `/api/turn-credentials` (PROTOCOL §4): short-lived TURN REST
//! credentials for the caller, with the host the client used unless `turn.public_host` is set.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::AuthUser;
use crate::error::ApiError;
use crate::services::Services;
use crate::time::rfc3339_ms;

/// The `Host` the client used (what a browser on another machine can reach us at).
pub fn request_host(headers: &HeaderMap) -> String {
    headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_owned()
}

pub async fn ice_servers(
    State(state): State<Arc<Services>>,
    AuthUser(me): AuthUser,
    headers: HeaderMap,
) -> Json<Value> {
    let (servers, expires) = state.ice_servers(&me.user_id, &request_host(&headers));
    let ttl = state.turn.as_ref().map(|t| t.ice.ttl_secs).unwrap_or(0);
    Json(json!({
        "iceServers": servers,
        "ttl": ttl,
        "expiresAt": expires.map(|e| rfc3339_ms(e * 1000)),
    }))
}

#[derive(Deserialize)]
pub struct CredQuery {
    #[serde(default)]
    service: Option<String>,
}

/// The TURN REST API shape (`{username, password, ttl, uris}`) for clients written for coturn.
pub async fn turn_credentials(
    State(state): State<Arc<Services>>,
    AuthUser(me): AuthUser,
    headers: HeaderMap,
    Query(q): Query<CredQuery>,
) -> Result<Json<Value>, ApiError> {
    if q.service.as_deref().is_some_and(|s| s != "turn") {
        return Err(ApiError::bad_request("service: only `turn` is offered"));
    }
    let turn = state
        .turn
        .as_ref()
        .ok_or_else(|| ApiError::not_found("TURN is disabled on this server"))?;
    let host = request_host(&headers);
    let (_, cred) = turn.mint(&me.user_id, &host);
    Ok(Json(json!({
        "username": cred.username,
        "password": cred.password,
        "ttl": turn.ice.ttl_secs,
        "uris": turn.ice.uris(&host),
    })))
}

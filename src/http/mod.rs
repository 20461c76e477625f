//! REST routes (PROTOCOL §1), one file per concern, and the routing of `/ws` to its transport.
//! Handlers are thin: extract, call the service (`client::chat`, `auth`), map [`ApiError`] to a
//! status with a JSON body.
//!
//! Must not import `store`.

pub mod auth;
pub mod chats;
pub mod client_ip;
pub mod extract;
pub mod health;
pub mod ice;
pub mod tls;
pub mod web;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::error::ApiError;
use crate::services::Services;

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

pub fn router(state: Arc<Services>) -> Router {
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
        .route("/ws", get(crate::ws::upgrade))
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

/// `router` answering browsers of `origins` (`http.cors_origins`) with CORS headers that allow
/// credentials; no headers for anyone else (same-origin only). Covers `/api` and Socket.IO's
/// long-polling.
pub fn with_cors(router: Router, origins: &[String]) -> Router {
    use axum::http::{header, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let list: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if list.is_empty() {
        return router;
    }
    router.layer(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(list))
            .allow_credentials(true)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// The router of the separate metrics listener (`http.metrics_listen`).
pub fn metrics_router(state: Arc<Services>) -> Router {
    Router::new()
        .route("/metrics", get(health::metrics))
        .with_state(state)
}

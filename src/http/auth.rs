//! `/api/auth/*` and `/api/me`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::client_ip::ClientIp;
use super::extract::{ApiJson, AuthUser};
use crate::auth::AuthResponse;
use crate::error::ApiError;
use crate::services::Services;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterBody {
    username: String,
    password: String,
    #[serde(default)]
    display_name: Option<String>,
}

#[derive(Deserialize)]
pub struct LoginBody {
    username: String,
    password: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefreshBody {
    refresh_token: String,
}

pub async fn register(
    State(state): State<Arc<Services>>,
    ClientIp(client): ClientIp,
    ApiJson(body): ApiJson<RegisterBody>,
) -> Result<(StatusCode, Json<AuthResponse>), ApiError> {
    let resp = state
        .accounts
        .register(
            &body.username,
            &body.password,
            body.display_name.as_deref(),
            client,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(resp)))
}

pub async fn login(
    State(state): State<Arc<Services>>,
    ClientIp(client): ClientIp,
    ApiJson(body): ApiJson<LoginBody>,
) -> Result<Json<AuthResponse>, ApiError> {
    Ok(Json(
        state
            .accounts
            .login(&body.username, &body.password, client)
            .await?,
    ))
}

pub async fn refresh(
    State(state): State<Arc<Services>>,
    ApiJson(body): ApiJson<RefreshBody>,
) -> Result<Json<AuthResponse>, ApiError> {
    Ok(Json(state.accounts.refresh(&body.refresh_token).await?))
}

pub async fn me(
    State(state): State<Arc<Services>>,
    AuthUser(me): AuthUser,
) -> Result<Json<crate::wire::chat::UserReply>, ApiError> {
    Ok(Json(crate::client::chat::me(&state, &me.user_id).await?))
}

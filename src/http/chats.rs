//! `/api/users`, `/api/chats`, `/api/chats/{id}/messages`: the chat service of `client::chat`
//! over REST.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::{ApiJson, AuthUser};
use crate::client::chat;
use crate::error::ApiError;
use crate::services::Services;
use crate::wire::chat::{ChatReply, HistoryPage, UsersReply};

pub async fn users(
    State(s): State<Arc<Services>>,
    AuthUser(me): AuthUser,
) -> Result<Json<UsersReply>, ApiError> {
    Ok(Json(chat::users(&s, &me.user_id).await?))
}

pub async fn list(
    State(s): State<Arc<Services>>,
    AuthUser(me): AuthUser,
) -> Result<Json<Value>, ApiError> {
    let chats = chat::chat_list(&s, &me.user_id).await?;
    Ok(Json(json!({ "chats": chats })))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateChat {
    participant_ids: Vec<String>,
    #[serde(default)]
    title: Option<String>,
}

pub async fn create(
    State(s): State<Arc<Services>>,
    AuthUser(me): AuthUser,
    ApiJson(body): ApiJson<CreateChat>,
) -> Result<(StatusCode, Json<ChatReply>), ApiError> {
    let (reply, created) =
        chat::create_chat(&s, &me.user_id, body.participant_ids, body.title).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(reply)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryQuery {
    before_seq: Option<i64>,
    after_seq: Option<i64>,
    limit: Option<i64>,
}

pub async fn messages(
    State(s): State<Arc<Services>>,
    AuthUser(me): AuthUser,
    Path(chat_id): Path<String>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<HistoryPage>, ApiError> {
    let Query(q) =
        query.map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))?;
    let page = chat::history(
        &s,
        &me.user_id,
        &chat_id,
        q.before_seq,
        q.after_seq,
        q.limit,
    )
    .await?;
    Ok(Json(page))
}

//! `/api/users`, `/api/chats`, `/api/chats/{id}/messages`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::{ApiJson, AuthUser};
use crate::app::AppState;
use crate::error::ApiError;
use crate::store::{with_status, ChatKind, NewChat, Page, StoreError};
use crate::time::now_ms;

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 200;
const MAX_TITLE_CHARS: usize = 128;

pub async fn users(
    State(state): State<Arc<AppState>>,
    AuthUser(me): AuthUser,
) -> Result<Json<Value>, ApiError> {
    let users = state.node.users_seen_by(&me.user_id).await?;
    Ok(Json(json!({ "users": users })))
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    AuthUser(me): AuthUser,
) -> Result<Json<Value>, ApiError> {
    let chats = state.node.store.chats_of(&me.user_id).await?;
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
    State(state): State<Arc<AppState>>,
    AuthUser(me): AuthUser,
    ApiJson(body): ApiJson<CreateChat>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let max = state.config.chat.max_participants;
    // Counted before anything else is done with the list (the caller may repeat themselves).
    if body.participant_ids.len() > max {
        return Err(ApiError::bad_request(format!(
            "participantIds: at most {max} participants"
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(body.participant_ids.len() + 1);
    seen.insert(me.user_id.clone());
    let mut ids = vec![me.user_id.clone()];
    for id in body.participant_ids {
        if seen.insert(id.clone()) {
            ids.push(id);
        }
    }
    if ids.len() < 2 {
        return Err(ApiError::bad_request(
            "participantIds: name at least one other user",
        ));
    }
    if ids.len() > max {
        return Err(ApiError::bad_request(format!(
            "participantIds: at most {max} participants"
        )));
    }
    let title = body
        .title
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty());
    if title
        .as_ref()
        .is_some_and(|t| t.chars().count() > MAX_TITLE_CHARS)
    {
        return Err(ApiError::bad_request("title: at most 128 characters"));
    }
    let kind = if ids.len() == 2 && title.is_none() {
        ChatKind::Direct
    } else {
        ChatKind::Group
    };
    let (chat, created) = state
        .node
        .store
        .create_chat(NewChat {
            id: uuid::Uuid::now_v7().to_string(),
            kind,
            title,
            participant_ids: ids,
            created_at: now_ms(),
        })
        .await
        .map_err(|e| match e {
            StoreError::NotFound => ApiError::not_found("participant not found"),
            other => other.into(),
        })?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({ "chat": chat }))))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryQuery {
    before_seq: Option<i64>,
    after_seq: Option<i64>,
    limit: Option<i64>,
}

pub async fn messages(
    State(state): State<Arc<AppState>>,
    AuthUser(me): AuthUser,
    Path(chat_id): Path<String>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) =
        query.map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))?;
    let members = state.node.members_for(&chat_id, &me.user_id).await?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let page = match (q.before_seq, q.after_seq) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give beforeSeq or afterSeq, not both",
            ))
        }
        (Some(seq), None) => Page::Before { seq, limit },
        (None, Some(seq)) => Page::After { seq, limit },
        (None, None) => Page::Latest { limit },
    };
    let (msgs, has_more) = state.node.store.messages(&chat_id, page).await?;
    Ok(Json(
        json!({ "messages": with_status(&msgs, &members), "hasMore": has_more }),
    ))
}

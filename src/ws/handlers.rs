//! Chat events of PROTOCOL §2.1: access checks, store calls, publishes. Each handler returns what
//! the session writes to its own connection; pushes to others go through the node's broker.

use std::sync::Arc;

use serde_json::{json, Value};

use super::protocol::{self as p, payload, push};
use crate::app::AppState;
use crate::error::{ApiError, ErrorCode};
use crate::hub::ConnId;
use crate::store::{
    with_status, ChatKind, CursorKind, CursorUpdate, ForwardedFrom, Member, MessageRecord, NewChat,
    NewMessage, Page,
};
use crate::time::{now_ms, rfc3339_ms};

/// Messages per chat in a `sync` reply or a `chat:join` with `afterSeq`.
pub const SYNC_LIMIT: i64 = 200;
/// Messages in one `sync` reply over all chats; chats past it come with `hasMore: true` and the
/// client asks again from its new cursors (the SDK does), so a user with many busy chats gets
/// bounded replies.
pub const SYNC_BUDGET: i64 = 1000;
/// Messages in a `chat:join` without `afterSeq`.
pub const JOIN_LATEST: i64 = 50;
pub use crate::limits::FORWARD_MAX;
const CLIENT_MSG_ID_MAX: usize = 128;

/// The connection a request came from.
pub struct Conn {
    pub user_id: String,
    pub conn_id: ConnId,
}

/// What to write to the requesting connection.
#[derive(Default)]
pub struct Handled {
    /// Frames written before the reply (`message:ack`, `pong`).
    pub frames: Vec<String>,
    /// Reply data for a request with an `id`.
    pub data: Value,
    /// `(chat, seq)` now written to this connection: mark delivered once the write succeeded.
    pub delivered: Vec<(String, i64)>,
    /// A new token expiry for this connection (`auth:refresh`).
    pub new_expiry: Option<i64>,
}

impl Handled {
    fn data(data: Value) -> Self {
        Self {
            data,
            ..Default::default()
        }
    }
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn others(members: &[Member], user_id: &str) -> Vec<String> {
    members
        .iter()
        .filter(|m| m.user_id != user_id)
        .map(|m| m.user_id.clone())
        .collect()
}

fn check_content(state: &AppState, content: &str, field: &str) -> Result<(), ApiError> {
    let n = content.chars().count();
    let max = state.config.chat.max_content_chars;
    if n == 0 || n > max {
        return Err(ApiError::bad_request(format!(
            "{field}: 1 to {max} characters"
        )));
    }
    Ok(())
}

/// Spends `n` of the user's message allowance (shared by all their connections).
fn spend_messages(state: &AppState, user_id: &str, n: usize) -> Result<(), ApiError> {
    state
        .node
        .hub
        .take_messages(user_id, n as u32, now_ms())
        .map_err(|retry_ms| {
            let mut err = ApiError::new(
                ErrorCode::RateLimited,
                "too many messages from this user; slow down",
            );
            err.retry_after = Some((retry_ms.max(1) as u64).div_ceil(1000).min(3600));
            err
        })
}

/// Highest seq among `msgs` not sent by `user_id`: what writing them delivers.
fn delivered_upto(msgs: &[MessageRecord], user_id: &str) -> Option<i64> {
    msgs.iter()
        .filter(|m| m.sender_id != user_id)
        .map(|m| m.seq)
        .max()
}

pub async fn handle(
    state: &Arc<AppState>,
    conn: &Conn,
    event: &str,
    data: &Value,
) -> Result<Handled, ApiError> {
    let me = conn.user_id.as_str();
    match event {
        "message" => send_message(state, conn, payload(data)?).await,
        "chat:get" => {
            let req: p::ChatGet = payload(data)?;
            if req.recipient_id == me {
                return Err(ApiError::bad_request(
                    "recipientId: cannot open a direct chat with yourself",
                ));
            }
            let (chat, _) = state
                .node
                .store
                .create_chat(NewChat {
                    id: new_id(),
                    kind: ChatKind::Direct,
                    title: None,
                    participant_ids: vec![me.to_owned(), req.recipient_id],
                    created_at: now_ms(),
                })
                .await
                .map_err(|e| match e {
                    crate::store::StoreError::NotFound => {
                        ApiError::not_found("recipient not found")
                    }
                    other => other.into(),
                })?;
            Ok(Handled::data(json!({ "chat": chat })))
        }
        "chat:join" => {
            let req: p::ChatJoin = payload(data)?;
            let members = state.node.members_for(&req.chat_id, me).await?;
            let store = &state.node.store;
            let chat = store.chat(&req.chat_id).await?;
            let page = match req.after_seq {
                Some(seq) => Page::After {
                    seq: seq.max(0),
                    limit: SYNC_LIMIT,
                },
                None => Page::Latest { limit: JOIN_LATEST },
            };
            let (msgs, has_more) = store.messages(&req.chat_id, page).await?;
            let pinned = store.pinned(&req.chat_id).await?;
            state
                .node
                .hub
                .set_chat_open(me, conn.conn_id, &req.chat_id, true);
            let mut out = Handled::data(json!({
                "chat": chat,
                "messages": with_status(&msgs, &members),
                "hasMore": has_more,
                "pinned": with_status(&pinned, &members),
            }));
            out.delivered
                .extend(delivered_upto(&msgs, me).map(|s| (req.chat_id.clone(), s)));
            Ok(out)
        }
        "chat:leave" => {
            let req: p::ChatRef = payload(data)?;
            state.node.members_for(&req.chat_id, me).await?;
            state
                .node
                .hub
                .set_chat_open(me, conn.conn_id, &req.chat_id, false);
            Ok(Handled::data(json!({})))
        }
        "sync" => {
            let req: p::Sync = payload(data)?;
            let store = &state.node.store;
            let chats = store.chats_with_members(me).await?;
            // Plan what each chat gets within the reply's budget, then fetch it in one query.
            let mut budget = SYNC_BUDGET;
            let plan: Vec<(i64, i64)> = chats
                .iter()
                .map(|(chat, _)| {
                    let after = req.cursors.get(&chat.id).copied().unwrap_or(0).max(0);
                    let take = (chat.last_seq - after).clamp(0, SYNC_LIMIT.min(budget));
                    budget -= take;
                    (after, take)
                })
                .collect();
            let wants: Vec<(String, i64, i64)> = chats
                .iter()
                .zip(&plan)
                .filter(|(_, (_, take))| *take > 0)
                .map(|((chat, _), (after, take))| (chat.id.clone(), *after, *take))
                .collect();
            let mut fetched = store.messages_after_many(&wants).await?.into_iter();
            let mut out = Handled::default();
            let mut replies = Vec::with_capacity(chats.len());
            for ((chat, members), (after, take)) in chats.iter().zip(plan) {
                let msgs = if take > 0 {
                    fetched.next().unwrap_or_default()
                } else {
                    Vec::new()
                };
                out.delivered
                    .extend(delivered_upto(&msgs, me).map(|s| (chat.id.clone(), s)));
                replies.push(json!({
                    "chatId": chat.id,
                    "messages": with_status(&msgs, members),
                    "hasMore": chat.last_seq > after + take,
                }));
            }
            out.data = json!({ "chats": replies });
            Ok(out)
        }
        "users:list" => {
            let users = state.node.users_seen_by(me).await?;
            Ok(Handled::data(json!({ "users": users })))
        }
        "message:read" => {
            let req: p::MessageRead = payload(data)?;
            let (chat_id, seq) = match (req.message_id, req.chat_id, req.seq) {
                (Some(id), _, _) => {
                    let m = find_message(state, &id).await?;
                    (m.chat_id, m.seq)
                }
                (None, Some(chat_id), Some(seq)) => (chat_id, seq),
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid data: give messageId, or chatId and seq",
                    ))
                }
            };
            state.node.members_for(&chat_id, me).await?;
            let last_seq = state.node.store.chat(&chat_id).await?.last_seq;
            let seq = seq.clamp(0, last_seq);
            let changes = state
                .node
                .store
                .advance_cursors(vec![CursorUpdate {
                    chat_id: chat_id.clone(),
                    user_id: me.to_owned(),
                    kind: CursorKind::Read,
                    seq,
                }])
                .await?;
            state.node.publish_status(changes);
            Ok(Handled::data(json!({"chatId": chat_id, "seq": seq})))
        }
        "message:pin" | "message:unpin" => {
            let req: p::MessageRef = payload(data)?;
            let pin = event == "message:pin";
            let m = find_message(state, &req.message_id).await?;
            let members = state.node.members_for(&m.chat_id, me).await?;
            let (m, changed) = state.node.store.set_pinned(&m.id, pin).await?;
            let wire = with_status(std::slice::from_ref(&m), &members).remove(0);
            if changed {
                let ev = if pin {
                    "message:pinned"
                } else {
                    "message:unpinned"
                };
                state.node.publish_to(
                    members.iter().map(|m| m.user_id.clone()).collect(),
                    push(ev, &wire),
                );
            }
            Ok(Handled::data(json!({ "message": wire })))
        }
        "chat:get-pinned" => {
            let req: p::ChatRef = payload(data)?;
            let members = state.node.members_for(&req.chat_id, me).await?;
            let pinned = state.node.store.pinned(&req.chat_id).await?;
            Ok(Handled::data(
                json!({ "messages": with_status(&pinned, &members) }),
            ))
        }
        "message:forward" => {
            let req: p::Forward = payload(data)?;
            if let Some(c) = &req.additional_content {
                check_content(state, c, "additionalContent")?;
            }
            spend_messages(state, me, 1 + usize::from(req.additional_content.is_some()))?;
            forward(
                state,
                me,
                &[req.message_id],
                &req.to_chat_id,
                req.additional_content,
            )
            .await
        }
        "message:forward-multiple" => {
            let req: p::ForwardMultiple = payload(data)?;
            if req.message_ids.is_empty() || req.message_ids.len() > FORWARD_MAX {
                return Err(ApiError::bad_request(format!(
                    "messageIds: 1 to {FORWARD_MAX} ids"
                )));
            }
            // Each forwarded message counts against the sender's rate.
            spend_messages(state, me, req.message_ids.len())?;
            forward(state, me, &req.message_ids, &req.to_chat_id, None).await
        }
        "typing-start" | "typing-stop" => {
            let req: p::ChatRef = payload(data)?;
            let members = state.node.members_for(&req.chat_id, me).await?;
            let others = others(&members, me);
            if event == "typing-start" {
                state.node.typing_start(me, &req.chat_id, others);
            } else {
                state.node.typing_stop(me, &req.chat_id, others);
            }
            Ok(Handled::data(json!({})))
        }
        "ping" => {
            let now = json!({ "serverTime": rfc3339_ms(now_ms()) });
            Ok(Handled {
                frames: vec![push("pong", &now)],
                data: now,
                ..Default::default()
            })
        }
        "auth:refresh" => {
            let req: p::AuthRefresh = payload(data)?;
            let authed = state.accounts.authenticate(&req.token).await?;
            if authed.user_id != me {
                return Err(ApiError::forbidden("token belongs to another user"));
            }
            Ok(Handled {
                data: json!({ "expiresAt": rfc3339_ms(authed.expires_at * 1000) }),
                new_expiry: Some(authed.expires_at),
                ..Default::default()
            })
        }
        other => Err(ApiError::bad_request(format!("unknown event `{other}`"))),
    }
}

async fn find_message(state: &AppState, id: &str) -> Result<MessageRecord, ApiError> {
    state.node.store.message(id).await.map_err(|e| match e {
        crate::store::StoreError::NotFound => ApiError::not_found("message not found"),
        other => other.into(),
    })
}

async fn send_message(
    state: &Arc<AppState>,
    conn: &Conn,
    req: p::SendMessage,
) -> Result<Handled, ApiError> {
    let me = conn.user_id.as_str();
    check_content(state, &req.content, "content")?;
    if let Some(cid) = &req.client_msg_id {
        if cid.is_empty() || cid.len() > CLIENT_MSG_ID_MAX {
            return Err(ApiError::bad_request("clientMsgId: 1 to 128 bytes"));
        }
    }
    let members = state.node.members_for(&req.chat_id, me).await?;
    spend_messages(state, me, 1)?;
    let mut stored = state
        .node
        .store
        .insert_messages(vec![NewMessage {
            id: new_id(),
            chat_id: req.chat_id.clone(),
            sender_id: me.to_owned(),
            content: req.content,
            client_msg_id: req.client_msg_id,
            forwarded_from: None,
            call: None,
            created_at: now_ms(),
        }])
        .await?;
    let (record, created) = stored.pop().expect("one message in, one out");
    if record.chat_id != req.chat_id {
        return Err(ApiError::bad_request(
            "clientMsgId: already used for a message in another chat",
        ));
    }
    // Committed: from here on the message is durable and may be acknowledged.
    if created {
        metrics::counter!("switchboard_messages_stored_total").increment(1);
        state
            .node
            .typing_stop(me, &record.chat_id, others(&members, me));
        state.node.publish_message(&record, &members);
    }
    let wire = with_status(std::slice::from_ref(&record), &members).remove(0);
    let ack = push(
        "message:ack",
        json!({"messageId": record.id, "clientMsgId": record.client_msg_id, "chatId": record.chat_id, "seq": record.seq}),
    );
    Ok(Handled {
        frames: vec![ack],
        data: json!({ "message": wire }),
        ..Default::default()
    })
}

async fn forward(
    state: &AppState,
    me: &str,
    ids: &[String],
    to_chat: &str,
    comment: Option<String>,
) -> Result<Handled, ApiError> {
    let target = state.node.members_for(to_chat, me).await?;
    let mut originals = Vec::with_capacity(ids.len());
    for id in ids {
        let m = find_message(state, id).await?;
        if !state.node.store.is_member(&m.chat_id, me).await? {
            return Err(ApiError::forbidden(
                "not a participant of the message's chat",
            ));
        }
        originals.push(m);
    }
    let now = now_ms();
    let mut new = Vec::with_capacity(originals.len() + 1);
    if let Some(content) = comment {
        new.push(NewMessage {
            id: new_id(),
            chat_id: to_chat.to_owned(),
            sender_id: me.to_owned(),
            content,
            client_msg_id: None,
            forwarded_from: None,
            call: None,
            created_at: now,
        });
    }
    for m in originals {
        // A forward of a forward points at the original author, as messengers show it.
        let origin = m.forwarded_from.clone().unwrap_or(ForwardedFrom {
            message_id: m.id.clone(),
            chat_id: m.chat_id.clone(),
            sender_id: m.sender_id.clone(),
        });
        new.push(NewMessage {
            id: new_id(),
            chat_id: to_chat.to_owned(),
            sender_id: me.to_owned(),
            content: m.content,
            client_msg_id: None,
            forwarded_from: Some(origin),
            call: None,
            created_at: now,
        });
    }
    let stored = state.node.store.insert_messages(new).await?;
    let records: Vec<MessageRecord> = stored.into_iter().map(|(r, _)| r).collect();
    metrics::counter!("switchboard_messages_stored_total").increment(records.len() as u64);
    for r in &records {
        state.node.publish_message(r, &target);
    }
    Ok(Handled::data(
        json!({ "messages": with_status(&records, &target) }),
    ))
}

//! The chat service (PROTOCOL §2.1 and the chat routes of §1): access checks, validation,
//! store calls and publishes, in one place for every transport and for REST. Each function
//! returns the typed reply data; what the requesting connection writes first (an ack, a pong)
//! comes back in [`Handled`].
//!
//! A shell: reads the clock for timestamps and the rate limits.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;

use crate::error::{ApiError, ErrorCode};
use crate::hub::ConnId;
use crate::services::Services;
use crate::store::{
    ChatKind, CursorKind, CursorUpdate, ForwardedFromRecord, Member, MessageRecord, NewChat,
    NewMessage, Page, StoreError,
};
use crate::time::{now_ms, rfc3339_ms};
use crate::wire::chat::{
    self as w, ChatReply, HistoryPage, JoinReply, MessageAck, MessageReply, MessagesReply,
    ReadReply, RefreshReply, ServerTime, SyncChat, SyncReply, UserReply, UsersReply,
};
use crate::wire::models::{Chat, ChatSummary, Message, User};
use crate::wire::{events, Push, Reply};

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
/// A page of `GET /api/chats/{id}/messages`: by default, and at most.
const HISTORY_DEFAULT: i64 = 50;
const HISTORY_MAX: i64 = 200;
const MAX_TITLE_CHARS: usize = 128;

/// The connection a request came from.
#[derive(Debug, Clone)]
pub struct Conn {
    pub user_id: String,
    pub conn_id: ConnId,
}

/// What a request did, beyond its reply data.
#[derive(Default)]
pub struct Handled {
    /// Pushes the requesting connection writes before the reply (`message:ack`, `pong`).
    pub pushes: Vec<Arc<Push>>,
    pub reply: Option<Reply>,
    /// `(chat, seq)` now written to this connection: marked delivered once the write worked.
    pub delivered: Vec<(String, i64)>,
    /// A new token expiry for this connection (`auth:refresh`).
    pub new_expiry: Option<i64>,
}

impl Handled {
    /// Replies `{}`.
    fn empty() -> Self {
        Self {
            reply: Some(Reply::empty()),
            ..Default::default()
        }
    }

    fn reply<T: serde::Serialize>(data: &T) -> Self {
        Self {
            reply: Some(Reply::new(data)),
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

fn check_content(s: &Services, content: &str, field: &str) -> Result<(), ApiError> {
    let n = content.chars().count();
    let max = s.config.chat.max_content_chars;
    if n == 0 || n > max {
        return Err(ApiError::bad_request(format!(
            "{field}: 1 to {max} characters"
        )));
    }
    Ok(())
}

/// Spends `n` of the user's message allowance (shared by all their connections).
fn spend_messages(s: &Services, user_id: &str, n: usize) -> Result<(), ApiError> {
    s.node
        .hub()
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

/// Members of `chat_id` if `user_id` is one: `not_found` / `forbidden` otherwise. The access
/// check every chat request makes, over any transport and REST alike.
pub async fn members_for(
    s: &Services,
    chat_id: &str,
    user_id: &str,
) -> Result<Vec<Member>, ApiError> {
    let members = s.store.members(chat_id).await?;
    if members.is_empty() {
        // Every chat has members; none means no such chat.
        return Err(ApiError::not_found("chat not found"));
    }
    if !members.iter().any(|m| m.user_id == user_id) {
        return Err(ApiError::forbidden("not a participant of this chat"));
    }
    Ok(members)
}

/// Every user as `viewer` may see them: online state and last-seen time only of users who
/// share a chat with the viewer (and of the viewer), `isOnline: false, lastSeenAt: null`
/// for everyone else. `users:list` and `GET /api/users`.
pub async fn users(s: &Services, viewer: &str) -> Result<UsersReply, ApiError> {
    let contacts: std::collections::HashSet<String> =
        s.store.contacts_of(viewer).await?.into_iter().collect();
    let users = s.store.list_users().await?;
    let ids: Vec<&str> = users.iter().map(|u| u.id.as_str()).collect();
    let online = s.node.online(&ids).await;
    let users = users
        .iter()
        .zip(online)
        .map(|(u, online)| {
            let visible = u.id == viewer || contacts.contains(&u.id);
            User::new(u, visible && online, visible)
        })
        .collect();
    Ok(UsersReply { users })
}

/// `GET /api/me`.
pub async fn me(s: &Services, me: &str) -> Result<UserReply, ApiError> {
    let user = s.store.user_by_id(me).await?;
    Ok(UserReply {
        user: User::new(&user, s.node.is_online(&user.id).await, true),
    })
}

/// `GET /api/chats`.
pub async fn chat_list(s: &Services, me: &str) -> Result<Vec<ChatSummary>, ApiError> {
    Ok(s.store
        .chats_of(me)
        .await?
        .iter()
        .map(ChatSummary::from)
        .collect())
}

/// `POST /api/chats`: a group, or the direct chat of two. `Ok((reply, created))`.
pub async fn create_chat(
    s: &Services,
    me: &str,
    participant_ids: Vec<String>,
    title: Option<String>,
) -> Result<(ChatReply, bool), ApiError> {
    let max = s.config.chat.max_participants;
    // Counted before anything else is done with the list (the caller may repeat themselves).
    if participant_ids.len() > max {
        return Err(ApiError::bad_request(format!(
            "participantIds: at most {max} participants"
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(participant_ids.len() + 1);
    seen.insert(me.to_owned());
    let mut ids = vec![me.to_owned()];
    for id in participant_ids {
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
    let title = title.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
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
    let (chat, created) = s
        .store
        .create_chat(NewChat {
            id: new_id(),
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
    Ok((
        ChatReply {
            chat: Chat::from(&chat),
        },
        created,
    ))
}

/// `GET /api/chats/{id}/messages`.
pub async fn history(
    s: &Services,
    me: &str,
    chat_id: &str,
    before_seq: Option<i64>,
    after_seq: Option<i64>,
    limit: Option<i64>,
) -> Result<HistoryPage, ApiError> {
    let members = members_for(s, chat_id, me).await?;
    let limit = limit.unwrap_or(HISTORY_DEFAULT).clamp(1, HISTORY_MAX);
    let page = match (before_seq, after_seq) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give beforeSeq or afterSeq, not both",
            ))
        }
        (Some(seq), None) => Page::Before { seq, limit },
        (None, Some(seq)) => Page::After { seq, limit },
        (None, None) => Page::Latest { limit },
    };
    let (msgs, has_more) = s.store.messages(chat_id, page).await?;
    Ok(HistoryPage {
        messages: Message::with_status(&msgs, &members),
        has_more,
    })
}

/// One chat request of a connection.
pub async fn handle(s: &Services, conn: &Conn, req: w::ChatRequest) -> Result<Handled, ApiError> {
    use w::ChatRequest as R;
    let me = conn.user_id.as_str();
    match req {
        R::Message(req) => send_message(s, conn, req).await,
        R::ChatGet(req) => {
            if req.recipient_id == me {
                return Err(ApiError::bad_request(
                    "recipientId: cannot open a direct chat with yourself",
                ));
            }
            let (chat, _) = s
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
                    StoreError::NotFound => ApiError::not_found("recipient not found"),
                    other => other.into(),
                })?;
            Ok(Handled::reply(&ChatReply {
                chat: Chat::from(&chat),
            }))
        }
        R::ChatJoin(req) => {
            let members = members_for(s, &req.chat_id, me).await?;
            let chat = s.store.chat(&req.chat_id).await?;
            let page = match req.after_seq {
                Some(seq) => Page::After {
                    seq: seq.max(0),
                    limit: SYNC_LIMIT,
                },
                None => Page::Latest { limit: JOIN_LATEST },
            };
            let (msgs, has_more) = s.store.messages(&req.chat_id, page).await?;
            let pinned = s.store.pinned(&req.chat_id).await?;
            s.node
                .hub()
                .set_chat_open(me, conn.conn_id, &req.chat_id, true);
            let mut out = Handled::reply(&JoinReply {
                chat: Chat::from(&chat),
                messages: Message::with_status(&msgs, &members),
                has_more,
                pinned: Message::with_status(&pinned, &members),
            });
            out.delivered
                .extend(delivered_upto(&msgs, me).map(|seq| (req.chat_id, seq)));
            Ok(out)
        }
        R::ChatLeave(req) => {
            members_for(s, &req.chat_id, me).await?;
            s.node
                .hub()
                .set_chat_open(me, conn.conn_id, &req.chat_id, false);
            Ok(Handled::empty())
        }
        R::Sync(req) => sync(s, me, req).await,
        R::UsersList => Ok(Handled::reply(&users(s, me).await?)),
        R::MessageRead(req) => {
            let (chat_id, seq) = match (req.message_id, req.chat_id, req.seq) {
                (Some(id), _, _) => {
                    let m = find_message(s, &id).await?;
                    (m.chat_id, m.seq)
                }
                (None, Some(chat_id), Some(seq)) => (chat_id, seq),
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid data: give messageId, or chatId and seq",
                    ))
                }
            };
            members_for(s, &chat_id, me).await?;
            let last_seq = s.store.chat(&chat_id).await?.last_seq;
            let seq = seq.clamp(0, last_seq);
            let changes = s
                .store
                .advance_cursors(vec![CursorUpdate {
                    chat_id: chat_id.clone(),
                    user_id: me.to_owned(),
                    kind: CursorKind::Read,
                    seq,
                }])
                .await?;
            s.node.publish_status(changes).await;
            Ok(Handled::reply(&ReadReply { chat_id, seq }))
        }
        R::MessagePin(req) => pin(s, me, &req.message_id, true).await,
        R::MessageUnpin(req) => pin(s, me, &req.message_id, false).await,
        R::ChatGetPinned(req) => {
            let members = members_for(s, &req.chat_id, me).await?;
            let pinned = s.store.pinned(&req.chat_id).await?;
            Ok(Handled::reply(&MessagesReply {
                messages: Message::with_status(&pinned, &members),
            }))
        }
        R::Forward(req) => {
            if let Some(c) = &req.additional_content {
                check_content(s, c, "additionalContent")?;
            }
            spend_messages(s, me, 1 + usize::from(req.additional_content.is_some()))?;
            forward(
                s,
                me,
                &[req.message_id],
                &req.to_chat_id,
                req.additional_content,
            )
            .await
        }
        R::ForwardMultiple(req) => {
            if req.message_ids.is_empty() || req.message_ids.len() > FORWARD_MAX {
                return Err(ApiError::bad_request(format!(
                    "messageIds: 1 to {FORWARD_MAX} ids"
                )));
            }
            // Each forwarded message counts against the sender's rate.
            spend_messages(s, me, req.message_ids.len())?;
            forward(s, me, &req.message_ids, &req.to_chat_id, None).await
        }
        R::TypingStart(req) => {
            let members = members_for(s, &req.chat_id, me).await?;
            let others = others(&members, me);
            s.node.typing_start(me, &req.chat_id, others).await;
            Ok(Handled::empty())
        }
        R::TypingStop(req) => {
            let members = members_for(s, &req.chat_id, me).await?;
            let others = others(&members, me);
            s.node.typing_stop(me, &req.chat_id, others).await;
            Ok(Handled::empty())
        }
        R::Ping => {
            let now = ServerTime {
                server_time: rfc3339_ms(now_ms()),
            };
            Ok(Handled {
                pushes: vec![Push::new(events::PONG, &now)],
                reply: Some(Reply::new(&now)),
                ..Default::default()
            })
        }
        R::AuthRefresh(req) => {
            let authed = s.accounts.authenticate(&req.token).await?;
            if authed.user_id != me {
                return Err(ApiError::forbidden("token belongs to another user"));
            }
            Ok(Handled {
                reply: Some(Reply::new(&RefreshReply {
                    expires_at: rfc3339_ms(authed.expires_at * 1000),
                })),
                new_expiry: Some(authed.expires_at),
                ..Default::default()
            })
        }
    }
}

async fn sync(s: &Services, me: &str, req: w::Sync) -> Result<Handled, ApiError> {
    let chats = s.store.chats_with_members(me).await?;
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
    let mut fetched = s.store.messages_after_many(&wants).await?.into_iter();
    let mut delivered = Vec::new();
    let mut replies = Vec::with_capacity(chats.len());
    for ((chat, members), (after, take)) in chats.iter().zip(plan) {
        let msgs = if take > 0 {
            fetched.next().unwrap_or_default()
        } else {
            Vec::new()
        };
        delivered.extend(delivered_upto(&msgs, me).map(|seq| (chat.id.clone(), seq)));
        replies.push(SyncChat {
            chat_id: chat.id.clone(),
            messages: Message::with_status(&msgs, members),
            has_more: chat.last_seq > after + take,
        });
    }
    let mut out = Handled::reply(&SyncReply { chats: replies });
    out.delivered = delivered;
    Ok(out)
}

async fn pin(s: &Services, me: &str, message_id: &str, pin: bool) -> Result<Handled, ApiError> {
    let m = find_message(s, message_id).await?;
    let members = members_for(s, &m.chat_id, me).await?;
    let (m, changed) = s.store.set_pinned(&m.id, pin).await?;
    let wire = Message::new(&m, crate::store::status_of(m.seq, &m.sender_id, &members));
    let event = if pin {
        events::MESSAGE_PINNED
    } else {
        events::MESSAGE_UNPINNED
    };
    // Serialised once: the push's data is the reply's message.
    let push = Push::message(event, &wire, false);
    let reply = Reply::field("message", push.data_json());
    if changed {
        s.node
            .publish_to(members.iter().map(|m| m.user_id.clone()).collect(), push)
            .await;
    }
    Ok(Handled {
        reply: Some(reply),
        ..Default::default()
    })
}

async fn find_message(s: &Services, id: &str) -> Result<MessageRecord, ApiError> {
    s.store.message(id).await.map_err(|e| match e {
        StoreError::NotFound => ApiError::not_found("message not found"),
        other => other.into(),
    })
}

async fn send_message(s: &Services, conn: &Conn, req: w::SendMessage) -> Result<Handled, ApiError> {
    let me = conn.user_id.as_str();
    check_content(s, &req.content, "content")?;
    if let Some(cid) = &req.client_msg_id {
        if cid.is_empty() || cid.len() > CLIENT_MSG_ID_MAX {
            return Err(ApiError::bad_request("clientMsgId: 1 to 128 bytes"));
        }
    }
    let members = members_for(s, &req.chat_id, me).await?;
    spend_messages(s, me, 1)?;
    let mut stored = s
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
    // Committed: from here on the message is durable and may be acknowledged. Its wire form is
    // built and serialised once, for the push to every member and for the reply.
    let reply = if created {
        metrics::counter!("switchboard_messages_stored_total").increment(1);
        s.node
            .typing_stop(me, &record.chat_id, others(&members, me))
            .await;
        let push = s.node.publish_message(&record, &members).await;
        Reply::field("message", push.data_json())
    } else {
        let status = crate::store::status_of(record.seq, &record.sender_id, &members);
        Reply::new(&MessageReply {
            message: Message::new(&record, status),
        })
    };
    let ack = Push::new(
        events::MESSAGE_ACK,
        &MessageAck {
            message_id: &record.id,
            client_msg_id: record.client_msg_id.as_deref(),
            chat_id: &record.chat_id,
            seq: record.seq,
        },
    );
    Ok(Handled {
        pushes: vec![ack],
        reply: Some(reply),
        ..Default::default()
    })
}

async fn forward(
    s: &Services,
    me: &str,
    ids: &[String],
    to_chat: &str,
    comment: Option<String>,
) -> Result<Handled, ApiError> {
    let target = members_for(s, to_chat, me).await?;
    let mut originals = Vec::with_capacity(ids.len());
    for id in ids {
        let m = find_message(s, id).await?;
        if !s.store.is_member(&m.chat_id, me).await? {
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
        let origin = m.forwarded_from.clone().unwrap_or(ForwardedFromRecord {
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
    let stored = s.store.insert_messages(new).await?;
    let records: Vec<MessageRecord> = stored.into_iter().map(|(r, _)| r).collect();
    metrics::counter!("switchboard_messages_stored_total").increment(records.len() as u64);
    let mut pushes = Vec::with_capacity(records.len());
    for r in &records {
        pushes.push(s.node.publish_message(r, &target).await);
    }
    Ok(Handled {
        reply: Some(Reply::list(
            "messages",
            pushes.iter().map(|p| p.data_json()),
        )),
        ..Default::default()
    })
}

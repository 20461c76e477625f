//! Chat events of PROTOCOL §2.1: the requests a client sends, the data of the pushes and the
//! replies the server sends back.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::models::{Chat, Message, User};
use super::payload;
use crate::error::ApiError;
use crate::store::MessageStatus;

/// A chat request, decoded.
#[derive(Debug)]
pub enum ChatRequest {
    Message(SendMessage),
    ChatGet(ChatGet),
    ChatJoin(ChatJoin),
    ChatLeave(ChatRef),
    Sync(Sync),
    UsersList,
    MessageRead(MessageRead),
    MessagePin(MessageRef),
    MessageUnpin(MessageRef),
    ChatGetPinned(ChatRef),
    Forward(Forward),
    ForwardMultiple(ForwardMultiple),
    TypingStart(ChatRef),
    TypingStop(ChatRef),
    Ping,
    AuthRefresh(AuthRefresh),
}

impl ChatRequest {
    pub fn decode(event: &str, data: Option<&RawValue>) -> Result<ChatRequest, ApiError> {
        Ok(match event {
            "message" => Self::Message(payload(data)?),
            "chat:get" => Self::ChatGet(payload(data)?),
            "chat:join" => Self::ChatJoin(payload(data)?),
            "chat:leave" => Self::ChatLeave(payload(data)?),
            "sync" => Self::Sync(payload(data)?),
            // These two take no data: whatever came is ignored.
            "users:list" => Self::UsersList,
            "ping" => Self::Ping,
            "message:read" => Self::MessageRead(payload(data)?),
            "message:pin" => Self::MessagePin(payload(data)?),
            "message:unpin" => Self::MessageUnpin(payload(data)?),
            "chat:get-pinned" => Self::ChatGetPinned(payload(data)?),
            "message:forward" => Self::Forward(payload(data)?),
            "message:forward-multiple" => Self::ForwardMultiple(payload(data)?),
            "typing-start" => Self::TypingStart(payload(data)?),
            "typing-stop" => Self::TypingStop(payload(data)?),
            "auth:refresh" => Self::AuthRefresh(payload(data)?),
            other => return Err(ApiError::bad_request(format!("unknown event `{other}`"))),
        })
    }
}

// --- requests

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SendMessage {
    pub chat_id: String,
    pub content: String,
    #[serde(default)]
    pub client_msg_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatGet {
    pub recipient_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatJoin {
    pub chat_id: String,
    #[serde(default)]
    pub after_seq: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatRef {
    pub chat_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sync {
    #[serde(default)]
    pub cursors: HashMap<String, i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageRead {
    #[serde(default)]
    pub message_id: Option<String>,
    #[serde(default)]
    pub chat_id: Option<String>,
    #[serde(default)]
    pub seq: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageRef {
    pub message_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Forward {
    pub message_id: String,
    pub to_chat_id: String,
    #[serde(default)]
    pub additional_content: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ForwardMultiple {
    pub message_ids: Vec<String>,
    pub to_chat_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthRefresh {
    pub token: String,
}

// --- push data

/// `connection:established`, the first frame of every connection.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionEstablished<'a> {
    pub user_id: &'a str,
    pub connection_id: String,
    pub heartbeat_interval_ms: u64,
    pub server_time: String,
    pub ice_servers: &'a [super::models::IceServer],
    pub ice_expires_at: Option<String>,
}

/// `message:ack`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageAck<'a> {
    pub message_id: &'a str,
    pub client_msg_id: Option<&'a str>,
    pub chat_id: &'a str,
    pub seq: i64,
}

/// `message:status`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageStatusChanged<'a> {
    pub message_id: &'a str,
    pub chat_id: &'a str,
    pub seq: i64,
    #[serde(serialize_with = "status_str")]
    pub status: MessageStatus,
}

fn status_str<S: serde::Serializer>(st: &MessageStatus, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(st.as_str())
}

/// `users:update`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsersUpdate<'a> {
    pub user_id: &'a str,
    pub is_online: bool,
    pub last_seen_at: Option<String>,
}

/// `user-typing` / `user-stopped-typing`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Typing<'a> {
    pub user_id: &'a str,
    pub chat_id: &'a str,
}

/// `pong`, and the reply of `ping`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerTime {
    pub server_time: String,
}

// --- reply data

/// `{chat}`: `chat:get`, `POST /api/chats`.
#[derive(Debug, Serialize)]
pub struct ChatReply {
    pub chat: Chat,
}

/// `chat:join`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinReply {
    pub chat: Chat,
    pub messages: Vec<Message>,
    pub has_more: bool,
    pub pinned: Vec<Message>,
}

/// One chat of a `sync` reply.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncChat {
    pub chat_id: String,
    pub messages: Vec<Message>,
    pub has_more: bool,
}

/// `sync`.
#[derive(Debug, Serialize)]
pub struct SyncReply {
    pub chats: Vec<SyncChat>,
}

/// `{users}`: `users:list`, `GET /api/users`.
#[derive(Debug, Serialize)]
pub struct UsersReply {
    pub users: Vec<User>,
}

/// `{user}`: `GET /api/me`.
#[derive(Debug, Serialize)]
pub struct UserReply {
    pub user: User,
}

/// `{message}`: `message`, `message:pin`, `message:unpin`.
#[derive(Debug, Serialize)]
pub struct MessageReply {
    pub message: Message,
}

/// `{messages}`: `chat:get-pinned`, forwards.
#[derive(Debug, Serialize)]
pub struct MessagesReply {
    pub messages: Vec<Message>,
}

/// `{messages, hasMore}`: a page of history (`GET /api/chats/{id}/messages`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryPage {
    pub messages: Vec<Message>,
    pub has_more: bool,
}

/// `message:read`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadReply {
    pub chat_id: String,
    pub seq: i64,
}

/// `auth:refresh`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RefreshReply {
    pub expires_at: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn raw(v: Value) -> Box<RawValue> {
        RawValue::from_string(v.to_string()).unwrap()
    }

    #[test]
    fn decodes_each_event_to_its_request() {
        let d = raw(json!({"chatId": "c", "content": "hi", "clientMsgId": "k"}));
        match ChatRequest::decode("message", Some(&d)).unwrap() {
            ChatRequest::Message(m) => {
                assert_eq!(
                    (m.chat_id.as_str(), m.client_msg_id.as_deref()),
                    ("c", Some("k"))
                )
            }
            other => panic!("{other:?}"),
        }
        // `ping` and `users:list` ignore whatever data came.
        let junk = raw(json!([1, 2]));
        assert!(matches!(
            ChatRequest::decode("ping", Some(&junk)),
            Ok(ChatRequest::Ping)
        ));
        assert!(matches!(
            ChatRequest::decode("users:list", None),
            Ok(ChatRequest::UsersList)
        ));
        let d = raw(json!({"cursors": {"c1": 4}}));
        match ChatRequest::decode("sync", Some(&d)).unwrap() {
            ChatRequest::Sync(s) => assert_eq!(s.cursors["c1"], 4),
            other => panic!("{other:?}"),
        }
        let e = ChatRequest::decode("chat:join", Some(&raw(json!({})))).unwrap_err();
        assert!(e.message.contains("chatId"), "{}", e.message);
    }

    #[test]
    fn push_shapes() {
        let ack = MessageAck {
            message_id: "m",
            client_msg_id: None,
            chat_id: "c",
            seq: 2,
        };
        assert_eq!(
            serde_json::to_value(ack).unwrap(),
            json!({"messageId": "m", "clientMsgId": null, "chatId": "c", "seq": 2})
        );
        let st = MessageStatusChanged {
            message_id: "m",
            chat_id: "c",
            seq: 2,
            status: MessageStatus::Read,
        };
        assert_eq!(
            serde_json::to_value(st).unwrap(),
            json!({"messageId": "m", "chatId": "c", "seq": 2, "status": "read"})
        );
        let up = UsersUpdate {
            user_id: "u",
            is_online: false,
            last_seen_at: None,
        };
        assert_eq!(
            serde_json::to_value(up).unwrap(),
            json!({"userId": "u", "isOnline": false, "lastSeenAt": null})
        );
    }
}

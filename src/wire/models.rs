//! The shapes of PROTOCOL §1 on the wire (`User`, `Chat`, `Message`, ...), built from the
//! store's records: the store keeps data, this module decides how it looks to a client.

use serde::{Serialize, Serializer};

use crate::store::{
    CallMeta, ChatKind, ChatOverview, ChatRecord, ForwardedFromRecord, MessageRecord,
    MessageStatus, UserRecord,
};
use crate::time::rfc3339_ms;

/// `User`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub id: String,
    pub username: String,
    pub display_name: String,
    pub is_online: bool,
    pub last_seen_at: Option<String>,
}

impl User {
    /// `last_seen` overrides the record's last-seen time (`None` hides it).
    pub fn new(u: &UserRecord, is_online: bool, show_last_seen: bool) -> User {
        User {
            id: u.id.clone(),
            username: u.username.clone(),
            display_name: u.display_name.clone(),
            is_online,
            last_seen_at: u.last_seen_at.filter(|_| show_last_seen).map(rfc3339_ms),
        }
    }
}

fn kind_str<S: Serializer>(k: &ChatKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(k.as_str())
}

fn status_str<S: Serializer>(st: &MessageStatus, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(st.as_str())
}

/// `Chat`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Chat {
    pub id: String,
    #[serde(serialize_with = "kind_str")]
    pub kind: ChatKind,
    pub title: Option<String>,
    pub participant_ids: Vec<String>,
    pub created_at: String,
    pub last_seq: i64,
}

impl From<&ChatRecord> for Chat {
    fn from(c: &ChatRecord) -> Chat {
        Chat {
            id: c.id.clone(),
            kind: c.kind,
            title: c.title.clone(),
            participant_ids: c.participant_ids.clone(),
            created_at: rfc3339_ms(c.created_at),
            last_seq: c.last_seq,
        }
    }
}

/// A chat with what `GET /api/chats` adds for the caller.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatSummary {
    #[serde(flatten)]
    pub chat: Chat,
    pub last_message: Option<Message>,
    pub unread_count: i64,
}

impl From<&ChatOverview> for ChatSummary {
    fn from(o: &ChatOverview) -> ChatSummary {
        ChatSummary {
            chat: Chat::from(&o.chat),
            last_message: o
                .last_message
                .as_ref()
                .map(|(m, status)| Message::new(m, *status)),
            unread_count: o.unread_count,
        }
    }
}

/// `forwardedFrom`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ForwardedFrom {
    pub message_id: String,
    pub chat_id: String,
    pub sender_id: String,
}

impl From<&ForwardedFromRecord> for ForwardedFrom {
    fn from(f: &ForwardedFromRecord) -> Self {
        ForwardedFrom {
            message_id: f.message_id.clone(),
            chat_id: f.chat_id.clone(),
            sender_id: f.sender_id.clone(),
        }
    }
}

/// `Message.call`: which call a call event message is about and how it went.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CallInfo {
    pub call_id: String,
    pub call_type: String,
    pub outcome: String,
    pub duration_ms: i64,
}

impl From<&CallMeta> for CallInfo {
    fn from(c: &CallMeta) -> Self {
        CallInfo {
            call_id: c.call_id.clone(),
            call_type: c.call_type.clone(),
            outcome: c.outcome.clone(),
            duration_ms: c.duration_ms,
        }
    }
}

/// `Message`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub id: String,
    pub chat_id: String,
    pub seq: i64,
    pub sender_id: String,
    pub content: String,
    pub client_msg_id: Option<String>,
    pub created_at: String,
    #[serde(serialize_with = "status_str")]
    pub status: MessageStatus,
    pub pinned: bool,
    pub forwarded_from: Option<ForwardedFrom>,
    /// `text`, or `call` for a call event (then `call` says which and how it went).
    pub kind: &'static str,
    pub call: Option<CallInfo>,
}

impl Message {
    pub fn new(m: &MessageRecord, status: MessageStatus) -> Message {
        Message {
            id: m.id.clone(),
            chat_id: m.chat_id.clone(),
            seq: m.seq,
            sender_id: m.sender_id.clone(),
            content: m.content.clone(),
            client_msg_id: m.client_msg_id.clone(),
            created_at: rfc3339_ms(m.created_at),
            status,
            pinned: m.pinned,
            forwarded_from: m.forwarded_from.as_ref().map(ForwardedFrom::from),
            kind: if m.call.is_some() { "call" } else { "text" },
            call: m.call.as_ref().map(CallInfo::from),
        }
    }

    /// Wire messages with their statuses as their senders see them, for one chat.
    pub fn with_status(
        records: &[MessageRecord],
        members: &[crate::store::Member],
    ) -> Vec<Message> {
        records
            .iter()
            .map(|r| Message::new(r, crate::store::status_of(r.seq, &r.sender_id, members)))
            .collect()
    }
}

/// One entry of `iceServers` (an `RTCIceServer`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_message_looks_as_the_protocol_says() {
        let rec = MessageRecord {
            id: "m1".into(),
            chat_id: "c1".into(),
            seq: 3,
            sender_id: "u1".into(),
            content: "hi".into(),
            client_msg_id: None,
            created_at: 0,
            pinned: false,
            forwarded_from: Some(ForwardedFromRecord {
                message_id: "m0".into(),
                chat_id: "c0".into(),
                sender_id: "u0".into(),
            }),
            call: None,
        };
        let v = serde_json::to_value(Message::new(&rec, MessageStatus::Delivered)).unwrap();
        assert_eq!(
            v,
            json!({"id":"m1","chatId":"c1","seq":3,"senderId":"u1","content":"hi","clientMsgId":null,
                   "createdAt":"1970-01-01T00:00:00.000Z","status":"delivered","pinned":false,
                   "forwardedFrom":{"messageId":"m0","chatId":"c0","senderId":"u0"},"kind":"text","call":null})
        );
    }

    #[test]
    fn ice_servers_omit_absent_credentials() {
        let s = IceServer {
            urls: vec!["stun:h:3478".into()],
            username: None,
            credential: None,
        };
        assert_eq!(
            serde_json::to_value(s).unwrap(),
            json!({"urls": ["stun:h:3478"]})
        );
    }
}

//! Stored records and the wire shapes built from them (PROTOCOL §1).

use serde::Serialize;

use crate::time::rfc3339_ms;

#[derive(Debug, Clone)]
pub struct NewUser {
    pub id: String,
    pub username: String,
    pub display_name: String,
    pub password_hash: Option<String>,
    pub external_sub: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub id: String,
    pub username: String,
    pub display_name: String,
    pub password_hash: Option<String>,
    pub last_seen_at: Option<i64>,
}

/// `User` on the wire.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub id: String,
    pub username: String,
    pub display_name: String,
    pub is_online: bool,
    pub last_seen_at: Option<String>,
}

impl UserRecord {
    pub fn to_wire(&self, is_online: bool) -> User {
        User {
            id: self.id.clone(),
            username: self.username.clone(),
            display_name: self.display_name.clone(),
            is_online,
            last_seen_at: self.last_seen_at.map(rfc3339_ms),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatKind {
    Direct,
    Group,
}

impl ChatKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChatKind::Direct => "direct",
            ChatKind::Group => "group",
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewChat {
    pub id: String,
    pub kind: ChatKind,
    pub title: Option<String>,
    /// Creator first.
    pub participant_ids: Vec<String>,
    pub created_at: i64,
}

/// `Chat` on the wire.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Chat {
    pub id: String,
    pub kind: ChatKind,
    pub title: Option<String>,
    pub participant_ids: Vec<String>,
    pub created_at: String,
    pub last_seq: i64,
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user_id: String,
    pub delivered_seq: i64,
    pub read_seq: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ForwardedFrom {
    pub message_id: String,
    pub chat_id: String,
    pub sender_id: String,
}

/// What a call event message says about its call (`Message.call`).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CallMeta {
    pub call_id: String,
    pub call_type: String,
    /// The end reason: `ended`, `no_answer`, `rejected`, `cancelled`, `offline`, ...
    pub outcome: String,
    /// Talk time in milliseconds; 0 when it was never answered.
    pub duration_ms: i64,
}

/// A finished call to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    pub id: String,
    pub chat_id: String,
    pub caller_id: String,
    pub callee_id: String,
    pub call_type: String,
    pub started_at: i64,
    pub answered_at: Option<i64>,
    pub ended_at: i64,
    pub end_reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    pub id: String,
    pub chat_id: String,
    pub seq: i64,
    pub sender_id: String,
    pub content: String,
    pub client_msg_id: Option<String>,
    pub created_at: i64,
    pub pinned: bool,
    pub forwarded_from: Option<ForwardedFrom>,
    pub call: Option<CallMeta>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    Sent,
    Delivered,
    Read,
}

impl MessageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Sent => "sent",
            MessageStatus::Delivered => "delivered",
            MessageStatus::Read => "read",
        }
    }
}

/// `Message` on the wire.
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
    pub status: MessageStatus,
    pub pinned: bool,
    pub forwarded_from: Option<ForwardedFrom>,
    /// `text`, or `call` for a call event (then `call` says which and how it went).
    pub kind: &'static str,
    pub call: Option<CallMeta>,
}

impl MessageRecord {
    pub fn to_wire(&self, status: MessageStatus) -> Message {
        Message {
            id: self.id.clone(),
            chat_id: self.chat_id.clone(),
            seq: self.seq,
            sender_id: self.sender_id.clone(),
            content: self.content.clone(),
            client_msg_id: self.client_msg_id.clone(),
            created_at: rfc3339_ms(self.created_at),
            status,
            pinned: self.pinned,
            forwarded_from: self.forwarded_from.clone(),
            kind: if self.call.is_some() { "call" } else { "text" },
            call: self.call.clone(),
        }
    }
}

/// Status of a message as its sender sees it, from the other members' cursors: `read` when every
/// other member read up to it, `delivered` when every other member had it delivered.
/// A chat where the sender is alone counts as `sent`.
pub fn status_of(seq: i64, sender_id: &str, members: &[Member]) -> MessageStatus {
    let mut others = members.iter().filter(|m| m.user_id != sender_id).peekable();
    if others.peek().is_none() {
        return MessageStatus::Sent;
    }
    let (mut min_read, mut min_delivered) = (i64::MAX, i64::MAX);
    for m in others {
        min_read = min_read.min(m.read_seq);
        min_delivered = min_delivered.min(m.delivered_seq.max(m.read_seq));
    }
    if min_read >= seq {
        MessageStatus::Read
    } else if min_delivered >= seq {
        MessageStatus::Delivered
    } else {
        MessageStatus::Sent
    }
}

/// Wire messages with their statuses for one chat.
pub fn with_status(records: &[MessageRecord], members: &[Member]) -> Vec<Message> {
    records
        .iter()
        .map(|r| r.to_wire(status_of(r.seq, &r.sender_id, members)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(user: &str, delivered: i64, read: i64) -> Member {
        Member {
            user_id: user.into(),
            delivered_seq: delivered,
            read_seq: read,
        }
    }

    #[test]
    fn status_needs_every_other_member() {
        let members = [m("a", 0, 0), m("b", 5, 3), m("c", 4, 4)];
        assert_eq!(status_of(3, "a", &members), MessageStatus::Read);
        assert_eq!(status_of(4, "a", &members), MessageStatus::Delivered);
        assert_eq!(status_of(5, "a", &members), MessageStatus::Sent);
        // The sender's own cursors do not count.
        assert_eq!(
            status_of(4, "b", &[m("a", 9, 9), m("b", 0, 0)]),
            MessageStatus::Read
        );
    }

    #[test]
    fn read_implies_delivered() {
        assert_eq!(
            status_of(2, "a", &[m("a", 0, 0), m("b", 0, 2)]),
            MessageStatus::Read
        );
        assert_eq!(
            status_of(3, "a", &[m("a", 0, 0), m("b", 1, 3)]),
            MessageStatus::Read
        );
    }

    #[test]
    fn alone_is_sent() {
        assert_eq!(status_of(1, "a", &[m("a", 9, 9)]), MessageStatus::Sent);
    }
}

//! Stored records (PROTOCOL §1's data, as the store keeps it; `wire::models` decides how it looks
//! to a client) and the one derived value every backend shares: a message's status from the
//! members' cursors.

use serde::{Deserialize, Serialize};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRecord {
    pub id: String,
    pub kind: ChatKind,
    pub title: Option<String>,
    /// In the order they were added (creator first).
    pub participant_ids: Vec<String>,
    /// Unix ms.
    pub created_at: i64,
    pub last_seq: i64,
}

/// A chat with what the chat list shows its member: the last message with its status as its
/// sender sees it, and how many messages the member has not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatOverview {
    pub chat: ChatRecord,
    pub last_message: Option<(MessageRecord, MessageStatus)>,
    pub unread_count: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user_id: String,
    pub delivered_seq: i64,
    pub read_seq: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedFromRecord {
    pub message_id: String,
    pub chat_id: String,
    pub sender_id: String,
}

/// What a call event message says about its call. Stored as JSON (these field names are the
/// storage format; keep them readable by older rows).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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
    pub forwarded_from: Option<ForwardedFromRecord>,
    pub call: Option<CallMeta>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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

/// A chat record from its row and its members (in position order), for the backends.
pub fn make_chat(
    id: &str,
    kind: &str,
    title: Option<String>,
    last_seq: i64,
    created_at: i64,
    members: &[Member],
) -> ChatRecord {
    ChatRecord {
        id: id.to_owned(),
        kind: if kind == "direct" {
            ChatKind::Direct
        } else {
            ChatKind::Group
        },
        title,
        participant_ids: members.iter().map(|m| m.user_id.clone()).collect(),
        created_at,
        last_seq,
    }
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

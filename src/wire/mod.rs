//! The wire contract of PROTOCOL §2, transport-neutral and pure: event names, the typed payloads
//! of requests and pushes, replies, error bodies, and close codes with what a client should do
//! after each.
//!
//! An outbound event is serialised once into a [`Push`] that every recipient shares; a transport
//! only frames it, and each transport's framing is built once per push too ([`Push::framed`]).
//! A request is decoded once: the transport reads its envelope without building a tree
//! (`data` stays a [`RawValue`]), and [`Request::decode`] turns that into a typed request.
//!
//! Must not import tokio, a transport (`ws`, `http`), `app` or a store backend; reads no clock.

pub mod calls;
pub mod chat;
pub mod close;
pub mod models;

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::error::ApiError;

pub use calls::CallRequest;
pub use chat::ChatRequest;
pub use close::{CloseCode, Reconnect};

/// Client events this server knows (metrics label only these; anything else is "unknown").
pub const KNOWN_EVENTS: &[&str] = &[
    "message",
    "chat:get",
    "chat:join",
    "chat:leave",
    "sync",
    "users:list",
    "message:read",
    "message:pin",
    "message:unpin",
    "chat:get-pinned",
    "message:forward",
    "message:forward-multiple",
    "typing-start",
    "typing-stop",
    "ping",
    "auth:refresh",
    "call:initiate",
    "call:answer",
    "call:reject",
    "call:end",
    "call:ice-candidate",
    "call:resume",
    "call:renegotiate",
];

/// The metrics label for an event name.
pub fn event_label(event: &str) -> &'static str {
    KNOWN_EVENTS
        .iter()
        .find(|e| **e == event)
        .copied()
        .unwrap_or("unknown")
}

/// Every event the server pushes (PROTOCOL §2, §2.2): what a push from another node may be.
pub const PUSH_EVENTS: &[&str] = &[
    events::CONNECTION_ESTABLISHED,
    events::MESSAGE,
    events::MESSAGE_ACK,
    events::MESSAGE_STATUS,
    events::MESSAGE_PINNED,
    events::MESSAGE_UNPINNED,
    events::USERS_UPDATE,
    events::USER_TYPING,
    events::USER_STOPPED_TYPING,
    events::PONG,
    events::ERROR,
    "call:offer",
    "call:answer",
    "call:end",
    "call:rejected",
    "call:no-answer",
    "call:peer-reconnecting",
    "call:peer-resumed",
    "call:ice-candidate",
    "call:renegotiate",
    "call:error",
    "call:busy",
];

/// Names of the server's pushes (PROTOCOL §2).
pub mod events {
    pub const CONNECTION_ESTABLISHED: &str = "connection:established";
    pub const MESSAGE: &str = "message";
    pub const MESSAGE_ACK: &str = "message:ack";
    pub const MESSAGE_STATUS: &str = "message:status";
    pub const MESSAGE_PINNED: &str = "message:pinned";
    pub const MESSAGE_UNPINNED: &str = "message:unpinned";
    pub const USERS_UPDATE: &str = "users:update";
    pub const USER_TYPING: &str = "user-typing";
    pub const USER_STOPPED_TYPING: &str = "user-stopped-typing";
    pub const PONG: &str = "pong";
    pub const ERROR: &str = "error";
}

/// Which message a `message` push carries: writing it to a connection marks it delivered to
/// that connection's user (unless they sent it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct MessageRef {
    pub chat_id: Box<str>,
    pub seq: i64,
    pub sender_id: Box<str>,
}

/// The ways a transport frames a push; each is built at most once per push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// PROTOCOL §2's `{"event": .., "data": ..}` text frame.
    Native = 0,
}

const FRAMINGS: usize = 1;

/// An outbound event, serialised once and shared (behind an `Arc`) by every recipient.
#[derive(Debug)]
pub struct Push {
    event: &'static str,
    /// The event's `data`, as JSON.
    data: Box<RawValue>,
    message: Option<MessageRef>,
    framed: [OnceLock<Bytes>; FRAMINGS],
}

impl Push {
    /// Serialises `data` for the push `event`.
    pub fn new<T: Serialize + ?Sized>(event: &'static str, data: &T) -> Arc<Push> {
        Arc::new(Self::build(event, data, None))
    }

    /// A `message` push (or `message:pinned`/`unpinned`) of `message`; `delivers` marks the
    /// pushes whose writing counts as a delivery.
    pub fn message(event: &'static str, message: &models::Message, delivers: bool) -> Arc<Push> {
        let target = delivers.then(|| MessageRef {
            chat_id: message.chat_id.as_str().into(),
            seq: message.seq,
            sender_id: message.sender_id.as_str().into(),
        });
        Arc::new(Self::build(event, message, target))
    }

    fn build<T: Serialize + ?Sized>(
        event: &'static str,
        data: &T,
        message: Option<MessageRef>,
    ) -> Push {
        Push {
            event,
            data: serde_json::value::to_raw_value(data)
                .expect("wire types serialise (string keys only)"),
            message,
            framed: Default::default(),
        }
    }

    /// A push received from another node (the cluster broker): `None` for an event this build
    /// does not push (a node of another version), which the caller drops.
    pub fn from_parts(
        event: &str,
        data: Box<RawValue>,
        message: Option<MessageRef>,
    ) -> Option<Arc<Push>> {
        let event = PUSH_EVENTS.iter().find(|e| **e == event)?;
        Some(Arc::new(Push {
            event,
            data,
            message,
            framed: Default::default(),
        }))
    }

    pub fn event(&self) -> &'static str {
        self.event
    }

    /// The `data`, as JSON text.
    pub fn data_json(&self) -> &str {
        self.data.get()
    }

    /// The `data`, for a serialiser that writes it as it is (`serde_json` and the serialisers
    /// built on it copy the text, they do not encode it again).
    pub fn data(&self) -> &RawValue {
        &self.data
    }

    pub fn message_ref(&self) -> Option<&MessageRef> {
        self.message.as_ref()
    }

    /// This push framed by a transport: `build(event, data_json)` runs for the first recipient
    /// of that framing, every later one gets the same bytes.
    pub fn framed(&self, framing: Framing, build: impl FnOnce(&str, &str) -> Bytes) -> Bytes {
        self.framed[framing as usize]
            .get_or_init(|| build(self.event, self.data.get()))
            .clone()
    }
}

/// A successful reply's `data`, serialised once (a JSON object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply(Box<str>);

impl Reply {
    pub fn new<T: Serialize + ?Sized>(data: &T) -> Reply {
        Reply(
            serde_json::to_string(data)
                .expect("wire types serialise (string keys only)")
                .into_boxed_str(),
        )
    }

    /// `{}`.
    pub fn empty() -> Reply {
        Reply("{}".into())
    }

    /// `{"<field>": <json>}` around JSON already encoded (a push's data), so a message that is
    /// pushed and replied is serialised once. `field` is a plain identifier.
    pub fn field(field: &'static str, json: &str) -> Reply {
        debug_assert!(field.chars().all(|c| c.is_ascii_alphanumeric()));
        let mut out = String::with_capacity(field.len() + json.len() + 6);
        out.push_str("{\"");
        out.push_str(field);
        out.push_str("\":");
        out.push_str(json);
        out.push('}');
        Reply(out.into_boxed_str())
    }

    /// `{"<field>": [<json>, ...]}` around JSON already encoded.
    pub fn list<'a>(field: &'static str, items: impl IntoIterator<Item = &'a str>) -> Reply {
        let mut inner = String::from("[");
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                inner.push(',');
            }
            inner.push_str(item);
        }
        inner.push(']');
        Self::field(field, &inner)
    }

    pub fn json(&self) -> &str {
        &self.0
    }
}

/// A failed request: the `error` body of a failed reply (`{code, message}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub code: &'static str,
    pub message: String,
}

impl From<&ApiError> for Failure {
    fn from(e: &ApiError) -> Self {
        Failure {
            code: e.code.as_str(),
            message: e.message.clone(),
        }
    }
}

/// The `error` push for a failed request that carried no `id` (`event` names the request).
pub fn error_push(err: &ApiError, event: Option<&str>) -> Arc<Push> {
    #[derive(Serialize)]
    struct ErrorData<'a> {
        code: &'static str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        event: Option<&'a str>,
    }
    Push::new(
        events::ERROR,
        &ErrorData {
            code: err.code.as_str(),
            message: &err.message,
            event,
        },
    )
}

/// A decoded request of either family.
#[derive(Debug)]
pub enum Request {
    Chat(ChatRequest),
    Call(CallRequest),
}

/// Why a request's data could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest {
    pub error: ApiError,
    /// For call events, the `chatId` the data named (if it could be read): their failures are
    /// pushed as `call:error` with it.
    pub call_chat_id: Option<Option<String>>,
}

impl Request {
    /// Decodes the `data` of `event` (absent or `null` data counts as `{}`), naming the bad
    /// field in the error.
    pub fn decode(event: &str, data: Option<&RawValue>) -> Result<Request, BadRequest> {
        if event.starts_with("call:") {
            return CallRequest::decode(event, data)
                .map(Request::Call)
                .map_err(|error| BadRequest {
                    error,
                    call_chat_id: Some(calls::chat_id_of(data)),
                });
        }
        ChatRequest::decode(event, data)
            .map(Request::Chat)
            .map_err(|error| BadRequest {
                error,
                call_chat_id: None,
            })
    }
}

/// Decodes one payload, naming the bad field in the error (PROTOCOL §2: "invalid data: <field>").
pub fn payload<T: DeserializeOwned>(data: Option<&RawValue>) -> Result<T, ApiError> {
    let text = match data {
        Some(raw) if raw.get() != "null" => raw.get(),
        _ => "{}",
    };
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // The position is in the `data` text the client never wrote as such; the path says where.
        let what = inner.to_string();
        let what = what
            .strip_suffix(&format!(
                " at line {} column {}",
                inner.line(),
                inner.column()
            ))
            .unwrap_or(&what);
        if path.is_empty() || path == "." {
            ApiError::bad_request(format!("invalid data: {what}"))
        } else {
            ApiError::bad_request(format!("invalid data: {path}: {what}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use serde_json::{json, Value};

    fn raw(v: Value) -> Box<RawValue> {
        RawValue::from_string(v.to_string()).unwrap()
    }

    #[test]
    fn payload_errors_name_the_field() {
        let d = raw(json!({"content": "x"}));
        let err = payload::<chat::SendMessage>(Some(&d)).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert!(err.message.contains("chatId"), "{}", err.message);
        let d = raw(json!({"chatId": 1, "content": "x"}));
        let err = payload::<chat::SendMessage>(Some(&d)).unwrap_err();
        assert_eq!(
            err.message,
            "invalid data: chatId: invalid type: integer `1`, expected a string"
        );
        let d = raw(json!({"chatId": "c", "content": "x", "zzz": 1}));
        let ok = payload::<chat::SendMessage>(Some(&d)).unwrap();
        assert_eq!(ok.chat_id, "c");
        // Absent and null data are `{}`.
        let d = raw(Value::Null);
        assert!(payload::<chat::Sync>(Some(&d)).is_ok());
        assert!(payload::<chat::Sync>(None).is_ok());
    }

    #[test]
    fn a_push_is_encoded_once_and_framed_once_per_framing() {
        let p = Push::new(events::PONG, &json!({"serverTime": "t"}));
        assert_eq!(p.data_json(), r#"{"serverTime":"t"}"#);
        let mut calls = 0;
        for _ in 0..3 {
            let f = p.framed(Framing::Native, |e, d| {
                calls += 1;
                Bytes::from(format!("{e}|{d}"))
            });
            assert_eq!(&f[..], br#"pong|{"serverTime":"t"}"#);
        }
        assert_eq!(calls, 1);
    }

    #[test]
    fn replies_around_encoded_json_are_json() {
        let r = Reply::field("message", r#"{"id":"m"}"#);
        let v: Value = serde_json::from_str(r.json()).unwrap();
        assert_eq!(v, json!({"message": {"id": "m"}}));
        let r = Reply::list("messages", ["1", "{}"]);
        let v: Value = serde_json::from_str(r.json()).unwrap();
        assert_eq!(v, json!({"messages": [1, {}]}));
        let v: Value = serde_json::from_str(Reply::list("messages", []).json()).unwrap();
        assert_eq!(v, json!({"messages": []}));
    }

    #[test]
    fn error_push_names_the_event_only_when_known() {
        let err = ApiError::forbidden("no");
        let v: Value = serde_json::from_str(error_push(&err, Some("message")).data_json()).unwrap();
        assert_eq!(
            v,
            json!({"code":"forbidden","message":"no","event":"message"})
        );
        let v: Value = serde_json::from_str(error_push(&err, None).data_json()).unwrap();
        assert_eq!(v, json!({"code":"forbidden","message":"no"}));
    }

    #[test]
    fn unknown_events_and_call_failures() {
        let e = Request::decode("nope", None).unwrap_err();
        assert_eq!(e.error.message, "unknown event `nope`");
        assert_eq!(e.call_chat_id, None);
        let d = raw(json!({"chatId": "c1"}));
        let e = Request::decode("call:nope", Some(&d)).unwrap_err();
        assert_eq!(e.call_chat_id, Some(Some("c1".into())));
        let d = raw(json!({"chatId": 5}));
        let e = Request::decode("call:answer", Some(&d)).unwrap_err();
        assert!(e.error.message.contains("chatId"), "{}", e.error.message);
        assert_eq!(e.call_chat_id, Some(None));
    }
}

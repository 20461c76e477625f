//! WebSocket wire format (PROTOCOL §2), pure: envelopes, payloads, frame builders and close codes.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{ApiError, ErrorCode};

/// RFC 6455 §7.4.1 and the application range (PROTOCOL §2).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const TOO_LARGE: u16 = 1009;
    pub const RESTARTING: u16 = 1012;
    pub const UNAUTHORIZED: u16 = 4401;
    pub const HEARTBEAT_TIMEOUT: u16 = 4408;
    pub const TOO_SLOW: u16 = 4429;
}

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

/// A client frame, before its `data` is interpreted.
#[derive(Debug, Deserialize)]
pub struct Inbound {
    pub event: String,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub id: Option<i64>,
}

/// Why an inbound frame could not even be read as an envelope.
#[derive(Debug, PartialEq, Eq)]
pub struct EnvelopeError {
    pub message: String,
    /// The `event` name when one could be read.
    pub event: Option<String>,
    pub id: Option<i64>,
}

pub fn parse_inbound(text: &str) -> Result<Inbound, EnvelopeError> {
    let value: Value = serde_json::from_str(text).map_err(|e| EnvelopeError {
        message: format!("invalid JSON: {e}"),
        event: None,
        id: None,
    })?;
    let id = value.get("id").and_then(Value::as_i64);
    let event = value
        .get("event")
        .and_then(Value::as_str)
        .map(str::to_owned);
    serde_json::from_value::<Inbound>(value).map_err(|e| EnvelopeError {
        message: format!("invalid envelope: {e}"),
        event,
        id,
    })
}

/// Decodes an event's `data`, naming the bad field in the error.
pub fn payload<T: DeserializeOwned>(data: &Value) -> Result<T, ApiError> {
    let data = if data.is_null() {
        &Value::Object(Default::default())
    } else {
        data
    };
    serde_path_to_error::deserialize(data).map_err(|e| {
        let path = e.path().to_string();
        let what = e.into_inner();
        if path.is_empty() || path == "." {
            ApiError::bad_request(format!("invalid data: {what}"))
        } else {
            ApiError::bad_request(format!("invalid data: {path}: {what}"))
        }
    })
}

pub fn push(event: &str, data: impl Serialize) -> String {
    json!({"event": event, "data": data}).to_string()
}

pub fn reply_ok(id: i64, data: impl Serialize) -> String {
    json!({"event": "reply", "id": id, "ok": true, "data": data}).to_string()
}

pub fn reply_err(id: i64, err: &ApiError) -> String {
    json!({"event": "reply", "id": id, "ok": false, "error": error_body(err.code, &err.message)})
        .to_string()
}

/// The `error` push for a failed request that carried no `id`.
pub fn error_push(err: &ApiError, event: Option<&str>) -> String {
    let mut data = json!({"code": err.code.as_str(), "message": err.message});
    if let Some(ev) = event {
        data["event"] = Value::String(ev.to_owned());
    }
    push("error", data)
}

fn error_body(code: ErrorCode, message: &str) -> Value {
    json!({"code": code.as_str(), "message": message})
}

// --- payloads of §2.1

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
    pub cursors: std::collections::HashMap<String, i64>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_envelopes() {
        let i = parse_inbound(r#"{"event":"ping","id":3,"extra":1}"#).unwrap();
        assert_eq!((i.event.as_str(), i.id), ("ping", Some(3)));
        assert!(i.data.is_null());
        let e = parse_inbound("{nope").unwrap_err();
        assert!(e.message.starts_with("invalid JSON"), "{}", e.message);
        let e = parse_inbound(r#"{"event": 5, "id": 9}"#).unwrap_err();
        assert_eq!(e.id, Some(9));
        let e = parse_inbound(r#"[1,2]"#).unwrap_err();
        assert!(e.message.starts_with("invalid envelope"));
    }

    #[test]
    fn payload_errors_name_the_field() {
        let err = payload::<SendMessage>(&json!({"content": "x"})).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert!(err.message.contains("chatId"), "{}", err.message);
        let err = payload::<SendMessage>(&json!({"chatId": 1, "content": "x"})).unwrap_err();
        assert!(err.message.contains("invalid type"), "{}", err.message);
        let ok = payload::<SendMessage>(&json!({"chatId": "c", "content": "x", "zzz": 1})).unwrap();
        assert_eq!(ok.chat_id, "c");
    }

    #[test]
    fn frames() {
        let err = ApiError::forbidden("no");
        let v: Value = serde_json::from_str(&reply_err(7, &err)).unwrap();
        assert_eq!(
            v,
            json!({"event":"reply","id":7,"ok":false,"error":{"code":"forbidden","message":"no"}})
        );
        let v: Value = serde_json::from_str(&error_push(&err, Some("message"))).unwrap();
        assert_eq!(
            v,
            json!({"event":"error","data":{"code":"forbidden","message":"no","event":"message"}})
        );
        let v: Value = serde_json::from_str(&reply_ok(1, json!({"a": 1}))).unwrap();
        assert_eq!(v, json!({"event":"reply","id":1,"ok":true,"data":{"a":1}}));
    }
}

//! PROTOCOL §2's text frames, pure: a client frame's envelope `{event, data, id}` read without
//! building a tree (`data` stays raw for the request decoder), and the frames the server writes:
//! `{"event", "data"}` pushes (framed once per push, shared by every connection) and
//! `{"event": "reply", "id", "ok", ...}` replies.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::client::session::Incoming;
use crate::error::ApiError;
use crate::wire::{Failure, Framing, Push, Reply};

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    id: Option<i64>,
}

/// The same envelope as a tree, read only when the fast path failed, to say why.
#[derive(Deserialize)]
#[allow(dead_code)] // read for its errors
struct EnvelopeTree {
    event: String,
    #[serde(default)]
    data: Value,
    #[serde(default)]
    id: Option<i64>,
}

/// One client text frame as a request, or why it is not one (with its `event` and `id` when
/// they could be read, so the error goes where the client looks for it).
pub fn decode(text: &str) -> Incoming<i64> {
    match serde_json::from_str::<Envelope>(text) {
        Ok(e) => Incoming::Request {
            event: e.event.into_owned(),
            data: e.data.map(ToOwned::to_owned),
            reply_to: e.id,
        },
        Err(_) => {
            let (message, event, id) = why_not(text);
            Incoming::Invalid {
                error: ApiError::bad_request(message),
                event,
                reply_to: id,
            }
        }
    }
}

fn why_not(text: &str) -> (String, Option<String>, Option<i64>) {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return (format!("invalid JSON: {e}"), None, None),
    };
    let id = value.get("id").and_then(Value::as_i64);
    let event = value
        .get("event")
        .and_then(Value::as_str)
        .map(str::to_owned);
    match serde_json::from_value::<EnvelopeTree>(value) {
        Err(e) => (format!("invalid envelope: {e}"), event, id),
        // Read as a tree but not borrowed (e.g. a duplicate key): still not an envelope.
        Ok(_) => ("invalid envelope".to_owned(), event, id),
    }
}

/// `{"event":"<name>","data":<data>}`, built once per push.
pub fn push_frame(push: &Push) -> Bytes {
    push.framed(Framing::Native, |event, data| {
        let name = serde_json::to_string(event).expect("a string serialises");
        let mut frame = String::with_capacity(data.len() + name.len() + 20);
        frame.push_str("{\"event\":");
        frame.push_str(&name);
        frame.push_str(",\"data\":");
        frame.push_str(data);
        frame.push('}');
        Bytes::from(frame)
    })
}

/// The reply to request `id`.
pub fn reply_frame(id: i64, reply: Result<&Reply, &Failure>) -> String {
    match reply {
        Ok(data) => format!(
            "{{\"event\":\"reply\",\"id\":{id},\"ok\":true,\"data\":{}}}",
            data.json()
        ),
        Err(f) => format!(
            "{{\"event\":\"reply\",\"id\":{id},\"ok\":false,\"error\":{}}}",
            serde_json::to_string(f).expect("a failure serialises")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(text: &str) -> (String, Option<String>, Option<i64>) {
        match decode(text) {
            Incoming::Request {
                event,
                data,
                reply_to,
            } => (event, data.map(|d| d.get().to_owned()), reply_to),
            _ => panic!("not a request: {text}"),
        }
    }

    fn invalid(text: &str) -> (String, Option<String>, Option<i64>) {
        match decode(text) {
            Incoming::Invalid {
                error,
                event,
                reply_to,
            } => (error.message, event, reply_to),
            _ => panic!("a request: {text}"),
        }
    }

    #[test]
    fn reads_envelopes() {
        assert_eq!(
            request(r#"{"event":"ping","id":3,"extra":1}"#),
            ("ping".into(), None, Some(3))
        );
        assert_eq!(
            request(r#"{"event":"m\u0065ssage","data":{"a": [1, 2]}}"#),
            ("message".into(), Some(r#"{"a": [1, 2]}"#.into()), None)
        );
        assert_eq!(request(r#"{"event":"x","data":null}"#).1, None);
        let (msg, event, id) = invalid("{nope");
        assert!(msg.starts_with("invalid JSON"), "{msg}");
        assert_eq!((event, id), (None, None));
        let (msg, _, id) = invalid(r#"{"event": 5, "id": 9}"#);
        assert!(msg.starts_with("invalid envelope"), "{msg}");
        assert_eq!(id, Some(9));
        let (msg, event, _) = invalid(r#"{"event": "message", "id": "x"}"#);
        assert!(msg.starts_with("invalid envelope"), "{msg}");
        assert_eq!(event.as_deref(), Some("message"));
        assert!(invalid(r#"[1,2]"#).0.starts_with("invalid envelope"));
    }

    #[test]
    fn frames() {
        let push = Push::new("pong", &json!({"serverTime": "t"}));
        let f = push_frame(&push);
        let v: Value = serde_json::from_slice(&f).unwrap();
        assert_eq!(v, json!({"event": "pong", "data": {"serverTime": "t"}}));
        assert_eq!(
            &f[..9],
            b"{\"event\":",
            "event first, as PROTOCOL §2 writes it"
        );
        let err = Failure {
            code: "forbidden",
            message: "no".into(),
        };
        let v: Value = serde_json::from_str(&reply_frame(7, Err(&err))).unwrap();
        assert_eq!(
            v,
            json!({"event":"reply","id":7,"ok":false,"error":{"code":"forbidden","message":"no"}})
        );
        let v: Value =
            serde_json::from_str(&reply_frame(1, Ok(&Reply::new(&json!({"a": 1}))))).unwrap();
        assert_eq!(v, json!({"event":"reply","id":1,"ok":true,"data":{"a":1}}));
    }
}

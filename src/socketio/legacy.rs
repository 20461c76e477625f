//! What PROTOCOL §7 adds on Socket.IO, pure: the shapes of acks, the seeds' older event names
//! in (`send-message`, ...) and the older events out (`new-message`, `user-online`, ...), so a
//! frontend written for the stack Switchboard replaces connects unchanged.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::wire::{events, Failure, Push, Reply};

/// The current name of an older client event, if `event` is one.
pub fn incoming_name(event: &str) -> Option<&'static str> {
    match event {
        "send-message" => Some("message"),
        "join-chat" => Some("chat:join"),
        "leave-chat" => Some("chat:leave"),
        _ => None,
    }
}

fn raw(json: String) -> Box<RawValue> {
    RawValue::from_string(json).expect("built from JSON")
}

fn body<T: Serialize>(v: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(v).expect("plain struct serialises")
}

/// `{"success": true, "status": "ok", ...replyData}`, with `messageId` when the reply carries a
/// message.
pub fn ack_success(reply: &Reply) -> Box<RawValue> {
    #[derive(Deserialize)]
    struct WithMessage {
        message: Option<Id>,
    }
    #[derive(Deserialize)]
    struct Id {
        id: String,
    }
    let json = reply.json().trim();
    let inner = json
        .strip_prefix('{')
        .and_then(|j| j.strip_suffix('}'))
        .map(str::trim)
        .unwrap_or("");
    let mut out = String::with_capacity(json.len() + 80);
    out.push_str(r#"{"success":true,"status":"ok""#);
    if !inner.is_empty() {
        out.push(',');
        out.push_str(inner);
    }
    if let Ok(WithMessage { message: Some(m) }) = serde_json::from_str::<WithMessage>(json) {
        out.push_str(r#","messageId":"#);
        out.push_str(&serde_json::to_string(&m.id).expect("a string serialises"));
    }
    out.push('}');
    raw(out)
}

/// `{"success": false, "status": "error", "error": "<message>", "code": "<code>"}`.
pub fn ack_failure(f: &Failure) -> Box<RawValue> {
    #[derive(Serialize)]
    struct Body<'a> {
        success: bool,
        status: &'static str,
        error: &'a str,
        code: &'a str,
    }
    body(&Body {
        success: false,
        status: "error",
        error: &f.message,
        code: f.code,
    })
}

/// The older event the seeds' frontend listens for after `push`, if there is one:
/// `connected` `{userId}`, `new-message` (the Message plus `deliveryStatus`),
/// `message-delivered` `{messageId, chatId}`, `user-online` / `user-offline` `{userId}`.
pub fn outgoing(push: &Push) -> Option<(&'static str, Box<RawValue>)> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Fields {
        user_id: Option<String>,
        message_id: Option<String>,
        chat_id: Option<String>,
        status: Option<String>,
        is_online: Option<bool>,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct User<'a> {
        user_id: &'a str,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Delivered<'a> {
        message_id: &'a str,
        chat_id: &'a str,
    }
    let event = push.event();
    if ![
        events::CONNECTION_ESTABLISHED,
        events::MESSAGE,
        events::MESSAGE_STATUS,
        events::USERS_UPDATE,
    ]
    .contains(&event)
    {
        return None;
    }
    let f: Fields = serde_json::from_str(push.data_json()).ok()?;
    match event {
        events::CONNECTION_ESTABLISHED => {
            let user_id = f.user_id?;
            Some(("connected", body(&User { user_id: &user_id })))
        }
        events::MESSAGE => {
            // The Message with `deliveryStatus` (its status) added.
            let json = push.data_json().trim();
            let inner = json.strip_suffix('}')?;
            let status = f.status?;
            let mut out = String::with_capacity(json.len() + 32);
            out.push_str(inner);
            out.push_str(r#","deliveryStatus":"#);
            out.push_str(&serde_json::to_string(&status).expect("a string serialises"));
            out.push('}');
            Some(("new-message", raw(out)))
        }
        events::MESSAGE_STATUS if f.status.as_deref() == Some("delivered") => {
            let (message_id, chat_id) = (f.message_id?, f.chat_id?);
            Some((
                "message-delivered",
                body(&Delivered {
                    message_id: &message_id,
                    chat_id: &chat_id,
                }),
            ))
        }
        events::USERS_UPDATE => {
            let user_id = f.user_id?;
            let event = if f.is_online? {
                "user-online"
            } else {
                "user-offline"
            };
            Some((event, body(&User { user_id: &user_id })))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn v(r: &RawValue) -> Value {
        serde_json::from_str(r.get()).unwrap()
    }

    #[test]
    fn acks_have_the_shapes_of_section_7() {
        assert_eq!(
            v(&ack_success(&Reply::empty())),
            json!({"success": true, "status": "ok"})
        );
        let r = Reply::new(&json!({"message": {"id": "m1", "seq": 3}}));
        assert_eq!(
            v(&ack_success(&r)),
            json!({"success": true, "status": "ok", "message": {"id": "m1", "seq": 3}, "messageId": "m1"})
        );
        let r = Reply::new(&json!({"chatId": "c", "seq": 2}));
        assert_eq!(
            v(&ack_success(&r)),
            json!({"success": true, "status": "ok", "chatId": "c", "seq": 2})
        );
        let f = Failure {
            code: "forbidden",
            message: "no".into(),
        };
        assert_eq!(
            v(&ack_failure(&f)),
            json!({"success": false, "status": "error", "error": "no", "code": "forbidden"})
        );
    }

    #[test]
    fn older_events_follow_the_current_ones() {
        let hello = Push::new(
            events::CONNECTION_ESTABLISHED,
            &json!({"userId": "u1", "x": 1}),
        );
        let (e, d) = outgoing(&hello).unwrap();
        assert_eq!((e, v(&d)), ("connected", json!({"userId": "u1"})));
        let m = Push::new(events::MESSAGE, &json!({"id": "m", "status": "sent"}));
        let (e, d) = outgoing(&m).unwrap();
        assert_eq!(
            (e, v(&d)),
            (
                "new-message",
                json!({"id": "m", "status": "sent", "deliveryStatus": "sent"})
            )
        );
        let st = |s: &str| {
            Push::new(
                events::MESSAGE_STATUS,
                &json!({"messageId": "m", "chatId": "c", "seq": 1, "status": s}),
            )
        };
        let (e, d) = outgoing(&st("delivered")).unwrap();
        assert_eq!(
            (e, v(&d)),
            (
                "message-delivered",
                json!({"messageId": "m", "chatId": "c"})
            )
        );
        assert!(outgoing(&st("read")).is_none());
        let up = |on: bool| {
            Push::new(
                events::USERS_UPDATE,
                &json!({"userId": "u2", "isOnline": on, "lastSeenAt": null}),
            )
        };
        assert_eq!(outgoing(&up(true)).unwrap().0, "user-online");
        let (e, d) = outgoing(&up(false)).unwrap();
        assert_eq!((e, v(&d)), ("user-offline", json!({"userId": "u2"})));
        assert!(outgoing(&Push::new(events::PONG, &json!({}))).is_none());
    }

    #[test]
    fn old_names_in() {
        assert_eq!(incoming_name("send-message"), Some("message"));
        assert_eq!(incoming_name("message"), None);
    }
}

//! Call events (PROTOCOL §2.2) from a connection: decode, make the store checks that come first
//! (the chat exists, the caller is in it, it is a direct chat), then hand the signal to the calls
//! actor. Failures are always pushed as `call:error` (or `call:busy`), plus a failed reply when
//! the request had an `id`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::handlers::Conn;
use super::protocol::{self as p, payload};
use crate::app::AppState;
use crate::calls::actor::Signal;
use crate::calls::machine::{CallErrorCode, CallType, Initiate};
use crate::error::{ApiError, ErrorCode};
use crate::store::ChatKind;

/// A failed call event: what to push and reply.
pub struct CallFailure {
    pub chat_id: Option<String>,
    pub code: &'static str,
    pub message: String,
}

impl CallFailure {
    fn api(chat_id: Option<String>, e: ApiError) -> Self {
        Self {
            chat_id,
            code: e.code.as_str(),
            message: e.message,
        }
    }

    fn call(chat_id: &str, code: CallErrorCode) -> Self {
        Self {
            chat_id: Some(chat_id.to_owned()),
            code: code.as_str(),
            message: code.message().to_owned(),
        }
    }

    /// The push for this failure: `call:busy` for a busy callee, `call:error` otherwise.
    pub fn push(&self) -> String {
        if self.code == CallErrorCode::Busy.as_str() {
            p::push("call:busy", json!({ "chatId": self.chat_id }))
        } else {
            p::push(
                "call:error",
                json!({"chatId": self.chat_id, "code": self.code, "message": self.message}),
            )
        }
    }

    pub fn reply(&self, id: i64) -> String {
        json!({"event": "reply", "id": id, "ok": false, "error": {"code": self.code, "message": self.message}}).to_string()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InitiateReq {
    chat_id: String,
    offer: Sdp,
    call_type: String,
}

#[derive(Deserialize, serde::Serialize)]
struct Sdp {
    #[serde(rename = "type")]
    kind: String,
    sdp: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnswerReq {
    chat_id: String,
    answer: Sdp,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChatOnly {
    chat_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IceReq {
    chat_id: String,
    /// An RTCIceCandidateInit, or null for end-of-candidates: passed through as is.
    #[serde(default)]
    candidate: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RenegotiateReq {
    chat_id: String,
    description: Sdp,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResumeReq {
    chat_id: String,
    call_id: String,
}

/// The `chatId` of a payload, if it has one, for error pushes.
fn chat_of(data: &Value) -> Option<String> {
    data.get("chatId")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

pub async fn handle(
    state: &Arc<AppState>,
    conn: &Conn,
    event: &str,
    data: &Value,
) -> Result<Value, CallFailure> {
    let fail = |e: ApiError| CallFailure::api(chat_of(data), e);
    let signal = match event {
        "call:initiate" => {
            let req: InitiateReq = payload(data).map_err(fail)?;
            let call_type = match req.call_type.as_str() {
                "audio" => CallType::Audio,
                "video" => CallType::Video,
                _ => {
                    return Err(fail(ApiError::bad_request(
                        "callType: \"audio\" or \"video\"",
                    )))
                }
            };
            let store = &state.node.store;
            let chat = store.chat(&req.chat_id).await.map_err(|e| match e {
                crate::store::StoreError::NotFound => fail(ApiError::not_found("chat not found")),
                other => fail(other.into()),
            })?;
            if !chat.participant_ids.contains(&conn.user_id) {
                return Err(fail(ApiError::forbidden("not a participant of this chat")));
            }
            if chat.kind != ChatKind::Direct {
                return Err(CallFailure {
                    chat_id: Some(req.chat_id),
                    code: "unsupported",
                    message: "calls are 1:1, in direct chats only".into(),
                });
            }
            let callee = chat
                .participant_ids
                .iter()
                .find(|u| **u != conn.user_id)
                .cloned()
                .ok_or_else(|| {
                    fail(ApiError::new(
                        ErrorCode::Internal,
                        "direct chat without a peer",
                    ))
                })?;
            Signal::Initiate(Initiate {
                call_id: uuid::Uuid::now_v7().to_string(),
                chat_id: req.chat_id,
                callee_id: callee,
                call_type,
                offer: serde_json::to_value(&req.offer).expect("plain struct serialises"),
            })
        }
        "call:answer" => {
            let req: AnswerReq = payload(data).map_err(fail)?;
            Signal::Answer {
                chat_id: req.chat_id,
                answer: serde_json::to_value(&req.answer).expect("plain struct serialises"),
            }
        }
        "call:reject" => Signal::Reject {
            chat_id: payload::<ChatOnly>(data).map_err(fail)?.chat_id,
        },
        "call:end" => Signal::End {
            chat_id: payload::<ChatOnly>(data).map_err(fail)?.chat_id,
        },
        "call:ice-candidate" => {
            let req: IceReq = payload(data).map_err(fail)?;
            Signal::Ice {
                chat_id: req.chat_id,
                candidate: req.candidate,
            }
        }
        "call:renegotiate" => {
            let req: RenegotiateReq = payload(data).map_err(fail)?;
            Signal::Renegotiate {
                chat_id: req.chat_id,
                description: serde_json::to_value(&req.description)
                    .expect("plain struct serialises"),
            }
        }
        "call:resume" => {
            let req: ResumeReq = payload(data).map_err(fail)?;
            Signal::Resume {
                chat_id: req.chat_id,
                call_id: req.call_id,
            }
        }
        other => {
            return Err(fail(ApiError::bad_request(format!(
                "unknown event `{other}`"
            ))))
        }
    };
    let chat_id = match &signal {
        Signal::Initiate(i) => i.chat_id.clone(),
        Signal::Answer { chat_id, .. }
        | Signal::Reject { chat_id }
        | Signal::End { chat_id }
        | Signal::Ice { chat_id, .. }
        | Signal::Resume { chat_id, .. }
        | Signal::Renegotiate { chat_id, .. } => chat_id.clone(),
    };
    match state
        .calls
        .signal(&conn.user_id, conn.conn_id, signal)
        .await
    {
        Ok(call_id) => Ok(json!({ "callId": call_id })),
        Err(code) => Err(CallFailure::call(&chat_id, code)),
    }
}

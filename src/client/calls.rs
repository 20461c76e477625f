//! Call requests (PROTOCOL §2.2) of a connection: the store checks that come first for
//! `call:initiate` (the chat exists, the caller is in it, it is a direct chat), then the signal
//! goes to the calls actor. A failure is a [`CallEvent`] (`call:error` or `call:busy`), always
//! pushed, plus a failed reply when the request asked for one.

use crate::calls::actor::Signal;
use crate::calls::machine::Initiate;
use crate::error::{ApiError, ErrorCode};
use crate::services::Services;
use crate::store::{ChatKind, StoreError};
use crate::wire::calls::{CallEvent, CallIdReply, CallRequest};
use crate::wire::{Failure, Reply};

use super::chat::Conn;

/// A failed call request: what to push and what to reply.
#[derive(Debug, Clone, PartialEq)]
pub struct CallFailure {
    pub chat_id: Option<String>,
    pub code: &'static str,
    pub message: String,
}

impl CallFailure {
    pub fn api(chat_id: Option<String>, e: &ApiError) -> Self {
        Self {
            chat_id,
            code: e.code.as_str(),
            message: e.message.clone(),
        }
    }

    /// The push: `call:busy` for a busy callee, `call:error` otherwise.
    pub fn event(&self) -> CallEvent {
        CallEvent::failure(self.chat_id.clone(), self.code, self.message.clone())
    }

    pub fn failure(&self) -> Failure {
        Failure {
            code: self.code,
            message: self.message.clone(),
        }
    }
}

pub async fn handle(s: &Services, conn: &Conn, req: CallRequest) -> Result<Reply, CallFailure> {
    let chat_id = req.chat_id().to_owned();
    let fail = |e: ApiError| CallFailure::api(Some(chat_id.clone()), &e);
    let signal = match req {
        CallRequest::Initiate(req) => {
            let chat = s.store.chat(&req.chat_id).await.map_err(|e| match e {
                StoreError::NotFound => fail(ApiError::not_found("chat not found")),
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
                call_type: req.call_type,
                offer: req.offer,
                // The actor fills these in from the registry, in its own order.
                callee_devices: Vec::new(),
            })
        }
        CallRequest::Answer(r) => Signal::Answer {
            chat_id: r.chat_id,
            answer: r.answer,
        },
        CallRequest::Reject(r) => Signal::Reject { chat_id: r.chat_id },
        CallRequest::End(r) => Signal::End { chat_id: r.chat_id },
        CallRequest::Ice(r) => Signal::Ice {
            chat_id: r.chat_id,
            candidate: r.candidate,
        },
        CallRequest::Renegotiate(r) => Signal::Renegotiate {
            chat_id: r.chat_id,
            description: r.description,
        },
        CallRequest::Resume(r) => Signal::Resume {
            chat_id: r.chat_id,
            call_id: r.call_id,
        },
    };
    match s.calls.signal(&conn.user_id, conn.conn_id, signal).await {
        Ok(call_id) => Ok(Reply::new(&CallIdReply { call_id: &call_id })),
        Err(code) => Err(CallFailure {
            chat_id: Some(chat_id),
            code: code.as_str(),
            message: code.message().to_owned(),
        }),
    }
}

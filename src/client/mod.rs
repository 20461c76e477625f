//! A client connection, over any transport: the request handling of [`chat`] and [`calls`],
//! and the connection's life in [`session`] (authenticate, register, greet, then one loop over
//! queued pushes and requests until a close code says why it ended). A transport (`ws/`, later
//! `socketio/`) only frames: it implements [`session::Transport`] (write and close) and turns
//! what it reads into [`session::Incoming`] items.
//!
//! Must not import a transport (`ws`, `http`) or `app`.

pub mod calls;
pub mod chat;
pub mod session;

use std::sync::Arc;

use serde_json::value::RawValue;

use crate::error::{ApiError, ErrorCode};
use crate::hub::ConnId;
use crate::services::Services;
use crate::wire::{self, error_push, Failure, Push, Reply, Request};

pub use chat::Conn;

/// What the transport writes for one request: the pushes first, then the reply (when the
/// request asked for one), then it reports `delivered` ([`Client::delivered`]).
#[derive(Default)]
pub struct Outcome {
    pub pushes: Vec<Arc<Push>>,
    pub reply: Option<Result<Reply, Failure>>,
    /// `(chat, seq)` written to this connection by this reply.
    pub delivered: Vec<(String, i64)>,
}

impl Outcome {
    /// A failed request: a failed reply when one was asked for, an `error` push naming the
    /// request's event otherwise (PROTOCOL §2).
    pub fn failed(err: &ApiError, event: Option<&str>, wants_reply: bool) -> Outcome {
        metrics::counter!("switchboard_ws_errors_total", "code" => err.code.as_str()).increment(1);
        if wants_reply {
            Outcome {
                reply: Some(Err(Failure::from(err))),
                ..Default::default()
            }
        } else {
            Outcome {
                pushes: vec![error_push(err, event)],
                ..Default::default()
            }
        }
    }

    fn call_failed(f: &calls::CallFailure, wants_reply: bool) -> Outcome {
        metrics::counter!("switchboard_ws_errors_total", "code" => f.code).increment(1);
        Outcome {
            pushes: vec![f.event().push()],
            reply: wants_reply.then(|| Err(f.failure())),
            delivered: Vec::new(),
        }
    }
}

/// One authenticated, registered connection.
pub struct Client {
    services: Arc<Services>,
    conn: Conn,
    /// Unix seconds; moved by `auth:refresh`.
    token_expires_at: i64,
}

impl Client {
    pub fn new(services: Arc<Services>, user_id: String, conn_id: ConnId, expires_at: i64) -> Self {
        Self {
            services,
            conn: Conn { user_id, conn_id },
            token_expires_at: expires_at,
        }
    }

    pub fn user_id(&self) -> &str {
        &self.conn.user_id
    }

    pub fn conn_id(&self) -> ConnId {
        self.conn.conn_id
    }

    pub fn token_expires_at(&self) -> i64 {
        self.token_expires_at
    }

    /// Handles the request `event` with `data`, decoded once here.
    pub async fn handle(
        &mut self,
        event: &str,
        data: Option<&RawValue>,
        wants_reply: bool,
    ) -> Outcome {
        metrics::counter!("switchboard_ws_events_total", "event" => wire::event_label(event))
            .increment(1);
        let request = match Request::decode(event, data) {
            Ok(r) => r,
            Err(bad) => {
                return match bad.call_chat_id {
                    Some(chat_id) => Outcome::call_failed(
                        &calls::CallFailure::api(chat_id, &bad.error),
                        wants_reply,
                    ),
                    None => Outcome::failed(&bad.error, Some(event), wants_reply),
                }
            }
        };
        match request {
            Request::Call(req) => match calls::handle(&self.services, &self.conn, req).await {
                Ok(reply) => Outcome {
                    reply: wants_reply.then_some(Ok(reply)),
                    ..Default::default()
                },
                Err(f) => Outcome::call_failed(&f, wants_reply),
            },
            Request::Chat(req) => match chat::handle(&self.services, &self.conn, req).await {
                Ok(h) => {
                    if let Some(exp) = h.new_expiry {
                        self.token_expires_at = exp;
                    }
                    Outcome {
                        pushes: h.pushes,
                        reply: if wants_reply {
                            Some(Ok(h.reply.unwrap_or_else(Reply::empty)))
                        } else {
                            None
                        },
                        delivered: h.delivered,
                    }
                }
                Err(err) => {
                    if err.code == ErrorCode::Internal {
                        tracing::warn!(event, "request failed with an internal error");
                    }
                    Outcome::failed(&err, Some(event), wants_reply)
                }
            },
        }
    }

    /// This connection was written `push`: a `message` from someone else is now delivered.
    pub async fn pushed(&self, push: &Push) {
        if let Some(m) = push.message_ref() {
            if *m.sender_id != *self.conn.user_id {
                metrics::counter!("switchboard_messages_delivered_total").increment(1);
                self.services
                    .node
                    .report_delivered(&m.chat_id, &self.conn.user_id, m.seq)
                    .await;
            }
        }
    }

    /// A reply with these messages was written to this connection.
    pub async fn delivered(&self, delivered: Vec<(String, i64)>) {
        for (chat_id, seq) in delivered {
            self.services
                .node
                .report_delivered(&chat_id, &self.conn.user_id, seq)
                .await;
        }
    }
}

//! The async shell of the call machine: one task owns the [`Machine`], feeds it connection
//! events and signals in arrival order, wakes it at [`Machine::poll_timeout`], and carries out
//! its commands: each event is serialised once and sent to its connections through the node
//! (control messages to whichever node holds each one); records go through the store, with the
//! call shown as a message in the chat history.
#![allow(clippy::disallowed_methods)] // a shell: reads the clock for the machine

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

pub use super::machine::Signal;
use super::machine::{CallErrorCode, CallSummary, Command, EndReason, Machine};
use crate::hub::node::Node;
use crate::hub::ConnId;
use crate::store::{CallMeta, CallRecord, NewMessage, Store};
use crate::time::now_ms;

/// Inputs queued for the actor before callers wait.
const QUEUE: usize = 1024;

enum Input {
    Up {
        user: String,
        conn: ConnId,
    },
    Down {
        user: String,
        conn: ConnId,
    },
    Signal {
        user: String,
        conn: ConnId,
        signal: Signal,
        reply: oneshot::Sender<Result<String, CallErrorCode>>,
    },
    /// End every call with `server_shutdown` (the process is going away for good).
    EndAll {
        done: oneshot::Sender<()>,
    },
}

/// Handle to the calls actor.
#[derive(Clone)]
pub struct Calls {
    tx: mpsc::Sender<Input>,
}

impl Calls {
    /// Starts the actor. It runs until every handle is dropped.
    pub fn spawn(
        node: Arc<Node>,
        store: Arc<dyn Store>,
        ring_timeout: Duration,
        grace: Duration,
        tracker: TaskTracker,
    ) -> (Calls, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let machine = Machine::new(ring_timeout.as_millis() as i64, grace.as_millis() as i64);
        let shell = Shell {
            node,
            store,
            tracker,
        };
        let task = tokio::spawn(run(machine, rx, shell));
        (Calls { tx }, task)
    }

    pub async fn connection_up(&self, user: &str, conn: ConnId) {
        let _ = self
            .tx
            .send(Input::Up {
                user: user.to_owned(),
                conn,
            })
            .await;
    }

    pub async fn connection_down(&self, user: &str, conn: ConnId) {
        let _ = self
            .tx
            .send(Input::Down {
                user: user.to_owned(),
                conn,
            })
            .await;
    }

    /// Feeds a signal; the call id on success.
    pub async fn signal(
        &self,
        user: &str,
        conn: ConnId,
        signal: Signal,
    ) -> Result<String, CallErrorCode> {
        let (reply, rx) = oneshot::channel();
        let input = Input::Signal {
            user: user.to_owned(),
            conn,
            signal,
            reply,
        };
        if self.tx.send(input).await.is_err() {
            return Err(CallErrorCode::NoSuchCall);
        }
        rx.await.unwrap_or(Err(CallErrorCode::NoSuchCall))
    }

    /// Ends every call with `server_shutdown` and waits until the pushes are queued.
    pub async fn end_all(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Input::EndAll { done }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// What the actor's commands act on.
struct Shell {
    node: Arc<Node>,
    store: Arc<dyn Store>,
    /// Call records being written; shutdown waits for them.
    tracker: TaskTracker,
}

async fn run(mut machine: Machine, mut rx: mpsc::Receiver<Input>, shell: Shell) {
    loop {
        let deadline = machine.poll_timeout();
        let sleep = async {
            match deadline {
                Some(at) => {
                    tokio::time::sleep(Duration::from_millis((at - now_ms()).max(0) as u64)).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            input = rx.recv() => {
                let Some(input) = input else { break };
                let now = now_ms();
                match input {
                    Input::Up { user, conn } => machine.connection_up(&user, conn, now),
                    Input::Down { user, conn } => machine.connection_down(&user, conn, now),
                    Input::Signal { user, conn, mut signal, reply } => {
                        if let Signal::Initiate(req) = &mut signal {
                            // Read here, in the actor's order: a connection that registered
                            // after this rings through its `Up`, one that left is not rung.
                            req.callee_devices = shell.node.hub().connections_of(&req.callee_id);
                        }
                        let result = machine.signal(&user, conn, signal, now);
                        // Commands first, so the pushes are queued before the reply is written.
                        execute(&mut machine, &shell).await;
                        let _ = reply.send(result);
                        continue;
                    }
                    Input::EndAll { done } => {
                        machine.shutdown(now);
                        execute(&mut machine, &shell).await;
                        let _ = done.send(());
                        continue;
                    }
                }
            }
            _ = sleep => machine.handle_timeout(now_ms()),
        }
        execute(&mut machine, &shell).await;
    }
}

async fn execute(machine: &mut Machine, shell: &Shell) {
    metrics::gauge!("switchboard_calls_active").set(machine.active_calls() as f64);
    while let Some(cmd) = machine.poll_command() {
        match cmd {
            Command::Send { to, event } => {
                let push = event.push();
                for (user, conn) in to {
                    shell.node.send_to(&user, conn, push.clone()).await;
                }
            }
            Command::Ended(summary) => {
                observe(&summary);
                // Recorded off the actor's loop; the tracker makes shutdown wait for it.
                shell
                    .tracker
                    .spawn(record(shell.node.clone(), shell.store.clone(), summary));
            }
        }
    }
}

fn observe(s: &CallSummary) {
    metrics::counter!("switchboard_calls_total", "outcome" => s.reason.as_str()).increment(1);
    let ring_end = s.answered_at.unwrap_or(s.ended_at);
    metrics::histogram!("switchboard_call_ring_seconds")
        .record((ring_end - s.started_at) as f64 / 1000.0);
    if let Some(answered) = s.answered_at {
        metrics::histogram!("switchboard_call_duration_seconds")
            .record((s.ended_at - answered) as f64 / 1000.0);
    }
}

/// The text a call event shows in the chat, as messengers do.
pub fn describe(s: &CallSummary) -> String {
    let kind = match s.call_type {
        crate::wire::calls::CallType::Audio => "audio call",
        crate::wire::calls::CallType::Video => "video call",
    };
    match (s.answered_at, s.reason) {
        (Some(answered), _) => {
            let secs = ((s.ended_at - answered).max(0) + 500) / 1000;
            let mut text = format!("{}{}", kind[..1].to_uppercase(), &kind[1..]);
            text.push_str(&format!(", {}:{:02}", secs / 60, secs % 60));
            text
        }
        (None, EndReason::Rejected) => format!("Declined {kind}"),
        (None, EndReason::Cancelled) => format!("Cancelled {kind}"),
        (None, _) => format!("Missed {kind}"),
    }
}

async fn record(node: Arc<Node>, store: Arc<dyn Store>, s: CallSummary) {
    let duration_ms = s.answered_at.map(|a| (s.ended_at - a).max(0)).unwrap_or(0);
    let message = NewMessage {
        id: uuid::Uuid::now_v7().to_string(),
        chat_id: s.chat_id.clone(),
        sender_id: s.caller_id.clone(),
        content: describe(&s),
        client_msg_id: None,
        forwarded_from: None,
        call: Some(CallMeta {
            call_id: s.call_id.clone(),
            call_type: s.call_type.as_str().to_owned(),
            outcome: s.reason.as_str().to_owned(),
            duration_ms,
        }),
        created_at: s.ended_at,
    };
    let call = CallRecord {
        id: s.call_id.clone(),
        chat_id: s.chat_id.clone(),
        caller_id: s.caller_id.clone(),
        callee_id: s.callee_id.clone(),
        call_type: s.call_type.as_str().to_owned(),
        started_at: s.started_at,
        answered_at: s.answered_at,
        ended_at: s.ended_at,
        end_reason: s.reason.as_str().to_owned(),
    };
    match store.record_call(call, message).await {
        Ok(record) => match store.members(&record.chat_id).await {
            Ok(members) => {
                node.publish_message(&record, &members).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "call recorded; members lookup for its message failed")
            }
        },
        Err(e) => tracing::warn!(error = %e, call_id = %s.call_id, "could not record a call"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calls::machine::CallType;

    fn summary(answered: Option<i64>, ended: i64, reason: EndReason, t: CallType) -> CallSummary {
        CallSummary {
            call_id: "c".into(),
            chat_id: "x".into(),
            caller_id: "a".into(),
            callee_id: "b".into(),
            call_type: t,
            started_at: 0,
            answered_at: answered,
            ended_at: ended,
            reason,
        }
    }

    #[test]
    fn call_texts() {
        assert_eq!(
            describe(&summary(
                Some(1000),
                156_000,
                EndReason::Ended,
                CallType::Video
            )),
            "Video call, 2:35"
        );
        assert_eq!(
            describe(&summary(None, 30_000, EndReason::NoAnswer, CallType::Audio)),
            "Missed audio call"
        );
        assert_eq!(
            describe(&summary(None, 3_000, EndReason::Rejected, CallType::Audio)),
            "Declined audio call"
        );
        assert_eq!(
            describe(&summary(None, 3_000, EndReason::Cancelled, CallType::Video)),
            "Cancelled video call"
        );
        assert_eq!(
            describe(&summary(
                Some(0),
                400,
                EndReason::ConnectionLost,
                CallType::Audio
            )),
            "Audio call, 0:00"
        );
    }
}

//! The async shell of the call machine: one task owns the [`Machine`], feeds it connection
//! events and signals in arrival order, wakes it at [`Machine::poll_timeout`], and carries out
//! its commands: each event is serialised once and sent to its connections through the node
//! (control messages to whichever node holds each one); records go through the store, with the
//! call shown as a message in the chat history.
#![allow(clippy::disallowed_methods)] // a shell: reads the clock for the machine

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

pub use super::machine::Signal;
use super::machine::{CallErrorCode, CallSnapshot, CallSummary, Command, EndReason, Machine};
use crate::hub::cluster::Cluster;
use crate::hub::node::Node;
use crate::hub::{ConnId, NodeId};
use crate::store::{CallMeta, CallRecord, NewMessage, Store};
use crate::time::now_ms;

/// Inputs queued for the actor before callers wait.
const QUEUE: usize = 1024;
/// How long a signal forwarded to the calls leader waits for its reply.
const REMOTE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a node checks whether it became (or stopped being) the calls leader.
const LEADER_CHECK: Duration = Duration::from_millis(500);

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
    /// End every call with `reason` (the process is going away for good, or another node now
    /// runs the calls of the cluster).
    EndAll {
        reason: EndReason,
        done: oneshot::Sender<()>,
    },
    /// This node became the calls leader: take over the calls the previous one left open;
    /// `done` says whether they could be read.
    TakeOver {
        done: oneshot::Sender<bool>,
    },
    /// Another node runs the calls now (it took them over): forget ours.
    Forget,
    /// Check that every connection a call counts on still exists (a `Down` forwarded by
    /// another node may have been lost with Redis).
    Reconcile,
}

/// Handle to the calls actor.
#[derive(Clone)]
pub struct Calls {
    tx: mpsc::Sender<Input>,
    /// In a cluster: how inputs reach the node that runs the calls machine.
    route: Option<Arc<Route>>,
}

/// Calls across nodes (PROTOCOL §8): one node of the cluster, the leader in Redis, runs the
/// machine for everybody, so busy state, glare and ringing every device stay what one machine
/// decides. The others forward their connections' signals and connection events to it over the
/// broker (in order: one channel per node) and wait for the reply; pushes go from it straight to
/// the node that holds each connection.
struct Route {
    node: Arc<Node>,
    cluster: Arc<Cluster>,
    tx: mpsc::Sender<Input>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<String, CallErrorCode>>>>,
    next: AtomicU64,
}

/// A call control between nodes. Externally tagged: an internally tagged enum would buffer
/// its content, and an ICE candidate (kept as raw JSON) cannot be read back from a buffer.
#[derive(Serialize, Deserialize)]
enum Wire {
    Up {
        user: String,
        node: u64,
        conn: uuid::Uuid,
    },
    Down {
        user: String,
        node: u64,
        conn: uuid::Uuid,
    },
    Signal {
        req: u64,
        user: String,
        node: u64,
        conn: uuid::Uuid,
        signal: Signal,
    },
    Reply {
        req: u64,
        #[serde(default)]
        call_id: Option<String>,
        #[serde(default)]
        error: Option<String>,
    },
}

impl Route {
    /// The leader, when it is another node.
    fn remote_leader(&self) -> Option<NodeId> {
        self.cluster.leader().filter(|l| *l != self.node.id())
    }

    async fn send(&self, to: NodeId, w: &Wire) {
        let body = serde_json::to_string(w).expect("plain data serialises");
        self.node.send_call(to, body).await;
    }

    async fn signal(
        &self,
        leader: NodeId,
        user: &str,
        conn: ConnId,
        signal: Signal,
    ) -> Result<String, CallErrorCode> {
        let req = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(req, tx);
        let w = Wire::Signal {
            req,
            user: user.to_owned(),
            node: conn.node().0,
            conn: conn.uuid(),
            signal,
        };
        self.send(leader, &w).await;
        match tokio::time::timeout(REMOTE_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            _ => {
                self.pending.lock().expect("pending lock").remove(&req);
                tracing::warn!(leader = %leader, "the calls leader did not answer a signal");
                Err(CallErrorCode::NoSuchCall)
            }
        }
    }

    /// A call control from node `from`. Runs on the broker's delivery path: never waits.
    fn receive(self: &Arc<Self>, from: NodeId, body: &str) {
        let Ok(w) = serde_json::from_str::<Wire>(body) else {
            metrics::counter!("switchboard_broker_bad_messages_total").increment(1);
            return;
        };
        let full = |_| tracing::warn!("calls queue full; a forwarded call input was dropped");
        match w {
            Wire::Up { user, node, conn } => {
                let conn = ConnId::new(NodeId(node), conn);
                self.tx
                    .try_send(Input::Up { user, conn })
                    .unwrap_or_else(full);
            }
            Wire::Down { user, node, conn } => {
                let conn = ConnId::new(NodeId(node), conn);
                self.tx
                    .try_send(Input::Down { user, conn })
                    .unwrap_or_else(full);
            }
            Wire::Signal {
                req,
                user,
                node,
                conn,
                signal,
            } => {
                let (reply, rx) = oneshot::channel();
                let conn = ConnId::new(NodeId(node), conn);
                if !self.cluster.is_leader() {
                    // Sent to a node that no longer runs the calls: refused (a call started
                    // here now would be a ghost nobody else can reach).
                    let _ = reply.send(Err(CallErrorCode::NoSuchCall));
                } else {
                    let input = Input::Signal {
                        user,
                        conn,
                        signal,
                        reply,
                    };
                    if self.tx.try_send(input).is_err() {
                        tracing::warn!("calls queue full; a forwarded signal failed");
                    }
                }
                let me = self.clone();
                tokio::spawn(async move {
                    let result = rx.await.unwrap_or(Err(CallErrorCode::NoSuchCall));
                    let (call_id, error) = match result {
                        Ok(id) => (Some(id), None),
                        Err(code) => (None, Some(code.as_str().to_owned())),
                    };
                    me.send(
                        from,
                        &Wire::Reply {
                            req,
                            call_id,
                            error,
                        },
                    )
                    .await;
                });
            }
            Wire::Reply {
                req,
                call_id,
                error,
            } => {
                let result = match (call_id, error) {
                    (Some(id), None) => Ok(id),
                    (_, e) => Err(e
                        .as_deref()
                        .and_then(CallErrorCode::parse)
                        .unwrap_or(CallErrorCode::NoSuchCall)),
                };
                if let Some(tx) = self.pending.lock().expect("pending lock").remove(&req) {
                    let _ = tx.send(result);
                }
            }
        }
    }

    /// Watches the leader lease: a node that becomes the leader takes over what its
    /// predecessor left open (retrying until it could read it); one that stops being it forgets
    /// its calls (the new leader took them over). The leader reconciles its calls' connections
    /// every heartbeat.
    async fn watch_leader(self: Arc<Self>) {
        let mut was_leader = false;
        let mut check = tokio::time::interval(LEADER_CHECK);
        let mut last_reconcile = tokio::time::Instant::now();
        loop {
            check.tick().await;
            if self.tx.is_closed() {
                return;
            }
            let leader = self.cluster.is_leader();
            if leader && !was_leader {
                let (done, taken) = oneshot::channel();
                if self.tx.send(Input::TakeOver { done }).await.is_err() {
                    return;
                }
                if taken.await != Ok(true) {
                    continue; // not yet: again at the next check
                }
                tracing::info!("this node now runs the calls of the cluster");
            } else if !leader && was_leader {
                tracing::warn!("this node no longer runs the calls of the cluster");
                let _ = self.tx.send(Input::Forget).await;
            } else if leader && last_reconcile.elapsed() >= crate::hub::cluster::TICK {
                last_reconcile = tokio::time::Instant::now();
                let _ = self.tx.send(Input::Reconcile).await;
            }
            was_leader = leader;
        }
    }
}

impl Calls {
    /// Starts the actor. It runs until every handle is dropped. In a cluster (the node has
    /// one) it takes call controls from other nodes and follows the leader lease.
    pub fn spawn(
        node: Arc<Node>,
        store: Arc<dyn Store>,
        ring_timeout: Duration,
        grace: Duration,
        tracker: TaskTracker,
    ) -> (Calls, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let machine = Machine::new(ring_timeout.as_millis() as i64, grace.as_millis() as i64);
        let route = node.cluster().cloned().map(|cluster| {
            Arc::new(Route {
                node: node.clone(),
                cluster,
                tx: tx.clone(),
                pending: Mutex::new(HashMap::new()),
                next: AtomicU64::new(1),
            })
        });
        if let Some(route) = &route {
            let weak = Arc::downgrade(route);
            node.hub().set_call_handler(Arc::new(move |from, body| {
                if let Some(route) = weak.upgrade() {
                    route.receive(from, &body);
                }
            }));
            tokio::spawn(route.clone().watch_leader());
        }
        let calls = Calls { tx, route };
        // Connections of nodes that died: gone, as if they had closed.
        if let Some(mut lost) = node.take_lost() {
            let calls = calls.clone();
            tokio::spawn(async move {
                loop {
                    // Ends with the actor (the node holds the other end of `lost`).
                    let (user, conn) = tokio::select! {
                        _ = calls.tx.closed() => return,
                        l = lost.recv() => match l {
                            Some(l) => l,
                            None => return,
                        },
                    };
                    calls.connection_down(&user, conn).await;
                }
            });
        }
        let shell = Shell {
            cluster: node.cluster().cloned(),
            node,
            store,
            tracker,
            saved: HashMap::new(),
            suspects: std::collections::HashSet::new(),
        };
        let task = tokio::spawn(run(machine, rx, shell));
        (calls, task)
    }

    fn remote_leader(&self) -> Option<(&Arc<Route>, NodeId)> {
        let route = self.route.as_ref()?;
        route.remote_leader().map(|l| (route, l))
    }

    pub async fn connection_up(&self, user: &str, conn: ConnId) {
        if let Some((route, leader)) = self.remote_leader() {
            let w = Wire::Up {
                user: user.to_owned(),
                node: conn.node().0,
                conn: conn.uuid(),
            };
            return route.send(leader, &w).await;
        }
        let _ = self
            .tx
            .send(Input::Up {
                user: user.to_owned(),
                conn,
            })
            .await;
    }

    pub async fn connection_down(&self, user: &str, conn: ConnId) {
        if let Some((route, leader)) = self.remote_leader() {
            let w = Wire::Down {
                user: user.to_owned(),
                node: conn.node().0,
                conn: conn.uuid(),
            };
            return route.send(leader, &w).await;
        }
        let _ = self
            .tx
            .send(Input::Down {
                user: user.to_owned(),
                conn,
            })
            .await;
    }

    /// Feeds a signal (to the calls leader of the cluster, wherever it runs); the call id on
    /// success.
    pub async fn signal(
        &self,
        user: &str,
        conn: ConnId,
        signal: Signal,
    ) -> Result<String, CallErrorCode> {
        if let Some((route, leader)) = self.remote_leader() {
            return route.signal(leader, user, conn, signal).await;
        }
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

    /// Ends every call this node runs with `server_shutdown` and waits until the pushes are
    /// queued.
    pub async fn end_all(&self) {
        let (done, rx) = oneshot::channel();
        let reason = EndReason::ServerShutdown;
        if self.tx.send(Input::EndAll { reason, done }).await.is_ok() {
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
    cluster: Option<Arc<Cluster>>,
    /// The calls as last kept in Redis (clusters only).
    saved: HashMap<String, CallSnapshot>,
    /// Connections found missing once by a reconcile (gone if missing again).
    suspects: std::collections::HashSet<ConnId>,
}

impl Shell {
    /// Keeps the calls in Redis in step with the machine (clusters only): what changed is
    /// written, what ended is removed, so a successor takes over exactly these.
    async fn save(&mut self, machine: &Machine) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        let now = machine.snapshots();
        for (id, snap) in &now {
            if self.saved.get(id) == Some(snap) {
                continue;
            }
            let json = serde_json::to_string(snap).expect("plain data serialises");
            match cluster.save_call(id, &json).await {
                Ok(()) => {
                    self.saved.insert(id.clone(), snap.clone());
                }
                Err(e) => tracing::warn!(error = %e, "could not keep a call in Redis"),
            }
        }
        let ended: Vec<String> = self
            .saved
            .keys()
            .filter(|id| !now.contains_key(*id))
            .cloned()
            .collect();
        for id in ended {
            if let Err(e) = cluster.drop_call(&id).await {
                tracing::warn!(error = %e, "could not drop an ended call from Redis");
            }
            self.saved.remove(&id);
        }
    }

    /// This node became the calls leader: takes over the calls its predecessor left in
    /// Redis, deadlines and all. False when they could not be read.
    async fn take_over(&mut self, machine: &mut Machine) -> bool {
        let Some(cluster) = self.cluster.clone() else {
            return true;
        };
        let left = match cluster.take_calls().await {
            Ok(left) => left,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the calls left open; retrying");
                return false;
            }
        };
        let now = now_ms();
        for json in left {
            match serde_json::from_str::<CallSnapshot>(&json) {
                Ok(snap) => {
                    tracing::info!(call_id = snap.call_id(), "took over a call");
                    machine.restore(snap, now);
                }
                Err(e) => tracing::warn!(error = %e, "unreadable call state in Redis; dropped"),
            }
        }
        // Written back by the next save; parties on a node that died with the old leader are
        // found by the next reconcile.
        self.saved.clear();
        true
    }

    /// Feeds `Down` for every connection a call counts on that is gone: not on this node's
    /// hub (local ones) or not in Redis (other nodes'), twice in a row (a connection may be
    /// registered a moment after it joined a call).
    async fn reconcile(&mut self, machine: &mut Machine) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        let live = machine.live_connections();
        let me = self.node.id();
        let remote: Vec<(String, ConnId)> = live
            .iter()
            .filter(|(_, c)| c.node() != me)
            .cloned()
            .collect();
        let Ok(exists) = cluster.conns_exist(&remote).await else {
            return; // Redis away: nothing can be concluded
        };
        let mut missing: Vec<(String, ConnId)> = live
            .iter()
            .filter(|(u, c)| c.node() == me && !self.node.hub().has_connection(u, *c))
            .cloned()
            .collect();
        missing.extend(
            remote
                .into_iter()
                .zip(exists)
                .filter(|(_, e)| !e)
                .map(|(uc, _)| uc),
        );
        let now = now_ms();
        let mut suspects = std::collections::HashSet::new();
        for (user, conn) in missing {
            if self.suspects.contains(&conn) {
                tracing::info!(%conn, "a call's connection is gone; as if it closed");
                machine.connection_down(&user, conn, now);
            } else {
                suspects.insert(conn);
            }
        }
        self.suspects = suspects;
    }
}

async fn run(mut machine: Machine, mut rx: mpsc::Receiver<Input>, mut shell: Shell) {
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
                            req.callee_devices = shell.node.connections_of(&req.callee_id).await;
                        }
                        let result = machine.signal(&user, conn, signal, now);
                        // Commands first, so the pushes are queued before the reply is written.
                        execute(&mut machine, &mut shell).await;
                        let _ = reply.send(result);
                        shell.save(&machine).await;
                        continue;
                    }
                    Input::EndAll { reason, done } => {
                        machine.end_all(now, reason);
                        execute(&mut machine, &mut shell).await;
                        let _ = done.send(());
                        continue;
                    }
                    Input::TakeOver { done } => {
                        let taken = shell.take_over(&mut machine).await;
                        let _ = done.send(taken);
                    }
                    Input::Forget => {
                        machine.forget_all();
                        shell.saved.clear();
                    }
                    Input::Reconcile => shell.reconcile(&mut machine).await,
                }
            }
            _ = sleep => machine.handle_timeout(now_ms()),
        }
        execute(&mut machine, &mut shell).await;
        shell.save(&machine).await;
    }
}

async fn execute(machine: &mut Machine, shell: &mut Shell) {
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

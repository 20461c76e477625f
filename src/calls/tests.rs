//! Scenario tests for the call machine: one input at an explicit instant, the exact commands
//! expected, then nothing left. Events are compared as the JSON they put on the wire.

use std::collections::{BTreeSet, HashMap};
use std::ops::{Deref, DerefMut};

use serde_json::{json, Value};

use super::machine::*;
use crate::hub::NodeId;

const RING: i64 = 30_000;
const GRACE: i64 = 15_000;

/// The machine and, standing in for the hub's registry, who is connected: what the actor reads
/// when it fills in the callee's devices.
struct World {
    m: Machine,
    online: HashMap<String, BTreeSet<ConnId>>,
}

impl Deref for World {
    type Target = Machine;
    fn deref(&self) -> &Machine {
        &self.m
    }
}

impl DerefMut for World {
    fn deref_mut(&mut self) -> &mut Machine {
        &mut self.m
    }
}

impl World {
    fn connection_up(&mut self, user: &str, conn: ConnId, now: i64) {
        self.online.entry(user.into()).or_default().insert(conn);
        self.m.connection_up(user, conn, now);
    }

    fn connection_down(&mut self, user: &str, conn: ConnId, now: i64) {
        if let Some(set) = self.online.get_mut(user) {
            set.remove(&conn);
        }
        self.m.connection_down(user, conn, now);
    }

    fn initiate(
        &mut self,
        caller: &str,
        conn: ConnId,
        mut req: Initiate,
        now: i64,
    ) -> Result<String, CallErrorCode> {
        req.callee_devices = self
            .online
            .get(&req.callee_id)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        self.m.initiate(caller, conn, req, now)
    }
}

fn machine() -> World {
    World {
        m: Machine::new(RING, GRACE),
        online: HashMap::new(),
    }
}

/// One command, with each event as the JSON data it puts on the wire (one per target).
#[derive(Debug, PartialEq)]
enum Out {
    Send(String, ConnId, &'static str, Value),
    Ended(CallSummary),
}

fn drain(m: &mut Machine) -> Vec<Out> {
    let mut out = Vec::new();
    while let Some(cmd) = m.poll_command() {
        match cmd {
            Command::Send { to, event } => {
                let data: Value = serde_json::from_str(event.push().data_json()).unwrap();
                for (user, conn) in to {
                    out.push(Out::Send(user, conn, event.name(), data.clone()));
                }
            }
            Command::Ended(s) => out.push(Out::Ended(s)),
        }
    }
    out
}

/// Connection `n` (real ones are UUIDv7s; any distinct ids do here).
fn conn(n: u128) -> ConnId {
    ConnId::new(NodeId(1), uuid::Uuid::from_u128(n))
}

fn send(user: &str, conn: ConnId, event: &'static str, data: Value) -> Out {
    Out::Send(user.into(), conn, event, data)
}

fn sdp(kind: &str, text: &str) -> Sdp {
    Sdp {
        kind: kind.into(),
        sdp: text.into(),
    }
}

/// A candidate as a client would send it (here: a JSON string).
fn cand(text: &str) -> Candidate {
    Candidate::from(serde_json::to_string(text).unwrap().as_str())
}

fn offer() -> Sdp {
    sdp("offer", "v=0 offer")
}

fn offer_push(call: &str) -> Value {
    json!({"chatId": "chat-ab", "callId": call, "callerId": "a", "callType": "video", "offer": offer()})
}

fn ids(call: &str) -> Value {
    json!({"chatId": "chat-ab", "callId": call})
}

fn end(call: &str, reason: &str) -> Value {
    json!({"chatId": "chat-ab", "callId": call, "reason": reason})
}

fn summary(call: &str, started: i64, answered: Option<i64>, ended: i64, reason: EndReason) -> Out {
    Out::Ended(CallSummary {
        call_id: call.into(),
        chat_id: "chat-ab".into(),
        caller_id: "a".into(),
        callee_id: "b".into(),
        call_type: CallType::Video,
        started_at: started,
        answered_at: answered,
        ended_at: ended,
        reason,
    })
}

fn initiate(call: &str, callee: &str) -> Initiate {
    Initiate {
        call_id: call.into(),
        chat_id: "chat-ab".into(),
        callee_id: callee.into(),
        call_type: CallType::Video,
        offer: offer(),
        callee_devices: Vec::new(),
    }
}

/// A (conn 1) online, B online on conns 2 and 3, C on conn 7; A calls B at t=0.
fn ringing() -> World {
    let mut m = machine();
    m.connection_up("a", conn(1), 0);
    m.connection_up("b", conn(2), 0);
    m.connection_up("b", conn(3), 0);
    m.connection_up("c", conn(7), 0);
    assert!(drain(&mut m).is_empty());
    assert_eq!(
        m.initiate("a", conn(1), initiate("k1", "b"), 0),
        Ok("k1".into())
    );
    assert_eq!(
        drain(&mut m),
        vec![
            send("b", conn(2), "call:offer", offer_push("k1")),
            send("b", conn(3), "call:offer", offer_push("k1"))
        ]
    );
    m
}

/// `ringing()`, then B answers on conn 2 at t=1000.
fn active() -> World {
    let mut m = ringing();
    let answer = sdp("answer", "v=0 answer");
    assert_eq!(
        m.answer("b", conn(2), "chat-ab", answer.clone(), 1000),
        Ok("k1".into())
    );
    assert_eq!(
        drain(&mut m),
        vec![
            send(
                "a",
                conn(1),
                "call:answer",
                json!({"chatId": "chat-ab", "callId": "k1", "answer": answer})
            ),
            send("b", conn(3), "call:end", end("k1", "answered_elsewhere")),
        ]
    );
    m
}

#[test]
fn successful_call_relays_candidates_and_ends() {
    let mut m = ringing();
    // While ringing, the caller's candidates go to every ringing device.
    assert_eq!(
        m.ice_candidate("a", conn(1), "chat-ab", cand("cand-a1")),
        Ok("k1".into())
    );
    let c = json!({"chatId": "chat-ab", "callId": "k1", "candidate": "cand-a1", "from": "a"});
    assert_eq!(
        drain(&mut m),
        vec![
            send("b", conn(2), "call:ice-candidate", c.clone()),
            send("b", conn(3), "call:ice-candidate", c)
        ]
    );
    // A ringing device may send its own candidates to the caller.
    assert_eq!(
        m.ice_candidate("b", conn(3), "chat-ab", cand("cand-b3")),
        Ok("k1".into())
    );
    assert_eq!(
        drain(&mut m),
        vec![send(
            "a",
            conn(1),
            "call:ice-candidate",
            json!({"chatId": "chat-ab", "callId": "k1", "candidate": "cand-b3", "from": "b"})
        )]
    );
    let answer = sdp("answer", "v=0 answer");
    m.answer("b", conn(2), "chat-ab", answer.clone(), 1000)
        .unwrap();
    assert_eq!(
        drain(&mut m),
        vec![
            send(
                "a",
                conn(1),
                "call:answer",
                json!({"chatId": "chat-ab", "callId": "k1", "answer": answer})
            ),
            send("b", conn(3), "call:end", end("k1", "answered_elsewhere")),
        ]
    );
    // Then only the answering device gets the caller's candidates.
    m.ice_candidate("a", conn(1), "chat-ab", cand("cand-a2"))
        .unwrap();
    assert_eq!(
        drain(&mut m),
        vec![send(
            "b",
            conn(2),
            "call:ice-candidate",
            json!({"chatId": "chat-ab", "callId": "k1", "candidate": "cand-a2", "from": "a"})
        )]
    );
    // The other device is out of the call now.
    assert_eq!(
        m.ice_candidate("b", conn(3), "chat-ab", cand("x")),
        Err(CallErrorCode::NoSuchCall)
    );
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.poll_timeout(), None, "no ring timer once answered");
    assert_eq!(m.end("b", conn(2), "chat-ab", 61_000), Ok("k1".into()));
    assert_eq!(
        drain(&mut m),
        vec![
            send("a", conn(1), "call:end", end("k1", "ended")),
            summary("k1", 0, Some(1000), 61_000, EndReason::Ended)
        ]
    );
    assert!(!m.is_engaged("a") && !m.is_engaged("b"));
    assert_eq!(m.active_calls(), 0);
}

#[test]
fn initiate_checks_in_order() {
    let mut m = ringing();
    // The caller is engaged.
    assert_eq!(
        m.initiate("a", conn(1), initiate("k2", "c"), 5),
        Err(CallErrorCode::CallerBusy)
    );
    // The callee has no live connection.
    m.connection_up("d", conn(8), 5);
    assert_eq!(
        m.initiate("d", conn(8), initiate("k3", "e"), 5),
        Err(CallErrorCode::Offline)
    );
    // The callee is engaged (ringing counts).
    assert_eq!(
        m.initiate("c", conn(7), initiate("k4", "b"), 5),
        Err(CallErrorCode::Busy)
    );
    assert_eq!(
        m.initiate("c", conn(7), initiate("k5", "a"), 5),
        Err(CallErrorCode::Busy)
    );
    // Offline wins over busy: both are about the callee, offline is checked first.
    m.connection_down("b", conn(2), 6);
    m.connection_down("b", conn(3), 6);
    assert_eq!(
        m.initiate("c", conn(7), initiate("k6", "b"), 7),
        Err(CallErrorCode::Offline)
    );
    assert!(drain(&mut m).is_empty(), "failed initiates change nothing");
}

#[test]
fn glare_keeps_the_first_call_and_the_second_caller_hears_busy() {
    let mut m = ringing();
    // B calls A in the same chat while A's call rings B.
    assert_eq!(
        m.initiate(
            "b",
            conn(2),
            Initiate {
                callee_id: "a".into(),
                ..initiate("k9", "a")
            },
            10
        ),
        Err(CallErrorCode::Busy)
    );
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.active_calls(), 1);
    // A's call is intact: B can answer it.
    assert_eq!(
        m.answer("b", conn(2), "chat-ab", sdp("answer", ""), 20),
        Ok("k1".into())
    );
}

#[test]
fn reject_tells_the_caller_and_the_other_devices() {
    let mut m = ringing();
    assert_eq!(m.reject("b", conn(3), "chat-ab", 4000), Ok("k1".into()));
    assert_eq!(
        drain(&mut m),
        vec![
            send("a", conn(1), "call:rejected", ids("k1")),
            send("b", conn(2), "call:end", end("k1", "rejected")),
            summary("k1", 0, None, 4000, EndReason::Rejected),
        ]
    );
    assert!(!m.is_engaged("a") && !m.is_engaged("b"));
}

#[test]
fn caller_cancels_while_ringing() {
    let mut m = ringing();
    assert_eq!(m.end("a", conn(1), "chat-ab", 3000), Ok("k1".into()));
    assert_eq!(
        drain(&mut m),
        vec![
            send("b", conn(2), "call:end", end("k1", "cancelled")),
            send("b", conn(3), "call:end", end("k1", "cancelled")),
            summary("k1", 0, None, 3000, EndReason::Cancelled),
        ]
    );
}

#[test]
fn callee_end_while_ringing_is_a_reject() {
    let mut m = ringing();
    assert_eq!(m.end("b", conn(2), "chat-ab", 3000), Ok("k1".into()));
    assert_eq!(
        drain(&mut m),
        vec![
            send("a", conn(1), "call:rejected", ids("k1")),
            send("b", conn(3), "call:end", end("k1", "rejected")),
            summary("k1", 0, None, 3000, EndReason::Rejected),
        ]
    );
}

#[test]
fn ring_timeout_at_its_exact_deadline() {
    let mut m = ringing();
    assert_eq!(m.poll_timeout(), Some(RING));
    m.handle_timeout(RING - 1);
    assert!(drain(&mut m).is_empty());
    m.handle_timeout(RING);
    assert_eq!(
        drain(&mut m),
        vec![
            send("b", conn(2), "call:end", end("k1", "no_answer")),
            send("b", conn(3), "call:end", end("k1", "no_answer")),
            send("a", conn(1), "call:no-answer", ids("k1")),
            summary("k1", 0, None, RING, EndReason::NoAnswer),
        ]
    );
    assert_eq!(m.poll_timeout(), None);
    assert!(!m.is_engaged("b"));
}

#[test]
fn callee_drop_and_resume_within_grace_keeps_the_call() {
    let mut m = active();
    m.connection_down("b", conn(2), 5000);
    assert_eq!(
        drain(&mut m),
        vec![send("a", conn(1), "call:peer-reconnecting", ids("k1"))]
    );
    assert_eq!(m.poll_timeout(), Some(5000 + GRACE));
    m.connection_up("b", conn(4), 9000);
    assert!(
        drain(&mut m).is_empty(),
        "an active call does not ring the new connection"
    );
    assert_eq!(
        m.resume("b", conn(4), "chat-ab", "wrong-id"),
        Err(CallErrorCode::NoSuchCall)
    );
    assert_eq!(m.resume("b", conn(4), "chat-ab", "k1"), Ok("k1".into()));
    assert_eq!(
        drain(&mut m),
        vec![send("a", conn(1), "call:peer-resumed", ids("k1"))]
    );
    assert_eq!(m.poll_timeout(), None);
    m.handle_timeout(5000 + GRACE);
    assert!(drain(&mut m).is_empty());
    // Candidates now reach the new connection.
    m.ice_candidate("a", conn(1), "chat-ab", cand("c")).unwrap();
    assert_eq!(
        drain(&mut m),
        vec![send(
            "b",
            conn(4),
            "call:ice-candidate",
            json!({"chatId": "chat-ab", "callId": "k1", "candidate": "c", "from": "a"})
        )]
    );
}

#[test]
fn drop_without_return_is_connection_lost_at_the_grace_deadline() {
    let mut m = active();
    m.connection_down("a", conn(1), 5000);
    assert_eq!(
        drain(&mut m),
        vec![send("b", conn(2), "call:peer-reconnecting", ids("k1"))]
    );
    m.handle_timeout(5000 + GRACE - 1);
    assert!(drain(&mut m).is_empty());
    m.handle_timeout(5000 + GRACE);
    assert_eq!(
        drain(&mut m),
        vec![
            send("b", conn(2), "call:end", end("k1", "connection_lost")),
            summary("k1", 0, Some(1000), 5000 + GRACE, EndReason::ConnectionLost),
        ]
    );
    // Resuming after that is a stale event.
    m.connection_up("a", conn(5), 30_000);
    assert_eq!(
        m.resume("a", conn(5), "chat-ab", "k1"),
        Err(CallErrorCode::NoSuchCall)
    );
}

#[test]
fn zero_grace_ends_at_once() {
    let mut m = World {
        m: Machine::new(RING, 0),
        online: HashMap::new(),
    };
    m.connection_up("a", conn(1), 0);
    m.connection_up("b", conn(2), 0);
    m.initiate("a", conn(1), initiate("k1", "b"), 0).unwrap();
    m.answer("b", conn(2), "chat-ab", sdp("answer", ""), 10)
        .unwrap();
    drain(&mut m);
    m.connection_down("b", conn(2), 20);
    assert_eq!(
        drain(&mut m),
        vec![
            send("a", conn(1), "call:peer-reconnecting", ids("k1")),
            send("a", conn(1), "call:end", end("k1", "connection_lost")),
            summary("k1", 0, Some(10), 20, EndReason::ConnectionLost),
        ]
    );
}

#[test]
fn ringing_devices_that_all_drop_mean_offline_after_the_grace() {
    let mut m = ringing();
    m.connection_down("b", conn(2), 1000);
    assert!(
        drain(&mut m).is_empty(),
        "a ringing device that drops just stops ringing"
    );
    m.connection_down("b", conn(3), 2000);
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.poll_timeout(), Some(2000 + GRACE));
    m.handle_timeout(2000 + GRACE);
    assert_eq!(
        drain(&mut m),
        vec![
            send(
                "a",
                conn(1),
                "call:error",
                json!({"chatId": "chat-ab", "code": "offline", "message": "the user is offline"})
            ),
            summary("k1", 0, None, 2000 + GRACE, EndReason::Offline),
        ]
    );
}

#[test]
fn a_callee_that_reconnects_while_called_rings_again() {
    let mut m = ringing();
    m.connection_down("b", conn(2), 1000);
    m.connection_down("b", conn(3), 1000);
    m.connection_up("b", conn(4), 3000);
    assert_eq!(
        drain(&mut m),
        vec![send("b", conn(4), "call:offer", offer_push("k1"))]
    );
    assert_eq!(m.poll_timeout(), Some(RING), "only the ring timer is left");
    assert_eq!(
        m.answer("b", conn(4), "chat-ab", sdp("answer", ""), 4000),
        Ok("k1".into())
    );
}

#[test]
fn caller_drop_while_ringing() {
    let mut m = ringing();
    m.connection_down("a", conn(1), 1000);
    assert_eq!(
        drain(&mut m),
        vec![
            send("b", conn(2), "call:peer-reconnecting", ids("k1")),
            send("b", conn(3), "call:peer-reconnecting", ids("k1"))
        ]
    );
    m.handle_timeout(1000 + GRACE);
    assert_eq!(
        drain(&mut m),
        vec![
            send("b", conn(2), "call:end", end("k1", "connection_lost")),
            send("b", conn(3), "call:end", end("k1", "connection_lost")),
            summary("k1", 0, None, 1000 + GRACE, EndReason::ConnectionLost),
        ]
    );
}

#[test]
fn caller_resumes_while_ringing() {
    let mut m = ringing();
    m.connection_down("a", conn(1), 1000);
    drain(&mut m);
    m.connection_up("a", conn(9), 2000);
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.resume("a", conn(9), "chat-ab", "k1"), Ok("k1".into()));
    assert_eq!(
        drain(&mut m),
        vec![
            send("b", conn(2), "call:peer-resumed", ids("k1")),
            send("b", conn(3), "call:peer-resumed", ids("k1"))
        ]
    );
    m.answer("b", conn(3), "chat-ab", sdp("answer", ""), 3000)
        .unwrap();
    assert_eq!(
        drain(&mut m)[0],
        send(
            "a",
            conn(9),
            "call:answer",
            json!({"chatId": "chat-ab", "callId": "k1", "answer": {"type": "answer", "sdp": ""}})
        )
    );
}

#[test]
fn stale_events_are_no_such_call_and_change_nothing() {
    let mut m = active();
    let before = m.poll_timeout();
    assert_eq!(
        m.answer("c", conn(7), "chat-ab", sdp("answer", ""), 10),
        Err(CallErrorCode::NoSuchCall)
    );
    assert_eq!(
        m.answer("b", conn(2), "chat-ab", sdp("answer", ""), 10),
        Err(CallErrorCode::NoSuchCall),
        "already answered"
    );
    assert_eq!(
        m.reject("b", conn(2), "chat-ab", 10),
        Err(CallErrorCode::NoSuchCall),
        "cannot reject an active call"
    );
    assert_eq!(
        m.end("a", conn(1), "other-chat", 10),
        Err(CallErrorCode::NoSuchCall)
    );
    assert_eq!(
        m.end("c", conn(7), "chat-ab", 10),
        Err(CallErrorCode::NoSuchCall)
    );
    assert_eq!(
        m.ice_candidate("c", conn(7), "chat-ab", cand("x")),
        Err(CallErrorCode::NoSuchCall)
    );
    assert_eq!(
        m.resume("a", conn(1), "chat-ab", "k1"),
        Ok("k1".into()),
        "resuming on the same connection is a no-op"
    );
    m.connection_up("a", conn(5), 10);
    assert_eq!(
        m.resume("a", conn(5), "chat-ab", "k1"),
        Err(CallErrorCode::NoSuchCall),
        "the call lives on conn 1"
    );
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.poll_timeout(), before);
    assert_eq!(m.active_calls(), 1);
}

#[test]
fn after_a_call_both_are_free_again() {
    let mut m = active();
    m.end("a", conn(1), "chat-ab", 2000).unwrap();
    drain(&mut m);
    assert_eq!(
        m.initiate(
            "b",
            conn(2),
            Initiate {
                callee_id: "a".into(),
                ..initiate("k2", "a")
            },
            3000
        ),
        Ok("k2".into())
    );
    assert_eq!(drain(&mut m).len(), 1, "rings A's one connection");
}

#[test]
fn shutdown_ends_every_call() {
    let mut m = active();
    m.shutdown(9000);
    assert_eq!(
        drain(&mut m),
        vec![
            send("a", conn(1), "call:end", end("k1", "server_shutdown")),
            send("b", conn(2), "call:end", end("k1", "server_shutdown")),
            summary("k1", 0, Some(1000), 9000, EndReason::ServerShutdown),
        ]
    );
}

#[test]
fn renegotiation_goes_to_the_other_party_only_while_active() {
    let mut m = ringing();
    assert_eq!(
        m.renegotiate("a", conn(1), "chat-ab", sdp("offer", "")),
        Err(CallErrorCode::NoSuchCall)
    );
    assert!(drain(&mut m).is_empty());
    let mut m = active();
    let offer = sdp("offer", "v=0 restart");
    assert_eq!(
        m.renegotiate("a", conn(1), "chat-ab", offer.clone()),
        Ok("k1".into())
    );
    assert_eq!(
        drain(&mut m),
        vec![send(
            "b",
            conn(2),
            "call:renegotiate",
            json!({"chatId": "chat-ab", "callId": "k1", "description": offer, "from": "a"})
        )]
    );
    let answer = sdp("answer", "v=0 restarted");
    assert_eq!(
        m.renegotiate("b", conn(2), "chat-ab", answer.clone()),
        Ok("k1".into())
    );
    assert_eq!(
        drain(&mut m),
        vec![send(
            "a",
            conn(1),
            "call:renegotiate",
            json!({"chatId": "chat-ab", "callId": "k1", "description": answer, "from": "b"})
        )]
    );
    assert_eq!(
        m.renegotiate("b", conn(3), "chat-ab", sdp("answer", "")),
        Err(CallErrorCode::NoSuchCall),
        "not the device in the call"
    );
    assert!(drain(&mut m).is_empty());
}

/// A machine takes over an answered call from another (a cluster's new calls leader): through
/// JSON, deadlines and parties kept; the party whose connection died gets the reconnect grace,
/// the other goes on talking; a call whose user is busy here ends at once.
#[test]
fn a_call_taken_over_by_another_machine_goes_on() {
    let m = active();
    let snaps = m.snapshots();
    let json = serde_json::to_string(&snaps["k1"]).unwrap();
    let mut n = machine();
    n.restore(serde_json::from_str(&json).unwrap(), 2000);
    assert!(drain(&mut n).is_empty());
    assert!(n.has_call("k1") && n.is_engaged("a") && n.is_engaged("b"));
    assert_eq!(
        n.live_connections().into_iter().collect::<BTreeSet<_>>(),
        [("a".to_owned(), conn(1)), ("b".to_owned(), conn(2))]
            .into_iter()
            .collect()
    );
    // B's connection died with the old machine's node.
    n.connection_down("b", conn(2), 3000);
    assert_eq!(
        drain(&mut n),
        vec![send("a", conn(1), "call:peer-reconnecting", ids("k1"))]
    );
    assert_eq!(n.poll_timeout(), Some(3000 + GRACE));
    n.handle_timeout(3000 + GRACE);
    assert_eq!(
        drain(&mut n),
        vec![
            send("a", conn(1), "call:end", end("k1", "connection_lost")),
            summary("k1", 0, Some(1000), 3000 + GRACE, EndReason::ConnectionLost),
        ]
    );

    // Taking the same call twice changes nothing; one whose user is busy here ends.
    let mut busy = machine();
    busy.connection_up("b", conn(9), 0);
    busy.connection_up("c", conn(7), 0);
    let mut req = initiate("k2", "b");
    req.chat_id = "chat-cb".into();
    assert_eq!(busy.initiate("c", conn(7), req, 0), Ok("k2".into()));
    drain(&mut busy);
    busy.restore(snaps["k1"].clone(), 5000);
    assert_eq!(
        drain(&mut busy),
        vec![
            send("a", conn(1), "call:end", end("k1", "connection_lost")),
            send("b", conn(2), "call:end", end("k1", "connection_lost")),
            summary("k1", 0, Some(1000), 5000, EndReason::ConnectionLost),
        ]
    );
    assert!(busy.has_call("k2") && !busy.has_call("k1"));
    busy.forget_all();
    assert!(!busy.is_engaged("b") && busy.active_calls() == 0);
}

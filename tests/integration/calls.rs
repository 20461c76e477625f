//! Call signaling end to end over real WebSockets (PROTOCOL §2.2): three users, a callee with
//! two devices.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

fn offer() -> Value {
    json!({"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n"})
}

fn answer() -> Value {
    json!({"type": "answer", "sdp": "v=0\r\no=- 2 2 IN IP4 127.0.0.1\r\n"})
}

struct World {
    s: TestServer,
    a: TestUser,
    b: TestUser,
    c: TestUser,
    chat_ab: String,
    chat_cb: String,
}

async fn world(f: impl FnOnce(&mut switchboard::config::Config)) -> World {
    let s = TestServer::start_with(f).await;
    let a = s.register("alice").await;
    let b = s.register("bob").await;
    let c = s.register("carol").await;
    let chat_ab = s.direct_chat(&a, &b).await;
    let chat_cb = s.direct_chat(&c, &b).await;
    World {
        s,
        a,
        b,
        c,
        chat_ab,
        chat_cb,
    }
}

/// A calls B; both of B's devices ring. Returns the call id.
async fn ring(wa: &mut Ws, b1: &mut Ws, b2: &mut Ws, chat: &str, caller: &str) -> String {
    let r = wa
        .ok(
            "call:initiate",
            json!({"chatId": chat, "offer": offer(), "callType": "video"}),
        )
        .await;
    let call_id = r["callId"].as_str().unwrap().to_owned();
    for b in [b1, b2] {
        let o = b.event("call:offer").await;
        assert_eq!(
            o,
            json!({"chatId": chat, "callId": call_id, "callerId": caller, "callType": "video", "offer": offer()})
        );
    }
    call_id
}

/// The call event message the chat shows afterwards.
async fn last_message(s: &TestServer, token: &str, chat: &str) -> Value {
    for _ in 0..100 {
        let (_, page) = s
            .get(&format!("/api/chats/{chat}/messages?limit=1"), token)
            .await;
        if let Some(m) = page["messages"].as_array().and_then(|m| m.first()) {
            if m["kind"] == "call" {
                return m.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no call message in {chat}");
}

#[tokio::test]
async fn answered_call_relays_sdp_and_candidates_and_is_recorded() {
    let w = world(|_| {}).await;
    let mut wa = w.s.ws(&w.a).await;
    let mut b1 = w.s.ws(&w.b).await;
    let mut b2 = w.s.ws(&w.b).await;
    let call = ring(&mut wa, &mut b1, &mut b2, &w.chat_ab, &w.a.id).await;

    // Caller candidates reach every ringing device.
    wa.ok("call:ice-candidate", json!({"chatId": w.chat_ab, "candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 5000 typ host", "sdpMid": "0"}})).await;
    for b in [&mut b1, &mut b2] {
        let c = b.event("call:ice-candidate").await;
        assert_eq!(c["from"], w.a.id.as_str());
        assert_eq!(c["callId"], call.as_str());
        assert_eq!(c["candidate"]["sdpMid"], "0");
    }
    // B answers on device 2: A gets the answer, device 1 stops ringing.
    let r = b2
        .ok(
            "call:answer",
            json!({"chatId": w.chat_ab, "answer": answer()}),
        )
        .await;
    assert_eq!(r["callId"], call.as_str());
    assert_eq!(
        wa.event("call:answer").await,
        json!({"chatId": w.chat_ab, "callId": call, "answer": answer()})
    );
    assert_eq!(
        b1.event("call:end").await,
        json!({"chatId": w.chat_ab, "callId": call, "reason": "answered_elsewhere"})
    );
    // Candidates both ways, only between the two devices in the call.
    b2.ok(
        "call:ice-candidate",
        json!({"chatId": w.chat_ab, "candidate": {"candidate": "b"}}),
    )
    .await;
    assert_eq!(
        wa.event("call:ice-candidate").await["from"],
        w.b.id.as_str()
    );
    wa.ok(
        "call:ice-candidate",
        json!({"chatId": w.chat_ab, "candidate": {"candidate": "a2"}}),
    )
    .await;
    assert_eq!(
        b2.event("call:ice-candidate").await["candidate"]["candidate"],
        "a2"
    );
    b1.no_event("call:ice-candidate", Duration::from_millis(200))
        .await;
    let r = b1
        .request(
            "call:ice-candidate",
            json!({"chatId": w.chat_ab, "candidate": {}}),
        )
        .await;
    assert_eq!(
        r["error"]["code"], "no_such_call",
        "the other device is out of the call"
    );
    assert_eq!(b1.event("call:error").await["code"], "no_such_call");

    // An ICE restart's offer/answer goes through `call:renegotiate` (extension).
    let restart = json!({"type": "offer", "sdp": "v=0 restart"});
    wa.ok(
        "call:renegotiate",
        json!({"chatId": w.chat_ab, "description": restart}),
    )
    .await;
    let r = b2.event("call:renegotiate").await;
    assert_eq!(
        (r["description"].clone(), r["from"].clone()),
        (restart, json!(w.a.id))
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    wa.ok("call:end", json!({"chatId": w.chat_ab})).await;
    assert_eq!(
        b2.event("call:end").await,
        json!({"chatId": w.chat_ab, "callId": call, "reason": "ended"})
    );
    // Recorded, and shown in the chat history as the caller's call message.
    let m = last_message(&w.s, &w.b.token, &w.chat_ab).await;
    assert_eq!(m["senderId"], w.a.id.as_str());
    assert_eq!(m["call"]["callId"], call.as_str());
    assert_eq!(m["call"]["outcome"], "ended");
    assert!(m["call"]["durationMs"].as_i64().unwrap() >= 1000);
    assert_eq!(m["content"], "Video call, 0:01");
    // And pushed like any message.
    assert_eq!(b2.event("message").await["kind"], "call");
    // Both are free again: B can call A.
    let r = b2
        .ok(
            "call:initiate",
            json!({"chatId": w.chat_ab, "offer": offer(), "callType": "audio"}),
        )
        .await;
    assert!(r["callId"].is_string());
    assert_eq!(wa.event("call:offer").await["callType"], "audio");
    w.s.stop().await;
}

#[tokio::test]
async fn busy_offline_and_failed_checks() {
    let w = world(|_| {}).await;
    let mut wa = w.s.ws(&w.a).await;
    let mut b1 = w.s.ws(&w.b).await;
    let mut b2 = w.s.ws(&w.b).await;
    let mut wc = w.s.ws(&w.c).await;
    ring(&mut wa, &mut b1, &mut b2, &w.chat_ab, &w.a.id).await;
    b1.ok(
        "call:answer",
        json!({"chatId": w.chat_ab, "answer": answer()}),
    )
    .await;

    // C calls B, who is in a call with A: busy, without saying which call.
    let r = wc
        .request(
            "call:initiate",
            json!({"chatId": w.chat_cb, "offer": offer(), "callType": "audio"}),
        )
        .await;
    assert_eq!(r["error"]["code"], "busy");
    assert_eq!(wc.event("call:busy").await, json!({"chatId": w.chat_cb}));
    // Without an id: only the push.
    wc.send(
        "call:initiate",
        json!({"chatId": w.chat_cb, "offer": offer(), "callType": "audio"}),
    )
    .await;
    assert_eq!(wc.event("call:busy").await, json!({"chatId": w.chat_cb}));
    // A (in a call) calls C: caller_busy.
    let chat_ac = w.s.direct_chat(&w.a, &w.c).await;
    let r = wa
        .request(
            "call:initiate",
            json!({"chatId": chat_ac, "offer": offer(), "callType": "audio"}),
        )
        .await;
    assert_eq!(r["error"]["code"], "caller_busy");
    assert_eq!(wa.event("call:error").await["code"], "caller_busy");
    // C calls D, who is offline.
    let d = w.s.register("dave").await;
    let chat_cd = w.s.direct_chat(&w.c, &d).await;
    wc.send(
        "call:initiate",
        json!({"chatId": chat_cd, "offer": offer(), "callType": "audio"}),
    )
    .await;
    let e = wc.event("call:error").await;
    assert_eq!(
        (e["chatId"].as_str(), e["code"].as_str()),
        (Some(chat_cd.as_str()), Some("offline"))
    );
    assert!(e["message"].is_string());
    // Not a participant; unknown chat; a group chat; a bad payload.
    wc.send(
        "call:initiate",
        json!({"chatId": w.chat_ab, "offer": offer(), "callType": "audio"}),
    )
    .await;
    assert_eq!(wc.event("call:error").await["code"], "forbidden");
    wc.send(
        "call:initiate",
        json!({"chatId": "nope", "offer": offer(), "callType": "audio"}),
    )
    .await;
    assert_eq!(wc.event("call:error").await["code"], "not_found");
    let (_, g) =
        w.s.post(
            "/api/chats",
            Some(&w.c.token),
            json!({"participantIds": [w.a.id, d.id], "title": "g"}),
        )
        .await;
    let group = g["chat"]["id"].as_str().unwrap();
    wc.send(
        "call:initiate",
        json!({"chatId": group, "offer": offer(), "callType": "audio"}),
    )
    .await;
    assert_eq!(wc.event("call:error").await["code"], "unsupported");
    wc.send(
        "call:initiate",
        json!({"chatId": w.chat_cb, "offer": offer(), "callType": "hologram"}),
    )
    .await;
    assert_eq!(wc.event("call:error").await["code"], "bad_request");
    wc.send(
        "call:initiate",
        json!({"chatId": w.chat_cb, "callType": "audio"}),
    )
    .await;
    let e = wc.event("call:error").await;
    assert!(e["message"].as_str().unwrap().contains("offer"), "{e}");
    // Stale events.
    wc.send(
        "call:answer",
        json!({"chatId": w.chat_cb, "answer": answer()}),
    )
    .await;
    assert_eq!(wc.event("call:error").await["code"], "no_such_call");
    wc.send("call:end", json!({"chatId": w.chat_cb})).await;
    assert_eq!(wc.event("call:error").await["code"], "no_such_call");
    // None of that disturbed the call in progress.
    wa.ok(
        "call:ice-candidate",
        json!({"chatId": w.chat_ab, "candidate": {"candidate": "x"}}),
    )
    .await;
    b1.event("call:ice-candidate").await;
    w.s.stop().await;
}

#[tokio::test]
async fn no_answer_after_the_ring_timeout() {
    let w = world(|c| c.calls.ring_timeout = Duration::from_millis(800)).await;
    let mut wa = w.s.ws(&w.a).await;
    let mut b1 = w.s.ws(&w.b).await;
    let mut b2 = w.s.ws(&w.b).await;
    let call = ring(&mut wa, &mut b1, &mut b2, &w.chat_ab, &w.a.id).await;
    let started = std::time::Instant::now();
    assert_eq!(
        wa.event("call:no-answer").await,
        json!({"chatId": w.chat_ab, "callId": call})
    );
    assert!(started.elapsed() >= Duration::from_millis(600));
    for b in [&mut b1, &mut b2] {
        assert_eq!(b.event("call:end").await["reason"], "no_answer");
    }
    let m = last_message(&w.s, &w.a.token, &w.chat_ab).await;
    assert_eq!(m["content"], "Missed video call");
    assert_eq!(m["call"]["outcome"], "no_answer");
    w.s.stop().await;
}

#[tokio::test]
async fn reject_and_cancel() {
    let w = world(|_| {}).await;
    let mut wa = w.s.ws(&w.a).await;
    let mut b1 = w.s.ws(&w.b).await;
    let mut b2 = w.s.ws(&w.b).await;
    let call = ring(&mut wa, &mut b1, &mut b2, &w.chat_ab, &w.a.id).await;
    b1.ok("call:reject", json!({"chatId": w.chat_ab})).await;
    assert_eq!(
        wa.event("call:rejected").await,
        json!({"chatId": w.chat_ab, "callId": call})
    );
    assert_eq!(b2.event("call:end").await["reason"], "rejected");
    assert_eq!(
        last_message(&w.s, &w.a.token, &w.chat_ab).await["content"],
        "Declined video call"
    );

    let call = ring(&mut wa, &mut b1, &mut b2, &w.chat_ab, &w.a.id).await;
    wa.ok("call:end", json!({"chatId": w.chat_ab})).await;
    for b in [&mut b1, &mut b2] {
        assert_eq!(
            b.event("call:end").await,
            json!({"chatId": w.chat_ab, "callId": call, "reason": "cancelled"})
        );
    }
    w.s.stop().await;
}

#[tokio::test]
async fn a_dropped_socket_that_comes_back_within_the_grace_keeps_the_call() {
    let w = world(|c| c.calls.reconnect_grace = Duration::from_millis(1500)).await;
    let mut wa = w.s.ws(&w.a).await;
    let mut b1 = w.s.ws(&w.b).await;
    let mut b2 = w.s.ws(&w.b).await;
    let call = ring(&mut wa, &mut b1, &mut b2, &w.chat_ab, &w.a.id).await;
    b2.ok(
        "call:answer",
        json!({"chatId": w.chat_ab, "answer": answer()}),
    )
    .await;
    wa.event("call:answer").await;

    // B's socket drops (a network switch), and B comes back on a new one.
    drop(b2);
    assert_eq!(
        wa.event("call:peer-reconnecting").await,
        json!({"chatId": w.chat_ab, "callId": call})
    );
    let mut b3 = w.s.ws(&w.b).await;
    b3.ok("call:resume", json!({"chatId": w.chat_ab, "callId": call}))
        .await;
    assert_eq!(
        wa.event("call:peer-resumed").await,
        json!({"chatId": w.chat_ab, "callId": call})
    );
    // Past the grace the call is still there and relays to the new socket.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    wa.no_event("call:end", Duration::from_millis(10)).await;
    wa.ok(
        "call:ice-candidate",
        json!({"chatId": w.chat_ab, "candidate": {"candidate": "restart"}}),
    )
    .await;
    assert_eq!(
        b3.event("call:ice-candidate").await["candidate"]["candidate"],
        "restart"
    );
    b3.ok("call:end", json!({"chatId": w.chat_ab})).await;
    assert_eq!(wa.event("call:end").await["reason"], "ended");
    w.s.stop().await;
}

#[tokio::test]
async fn a_dropped_socket_that_does_not_come_back_is_connection_lost() {
    let w = world(|c| c.calls.reconnect_grace = Duration::from_millis(700)).await;
    let mut wa = w.s.ws(&w.a).await;
    let mut b1 = w.s.ws(&w.b).await;
    let mut b2 = w.s.ws(&w.b).await;
    let call = ring(&mut wa, &mut b1, &mut b2, &w.chat_ab, &w.a.id).await;
    b1.ok(
        "call:answer",
        json!({"chatId": w.chat_ab, "answer": answer()}),
    )
    .await;
    wa.event("call:answer").await;
    wa.close().await;
    assert_eq!(
        b1.event("call:peer-reconnecting").await,
        json!({"chatId": w.chat_ab, "callId": call})
    );
    let started = std::time::Instant::now();
    assert_eq!(
        b1.event("call:end").await,
        json!({"chatId": w.chat_ab, "callId": call, "reason": "connection_lost"})
    );
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(
        last_message(&w.s, &w.b.token, &w.chat_ab).await["call"]["outcome"],
        "connection_lost"
    );
    // A's resume after the grace is stale.
    let mut wa = w.s.ws(&w.a).await;
    let r = wa
        .request("call:resume", json!({"chatId": w.chat_ab, "callId": call}))
        .await;
    assert_eq!(r["error"]["code"], "no_such_call");
    w.s.stop().await;
}

#[tokio::test]
async fn a_callee_that_reloads_while_ringing_rings_again() {
    let w = world(|_| {}).await;
    let mut wa = w.s.ws(&w.a).await;
    let b1 = w.s.ws(&w.b).await;
    let r = wa
        .ok(
            "call:initiate",
            json!({"chatId": w.chat_ab, "offer": offer(), "callType": "audio"}),
        )
        .await;
    b1.close().await;
    let mut b2 = w.s.ws(&w.b).await;
    let o = b2.event("call:offer").await;
    assert_eq!(o["callId"], r["callId"]);
    b2.ok(
        "call:answer",
        json!({"chatId": w.chat_ab, "answer": answer()}),
    )
    .await;
    assert_eq!(wa.event("call:answer").await["callId"], r["callId"]);
    w.s.stop().await;
}

//! Several nodes (PROTOCOL §8): two real app instances on port 0 sharing a real PostgreSQL and a
//! real `redis-server`, clients on either. Chat, receipts, typing and presence across nodes;
//! calls between users on different nodes (ringing every device wherever it is, busy across
//! nodes); a node killed with SIGKILL mid-call; Redis restarted under load; concurrent senders
//! on both nodes into one group.
//!
//! The first node started holds the calls lease (it runs the calls machine for the cluster);
//! the tests send signals through both, so the forwarded path and the local one both run.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

fn offer() -> Value {
    json!({"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n"})
}

fn answer() -> Value {
    json!({"type": "answer", "sdp": "v=0\r\no=- 2 2 IN IP4 127.0.0.1\r\n"})
}

async fn group(s: &TestServer, owner: &TestUser, others: &[&TestUser]) -> String {
    let ids: Vec<&str> = others.iter().map(|u| u.id.as_str()).collect();
    let (status, body) = s
        .post(
            "/api/chats",
            Some(&owner.token),
            json!({"participantIds": ids, "title": "cluster"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["chat"]["id"].as_str().unwrap().to_owned()
}

/// What every reader sees alike of a message (its status moves with receipts).
fn fixed(msgs: &[Value]) -> Vec<Value> {
    msgs.iter()
        .map(|m| {
            json!([
                m["id"],
                m["seq"],
                m["senderId"],
                m["content"],
                m["createdAt"]
            ])
        })
        .collect()
}

/// The call messages of a chat, once there are `n` of them (a call is recorded right after its
/// end event is pushed, not before): waits up to 5 s.
async fn call_records(s: &TestServer, token: &str, chat: &str, n: usize) -> Vec<Value> {
    for _ in 0..50 {
        let calls: Vec<Value> = history(s, token, chat)
            .await
            .into_iter()
            .filter(|m| m["call"].is_object())
            .collect();
        if calls.len() >= n {
            return calls;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("fewer than {n} call records in {chat}");
}

/// Every message of a chat through `s`, by paging `afterSeq`.
async fn history(s: &TestServer, token: &str, chat: &str) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    loop {
        let after = out.last().map(|m| m["seq"].as_i64().unwrap()).unwrap_or(0);
        let (status, page) = s
            .get(
                &format!("/api/chats/{chat}/messages?afterSeq={after}&limit=200"),
                token,
            )
            .await;
        assert_eq!(status, 200, "{page}");
        out.extend(page["messages"].as_array().unwrap().iter().cloned());
        if page["hasMore"] != true {
            return out;
        }
    }
}

#[tokio::test]
async fn postgres_redis_two_nodes_share_messages_receipts_typing_and_presence() {
    let redis = RedisServer::start();
    let env = ClusterEnv::new(&redis).await;
    let a = env.node("a", |_| {}).await;
    let b = env.node("b", |_| {}).await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let chat = a.direct_chat(&alice, &bob).await;

    // Presence across nodes: bob on B sees alice come online on A.
    let mut wb = b.ws(&bob).await;
    let mut wa = a.ws(&alice).await;
    let up = wb.event("users:update").await;
    assert_eq!(
        (&up["userId"], &up["isOnline"]),
        (&json!(alice.id), &json!(true))
    );
    let (_, users) = b.get("/api/users", &bob.token).await;
    let online: Vec<(&str, bool)> = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["username"].as_str().unwrap(), u["isOnline"] == true))
        .collect();
    assert!(online.contains(&("alice", true)), "{users}");

    // A message through A reaches bob on B; the delivery receipt written on B reaches alice.
    let m = wa
        .ok("message", json!({"chatId": chat, "content": "hi from A"}))
        .await["message"]
        .clone();
    let got = wb.event("message").await;
    assert_eq!(
        (&got["id"], &got["content"]),
        (&m["id"], &json!("hi from A"))
    );
    let st = wa.event("message:status").await;
    assert_eq!(
        (&st["messageId"], &st["status"]),
        (&m["id"], &json!("delivered"))
    );
    wb.ok("message:read", json!({"chatId": chat, "seq": m["seq"]}))
        .await;
    let st = wa.event("message:status").await;
    assert_eq!(st["status"], "read");

    // Typing from B to an open chat on A.
    wa.ok("chat:join", json!({"chatId": chat})).await;
    wb.ok("typing-start", json!({"chatId": chat})).await;
    assert_eq!(
        wa.event("user-typing").await,
        json!({"userId": bob.id, "chatId": chat})
    );
    wb.ok("typing-stop", json!({"chatId": chat})).await;
    wa.event("user-stopped-typing").await;

    // Alice leaves A and is back on B within the grace: nobody sees her go offline.
    wa.close().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let wa2 = b.ws(&alice).await;
    wb.no_event("users:update", Duration::from_millis(900))
        .await;
    // She leaves for good: offline once, after the grace, with her last-seen time.
    wa2.close().await;
    let down = wb.event("users:update").await;
    assert_eq!(
        (&down["userId"], &down["isOnline"]),
        (&json!(alice.id), &json!(false))
    );
    assert!(down["lastSeenAt"].is_string(), "{down}");
    wb.no_event("users:update", Duration::from_millis(500))
        .await;
    let (_, me) = a.get("/api/users", &bob.token).await;
    assert!(me["users"]
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["username"] == "alice" && u["isOnline"] == false));
    let (status, ready) = b.get("/readyz", &bob.token).await;
    assert_eq!(status, 200, "{ready}");
    wb.close().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn postgres_redis_calls_ring_every_device_across_nodes_and_busy_holds_across_nodes() {
    let redis = RedisServer::start();
    let env = ClusterEnv::new(&redis).await;
    let a = env.node("a", |_| {}).await;
    let b = env.node("b", |_| {}).await;
    let alice = a.register("alice").await;
    let bob = a.register("bob").await;
    let carol = b.register("carol").await;
    let chat_ab = a.direct_chat(&alice, &bob).await;
    let chat_cb = b.direct_chat(&carol, &bob).await;
    // Alice on A; bob on both nodes; carol on B.
    let mut wa = a.ws(&alice).await;
    let mut b_on_b = b.ws(&bob).await;
    let mut b_on_a = a.ws(&bob).await;
    let mut wc = b.ws(&carol).await;

    // Alice (on the calls leader) calls: both of bob's devices ring.
    let r = wa
        .ok(
            "call:initiate",
            json!({"chatId": chat_ab, "offer": offer(), "callType": "video"}),
        )
        .await;
    let call = r["callId"].as_str().unwrap().to_owned();
    for dev in [&mut b_on_b, &mut b_on_a] {
        let o = dev.event("call:offer").await;
        assert_eq!(
            (&o["callId"], &o["callerId"]),
            (&json!(call), &json!(alice.id))
        );
    }
    // Carol on B calls bob, who is ringing: busy, decided for the whole cluster.
    let r = wc
        .request(
            "call:initiate",
            json!({"chatId": chat_cb, "offer": offer(), "callType": "audio"}),
        )
        .await;
    assert_eq!(r["error"]["code"], "busy", "{r}");
    assert_eq!(wc.event("call:busy").await["chatId"], chat_cb.as_str());

    // Bob answers on B (forwarded to the leader): alice gets the answer, his other device stops.
    let r = b_on_b
        .ok(
            "call:answer",
            json!({"chatId": chat_ab, "answer": answer()}),
        )
        .await;
    assert_eq!(r["callId"], call.as_str());
    assert_eq!(
        wa.event("call:answer").await,
        json!({"chatId": chat_ab, "callId": call, "answer": answer()})
    );
    assert_eq!(
        b_on_a.event("call:end").await,
        json!({"chatId": chat_ab, "callId": call, "reason": "answered_elsewhere"})
    );
    // Candidates both ways between the two devices in the call.
    let cand = json!({"candidate": "candidate:1 1 udp 1 10.0.0.1 9 typ host", "sdpMid": "0"});
    b_on_b
        .ok(
            "call:ice-candidate",
            json!({"chatId": chat_ab, "candidate": cand}),
        )
        .await;
    let ice = wa.event("call:ice-candidate").await;
    assert_eq!((&ice["candidate"], &ice["from"]), (&cand, &json!(bob.id)));
    wa.ok(
        "call:ice-candidate",
        json!({"chatId": chat_ab, "candidate": cand}),
    )
    .await;
    assert_eq!(
        b_on_b.event("call:ice-candidate").await["from"],
        alice.id.as_str()
    );
    // Carol on B tries again while they talk: still busy.
    let r = wc
        .request(
            "call:initiate",
            json!({"chatId": chat_cb, "offer": offer(), "callType": "audio"}),
        )
        .await;
    assert_eq!(r["error"]["code"], "busy", "{r}");

    // Bob hangs up from B: alice hears it; the call is recorded as a message in the chat.
    b_on_b.ok("call:end", json!({"chatId": chat_ab})).await;
    assert_eq!(
        wa.event("call:end").await,
        json!({"chatId": chat_ab, "callId": call, "reason": "ended"})
    );
    let rec = wa.event("message").await;
    assert_eq!(rec["call"]["callId"], call.as_str(), "{rec}");
    // Now carol gets through; the callee answers on A this time.
    let r = wc
        .ok(
            "call:initiate",
            json!({"chatId": chat_cb, "offer": offer(), "callType": "audio"}),
        )
        .await;
    let call2 = r["callId"].as_str().unwrap().to_owned();
    for dev in [&mut b_on_b, &mut b_on_a] {
        assert_eq!(dev.event("call:offer").await["callId"], call2.as_str());
    }
    b_on_a.ok("call:reject", json!({"chatId": chat_cb})).await;
    let rej = wc.event("call:rejected").await;
    assert_eq!(rej["callId"], call2.as_str());
    assert_eq!(b_on_b.event("call:end").await["reason"], "rejected");
    a.stop().await;
    b.stop().await;
}

/// Node B runs as the real binary and is killed with SIGKILL while bob, connected to it, is
/// in a call with alice on A: alice hears `connection_lost` after the reconnect grace and sees
/// bob go offline (A notices B's heartbeat stopped, within 10 s + 3 s, and sweeps it).
#[tokio::test]
async fn postgres_redis_a_node_killed_mid_call_ends_the_call_and_its_users_go_offline() {
    let redis = RedisServer::start();
    let env = ClusterEnv::new(&redis).await;
    let a = env
        .node("a", |c| {
            c.calls.reconnect_grace = Duration::from_millis(500)
        })
        .await;
    let (mut b, _dir) = env.binary(
        "b",
        &[
            ("SWITCHBOARD_PRESENCE__OFFLINE_GRACE", "300ms"),
            ("SWITCHBOARD_CALLS__RECONNECT_GRACE", "500ms"),
        ],
    );
    let alice = a.register("alice").await;
    let bob = a.register("bob").await;
    let chat = a.direct_chat(&alice, &bob).await;
    let mut wa = a.ws(&alice).await;
    let mut wb = Ws::connect(b.addr, &bob.token).await;
    let up = wa.event("users:update").await;
    assert_eq!(
        (&up["userId"], &up["isOnline"]),
        (&json!(bob.id), &json!(true))
    );
    let r = wa
        .ok(
            "call:initiate",
            json!({"chatId": chat, "offer": offer(), "callType": "audio"}),
        )
        .await;
    let call = r["callId"].as_str().unwrap().to_owned();
    wb.event("call:offer").await;
    wb.ok("call:answer", json!({"chatId": chat, "answer": answer()}))
        .await;
    wa.event("call:answer").await;

    b.kill9();
    let started = std::time::Instant::now();
    let end = wa.event_within("call:end", Duration::from_secs(25)).await;
    assert_eq!(
        end,
        json!({"chatId": chat, "callId": call, "reason": "connection_lost"})
    );
    let down = wa
        .event_within("users:update", Duration::from_secs(5))
        .await;
    assert_eq!(
        (&down["userId"], &down["isOnline"]),
        (&json!(bob.id), &json!(false))
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(16), "took {took:?}");
    let (_, users) = a.get("/api/users", &alice.token).await;
    assert!(users["users"]
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["username"] == "bob" && u["isOnline"] == false));
    // The call is recorded once, as lost.
    let calls = call_records(&a, &alice.token, &chat, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        call_records(&a, &alice.token, &chat, 1).await.len(),
        1,
        "{calls:?}"
    );
    assert_eq!(calls[0]["call"]["outcome"], "connection_lost");
    a.stop().await;
}

/// The node that runs the calls (the first started, here the real binary) is killed with
/// SIGKILL mid-call: the other node takes the calls lease once it expires and takes the call
/// over; alice's connection died with the old leader, so bob (on the surviving node) hears
/// `peer-reconnecting`, then `connection_lost` after the reconnect grace; the call is recorded
/// once, and alice is shown offline.
#[tokio::test]
async fn postgres_redis_the_calls_leader_killed_mid_call_is_replaced() {
    let redis = RedisServer::start();
    let env = ClusterEnv::new(&redis).await;
    let (mut a, _dir) = env.binary("a", &[("SWITCHBOARD_PRESENCE__OFFLINE_GRACE", "300ms")]);
    let b = env
        .node("b", |c| c.calls.reconnect_grace = Duration::from_secs(1))
        .await;
    let alice = b.register("alice").await;
    let bob = b.register("bob").await;
    let chat = b.direct_chat(&alice, &bob).await;
    let mut wa = Ws::connect(a.addr, &alice.token).await;
    let mut wb = b.ws(&bob).await;
    // Both signals go through B to the leader on A and back.
    let r = wb
        .ok(
            "call:initiate",
            json!({"chatId": chat, "offer": offer(), "callType": "video"}),
        )
        .await;
    let call = r["callId"].as_str().unwrap().to_owned();
    wa.event("call:offer").await;
    wa.ok("call:answer", json!({"chatId": chat, "answer": answer()}))
        .await;
    wb.event("call:answer").await;

    a.kill9();
    let away = wb
        .event_within("call:peer-reconnecting", Duration::from_secs(25))
        .await;
    assert_eq!(away, json!({"chatId": chat, "callId": call}));
    let end = wb.event_within("call:end", Duration::from_secs(5)).await;
    assert_eq!(
        end,
        json!({"chatId": chat, "callId": call, "reason": "connection_lost"})
    );
    let mut offline = false;
    for _ in 0..3 {
        let u = wb
            .event_within("users:update", Duration::from_secs(10))
            .await;
        if u["userId"] == alice.id.as_str() && u["isOnline"] == false {
            offline = true;
            break;
        }
    }
    assert!(offline, "alice not shown offline after her node died");
    // The surviving node runs the calls now: a new call rings, and the ended one is recorded
    // once, as answered and lost.
    let mut wa = b.ws(&alice).await;
    let r = wb
        .ok(
            "call:initiate",
            json!({"chatId": chat, "offer": offer(), "callType": "audio"}),
        )
        .await;
    assert_eq!(wa.event("call:offer").await["callId"], r["callId"]);
    let calls = call_records(&b, &bob.token, &chat, 1).await;
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["call"]["callId"], call.as_str());
    assert_eq!(calls[0]["call"]["outcome"], "connection_lost");
    // Answered before the leader died (kept in Redis with the call): a call with a duration,
    // not a missed one.
    let text = calls[0]["content"].as_str().unwrap();
    assert!(text.starts_with("Video call, "), "{text}");
    b.stop().await;
}

/// A node stops (SIGKILL) while it runs a user's offline grace: another node shows the user
/// offline a little after the grace (3 s later, at its next heartbeat), not never.
#[tokio::test]
async fn postgres_redis_a_grace_left_by_a_dead_node_ends_on_another() {
    let redis = RedisServer::start();
    let env = ClusterEnv::new(&redis).await;
    let b = env
        .node("b", |c| c.presence.offline_grace = Duration::from_secs(1))
        .await;
    let (mut a, _dir) = env.binary("a", &[("SWITCHBOARD_PRESENCE__OFFLINE_GRACE", "1s")]);
    let alice = b.register("alice").await;
    let bob = b.register("bob").await;
    b.direct_chat(&alice, &bob).await;
    let mut wb = b.ws(&bob).await;
    let wa = Ws::connect(a.addr, &alice.token).await;
    let up = wb.event("users:update").await;
    assert_eq!(
        (&up["userId"], &up["isOnline"]),
        (&json!(alice.id), &json!(true))
    );
    wa.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.kill9();
    let started = std::time::Instant::now();
    let down = wb
        .event_within("users:update", Duration::from_secs(15))
        .await;
    assert_eq!(
        (&down["userId"], &down["isOnline"]),
        (&json!(alice.id), &json!(false))
    );
    assert!(down["lastSeenAt"].is_string(), "{down}");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    wb.no_event("users:update", Duration::from_millis(500))
        .await;
    b.stop().await;
}

/// Redis killed and started again while both nodes take messages: every send is acknowledged
/// (PostgreSQL is the truth), nothing acknowledged is lost, fan-out across nodes resumes, and
/// `/readyz` says 503 meanwhile.
#[tokio::test]
async fn postgres_redis_restarted_mid_load_loses_nothing_acked() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let env = ClusterEnv::new(&redis).await;
    let a = env.node("a", |_| {}).await;
    let b = env.node("b", |_| {}).await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let chat = a.direct_chat(&alice, &bob).await;
    let mut wa = a.ws(&alice).await;
    let mut wb = b.ws(&bob).await;
    let mut acked = BTreeSet::new();
    let send = |i: usize| json!({"chatId": chat, "content": format!("m{i}")});
    for i in 0..20 {
        let m = wa.ok("message", send(i)).await;
        acked.insert(m["message"]["seq"].as_i64().unwrap());
    }
    redis.kill();
    for i in 20..40 {
        let m = wa.ok("message", send(i)).await;
        acked.insert(m["message"]["seq"].as_i64().unwrap());
    }
    // Unready while Redis is away.
    let mut unready = false;
    for _ in 0..40 {
        let r = reqwest::get(a.url("/readyz")).await.unwrap();
        if r.status() == 503 {
            unready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(unready, "/readyz stayed 200 with Redis down");
    let _redis = RedisServer::start_on(port);
    // Ready again, and a new message reaches bob across nodes again.
    let mut ready = false;
    for _ in 0..100 {
        if reqwest::get(a.url("/readyz")).await.unwrap().status() == 200
            && reqwest::get(b.url("/readyz")).await.unwrap().status() == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "not ready after Redis came back");
    let last = wa
        .ok("message", json!({"chatId": chat, "content": "after"}))
        .await;
    acked.insert(last["message"]["seq"].as_i64().unwrap());
    let mut live = BTreeSet::new();
    loop {
        let m = wb.event("message").await;
        live.insert(m["seq"].as_i64().unwrap());
        if m["content"] == "after" {
            break;
        }
    }
    // What fan-out missed while Redis was away is stored: bob reads every acknowledged message.
    let from_a = history(&a, &alice.token, &chat).await;
    let from_b = history(&b, &bob.token, &chat).await;
    let seqs: BTreeSet<i64> = from_b.iter().map(|m| m["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, acked, "every acknowledged message is stored");
    assert_eq!(seqs, (1..=41).collect::<BTreeSet<i64>>(), "gap-free");
    assert_eq!(
        fixed(&from_a),
        fixed(&from_b),
        "both nodes read the same history"
    );
    assert!(live.contains(&41));
    // Bob shows online again for alice's node: each node puts its connections back into the
    // restarted Redis within a heartbeat (3 s).
    let mut back = false;
    for _ in 0..60 {
        let (_, users) = a.get("/api/users", &alice.token).await;
        if users["users"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["username"] == "bob" && u["isOnline"] == true)
        {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "bob not shown online again after the Redis restart");
    a.stop().await;
    b.stop().await;
}

/// Two senders on each node write into one group at once: seqs gap-free, every member sees
/// every message live, both nodes serve the identical history.
#[tokio::test]
async fn postgres_redis_concurrent_senders_on_both_nodes_into_one_group() {
    let redis = RedisServer::start();
    let env = ClusterEnv::new(&redis).await;
    let a = env.node("a", |_| {}).await;
    let b = env.node("b", |_| {}).await;
    let users = [
        a.register("user0").await,
        a.register("user1").await,
        b.register("user2").await,
        b.register("user3").await,
    ];
    let chat = group(&a, &users[0], &[&users[1], &users[2], &users[3]]).await;
    const EACH: usize = 40;
    // Everyone is connected before anyone sends (what was sent before a connection existed
    // reaches it through history, not live).
    let mut conns = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let node = if i < 2 { &a } else { &b };
        conns.push(node.ws(u).await);
    }
    let mut tasks = Vec::new();
    for (i, mut ws) in conns.into_iter().enumerate() {
        let chat = chat.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for n in 0..EACH {
                let m = ws
                    .ok(
                        "message",
                        json!({"chatId": chat, "content": format!("u{i}-{n}"), "clientMsgId": format!("u{i}-{n}")}),
                    )
                    .await;
                mine.push(m["message"]["seq"].as_i64().unwrap());
            }
            // Everything everyone sent reaches this connection live.
            let mut seen: BTreeSet<i64> = mine.iter().copied().collect();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while seen.len() < 4 * EACH && tokio::time::Instant::now() < deadline {
                if let Ok(m) = tokio::time::timeout(Duration::from_secs(2), ws.event("message")).await {
                    seen.insert(m["seq"].as_i64().unwrap());
                }
            }
            (mine, seen)
        }));
    }
    let mut all = BTreeSet::new();
    for t in tasks {
        let (mine, seen) = t.await.unwrap();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "a sender's seqs increase"
        );
        let missing: Vec<i64> = (1..=(4 * EACH) as i64)
            .filter(|s| !seen.contains(s))
            .collect();
        assert!(missing.is_empty(), "not seen live: {missing:?}");
        all.extend(mine);
    }
    assert_eq!(all, (1..=(4 * EACH) as i64).collect::<BTreeSet<_>>());
    let from_a = history(&a, &users[0].token, &chat).await;
    let from_b = history(&b, &users[3].token, &chat).await;
    assert_eq!(from_a.len(), 4 * EACH);
    assert_eq!(fixed(&from_a), fixed(&from_b));
    a.stop().await;
    b.stop().await;
}

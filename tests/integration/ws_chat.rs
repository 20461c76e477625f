//! Every chat event of PROTOCOL §2.1 over a real WebSocket, with the failure cases.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn established_frame_and_ping() {
    let s = TestServer::start().await;
    let a = s.register("alice").await;
    let mut ws = s.ws(&a).await;
    let e = &ws.established;
    assert_eq!(e["userId"], a.id.as_str());
    assert!(e["connectionId"].is_string());
    assert_eq!(e["heartbeatIntervalMs"], 25_000);
    assert!(e["serverTime"].as_str().unwrap().ends_with('Z'));
    assert!(e["iceServers"].is_array());
    ws.send("ping", json!(null)).await;
    let pong = ws.event("pong").await;
    assert!(pong["serverTime"].is_string());
    s.stop().await;
}

#[tokio::test]
async fn message_fan_out_ack_and_idempotent_retry() {
    let s = TestServer::start().await;
    let a = s.register("alice").await;
    let b = s.register("bob").await;
    let chat = s.direct_chat(&a, &b).await;
    let mut a1 = s.ws(&a).await;
    let mut a2 = s.ws(&a).await;
    let mut b1 = s.ws(&b).await;
    let mut b2 = s.ws(&b).await;

    let reply = a1
        .ok(
            "message",
            json!({"chatId": chat, "content": "hi 👋", "clientMsgId": "c-1"}),
        )
        .await;
    let m = &reply["message"];
    assert_eq!(m["seq"], 1);
    assert_eq!(m["content"], "hi 👋");
    assert_eq!(m["senderId"], a.id.as_str());
    assert_eq!(m["clientMsgId"], "c-1");
    assert_eq!(m["pinned"], false);
    assert!(m["forwardedFrom"].is_null());
    let ack = a1.event("message:ack").await;
    assert_eq!(
        ack,
        json!({"messageId": m["id"], "clientMsgId": "c-1", "chatId": chat, "seq": 1})
    );
    // Every connection of every participant gets the push, the sender's included.
    for ws in [&mut a1, &mut a2, &mut b1, &mut b2] {
        let pushed = ws.event("message").await;
        assert_eq!(pushed["id"], m["id"]);
        assert_eq!(pushed["seq"], 1);
    }
    // A retry with the same clientMsgId: the same message, an ack, and no second push.
    let again = a1
        .ok(
            "message",
            json!({"chatId": chat, "content": "hi 👋", "clientMsgId": "c-1"}),
        )
        .await;
    assert_eq!(again["message"]["id"], m["id"]);
    assert_eq!(again["message"]["seq"], 1);
    assert_eq!(a1.event("message:ack").await["messageId"], m["id"]);
    b1.no_event("message", Duration::from_millis(300)).await;
    a2.no_event("message", Duration::from_millis(10)).await;
    // The next message takes seq 2: the retry did not burn a number.
    let next = a1
        .ok("message", json!({"chatId": chat, "content": "second"}))
        .await;
    assert_eq!(next["message"]["seq"], 2);
    s.stop().await;
}

#[tokio::test]
async fn failures_are_error_frames_and_the_connection_stays() {
    let s = TestServer::start().await;
    let a = s.register("alice").await;
    let b = s.register("bob").await;
    let c = s.register("carl").await;
    let chat_ab = s.direct_chat(&a, &b).await;
    let mut ws = s.ws(&c).await;

    // Forbidden chat (with an id: only a failed reply).
    let r = ws
        .request("message", json!({"chatId": chat_ab, "content": "x"}))
        .await;
    assert_eq!(r["ok"], false);
    assert_eq!(r["error"]["code"], "forbidden");
    // Without an id: an `error` push naming the event.
    ws.send("message", json!({"chatId": "no-such-chat", "content": "x"}))
        .await;
    let e = ws.event("error").await;
    assert_eq!(
        (e["code"].as_str(), e["event"].as_str()),
        (Some("not_found"), Some("message"))
    );
    // Bad JSON.
    ws.send_text("{this is not json").await;
    let e = ws.event("error").await;
    assert_eq!(e["code"], "bad_request");
    assert!(e["message"].as_str().unwrap().contains("JSON"));
    // Unknown event.
    let r = ws.request("message:explode", json!({})).await;
    assert_eq!(r["error"]["code"], "bad_request");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("message:explode"));
    // Invalid payload names the field.
    let r = ws.request("message", json!({"content": "x"})).await;
    assert_eq!(r["error"]["code"], "bad_request");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("chatId"),
        "{r}"
    );
    let r = ws
        .request("message", json!({"chatId": 5, "content": "x"}))
        .await;
    assert_eq!(r["error"]["code"], "bad_request");
    // Empty and too long content.
    let chat_c = s.direct_chat(&c, &a).await;
    let r = ws
        .request("message", json!({"chatId": chat_c, "content": ""}))
        .await;
    assert_eq!(r["error"]["code"], "bad_request");
    let r = ws
        .request(
            "message",
            json!({"chatId": chat_c, "content": "é".repeat(4001)}),
        )
        .await;
    assert_eq!(r["error"]["code"], "bad_request");
    let r = ws
        .request(
            "message",
            json!({"chatId": chat_c, "content": "é".repeat(4000)}),
        )
        .await;
    assert_eq!(r["ok"], true, "4000 scalar values is the limit, not bytes");
    // Unknown message ids.
    for ev in ["message:pin", "message:unpin"] {
        let r = ws.request(ev, json!({"messageId": "nope"})).await;
        assert_eq!(r["error"]["code"], "not_found", "{ev}");
    }
    let r = ws
        .request("message:read", json!({"messageId": "nope"}))
        .await;
    assert_eq!(r["error"]["code"], "not_found");
    let r = ws.request("chat:get", json!({"recipientId": "nope"})).await;
    assert_eq!(r["error"]["code"], "not_found");
    let r = ws.request("typing-start", json!({"chatId": chat_ab})).await;
    assert_eq!(r["error"]["code"], "forbidden");
    let r = ws.request("chat:join", json!({"chatId": chat_ab})).await;
    assert_eq!(r["error"]["code"], "forbidden");
    let r = ws
        .request("chat:get-pinned", json!({"chatId": "nope"}))
        .await;
    assert_eq!(r["error"]["code"], "not_found");
    // Binary frames are answered, not fatal.
    use futures_util::SinkExt;
    ws.stream
        .send(tokio_tungstenite::tungstenite::Message::Binary(
            vec![1, 2, 3].into(),
        ))
        .await
        .unwrap();
    assert_eq!(ws.event("error").await["code"], "bad_request");
    // Still open and working.
    let r = ws.ok("users:list", json!({})).await;
    assert_eq!(r["users"].as_array().unwrap().len(), 3);
    s.stop().await;
}

#[tokio::test]
async fn oversize_frame_closes_with_1009() {
    let s = TestServer::start_with(|c| c.ws.max_frame_bytes = 4096).await;
    let a = s.register("alice").await;
    let mut ws = s.ws(&a).await;
    let big = format!(
        r#"{{"event":"ping","data":{{"pad":"{}"}}}}"#,
        "x".repeat(5000)
    );
    ws.send_text(big).await;
    assert_eq!(ws.close_code().await, Some(1009));
    // Others are unaffected.
    let mut ok = s.ws(&a).await;
    ok.ok("users:list", json!({})).await;
    s.stop().await;
}

#[tokio::test]
async fn bad_or_expired_token_gets_error_then_4401() {
    let s = TestServer::start().await;
    let mut ws = Ws::connect_raw(s.addr, Some("garbage")).await;
    let first = ws.next_frame().await.unwrap();
    assert_eq!(first["event"], "error");
    assert_eq!(first["data"]["code"], "unauthorized");
    assert_eq!(ws.close_code().await, Some(4401));

    let mut ws = Ws::connect_raw(s.addr, None).await;
    assert_eq!(
        ws.next_frame().await.unwrap()["data"]["code"],
        "unauthorized"
    );
    assert_eq!(ws.close_code().await, Some(4401));

    // A token that expires while connected: error frame, then 4401.
    let a = s.register("alice").await;
    let secret = std::fs::read_to_string(s.dir.path().join("jwt_secret")).unwrap();
    let keys = switchboard::auth::jwt::JwtKeys::new(secret.trim().as_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let short = keys.issue(&a.id, "alice", now, 2);
    let mut ws = Ws::connect(s.addr, &short).await;
    let err = ws.event("error").await;
    assert_eq!(err["code"], "unauthorized");
    assert_eq!(err["message"], "token expired");
    assert_eq!(ws.close_code().await, Some(4401));

    // `auth:refresh` with a fresh token keeps a connection alive past the old expiry.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let short = keys.issue(&a.id, "alice", now, 2);
    let mut ws = Ws::connect(s.addr, &short).await;
    let r = ws.ok("auth:refresh", json!({"token": a.token})).await;
    assert!(r["expiresAt"].is_string());
    ws.no_event("error", Duration::from_millis(3500)).await;
    ws.ok("ping", json!({})).await;
    s.stop().await;
}

#[tokio::test]
async fn delivered_and_read_statuses() {
    let s = TestServer::start().await;
    let a = s.register("alice").await;
    let b = s.register("bob").await;
    let chat = s.direct_chat(&a, &b).await;
    let mut wa = s.ws(&a).await;
    // Bob is offline: the messages stay `sent`.
    let m1 = wa
        .ok("message", json!({"chatId": chat, "content": "one"}))
        .await["message"]
        .clone();
    let m2 = wa
        .ok("message", json!({"chatId": chat, "content": "two"}))
        .await["message"]
        .clone();
    assert_eq!(m1["status"], "sent");
    wa.no_event("message:status", Duration::from_millis(200))
        .await;

    // Bob connects and syncs: both become delivered; Alice hears it once, for the highest.
    let mut wb = s.ws(&b).await;
    let sync = wb.ok("sync", json!({"cursors": {}})).await;
    let got = &sync["chats"][0]["messages"];
    assert_eq!(got.as_array().unwrap().len(), 2);
    let st = wa.event("message:status").await;
    assert_eq!(
        st,
        json!({"messageId": m2["id"], "chatId": chat, "seq": 2, "status": "delivered"})
    );

    // A live message is delivered as soon as it is written to Bob's socket.
    let m3 = wa
        .ok("message", json!({"chatId": chat, "content": "three"}))
        .await["message"]
        .clone();
    wb.event("message").await;
    let st = wa.event("message:status").await;
    assert_eq!(
        (st["messageId"].clone(), st["status"].clone()),
        (m3["id"].clone(), json!("delivered"))
    );

    // Bob reads up to 2 by id, then everything by (chatId, seq).
    let r = wb.ok("message:read", json!({"messageId": m2["id"]})).await;
    assert_eq!(r["seq"], 2);
    let st = wa.event("message:status").await;
    assert_eq!(
        st,
        json!({"messageId": m2["id"], "chatId": chat, "seq": 2, "status": "read"})
    );
    wb.ok("message:read", json!({"chatId": chat, "seq": 99}))
        .await;
    let st = wa.event("message:status").await;
    assert_eq!(
        (st["seq"].clone(), st["status"].clone()),
        (json!(3), json!("read"))
    );
    // Reading again changes nothing and says nothing.
    wb.ok("message:read", json!({"chatId": chat, "seq": 3}))
        .await;
    wa.no_event("message:status", Duration::from_millis(200))
        .await;

    // History shows the statuses as the sender sees them.
    let (_, page) = s
        .get(&format!("/api/chats/{chat}/messages"), &a.token)
        .await;
    let statuses: Vec<_> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["status"].clone())
        .collect();
    assert_eq!(statuses, vec![json!("read"); 3]);
    let (_, list) = s.get("/api/chats", &b.token).await;
    assert_eq!(list["chats"][0]["unreadCount"], 0);
    // Bob's reply is `sent` until delivered to Alice, who is online: delivered right away.
    wb.ok("message", json!({"chatId": chat, "content": "back"}))
        .await;
    let st = wb.event("message:status").await;
    assert_eq!(st["status"], "delivered");
    s.stop().await;
}

#[tokio::test]
async fn group_status_needs_everyone() {
    let s = TestServer::start().await;
    let a = s.register("alice").await;
    let b = s.register("bob").await;
    let c = s.register("carl").await;
    let (_, g) = s
        .post(
            "/api/chats",
            Some(&a.token),
            json!({"participantIds": [b.id, c.id], "title": "g"}),
        )
        .await;
    let chat = g["chat"]["id"].as_str().unwrap().to_owned();
    let mut wa = s.ws(&a).await;
    let mut wb = s.ws(&b).await;
    let mut wc = s.ws(&c).await;
    wa.ok("message", json!({"chatId": chat, "content": "hello all"}))
        .await;
    wb.event("message").await;
    wc.event("message").await;
    assert_eq!(wa.event("message:status").await["status"], "delivered");
    wb.ok("message:read", json!({"chatId": chat, "seq": 1}))
        .await;
    wa.no_event("message:status", Duration::from_millis(300))
        .await;
    wc.ok("message:read", json!({"chatId": chat, "seq": 1}))
        .await;
    assert_eq!(wa.event("message:status").await["status"], "read");
    s.stop().await;
}

#[tokio::test]
async fn typing_goes_to_open_chats_and_expires() {
    let s =
        TestServer::start_with(|c| c.presence.typing_timeout = Duration::from_millis(600)).await;
    let a = s.register("alice").await;
    let b = s.register("bob").await;
    let chat = s.direct_chat(&a, &b).await;
    let mut wa = s.ws(&a).await;
    let mut b_open = s.ws(&b).await;
    let mut b_closed = s.ws(&b).await;
    let joined = b_open.ok("chat:join", json!({"chatId": chat})).await;
    assert_eq!(joined["chat"]["id"], chat.as_str());

    wa.ok("typing-start", json!({"chatId": chat})).await;
    assert_eq!(
        b_open.event("user-typing").await,
        json!({"userId": a.id, "chatId": chat})
    );
    wa.ok("typing-stop", json!({"chatId": chat})).await;
    assert_eq!(
        b_open.event("user-stopped-typing").await,
        json!({"userId": a.id, "chatId": chat})
    );
    b_closed
        .no_event("user-typing", Duration::from_millis(100))
        .await;

    // Not refreshed: it ends by itself.
    let started = std::time::Instant::now();
    wa.ok("typing-start", json!({"chatId": chat})).await;
    b_open.event("user-typing").await;
    b_open.event("user-stopped-typing").await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "expired too early: {took:?}"
    );
    // A sent message ends typing too.
    wa.ok("typing-start", json!({"chatId": chat})).await;
    b_open.event("user-typing").await;
    wa.ok("message", json!({"chatId": chat, "content": "done typing"}))
        .await;
    b_open.event("user-stopped-typing").await;
    // After chat:leave, no more typing events on that connection.
    b_open.ok("chat:leave", json!({"chatId": chat})).await;
    wa.ok("typing-start", json!({"chatId": chat})).await;
    b_open
        .no_event("user-typing", Duration::from_millis(200))
        .await;
    b_closed
        .no_event("user-typing", Duration::from_millis(10))
        .await;
    s.stop().await;
}

#[tokio::test]
async fn presence_with_offline_grace() {
    let s =
        TestServer::start_with(|c| c.presence.offline_grace = Duration::from_millis(1000)).await;
    let a = s.register("alice").await;
    let b = s.register("bob").await;
    s.direct_chat(&a, &b).await;
    let mut wa = s.ws(&a).await;
    let wb = s.ws(&b).await;
    let up = wa.event("users:update").await;
    assert_eq!(
        (up["userId"].as_str(), up["isOnline"].as_bool()),
        (Some(b.id.as_str()), Some(true))
    );
    let (_, users) = s.get("/api/users", &a.token).await;
    let bob = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["id"] == b.id.as_str())
        .unwrap()
        .clone();
    assert_eq!(bob["isOnline"], true);

    // A reload (close + reconnect within the grace) does not flicker.
    wb.close().await;
    let wb = s.ws(&b).await;
    wa.no_event("users:update", Duration::from_millis(1300))
        .await;
    // Gone for good: offline after the grace, with lastSeenAt.
    wb.close().await;
    let down = wa.event("users:update").await;
    assert_eq!(down["isOnline"], false);
    assert!(down["lastSeenAt"].as_str().unwrap().ends_with('Z'));
    let (_, me) = s.get("/api/me", &b.token).await;
    assert_eq!(me["user"]["lastSeenAt"], down["lastSeenAt"]);
    s.stop().await;
}

#[tokio::test]
async fn pins_forwards_join_and_chat_get() {
    let s = TestServer::start().await;
    let a = s.register("alice").await;
    let b = s.register("bob").await;
    let c = s.register("carl").await;
    let mut wa = s.ws(&a).await;
    let mut wb = s.ws(&b).await;
    let chat_ab = wa.ok("chat:get", json!({"recipientId": b.id})).await["chat"].clone();
    assert_eq!(chat_ab["kind"], "direct");
    let same = wb.ok("chat:get", json!({"recipientId": a.id})).await["chat"].clone();
    assert_eq!(same["id"], chat_ab["id"]);
    let r = wa.request("chat:get", json!({"recipientId": a.id})).await;
    assert_eq!(r["error"]["code"], "bad_request");
    let chat_ab = chat_ab["id"].as_str().unwrap().to_owned();
    let chat_ac = wa.ok("chat:get", json!({"recipientId": c.id})).await["chat"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let m1 = wa
        .ok("message", json!({"chatId": chat_ab, "content": "pin me"}))
        .await["message"]
        .clone();
    let m2 = wb
        .ok("message", json!({"chatId": chat_ab, "content": "from bob"}))
        .await["message"]
        .clone();

    // Pin: both sides get message:pinned; get-pinned lists it; unpin reverses.
    let r = wb.ok("message:pin", json!({"messageId": m1["id"]})).await;
    assert_eq!(r["message"]["pinned"], true);
    assert_eq!(wa.event("message:pinned").await["id"], m1["id"]);
    assert_eq!(wb.event("message:pinned").await["id"], m1["id"]);
    let pinned = wa.ok("chat:get-pinned", json!({"chatId": chat_ab})).await;
    assert_eq!(pinned["messages"].as_array().unwrap().len(), 1);
    let joined = wb.ok("chat:join", json!({"chatId": chat_ab})).await;
    assert_eq!(joined["messages"].as_array().unwrap().len(), 2);
    assert_eq!(joined["pinned"][0]["id"], m1["id"]);
    let joined = wb
        .ok("chat:join", json!({"chatId": chat_ab, "afterSeq": 1}))
        .await;
    assert_eq!(joined["messages"].as_array().unwrap().len(), 1);
    wa.ok("message:unpin", json!({"messageId": m1["id"]})).await;
    assert_eq!(wb.event("message:unpinned").await["pinned"], false);
    let pinned = wa.ok("chat:get-pinned", json!({"chatId": chat_ab})).await;
    assert!(pinned["messages"].as_array().unwrap().is_empty());

    // Forward with a comment: comment at seq n, the copy at n+1, forwardedFrom set.
    let mut wc = s.ws(&c).await;
    let fwd = wa
        .ok(
            "message:forward",
            json!({"messageId": m2["id"], "toChatId": chat_ac, "additionalContent": "look"}),
        )
        .await;
    let msgs = fwd["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(
        (msgs[0]["seq"].as_i64(), msgs[0]["content"].as_str()),
        (Some(1), Some("look"))
    );
    assert_eq!(
        (msgs[1]["seq"].as_i64(), msgs[1]["content"].as_str()),
        (Some(2), Some("from bob"))
    );
    assert_eq!(
        msgs[1]["forwardedFrom"],
        json!({"messageId": m2["id"], "chatId": chat_ab, "senderId": b.id})
    );
    assert_eq!(wc.event("message").await["seq"], 1);
    assert_eq!(
        wc.event("message").await["forwardedFrom"]["senderId"],
        b.id.as_str()
    );

    // Forward several, in order.
    let multi = wa
        .ok(
            "message:forward-multiple",
            json!({"messageIds": [m1["id"], m2["id"]], "toChatId": chat_ac}),
        )
        .await;
    let seqs: Vec<_> = multi["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [3, 4]);
    // Carl cannot forward from a chat he is not in, nor into one.
    let r = wc
        .request(
            "message:forward",
            json!({"messageId": m1["id"], "toChatId": chat_ac}),
        )
        .await;
    assert_eq!(r["error"]["code"], "forbidden");
    let r = wc
        .request(
            "message:forward",
            json!({"messageId": msgs[0]["id"], "toChatId": chat_ab}),
        )
        .await;
    assert_eq!(r["error"]["code"], "forbidden");
    let r = wa
        .request(
            "message:forward-multiple",
            json!({"messageIds": [], "toChatId": chat_ac}),
        )
        .await;
    assert_eq!(r["error"]["code"], "bad_request");
    s.stop().await;
}

#[tokio::test]
async fn heartbeat_pings_and_idle_timeout() {
    let s = TestServer::start_with(|c| {
        c.ws.heartbeat_interval = Duration::from_millis(200);
        c.ws.idle_timeout = Duration::from_millis(700);
    })
    .await;
    let a = s.register("alice").await;
    // A client that reads (and so answers pings) stays connected well past the idle timeout.
    let mut live = s.ws(&a).await;
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    use futures_util::StreamExt;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(until, live.stream.next()).await {
        if msg.is_ping() {
            pings += 1;
        }
        assert!(!msg.is_close(), "closed while answering pings: {msg:?}");
    }
    assert!(
        pings >= 3,
        "server pinged {pings} times in 1.5 s at a 200 ms interval"
    );
    live.ok("ping", json!({})).await;
    // A silent client (does not read, so never pongs) is closed with 4408.
    let mut silent = s.ws(&a).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(silent.close_code().await, Some(4408));
    s.stop().await;
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1012() {
    let s = TestServer::start().await;
    let a = s.register("alice").await;
    let mut ws = s.ws(&a).await;
    let addr = s.addr;
    let stopping = tokio::spawn(s.stop());
    assert_eq!(ws.close_code().await, Some(1012));
    stopping.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener released"
    );
}

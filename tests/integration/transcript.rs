//! The wire contract end to end, frame by frame: one scripted session through every chat and
//! call event (and the REST reads), every frame each client received, normalised (ids, times,
//! tokens and call durations replaced by stable placeholders; objects compared as JSON, so key
//! order is free) and compared with `tests/golden/session.json`.
//!
//! The golden file was recorded from the build before the transport-neutral core (commit
//! 389cb57): the refactor changed no frame a client sees. `SWITCHBOARD_RECORD_GOLDEN=1` writes
//! it anew from the current build (then review the diff).

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

/// Frames that arrive within this of each other belong to the same step.
const SETTLE: Duration = Duration::from_millis(400);

struct Client {
    ws: Ws,
    next_id: i64,
}

impl Client {
    async fn connect(s: &TestServer, u: &TestUser) -> Client {
        Client {
            ws: Ws::connect_raw(s.addr, Some(&u.token)).await,
            next_id: 1,
        }
    }

    async fn raw(&mut self, text: &str) {
        self.ws
            .stream
            .send(Message::Text(text.to_owned().into()))
            .await
            .unwrap();
    }

    async fn request(&mut self, event: &str, data: Value) {
        let id = self.next_id;
        self.next_id += 1;
        self.raw(&json!({"event": event, "data": data, "id": id}).to_string())
            .await;
    }

    async fn push(&mut self, event: &str, data: Value) {
        self.raw(&json!({"event": event, "data": data}).to_string())
            .await;
    }

    /// Every frame until none came for `SETTLE`.
    async fn drain(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            match tokio::time::timeout(SETTLE, self.ws.stream.next()).await {
                Err(_) | Ok(None) => return out,
                Ok(Some(Ok(Message::Text(t)))) => out.push(serde_json::from_str(&t).unwrap()),
                Ok(Some(Ok(Message::Close(f)))) => {
                    out.push(json!({"close": f.map(|f| u16::from(f.code))}));
                    return out;
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_))) => return out,
            }
        }
    }
}

/// Stable placeholders for what differs from run to run.
#[derive(Default)]
struct Normaliser {
    ids: HashMap<String, String>,
}

impl Normaliser {
    fn is_uuid(s: &str) -> bool {
        s.len() == 36
            && s.char_indices().all(|(i, c)| {
                if [8, 13, 18, 23].contains(&i) {
                    c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }
            })
    }

    fn is_time(s: &str) -> bool {
        s.len() == 24 && s.ends_with('Z') && &s[4..5] == "-" && &s[10..11] == "T"
    }

    fn string(&mut self, key: Option<&str>, s: &str) -> Value {
        if matches!(key, Some("accessToken" | "refreshToken" | "token")) {
            return json!("<token>");
        }
        if Self::is_uuid(s) {
            let n = self.ids.len() + 1;
            let id = self.ids.entry(s.to_owned()).or_insert(format!("<id{n}>"));
            return json!(id.clone());
        }
        if Self::is_time(s) {
            return json!("<time>");
        }
        // "Audio call, 0:01": how long the test took.
        if let Some((kind, _)) = s.split_once(" call, ") {
            return json!(format!("{kind} call, <duration>"));
        }
        json!(s)
    }

    fn value(&mut self, key: Option<&str>, v: &Value) -> Value {
        match v {
            Value::String(s) => self.string(key, s),
            Value::Array(a) => Value::Array(a.iter().map(|x| self.value(None, x)).collect()),
            Value::Object(o) => {
                let mut out = Map::new();
                for (k, x) in o {
                    let x = if k == "durationMs" || k == "expiresIn" || k == "ttl" {
                        json!("<number>")
                    } else if k == "message"
                        && x.as_str().is_some_and(|m| m.starts_with("invalid JSON"))
                    {
                        // serde's text for the syntax error, not the contract.
                        json!("invalid JSON: <detail>")
                    } else {
                        self.value(Some(k), x)
                    };
                    out.insert(k.clone(), x);
                }
                Value::Object(out)
            }
            other => other.clone(),
        }
    }
}

struct Transcript {
    steps: Vec<Value>,
    norm: Normaliser,
}

impl Transcript {
    /// Records what each client received since the last step.
    async fn step(&mut self, name: &str, clients: &mut [(&str, &mut Client)]) {
        let mut frames = Map::new();
        for (who, c) in clients.iter_mut() {
            let got = c.drain().await;
            let got = self.norm.value(None, &Value::Array(got));
            frames.insert(who.to_string(), got);
        }
        self.steps.push(json!({"step": name, "frames": frames}));
    }

    fn http(&mut self, name: &str, status: u16, body: Value) {
        let body = self.norm.value(None, &body);
        self.steps
            .push(json!({"step": name, "status": status, "body": body}));
    }
}

#[tokio::test]
async fn every_frame_of_a_scripted_session_matches_the_golden_transcript() {
    let s = TestServer::start().await;
    let (alice, bob, carol) = (
        s.register("alice").await,
        s.register("bob").await,
        s.register("carol").await,
    );
    let mut t = Transcript {
        steps: Vec::new(),
        norm: Normaliser::default(),
    };
    // Ids in the order the script meets them, so placeholders do not depend on frame order.
    for id in [&alice.id, &bob.id, &carol.id] {
        t.norm.string(None, id);
    }
    let mut a = Client::connect(&s, &alice).await;
    t.step("alice connects", &mut [("alice", &mut a)]).await;
    let mut b = Client::connect(&s, &bob).await;
    t.step("bob connects", &mut [("alice", &mut a), ("bob", &mut b)])
        .await;

    a.request("chat:get", json!({"recipientId": bob.id})).await;
    let direct = {
        let frames = a.drain().await;
        let chat = frames[0]["data"]["chat"]["id"].as_str().unwrap().to_owned();
        let v = t.norm.value(None, &Value::Array(frames));
        t.steps
            .push(json!({"step": "chat:get", "frames": {"alice": v}}));
        chat
    };
    let (status, body) = s
        .post(
            "/api/chats",
            Some(&alice.token),
            json!({"participantIds": [bob.id, carol.id], "title": "trio"}),
        )
        .await;
    let group = body["chat"]["id"].as_str().unwrap().to_owned();
    t.http("POST /api/chats", status, body);

    a.request("chat:join", json!({"chatId": direct})).await;
    b.request("chat:join", json!({"chatId": direct})).await;
    t.step("chat:join", &mut [("alice", &mut a), ("bob", &mut b)])
        .await;
    a.request("typing-start", json!({"chatId": direct})).await;
    t.step("typing-start", &mut [("alice", &mut a), ("bob", &mut b)])
        .await;
    a.request(
        "message",
        json!({"chatId": direct, "content": "hi bob", "clientMsgId": "c1"}),
    )
    .await;
    t.step("message", &mut [("alice", &mut a), ("bob", &mut b)])
        .await;
    a.request(
        "message",
        json!({"chatId": direct, "content": "hi bob", "clientMsgId": "c1"}),
    )
    .await;
    t.step("message retried", &mut [("alice", &mut a), ("bob", &mut b)])
        .await;
    a.push("message", json!({"chatId": direct, "content": "no id"}))
        .await;
    t.step(
        "message without id",
        &mut [("alice", &mut a), ("bob", &mut b)],
    )
    .await;
    let first = {
        let (_, page) = s
            .get(&format!("/api/chats/{direct}/messages"), &alice.token)
            .await;
        page["messages"][0]["id"].as_str().unwrap().to_owned()
    };
    b.request("message:read", json!({"chatId": direct, "seq": 1}))
        .await;
    t.step("message:read", &mut [("alice", &mut a), ("bob", &mut b)])
        .await;
    a.request("message:pin", json!({"messageId": first})).await;
    t.step("message:pin", &mut [("alice", &mut a), ("bob", &mut b)])
        .await;
    a.request("chat:get-pinned", json!({"chatId": direct}))
        .await;
    a.request("message:unpin", json!({"messageId": first}))
        .await;
    t.step(
        "get-pinned, unpin",
        &mut [("alice", &mut a), ("bob", &mut b)],
    )
    .await;
    b.request(
        "message:forward",
        json!({"messageId": first, "toChatId": group, "additionalContent": "look"}),
    )
    .await;
    t.step("message:forward", &mut [("alice", &mut a), ("bob", &mut b)])
        .await;
    a.request(
        "message:forward-multiple",
        json!({"messageIds": [first], "toChatId": group}),
    )
    .await;
    t.step(
        "forward-multiple",
        &mut [("alice", &mut a), ("bob", &mut b)],
    )
    .await;
    let mut cursors = Map::new();
    cursors.insert(direct.clone(), json!(1));
    a.request("sync", json!({ "cursors": cursors })).await;
    a.request("users:list", json!({})).await;
    a.request("ping", json!({})).await;
    a.request("auth:refresh", json!({"token": alice.token}))
        .await;
    t.step("sync, users, ping, refresh", &mut [("alice", &mut a)])
        .await;
    a.raw("{nope").await;
    a.raw(r#"{"event": 5, "id": 41}"#).await;
    a.push("nope", json!({})).await;
    a.request("nope", json!({})).await;
    a.push("message", json!({"content": "no chat"})).await;
    a.request("message", json!({"chatId": 7, "content": "x"}))
        .await;
    a.request("chat:join", json!({"chatId": "no-such-chat"}))
        .await;
    a.request("message", json!({"chatId": direct, "content": ""}))
        .await;
    t.step("bad requests", &mut [("alice", &mut a)]).await;

    // A call, start to end, with the store checks first.
    let offer = json!({"type": "offer", "sdp": "v=0 offer"});
    a.request(
        "call:initiate",
        json!({"chatId": group, "offer": offer, "callType": "audio"}),
    )
    .await;
    a.request("call:answer", json!({"chatId": direct})).await;
    a.push("call:end", json!({"chatId": direct})).await;
    t.step("call failures", &mut [("alice", &mut a), ("bob", &mut b)])
        .await;
    a.request(
        "call:initiate",
        json!({"chatId": direct, "offer": offer, "callType": "audio"}),
    )
    .await;
    t.step("call:initiate", &mut [("alice", &mut a), ("bob", &mut b)])
        .await;
    a.request(
        "call:ice-candidate",
        json!({"chatId": direct, "candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": "0", "sdpMLineIndex": 0}}),
    )
    .await;
    b.request(
        "call:ice-candidate",
        json!({"chatId": direct, "candidate": null}),
    )
    .await;
    t.step(
        "call:ice-candidate",
        &mut [("alice", &mut a), ("bob", &mut b)],
    )
    .await;
    b.request(
        "call:answer",
        json!({"chatId": direct, "answer": {"type": "answer", "sdp": "v=0 answer"}}),
    )
    .await;
    t.step("call:answer", &mut [("alice", &mut a), ("bob", &mut b)])
        .await;
    a.request(
        "call:renegotiate",
        json!({"chatId": direct, "description": {"type": "offer", "sdp": "v=0 again"}}),
    )
    .await;
    t.step(
        "call:renegotiate",
        &mut [("alice", &mut a), ("bob", &mut b)],
    )
    .await;
    b.request("call:end", json!({"chatId": direct})).await;
    t.step("call:end", &mut [("alice", &mut a), ("bob", &mut b)])
        .await;

    a.request("typing-stop", json!({"chatId": direct})).await;
    a.request("chat:leave", json!({"chatId": direct})).await;
    t.step(
        "typing-stop, chat:leave",
        &mut [("alice", &mut a), ("bob", &mut b)],
    )
    .await;

    for (name, path) in [
        ("GET /api/me", "/api/me".to_owned()),
        ("GET /api/users", "/api/users".to_owned()),
        ("GET /api/chats", "/api/chats".to_owned()),
        (
            "GET direct history",
            format!("/api/chats/{direct}/messages"),
        ),
        (
            "GET group history page",
            format!("/api/chats/{group}/messages?afterSeq=1&limit=2"),
        ),
        ("GET /api/ice-servers", "/api/ice-servers".to_owned()),
    ] {
        let (status, body) = s.get(&path, &alice.token).await;
        t.http(name, status, body);
    }
    let (status, body) = s
        .get(&format!("/api/chats/{group}/messages"), &carol.token)
        .await;
    t.http("GET group history as carol", status, body);

    b.ws.close().await;
    // Offline shows after the grace (300 ms in tests).
    tokio::time::sleep(Duration::from_millis(600)).await;
    t.step("bob leaves", &mut [("alice", &mut a)]).await;

    let got = Value::Array(t.steps);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/session.json");
    if std::env::var_os("SWITCHBOARD_RECORD_GOLDEN").is_some() {
        std::fs::create_dir_all(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden")).unwrap();
        std::fs::write(path, serde_json::to_string_pretty(&got).unwrap() + "\n").unwrap();
        return;
    }
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (got, golden) = (got.as_array().unwrap(), golden.as_array().unwrap());
    for (i, (g, w)) in got.iter().zip(golden).enumerate() {
        assert_eq!(
            g,
            w,
            "step {i} ({}) differs from the golden transcript:\ngot:\n{}\nwant:\n{}",
            w["step"],
            serde_json::to_string_pretty(g).unwrap(),
            serde_json::to_string_pretty(w).unwrap()
        );
    }
    assert_eq!(got.len(), golden.len(), "number of steps");
}

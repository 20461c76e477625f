//! Tests on the real binary: SIGKILL mid-stream (nothing acked is lost, retries do not
//! duplicate), memory under a reader that never reads, SIGTERM exits 0.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::binary::Binary;
use crate::common::*;

/// The built binary in `data_dir` with the standalone test defaults and `extra_env`.
fn spawn(data_dir: &std::path::Path, extra_env: &[(&str, &str)]) -> Binary {
    Binary::serve().in_dir(data_dir).envs(extra_env).spawn()
}

async fn register(http: &reqwest::Client, p: &Binary, name: &str) -> TestUser {
    let body: Value = http
        .post(p.url("/api/auth/register"))
        .json(&json!({"username": name, "password": "password123"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    TestUser {
        id: body["user"]["id"].as_str().unwrap().to_owned(),
        token: body["accessToken"].as_str().unwrap().to_owned(),
        refresh: body["refreshToken"].as_str().unwrap().to_owned(),
    }
}

async fn group(
    http: &reqwest::Client,
    p: &Binary,
    owner: &TestUser,
    others: &[&TestUser],
) -> String {
    let ids: Vec<&str> = others.iter().map(|u| u.id.as_str()).collect();
    let body: Value = http
        .post(p.url("/api/chats"))
        .bearer_auth(&owner.token)
        .json(&json!({"participantIds": ids, "title": "crash"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["chat"]["id"].as_str().unwrap().to_owned()
}

/// Every message of a chat, by paging `afterSeq`.
async fn all_messages(http: &reqwest::Client, p: &Binary, token: &str, chat: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let after = out
            .last()
            .map(|m: &Value| m["seq"].as_i64().unwrap())
            .unwrap_or(0);
        let page: Value = http
            .get(p.url(&format!(
                "/api/chats/{chat}/messages?afterSeq={after}&limit=200"
            )))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let msgs = page["messages"].as_array().unwrap().clone();
        out.extend(msgs);
        if page["hasMore"] != true {
            return out;
        }
    }
}

#[tokio::test]
async fn sigkill_mid_stream_loses_nothing_acked_and_retries_do_not_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("SWITCHBOARD_WS__RATE_LIMIT", "0")];
    let mut p = spawn(dir.path(), &env);
    let http = reqwest::Client::new();
    let users = [
        register(&http, &p, "user0").await,
        register(&http, &p, "user1").await,
        register(&http, &p, "user2").await,
    ];
    let chat = group(&http, &p, &users[0], &[&users[1], &users[2]]).await;

    // Three clients pipeline 400 messages each and record which ones were acknowledged.
    const PER_CLIENT: usize = 400;
    let acked_total = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (k, u) in users.iter().enumerate() {
        let ws = Ws::connect(p.addr, &u.token).await;
        let chat = chat.clone();
        let acked_total = acked_total.clone();
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = ws.stream.split();
            let writer = tokio::spawn(async move {
                let mut sent = Vec::new();
                for i in 0..PER_CLIENT {
                    let cid = format!("u{k}-{i}");
                    let frame = json!({"event": "message", "data": {"chatId": chat, "content": format!("msg {cid}"), "clientMsgId": cid}});
                    if tx.send(Message::Text(frame.to_string().into())).await.is_err() {
                        break;
                    }
                    sent.push(cid);
                    tokio::task::yield_now().await;
                }
                sent
            });
            let mut acked = HashMap::new();
            while let Some(Ok(msg)) = rx.next().await {
                if let Message::Text(t) = msg {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["event"] == "message:ack" {
                        acked.insert(v["data"]["clientMsgId"].as_str().unwrap().to_owned(), v["data"]["seq"].as_i64().unwrap());
                        acked_total.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            let sent = writer.await.unwrap();
            (sent, acked)
        }));
    }
    // Kill the server mid-stream.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked_total.load(Ordering::SeqCst) < 150 {
        assert!(tokio::time::Instant::now() < deadline, "too slow to ack");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    p.kill9();
    let mut sent_all: Vec<String> = Vec::new();
    let mut acked_all: HashMap<String, i64> = HashMap::new();
    for t in tasks {
        let (sent, acked) = t.await.unwrap();
        sent_all.extend(sent);
        acked_all.extend(acked);
    }
    assert!(acked_all.len() >= 150);
    assert!(
        acked_all.len() < sent_all.len(),
        "the kill must land mid-stream: {} acked of {} sent",
        acked_all.len(),
        sent_all.len()
    );

    // Restart on the same data dir: every acked message is there exactly once, at its seq.
    let p = spawn(dir.path(), &env);
    let stored = all_messages(&http, &p, &users[0].token, &chat).await;
    let mut count: HashMap<String, usize> = HashMap::new();
    for (i, m) in stored.iter().enumerate() {
        assert_eq!(m["seq"].as_i64().unwrap(), i as i64 + 1, "gap-free seqs");
        *count
            .entry(m["clientMsgId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    for (cid, seq) in &acked_all {
        assert_eq!(
            count.get(cid),
            Some(&1),
            "acked {cid} must be stored exactly once"
        );
        let m = stored
            .iter()
            .find(|m| m["clientMsgId"] == cid.as_str())
            .unwrap();
        assert_eq!(m["seq"].as_i64(), Some(*seq), "at the seq its ack named");
    }

    // Every client resends everything it sent (acked or not) with the same clientMsgId.
    for (k, u) in users.iter().enumerate() {
        let mut ws = Ws::connect(p.addr, &u.token).await;
        for cid in sent_all.iter().filter(|c| c.starts_with(&format!("u{k}-"))) {
            let r = ws
                .ok(
                    "message",
                    json!({"chatId": chat, "content": format!("msg {cid}"), "clientMsgId": cid}),
                )
                .await;
            if let Some(seq) = acked_all.get(cid) {
                assert_eq!(
                    r["message"]["seq"].as_i64(),
                    Some(*seq),
                    "a retry returns the stored message"
                );
            }
        }
        ws.close().await;
    }
    let stored = all_messages(&http, &p, &users[0].token, &chat).await;
    let ids: Vec<&str> = stored
        .iter()
        .map(|m| m["clientMsgId"].as_str().unwrap())
        .collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "no duplicates after the retries");
    assert_eq!(
        unique,
        sent_all.iter().map(String::as_str).collect::<HashSet<_>>()
    );
    for (i, m) in stored.iter().enumerate() {
        assert_eq!(m["seq"].as_i64().unwrap(), i as i64 + 1);
    }
}

async fn metric(http: &reqwest::Client, p: &Binary, name: &str) -> f64 {
    let text = http
        .get(p.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_reader_that_never_reads_is_cut_with_4429_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let p = spawn(dir.path(), &[("SWITCHBOARD_WS__RATE_LIMIT", "0")]);
    let http = reqwest::Client::new();
    let sender = register(&http, &p, "sender").await;
    let slow = register(&http, &p, "slow").await;
    let fast = register(&http, &p, "fast").await;
    let chat = group(&http, &p, &sender, &[&slow, &fast]).await;

    // The fast reader counts every message it gets.
    let mut fast_ws = Ws::connect(p.addr, &fast.token).await;
    let fast_count = Arc::new(AtomicUsize::new(0));
    let fc = fast_count.clone();
    let fast_task = tokio::spawn(async move {
        while let Some(Ok(msg)) = fast_ws.stream.next().await {
            if let Message::Text(t) = msg {
                if t.contains(r#""event":"message""#) {
                    fc.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    });
    let mut slow_ws = Ws::connect(p.addr, &slow.token).await; // and then never reads
    let mut sender_ws = Ws::connect(p.addr, &sender.token).await;
    let content = "€".repeat(4000); // 12 kB per push
    let rss_before = p.rss_kb();

    const TOTAL: usize = 2500; // ~30 MB of pushes the slow reader never takes
    let mut sent = 0;
    let mut overflowed_at = None;
    while sent < TOTAL {
        // Pipeline 50 at a time, then wait for their replies.
        for _ in 0..50 {
            sender_ws
                .send("message", json!({"chatId": chat, "content": content}))
                .await;
        }
        for _ in 0..50 {
            sender_ws.event("message:ack").await;
        }
        sender_ws.buffer.clear();
        sent += 50;
        if overflowed_at.is_none()
            && metric(&http, &p, "switchboard_ws_send_queue_overflows_total").await >= 1.0
        {
            overflowed_at = Some(sent);
        }
    }
    let rss_after = p.rss_kb();
    let overflowed_at = overflowed_at.expect("the slow reader's queue overflowed");
    let grown_mb = (rss_after as f64 - rss_before as f64) / 1024.0;
    eprintln!("slow consumer: cut after {overflowed_at} messages; server RSS {rss_before} kB -> {rss_after} kB ({grown_mb:.1} MB)");
    // Unbounded buffering for the slow reader would hold ~30 MB of frames.
    assert!(grown_mb < 20.0, "server memory grew by {grown_mb:.1} MB");

    // The fast reader got every message.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while fast_count.load(Ordering::SeqCst) < TOTAL {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fast reader got {} of {TOTAL}",
            fast_count.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fast_task.abort();

    // The slow reader's socket ends (with 4429 if it reads again within the close linger; the
    // next test shows that) without it having been sent everything.
    slow_ws.close_code().await;
    let got = slow_ws
        .buffer
        .iter()
        .filter(|f| f["event"] == "message")
        .count();
    assert!(got < TOTAL, "it got {got} of {TOTAL}");
}

#[tokio::test]
async fn a_slow_reader_that_resumes_reading_sees_4429() {
    let dir = tempfile::tempdir().unwrap();
    let p = spawn(
        dir.path(),
        &[
            ("SWITCHBOARD_WS__RATE_LIMIT", "0"),
            ("SWITCHBOARD_WS__SEND_QUEUE", "16"),
        ],
    );
    let http = reqwest::Client::new();
    let sender = register(&http, &p, "sender").await;
    let slow = register(&http, &p, "slow").await;
    let chat = group(&http, &p, &sender, &[&slow]).await;
    let mut slow_ws = Ws::connect(p.addr, &slow.token).await;
    let mut sender_ws = Ws::connect(p.addr, &sender.token).await;
    let content = "€".repeat(4000);
    let mut sent = 0;
    while metric(&http, &p, "switchboard_ws_send_queue_overflows_total").await < 1.0 {
        assert!(sent < 5000, "no overflow after {sent} messages");
        for _ in 0..20 {
            sender_ws
                .send("message", json!({"chatId": chat, "content": content}))
                .await;
        }
        for _ in 0..20 {
            sender_ws.event("message:ack").await;
        }
        sender_ws.buffer.clear();
        sent += 20;
    }
    // It reads again now: it gets what was in flight, then the close with the reason.
    assert_eq!(slow_ws.close_code().await, Some(4429));
    let got = slow_ws
        .buffer
        .iter()
        .filter(|f| f["event"] == "message")
        .count();
    assert!(got < sent, "got {got} of {sent}");
    // The sender was never held up and stays connected.
    sender_ws.ok("ping", json!({})).await;
}

#[tokio::test]
async fn sigterm_exits_zero_and_closes_with_1012() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(dir.path(), &[]);
    let http = reqwest::Client::new();
    let u = register(&http, &p, "alice").await;
    let mut ws = Ws::connect(p.addr, &u.token).await;
    p.signal("-TERM");
    assert_eq!(ws.close_code().await, Some(1012));
    let status = p.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "graceful exit");
}

fn switchboard(args: &[&str]) -> std::process::Output {
    Command::new(crate::binary::BIN)
        .args(args)
        .env_remove("SWITCHBOARD_HTTP__LISTEN")
        .output()
        .unwrap()
}

#[test]
fn check_config_accepts_the_reference_and_names_bad_keys() {
    let reference = concat!(env!("CARGO_MANIFEST_DIR"), "/turn-config/switchboard.toml");
    let out = switchboard(&["check-config", "--config", reference]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[ws]\nheartbeat = \"5s\"\n").unwrap();
    let out = switchboard(&["check-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("heartbeat"), "{err}");

    std::fs::write(&bad, "[ws]\nidle_timeout = \"ten\"\n").unwrap();
    let out = switchboard(&["check-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ws.idle_timeout"));

    let out = switchboard(&["check-config", "--config", "/nonexistent.toml"]);
    assert_eq!(out.status.code(), Some(78));

    let out = switchboard(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("serve") && help.contains("check-config"),
        "{help}"
    );
}

#[tokio::test]
async fn metrics_endpoint_speaks_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    let p = spawn(dir.path(), &[]);
    let http = reqwest::Client::new();
    let u = register(&http, &p, "alice").await;
    let mut ws = Ws::connect(p.addr, &u.token).await;
    ws.ok("ping", json!({})).await;
    let text = http
        .get(p.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("switchboard_build_info"), "{text}");
    assert_eq!(metric(&http, &p, "switchboard_ws_connections").await, 1.0);
    assert!(
        text.contains(r#"switchboard_ws_events_total{event="ping"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn sigint_ends_calls_with_server_shutdown_and_closes_with_1001() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(dir.path(), &[]);
    let http = reqwest::Client::new();
    let a = register(&http, &p, "alice").await;
    let b = register(&http, &p, "bob").await;
    let body: Value = http
        .post(p.url("/api/chats"))
        .bearer_auth(&a.token)
        .json(&json!({"participantIds": [b.id]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let chat = body["chat"]["id"].as_str().unwrap().to_owned();
    let mut wa = Ws::connect(p.addr, &a.token).await;
    let mut wb = Ws::connect(p.addr, &b.token).await;
    let offer = json!({"type": "offer", "sdp": "v=0"});
    wa.ok(
        "call:initiate",
        json!({"chatId": chat, "offer": offer, "callType": "audio"}),
    )
    .await;
    wb.event("call:offer").await;
    wb.ok(
        "call:answer",
        json!({"chatId": chat, "answer": {"type": "answer", "sdp": "v=0"}}),
    )
    .await;
    wa.event("call:answer").await;

    p.signal("-INT");
    for ws in [&mut wa, &mut wb] {
        assert_eq!(ws.event("call:end").await["reason"], "server_shutdown");
        assert_eq!(ws.close_code().await, Some(1001));
    }
    assert_eq!(p.child.wait().unwrap().code(), Some(0));
    // The call was recorded before the process exited.
    let p = spawn(dir.path(), &[]);
    let page: Value = http
        .get(p.url(&format!("/api/chats/{chat}/messages")))
        .bearer_auth(&a.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let last = page["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["call"]["outcome"], "server_shutdown", "{page}");
}

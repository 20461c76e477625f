//! Reconnect and catch-up: `sync` from the client's cursors returns exactly what was missed.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn reconnect_sync_gets_exactly_the_missed_messages() {
    let s = TestServer::start_with(|c| c.ws.rate_limit = 0).await;
    let a = s.register("alice").await;
    let b = s.register("bob").await;
    let c = s.register("carl").await;
    let chat_ab = s.direct_chat(&a, &b).await;
    let (_, g) = s
        .post(
            "/api/chats",
            Some(&a.token),
            json!({"participantIds": [b.id, c.id], "title": "g"}),
        )
        .await;
    let group = g["chat"]["id"].as_str().unwrap().to_owned();

    let mut wa = s.ws(&a).await;
    let mut wc = s.ws(&c).await;
    let mut wb = s.ws(&b).await;
    // Bob receives a few live and remembers his cursors, as a client does.
    let mut cursors: HashMap<String, i64> = HashMap::new();
    let mut seen: Vec<(String, i64)> = Vec::new();
    for i in 0..5 {
        wa.ok(
            "message",
            json!({"chatId": chat_ab, "content": format!("live {i}")}),
        )
        .await;
        wc.ok(
            "message",
            json!({"chatId": group, "content": format!("live g{i}")}),
        )
        .await;
    }
    for _ in 0..10 {
        let m = wb.event("message").await;
        let chat = m["chatId"].as_str().unwrap().to_owned();
        let seq = m["seq"].as_i64().unwrap();
        seen.push((chat.clone(), seq));
        cursors.insert(chat, seq);
    }
    wb.close().await;

    // Others keep sending while Bob is away.
    for i in 0..40 {
        wa.ok(
            "message",
            json!({"chatId": chat_ab, "content": format!("missed {i}")}),
        )
        .await;
        if i % 2 == 0 {
            wc.ok(
                "message",
                json!({"chatId": group, "content": format!("missed g{i}")}),
            )
            .await;
        }
    }

    // Bob comes back and syncs from his cursors.
    let mut wb = s.ws(&b).await;
    let sync = wb.ok("sync", json!({"cursors": cursors})).await;
    let mut by_chat: HashMap<String, Vec<Value>> = HashMap::new();
    for entry in sync["chats"].as_array().unwrap() {
        assert_eq!(entry["hasMore"], false);
        by_chat.insert(
            entry["chatId"].as_str().unwrap().to_owned(),
            entry["messages"].as_array().unwrap().clone(),
        );
    }
    let check = |chat: &str, from: i64, count: usize, prefix: &str| {
        let msgs = &by_chat[chat];
        assert_eq!(msgs.len(), count, "{chat}");
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(
                m["seq"].as_i64().unwrap(),
                from + i as i64,
                "in order, no gaps"
            );
            assert!(m["content"].as_str().unwrap().starts_with(prefix), "{m}");
        }
    };
    check(&chat_ab, 6, 40, "missed ");
    check(&group, 6, 20, "missed g");
    for (chat, seq) in &seen {
        assert!(
            by_chat[chat]
                .iter()
                .all(|m| m["seq"].as_i64().unwrap() != *seq),
            "no duplicates of what was seen"
        );
    }
    // Nothing is pushed twice after the sync either.
    wb.no_event("message", std::time::Duration::from_millis(300))
        .await;

    // A chat missing from the cursors counts from 0; more than 200 sets hasMore.
    for i in 0..205 {
        wa.ok(
            "message",
            json!({"chatId": chat_ab, "content": format!("bulk {i}")}),
        )
        .await;
    }
    let sync = wb.ok("sync", json!({"cursors": {}})).await;
    let entry = sync["chats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["chatId"] == chat_ab.as_str())
        .unwrap()
        .clone();
    assert_eq!(entry["messages"].as_array().unwrap().len(), 200);
    assert_eq!(entry["messages"][0]["seq"], 1);
    assert_eq!(entry["hasMore"], true);
    s.stop().await;
}

#[tokio::test]
async fn data_survives_a_graceful_restart() {
    let s = TestServer::start().await;
    let a = s.register("alice").await;
    let b = s.register("bob").await;
    let chat = s.direct_chat(&a, &b).await;
    let mut wa = s.ws(&a).await;
    wa.ok("message", json!({"chatId": chat, "content": "persisted"}))
        .await;
    let dir = s.stop().await;
    let config = test_config(dir.path());
    let s = TestServer::start_in(dir, config).await;
    // Same secret, same users, same messages; tokens issued before still work.
    let (status, page) = s
        .get(&format!("/api/chats/{chat}/messages"), &b.token)
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"][0]["content"], "persisted");
    s.stop().await;
}

//! The whole app on PostgreSQL (`database.url = postgres://…`): chat over the WebSocket with
//! acks, receipts and history, and what was acknowledged is there after a restart.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn postgres_chat_receipts_history_and_a_restart() {
    let db = fresh_postgres_db().await;
    let url = db.clone();
    let s = TestServer::start_with(move |c| c.database.url = url).await;
    let a = s.register("alice").await;
    let b = s.register("bob").await;
    let chat = s.direct_chat(&a, &b).await;
    let mut wa = s.ws(&a).await;
    let mut wb = s.ws(&b).await;
    let m1 = wa
        .ok(
            "message",
            json!({"chatId": chat, "content": "привет 👋", "clientMsgId": "c1"}),
        )
        .await["message"]
        .clone();
    assert_eq!(m1["seq"], 1);
    let got = wb.event("message").await;
    assert_eq!(got["content"], "привет 👋");
    let st = wa.event("message:status").await;
    assert_eq!(
        st,
        json!({"messageId": m1["id"], "chatId": chat, "seq": 1, "status": "delivered"})
    );
    // A retry with the same clientMsgId is the same message.
    let again = wa
        .ok(
            "message",
            json!({"chatId": chat, "content": "привет 👋", "clientMsgId": "c1"}),
        )
        .await["message"]
        .clone();
    assert_eq!(again["id"], m1["id"]);
    for i in 2..=5 {
        let m = wb
            .ok(
                "message",
                json!({"chatId": chat, "content": format!("m{i}")}),
            )
            .await;
        assert_eq!(m["message"]["seq"], i);
    }
    wb.ok("message:read", json!({"chatId": chat, "seq": 1}))
        .await;
    let st = wa.event("message:status").await;
    assert_eq!(
        (st["seq"].clone(), st["status"].clone()),
        (json!(1), json!("read"))
    );
    wa.no_event("error", Duration::from_millis(100)).await;
    wa.close().await;
    wb.close().await;

    // A restart (same data dir, so the same signing key): everything acknowledged is there.
    let dir = s.stop().await;
    let mut config = test_config(dir.path());
    config.database.url = db;
    let s = TestServer::start_in(dir, config).await;
    let (status, body) = s
        .get(&format!("/api/chats/{chat}/messages?limit=50"), &a.token)
        .await;
    assert_eq!(status, 200, "{body}");
    let seqs: Vec<i64> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    assert_eq!(body["messages"][0]["status"], "read");
    let (status, chats) = s.get("/api/chats", &b.token).await;
    assert_eq!(status, 200);
    assert_eq!(chats["chats"][0]["unreadCount"], 0, "{chats}");
    s.stop().await;
}

/// A node's SQLite history moved to PostgreSQL with `switchboard migrate-store` (the real
/// binary): the app on PostgreSQL then serves the same history, statuses and logins, and new
/// messages go on from the copied seqs. A second run into the now non-empty database refuses.
#[tokio::test]
async fn postgres_migrate_store_from_sqlite() {
    let s = TestServer::start().await;
    let a = s.register("alice").await;
    let b = s.register("bob").await;
    let chat = s.direct_chat(&a, &b).await;
    let mut wa = s.ws(&a).await;
    for i in 1..=7 {
        wa.ok(
            "message",
            json!({"chatId": chat, "content": format!("m{i} ✓")}),
        )
        .await;
    }
    let mut wb = s.ws(&b).await;
    wb.ok("sync", json!({"cursors": {}})).await;
    wb.ok("message:read", json!({"chatId": chat, "seq": 3}))
        .await;
    let pinned = wa
        .ok("message", json!({"chatId": chat, "content": "pin me"}))
        .await["message"]["id"]
        .clone();
    wa.ok("message:pin", json!({"messageId": pinned})).await;
    wa.close().await;
    wb.close().await;
    let (_, before) = s
        .get(&format!("/api/chats/{chat}/messages?limit=50"), &a.token)
        .await;
    let (_, list_before) = s.get("/api/chats", &b.token).await;
    let dir = s.stop().await;

    let db = fresh_postgres_db().await;
    let sqlite = format!("sqlite://{}", dir.path().join("switchboard.db").display());
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["migrate-store", "--from", &sqlite, "--to", &db])
            .output()
            .unwrap()
    };
    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("messages: 8 rows"), "{stdout}");
    assert!(stdout.contains("verified"), "{stdout}");

    let mut config = test_config(dir.path());
    config.database.url = db.clone();
    let s = TestServer::start_in(dir, config).await;
    let (_, after) = s
        .get(&format!("/api/chats/{chat}/messages?limit=50"), &a.token)
        .await;
    assert_eq!(after, before, "the same history, statuses and pin");
    let (_, list_after) = s.get("/api/chats", &b.token).await;
    assert_eq!(
        list_after, list_before,
        "the same chat list and unread count"
    );
    // Logins work (the password hashes moved), and seqs go on.
    let (status, _) = s
        .post(
            "/api/auth/login",
            None,
            json!({"username": "bob", "password": "password123"}),
        )
        .await;
    assert_eq!(status, 200);
    let mut wa = s.ws(&a).await;
    let next = wa
        .ok("message", json!({"chatId": chat, "content": "on postgres"}))
        .await;
    assert_eq!(next["message"]["seq"], 9);
    wa.close().await;
    let _dir = s.stop().await; // keeps the SQLite file for the second run

    // A path without its sqlite: prefix is refused, not taken for ./switchboard.db.
    let bare = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "migrate-store",
            "--from",
            sqlite.trim_start_matches("sqlite://"),
            "--to",
            &db,
        ])
        .output()
        .unwrap();
    assert!(!bare.status.success());
    assert!(
        String::from_utf8_lossy(&bare.stderr).contains("--from must name the SQLite file"),
        "{}",
        String::from_utf8_lossy(&bare.stderr)
    );

    let again = run();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already holds users"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

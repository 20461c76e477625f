//! Every REST route of PROTOCOL §1, with its failure cases.

use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn register_login_refresh_me() {
    let s = TestServer::start().await;
    let alice = s.register("alice").await;

    let (status, body) = s.get("/api/me", &alice.token).await;
    assert_eq!(status, 200);
    assert_eq!(body["user"]["username"], "alice");
    assert_eq!(body["user"]["displayName"], "ALICE");
    assert_eq!(body["user"]["id"], alice.id.as_str());

    // Taken username.
    let (status, body) = s
        .post(
            "/api/auth/register",
            None,
            json!({"username": "alice", "password": "password123"}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("conflict"))
    );

    // Validation names the field.
    let (status, body) = s
        .post("/api/auth/register", None, json!({"username": "bob"}))
        .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("password"),
        "{body}"
    );
    let (status, _) = s
        .post(
            "/api/auth/register",
            None,
            json!({"username": "Bad Name", "password": "password123"}),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = s
        .post(
            "/api/auth/register",
            None,
            json!({"username": "bobby", "password": "short"}),
        )
        .await;
    assert_eq!(status, 400);
    let resp = s
        .http
        .post(s.url("/api/auth/register"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");

    // Login: same answer for a wrong password and an unknown user.
    let (status, good) = s
        .post(
            "/api/auth/login",
            None,
            json!({"username": "alice", "password": "password123"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(good["expiresIn"], 900);
    let (s1, wrong) = s
        .post(
            "/api/auth/login",
            None,
            json!({"username": "alice", "password": "nope-nope"}),
        )
        .await;
    let (s2, unknown) = s
        .post(
            "/api/auth/login",
            None,
            json!({"username": "nobody", "password": "nope-nope"}),
        )
        .await;
    assert_eq!((s1, s2), (401, 401));
    assert_eq!(wrong["error"]["message"], unknown["error"]["message"]);

    // Refresh rotates: the old token stops working, and presenting it again revokes the family.
    let (status, pair) = s
        .post(
            "/api/auth/refresh",
            None,
            json!({"refreshToken": alice.refresh}),
        )
        .await;
    assert_eq!(status, 200, "{pair}");
    let new_refresh = pair["refreshToken"].as_str().unwrap().to_owned();
    assert_ne!(new_refresh, alice.refresh);
    let (status, _) = s
        .get("/api/me", pair["accessToken"].as_str().unwrap())
        .await;
    assert_eq!(status, 200);
    let (status, _) = s
        .post(
            "/api/auth/refresh",
            None,
            json!({"refreshToken": alice.refresh}),
        )
        .await;
    assert_eq!(status, 401, "reuse of a rotated refresh token");
    let (status, _) = s
        .post(
            "/api/auth/refresh",
            None,
            json!({"refreshToken": new_refresh}),
        )
        .await;
    assert_eq!(status, 401, "theft detection revoked the whole login");
    // Another login of the same user is unaffected.
    let (status, _) = s
        .post(
            "/api/auth/refresh",
            None,
            json!({"refreshToken": good["refreshToken"]}),
        )
        .await;
    assert_eq!(status, 200);
    s.stop().await;
}

#[tokio::test]
async fn login_is_throttled() {
    let s = TestServer::start().await;
    s.register("carol").await;
    for _ in 0..5 {
        let (status, _) = s
            .post(
                "/api/auth/login",
                None,
                json!({"username": "carol", "password": "wrong-wrong"}),
            )
            .await;
        assert_eq!(status, 401);
    }
    let resp = s
        .http
        .post(s.url("/api/auth/login"))
        .json(&json!({"username": "carol", "password": "password123"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        429,
        "even the right password waits out the lock"
    );
    assert!(resp.headers().get("retry-after").is_some());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    s.stop().await;
}

#[tokio::test]
async fn registration_can_be_disabled() {
    let s = TestServer::start_with(|c| c.auth.allow_registration = false).await;
    let (status, body) = s
        .post(
            "/api/auth/register",
            None,
            json!({"username": "dave", "password": "password123"}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    s.stop().await;
}

#[tokio::test]
async fn auth_required_and_bad_tokens_rejected() {
    let s = TestServer::start().await;
    let resp = s.http.get(s.url("/api/me")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    let (status, _) = s.get("/api/chats", "not.a.token").await;
    assert_eq!(status, 401);
    // Expired: a token signed with the real secret but in the past.
    let secret = std::fs::read_to_string(s.dir.path().join("jwt_secret")).unwrap();
    let keys = switchboard::auth::jwt::JwtKeys::new(secret.trim().as_bytes());
    let old = keys.issue("someone", "x", 1_000_000, 60);
    let (status, body) = s.get("/api/me", &old).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["message"], "token expired");
    // Unknown route: JSON 404.
    let (status, body) = s.get("/api/nope", "x").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    s.stop().await;
}

#[tokio::test]
async fn users_chats_and_history() {
    let s = TestServer::start().await;
    let a = s.register("anna").await;
    let b = s.register("boris").await;
    let c = s.register("clara").await;

    let (status, body) = s.get("/api/users", &a.token).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = body["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["anna", "boris", "clara"]);
    assert_eq!(body["users"][0]["isOnline"], false);

    // Direct chat: created once (201), then returned (200).
    let (status, first) = s
        .post(
            "/api/chats",
            Some(&a.token),
            json!({"participantIds": [b.id]}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(first["chat"]["kind"], "direct");
    assert_eq!(first["chat"]["lastSeq"], 0);
    let (status, again) = s
        .post(
            "/api/chats",
            Some(&b.token),
            json!({"participantIds": [a.id]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(again["chat"]["id"], first["chat"]["id"]);
    let chat = first["chat"]["id"].as_str().unwrap().to_owned();

    // Group with a title; unknown participant is 404; empty list is 400.
    let (status, group) = s
        .post(
            "/api/chats",
            Some(&a.token),
            json!({"participantIds": [b.id, c.id], "title": "Team"}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(group["chat"]["kind"], "group");
    assert_eq!(group["chat"]["participantIds"].as_array().unwrap().len(), 3);
    let (status, _) = s
        .post(
            "/api/chats",
            Some(&a.token),
            json!({"participantIds": ["nope"]}),
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = s
        .post("/api/chats", Some(&a.token), json!({"participantIds": []}))
        .await;
    assert_eq!(status, 400);
    let (status, _) = s
        .post("/api/chats", Some(&a.token), json!({"participantIds": "x"}))
        .await;
    assert_eq!(status, 400);

    // 60 messages over the WebSocket, then page through them.
    let mut ws = s.ws(&a).await;
    for i in 1..=60 {
        ws.ok(
            "message",
            json!({"chatId": chat, "content": format!("m{i}")}),
        )
        .await;
    }
    let (status, page) = s
        .get(&format!("/api/chats/{chat}/messages"), &a.token)
        .await;
    assert_eq!(status, 200);
    let seqs = |v: &Value| {
        v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        seqs(&page),
        (11..=60).collect::<Vec<_>>(),
        "latest 50, ascending"
    );
    assert_eq!(page["hasMore"], true);
    let (_, page) = s
        .get(
            &format!("/api/chats/{chat}/messages?beforeSeq=11&limit=20"),
            &a.token,
        )
        .await;
    assert_eq!(seqs(&page), (1..=10).collect::<Vec<_>>());
    assert_eq!(page["hasMore"], false);
    let (_, page) = s
        .get(&format!("/api/chats/{chat}/messages?afterSeq=55"), &b.token)
        .await;
    assert_eq!(seqs(&page), (56..=60).collect::<Vec<_>>());
    let (_, page) = s
        .get(
            &format!("/api/chats/{chat}/messages?afterSeq=0&limit=1000"),
            &b.token,
        )
        .await;
    assert_eq!(seqs(&page).len(), 60, "the cap of 200 is above 60");
    let (status, _) = s
        .get(&format!("/api/chats/{chat}/messages?limit=abc"), &b.token)
        .await;
    assert_eq!(status, 400);
    let (status, _) = s
        .get(&format!("/api/chats/{chat}/messages"), &c.token)
        .await;
    assert_eq!(status, 403, "clara is not in the direct chat");
    let (status, _) = s.get("/api/chats/unknown/messages", &c.token).await;
    assert_eq!(status, 404);

    // The chat list: last message and unread count for the caller.
    let (_, list) = s.get("/api/chats", &b.token).await;
    let chats = list["chats"].as_array().unwrap();
    assert_eq!(chats.len(), 2);
    let direct = chats.iter().find(|c| c["id"] == chat.as_str()).unwrap();
    assert_eq!(direct["lastMessage"]["content"], "m60");
    assert_eq!(direct["unreadCount"], 60);
    assert_eq!(direct["lastSeq"], 60);
    let (_, list) = s.get("/api/chats", &a.token).await;
    let direct = list["chats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == chat.as_str())
        .unwrap()
        .clone();
    assert_eq!(direct["unreadCount"], 0, "own messages are not unread");
    ws.close().await;
    s.stop().await;
}

#[tokio::test]
async fn health_and_readiness() {
    let s = TestServer::start().await;
    let resp = s.http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok");
    let resp = s.http.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    s.stop().await;
}

#[tokio::test]
async fn external_issuer_users_are_created_on_first_sight() {
    let s = TestServer::start_with(|c| {
        c.auth.issuer = "https://idp.example".into();
        c.auth.audience = "switchboard".into();
        c.auth.issuer_secret = "idp-shared-secret".into();
    })
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let sign = |claims: Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"idp-shared-secret"),
        )
        .unwrap()
    };
    let token = sign(
        json!({"sub": "ext-1", "iss": "https://idp.example", "aud": "switchboard", "exp": now + 300, "name": "Eve External", "preferred_username": "eve"}),
    );
    let (status, me) = s.get("/api/me", &token).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["user"]["username"], "eve");
    assert_eq!(me["user"]["displayName"], "Eve External");
    let (_, again) = s.get("/api/me", &token).await;
    assert_eq!(again["user"]["id"], me["user"]["id"], "same sub, same user");
    let wrong_aud = sign(
        json!({"sub": "ext-1", "iss": "https://idp.example", "aud": "other", "exp": now + 300}),
    );
    assert_eq!(s.get("/api/me", &wrong_aud).await.0, 401);
    let expired = sign(
        json!({"sub": "ext-1", "iss": "https://idp.example", "aud": "switchboard", "exp": now - 3600}),
    );
    assert_eq!(s.get("/api/me", &expired).await.0, 401);
    s.stop().await;
}

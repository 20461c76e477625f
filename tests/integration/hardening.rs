//! The account and HTTP edge under abuse (issue 11): proxy-aware throttling, bounded password
//! hashing, attempts counted before verifying, per-address registration limits, per-user caps,
//! presence privacy, strict JSON bodies and the contract details an outside run found.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

/// POST with a forwarded client address, as the shipped nginx config sends it.
async fn post_from(s: &TestServer, path: &str, xff: &str, body: Value) -> (u16, Value) {
    let resp = s
        .http
        .post(s.url(path))
        .header("x-forwarded-for", xff)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn login(username: &str, password: &str) -> Value {
    json!({"username": username, "password": password})
}

#[tokio::test]
async fn behind_a_trusted_proxy_one_address_cannot_lock_out_everyone() {
    let s = TestServer::start().await;
    s.register("alice").await;
    // 20 bad logins (the per-address limit: 4 x login_max_failures) from one client behind the
    // proxy, spread over usernames so no single username locks.
    for i in 0..20 {
        let (status, body) = post_from(
            &s,
            "/api/auth/login",
            "203.0.113.7",
            login(&format!("guess{}", i % 5), "wrong-password"),
        )
        .await;
        assert_eq!(status, 401, "attempt {i}: {body}");
    }
    // That client is now locked out...
    let (status, body) = post_from(
        &s,
        "/api/auth/login",
        "203.0.113.7",
        login("alice", "password123"),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    // ...and everybody else, behind the same proxy, is not.
    let (status, body) = post_from(
        &s,
        "/api/auth/login",
        "198.51.100.9",
        login("alice", "password123"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // The right-most address the proxy did not add is the client: a forged left part is ignored.
    let (status, _) = post_from(
        &s,
        "/api/auth/login",
        "203.0.113.7, 198.51.100.10",
        login("alice", "password123"),
    )
    .await;
    assert_eq!(
        status, 200,
        "a spoofed left-most entry does not pin the lock"
    );
    s.stop().await;
}

#[tokio::test]
async fn an_untrusted_peer_cannot_choose_its_address_with_the_header() {
    let s = TestServer::start_with(|c| {
        c.http.trusted_proxies = Vec::new();
    })
    .await;
    s.register("alice").await;
    for i in 0..20 {
        let (status, _) = post_from(
            &s,
            "/api/auth/login",
            &format!("192.0.2.{i}"),
            login(&format!("guess{}", i % 5), "wrong-password"),
        )
        .await;
        assert_eq!(status, 401);
    }
    // Every attempt came from 127.0.0.1, whatever the header said.
    let (status, _) = post_from(
        &s,
        "/api/auth/login",
        "198.51.100.9",
        login("alice", "password123"),
    )
    .await;
    assert_eq!(status, 429);
    s.stop().await;
}

#[tokio::test]
async fn parallel_guesses_verify_at_most_login_max_failures_times() {
    let s = Arc::new(TestServer::start().await);
    s.register("victim").await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            // A different address each: only the username throttle can stop them.
            let xff = format!("10.{}.{}.1", i / 250, i % 250);
            post_from(
                &s,
                "/api/auth/login",
                &xff,
                login("victim", &format!("guess-{i}")),
            )
            .await
        }));
    }
    let (mut verified, mut limited) = (0, 0);
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            401 => verified += 1,
            429 => {
                assert_eq!(body["error"]["code"], "rate_limited", "{body}");
                limited += 1
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    // Each 401 is one password verification.
    assert!(verified <= 5, "{verified} guesses were verified");
    assert!(verified >= 1, "the first guesses were checked");
    assert_eq!(verified + limited, 200);
    Arc::try_unwrap(s).ok().unwrap().stop().await;
}

/// Peak resident memory of this test process, in KiB. (nextest runs every test in a process
/// of its own, so the peak is this test's.)
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn password_hashing_is_bounded_under_a_flood() {
    let s = Arc::new(TestServer::start().await);
    // Warm up (the dummy hash of unknown users is computed once).
    let (status, _) = post_from(
        &s,
        "/api/auth/login",
        "10.9.9.9",
        login("warmup", "x12345678"),
    )
    .await;
    assert_eq!(status, 401);
    let before = peak_rss_kib();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let xff = format!("10.{}.{}.2", i / 250, i % 250);
            post_from(
                &s,
                "/api/auth/login",
                &xff,
                login(&format!("nobody{i}"), "wrong-password"),
            )
            .await
        }));
    }
    let (mut verified, mut busy) = (0, 0);
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            401 => verified += 1,
            429 => {
                assert_eq!(body["error"]["code"], "rate_limited", "{body}");
                busy += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let grown_mib = (peak_rss_kib() - before) / 1024;
    // argon2id takes 19 MiB per hash: 200 at once would be ~3.8 GiB. About one per core runs.
    let cores = std::thread::available_parallelism().unwrap().get() as u64;
    assert!(
        grown_mib <= 40 + 25 * cores,
        "peak memory grew {grown_mib} MiB under 200 parallel logins"
    );
    assert!(verified >= 1, "some requests were served");
    assert_eq!(verified + busy, 200);
    Arc::try_unwrap(s).ok().unwrap().stop().await;
}

#[tokio::test]
async fn login_usernames_that_cannot_exist_are_refused_before_throttling() {
    let s = TestServer::start().await;
    s.register("alice").await;
    for bad in ["x", "has space", &"a".repeat(33), "ünïcode", ""] {
        for _ in 0..6 {
            let (status, body) = s
                .post("/api/auth/login", None, login(bad, "wrong-password"))
                .await;
            assert_eq!(status, 400, "{bad:?}: {body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("username"),
                "{body}"
            );
        }
    }
    // None of that counted against the address.
    let (status, _) = s
        .post("/api/auth/login", None, login("alice", "password123"))
        .await;
    assert_eq!(status, 200);
    s.stop().await;
}

#[tokio::test]
async fn chat_creation_checks_the_count_before_removing_duplicates() {
    let s = TestServer::start().await;
    let a = s.register("anna").await;
    let b = s.register("boris").await;
    // 10,000 copies of one id in a ~400 KiB body would be a quadratic de-duplication: the
    // count is checked first.
    let ids = vec![b.id.clone(); 5000];
    let (status, body) = s
        .post("/api/chats", Some(&a.token), json!({"participantIds": ids}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("participantIds"),
        "{body}"
    );
    // A few duplicates are still fine.
    let (status, body) = s
        .post(
            "/api/chats",
            Some(&a.token),
            json!({"participantIds": [b.id, b.id, a.id]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["chat"]["kind"], "direct");
    s.stop().await;
}

#[tokio::test]
async fn external_tokens_are_not_valid_before_nbf() {
    let s = TestServer::start_with(|c| {
        c.auth.issuer = "https://idp.example".into();
        c.auth.issuer_secret = "idp-shared-secret".into();
    })
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let sign = |nbf: i64| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &json!({"sub": "ext-1", "iss": "https://idp.example", "exp": now + 600, "nbf": nbf}),
            &jsonwebtoken::EncodingKey::from_secret(b"idp-shared-secret"),
        )
        .unwrap()
    };
    let (status, body) = s.get("/api/me", &sign(now + 3600)).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(s.get("/api/me", &sign(now - 10)).await.0, 200);
    // Within the clock-skew leeway (the same as for `exp`).
    assert_eq!(s.get("/api/me", &sign(now + 10)).await.0, 200);
    s.stop().await;
}

#[tokio::test]
async fn a_refresh_token_presented_twice_at_once_revokes_every_token_of_the_login() {
    let s = Arc::new(TestServer::start().await);
    s.register("rita").await;
    for round in 0..15 {
        let (status, pair) = s
            .post("/api/auth/login", None, login("rita", "password123"))
            .await;
        assert_eq!(status, 200);
        let token = pair["refreshToken"].as_str().unwrap().to_owned();
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let (s, token) = (s.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                s.post("/api/auth/refresh", None, json!({"refreshToken": token}))
                    .await
            }));
        }
        let mut issued = Vec::new();
        for t in tasks {
            let (status, body) = t.await.unwrap();
            if status == 200 {
                issued.push(body["refreshToken"].as_str().unwrap().to_owned());
            } else {
                assert_eq!(status, 401, "{body}");
            }
        }
        assert_eq!(issued.len(), 1, "round {round}: one presentation rotates");
        // The token was presented again: the whole login is revoked, the new token included.
        let (status, _) = s
            .post(
                "/api/auth/refresh",
                None,
                json!({"refreshToken": issued[0]}),
            )
            .await;
        assert_eq!(
            status, 401,
            "round {round}: the rotated token survived a reuse"
        );
    }
    Arc::try_unwrap(s).ok().unwrap().stop().await;
}

#[tokio::test]
async fn post_bodies_must_be_json() {
    let s = TestServer::start().await;
    s.register("alice").await;
    let body = r#"{"username":"alice","password":"password123"}"#;
    for ctype in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let mut req = s.http.post(s.url("/api/auth/login")).body(body);
        if let Some(c) = ctype {
            req = req.header("content-type", c);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 415, "{ctype:?}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "unsupported_media_type", "{v}");
    }
    let resp = s
        .http
        .post(s.url("/api/auth/login"))
        .header("content-type", "application/json; charset=utf-8")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    s.stop().await;
}

#[tokio::test]
async fn presence_is_shown_only_to_users_who_share_a_chat() {
    let s = TestServer::start().await;
    let alice = s.register("alice").await;
    let bob = s.register("bob").await;
    let carol = s.register("carol").await;
    s.direct_chat(&alice, &bob).await;
    let ws = s.ws(&alice).await;
    let find = |body: &Value, id: &str| {
        body["users"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["id"] == id)
            .unwrap()
            .clone()
    };
    let (_, seen_by_bob) = s.get("/api/users", &bob.token).await;
    assert_eq!(find(&seen_by_bob, &alice.id)["isOnline"], true);
    let (_, seen_by_carol) = s.get("/api/users", &carol.token).await;
    assert_eq!(find(&seen_by_carol, &alice.id)["isOnline"], false);
    assert!(find(&seen_by_carol, &alice.id)["lastSeenAt"].is_null());
    // The same over the WebSocket.
    let mut carol_ws = s.ws(&carol).await;
    let list = carol_ws.ok("users:list", json!({})).await;
    assert_eq!(find(&list, &alice.id)["isOnline"], false);
    // After alice leaves, bob sees when; carol still sees nothing.
    ws.close().await;
    let mut last_seen = Value::Null;
    for _ in 0..50 {
        let (_, body) = s.get("/api/users", &bob.token).await;
        last_seen = find(&body, &alice.id)["lastSeenAt"].clone();
        if !last_seen.is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(last_seen.is_string(), "bob sees alice's last-seen time");
    let list = carol_ws.ok("users:list", json!({})).await;
    assert!(find(&list, &alice.id)["lastSeenAt"].is_null());
    // One's own entry is always shown.
    assert_eq!(find(&list, &carol.id)["isOnline"], true);
    s.stop().await;
}

#[tokio::test]
async fn a_field_of_the_wrong_type_is_a_400_naming_the_field() {
    let s = TestServer::start().await;
    let a = s.register("anna").await;
    for (path, token, body, field) in [
        (
            "/api/auth/register",
            None,
            json!({"username": 5, "password": "password123"}),
            "username",
        ),
        (
            "/api/auth/login",
            None,
            json!({"username": "anna", "password": ["x"]}),
            "password",
        ),
        (
            "/api/chats",
            Some(a.token.as_str()),
            json!({"participantIds": "x"}),
            "participantIds",
        ),
        (
            "/api/chats",
            Some(a.token.as_str()),
            json!({"participantIds": [1]}),
            "participantIds",
        ),
        (
            "/api/auth/refresh",
            None,
            json!({"refreshToken": {}}),
            "refreshToken",
        ),
    ] {
        let (status, resp) = s.post(path, token, body).await;
        assert_eq!(status, 400, "{path}: {resp}");
        let message = resp["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(field),
            "{path}: `{message}` names {field}"
        );
        assert!(!message.contains("line "), "{path}: `{message}`");
    }
    // The same on the WebSocket.
    let mut ws = s.ws(&a).await;
    let r = ws
        .request("message", json!({"chatId": 5, "content": "x"}))
        .await;
    let message = r["error"]["message"].as_str().unwrap();
    assert!(message.contains("chatId"), "{message}");
    s.stop().await;
}

#[tokio::test]
async fn the_connection_id_is_a_uuid_v7() {
    let s = TestServer::start().await;
    let a = s.register("anna").await;
    let ws = s.ws(&a).await;
    let id = ws.established["connectionId"].as_str().unwrap();
    let parsed = uuid::Uuid::parse_str(id).unwrap_or_else(|e| panic!("{id}: {e}"));
    assert_eq!(parsed.get_version_num(), 7, "{id}");
    s.stop().await;
}

#[tokio::test]
async fn the_data_directory_and_database_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let data = parent.path().join("fresh-data-dir");
    let mut config = test_config(&data);
    config.data_dir = data.clone();
    let s = TestServer::start_in(tempfile::tempdir().unwrap(), config).await;
    let a = s.register("anna").await;
    let b = s.register("boris").await;
    s.direct_chat(&a, &b).await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "data directory");
    let mut seen = 0;
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("switchboard.db") || name.ends_with("secret") {
            assert_eq!(mode(&path), 0o600, "{name}");
            seen += 1;
        }
    }
    assert!(
        seen >= 3,
        "the database, its WAL and the secrets were checked"
    );
    s.stop().await;
}

/// Counts the SQL statements sqlx runs (its `sqlx::query` events) in this test process
/// (nextest runs every test in a process of its own, so they are this test's).
static QUERIES: AtomicUsize = AtomicUsize::new(0);

struct CountQueries;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountQueries {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if event.metadata().target().starts_with("sqlx::query") {
            QUERIES.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn count_queries() {
    use tracing_subscriber::layer::SubscriberExt;
    let filter = tracing_subscriber::filter::Targets::new()
        .with_target("sqlx::query", tracing::Level::TRACE);
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::Layer::with_filter(CountQueries, filter));
    let _ = tracing::subscriber::set_global_default(subscriber);
}

#[tokio::test]
async fn the_chat_list_and_sync_take_a_bounded_number_of_queries() {
    count_queries();
    let s = TestServer::start().await;
    let me = s.register("many").await;
    let mut ws = s.ws(&me).await;
    for i in 0..40 {
        let other = s.register(&format!("peer{i:02}")).await;
        let chat = s.direct_chat(&me, &other).await;
        ws.ok("message", json!({"chatId": chat, "content": "hello"}))
            .await;
    }
    let before = QUERIES.load(Ordering::Relaxed);
    let (status, list) = s.get("/api/chats", &me.token).await;
    assert_eq!(status, 200);
    assert_eq!(list["chats"].as_array().unwrap().len(), 40);
    let chat_list = QUERIES.load(Ordering::Relaxed) - before;
    assert!(chat_list > 0, "queries are counted");
    let before = QUERIES.load(Ordering::Relaxed);
    let reply = ws.ok("sync", json!({"cursors": {}})).await;
    assert_eq!(reply["chats"].as_array().unwrap().len(), 40);
    let sync = QUERIES.load(Ordering::Relaxed) - before;
    // Authentication and the receipts written after the reply add a few; 40 chats must not
    // mean 40 (or 120) queries.
    assert!(chat_list <= 8, "GET /api/chats took {chat_list} queries");
    assert!(sync <= 12, "sync took {sync} queries");
    s.stop().await;
}

#[tokio::test]
async fn registration_is_limited_per_client_address() {
    let s = TestServer::start_with(|c| c.auth.register_max_per_ip = 3).await;
    let reg = |name: &str| json!({"username": name, "password": "password123"});
    for i in 0..3 {
        let (status, body) = post_from(
            &s,
            "/api/auth/register",
            "203.0.113.7",
            reg(&format!("user{i}")),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = post_from(&s, "/api/auth/register", "203.0.113.7", reg("user3")).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    // IPv6 clients are counted per /64.
    for i in 0..3 {
        let (status, _) = post_from(
            &s,
            "/api/auth/register",
            &format!("2001:db8:7:7::{i}"),
            reg(&format!("six{i}")),
        )
        .await;
        assert_eq!(status, 201);
    }
    let (status, _) = post_from(
        &s,
        "/api/auth/register",
        "2001:db8:7:7:ffff::1",
        reg("six3"),
    )
    .await;
    assert_eq!(status, 429, "same /64");
    let (status, _) = post_from(&s, "/api/auth/register", "198.51.100.1", reg("user3")).await;
    assert_eq!(status, 201, "another address is not affected");
    s.stop().await;
}

#[tokio::test]
async fn connections_per_user_are_capped_across_devices() {
    let s = TestServer::start_with(|c| c.ws.max_connections_per_user = 3).await;
    let a = s.register("anna").await;
    let b = s.register("boris").await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(s.ws(&a).await);
    }
    let mut fourth = Ws::connect_raw(s.addr, Some(&a.token)).await;
    let first = fourth.next_frame().await.expect("an error frame first");
    assert_eq!(first["event"], "error", "{first}");
    assert_eq!(first["data"]["code"], "rate_limited");
    assert_eq!(fourth.close_code().await, Some(4429));
    // Another user is not affected, and a freed slot can be used again.
    let other = s.ws(&b).await;
    open.pop().unwrap().close().await;
    let mut again = None;
    for _ in 0..50 {
        let mut ws = Ws::connect_raw(s.addr, Some(&a.token)).await;
        let first = ws.next_frame().await.unwrap();
        if first["event"] == "connection:established" {
            again = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again.is_some(), "the closed connection's slot was freed");
    other.close().await;
    s.stop().await;
}

#[tokio::test]
async fn the_message_rate_is_per_user_across_connections() {
    let s = TestServer::start_with(|c| {
        c.ws.rate_limit = 0;
        c.ws.user_message_rate = 1;
        c.ws.user_message_burst = 100;
    })
    .await;
    let a = s.register("anna").await;
    let b = s.register("boris").await;
    let chat = s.direct_chat(&a, &b).await;
    let mut one = s.ws(&a).await;
    let mut two = s.ws(&a).await;
    let (mut ok, mut limited) = (0, 0);
    let started = std::time::Instant::now();
    for i in 0..70 {
        for ws in [&mut one, &mut two] {
            let r = ws
                .request(
                    "message",
                    json!({"chatId": chat, "content": format!("m{i}")}),
                )
                .await;
            if r["ok"] == true {
                ok += 1;
            } else {
                assert_eq!(r["error"]["code"], "rate_limited", "{r}");
                limited += 1;
            }
        }
    }
    // The burst of 100 plus one per second since: well under what each connection alone could
    // have sent.
    let refilled = started.elapsed().as_secs() as i32 + 1;
    assert!(
        ok >= 100 && ok <= 100 + refilled,
        "{ok} sent in {:?}",
        started.elapsed()
    );
    assert_eq!(ok + limited, 140);
    // Forwards count each message: a user with 99 messages left cannot forward 100 at once,
    // but can forward 99.
    let c = s.register("carl").await;
    let chat_c = s.direct_chat(&c, &b).await;
    let mut carl = s.ws(&c).await;
    carl.ok("message", json!({"chatId": chat_c, "content": "one"}))
        .await;
    let (_, page) = s
        .get(&format!("/api/chats/{chat}/messages?limit=100"), &a.token)
        .await;
    let ids: Vec<Value> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids.len(), 100);
    // carl may forward from a chat he is in.
    let own = carl
        .ok("message", json!({"chatId": chat_c, "content": "two"}))
        .await;
    let own_id = own["message"]["id"].clone();
    let hundred: Vec<Value> = (0..100).map(|_| own_id.clone()).collect();
    let r = carl
        .request(
            "message:forward-multiple",
            json!({"messageIds": hundred, "toChatId": chat_c}),
        )
        .await;
    assert_eq!(r["error"]["code"], "rate_limited", "98 left: {r}");
    let r = carl
        .request(
            "message:forward-multiple",
            json!({"messageIds": hundred[..98], "toChatId": chat_c}),
        )
        .await;
    assert_eq!(r["ok"], true, "98 fit: {r}");
    // And no more than 100 ids at once.
    let too_many: Vec<Value> = (0..101).map(|_| ids[0].clone()).collect();
    let r = one
        .request(
            "message:forward-multiple",
            json!({"messageIds": too_many, "toChatId": chat}),
        )
        .await;
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
    s.stop().await;
}

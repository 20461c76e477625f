//! Test harness: the real app on port 0 in a temp dir, an HTTP client, and a WebSocket client
//! that keeps pushes it has not been asked about yet.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use switchboard::config::Config;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    running: Option<switchboard::app::Running>,
}

pub fn test_config(dir: &std::path::Path) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.turn.enabled = false;
    c.presence.offline_grace = Duration::from_millis(300);
    // Every test user registers from 127.0.0.1; the per-address limit has its own test.
    c.auth.register_max_per_ip = 10_000;
    // Many tests send bursts of messages; the per-user rate has its own test.
    c.ws.user_message_rate = 0;
    c
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        f(&mut config);
        Self::start_in(dir, config).await
    }

    /// The app behind HTTPS with a fresh self-signed certificate for localhost (in `dir`).
    pub async fn start_https(f: impl FnOnce(&mut Config)) -> (Self, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        let (cert, key) = make_cert(dir.path(), "localhost");
        config.http.tls_cert_file = Some(cert.clone());
        config.http.tls_key_file = Some(key);
        f(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = switchboard::app::spawn_https(config, listener, CancellationToken::new())
            .await
            .unwrap();
        let s = Self {
            addr: running.addr,
            http: reqwest::Client::new(),
            dir,
            running: Some(running),
        };
        (s, cert)
    }

    /// All of the TURN server's addresses.
    pub fn turn(&self) -> switchboard::turn::Addresses {
        self.running
            .as_ref()
            .and_then(|r| r.turn.clone())
            .expect("TURN is on")
    }

    pub async fn start_in(dir: tempfile::TempDir, config: Config) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = switchboard::app::spawn(config, listener, CancellationToken::new())
            .await
            .unwrap();
        Self {
            addr: running.addr,
            http: reqwest::Client::new(),
            dir,
            running: Some(running),
        }
    }

    /// The embedded TURN server's UDP address, when enabled.
    pub fn turn_addr(&self) -> Option<std::net::SocketAddr> {
        self.running.as_ref().and_then(|r| r.turn_addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn stop(mut self) -> tempfile::TempDir {
        self.running.take().unwrap().stop().await.unwrap();
        self.dir
    }

    pub async fn register(&self, username: &str) -> TestUser {
        let resp = self
            .http
            .post(self.url("/api/auth/register"))
            .json(&json!({"username": username, "password": "password123", "displayName": username.to_uppercase()}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "register {username}");
        let body: Value = resp.json().await.unwrap();
        TestUser {
            id: body["user"]["id"].as_str().unwrap().to_owned(),
            token: body["accessToken"].as_str().unwrap().to_owned(),
            refresh: body["refreshToken"].as_str().unwrap().to_owned(),
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self.http.post(self.url(path)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// The direct chat between `a` and `b`.
    pub async fn direct_chat(&self, a: &TestUser, b: &TestUser) -> String {
        let (status, body) = self
            .post(
                "/api/chats",
                Some(&a.token),
                json!({"participantIds": [b.id]}),
            )
            .await;
        assert!(status == 201 || status == 200, "{status} {body}");
        body["chat"]["id"].as_str().unwrap().to_owned()
    }

    pub async fn ws(&self, user: &TestUser) -> Ws {
        Ws::connect(self.addr, &user.token).await
    }
}

#[derive(Clone, Debug)]
pub struct TestUser {
    pub id: String,
    pub token: String,
    pub refresh: String,
}

pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub buffer: VecDeque<Value>,
    pub established: Value,
    next_id: i64,
}

impl Ws {
    /// Connects with `?token=` and waits for `connection:established`.
    pub async fn connect(addr: std::net::SocketAddr, token: &str) -> Ws {
        let mut ws = Self::connect_raw(addr, Some(token)).await;
        let first = ws.next_frame().await.expect("a first frame");
        assert_eq!(first["event"], "connection:established", "{first}");
        ws.established = first["data"].clone();
        ws
    }

    /// Connects without waiting for anything.
    pub async fn connect_raw(addr: std::net::SocketAddr, token: Option<&str>) -> Ws {
        let url = match token {
            Some(t) => format!("ws://{addr}/ws?token={t}"),
            None => format!("ws://{addr}/ws"),
        };
        let (stream, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Ws {
            stream,
            buffer: VecDeque::new(),
            established: Value::Null,
            next_id: 1,
        }
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.stream
            .send(Message::Text(text.into().into()))
            .await
            .unwrap();
    }

    pub async fn send(&mut self, event: &str, data: Value) {
        self.send_text(json!({"event": event, "data": data}).to_string())
            .await;
    }

    /// Next JSON frame from the socket (not the buffer); `None` when closed.
    pub async fn next_frame(&mut self) -> Option<Value> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("timed out waiting for a frame")?;
            match msg {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).unwrap()),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Sends a request with an id and returns its reply; pushes seen meanwhile are buffered.
    pub async fn request(&mut self, event: &str, data: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send_text(json!({"event": event, "data": data, "id": id}).to_string())
            .await;
        loop {
            let frame = self
                .next_frame()
                .await
                .expect("closed while waiting for a reply");
            if frame["event"] == "reply" && frame["id"] == id {
                return frame;
            }
            self.buffer.push_back(frame);
        }
    }

    /// A request that must succeed: its `data`.
    pub async fn ok(&mut self, event: &str, data: Value) -> Value {
        let reply = self.request(event, data).await;
        assert_eq!(reply["ok"], true, "{event} failed: {reply}");
        reply["data"].clone()
    }

    /// The next push named `event` (from the buffer first); other frames stay buffered.
    pub async fn event(&mut self, event: &str) -> Value {
        if let Some(pos) = self.buffer.iter().position(|f| f["event"] == event) {
            return self.buffer.remove(pos).unwrap()["data"].clone();
        }
        loop {
            let frame = self
                .next_frame()
                .await
                .unwrap_or_else(|| panic!("closed while waiting for {event}"));
            if frame["event"] == event {
                return frame["data"].clone();
            }
            self.buffer.push_back(frame);
        }
    }

    /// Asserts no push named `event` arrives within `within`.
    pub async fn no_event(&mut self, event: &str, within: Duration) {
        assert!(
            !self.buffer.iter().any(|f| f["event"] == event),
            "unexpected buffered {event}: {:?}",
            self.buffer
        );
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    assert_ne!(v["event"], event, "unexpected {v}");
                    self.buffer.push_back(v);
                }
                Ok(Some(Ok(_))) => {}
                Ok(_) => return,
            }
        }
    }

    /// Reads until the close frame and returns its code (frames before it are buffered).
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("timed out waiting for close");
            match msg {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(Message::Text(t))) => {
                    self.buffer.push_back(serde_json::from_str(&t).unwrap())
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self
            .stream
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }
}

/// A self-signed certificate for localhost / 127.0.0.1: (cert.pem, key.pem).
pub fn make_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    make_cert_for(dir, name, "DNS:localhost,IP:127.0.0.1")
}

/// A self-signed certificate with the given subjectAltName list: (cert.pem, key.pem).
pub fn make_cert_for(dir: &Path, name: &str, san: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
        ])
        .args([
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            &format!("subjectAltName={san}"),
        ])
        .args([
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed (scripts/test.sh installs it)");
    assert!(st.success());
    (cert, key)
}

/// A fresh, empty database on the PostgreSQL server `SB_TEST_POSTGRES_URL` names
/// (scripts/test.sh starts one, or `eval $(scripts/pg-temp.sh)`); its URL. Fails without it:
/// scripts/test.sh excludes the tests named `postgres…` by name, loudly, where it has none.
pub async fn fresh_postgres_db() -> String {
    use sqlx::Connection;
    let admin = std::env::var("SB_TEST_POSTGRES_URL").expect(
        "SB_TEST_POSTGRES_URL is not set: run scripts/test.sh, or \
         `eval $(scripts/pg-temp.sh)` first",
    );
    let name = format!("sb_{}", uuid::Uuid::now_v7().simple());
    let mut c = sqlx::PgConnection::connect(&admin).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    let (base, _) = admin.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

/// A real `redis-server` on a free port (or a given one, to restart it), stopped on drop.
pub struct RedisServer {
    pub port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port)
    }

    pub fn start_on(port: u16) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is needed (scripts/test.sh installs it)");
        // Dropped (killed and waited for) if it never answers.
        let server = RedisServer {
            port,
            child,
            _dir: dir,
        };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server did not start on {port}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// SIGKILL, and wait for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the nodes of one test cluster share: PostgreSQL, Redis, a key prefix and the JWT
/// secret (a token from one node is good on every node).
#[derive(Clone)]
pub struct ClusterEnv {
    pub database_url: String,
    pub redis_url: String,
    pub prefix: String,
    pub jwt_secret: String,
}

impl ClusterEnv {
    pub async fn new(redis: &RedisServer) -> ClusterEnv {
        ClusterEnv {
            database_url: fresh_postgres_db().await,
            redis_url: redis.url(),
            prefix: format!("t{}:", uuid::Uuid::now_v7().simple()),
            jwt_secret: format!("secret-{}", uuid::Uuid::now_v7().simple()),
        }
    }

    /// Node `name` of the cluster, in this process.
    pub async fn node(&self, name: &str, f: impl FnOnce(&mut Config)) -> TestServer {
        let env = self.clone();
        let name = name.to_owned();
        TestServer::start_with(move |c| {
            c.database.url = env.database_url;
            c.cluster.redis_url = env.redis_url;
            c.cluster.redis_prefix = env.prefix;
            c.cluster.node_id = name;
            c.auth.jwt_secret = env.jwt_secret;
            f(c);
        })
        .await
    }

    /// Node `name` of the cluster as the real binary (to be killed), in its own data
    /// directory, with `extra` environment settings on top of the cluster's.
    pub fn binary(
        &self,
        name: &str,
        extra: &[(&str, &str)],
    ) -> (crate::binary::Binary, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let node = crate::binary::Binary::serve()
            .in_dir(dir.path())
            .env("SWITCHBOARD_DATABASE__URL", &self.database_url)
            .env("SWITCHBOARD_CLUSTER__REDIS_URL", &self.redis_url)
            .env("SWITCHBOARD_CLUSTER__REDIS_PREFIX", &self.prefix)
            .env("SWITCHBOARD_CLUSTER__NODE_ID", name)
            .env("SWITCHBOARD_AUTH__JWT_SECRET", &self.jwt_secret)
            .envs(extra)
            .spawn();
        (node, dir)
    }
}

impl Ws {
    /// The next push named `event`, waiting up to `within` (other frames stay buffered).
    pub async fn event_within(&mut self, event: &str, within: Duration) -> Value {
        if let Some(pos) = self.buffer.iter().position(|f| f["event"] == event) {
            return self.buffer.remove(pos).unwrap()["data"].clone();
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .unwrap_or_else(|_| panic!("no {event} within {within:?}"));
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["event"] == event {
                        return v["data"].clone();
                    }
                    self.buffer.push_back(v);
                }
                Some(Ok(_)) => {}
                _ => panic!("closed while waiting for {event}"),
            }
        }
    }
}

//! The embedded TURN server with real TURN clients: the webrtc-rs `turn` crate's client here,
//! coturn's `turnutils_uclient` in `coturn.rs`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stun::message::{
    Getter, Message, Method, Setter, CLASS_ERROR_RESPONSE, CLASS_REQUEST, CLASS_SUCCESS_RESPONSE,
};
use tokio::net::UdpSocket;
use turn::client::{Client, ClientConfig};
use webrtc_util::Conn;

use crate::common::*;

pub const SECRET: &str = "turn-test-secret";

/// Server config for TURN tests: UDP on loopback, a relay range of our own, a known secret.
pub fn turn_config(c: &mut switchboard::config::Config) {
    c.turn.enabled = true;
    c.turn.listen_udp = "127.0.0.1:0".parse().unwrap();
    c.turn.relay_ports = "41000-41999".parse().unwrap();
    c.turn.secret = SECRET.into();
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// What a client saw: (method, class, error code) of every STUN message it received.
type Seen = Arc<Mutex<Vec<(Method, stun::message::MessageClass, Option<u16>, i64)>>>;

/// The client's socket, tapped: it records the server's responses, and can make the client
/// believe in a short allocation lifetime (so it refreshes within a test): the server grants at
/// least 600 s (RFC 8656 §7.2), and the tap rewrites the LIFETIME of its Allocate and Refresh
/// answers, re-signed with the client's key.
struct Tap {
    sock: UdpSocket,
    key: Vec<u8>,
    lifetime: Option<Duration>,
    seen: Seen,
}

impl Tap {
    fn rewrite(&self, buf: &[u8]) -> Option<Vec<u8>> {
        let lifetime = self.lifetime?;
        let mut m = Message::new();
        m.raw = buf.to_vec();
        m.decode().ok()?;
        let answers_lifetime = (m.typ.method == stun::message::METHOD_ALLOCATE
            || m.typ.method == stun::message::METHOD_REFRESH)
            && m.typ.class == CLASS_SUCCESS_RESPONSE;
        if !answers_lifetime || !m.contains(stun::attributes::ATTR_LIFETIME) {
            return None;
        }
        let mut out = Message::new();
        out.typ = m.typ;
        out.transaction_id = m.transaction_id;
        out.write_header();
        for a in &m.attributes.0 {
            if a.typ != stun::attributes::ATTR_MESSAGE_INTEGRITY
                && a.typ != stun::attributes::ATTR_FINGERPRINT
                && a.typ != stun::attributes::ATTR_LIFETIME
            {
                out.add(a.typ, &a.value);
            }
        }
        turn::proto::lifetime::Lifetime(lifetime)
            .add_to(&mut out)
            .ok()?;
        stun::integrity::MessageIntegrity(self.key.clone())
            .add_to(&mut out)
            .ok()?;
        if m.contains(stun::attributes::ATTR_FINGERPRINT) {
            stun::fingerprint::FINGERPRINT.add_to(&mut out).ok()?;
        }
        Some(out.raw)
    }
}

#[async_trait::async_trait]
impl Conn for Tap {
    async fn connect(&self, addr: SocketAddr) -> webrtc_util::Result<()> {
        Ok(self.sock.connect(addr).await?)
    }
    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Ok(self.recv_from(buf).await?.0)
    }
    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let (mut n, from) = self.sock.recv_from(buf).await?;
        if let Some(b) = self.rewrite(&buf[..n]) {
            buf[..b.len()].copy_from_slice(&b);
            n = b.len();
        }
        let mut m = Message::new();
        m.raw = buf[..n].to_vec();
        if stun::message::is_message(&buf[..n]) && m.decode().is_ok() {
            let mut code = stun::error_code::ErrorCodeAttribute::default();
            let code = code.get_from(&m).ok().map(|_| code.code.0);
            self.seen
                .lock()
                .unwrap()
                .push((m.typ.method, m.typ.class, code, now_secs()));
        }
        Ok((n, from))
    }
    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        Ok(self.sock.send(buf).await?)
    }
    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        Ok(self.sock.send_to(buf, target).await?)
    }
    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.sock.local_addr()?)
    }
    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }
    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }
    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

pub struct TurnClient {
    pub client: Client,
    pub seen: Seen,
}

impl TurnClient {
    pub async fn new(
        server: SocketAddr,
        username: &str,
        password: &str,
        lifetime: Option<Duration>,
    ) -> TurnClient {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let seen: Seen = Arc::default();
        let tap = Tap {
            sock,
            key: turn::auth::generate_auth_key(username, "switchboard", password),
            lifetime,
            seen: seen.clone(),
        };
        let client = Client::new(ClientConfig {
            stun_serv_addr: server.to_string(),
            turn_serv_addr: server.to_string(),
            username: username.into(),
            password: password.into(),
            realm: "switchboard".into(),
            software: String::new(),
            rto_in_ms: 0,
            conn: Arc::new(tap),
            vnet: None,
        })
        .await
        .unwrap();
        client.listen().await.unwrap();
        TurnClient { client, seen }
    }

    /// Error codes the server answered to `method`.
    pub fn errors(&self, method: Method) -> Vec<u16> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, c, _, _)| *m == method && *c == CLASS_ERROR_RESPONSE)
            .filter_map(|(_, _, code, _)| *code)
            .collect()
    }

    /// Successful responses to `method` received at or after `since` (unix seconds).
    pub fn successes_since(&self, method: Method, since: i64) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, c, _, t)| *m == method && *c == CLASS_SUCCESS_RESPONSE && *t >= since)
            .count()
    }
}

/// A sends to B and B to A through their relays; both must arrive.
pub async fn exchange<C: Conn>(ra: &C, rb: &C, addr_a: SocketAddr, addr_b: SocketAddr, tag: &str) {
    // Each side writes once so that both allocations have a permission for the other.
    ra.send_to(b"open", addr_b).await.unwrap();
    rb.send_to(b"open", addr_a).await.unwrap();
    for (from, to, to_addr, from_addr) in [(ra, rb, addr_b, addr_a), (rb, ra, addr_a, addr_b)] {
        let payload = format!("{tag} {from_addr}");
        // The first packet may race the peer's permission; resend until it lands.
        let mut got = None;
        for _ in 0..10 {
            from.send_to(payload.as_bytes(), to_addr).await.unwrap();
            if let Some((data, _)) = recv_within(to, Duration::from_millis(500)).await {
                if data == payload.as_bytes() {
                    got = Some(data);
                    break;
                }
            }
        }
        assert!(got.is_some(), "{payload} did not arrive through the relay");
    }
}

/// Credentials from the REST API, as a browser gets them.
async fn rest_credentials(s: &TestServer, user: &TestUser) -> (String, String) {
    let (status, body) = s
        .get("/api/turn-credentials?service=turn", &user.token)
        .await;
    assert_eq!(status, 200, "{body}");
    (
        body["username"].as_str().unwrap().into(),
        body["password"].as_str().unwrap().into(),
    )
}

async fn recv_within(conn: &impl Conn, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 1500];
    match tokio::time::timeout(wait, conn.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => Some((buf[..n].to_vec(), from)),
        _ => None,
    }
}

#[tokio::test]
async fn ice_servers_and_rest_credentials() {
    let s = TestServer::start_with(turn_config).await;
    let u = s.register("alice").await;
    let turn_port = s.turn_addr().unwrap().port();
    let (status, body) = s.get("/api/ice-servers", &u.token).await;
    assert_eq!(status, 200);
    let servers = body["iceServers"].as_array().unwrap();
    assert_eq!(
        servers[0]["urls"],
        serde_json::json!([format!("stun:127.0.0.1:{turn_port}")])
    );
    assert_eq!(
        servers[1]["urls"],
        serde_json::json!([format!("turn:127.0.0.1:{turn_port}?transport=udp")])
    );
    let username = servers[1]["username"].as_str().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, u.id);
    let expiry: i64 = expiry.parse().unwrap();
    assert!((expiry - now_secs() - 86_400).abs() < 5, "24 h by default");
    assert_eq!(
        servers[1]["credential"],
        switchboard::auth::turn_rest::password(SECRET, username).as_str()
    );
    assert_eq!(body["ttl"], 86_400);
    assert!(body["expiresAt"].as_str().unwrap().ends_with('Z'));
    // The TURN REST API shape, and the same in `connection:established`.
    let (status, cred) = s.get("/api/turn-credentials?service=turn", &u.token).await;
    assert_eq!(status, 200);
    assert_eq!(
        cred["uris"],
        serde_json::json!([format!("turn:127.0.0.1:{turn_port}?transport=udp")])
    );
    assert_eq!(cred["ttl"], 86_400);
    let ws = s.ws(&u).await;
    assert_eq!(ws.established["iceServers"][1]["urls"], servers[1]["urls"]);
    assert!(ws.established["iceExpiresAt"].is_string());
    // A configured public host wins over the Host header.
    let (status, _) = s.get("/api/turn-credentials?service=stun", &u.token).await;
    assert_eq!(status, 400);
    s.stop().await;

    let s = TestServer::start_with(|c| {
        turn_config(c);
        c.turn.public_host = "turn.example.org".into();
    })
    .await;
    let u = s.register("alice").await;
    let (_, body) = s.get("/api/ice-servers", &u.token).await;
    assert!(body["iceServers"][1]["urls"][0]
        .as_str()
        .unwrap()
        .starts_with("turn:turn.example.org:"));
    s.stop().await;

    // Disabled TURN: nothing is offered.
    let s = TestServer::start().await;
    let u = s.register("alice").await;
    let (_, body) = s.get("/api/ice-servers", &u.token).await;
    assert_eq!(body["iceServers"], serde_json::json!([]));
    assert_eq!(s.get("/api/turn-credentials", &u.token).await.0, 404);
    s.stop().await;
}

#[tokio::test]
async fn two_clients_relay_to_each_other_and_keep_working_after_the_credential_expired() {
    let s = TestServer::start_with(turn_config).await;
    let server = s.turn_addr().unwrap();
    let u = s.register("alice").await;
    // A short credential (3 s) and a short allocation lifetime as the client sees it (6 s), so
    // that its own refreshes (every lifetime/2) happen after the credential expired.
    let cred = switchboard::auth::turn_rest::mint(SECRET, &u.id, now_secs(), 3);
    let a = TurnClient::new(
        server,
        &cred.username,
        &cred.password,
        Some(Duration::from_secs(6)),
    )
    .await;
    let relay_a = a
        .client
        .allocate()
        .await
        .expect("allocate with a fresh credential");
    let (b_user, b_pass) = rest_credentials(&s, &u).await;
    let b = TurnClient::new(server, &b_user, &b_pass, None).await;
    let relay_b = b.client.allocate().await.unwrap();
    let (addr_a, addr_b) = (relay_a.local_addr().unwrap(), relay_b.local_addr().unwrap());
    assert_eq!(addr_a.ip().to_string(), "127.0.0.1");
    assert!((41000..=41999).contains(&addr_a.port()), "{addr_a}");

    // B writes first (B's permission for A), then A writes: CreatePermission + ChannelBind.
    relay_b.send_to(b"hello from b", addr_a).await.unwrap();
    relay_a.send_to(b"hello from a", addr_b).await.unwrap();
    let (got, from) = recv_within(&relay_b, Duration::from_secs(5))
        .await
        .expect("b hears a");
    assert_eq!((got.as_slice(), from), (&b"hello from a"[..], addr_a));
    relay_b.send_to(b"again from b", addr_a).await.unwrap();
    // B's very first packet may or may not have arrived after A's permission for B existed.
    loop {
        let (got, _) = recv_within(&relay_a, Duration::from_secs(5))
            .await
            .expect("a hears b");
        if got == b"again from b" {
            break;
        }
        assert_eq!(got, b"hello from b");
    }
    // Give the client time to bind its channel (it does so after the first packets).
    for i in 0..5 {
        relay_a
            .send_to(format!("a{i}").as_bytes(), addr_b)
            .await
            .unwrap();
        recv_within(&relay_b, Duration::from_secs(5))
            .await
            .expect("relayed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(a.successes_since(stun::message::METHOD_CREATE_PERMISSION, 0) >= 1);
    assert!(
        a.successes_since(stun::message::METHOD_CHANNEL_BIND, 0) >= 1,
        "{:?}",
        a.seen.lock().unwrap()
    );

    // Wait until the credential has expired and the client has refreshed at least once since.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while a.successes_since(stun::message::METHOD_REFRESH, cred.expires_at + 1) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refresh after expiry: {:?}",
            a.seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(a.errors(stun::message::METHOD_REFRESH).is_empty());
    // Past the original 6 s lifetime, the allocation still relays, both ways.
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay_a.send_to(b"after expiry", addr_b).await.unwrap();
    let (got, _) = recv_within(&relay_b, Duration::from_secs(5))
        .await
        .expect("still relaying after expiry");
    assert_eq!(got, b"after expiry");
    relay_b.send_to(b"and back", addr_a).await.unwrap();
    assert_eq!(
        recv_within(&relay_a, Duration::from_secs(5))
            .await
            .unwrap()
            .0,
        b"and back"
    );

    // A new Allocate with the expired credential is refused with 401.
    let late = TurnClient::new(server, &cred.username, &cred.password, None).await;
    assert!(late.client.allocate().await.is_err());
    assert!(
        late.errors(stun::message::METHOD_ALLOCATE).contains(&401),
        "{:?}",
        late.errors(stun::message::METHOD_ALLOCATE)
    );
    let _ = (
        a.client.close().await,
        b.client.close().await,
        late.client.close().await,
    );
    s.stop().await;
}

#[tokio::test]
async fn wrong_secret_and_bad_usernames_are_refused() {
    let s = TestServer::start_with(turn_config).await;
    let server = s.turn_addr().unwrap();
    let u = s.register("alice").await;
    let forged = switchboard::auth::turn_rest::mint("not-the-secret", &u.id, now_secs(), 600);
    let c = TurnClient::new(server, &forged.username, &forged.password, None).await;
    assert!(c.client.allocate().await.is_err());
    assert_eq!(c.errors(stun::message::METHOD_ALLOCATE).last(), Some(&401));
    let c = TurnClient::new(server, "alice", "password", None).await;
    assert!(c.client.allocate().await.is_err());
    assert_eq!(c.errors(stun::message::METHOD_ALLOCATE).last(), Some(&401));
    let (status, _) = s.get("/metrics", "").await;
    assert_eq!(status, 200);
    s.stop().await;
}

#[tokio::test]
async fn the_previous_secret_stays_valid_during_rotation() {
    let s = TestServer::start_with(|c| {
        turn_config(c);
        c.turn.secret = "new-secret".into();
        c.turn.previous_secret = SECRET.into();
    })
    .await;
    let server = s.turn_addr().unwrap();
    let u = s.register("alice").await;
    for secret in ["new-secret", SECRET] {
        let cred = switchboard::auth::turn_rest::mint(secret, &u.id, now_secs(), 600);
        let c = TurnClient::new(server, &cred.username, &cred.password, None).await;
        c.client
            .allocate()
            .await
            .unwrap_or_else(|e| panic!("{secret}: {e}"));
        c.client.close().await.unwrap();
    }
    // REST hands out credentials of the current secret.
    let (user, pass) = rest_credentials(&s, &u).await;
    assert_eq!(
        pass,
        switchboard::auth::turn_rest::password("new-secret", &user)
    );
    s.stop().await;
}

#[tokio::test]
async fn the_user_quota_caps_allocations() {
    let s = TestServer::start_with(|c| {
        turn_config(c);
        c.turn.user_quota = 2;
    })
    .await;
    let server = s.turn_addr().unwrap();
    let u = s.register("alice").await;
    let other = s.register("bob").await;
    let mut keep = Vec::new();
    for _ in 0..2 {
        let (user, pass) = rest_credentials(&s, &u).await;
        let c = TurnClient::new(server, &user, &pass, None).await;
        keep.push((c.client.allocate().await.expect("within quota"), c));
    }
    let (user, pass) = rest_credentials(&s, &u).await;
    let third = TurnClient::new(server, &user, &pass, None).await;
    assert!(third.client.allocate().await.is_err(), "quota + 1");
    assert_eq!(
        third.errors(stun::message::METHOD_ALLOCATE).last(),
        Some(&486)
    );
    // Another user is not affected.
    let (user, pass) = rest_credentials(&s, &other).await;
    let bob = TurnClient::new(server, &user, &pass, None).await;
    bob.client.allocate().await.expect("bob has his own quota");
    // Releasing one allocation frees a slot.
    let (relay, c) = keep.pop().unwrap();
    relay.close().await.unwrap();
    c.client.close().await.unwrap();
    let mut freed = false;
    for _ in 0..50 {
        let (user, pass) = rest_credentials(&s, &u).await;
        let again = TurnClient::new(server, &user, &pass, None).await;
        if again.client.allocate().await.is_ok() {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(freed, "a closed allocation gives its slot back");
    s.stop().await;
}

#[tokio::test]
async fn default_config_relays_nothing_to_loopback_private_or_metadata_peers() {
    let s = TestServer::start_with(turn_config).await;
    let server = s.turn_addr().unwrap();
    let u = s.register("alice").await;
    // A local UDP service that must never hear from the relay.
    let victim = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let victim_port = victim.local_addr().unwrap().port();
    let (user, pass) = rest_credentials(&s, &u).await;
    let c = TurnClient::new(server, &user, &pass, None).await;
    let relay = c.client.allocate().await.unwrap();
    let targets: Vec<SocketAddr> = vec![
        format!("127.0.0.1:{victim_port}").parse().unwrap(),
        format!("[::ffff:127.0.0.1]:{victim_port}").parse().unwrap(),
        // Refused at CreatePermission: nothing is ever sent to these.
        "10.0.0.1:5000".parse().unwrap(),
        "169.254.169.254:80".parse().unwrap(),
    ];
    for t in &targets {
        let _ = relay.send_to(b"should not arrive", *t).await;
    }
    // The client asks for one permission after the other: wait for the answers.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.errors(stun::message::METHOD_CREATE_PERMISSION).len() < 3
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut buf = [0u8; 64];
    let heard = tokio::time::timeout(Duration::from_millis(1000), victim.recv_from(&mut buf)).await;
    assert!(heard.is_err(), "the loopback service received relayed data");
    let refused = c.errors(stun::message::METHOD_CREATE_PERMISSION);
    assert!(
        refused.iter().filter(|c| **c == 403).count() >= 3,
        "403 for the denied peers: {refused:?}"
    );
    assert!(
        c.successes_since(stun::message::METHOD_CREATE_PERMISSION, 0) == 0,
        "no permission was granted"
    );
    s.stop().await;
}

#[tokio::test]
async fn turn_ports_are_released_on_shutdown() {
    let s = TestServer::start_with(turn_config).await;
    let addr = s.turn_addr().unwrap();
    let u = s.register("alice").await;
    let (user, pass) = rest_credentials(&s, &u).await;
    let c = TurnClient::new(addr, &user, &pass, None).await;
    let relay = c.client.allocate().await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    s.stop().await;
    // Give the allocation tasks a moment to drop their sockets.
    let mut free = false;
    for _ in 0..50 {
        if std::net::UdpSocket::bind(addr).is_ok() && std::net::UdpSocket::bind(relay_addr).is_ok()
        {
            free = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        free,
        "listening port {addr} and relay port {relay_addr} are free again"
    );
}

#[tokio::test]
async fn behind_nat_the_relay_address_carries_the_public_ip() {
    let s = TestServer::start_with(|c| {
        turn_config(c);
        c.turn.public_ip = "203.0.113.7".parse().unwrap();
    })
    .await;
    let u = s.register("alice").await;
    let (user, pass) = rest_credentials(&s, &u).await;
    let c = TurnClient::new(s.turn_addr().unwrap(), &user, &pass, None).await;
    let relay = c.client.allocate().await.unwrap();
    let relayed = relay.local_addr().unwrap();
    assert_eq!(
        relayed.ip().to_string(),
        "203.0.113.7",
        "advertised, not the bound 127.0.0.1"
    );
    assert!((41000..=41999).contains(&relayed.port()));
    s.stop().await;
}

#[tokio::test]
async fn readiness_includes_the_turn_listener() {
    let s = TestServer::start_with(turn_config).await;
    let resp = s.http.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<serde_json::Value>().await.unwrap()["ready"],
        true
    );
    s.stop().await;
}

/// One raw STUN request from `sock` and the answer to it.
async fn stun_request(sock: &UdpSocket, server: SocketAddr, attrs: &[&dyn Setter]) -> Message {
    let mut m = Message::new();
    m.transaction_id = stun::agent::TransactionId::new();
    m.typ = stun::message::MessageType::new(stun::message::METHOD_ALLOCATE, CLASS_REQUEST);
    m.write_header();
    for a in attrs {
        a.add_to(&mut m).unwrap();
    }
    sock.send_to(&m.raw, server).await.unwrap();
    let mut buf = vec![0u8; 1500];
    loop {
        let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        let mut res = Message::new();
        res.raw = buf[..n].to_vec();
        res.decode().unwrap();
        if res.transaction_id == m.transaction_id {
            return res;
        }
    }
}

fn text_attr(m: &Message, attr: stun::attributes::AttrType) -> Option<String> {
    let mut t = stun::textattrs::TextAttribute::new(attr, String::new());
    t.get_from(m).ok().map(|_| t.text)
}

fn code_of(m: &Message) -> Option<u16> {
    let mut code = stun::error_code::ErrorCodeAttribute::default();
    code.get_from(m).ok().map(|_| code.code.0)
}

/// Nonces are stateless and bound to the client's address: every stranger gets a 401 with
/// realm and nonce and no reason phrase, a nonce works only from the address it was given to,
/// and RFC 8489 §9.2.4's order of 401, 400 and 438 holds.
#[tokio::test]
async fn nonces_are_bound_to_the_client_and_the_rfc_order_holds() {
    use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
    use stun::textattrs::TextAttribute;
    let s = TestServer::start_with(turn_config).await;
    let server = s.turn_addr().unwrap();
    let u = s.register("alice").await;
    let transport = turn::proto::reqtrans::RequestedTransport {
        protocol: turn::proto::PROTO_UDP,
    };
    // No credentials: 401 with realm and a nonce, small and without a reason phrase.
    let mut nonces = std::collections::HashSet::new();
    let mut socks = Vec::new(); // kept open: 200 distinct client addresses
    for _ in 0..200 {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let res = stun_request(&sock, server, &[&transport]).await;
        socks.push(sock);
        assert_eq!(res.typ.class, CLASS_ERROR_RESPONSE);
        assert_eq!(code_of(&res), Some(401));
        assert_eq!(text_attr(&res, ATTR_REALM).as_deref(), Some("switchboard"));
        let mut code = stun::error_code::ErrorCodeAttribute::default();
        code.get_from(&res).unwrap();
        assert!(code.reason.is_empty(), "no reason phrase for strangers");
        assert!(res.raw.len() <= 72, "{} bytes", res.raw.len());
        nonces.insert(text_attr(&res, ATTR_NONCE).expect("a nonce"));
    }
    assert_eq!(nonces.len(), 200, "one nonce per client address");

    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (user, pass) = rest_credentials(&s, &u).await;
    let integrity = stun::integrity::MessageIntegrity::new_long_term_integrity(
        user.clone(),
        "switchboard".into(),
        pass,
    );
    let username = TextAttribute::new(ATTR_USERNAME, user);
    let realm = TextAttribute::new(ATTR_REALM, "switchboard".into());
    // Credentials without a nonce: 400.
    let res = stun_request(&sock, server, &[&transport, &username, &realm, &integrity]).await;
    assert_eq!(code_of(&res), Some(400));
    // A nonce the server never gave out: 438 with one for this client.
    let bogus = TextAttribute::new(ATTR_NONCE, "not-a-nonce-of-ours".into());
    let res = stun_request(
        &sock,
        server,
        &[&transport, &username, &realm, &bogus, &integrity],
    )
    .await;
    assert_eq!(code_of(&res), Some(438));
    let mine = text_attr(&res, ATTR_NONCE).unwrap();
    // Another client's nonce: 438 too.
    let theirs = TextAttribute::new(ATTR_NONCE, nonces.iter().next().unwrap().clone());
    let res = stun_request(
        &sock,
        server,
        &[&transport, &username, &realm, &theirs, &integrity],
    )
    .await;
    assert_eq!(code_of(&res), Some(438));
    // Its own nonce with good credentials allocates, integrity-protected.
    let nonce = TextAttribute::new(ATTR_NONCE, mine.clone());
    let res = stun_request(
        &sock,
        server,
        &[&transport, &username, &realm, &nonce, &integrity],
    )
    .await;
    assert_eq!(res.typ.class, CLASS_SUCCESS_RESPONSE, "{:?}", code_of(&res));
    integrity
        .check(&mut res.clone())
        .expect("the success response is signed");
    // A wrong password: 401 with a fresh challenge.
    let wrong = stun::integrity::MessageIntegrity::new_long_term_integrity(
        username.text.clone(),
        "switchboard".into(),
        "wrong".into(),
    );
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let res = stun_request(&sock, server, &[&transport]).await;
    let nonce = TextAttribute::new(ATTR_NONCE, text_attr(&res, ATTR_NONCE).unwrap());
    let res = stun_request(
        &sock,
        server,
        &[&transport, &username, &realm, &nonce, &wrong],
    )
    .await;
    assert_eq!(code_of(&res), Some(401));
    assert!(text_attr(&res, ATTR_NONCE).is_some());
    s.stop().await;
}

/// RFC 6156: listening on IPv6, the server relays IPv6 (REQUESTED-ADDRESS-FAMILY); an IPv4 relay
/// it cannot offer there is 440.
#[tokio::test]
async fn ipv6_relays_when_listening_on_ipv6_and_440_for_a_family_it_lacks() {
    use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
    use stun::textattrs::TextAttribute;
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        panic!("this machine has no IPv6 loopback; the test needs one");
    }
    let s = TestServer::start_with(|c| {
        turn_config(c);
        c.turn.listen_udp = "[::1]:0".parse().unwrap();
    })
    .await;
    let server = s.turn_addr().unwrap();
    assert!(server.is_ipv6(), "{server}");
    let u = s.register("alice").await;
    let (user, pass) = rest_credentials(&s, &u).await;
    let integrity = stun::integrity::MessageIntegrity::new_long_term_integrity(
        user.clone(),
        "switchboard".into(),
        pass,
    );
    let transport = turn::proto::reqtrans::RequestedTransport {
        protocol: turn::proto::PROTO_UDP,
    };
    let v6 = turn::proto::reqfamily::REQUESTED_FAMILY_IPV6;
    for (family, expect_v6) in [(Some(&v6), true), (None, false)] {
        let sock = UdpSocket::bind("[::1]:0").await.unwrap();
        let res = stun_request(&sock, server, &[&transport]).await;
        let nonce = TextAttribute::new(ATTR_NONCE, text_attr(&res, ATTR_NONCE).unwrap());
        let username = TextAttribute::new(ATTR_USERNAME, user.clone());
        let realm = TextAttribute::new(ATTR_REALM, "switchboard".into());
        let mut attrs: Vec<&dyn Setter> = vec![&transport, &username, &realm, &nonce];
        if let Some(f) = family {
            attrs.push(f);
        }
        attrs.push(&integrity);
        let res = stun_request(&sock, server, &attrs).await;
        if expect_v6 {
            assert_eq!(res.typ.class, CLASS_SUCCESS_RESPONSE, "{:?}", code_of(&res));
            let mut relayed = turn::proto::relayaddr::RelayedAddress::default();
            relayed.get_from(&res).unwrap();
            assert_eq!(relayed.ip.to_string(), "::1");
            assert!((41000..=41999).contains(&relayed.port), "{}", relayed.port);
        } else {
            assert_eq!(
                code_of(&res),
                Some(440),
                "no IPv4 relay on an IPv6-only listener"
            );
        }
    }
    s.stop().await;
}

/// `turn.max_bps_per_allocation`: what goes over the cap is dropped and counted.
#[tokio::test]
async fn the_bandwidth_cap_drops_the_excess_and_counts_it() {
    let s = TestServer::start_with(|c| {
        turn_config(c);
        c.turn.max_bps_per_allocation = 800_000; // 100 kB/s each way
    })
    .await;
    let server = s.turn_addr().unwrap();
    let u = s.register("alice").await;
    let (user, pass) = rest_credentials(&s, &u).await;
    let a = TurnClient::new(server, &user, &pass, None).await;
    let b = TurnClient::new(server, &user, &pass, None).await;
    let (ra, rb) = (
        a.client.allocate().await.unwrap(),
        b.client.allocate().await.unwrap(),
    );
    let (addr_a, addr_b) = (ra.local_addr().unwrap(), rb.local_addr().unwrap());
    exchange(&ra, &rb, addr_a, addr_b, "warm-up").await;
    // 300 kB in a burst: about 100 kB (one second's worth) gets through.
    let payload = vec![7u8; 1000];
    for _ in 0..300 {
        ra.send_to(&payload, addr_b).await.unwrap();
    }
    let mut got = 0;
    while let Some((data, _)) = recv_within(&rb, Duration::from_millis(500)).await {
        if data.len() == 1000 {
            got += 1;
        }
    }
    assert!(
        (80..=160).contains(&got),
        "{got} of 300 packets passed a 100 kB/s cap"
    );
    // The drops show in the metrics (workers report them every second).
    let mut dropped = 0.0;
    for _ in 0..30 {
        let text = s
            .http
            .get(s.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        dropped = text
            .lines()
            .find(|l| l.starts_with("switchboard_turn_dropped_packets_total{reason=\"bandwidth\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if dropped > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(dropped >= 100.0, "dropped packets counted: {dropped}");
    let _ = (a.client.close().await, b.client.close().await);
    s.stop().await;
}

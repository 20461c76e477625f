//! The policy gate in front of the `turn` crate: a wrapper of the listening UDP socket that
//! reads every request before the crate does. It authenticates REST credentials itself (current
//! and previous secret), answers what the crate gets wrong or does not do with the proper STUN
//! error (401 for bad or expired credentials, 403 for forbidden peers, 486/508 over quota), and
//! watches the crate's Allocate responses to know which allocations are live. The crate's
//! [`AuthHandler`] then only looks up the key the gate already verified.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use stun::attributes::{ATTR_MESSAGE_INTEGRITY, ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::error_code::{
    ErrorCode, ErrorCodeAttribute, CODE_ALLOC_QUOTA_REACHED, CODE_FORBIDDEN,
    CODE_INSUFFICIENT_CAPACITY, CODE_UNAUTHORIZED,
};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{
    is_message, Getter, Message, MessageType, Method, Setter, CLASS_ERROR_RESPONSE, CLASS_REQUEST,
    CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE, METHOD_CHANNEL_BIND, METHOD_CREATE_PERMISSION,
    METHOD_REFRESH,
};
use stun::textattrs::TextAttribute;
use tokio::net::UdpSocket;
use turn::proto::peeraddr::PeerAddress;
use webrtc_util::Conn;

use super::filter::PeerFilter;
use super::policy::{Policy, Refusal};
use crate::auth::turn_rest;
use crate::time::now_ms;

/// Verified keys kept for the crate's auth handler before old ones are pruned.
const MAX_KEYS: usize = 50_000;
/// A verified key unused for this long is forgotten (unless its allocation is live).
const KEY_IDLE_MS: i64 = 15 * 60 * 1000;

/// A long-term key the gate verified, and when it was last used (unix ms).
type VerifiedKey = (Vec<u8>, i64);

/// The current and the previous TURN secret (rotation).
#[derive(Debug, Clone)]
pub struct Secrets {
    pub current: String,
    pub previous: Option<String>,
}

/// State shared by the gate, the auth handler, the relays and the REST API. Reloadable parts
/// sit behind locks.
pub struct Shared {
    pub realm: String,
    pub secrets: RwLock<Secrets>,
    pub filter: RwLock<PeerFilter>,
    pub policy: Mutex<Policy>,
    /// (client transport address, username) → long-term key verified by the gate.
    keys: Mutex<HashMap<(SocketAddr, String), VerifiedKey>>,
    /// Per-packet counters, looked up once (the relay path is hot).
    pub counters: RelayCounters,
}

pub struct RelayCounters {
    pub to_peer_bytes: metrics::Counter,
    pub from_peer_bytes: metrics::Counter,
    pub to_peer_dropped: metrics::Counter,
    pub from_peer_dropped: metrics::Counter,
}

impl Shared {
    pub fn new(realm: String, secrets: Secrets, filter: PeerFilter, policy: Policy) -> Self {
        Self {
            realm,
            secrets: RwLock::new(secrets),
            filter: RwLock::new(filter),
            policy: Mutex::new(policy),
            keys: Mutex::new(HashMap::new()),
            counters: RelayCounters {
                to_peer_bytes: metrics::counter!("switchboard_turn_relayed_bytes_total", "direction" => "client_to_peer"),
                from_peer_bytes: metrics::counter!("switchboard_turn_relayed_bytes_total", "direction" => "peer_to_client"),
                to_peer_dropped: metrics::counter!("switchboard_turn_dropped_packets_total", "direction" => "client_to_peer"),
                from_peer_dropped: metrics::counter!("switchboard_turn_dropped_packets_total", "direction" => "peer_to_client"),
            },
        }
    }

    pub fn key_for(&self, src: SocketAddr, username: &str) -> Option<Vec<u8>> {
        let mut keys = self.keys.lock().expect("keys lock");
        let entry = keys.get_mut(&(src, username.to_owned()))?;
        entry.1 = now_ms();
        Some(entry.0.clone())
    }

    fn remember_key(&self, src: SocketAddr, username: &str, key: Vec<u8>, now: i64) {
        let mut keys = self.keys.lock().expect("keys lock");
        if keys.len() >= MAX_KEYS {
            let policy = self.policy.lock().expect("policy lock");
            keys.retain(|(addr, _), (_, used)| {
                now - *used < KEY_IDLE_MS || policy.live_within_lifetime(*addr, now)
            });
        }
        keys.insert((src, username.to_owned()), (key, now));
    }

    /// The allocation of `src` is gone.
    pub fn allocation_closed(&self, src: SocketAddr) {
        if self
            .policy
            .lock()
            .expect("policy lock")
            .closed(src)
            .is_some()
        {
            metrics::gauge!("switchboard_turn_allocations_active").decrement(1.0);
        }
        self.keys
            .lock()
            .expect("keys lock")
            .retain(|(addr, _), _| *addr != src);
    }
}

/// The crate's auth hook: the key the gate verified for this packet's sender.
pub struct AuthHandler(pub Arc<Shared>);

impl turn::auth::AuthHandler for AuthHandler {
    fn auth_handle(
        &self,
        username: &str,
        _realm: &str,
        src: SocketAddr,
    ) -> Result<Vec<u8>, turn::Error> {
        self.0
            .key_for(src, username)
            .ok_or_else(|| turn::Error::Other("credential not verified".into()))
    }
}

/// What to do with an inbound datagram.
enum Verdict {
    Pass,
    Reply(Vec<u8>),
}

/// The listening socket, wrapped.
pub struct GateConn {
    sock: Arc<UdpSocket>,
    shared: Arc<Shared>,
}

impl GateConn {
    pub fn new(sock: Arc<UdpSocket>, shared: Arc<Shared>) -> Self {
        Self { sock, shared }
    }

    fn inspect(&self, data: &[u8], src: SocketAddr) -> Verdict {
        if !is_message(data) {
            return Verdict::Pass; // ChannelData
        }
        let mut m = Message::new();
        m.raw = data.to_vec();
        if m.decode().is_err() || m.typ.class != CLASS_REQUEST {
            return Verdict::Pass; // the crate drops what it cannot read
        }
        let method = m.typ.method;
        if ![
            METHOD_ALLOCATE,
            METHOD_REFRESH,
            METHOD_CREATE_PERMISSION,
            METHOD_CHANNEL_BIND,
        ]
        .contains(&method)
            || !m.contains(ATTR_MESSAGE_INTEGRITY)
        {
            // Binding, Send indications, and first requests the crate challenges with a nonce.
            return Verdict::Pass;
        }
        let mut username = TextAttribute::new(ATTR_USERNAME, String::new());
        let mut realm = TextAttribute::new(ATTR_REALM, String::new());
        if username.get_from(&m).is_err() || realm.get_from(&m).is_err() {
            return Verdict::Pass; // the crate answers 400
        }
        let (username, realm) = (username.text, realm.text);
        let now = now_ms();
        let unauthorized = |reason: &str| {
            metrics::counter!("switchboard_turn_auth_failures_total", "reason" => reason.to_owned()).increment(1);
            tracing::trace!(%src, reason, "TURN request refused: 401");
            Verdict::Reply(self.error(&m, method, CODE_UNAUTHORIZED, reason, None))
        };
        if realm != self.shared.realm {
            return unauthorized("wrong realm");
        }
        let Some((expiry, user)) = turn_rest::parse_username(&username) else {
            return unauthorized("username is not <expiry>:<user>");
        };
        let secrets = self.shared.secrets.read().expect("secrets lock").clone();
        let key = std::iter::once(secrets.current.as_str())
            .chain(secrets.previous.as_deref())
            .find_map(|secret| {
                let mi = MessageIntegrity::new_long_term_integrity(
                    username.clone(),
                    realm.clone(),
                    turn_rest::password(secret, &username),
                );
                mi.check(&mut m.clone()).is_ok().then_some(mi.0)
            });
        let Some(key) = key else {
            return unauthorized("bad credential");
        };
        let expired = expiry * 1000 <= now;
        if method == METHOD_ALLOCATE {
            if expired {
                return unauthorized("credential expired");
            }
            let refused = self.shared.policy.lock().expect("policy lock").reserve(
                m.transaction_id.0,
                src,
                user,
                now,
            );
            if let Err(r) = refused {
                metrics::counter!("switchboard_turn_allocations_failed_total", "reason" => r.as_str()).increment(1);
                tracing::trace!(user, reason = r.as_str(), "TURN allocation over quota");
                let code = match r {
                    Refusal::UserQuota => CODE_ALLOC_QUOTA_REACHED,
                    Refusal::TotalQuota => CODE_INSUFFICIENT_CAPACITY,
                };
                return Verdict::Reply(self.error(
                    &m,
                    method,
                    code,
                    "allocation quota reached",
                    Some(key),
                ));
            }
        } else if expired
            && !self
                .shared
                .policy
                .lock()
                .expect("policy lock")
                .live_within_lifetime(src, now)
        {
            // Past expiry only a live allocation, inside the maximum lifetime, carries on.
            return unauthorized("credential expired");
        }
        if method == METHOD_CREATE_PERMISSION || method == METHOD_CHANNEL_BIND {
            let filter = self.shared.filter.read().expect("filter lock");
            if let Some(peer) = peers(&m).into_iter().find(|p| !filter.allowed(*p)) {
                metrics::counter!("switchboard_turn_peer_denied_total").increment(1);
                tracing::trace!(%src, %peer, "TURN permission to a denied peer refused: 403");
                return Verdict::Reply(self.error(
                    &m,
                    method,
                    CODE_FORBIDDEN,
                    "peer address not allowed",
                    Some(key),
                ));
            }
        }
        self.shared.remember_key(src, &username, key, now);
        Verdict::Pass
    }

    /// An error response to `req`; with `key`, integrity-protected (RFC 8489 §9.2.4).
    fn error(
        &self,
        req: &Message,
        method: Method,
        code: ErrorCode,
        reason: &str,
        key: Option<Vec<u8>>,
    ) -> Vec<u8> {
        let mut setters: Vec<Box<dyn Setter>> = vec![
            Box::new(Message {
                transaction_id: req.transaction_id,
                ..Default::default()
            }),
            Box::new(MessageType::new(method, CLASS_ERROR_RESPONSE)),
            Box::new(ErrorCodeAttribute {
                code,
                reason: reason.as_bytes().to_vec(),
            }),
        ];
        if code == CODE_UNAUTHORIZED {
            // Echo the client's nonce: a client that retries with the same bad credential gets
            // the same answer; a new credential goes on to the server's own nonce check.
            let mut nonce = TextAttribute::new(ATTR_NONCE, String::new());
            let _ = nonce.get_from(req);
            setters.push(Box::new(TextAttribute::new(
                ATTR_REALM,
                self.shared.realm.clone(),
            )));
            setters.push(Box::new(nonce));
        }
        if let Some(key) = key {
            setters.push(Box::new(MessageIntegrity(key)));
        }
        setters.push(Box::new(FINGERPRINT));
        let mut msg = Message::new();
        match msg.build(&setters) {
            Ok(()) => msg.raw,
            Err(_) => Vec::new(),
        }
    }

    /// Watches the crate's responses to learn when allocations come alive or fail.
    fn observe_outbound(&self, data: &[u8]) {
        if !is_message(data) {
            return;
        }
        let mut m = Message::new();
        m.raw = data.to_vec();
        if m.decode().is_err() || m.typ.method != METHOD_ALLOCATE {
            return;
        }
        let mut policy = self.shared.policy.lock().expect("policy lock");
        if !policy.is_pending(&m.transaction_id.0) {
            return;
        }
        if m.typ.class == CLASS_SUCCESS_RESPONSE {
            if policy.confirm(m.transaction_id.0, now_ms()) {
                metrics::counter!("switchboard_turn_allocations_created_total").increment(1);
                metrics::gauge!("switchboard_turn_allocations_active").increment(1.0);
            }
        } else if m.typ.class == CLASS_ERROR_RESPONSE {
            policy.release(m.transaction_id.0);
            let mut code = ErrorCodeAttribute::default();
            let reason = if code.get_from(&m).is_ok() {
                code.code.0.to_string()
            } else {
                "error".into()
            };
            metrics::counter!("switchboard_turn_allocations_failed_total", "reason" => reason)
                .increment(1);
        }
    }
}

/// Every XOR-PEER-ADDRESS of a request.
fn peers(m: &Message) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for attr in &m.attributes.0 {
        if attr.typ != stun::attributes::ATTR_XOR_PEER_ADDRESS {
            continue;
        }
        let mut single = Message::new();
        single.transaction_id = m.transaction_id;
        single.add(attr.typ, &attr.value);
        let mut peer = PeerAddress::default();
        if peer.get_from(&single).is_ok() {
            out.push(SocketAddr::new(peer.ip, peer.port));
        }
    }
    out
}

#[async_trait::async_trait]
impl Conn for GateConn {
    async fn connect(&self, addr: SocketAddr) -> webrtc_util::Result<()> {
        self.sock.connect(addr).await?;
        Ok(())
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Ok(self.recv_from(buf).await?.0)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        loop {
            let (n, src) = self.sock.recv_from(buf).await?;
            match self.inspect(&buf[..n], src) {
                Verdict::Pass => return Ok((n, src)),
                Verdict::Reply(bytes) => {
                    if !bytes.is_empty() {
                        let _ = self.sock.send_to(&bytes, src).await;
                    }
                }
            }
        }
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        Ok(self.sock.send(buf).await?)
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        self.observe_outbound(buf);
        Ok(self.sock.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.sock.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    /// The crate closes the listener conn when an allocation closes: a no-op here, the socket
    /// lives as long as the server.
    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

//! The policy gate in front of the `turn` crate: a wrapper of the listening UDP socket that
//! reads every request before the crate does. It authenticates REST credentials itself (current
//! and previous secret), answers what the crate gets wrong or does not do with the proper STUN
//! error (401 for bad or expired credentials, 403 for forbidden peers, 486/508 over quota), and
//! watches the crate's Allocate responses to know which allocations are live. The crate's
//! [`AuthHandler`] then only looks up the key the gate already verified.
//!
//! It also answers the nonce challenges (401 without credentials, 438 for a nonce it does not
//! accept) with the house nonce of [`super::nonce`], so that no request makes the crate issue,
//! and keep forever, a nonce of its own. The crate is asked for house nonces with synthetic
//! requests: [`Shared::queue_probe`] leaves one for the read loop, which hands it to the crate
//! as if it came from [`PROBE_SOURCE`], and the crate's answer to that address is caught in
//! `send_to`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use stun::agent::TransactionId;
use stun::attributes::{ATTR_MESSAGE_INTEGRITY, ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::error_code::{
    ErrorCode, ErrorCodeAttribute, CODE_ALLOC_QUOTA_REACHED, CODE_BAD_REQUEST, CODE_FORBIDDEN,
    CODE_INSUFFICIENT_CAPACITY, CODE_STALE_NONCE, CODE_UNAUTHORIZED,
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
use super::nonce::{HouseNonces, Probe};
use super::policy::{Policy, Refusal};
use crate::auth::turn_rest;
use crate::time::now_ms;

/// Verified keys kept for the crate's auth handler before old ones are pruned.
const MAX_KEYS: usize = 50_000;
/// A verified key unused for this long is forgotten (unless its allocation is live).
const KEY_IDLE_MS: i64 = 15 * 60 * 1000;
/// The source the crate sees for a probe, and the address its answer goes to: no datagram
/// comes from port 0, so the crate's answers to it can only be answers to probes.
pub const PROBE_SOURCE: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));

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
    /// House nonces, on the monotonic clock of [`Shared::mono_ms`].
    nonces: Mutex<HouseNonces>,
    epoch: Instant,
    /// A probe for the crate, waiting for a read loop; the flag spares the lock per datagram.
    probe: Mutex<Option<Vec<u8>>>,
    probe_waiting: AtomicBool,
    /// Signalled when the crate answered a probe.
    pub nonce_issued: tokio::sync::Notify,
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
            nonces: Mutex::new(HouseNonces::new()),
            #[allow(clippy::disallowed_methods)] // the gate is a shell; the schedule is pure
            epoch: Instant::now(),
            probe: Mutex::new(None),
            probe_waiting: AtomicBool::new(false),
            nonce_issued: tokio::sync::Notify::new(),
            counters: RelayCounters {
                to_peer_bytes: metrics::counter!("switchboard_turn_relayed_bytes_total", "direction" => "client_to_peer"),
                from_peer_bytes: metrics::counter!("switchboard_turn_relayed_bytes_total", "direction" => "peer_to_client"),
                to_peer_dropped: metrics::counter!("switchboard_turn_dropped_packets_total", "direction" => "client_to_peer"),
                from_peer_dropped: metrics::counter!("switchboard_turn_dropped_packets_total", "direction" => "peer_to_client"),
            },
        }
    }

    /// Milliseconds on a monotonic clock: the nonce schedule must agree with the crate's
    /// `Instant`s, which wall-clock steps do not move.
    pub fn mono_ms(&self) -> i64 {
        self.epoch.elapsed().as_millis() as i64
    }

    /// The house nonce handed to clients (empty before the first one: `TurnServer::start`
    /// waits for it).
    pub fn current_nonce(&self) -> String {
        let nonces = self.nonces.lock().expect("nonces lock");
        nonces.current().unwrap_or_default().to_owned()
    }

    pub fn has_nonce(&self) -> bool {
        self.nonces.lock().expect("nonces lock").current().is_some()
    }

    /// The probe due now, if any, as the datagram to hand to the crate; and when to ask again.
    pub fn poll_probe(&self) -> (Option<Vec<u8>>, i64) {
        let now = self.mono_ms();
        let mut nonces = self.nonces.lock().expect("nonces lock");
        let probe = nonces.poll_probe(now).map(|p| probe_request(&p));
        (probe, nonces.poll_timeout().saturating_sub(now))
    }

    /// Leaves `datagram` for the next read loop iteration (the caller rings the doorbell so an
    /// idle loop wakes up).
    pub fn queue_probe(&self, datagram: Vec<u8>) {
        *self.probe.lock().expect("probe lock") = Some(datagram);
        self.probe_waiting.store(true, Ordering::Release);
    }

    fn take_probe(&self) -> Option<Vec<u8>> {
        if !self.probe_waiting.load(Ordering::Acquire) {
            return None;
        }
        self.probe_waiting.store(false, Ordering::Release);
        self.probe.lock().expect("probe lock").take()
    }

    /// The crate's answer to a probe.
    fn probe_answered(&self, data: &[u8]) {
        let nonce = decode(data).and_then(|m| {
            let mut n = TextAttribute::new(ATTR_NONCE, String::new());
            n.get_from(&m).ok().map(|_| n.text)
        });
        let now = self.mono_ms();
        self.nonces
            .lock()
            .expect("nonces lock")
            .answered(nonce, now);
        self.nonce_issued.notify_waiters();
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
    /// Cached: the crate asks for it on every ChannelData packet, and each ask would be a
    /// `getsockname` system call (half a system call per relayed packet, in the profile).
    local_addr: SocketAddr,
    shared: Arc<Shared>,
}

impl GateConn {
    pub fn new(sock: Arc<UdpSocket>, shared: Arc<Shared>) -> std::io::Result<Self> {
        Ok(Self {
            local_addr: sock.local_addr()?,
            sock,
            shared,
        })
    }

    fn inspect(&self, data: &[u8], src: SocketAddr) -> Verdict {
        let Some(typ) = peek_type(data) else {
            return Verdict::Pass; // ChannelData
        };
        let method = typ.method;
        if typ.class != CLASS_REQUEST
            || ![
                METHOD_ALLOCATE,
                METHOD_REFRESH,
                METHOD_CREATE_PERMISSION,
                METHOD_CHANNEL_BIND,
            ]
            .contains(&method)
        {
            return Verdict::Pass; // Binding, Send indications
        }
        let Some(m) = decode(data) else {
            return Verdict::Pass; // the crate drops what it cannot read
        };
        // RFC 8489 §9.2.4, in its order: no credentials -> 401 with a nonce; credentials
        // without username, realm or nonce -> 400; a nonce we do not accept -> 438.
        if !m.contains(ATTR_MESSAGE_INTEGRITY) {
            return Verdict::Reply(self.error(
                &m,
                method,
                CODE_UNAUTHORIZED,
                "credentials required",
                None,
            ));
        }
        let text = |attr| {
            let mut t = TextAttribute::new(attr, String::new());
            t.get_from(&m).ok().map(|_| t.text)
        };
        let (Some(username), Some(realm), Some(nonce)) =
            (text(ATTR_USERNAME), text(ATTR_REALM), text(ATTR_NONCE))
        else {
            return Verdict::Reply(self.error(
                &m,
                method,
                CODE_BAD_REQUEST,
                "username, realm and nonce required",
                None,
            ));
        };
        let accepted = {
            let nonces = self.shared.nonces.lock().expect("nonces lock");
            nonces.accepts(&nonce, self.shared.mono_ms())
        };
        if !accepted {
            return Verdict::Reply(self.error(&m, method, CODE_STALE_NONCE, "stale nonce", None));
        }
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
        if code == CODE_UNAUTHORIZED || code == CODE_STALE_NONCE {
            // The challenge: what the client needs to (re)compute its credentials.
            setters.push(Box::new(TextAttribute::new(
                ATTR_REALM,
                self.shared.realm.clone(),
            )));
            setters.push(Box::new(TextAttribute::new(
                ATTR_NONCE,
                self.shared.current_nonce(),
            )));
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
        if peek_type(data).is_none_or(|t| t.method != METHOD_ALLOCATE) {
            return; // ChannelData, Data indications and other answers: nothing to decode
        }
        let Some(m) = decode(data) else {
            return;
        };
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

/// The type of a STUN message from its header alone (RFC 8489 §5), `None` for anything else
/// (ChannelData). Both directions' hot paths (Send and Data indications, every one a STUN
/// message) pass on it without a full decode.
fn peek_type(data: &[u8]) -> Option<MessageType> {
    if !is_message(data) {
        return None;
    }
    let mut typ = MessageType::default();
    typ.read_value(u16::from_be_bytes([data[0], data[1]]));
    Some(typ)
}

fn decode(data: &[u8]) -> Option<Message> {
    let mut m = Message::new();
    m.raw = data.to_vec();
    m.decode().ok().map(|_| m)
}

/// The synthetic Allocate request of a probe (see [`super::nonce`]): without credentials for a
/// fresh nonce; with the expired nonce and a placeholder MESSAGE-INTEGRITY to retire one (the
/// crate looks the nonce up before anything else and answers 438 with a new one).
fn probe_request(probe: &Probe) -> Vec<u8> {
    let mut m = Message::new();
    m.transaction_id = TransactionId::new();
    m.typ = MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST);
    m.write_header();
    if let Probe::Retire(nonce) = probe {
        m.add(ATTR_NONCE, nonce.as_bytes());
        m.add(ATTR_MESSAGE_INTEGRITY, &[0; 20]);
    }
    m.raw
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
            if let Some(probe) = self.shared.take_probe() {
                let n = probe.len().min(buf.len());
                buf[..n].copy_from_slice(&probe[..n]);
                return Ok((n, PROBE_SOURCE));
            }
            let (n, src) = self.sock.recv_from(buf).await?;
            if n == 0 {
                // The doorbell that wakes this loop for a probe (an empty datagram means
                // nothing in STUN or TURN, so nobody loses anything by it).
                continue;
            }
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
        if target == PROBE_SOURCE {
            self.shared.probe_answered(buf);
            return Ok(buf.len());
        }
        self.observe_outbound(buf);
        Ok(self.sock.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.local_addr)
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

//! The TURN engine (RFC 8656 over RFC 8489), sans-IO in the shape of Firezone's relay core:
//! plain inputs (bytes, the client's transport address, `now`) in, what to send out. No tokio,
//! no sockets, no clock. The shells in [`super::io`] own the sockets and call it.
//!
//! Two paths:
//! - the **data path** ([`Engine::handle_client_input`] for ChannelData and Send indications,
//!   [`Engine::handle_peer_input`] for what arrives on a relay) returns a [`Forward`]: which bytes
//!   of the caller's buffer go where. Nothing is copied: a ChannelData payload is forwarded as a
//!   slice, and the frame to a client is written around the peer's data in the buffer's
//!   head-room ([`wire::HEADROOM`]).
//! - the **control path** (every other STUN message) queues [`Command`]s, drained with
//!   [`Engine::poll_command`]: responses, relay sockets to bind or close, streams to close.
//!
//! One index per lookup: allocations by client 5-tuple, by relay socket, and channel routes by
//! (client, channel number) for the hot path. Time-driven work (expiries) runs in
//! [`Engine::handle_timeout`], due at [`Engine::poll_timeout`].
//!
//! Security by construction: every datagram is classified once ([`wire::classify`]);
//! quotas are counted on live allocations in a [`QuotaBook`] shared by all engines; a request
//! on an allocation signed by another user is 441; nonces are stateless ([`auth::Nonces`]);
//! unauthenticated answers carry no reason phrase; every table a client can grow is capped.
//! A panic here is a bug.

pub mod auth;
pub mod quota;
pub mod wire;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stun::attributes::{
    AttrType, ATTR_CHANNEL_NUMBER, ATTR_DONT_FRAGMENT, ATTR_EVEN_PORT, ATTR_FINGERPRINT,
    ATTR_LIFETIME, ATTR_MESSAGE_INTEGRITY, ATTR_NONCE, ATTR_REALM, ATTR_REQUESTED_ADDRESS_FAMILY,
    ATTR_REQUESTED_TRANSPORT, ATTR_RESERVATION_TOKEN, ATTR_USERNAME, ATTR_XOR_PEER_ADDRESS,
};
use stun::error_code::{
    ErrorCode, ErrorCodeAttribute, CODE_ADDR_FAMILY_NOT_SUPPORTED, CODE_ALLOC_MISMATCH,
    CODE_ALLOC_QUOTA_REACHED, CODE_BAD_REQUEST, CODE_FORBIDDEN, CODE_INSUFFICIENT_CAPACITY,
    CODE_PEER_ADDR_FAMILY_MISMATCH, CODE_STALE_NONCE, CODE_UNAUTHORIZED, CODE_UNKNOWN_ATTRIBUTE,
    CODE_UNSUPPORTED_TRANS_PROTO, CODE_WRONG_CREDENTIALS,
};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{
    Message, MessageType, Method, Setter, CLASS_ERROR_RESPONSE, CLASS_INDICATION, CLASS_REQUEST,
    CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE, METHOD_BINDING, METHOD_CHANNEL_BIND,
    METHOD_CREATE_PERMISSION, METHOD_REFRESH,
};
use stun::textattrs::TextAttribute;
use stun::uattrs::UnknownAttributes;
use stun::xoraddr::XorMappedAddress;
use turn::proto::lifetime::Lifetime;
use turn::proto::relayaddr::RelayedAddress;

pub use auth::{Nonces, Secrets};

/// The maps the data path looks up per packet: foldhash, keyed per process (SipHash was a few
/// per cent of the relay's CPU).
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
pub use quota::{ByteBucket, QuotaBook, Refusal};

use super::filter::PeerFilter;
use wire::Kind;

/// RFC 8656 §7.2: default and largest allocation lifetimes.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
pub const MAX_LIFETIME: Duration = Duration::from_secs(3600);
/// RFC 8656 §9: permissions last 300 s.
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// RFC 8656 §12: channel bindings last 600 s.
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// How often expiries are swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// An allocation whose relay socket was asked for but never reported is dropped after this.
const PENDING_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest peer datagram relayed: a Data indication around it (28 bytes of attributes with
/// an IPv6 peer, padding to 4) must fit STUN's 16-bit length.
pub const MAX_PEER_DATA: usize = 65_504;
/// REQUESTED-TRANSPORT's UDP (RFC 8656 §14.7): the only relay transport offered.
const PROTO_UDP: u8 = 17;
/// RFC 8656 §14: ADDITIONAL-ADDRESS-FAMILY and ADDRESS-ERROR-CODE (not in the `stun` crate).
const ATTR_ADDITIONAL_ADDRESS_FAMILY: AttrType = AttrType(0x8000);
const ATTR_ADDRESS_ERROR_CODE: AttrType = AttrType(0x8001);
const FAMILY_IPV4: u8 = 0x01;
const FAMILY_IPV6: u8 = 0x02;

/// How a client reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    /// A tag for nonces (a nonce is not valid over another transport).
    fn tag(self) -> u8 {
        match self {
            Transport::Udp => 0,
            Transport::Tcp => 1,
            Transport::Tls => 2,
        }
    }

    /// Stream transports pad ChannelData to a multiple of 4 (RFC 8656 §12.5).
    pub fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
}

/// A client's 5-tuple: transport, its address, the server address it reached, and for streams
/// the connection (several connections may share addresses over time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientId {
    pub transport: Transport,
    pub src: SocketAddr,
    pub local: SocketAddr,
    /// The stream connection's number; 0 for UDP.
    pub stream: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        match super::filter::canonical(ip) {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    fn index(self) -> usize {
        match self {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }
}

/// A relay socket: its family and port (the same port number may exist in both families).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RelayKey {
    pub family: Family,
    pub port: u16,
}

/// An allocation's id, unique for the engine's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocId(pub u64);

/// Which port a relay socket should get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortRequest {
    Any,
    /// EVEN-PORT (RFC 8656 §14.6); with `reserve_next`, port + 1 is held for a later Allocate
    /// carrying the RESERVATION-TOKEN the shell returns.
    Even {
        reserve_next: bool,
    },
    /// The port a RESERVATION-TOKEN holds.
    Reserved([u8; 8]),
}

/// What the shell reports for a [`Command::BindRelay`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub port: u16,
    /// For [`PortRequest::Even`] with `reserve_next`: the token of the reserved port.
    pub token: Option<[u8; 8]>,
}

/// Engine settings; the reloadable ones have setters.
#[derive(Debug, Clone)]
pub struct Config {
    pub realm: String,
    /// The relay IP advertised to clients per family; `None`: that family is not relayed (440).
    pub relay_v4: Option<IpAddr>,
    pub relay_v6: Option<IpAddr>,
    /// A live allocation keeps working past its credential's expiry for at most this long.
    pub max_allocation_lifetime: Duration,
    /// Per allocation and direction, bits per second; 0: no cap.
    pub max_bps_per_allocation: u64,
    /// This engine's share of the server-wide cap, per direction, bits per second; 0: no cap.
    pub total_bps: u64,
    /// Most permissions (peer IPs) and channels per allocation.
    pub max_permissions: usize,
    pub max_channels: usize,
}

impl Config {
    fn relay_ip(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => self.relay_v4,
            Family::V6 => self.relay_v6,
        }
    }
}

/// The two clocks an input carries: monotonic for timers, unix seconds for credentials and
/// nonces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono: Instant,
    pub unix: i64,
}

/// Where the bytes of a data-path input go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    /// Send `buf[range]` from relay socket `relay` to `peer`.
    ToPeer {
        relay: RelayKey,
        peer: SocketAddr,
        range: Range<usize>,
    },
    /// Send `buf[range]` to `client`.
    ToClient {
        client: ClientId,
        range: Range<usize>,
    },
    /// Nothing to forward: dropped, or a control message whose answer is in the commands.
    Nothing,
}

/// Control-path output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Send `bytes` to `client`.
    Send { client: ClientId, bytes: Vec<u8> },
    /// Bind a relay socket of `family` for `alloc`, then call [`Engine::relay_bound`].
    BindRelay {
        alloc: AllocId,
        family: Family,
        port: PortRequest,
    },
    /// The relay socket is no longer used.
    CloseRelay { relay: RelayKey },
    /// Close the stream connection (its allocation is gone).
    CloseStream { client: ClientId },
}

/// Counters the shell turns into metrics (it reads and resets them now and then).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub to_peer_packets: u64,
    pub to_peer_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
    pub dropped_no_route: u64,
    pub dropped_no_permission: u64,
    pub dropped_over_bandwidth: u64,
    pub dropped_invalid: u64,
    pub allocations_created: u64,
    pub allocations_ended: u64,
    pub refused_user_quota: u64,
    pub refused_total_quota: u64,
    pub refused_no_port: u64,
    pub auth_failures: u64,
    pub stale_nonces: u64,
    pub wrong_credentials: u64,
    pub peer_denied: u64,
}

#[derive(Debug)]
struct Channel {
    number: u16,
    peer: SocketAddr,
    expires: Instant,
}

#[derive(Debug)]
struct Allocation {
    client: ClientId,
    username: String,
    user: String,
    key: Vec<u8>,
    created: Instant,
    expires: Instant,
    /// Relay sockets by family index; `None` for a family not allocated (or not bound yet).
    relays: [Option<RelayKey>; 2],
    /// Families asked for and not bound yet.
    pending: Vec<Family>,
    /// The Allocate that made it and the success response, for retransmissions.
    txid: [u8; 12],
    fingerprint: bool,
    lifetime: Duration,
    reservation: Option<[u8; 8]>,
    /// Made with a RESERVATION-TOKEN: one relay, of the reservation's family.
    from_reservation: bool,
    /// Families refused with 440 in a dual-stack request (ADDRESS-ERROR-CODE).
    family_error: Option<Family>,
    response: Option<Vec<u8>>,
    permissions: FastMap<IpAddr, Instant>,
    channels: Vec<Channel>,
    up: ByteBucket,
    down: ByteBucket,
}

impl Allocation {
    fn relay_for(&self, peer: SocketAddr) -> Option<RelayKey> {
        self.relays[Family::of(peer.ip()).index()]
    }

    fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions.get(&ip).is_some_and(|e| *e > now)
    }
}

/// The hot-path entry of a channel: where ChannelData from this client on this number goes.
#[derive(Debug, Clone, Copy)]
struct Route {
    alloc: AllocId,
    relay: RelayKey,
    peer: SocketAddr,
    expires: Instant,
    /// The permission of the peer's IP; refreshed with it.
    perm_expires: Instant,
}

pub struct Engine {
    cfg: Config,
    secrets: Secrets,
    filter: PeerFilter,
    nonces: Nonces,
    quotas: Arc<Mutex<QuotaBook>>,
    next_id: u64,
    allocs: FastMap<AllocId, Allocation>,
    by_client: FastMap<ClientId, AllocId>,
    by_relay: FastMap<RelayKey, AllocId>,
    routes: FastMap<(ClientId, u16), Route>,
    commands: VecDeque<Command>,
    next_sweep: Option<Instant>,
    up_total: ByteBucket,
    down_total: ByteBucket,
    /// Data indication transaction ids: a random salt and a counter.
    txid_salt: [u8; 4],
    txid_counter: u64,
    pub stats: Stats,
}

/// Attributes this server understands in requests (RFC 8489 §6.3.1: others below 0x8000 are
/// comprehension-required, and unknown → 420).
const KNOWN: &[AttrType] = &[
    ATTR_USERNAME,
    ATTR_MESSAGE_INTEGRITY,
    ATTR_REALM,
    ATTR_NONCE,
    ATTR_LIFETIME,
    ATTR_XOR_PEER_ADDRESS,
    ATTR_CHANNEL_NUMBER,
    ATTR_REQUESTED_TRANSPORT,
    ATTR_EVEN_PORT,
    ATTR_RESERVATION_TOKEN,
    ATTR_REQUESTED_ADDRESS_FAMILY,
    stun::attributes::ATTR_DATA,
    // PRIORITY, USE-CANDIDATE etc. never come to a TURN server; SOFTWARE and FINGERPRINT are
    // comprehension-optional anyway.
];

fn unknown_required(m: &Message) -> Vec<AttrType> {
    m.attributes
        .0
        .iter()
        .map(|a| a.typ)
        .filter(|t| t.0 < 0x8000 && !KNOWN.contains(t))
        .collect()
}

fn get_raw(m: &Message, t: AttrType) -> Option<Vec<u8>> {
    m.get(t).ok()
}

/// Every XOR-PEER-ADDRESS of a request; `Err` if one is malformed.
fn peers(m: &Message) -> Result<Vec<SocketAddr>, ()> {
    m.attributes
        .0
        .iter()
        .filter(|a| a.typ == ATTR_XOR_PEER_ADDRESS)
        .map(|a| wire::decode_xor_address(&a.value, &m.transaction_id.0).ok_or(()))
        .collect()
}

fn lifetime_of(m: &Message) -> Option<Duration> {
    let v = get_raw(m, ATTR_LIFETIME)?;
    (v.len() == 4).then(|| Duration::from_secs(u32::from_be_bytes([v[0], v[1], v[2], v[3]]) as u64))
}

/// RFC 8656 §7.2/§7.3: the lifetime asked for, capped at the maximum, at least the default.
fn desired_lifetime(asked: Option<Duration>) -> Duration {
    match asked {
        Some(l) => l.min(MAX_LIFETIME).max(DEFAULT_LIFETIME),
        None => DEFAULT_LIFETIME,
    }
}

/// A Setter for a raw attribute.
struct Raw(AttrType, Vec<u8>);

impl Setter for Raw {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        m.add(self.0, &self.1);
        Ok(())
    }
}

/// Where the error of a refused request comes from, to decide what the answer carries.
enum Signing<'a> {
    /// Not authenticated: no MESSAGE-INTEGRITY, no reason phrase (small answers to strangers).
    None,
    /// Authenticated: signed with the request's key.
    Key(&'a [u8]),
}

impl Engine {
    pub fn new(
        cfg: Config,
        secrets: Secrets,
        filter: PeerFilter,
        nonces: Nonces,
        quotas: Arc<Mutex<QuotaBook>>,
        salt: [u8; 4],
    ) -> Self {
        Self {
            up_total: ByteBucket::new(cfg.total_bps),
            down_total: ByteBucket::new(cfg.total_bps),
            cfg,
            secrets,
            filter,
            nonces,
            quotas,
            next_id: 1,
            allocs: FastMap::default(),
            by_client: FastMap::default(),
            by_relay: FastMap::default(),
            routes: FastMap::default(),
            commands: VecDeque::new(),
            next_sweep: None,
            txid_salt: salt,
            txid_counter: 0,
            stats: Stats::default(),
        }
    }

    // ----- reload

    pub fn set_secrets(&mut self, secrets: Secrets) {
        self.secrets = secrets;
    }

    /// A new peer filter: permissions (and their channels) it denies are removed at once.
    pub fn set_filter(&mut self, filter: PeerFilter) {
        self.filter = filter;
        let mut dropped = Vec::new();
        for (id, a) in &mut self.allocs {
            let filter = &self.filter;
            a.permissions.retain(|ip, _| filter.allowed_ip(*ip));
            let before = a.channels.len();
            let perms = &a.permissions;
            a.channels.retain(|c| perms.contains_key(&c.peer.ip()));
            if a.channels.len() != before {
                dropped.push(*id);
            }
        }
        for id in dropped {
            self.rebuild_routes(id);
        }
        let allocs = &self.allocs;
        self.routes.retain(|_, r| {
            allocs
                .get(&r.alloc)
                .is_some_and(|a| a.permissions.contains_key(&r.peer.ip()))
        });
    }

    pub fn set_limits(&mut self, max_allocation_lifetime: Duration, per_allocation_bps: u64) {
        self.cfg.max_allocation_lifetime = max_allocation_lifetime;
        if self.cfg.max_bps_per_allocation != per_allocation_bps {
            self.cfg.max_bps_per_allocation = per_allocation_bps;
            // Live allocations get the new cap too.
            for a in self.allocs.values_mut() {
                a.up = ByteBucket::new(per_allocation_bps);
                a.down = ByteBucket::new(per_allocation_bps);
            }
        }
    }

    pub fn allocation_count(&self) -> usize {
        self.allocs.len()
    }

    /// Whether `client` has an allocation (a stream without one is closed after a while).
    pub fn has_allocation(&self, client: &ClientId) -> bool {
        self.by_client.contains_key(client)
    }

    // ----- outputs

    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// When [`Engine::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_sweep
    }

    // ----- data path

    /// A datagram (or stream frame) from `client` in `buf[range]`.
    pub fn handle_client_input(
        &mut self,
        buf: &[u8],
        range: Range<usize>,
        client: ClientId,
        now: Now,
    ) -> Forward {
        let data = &buf[range.clone()];
        match wire::classify(data) {
            Kind::ChannelData { number, len } => {
                let Some(route) = self.routes.get(&(client, number)).copied() else {
                    self.stats.dropped_no_route += 1;
                    return Forward::Nothing;
                };
                if route.expires <= now.mono || route.perm_expires <= now.mono {
                    self.stats.dropped_no_permission += 1;
                    return Forward::Nothing;
                }
                let start = range.start + wire::CHANNEL_HEADER;
                self.forward_to_peer(
                    route.alloc,
                    route.relay,
                    route.peer,
                    start..start + len,
                    now,
                )
            }
            Kind::Stun => {
                if let Some((peer, payload)) = wire::parse_send_indication(data) {
                    let Some(&id) = self.by_client.get(&client) else {
                        self.stats.dropped_no_route += 1;
                        return Forward::Nothing;
                    };
                    let Some(a) = self.allocs.get(&id) else {
                        return Forward::Nothing;
                    };
                    let peer = SocketAddr::new(super::filter::canonical(peer.ip()), peer.port());
                    // The port is the packet's own (a permission is per IP): one of this host's
                    // addresses is a peer only on a relay port.
                    let (Some(relay), true, true) = (
                        a.relay_for(peer),
                        a.permitted(peer.ip(), now.mono),
                        self.filter.port_ok(peer),
                    ) else {
                        self.stats.dropped_no_permission += 1;
                        return Forward::Nothing;
                    };
                    let payload = range.start + payload.start..range.start + payload.end;
                    return self.forward_to_peer(id, relay, peer, payload, now);
                }
                let mut m = Message::new();
                m.raw = data.to_vec();
                if m.decode().is_err() {
                    self.stats.dropped_invalid += 1;
                    return Forward::Nothing;
                }
                self.handle_stun(&m, client, now);
                Forward::Nothing
            }
            Kind::Invalid => {
                self.stats.dropped_invalid += 1;
                Forward::Nothing
            }
        }
    }

    fn forward_to_peer(
        &mut self,
        id: AllocId,
        relay: RelayKey,
        peer: SocketAddr,
        range: Range<usize>,
        now: Now,
    ) -> Forward {
        let n = range.len();
        let Some(a) = self.allocs.get_mut(&id) else {
            return Forward::Nothing;
        };
        if !a.up.take(n, now.mono) || !self.up_total.take(n, now.mono) {
            self.stats.dropped_over_bandwidth += 1;
            return Forward::Nothing;
        }
        self.stats.to_peer_packets += 1;
        self.stats.to_peer_bytes += n as u64;
        Forward::ToPeer { relay, peer, range }
    }

    /// `len` bytes from `peer` arrived on relay socket `relay`, at `buf[start..start + len]`
    /// with [`wire::HEADROOM`] bytes free before them and [`wire::TAILROOM`] after: the frame to
    /// the client is written around them.
    pub fn handle_peer_input(
        &mut self,
        buf: &mut [u8],
        start: usize,
        len: usize,
        relay: RelayKey,
        peer: SocketAddr,
        now: Now,
    ) -> Forward {
        if len > MAX_PEER_DATA {
            // Its Data indication's length would not fit the STUN header's 16 bits.
            self.stats.dropped_invalid += 1;
            return Forward::Nothing;
        }
        let Some(&id) = self.by_relay.get(&relay) else {
            self.stats.dropped_no_route += 1;
            return Forward::Nothing;
        };
        let Some(a) = self.allocs.get_mut(&id) else {
            return Forward::Nothing;
        };
        let peer = SocketAddr::new(super::filter::canonical(peer.ip()), peer.port());
        if !a.permitted(peer.ip(), now.mono) {
            self.stats.dropped_no_permission += 1;
            return Forward::Nothing;
        }
        if !a.down.take(len, now.mono) || !self.down_total.take(len, now.mono) {
            self.stats.dropped_over_bandwidth += 1;
            return Forward::Nothing;
        }
        let client = a.client;
        let channel = a
            .channels
            .iter()
            .find(|c| c.peer == peer && c.expires > now.mono)
            .map(|c| c.number);
        let range = match channel {
            Some(number) => {
                wire::frame_channel_data(buf, start, len, number, client.transport.is_stream())
            }
            None => {
                self.txid_counter += 1;
                let mut txid = [0u8; 12];
                txid[..4].copy_from_slice(&self.txid_salt);
                txid[4..].copy_from_slice(&self.txid_counter.to_be_bytes());
                wire::frame_data_indication(buf, start, len, peer, &txid)
            }
        };
        self.stats.to_client_packets += 1;
        self.stats.to_client_bytes += range.len() as u64;
        Forward::ToClient { client, range }
    }

    // ----- control path

    fn handle_stun(&mut self, m: &Message, client: ClientId, now: Now) {
        let (class, method) = (m.typ.class, m.typ.method);
        if class != CLASS_REQUEST {
            // Indications other than Send (handled above), and responses: nothing to answer.
            if class == CLASS_INDICATION {
                self.stats.dropped_invalid += 1;
            }
            return;
        }
        if method == METHOD_BINDING {
            self.binding(m, client);
            return;
        }
        if ![
            METHOD_ALLOCATE,
            METHOD_REFRESH,
            METHOD_CREATE_PERMISSION,
            METHOD_CHANNEL_BIND,
        ]
        .contains(&method)
        {
            self.error(
                m,
                client,
                method,
                CODE_BAD_REQUEST,
                Signing::None,
                Vec::new(),
            );
            return;
        }
        let verified = match auth::verify(
            m,
            &self.cfg.realm,
            &self.secrets,
            &self.nonces,
            client.transport.tag(),
            client.src,
            now.unix,
        ) {
            Ok(v) => v,
            Err(auth::Refused::Challenge) => {
                self.challenge(m, client, method, CODE_UNAUTHORIZED, now);
                return;
            }
            Err(auth::Refused::Incomplete) => {
                self.error(
                    m,
                    client,
                    method,
                    CODE_BAD_REQUEST,
                    Signing::None,
                    Vec::new(),
                );
                return;
            }
            Err(auth::Refused::StaleNonce) => {
                self.stats.stale_nonces += 1;
                self.challenge(m, client, method, CODE_STALE_NONCE, now);
                return;
            }
            Err(auth::Refused::BadCredentials(_)) => {
                self.stats.auth_failures += 1;
                self.challenge(m, client, method, CODE_UNAUTHORIZED, now);
                return;
            }
        };
        let key = verified.key.clone();
        let unknown = unknown_required(m);
        if !unknown.is_empty() {
            self.error(
                m,
                client,
                method,
                CODE_UNKNOWN_ATTRIBUTE,
                Signing::Key(&key),
                vec![Box::new(UnknownAttributes(unknown))],
            );
            return;
        }
        let existing = self.by_client.get(&client).copied();
        if let Some(id) = existing {
            let a = &self.allocs[&id];
            if a.username != verified.username {
                // RFC 8656 §5: the allocation belongs to the credentials that made it.
                self.stats.wrong_credentials += 1;
                self.error(
                    m,
                    client,
                    method,
                    CODE_WRONG_CREDENTIALS,
                    Signing::Key(&key),
                    Vec::new(),
                );
                return;
            }
        }
        let expired = verified.expiry <= now.unix;
        if expired {
            // Only a live allocation carries on past its credential's expiry, and only within
            // the maximum lifetime (PROTOCOL §4).
            let carries_on = method != METHOD_ALLOCATE
                && existing.is_some_and(|id| {
                    now.mono.saturating_duration_since(self.allocs[&id].created)
                        < self.cfg.max_allocation_lifetime
                });
            if !carries_on {
                self.stats.auth_failures += 1;
                self.challenge(m, client, method, CODE_UNAUTHORIZED, now);
                return;
            }
        }
        match method {
            METHOD_ALLOCATE => self.allocate(m, client, verified, existing, now),
            _ => {
                let Some(id) = existing else {
                    self.error(
                        m,
                        client,
                        method,
                        CODE_ALLOC_MISMATCH,
                        Signing::Key(&key),
                        Vec::new(),
                    );
                    return;
                };
                match method {
                    METHOD_REFRESH => self.refresh(m, client, id, &key, now),
                    METHOD_CREATE_PERMISSION => self.create_permission(m, client, id, &key, now),
                    _ => self.channel_bind(m, client, id, &key, now),
                }
            }
        }
    }

    fn binding(&mut self, m: &Message, client: ClientId) {
        let mapped = XorMappedAddress {
            ip: client.src.ip(),
            port: client.src.port(),
        };
        let fingerprint = m.contains(ATTR_FINGERPRINT);
        self.respond(
            m,
            client,
            METHOD_BINDING,
            CLASS_SUCCESS_RESPONSE,
            vec![Box::new(mapped)],
            None,
            fingerprint,
        );
    }

    fn allocate(
        &mut self,
        m: &Message,
        client: ClientId,
        v: auth::Verified,
        existing: Option<AllocId>,
        now: Now,
    ) {
        let key = v.key.clone();
        if let Some(id) = existing {
            let a = &self.allocs[&id];
            if a.txid == m.transaction_id.0 {
                // A retransmission: the same answer again (none yet while the relay is bound).
                if let Some(resp) = a.response.clone() {
                    self.commands.push_back(Command::Send {
                        client,
                        bytes: resp,
                    });
                }
                return;
            }
            self.error(
                m,
                client,
                METHOD_ALLOCATE,
                CODE_ALLOC_MISMATCH,
                Signing::Key(&key),
                Vec::new(),
            );
            return;
        }
        let bad = |this: &mut Self, code: ErrorCode| {
            this.error(
                m,
                client,
                METHOD_ALLOCATE,
                code,
                Signing::Key(&key),
                Vec::new(),
            );
        };
        match get_raw(m, ATTR_REQUESTED_TRANSPORT) {
            None => return bad(self, CODE_BAD_REQUEST),
            Some(v) if v.len() != 4 => return bad(self, CODE_BAD_REQUEST),
            Some(v) if v[0] != PROTO_UDP => return bad(self, CODE_UNSUPPORTED_TRANS_PROTO),
            Some(_) => {}
        }
        if m.contains(ATTR_DONT_FRAGMENT) {
            // RFC 8656 §7.2 step 4: not supported, so an unknown comprehension-required attribute.
            self.error(
                m,
                client,
                METHOD_ALLOCATE,
                CODE_UNKNOWN_ATTRIBUTE,
                Signing::Key(&key),
                vec![Box::new(UnknownAttributes(vec![ATTR_DONT_FRAGMENT]))],
            );
            return;
        }
        // Address families (RFC 8656 §7.2 steps 5-6).
        let family_value = |t| get_raw(m, t).map(|v| if v.len() == 4 { v[0] } else { 0 });
        let requested = family_value(ATTR_REQUESTED_ADDRESS_FAMILY);
        let additional = family_value(ATTR_ADDITIONAL_ADDRESS_FAMILY);
        let token = get_raw(m, ATTR_RESERVATION_TOKEN);
        let even = get_raw(m, ATTR_EVEN_PORT);
        if token.is_some() && (even.is_some() || requested.is_some() || additional.is_some()) {
            return bad(self, CODE_BAD_REQUEST);
        }
        if requested.is_some() && additional.is_some() {
            return bad(self, CODE_BAD_REQUEST);
        }
        let mut families = Vec::new();
        let mut family_error = None;
        match (requested, additional) {
            (None, None) => families.push(Family::V4),
            (Some(FAMILY_IPV4), None) => families.push(Family::V4),
            (Some(FAMILY_IPV6), None) => families.push(Family::V6),
            (None, Some(FAMILY_IPV6)) => {
                families.push(Family::V4);
                if self.cfg.relay_v6.is_some() {
                    families.push(Family::V6);
                } else {
                    family_error = Some(Family::V6);
                }
            }
            _ => return bad(self, CODE_BAD_REQUEST),
        }
        // A reservation decides its own family (the shell reports it).
        if token.is_none() && families.iter().any(|f| self.cfg.relay_ip(*f).is_none()) {
            return bad(self, CODE_ADDR_FAMILY_NOT_SUPPORTED);
        }
        let port = match (&token, &even) {
            (Some(t), _) if t.len() == 8 => {
                PortRequest::Reserved(t[..8].try_into().expect("8 bytes"))
            }
            (Some(_), _) => return bad(self, CODE_BAD_REQUEST),
            (None, Some(e)) if e.len() == 1 => PortRequest::Even {
                reserve_next: e[0] & 0x80 != 0 && families.len() == 1,
            },
            (None, Some(_)) => return bad(self, CODE_BAD_REQUEST),
            (None, None) => PortRequest::Any,
        };
        let reserved = self.quotas.lock().expect("quota lock").reserve(&v.user);
        if let Err(r) = reserved {
            match r {
                Refusal::UserQuota => self.stats.refused_user_quota += 1,
                Refusal::TotalQuota => self.stats.refused_total_quota += 1,
            }
            let code = match r {
                Refusal::UserQuota => CODE_ALLOC_QUOTA_REACHED,
                Refusal::TotalQuota => CODE_INSUFFICIENT_CAPACITY,
            };
            return bad(self, code);
        }
        let id = AllocId(self.next_id);
        self.next_id += 1;
        let lifetime = desired_lifetime(lifetime_of(m));
        self.allocs.insert(
            id,
            Allocation {
                client,
                username: v.username,
                user: v.user,
                key: v.key,
                created: now.mono,
                expires: now.mono + lifetime,
                relays: [None, None],
                pending: families.clone(),
                txid: m.transaction_id.0,
                fingerprint: m.contains(ATTR_FINGERPRINT),
                lifetime,
                reservation: None,
                from_reservation: matches!(port, PortRequest::Reserved(_)),
                family_error,
                response: None,
                permissions: FastMap::default(),
                channels: Vec::new(),
                up: ByteBucket::new(self.cfg.max_bps_per_allocation),
                down: ByteBucket::new(self.cfg.max_bps_per_allocation),
            },
        );
        self.by_client.insert(client, id);
        self.arm(now.mono);
        for family in families {
            self.commands.push_back(Command::BindRelay {
                alloc: id,
                family,
                port,
            });
        }
    }

    /// The shell's answer to [`Command::BindRelay`]: `Err` when no port could be had.
    pub fn relay_bound(&mut self, id: AllocId, family: Family, result: Result<Bound, ()>) {
        let Some(a) = self.allocs.get_mut(&id) else {
            // The allocation ended meanwhile (its stream closed): give the socket back.
            if let Ok(b) = result {
                self.commands.push_back(Command::CloseRelay {
                    relay: RelayKey {
                        family,
                        port: b.port,
                    },
                });
            }
            return;
        };
        let Ok(bound) = result else {
            self.stats.refused_no_port += 1;
            let (client, key, txid, fp) = (a.client, a.key.clone(), a.txid, a.fingerprint);
            let mut req = Message::new();
            req.transaction_id = stun::agent::TransactionId(txid);
            if fp {
                req.add(ATTR_FINGERPRINT, &[0; 4]);
            }
            // The answer first: over TCP/TLS the removal closes the connection after it.
            self.error(
                &req,
                client,
                METHOD_ALLOCATE,
                CODE_INSUFFICIENT_CAPACITY,
                Signing::Key(&key),
                Vec::new(),
            );
            self.remove(id);
            return;
        };
        let relay = RelayKey {
            family,
            port: bound.port,
        };
        a.relays[family.index()] = Some(relay);
        if a.from_reservation {
            // A reserved port's family is the reservation's, whatever was asked.
            a.pending.clear();
        } else {
            a.pending.retain(|f| *f != family);
        }
        if bound.token.is_some() {
            a.reservation = bound.token;
        }
        self.by_relay.insert(relay, id);
        if !self.allocs[&id].pending.is_empty() {
            return;
        }
        // Every relay is bound: the success response (kept for retransmissions).
        let a = &self.allocs[&id];
        let mut attrs: Vec<Box<dyn Setter>> = Vec::new();
        for relay in a.relays.iter().flatten() {
            let ip = self
                .cfg
                .relay_ip(relay.family)
                .expect("only families with a relay IP are bound");
            attrs.push(Box::new(RelayedAddress {
                ip,
                port: relay.port,
            }));
        }
        attrs.push(Box::new(XorMappedAddress {
            ip: a.client.src.ip(),
            port: a.client.src.port(),
        }));
        attrs.push(Box::new(Lifetime(a.lifetime)));
        if let Some(token) = a.reservation {
            attrs.push(Box::new(Raw(ATTR_RESERVATION_TOKEN, token.to_vec())));
        }
        if a.family_error.is_some() {
            // ADDRESS-ERROR-CODE: family IPv6, 440 (RFC 8656 §14.10).
            let mut v = vec![FAMILY_IPV6, 0, 0, 0];
            v[2] = 4;
            v[3] = 40;
            attrs.push(Box::new(Raw(ATTR_ADDRESS_ERROR_CODE, v)));
        }
        let mut req = Message::new();
        req.transaction_id = stun::agent::TransactionId(a.txid);
        let (client, key, fp) = (a.client, a.key.clone(), a.fingerprint);
        let bytes = build(
            &req,
            METHOD_ALLOCATE,
            CLASS_SUCCESS_RESPONSE,
            attrs,
            Some(&key),
            fp,
        );
        self.stats.allocations_created += 1;
        if let Some(a) = self.allocs.get_mut(&id) {
            a.response = Some(bytes.clone());
        }
        self.commands.push_back(Command::Send { client, bytes });
    }

    fn refresh(&mut self, m: &Message, client: ClientId, id: AllocId, key: &[u8], now: Now) {
        let asked = lifetime_of(m);
        if asked == Some(Duration::ZERO) {
            // The answer first: over TCP/TLS the removal closes the connection after it.
            self.respond(
                m,
                client,
                METHOD_REFRESH,
                CLASS_SUCCESS_RESPONSE,
                vec![Box::new(Lifetime(Duration::ZERO))],
                Some(key),
                m.contains(ATTR_FINGERPRINT),
            );
            self.remove(id);
            return;
        }
        let lifetime = desired_lifetime(asked);
        if let Some(a) = self.allocs.get_mut(&id) {
            a.expires = now.mono + lifetime;
        }
        self.respond(
            m,
            client,
            METHOD_REFRESH,
            CLASS_SUCCESS_RESPONSE,
            vec![Box::new(Lifetime(lifetime))],
            Some(key),
            m.contains(ATTR_FINGERPRINT),
        );
    }

    /// The checks CreatePermission and ChannelBind share for their peers: families the
    /// allocation has (443 otherwise) and the peer filter (403).
    fn check_peers(
        &mut self,
        m: &Message,
        client: ClientId,
        method: Method,
        id: AllocId,
        peers: &[SocketAddr],
        key: &[u8],
    ) -> bool {
        let a = &self.allocs[&id];
        if peers.iter().any(|p| a.relay_for(*p).is_none()) {
            self.error(
                m,
                client,
                method,
                CODE_PEER_ADDR_FAMILY_MISMATCH,
                Signing::Key(key),
                Vec::new(),
            );
            return false;
        }
        if peers.iter().any(|p| !self.filter.allowed(*p)) {
            self.stats.peer_denied += 1;
            self.error(
                m,
                client,
                method,
                CODE_FORBIDDEN,
                Signing::Key(key),
                Vec::new(),
            );
            return false;
        }
        true
    }

    fn create_permission(
        &mut self,
        m: &Message,
        client: ClientId,
        id: AllocId,
        key: &[u8],
        now: Now,
    ) {
        let method = METHOD_CREATE_PERMISSION;
        let peers = match peers(m) {
            Ok(p) if !p.is_empty() => p,
            _ => {
                return self.error(
                    m,
                    client,
                    method,
                    CODE_BAD_REQUEST,
                    Signing::Key(key),
                    Vec::new(),
                )
            }
        };
        if !self.check_peers(m, client, method, id, &peers, key) {
            return;
        }
        let a = &self.allocs[&id];
        let new = peers
            .iter()
            .map(|p| super::filter::canonical(p.ip()))
            .filter(|ip| !a.permissions.contains_key(ip))
            .collect::<std::collections::HashSet<_>>()
            .len();
        if a.permissions.len() + new > self.cfg.max_permissions {
            return self.error(
                m,
                client,
                method,
                CODE_INSUFFICIENT_CAPACITY,
                Signing::Key(key),
                Vec::new(),
            );
        }
        for p in &peers {
            self.permit(id, super::filter::canonical(p.ip()), now.mono);
        }
        self.respond(
            m,
            client,
            method,
            CLASS_SUCCESS_RESPONSE,
            Vec::new(),
            Some(key),
            m.contains(ATTR_FINGERPRINT),
        );
    }

    /// Installs or refreshes the permission for `ip`, and the routes of its channels.
    fn permit(&mut self, id: AllocId, ip: IpAddr, now: Instant) {
        let expires = now + PERMISSION_LIFETIME;
        let Some(a) = self.allocs.get_mut(&id) else {
            return;
        };
        a.permissions.insert(ip, expires);
        let client = a.client;
        for c in a.channels.iter().filter(|c| c.peer.ip() == ip) {
            if let Some(r) = self.routes.get_mut(&(client, c.number)) {
                r.perm_expires = expires;
            }
        }
    }

    fn channel_bind(&mut self, m: &Message, client: ClientId, id: AllocId, key: &[u8], now: Now) {
        let method = METHOD_CHANNEL_BIND;
        let bad = |this: &mut Self| {
            this.error(
                m,
                client,
                method,
                CODE_BAD_REQUEST,
                Signing::Key(key),
                Vec::new(),
            );
        };
        let number = match get_raw(m, ATTR_CHANNEL_NUMBER) {
            Some(v) if v.len() == 4 => u16::from_be_bytes([v[0], v[1]]),
            _ => return bad(self),
        };
        if !(wire::CHANNEL_MIN..=wire::CHANNEL_MAX).contains(&number) {
            return bad(self);
        }
        let peer = match peers(m) {
            Ok(p) if p.len() == 1 => p[0],
            _ => return bad(self),
        };
        let peer = SocketAddr::new(super::filter::canonical(peer.ip()), peer.port());
        if !self.check_peers(m, client, method, id, &[peer], key) {
            return;
        }
        let a = &self.allocs[&id];
        // A number is bound to one peer and a peer to one number (RFC 8656 §11.2).
        if a.channels
            .iter()
            .any(|c| (c.number == number) != (c.peer == peer))
        {
            return bad(self);
        }
        let exists = a.channels.iter().any(|c| c.number == number);
        let new_perm = !a.permissions.contains_key(&peer.ip());
        if (!exists && a.channels.len() >= self.cfg.max_channels)
            || (new_perm && a.permissions.len() >= self.cfg.max_permissions)
        {
            return self.error(
                m,
                client,
                method,
                CODE_INSUFFICIENT_CAPACITY,
                Signing::Key(key),
                Vec::new(),
            );
        }
        let relay = a.relay_for(peer).expect("checked by check_peers");
        let expires = now.mono + CHANNEL_LIFETIME;
        let a = self.allocs.get_mut(&id).expect("looked up above");
        match a.channels.iter_mut().find(|c| c.number == number) {
            Some(c) => c.expires = expires,
            None => a.channels.push(Channel {
                number,
                peer,
                expires,
            }),
        }
        self.routes.insert(
            (client, number),
            Route {
                alloc: id,
                relay,
                peer,
                expires,
                perm_expires: now.mono,
            },
        );
        self.permit(id, peer.ip(), now.mono);
        self.respond(
            m,
            client,
            method,
            CLASS_SUCCESS_RESPONSE,
            Vec::new(),
            Some(key),
            m.contains(ATTR_FINGERPRINT),
        );
    }

    fn rebuild_routes(&mut self, id: AllocId) {
        let Some(a) = self.allocs.get(&id) else {
            return;
        };
        let client = a.client;
        self.routes.retain(|(c, number), r| {
            *c != client || r.alloc != id || a.channels.iter().any(|ch| ch.number == *number)
        });
    }

    /// A stream connection closed: its allocation goes with it (RFC 8656 §6.2).
    pub fn stream_closed(&mut self, client: ClientId) {
        if let Some(id) = self.by_client.get(&client).copied() {
            self.remove(id);
        }
    }

    fn remove(&mut self, id: AllocId) {
        let Some(a) = self.allocs.remove(&id) else {
            return;
        };
        self.by_client.remove(&a.client);
        for relay in a.relays.iter().flatten() {
            self.by_relay.remove(relay);
            self.commands
                .push_back(Command::CloseRelay { relay: *relay });
        }
        for c in &a.channels {
            self.routes.remove(&(a.client, c.number));
        }
        self.quotas.lock().expect("quota lock").release(&a.user);
        self.stats.allocations_ended += 1;
        if a.client.transport.is_stream() {
            self.commands
                .push_back(Command::CloseStream { client: a.client });
        }
        if self.allocs.is_empty() {
            self.next_sweep = None;
        }
    }

    fn arm(&mut self, now: Instant) {
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now + SWEEP_INTERVAL);
        }
    }

    /// Expires allocations, permissions and channels.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_sweep.is_none_or(|t| t > now) {
            return;
        }
        let dead: Vec<AllocId> = self
            .allocs
            .iter()
            .filter(|(_, a)| {
                a.expires <= now
                    || (!a.pending.is_empty()
                        && now.saturating_duration_since(a.created) > PENDING_TIMEOUT)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.remove(id);
        }
        let mut changed = Vec::new();
        for (id, a) in &mut self.allocs {
            a.permissions.retain(|_, e| *e > now);
            let before = a.channels.len();
            // An expired channel stays reserved for 5 minutes more (RFC 8656 §12): the number
            // cannot go to another peer meanwhile, then it is forgotten.
            a.channels
                .retain(|c| c.expires + Duration::from_secs(300) > now);
            if a.channels.len() != before {
                changed.push(*id);
            }
        }
        for id in changed {
            self.rebuild_routes(id);
        }
        self.next_sweep = if self.allocs.is_empty() {
            None
        } else {
            Some(now + SWEEP_INTERVAL)
        };
    }

    // ----- answers

    fn challenge(
        &mut self,
        m: &Message,
        client: ClientId,
        method: Method,
        code: ErrorCode,
        now: Now,
    ) {
        let nonce = self
            .nonces
            .mint(client.transport.tag(), client.src, now.unix);
        let realm = self.cfg.realm.clone();
        self.error(
            m,
            client,
            method,
            code,
            Signing::None,
            vec![
                Box::new(TextAttribute::new(ATTR_REALM, realm)),
                Box::new(TextAttribute::new(ATTR_NONCE, nonce)),
            ],
        );
    }

    fn error(
        &mut self,
        m: &Message,
        client: ClientId,
        method: Method,
        code: ErrorCode,
        signing: Signing<'_>,
        extra: Vec<Box<dyn Setter>>,
    ) {
        let reason: &[u8] = match (&signing, code) {
            // Strangers get no reason phrase: the smallest answer that is still a STUN answer.
            (Signing::None, _) => b"",
            (_, c) if c == CODE_ALLOC_MISMATCH => b"Allocation Mismatch",
            (_, c) if c == CODE_WRONG_CREDENTIALS => b"Wrong Credentials",
            (_, c) if c == CODE_FORBIDDEN => b"Forbidden",
            (_, c) if c == CODE_ALLOC_QUOTA_REACHED => b"Allocation Quota Reached",
            (_, c) if c == CODE_INSUFFICIENT_CAPACITY => b"Insufficient Capacity",
            (_, c) if c == CODE_ADDR_FAMILY_NOT_SUPPORTED => b"Address Family not Supported",
            (_, c) if c == CODE_PEER_ADDR_FAMILY_MISMATCH => b"Peer Address Family Mismatch",
            (_, c) if c == CODE_UNSUPPORTED_TRANS_PROTO => b"Unsupported Transport Protocol",
            (_, c) if c == CODE_UNKNOWN_ATTRIBUTE => b"Unknown Attribute",
            _ => b"Bad Request",
        };
        let mut attrs: Vec<Box<dyn Setter>> = vec![Box::new(ErrorCodeAttribute {
            code,
            reason: reason.to_vec(),
        })];
        attrs.extend(extra);
        let key = match signing {
            Signing::None => None,
            Signing::Key(k) => Some(k),
        };
        let bytes = build(
            m,
            method,
            CLASS_ERROR_RESPONSE,
            attrs,
            key,
            m.contains(ATTR_FINGERPRINT),
        );
        self.commands.push_back(Command::Send { client, bytes });
    }

    #[allow(clippy::too_many_arguments)]
    fn respond(
        &mut self,
        m: &Message,
        client: ClientId,
        method: Method,
        class: stun::message::MessageClass,
        attrs: Vec<Box<dyn Setter>>,
        key: Option<&[u8]>,
        fingerprint: bool,
    ) {
        let bytes = build(m, method, class, attrs, key, fingerprint);
        self.commands.push_back(Command::Send { client, bytes });
    }
}

/// A response to `req`, signed with `key` when given, with FINGERPRINT when the request had one
/// (RFC 8489 §7.3: answer in kind).
fn build(
    req: &Message,
    method: Method,
    class: stun::message::MessageClass,
    attrs: Vec<Box<dyn Setter>>,
    key: Option<&[u8]>,
    fingerprint: bool,
) -> Vec<u8> {
    let mut setters: Vec<Box<dyn Setter>> = Vec::with_capacity(attrs.len() + 4);
    setters.push(Box::new(Message {
        transaction_id: req.transaction_id,
        ..Default::default()
    }));
    setters.push(Box::new(MessageType::new(method, class)));
    setters.extend(attrs);
    if let Some(key) = key {
        setters.push(Box::new(MessageIntegrity(key.to_vec())));
    }
    if fingerprint {
        setters.push(Box::new(FINGERPRINT));
    }
    let mut out = Message::new();
    match out.build(&setters) {
        Ok(()) => out.raw,
        // Building only fails on attributes we made wrong: a bug, answered with nothing.
        Err(_) => Vec::new(),
    }
}

//! Scenario tests for the TURN engine: one input at an explicit instant, the exact commands out,
//! then nothing left. Client messages are built with the `stun` and `turn` crates, answers read
//! back with them.
#![allow(clippy::disallowed_methods)] // one Instant::now() as the tests' epoch

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stun::agent::TransactionId;
use stun::attributes::*;
use stun::error_code::ErrorCodeAttribute;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;
use turn::proto::channum::ChannelNumber;
use turn::proto::data::Data;
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::reqtrans::RequestedTransport;

use super::*;
use crate::auth::turn_rest;

const SECRET: &str = "engine-test-secret";
const REALM: &str = "switchboard";
const RELAY_IP: &str = "203.0.113.7";
const T0_UNIX: i64 = 1_800_000_000;

struct H {
    e: Engine,
    now: Now,
    next_port: u16,
    quotas: Arc<Mutex<QuotaBook>>,
}

fn config() -> Config {
    Config {
        realm: REALM.into(),
        relay_v4: Some(RELAY_IP.parse().unwrap()),
        relay_v6: None,
        max_allocation_lifetime: Duration::from_secs(3 * 3600),
        max_bps_per_allocation: 0,
        total_bps: 0,
        max_permissions: 8,
        max_channels: 8,
    }
}

fn udp(port: u16) -> ClientId {
    ClientId {
        transport: Transport::Udp,
        src: SocketAddr::new("198.51.100.1".parse().unwrap(), port),
        local: format!("{RELAY_IP}:3478").parse().unwrap(),
        stream: 0,
    }
}

fn tcp(port: u16, stream: u64) -> ClientId {
    ClientId {
        transport: Transport::Tcp,
        stream,
        ..udp(port)
    }
}

impl H {
    fn with(cfg: Config, user_quota: u32, total_quota: u32) -> H {
        let quotas = Arc::new(Mutex::new(QuotaBook::new(user_quota, total_quota)));
        let filter = PeerFilter::new(&[], &[], vec![RELAY_IP.parse().unwrap()], 49152..=65535);
        let e = Engine::new(
            cfg,
            Secrets {
                current: SECRET.into(),
                previous: Some("old-secret".into()),
            },
            filter,
            Nonces::new([5; 32]),
            quotas.clone(),
            [1, 2, 3, 4],
        );
        let t0 = Instant::now();
        H {
            e,
            now: Now {
                mono: t0,
                unix: T0_UNIX,
            },
            next_port: 50000,
            quotas,
        }
    }

    fn new() -> H {
        H::with(config(), 2, 3)
    }

    fn advance(&mut self, d: Duration) {
        self.now.mono += d;
        self.now.unix += d.as_secs() as i64;
        self.e.handle_timeout(self.now.mono);
    }

    fn input(&mut self, client: ClientId, bytes: &[u8]) -> Forward {
        self.e
            .handle_client_input(bytes, 0..bytes.len(), client, self.now)
    }

    fn drain(&mut self) -> Vec<Command> {
        std::iter::from_fn(|| self.e.poll_command()).collect()
    }

    /// Sends a request and returns the one answer it must produce; relay binds asked for on the
    /// way are granted ports 50000, 50002... (with a token when a reservation was asked).
    fn ask(&mut self, client: ClientId, bytes: &[u8]) -> Message {
        assert_eq!(self.input(client, bytes), Forward::Nothing);
        let mut answers = Vec::new();
        while let Some(c) = self.e.poll_command() {
            match c {
                Command::Send { client: to, bytes } => {
                    assert_eq!(to, client);
                    answers.push(decode(&bytes));
                }
                Command::BindRelay {
                    alloc,
                    family,
                    port,
                } => {
                    let bound = match port {
                        PortRequest::Reserved(t) if t == [9; 8] => Ok(Bound {
                            port: 50001,
                            token: None,
                        }),
                        PortRequest::Reserved(_) => Err(()),
                        PortRequest::Even { reserve_next } => {
                            let p = self.next_port;
                            self.next_port += 2;
                            Ok(Bound {
                                port: p,
                                token: reserve_next.then_some([9; 8]),
                            })
                        }
                        PortRequest::Any => {
                            let p = self.next_port;
                            self.next_port += 2;
                            Ok(Bound {
                                port: p,
                                token: None,
                            })
                        }
                    };
                    self.e.relay_bound(alloc, family, bound);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(answers.len(), 1, "one answer per request");
        answers.pop().unwrap()
    }

    fn nonce(&mut self, client: ClientId) -> String {
        let m = self.ask(client, &request(METHOD_ALLOCATE, &[&transport_udp()]));
        assert_eq!(code(&m), Some(401));
        text(&m, ATTR_NONCE).unwrap()
    }

    /// A live allocation for `client` as `user`; returns its relay address.
    fn allocate(&mut self, client: ClientId, user: &str) -> SocketAddr {
        let nonce = self.nonce(client);
        let cred = Cred::new(user, self.now.unix + 3600, &nonce);
        let m = self.ask(client, &cred.sign(METHOD_ALLOCATE, &[&transport_udp()]));
        assert_eq!(m.typ.class, CLASS_SUCCESS_RESPONSE, "{:?}", code(&m));
        relayed(&m)
    }
}

/// A client's long-term credential of the REST scheme.
#[derive(Clone)]
struct Cred {
    username: String,
    password: String,
    nonce: String,
}

impl Cred {
    fn new(user: &str, expiry: i64, nonce: &str) -> Cred {
        let username = format!("{expiry}:{user}");
        Cred {
            password: turn_rest::password(SECRET, &username),
            username,
            nonce: nonce.into(),
        }
    }

    fn key(&self) -> Vec<u8> {
        MessageIntegrity::new_long_term_integrity(
            self.username.clone(),
            REALM.into(),
            self.password.clone(),
        )
        .0
    }

    fn sign(&self, method: Method, attrs: &[&dyn Setter]) -> Vec<u8> {
        self.sign_txid(method, TransactionId::new(), attrs)
    }

    fn sign_txid(&self, method: Method, txid: TransactionId, attrs: &[&dyn Setter]) -> Vec<u8> {
        let mut m = Message::new();
        m.transaction_id = txid;
        m.typ = MessageType::new(method, CLASS_REQUEST);
        m.write_header();
        for a in attrs {
            a.add_to(&mut m).unwrap();
        }
        TextAttribute::new(ATTR_USERNAME, self.username.clone())
            .add_to(&mut m)
            .unwrap();
        TextAttribute::new(ATTR_REALM, REALM.into())
            .add_to(&mut m)
            .unwrap();
        TextAttribute::new(ATTR_NONCE, self.nonce.clone())
            .add_to(&mut m)
            .unwrap();
        MessageIntegrity(self.key()).add_to(&mut m).unwrap();
        stun::fingerprint::FINGERPRINT.add_to(&mut m).unwrap();
        m.raw
    }
}

fn request(method: Method, attrs: &[&dyn Setter]) -> Vec<u8> {
    let mut m = Message::new();
    m.transaction_id = TransactionId::new();
    m.typ = MessageType::new(method, CLASS_REQUEST);
    m.write_header();
    for a in attrs {
        a.add_to(&mut m).unwrap();
    }
    m.raw
}

fn transport_udp() -> RequestedTransport {
    RequestedTransport {
        protocol: turn::proto::PROTO_UDP,
    }
}

fn peer(addr: &str) -> PeerAddress {
    let a: SocketAddr = addr.parse().unwrap();
    PeerAddress {
        ip: a.ip(),
        port: a.port(),
    }
}

struct RawAttr(AttrType, Vec<u8>);

impl Setter for RawAttr {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        m.add(self.0, &self.1);
        Ok(())
    }
}

fn decode(bytes: &[u8]) -> Message {
    let mut m = Message::new();
    m.raw = bytes.to_vec();
    m.decode().unwrap();
    m
}

fn code(m: &Message) -> Option<u16> {
    let mut c = ErrorCodeAttribute::default();
    c.get_from(m).ok().map(|_| c.code.0)
}

fn reason(m: &Message) -> Vec<u8> {
    let mut c = ErrorCodeAttribute::default();
    c.get_from(m).unwrap();
    c.reason
}

fn text(m: &Message, attr: AttrType) -> Option<String> {
    TextAttribute::get_from_as(m, attr).ok().map(|t| t.text)
}

fn relayed(m: &Message) -> SocketAddr {
    let mut r = RelayedAddress::default();
    r.get_from(m).unwrap();
    SocketAddr::new(r.ip, r.port)
}

fn signed_by(m: &Message, key: &[u8]) -> bool {
    MessageIntegrity(key.to_vec()).check(&mut m.clone()).is_ok()
}

fn channel_data(number: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = number.to_be_bytes().to_vec();
    v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// `payload` arriving from `from` on relay port `port`, framed for the client.
fn from_peer(h: &mut H, port: u16, from: &str, payload: &[u8]) -> Option<(ClientId, Vec<u8>)> {
    let mut buf = vec![0u8; wire::HEADROOM + payload.len() + wire::TAILROOM];
    buf[wire::HEADROOM..wire::HEADROOM + payload.len()].copy_from_slice(payload);
    let relay = RelayKey {
        family: Family::V4,
        port,
    };
    match h.e.handle_peer_input(
        &mut buf,
        wire::HEADROOM,
        payload.len(),
        relay,
        from.parse().unwrap(),
        h.now,
    ) {
        Forward::ToClient { client, range } => Some((client, buf[range].to_vec())),
        Forward::Nothing => None,
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------- plain STUN and challenges

#[test]
fn a_binding_request_gets_the_mapped_address_without_credentials() {
    let mut h = H::new();
    let m = h.ask(udp(4000), &request(METHOD_BINDING, &[]));
    assert_eq!(m.typ, BINDING_SUCCESS);
    let mut x = XorMappedAddress::default();
    x.get_from(&m).unwrap();
    assert_eq!(SocketAddr::new(x.ip, x.port), udp(4000).src);
    assert!(h.drain().is_empty());
}

#[test]
fn strangers_get_a_small_401_with_realm_and_a_nonce_and_nothing_is_kept() {
    let mut h = H::new();
    let req = request(METHOD_ALLOCATE, &[&transport_udp()]);
    let m = h.ask(udp(4000), &req);
    assert_eq!(code(&m), Some(401));
    assert!(reason(&m).is_empty(), "no reason phrase for strangers");
    assert_eq!(text(&m, ATTR_REALM).as_deref(), Some(REALM));
    assert!(text(&m, ATTR_NONCE).is_some());
    assert!(!m.contains(ATTR_MESSAGE_INTEGRITY));
    assert!(m.raw.len() <= 72, "{} bytes", m.raw.len());
    // A flood of them, from everywhere: nothing is remembered.
    for port in 1..20_000u16 {
        h.input(udp(port), &req);
        h.drain();
    }
    assert_eq!(h.e.allocation_count(), 0);
    assert!(h.e.by_client.is_empty() && h.e.routes.is_empty() && h.e.by_relay.is_empty());
    assert!(h.e.poll_timeout().is_none());
}

#[test]
fn the_rfc_order_of_refusals() {
    let mut h = H::new();
    let client = udp(4000);
    let nonce = h.nonce(client);
    // MESSAGE-INTEGRITY without a nonce: 400.
    let mut m = Message::new();
    m.transaction_id = TransactionId::new();
    m.typ = MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST);
    m.write_header();
    transport_udp().add_to(&mut m).unwrap();
    TextAttribute::new(ATTR_USERNAME, "1:u".into())
        .add_to(&mut m)
        .unwrap();
    MessageIntegrity(vec![0; 16]).add_to(&mut m).unwrap();
    assert_eq!(code(&h.ask(client, &m.raw)), Some(400));
    // A nonce minted for another client: 438 with one for this client.
    let other = h.nonce(udp(4001));
    let cred = Cred::new("alice", T0_UNIX + 600, &other);
    let m = h.ask(client, &cred.sign(METHOD_ALLOCATE, &[&transport_udp()]));
    assert_eq!(code(&m), Some(438));
    assert_eq!(text(&m, ATTR_NONCE).as_deref(), Some(nonce.as_str()));
    // An old nonce: 438.
    h.advance(Duration::from_secs(auth::NONCE_TTL_SECS as u64));
    let m = h.ask(
        client,
        &Cred::new("alice", h.now.unix + 600, &nonce).sign(METHOD_ALLOCATE, &[&transport_udp()]),
    );
    assert_eq!(code(&m), Some(438));
    let nonce = text(&m, ATTR_NONCE).unwrap();
    // A wrong password, a bad username, a wrong realm: 401 (not 400).
    let mut bad = Cred::new("alice", h.now.unix + 600, &nonce);
    bad.password = "wrong".into();
    assert_eq!(
        code(&h.ask(client, &bad.sign(METHOD_ALLOCATE, &[&transport_udp()]))),
        Some(401)
    );
    let mut bad = Cred::new("alice", h.now.unix + 600, &nonce);
    bad.username = "not-the-rest-form".into();
    bad.password = turn_rest::password(SECRET, &bad.username);
    assert_eq!(
        code(&h.ask(client, &bad.sign(METHOD_ALLOCATE, &[&transport_udp()]))),
        Some(401)
    );
    // An expired credential cannot allocate: 401.
    let expired = Cred::new("alice", h.now.unix - 1, &nonce);
    assert_eq!(
        code(&h.ask(client, &expired.sign(METHOD_ALLOCATE, &[&transport_udp()]))),
        Some(401)
    );
    // The previous secret still works (rotation).
    let mut old = Cred::new("alice", h.now.unix + 600, &nonce);
    old.password = turn_rest::password("old-secret", &old.username);
    let m = h.ask(client, &old.sign(METHOD_ALLOCATE, &[&transport_udp()]));
    assert_eq!(m.typ.class, CLASS_SUCCESS_RESPONSE);
    assert!(signed_by(&m, &old.key()));
    assert_eq!(h.e.stats.auth_failures, 3);
}

// ---------------------------------------------------------------- allocations

#[test]
fn an_allocation_is_made_retransmissions_get_the_same_answer_and_others_437() {
    let mut h = H::new();
    let client = udp(4000);
    let nonce = h.nonce(client);
    let cred = Cred::new("alice", T0_UNIX + 3600, &nonce);
    let txid = TransactionId::new();
    let req = cred.sign_txid(METHOD_ALLOCATE, txid, &[&transport_udp()]);
    assert_eq!(h.input(client, &req), Forward::Nothing);
    let bind = h.drain();
    let alloc = match bind.as_slice() {
        [Command::BindRelay {
            alloc,
            family: Family::V4,
            port: PortRequest::Any,
        }] => *alloc,
        other => panic!("{other:?}"),
    };
    h.e.relay_bound(
        alloc,
        Family::V4,
        Ok(Bound {
            port: 50123,
            token: None,
        }),
    );
    let answer = match h.drain().as_slice() {
        [Command::Send { client: c, bytes }] if *c == client => bytes.clone(),
        other => panic!("{other:?}"),
    };
    let m = decode(&answer);
    assert_eq!(
        m.typ,
        MessageType::new(METHOD_ALLOCATE, CLASS_SUCCESS_RESPONSE)
    );
    assert_eq!(m.transaction_id, txid);
    assert_eq!(
        relayed(&m),
        format!("{RELAY_IP}:50123").parse::<SocketAddr>().unwrap()
    );
    let mut mapped = XorMappedAddress::default();
    mapped.get_from(&m).unwrap();
    assert_eq!(SocketAddr::new(mapped.ip, mapped.port), client.src);
    let mut life = Lifetime::default();
    life.get_from(&m).unwrap();
    assert_eq!(life.0, DEFAULT_LIFETIME);
    assert!(signed_by(&m, &cred.key()));
    assert!(m.contains(ATTR_FINGERPRINT), "the request had one");
    // The same request again: the same bytes, no second allocation.
    assert_eq!(h.input(client, &req), Forward::Nothing);
    assert_eq!(
        h.drain(),
        vec![Command::Send {
            client,
            bytes: answer
        }]
    );
    // Another Allocate on the same 5-tuple: 437.
    let m = h.ask(client, &cred.sign(METHOD_ALLOCATE, &[&transport_udp()]));
    assert_eq!(code(&m), Some(437));
    assert_eq!(h.quotas.lock().unwrap().of("alice"), 1);
}

#[test]
fn requested_transport_and_unknown_attributes() {
    let mut h = H::new();
    let client = udp(4000);
    let nonce = h.nonce(client);
    let cred = Cred::new("alice", T0_UNIX + 3600, &nonce);
    assert_eq!(
        code(&h.ask(client, &cred.sign(METHOD_ALLOCATE, &[]))),
        Some(400)
    );
    let tcp_relay = RequestedTransport {
        protocol: turn::proto::PROTO_TCP,
    };
    assert_eq!(
        code(&h.ask(client, &cred.sign(METHOD_ALLOCATE, &[&tcp_relay]))),
        Some(442)
    );
    let df = RawAttr(ATTR_DONT_FRAGMENT, vec![]);
    let m = h.ask(
        client,
        &cred.sign(METHOD_ALLOCATE, &[&transport_udp(), &df]),
    );
    assert_eq!(code(&m), Some(420));
    assert_eq!(m.get(ATTR_UNKNOWN_ATTRIBUTES).unwrap(), vec![0x00, 0x1A]);
    let odd = RawAttr(AttrType(0x7777), vec![1, 2, 3, 4]);
    let m = h.ask(
        client,
        &cred.sign(METHOD_ALLOCATE, &[&transport_udp(), &odd]),
    );
    assert_eq!(code(&m), Some(420));
    // Comprehension-optional unknowns are ignored.
    let optional = RawAttr(AttrType(0x8777), vec![1, 2, 3, 4]);
    let m = h.ask(
        client,
        &cred.sign(METHOD_ALLOCATE, &[&transport_udp(), &optional]),
    );
    assert_eq!(m.typ.class, CLASS_SUCCESS_RESPONSE);
}

#[test]
fn ipv6_relaying_is_440_unless_this_server_has_an_ipv6_relay() {
    let mut h = H::new();
    let client = udp(4000);
    let nonce = h.nonce(client);
    let cred = Cred::new("alice", T0_UNIX + 3600, &nonce);
    let v6 = RawAttr(ATTR_REQUESTED_ADDRESS_FAMILY, vec![0x02, 0, 0, 0]);
    let m = h.ask(
        client,
        &cred.sign(METHOD_ALLOCATE, &[&transport_udp(), &v6]),
    );
    assert_eq!(code(&m), Some(440));
    let bad = RawAttr(ATTR_REQUESTED_ADDRESS_FAMILY, vec![0x07, 0, 0, 0]);
    assert_eq!(
        code(&h.ask(
            client,
            &cred.sign(METHOD_ALLOCATE, &[&transport_udp(), &bad])
        )),
        Some(400)
    );
    // With an IPv6 relay address: an IPv6 relay.
    let mut cfg = config();
    cfg.relay_v6 = Some("2001:db8::7".parse().unwrap());
    let mut h = H::with(cfg, 2, 3);
    let nonce = h.nonce(client);
    let cred = Cred::new("alice", T0_UNIX + 3600, &nonce);
    let m = h.ask(
        client,
        &cred.sign(METHOD_ALLOCATE, &[&transport_udp(), &v6]),
    );
    assert_eq!(m.typ.class, CLASS_SUCCESS_RESPONSE);
    assert_eq!(
        relayed(&m),
        "[2001:db8::7]:50000".parse::<SocketAddr>().unwrap()
    );
    // An IPv4 peer on an IPv6-only allocation: 443.
    let m = h.ask(
        client,
        &cred.sign(METHOD_CREATE_PERMISSION, &[&peer("8.8.8.8:53")]),
    );
    assert_eq!(code(&m), Some(443));
}

#[test]
fn quotas_count_live_allocations_whatever_the_transaction_ids() {
    let mut h = H::new(); // 2 per user, 3 in total
                          // The same transaction id from every source port (the old gate keyed reservations by it):
                          // only the quota decides.
    let txid = TransactionId::new();
    let mut ok = 0;
    let mut codes = Vec::new();
    for port in 4000..4010u16 {
        let client = udp(port);
        let nonce = h.nonce(client);
        let cred = Cred::new("mallory", T0_UNIX + 3600, &nonce);
        let m = h.ask(
            client,
            &cred.sign_txid(METHOD_ALLOCATE, txid, &[&transport_udp()]),
        );
        if m.typ.class == CLASS_SUCCESS_RESPONSE {
            ok += 1;
        } else {
            codes.push(code(&m));
        }
    }
    assert_eq!(ok, 2);
    assert!(codes.iter().all(|c| *c == Some(486)), "{codes:?}");
    assert_eq!(h.e.allocation_count(), 2);
    // The total quota: a third user gets one, a fourth none (508).
    h.allocate(udp(5000), "bob");
    let client = udp(5001);
    let nonce = h.nonce(client);
    let m = h.ask(
        client,
        &Cred::new("carol", T0_UNIX + 3600, &nonce).sign(METHOD_ALLOCATE, &[&transport_udp()]),
    );
    assert_eq!(code(&m), Some(508));
    assert_eq!(h.quotas.lock().unwrap().total(), 3);
}

#[test]
fn a_polyglot_datagram_is_channel_data_and_cannot_allocate() {
    let mut h = H::new();
    // 0x4003 + length + magic cookie: a ChannelData header to us, whatever follows.
    let mut polyglot = request(METHOD_ALLOCATE, &[&transport_udp()]);
    polyglot[0] = 0x40;
    polyglot[1] = 0x03;
    let len = (polyglot.len() - 4) as u16;
    polyglot[2..4].copy_from_slice(&len.to_be_bytes());
    assert_eq!(h.input(udp(4000), &polyglot), Forward::Nothing);
    assert!(h.drain().is_empty(), "no answer, no allocation");
    assert_eq!(h.e.stats.dropped_no_route, 1);
    assert_eq!(h.e.allocation_count(), 0);
}

#[test]
fn refresh_of_a_missing_allocation_is_437_and_lifetime_zero_deletes() {
    let mut h = H::new();
    let client = udp(4000);
    let nonce = h.nonce(client);
    let cred = Cred::new("alice", T0_UNIX + 3600, &nonce);
    let m = h.ask(client, &cred.sign(METHOD_REFRESH, &[]));
    assert_eq!(code(&m), Some(437));
    assert!(signed_by(&m, &cred.key()));
    let relay = h.allocate(client, "alice");
    let m = h.ask(
        client,
        &cred.sign(METHOD_REFRESH, &[&Lifetime(Duration::from_secs(7200))]),
    );
    let mut life = Lifetime::default();
    life.get_from(&m).unwrap();
    assert_eq!(life.0, MAX_LIFETIME, "capped at the maximum");
    let m = h.ask(
        client,
        &cred.sign(METHOD_REFRESH, &[&Lifetime(Duration::from_secs(30))]),
    );
    life.get_from(&m).unwrap();
    assert_eq!(life.0, DEFAULT_LIFETIME, "at least the default");
    // Lifetime 0 deletes: the relay is released with the quota.
    assert_eq!(
        h.input(
            client,
            &cred.sign(METHOD_REFRESH, &[&Lifetime(Duration::ZERO)])
        ),
        Forward::Nothing
    );
    let cmds = h.drain();
    assert_eq!(cmds.len(), 2, "{cmds:?}");
    assert!(matches!(&cmds[0], Command::Send { .. }), "the answer first");
    assert_eq!(
        cmds[1],
        Command::CloseRelay {
            relay: RelayKey {
                family: Family::V4,
                port: relay.port()
            }
        }
    );
    assert_eq!(h.quotas.lock().unwrap().total(), 0);
    assert_eq!(h.e.allocation_count(), 0);
}

#[test]
fn another_users_credential_on_an_allocation_is_441() {
    let mut h = H::new();
    let client = udp(4000);
    h.allocate(client, "alice");
    let nonce = h.nonce(udp(4000));
    let eve = Cred::new("eve", T0_UNIX + 3600, &nonce);
    for (method, attrs) in [
        (METHOD_REFRESH, vec![]),
        (METHOD_CREATE_PERMISSION, vec![peer("8.8.8.8:53")]),
    ] {
        let refs: Vec<&dyn Setter> = attrs.iter().map(|a| a as &dyn Setter).collect();
        let m = h.ask(client, &eve.sign(method, &refs));
        assert_eq!(code(&m), Some(441), "{method:?}");
    }
    let cn = ChannelNumber(0x4000);
    let m = h.ask(
        client,
        &eve.sign(METHOD_CHANNEL_BIND, &[&cn, &peer("8.8.8.8:53")]),
    );
    assert_eq!(code(&m), Some(441));
    assert_eq!(h.e.stats.wrong_credentials, 3);
}

#[test]
fn an_allocation_outlives_its_credential_only_within_the_maximum_lifetime() {
    let mut cfg = config();
    cfg.max_allocation_lifetime = Duration::from_secs(1800);
    let mut h = H::with(cfg, 2, 3);
    let client = udp(4000);
    let nonce = h.nonce(client);
    let cred = Cred::new("alice", T0_UNIX + 60, &nonce);
    let m = h.ask(client, &cred.sign(METHOD_ALLOCATE, &[&transport_udp()]));
    assert_eq!(m.typ.class, CLASS_SUCCESS_RESPONSE);
    h.advance(Duration::from_secs(500));
    // Expired credential, live allocation, younger than 30 min: carries on.
    let m = h.ask(client, &cred.sign(METHOD_REFRESH, &[]));
    assert_eq!(m.typ.class, CLASS_SUCCESS_RESPONSE);
    let m = h.ask(
        client,
        &cred.sign(METHOD_CREATE_PERMISSION, &[&peer("8.8.8.8:53")]),
    );
    assert_eq!(m.typ.class, CLASS_SUCCESS_RESPONSE);
    h.advance(Duration::from_secs(500));
    let m = h.ask(client, &cred.sign(METHOD_REFRESH, &[]));
    assert_eq!(m.typ.class, CLASS_SUCCESS_RESPONSE);
    h.advance(Duration::from_secs(500));
    let m = h.ask(client, &cred.sign(METHOD_REFRESH, &[]));
    assert_eq!(m.typ.class, CLASS_SUCCESS_RESPONSE, "25 min old");
    h.advance(Duration::from_secs(400));
    let m = h.ask(client, &cred.sign(METHOD_REFRESH, &[]));
    assert_eq!(code(&m), Some(401), "past the maximum lifetime");
}

#[test]
fn allocations_expire_and_release_their_relay() {
    let mut h = H::new();
    let relay = h.allocate(udp(4000), "alice");
    assert!(h.e.poll_timeout().is_some());
    h.advance(DEFAULT_LIFETIME - Duration::from_secs(1));
    assert!(h.drain().is_empty());
    h.advance(Duration::from_secs(1));
    assert_eq!(
        h.drain(),
        vec![Command::CloseRelay {
            relay: RelayKey {
                family: Family::V4,
                port: relay.port()
            }
        }]
    );
    assert_eq!(h.e.allocation_count(), 0);
    assert_eq!(h.quotas.lock().unwrap().total(), 0);
    assert!(h.e.poll_timeout().is_none());
}

#[test]
fn even_ports_and_reservations() {
    let mut h = H::new();
    let client = udp(4000);
    let nonce = h.nonce(client);
    let cred = Cred::new("alice", T0_UNIX + 3600, &nonce);
    let even_r = RawAttr(ATTR_EVEN_PORT, vec![0x80]);
    assert_eq!(
        h.input(
            client,
            &cred.sign(METHOD_ALLOCATE, &[&transport_udp(), &even_r])
        ),
        Forward::Nothing
    );
    let cmds = h.drain();
    let alloc = match cmds.as_slice() {
        [Command::BindRelay {
            alloc,
            port: PortRequest::Even { reserve_next: true },
            ..
        }] => *alloc,
        other => panic!("{other:?}"),
    };
    h.e.relay_bound(
        alloc,
        Family::V4,
        Ok(Bound {
            port: 50000,
            token: Some([9; 8]),
        }),
    );
    let m = match h.drain().pop().unwrap() {
        Command::Send { bytes, .. } => decode(&bytes),
        other => panic!("{other:?}"),
    };
    assert_eq!(m.get(ATTR_RESERVATION_TOKEN).unwrap(), vec![9; 8]);
    // The token takes the reserved port, from another 5-tuple.
    let other = udp(4001);
    let nonce = h.nonce(other);
    let cred = Cred::new("alice", T0_UNIX + 3600, &nonce);
    let token = RawAttr(ATTR_RESERVATION_TOKEN, vec![9; 8]);
    let m = h.ask(
        other,
        &cred.sign(METHOD_ALLOCATE, &[&transport_udp(), &token]),
    );
    assert_eq!(relayed(&m).port(), 50001);
    // A token with EVEN-PORT is 400; an unknown token finds no port: 508.
    let third = udp(4002);
    let nonce = h.nonce(third);
    let cred = Cred::new("bob", T0_UNIX + 3600, &nonce);
    let m = h.ask(
        third,
        &cred.sign(METHOD_ALLOCATE, &[&transport_udp(), &token, &even_r]),
    );
    assert_eq!(code(&m), Some(400));
    let wrong = RawAttr(ATTR_RESERVATION_TOKEN, vec![1; 8]);
    let m = h.ask(
        third,
        &cred.sign(METHOD_ALLOCATE, &[&transport_udp(), &wrong]),
    );
    assert_eq!(code(&m), Some(508));
    assert_eq!(
        h.quotas.lock().unwrap().of("bob"),
        0,
        "the failed one is not counted"
    );
}

// ---------------------------------------------------------------- permissions and channels

#[test]
fn permissions_to_denied_peers_are_403_and_own_relays_only_on_relay_ports() {
    let mut h = H::new();
    let client = udp(4000);
    h.allocate(client, "alice");
    let nonce = h.nonce(client);
    let cred = Cred::new("alice", T0_UNIX + 3600, &nonce);
    for denied in [
        "127.0.0.1:22",
        "169.254.169.254:80",
        "10.0.0.1:80",
        "[::ffff:127.0.0.1]:22",
        "203.0.113.7:22",
    ] {
        let m = h.ask(
            client,
            &cred.sign(METHOD_CREATE_PERMISSION, &[&peer(denied)]),
        );
        assert_eq!(code(&m), Some(403), "{denied}");
    }
    let m = h.ask(
        client,
        &cred.sign(METHOD_CREATE_PERMISSION, &[&peer("203.0.113.7:50002")]),
    );
    assert_eq!(
        m.typ.class, CLASS_SUCCESS_RESPONSE,
        "another allocation here"
    );
    // No peer at all: 400.
    let m = h.ask(client, &cred.sign(METHOD_CREATE_PERMISSION, &[]));
    assert_eq!(code(&m), Some(400));
}

#[test]
fn channel_numbers_below_0x4000_are_400_and_bindings_are_one_to_one() {
    let mut h = H::new();
    let client = udp(4000);
    h.allocate(client, "alice");
    let nonce = h.nonce(client);
    let cred = Cred::new("alice", T0_UNIX + 3600, &nonce);
    for n in [0x3FFF, 0x8000, 0xFFFF, 0] {
        let m = h.ask(
            client,
            &cred.sign(
                METHOD_CHANNEL_BIND,
                &[&ChannelNumber(n), &peer("8.8.8.8:53")],
            ),
        );
        assert_eq!(code(&m), Some(400), "{n:#x}");
    }
    let bind = |h: &mut H, n: u16, p: &str| {
        code(&h.ask(
            client,
            &cred.sign(METHOD_CHANNEL_BIND, &[&ChannelNumber(n), &peer(p)]),
        ))
    };
    assert_eq!(bind(&mut h, 0x4000, "8.8.8.8:53"), None);
    assert_eq!(bind(&mut h, 0x4FFF, "8.8.4.4:53"), None);
    assert_eq!(bind(&mut h, 0x7FFF, "8.8.4.5:53"), None, "RFC 5766's range");
    assert_eq!(bind(&mut h, 0x4000, "8.8.8.8:53"), None, "a refresh");
    assert_eq!(
        bind(&mut h, 0x4000, "1.1.1.1:53"),
        Some(400),
        "number taken"
    );
    assert_eq!(bind(&mut h, 0x4001, "8.8.8.8:53"), Some(400), "peer taken");
    assert_eq!(bind(&mut h, 0x4002, "127.0.0.1:53"), Some(403));
    // Without a peer: 400.
    let m = h.ask(
        client,
        &cred.sign(METHOD_CHANNEL_BIND, &[&ChannelNumber(0x4003)]),
    );
    assert_eq!(code(&m), Some(400));
}

#[test]
fn channel_data_goes_both_ways_without_copies_and_stops_when_permissions_lapse() {
    let mut h = H::new();
    let client = udp(4000);
    let relay = h.allocate(client, "alice");
    let nonce = h.nonce(client);
    let cred = Cred::new("alice", T0_UNIX + 3600, &nonce);
    let m = h.ask(
        client,
        &cred.sign(
            METHOD_CHANNEL_BIND,
            &[&ChannelNumber(0x4001), &peer("8.8.8.8:5000")],
        ),
    );
    assert_eq!(m.typ.class, CLASS_SUCCESS_RESPONSE);
    // Client to peer: the payload's range in the input, sent from the relay.
    let frame = channel_data(0x4001, b"ping");
    assert_eq!(
        h.input(client, &frame),
        Forward::ToPeer {
            relay: RelayKey {
                family: Family::V4,
                port: relay.port()
            },
            peer: "8.8.8.8:5000".parse().unwrap(),
            range: 4..8,
        }
    );
    // Peer to client: ChannelData framed in the head-room.
    let (to, bytes) = from_peer(&mut h, relay.port(), "8.8.8.8:5000", b"pong").unwrap();
    assert_eq!(to, client);
    assert_eq!(bytes, channel_data(0x4001, b"pong"));
    // Another port of the peer's IP has the permission but no channel: a Data indication.
    let (_, bytes) = from_peer(&mut h, relay.port(), "8.8.8.8:6000", b"hey").unwrap();
    let m = decode(&bytes);
    assert_eq!(m.typ, MessageType::new(METHOD_DATA, CLASS_INDICATION));
    let mut data = Data::default();
    data.get_from(&m).unwrap();
    assert_eq!(data.0, b"hey");
    // Peers without a permission are dropped.
    assert!(from_peer(&mut h, relay.port(), "9.9.9.9:5000", b"x").is_none());
    assert!(h.drain().is_empty(), "the data path queues nothing");
    // The permission lapses after 300 s even though the channel lasts 600 s.
    h.advance(PERMISSION_LIFETIME);
    assert_eq!(h.input(client, &frame), Forward::Nothing);
    assert!(from_peer(&mut h, relay.port(), "8.8.8.8:5000", b"late").is_none());
    // A CreatePermission brings the channel back.
    let nonce = h.nonce(client);
    let cred = Cred::new("alice", T0_UNIX + 3600, &nonce);
    h.ask(
        client,
        &cred.sign(METHOD_CREATE_PERMISSION, &[&peer("8.8.8.8:1")]),
    );
    assert!(matches!(h.input(client, &frame), Forward::ToPeer { .. }));
    // A channel number nobody bound: dropped.
    assert_eq!(
        h.input(client, &channel_data(0x4002, b"x")),
        Forward::Nothing
    );
}

#[test]
fn send_and_data_indications() {
    let mut h = H::new();
    let client = udp(4000);
    let relay = h.allocate(client, "alice");
    let nonce = h.nonce(client);
    let cred = Cred::new("alice", T0_UNIX + 3600, &nonce);
    let send = |to: &str| {
        let mut m = Message::new();
        m.build(&[
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(METHOD_SEND, CLASS_INDICATION)),
            Box::new(peer(to)),
            Box::new(Data(b"abc".to_vec())),
        ])
        .unwrap();
        m.raw
    };
    assert_eq!(
        h.input(client, &send("8.8.8.8:53")),
        Forward::Nothing,
        "no permission yet"
    );
    h.ask(
        client,
        &cred.sign(METHOD_CREATE_PERMISSION, &[&peer("8.8.8.8:1")]),
    );
    let bytes = send("8.8.8.8:53");
    match h.input(client, &bytes) {
        Forward::ToPeer {
            relay: r,
            peer,
            range,
        } => {
            assert_eq!(r.port, relay.port());
            assert_eq!(peer, "8.8.8.8:53".parse::<SocketAddr>().unwrap());
            assert_eq!(&bytes[range], b"abc");
        }
        other => panic!("{other:?}"),
    }
    // A permission for one of our own addresses covers relay ports only.
    h.ask(
        client,
        &cred.sign(METHOD_CREATE_PERMISSION, &[&peer("203.0.113.7:50002")]),
    );
    assert!(matches!(
        h.input(client, &send("203.0.113.7:50010")),
        Forward::ToPeer { .. }
    ));
    assert_eq!(h.input(client, &send("203.0.113.7:22")), Forward::Nothing);
    assert!(h.drain().is_empty());
}

#[test]
fn stream_clients_get_padded_channel_data_and_lose_their_allocation_with_the_stream() {
    let mut h = H::new();
    let client = tcp(4000, 7);
    let relay = h.allocate(client, "alice");
    let nonce = h.nonce(client);
    let cred = Cred::new("alice", T0_UNIX + 3600, &nonce);
    h.ask(
        client,
        &cred.sign(
            METHOD_CHANNEL_BIND,
            &[&ChannelNumber(0x4000), &peer("8.8.8.8:5000")],
        ),
    );
    let (_, bytes) = from_peer(&mut h, relay.port(), "8.8.8.8:5000", b"12345").unwrap();
    assert_eq!(bytes, b"\x40\x00\x00\x0512345\0\0\0");
    // The same addresses on another stream are another client.
    assert_eq!(
        h.input(tcp(4000, 8), &channel_data(0x4000, b"x")),
        Forward::Nothing
    );
    h.e.stream_closed(client);
    assert_eq!(
        h.drain(),
        vec![
            Command::CloseRelay {
                relay: RelayKey {
                    family: Family::V4,
                    port: relay.port()
                }
            },
            Command::CloseStream { client }
        ]
    );
    assert_eq!(h.quotas.lock().unwrap().total(), 0);
    // A Refresh that deletes an allocation over TCP: the answer goes out before the stream
    // is let go of.
    let client = tcp(4001, 9);
    let relay = h.allocate(client, "alice");
    let nonce = h.nonce(client);
    let cred = Cred::new("alice", T0_UNIX + 3600, &nonce);
    h.input(
        client,
        &cred.sign(METHOD_REFRESH, &[&Lifetime(Duration::ZERO)]),
    );
    let cmds = h.drain();
    assert!(
        matches!(&cmds[0], Command::Send { client: c, .. } if *c == client),
        "{cmds:?}"
    );
    assert_eq!(
        &cmds[1..],
        &[
            Command::CloseRelay {
                relay: RelayKey {
                    family: Family::V4,
                    port: relay.port()
                }
            },
            Command::CloseStream { client }
        ]
    );
}

#[test]
fn bandwidth_caps_drop_the_excess_and_count_it() {
    let mut cfg = config();
    cfg.max_bps_per_allocation = 8_000_000; // 1 MB/s each way
    let mut h = H::with(cfg, 2, 3);
    let client = udp(4000);
    h.allocate(client, "alice");
    let nonce = h.nonce(client);
    let cred = Cred::new("alice", T0_UNIX + 3600, &nonce);
    h.ask(
        client,
        &cred.sign(
            METHOD_CHANNEL_BIND,
            &[&ChannelNumber(0x4000), &peer("8.8.8.8:5000")],
        ),
    );
    let frame = channel_data(0x4000, &[0; 60_000]);
    let sent = (0..20)
        .filter(|_| matches!(h.input(client, &frame), Forward::ToPeer { .. }))
        .count();
    assert_eq!(sent, 16, "one second's worth: 16 x 60 kB");
    assert_eq!(h.e.stats.dropped_over_bandwidth, 4);
    h.now.mono += Duration::from_secs(1);
    assert!(matches!(h.input(client, &frame), Forward::ToPeer { .. }));
}

#[test]
fn tables_a_client_can_grow_are_capped() {
    let mut h = H::new(); // 8 permissions, 8 channels
    let client = udp(4000);
    h.allocate(client, "alice");
    let nonce = h.nonce(client);
    let cred = Cred::new("alice", T0_UNIX + 3600, &nonce);
    let mut codes = Vec::new();
    for i in 1..=12u8 {
        let p = format!("8.8.{i}.1:53");
        codes.push(code(
            &h.ask(client, &cred.sign(METHOD_CREATE_PERMISSION, &[&peer(&p)])),
        ));
    }
    assert_eq!(codes.iter().filter(|c| c.is_none()).count(), 8);
    assert!(codes[8..].iter().all(|c| *c == Some(508)));
    // An authenticated flood of refreshes keeps the engine's size.
    for _ in 0..5000 {
        h.input(client, &cred.sign(METHOD_REFRESH, &[]));
        h.drain();
    }
    assert_eq!(h.e.allocation_count(), 1);
    assert_eq!(h.e.by_client.len(), 1);
    let _: IpAddr = "8.8.8.8".parse().unwrap();
}

#[test]
fn a_new_filter_removes_permissions_it_denies() {
    let mut h = H::new();
    let client = udp(4000);
    let relay = h.allocate(client, "alice");
    let nonce = h.nonce(client);
    let cred = Cred::new("alice", T0_UNIX + 3600, &nonce);
    h.ask(
        client,
        &cred.sign(
            METHOD_CHANNEL_BIND,
            &[&ChannelNumber(0x4000), &peer("8.8.8.8:5000")],
        ),
    );
    let deny = [ipnet::IpNet::from("8.8.8.8".parse::<IpAddr>().unwrap())];
    h.e.set_filter(PeerFilter::new(
        &[],
        &deny,
        vec![RELAY_IP.parse().unwrap()],
        49152..=65535,
    ));
    assert_eq!(
        h.input(client, &channel_data(0x4000, b"x")),
        Forward::Nothing
    );
    assert!(from_peer(&mut h, relay.port(), "8.8.8.8:5000", b"x").is_none());
}

//! TURN load client for `scripts/bench/turn.sh`: speaks STUN/TURN over plain UDP sockets (the
//! `stun` crate builds and parses the messages), one OS thread per worker, so it is not the
//! bottleneck the way `turnutils_uclient` (one-second timer, one process) is. It drives coturn
//! and Switchboard the same way and prints one `RESULT key=value ...` line per workload.
//!
//!   turn-load allocs --server ADDR --secret S --count N [--concurrency C] [--hold SECS]
//!       N allocations with REST credentials, C at a time; prints the rate, then `READY`, holds
//!       them (the script reads the server's RSS), then deletes them (Refresh, lifetime 0).
//!   turn-load flood  --server ADDR --requests N [--sockets K] [--threads T]
//!       N unauthenticated Allocate requests from K source ports, each waiting for its answer
//!       (401) or a 200 ms timeout; prints how many were answered.
//!   turn-load relay  --server ADDR --secret S --pairs P --rate PPS --seconds D [--size B]
//!       P pairs of allocations relaying ChannelData client to client (A -> A's relay -> B's
//!       relay -> B) at PPS packets/s in all, paced; prints offered and delivered rates, loss
//!       and one-way latency percentiles.
//!
//! Every workload takes `--bind IP`, the clients' source address (default: the server's). On
//! loopback, a distinct one (127.0.0.2) keeps the clients' ports apart from those of other
//! clients on the same machine: `turnutils_uclient` leaves its allocations behind, and a new
//! socket that gets such a port back from the kernel would be refused with 437.

#![allow(clippy::disallowed_methods)] // a load generator reads the clock all the time

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use stun::agent::TransactionId;
use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::error_code::{ErrorCodeAttribute, CODE_STALE_NONCE};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{
    Getter, Message, MessageType, Method, Setter, CLASS_ERROR_RESPONSE, CLASS_REQUEST,
    METHOD_ALLOCATE, METHOD_CHANNEL_BIND, METHOD_CREATE_PERMISSION, METHOD_REFRESH,
};
use stun::textattrs::TextAttribute;
use switchboard::auth::turn_rest;
use turn::proto::channum::ChannelNumber;
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::reqtrans::RequestedTransport;
use turn::proto::PROTO_UDP;

/// RFC 8489 §6.2.1: the first retransmission after 500 ms; a loaded loopback needs no less.
const RTO: Duration = Duration::from_millis(500);
const RETRIES: usize = 4;
/// First channel number (RFC 8656 §12: 0x4000 through 0x4FFF).
const CHANNEL: u16 = 0x4000;

struct Args(HashMap<String, String>);

impl Args {
    fn parse() -> (String, Args) {
        let mut argv = std::env::args().skip(1);
        let cmd = argv.next().unwrap_or_default();
        let rest: Vec<String> = argv.collect();
        let map = rest
            .chunks(2)
            .filter_map(|p| match p {
                [k, v] => Some((k.trim_start_matches("--").to_owned(), v.clone())),
                _ => None,
            })
            .collect();
        (cmd, Args(map))
    }
    fn str(&self, k: &str) -> &str {
        self.0
            .get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("--{k} is required"))
    }
    fn num(&self, k: &str, default: u64) -> u64 {
        self.0
            .get(k)
            .map(|v| v.parse().expect("a number"))
            .unwrap_or(default)
    }
}

/// A request of `method` with a new transaction id and `attrs` in order.
fn request_msg(method: Method, attrs: &[&dyn Setter]) -> Message {
    let mut m = Message::new();
    m.transaction_id = TransactionId::new();
    m.typ = MessageType::new(method, CLASS_REQUEST);
    m.write_header();
    for a in attrs {
        a.add_to(&mut m).expect("well-formed attributes");
    }
    m
}

const UDP: RequestedTransport = RequestedTransport {
    protocol: PROTO_UDP,
};

fn decode(bytes: &[u8]) -> Option<Message> {
    let mut m = Message::new();
    m.raw = bytes.to_vec();
    m.decode().ok().map(|_| m)
}

/// Sends `req` and waits for the response with its transaction id, retransmitting on timeout.
fn transact(sock: &UdpSocket, server: SocketAddr, req: &Message) -> io::Result<Message> {
    let mut buf = [0u8; 1500];
    sock.set_read_timeout(Some(RTO))?;
    for _ in 0..RETRIES {
        sock.send_to(&req.raw, server)?;
        let deadline = Instant::now() + RTO;
        while Instant::now() < deadline {
            match sock.recv_from(&mut buf) {
                Ok((n, _)) => {
                    if let Some(m) = decode(&buf[..n]) {
                        if m.transaction_id == req.transaction_id {
                            return Ok(m);
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => return Err(e),
            }
        }
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, "no answer"))
}

fn error_code(m: &Message) -> Option<u16> {
    let mut code = ErrorCodeAttribute::default();
    (m.typ.class == CLASS_ERROR_RESPONSE && code.get_from(m).is_ok()).then_some(code.code.0)
}

fn fail(what: &str, m: &Message) -> io::Error {
    io::Error::other(format!("{what}: {} (error {:?})", m.typ, error_code(m)))
}

/// One allocation held by one client socket.
struct Allocation {
    sock: UdpSocket,
    server: SocketAddr,
    username: String,
    realm: String,
    nonce: String,
    integrity: MessageIntegrity,
    relayed: SocketAddr,
}

impl Allocation {
    /// An allocation from a fresh socket. A socket whose port an earlier allocation still holds
    /// (one whose release was lost while a server was overloaded) gets 437: it is kept bound,
    /// so the kernel hands out another port, and the next one is tried.
    fn open(server: SocketAddr, bind: IpAddr, secret: &str, user: &str) -> io::Result<Allocation> {
        let mut taken = Vec::new();
        loop {
            let sock = UdpSocket::bind(SocketAddr::new(bind, 0))?;
            match Self::open_on(sock.try_clone()?, server, secret, user) {
                Err(e) if e.to_string().contains("437") && taken.len() < 8 => taken.push(sock),
                other => return other,
            }
        }
    }

    fn open_on(
        sock: UdpSocket,
        server: SocketAddr,
        secret: &str,
        user: &str,
    ) -> io::Result<Allocation> {
        let first = request_msg(METHOD_ALLOCATE, &[&UDP, &FINGERPRINT]);
        let challenge = transact(&sock, server, &first)?;
        let text = |attr| {
            let mut t = TextAttribute::new(attr, String::new());
            t.get_from(&challenge).map(|_| t.text)
        };
        let (Ok(nonce), Ok(realm)) = (text(ATTR_NONCE), text(ATTR_REALM)) else {
            return Err(fail("no challenge", &challenge));
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs() as i64;
        let cred = turn_rest::mint(secret, user, now, 3600);
        let integrity = MessageIntegrity::new_long_term_integrity(
            cred.username.clone(),
            realm.clone(),
            cred.password,
        );
        let mut a = Allocation {
            sock,
            server,
            username: cred.username,
            realm,
            nonce,
            integrity,
            relayed: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let res = a.request(METHOD_ALLOCATE, &[&UDP])?;
        let mut relayed = RelayedAddress::default();
        relayed.get_from(&res).map_err(|_| fail("allocate", &res))?;
        a.relayed = SocketAddr::new(relayed.ip, relayed.port);
        Ok(a)
    }

    /// An authenticated request; a 438 (stale nonce) is retried once with the new nonce.
    fn request(&mut self, method: Method, attrs: &[&dyn Setter]) -> io::Result<Message> {
        for _ in 0..2 {
            let username = TextAttribute::new(ATTR_USERNAME, self.username.clone());
            let realm = TextAttribute::new(ATTR_REALM, self.realm.clone());
            let nonce = TextAttribute::new(ATTR_NONCE, self.nonce.clone());
            let mut all: Vec<&dyn Setter> = attrs.to_vec();
            all.extend([
                &username as &dyn Setter,
                &realm,
                &nonce,
                &self.integrity,
                &FINGERPRINT,
            ]);
            let res = transact(&self.sock, self.server, &request_msg(method, &all))?;
            if error_code(&res) == Some(CODE_STALE_NONCE.0) {
                let mut n = TextAttribute::new(ATTR_NONCE, String::new());
                n.get_from(&res)
                    .map_err(|_| fail("438 without nonce", &res))?;
                self.nonce = n.text;
                continue;
            }
            if res.typ.class == CLASS_ERROR_RESPONSE {
                return Err(fail("request", &res));
            }
            return Ok(res);
        }
        Err(io::Error::other("stale nonce twice"))
    }

    /// Permission and channel `number` towards `peer`.
    fn bind_channel(&mut self, peer: SocketAddr, number: u16) -> io::Result<()> {
        let peer = PeerAddress {
            ip: peer.ip(),
            port: peer.port(),
        };
        self.request(METHOD_CREATE_PERMISSION, &[&peer])?;
        self.request(METHOD_CHANNEL_BIND, &[&ChannelNumber(number), &peer])?;
        Ok(())
    }

    /// Deletes the allocation (RFC 8656 §7: Refresh with LIFETIME 0).
    fn release(mut self) {
        let _ = self.request(METHOD_REFRESH, &[&Lifetime(Duration::ZERO)]);
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64
}

/// Runs `count` jobs on `threads` threads; returns the results in no particular order.
fn parallel<T: Send + 'static>(
    count: usize,
    threads: usize,
    job: impl Fn(usize) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let next = Arc::new(AtomicU64::new(0));
    let job = Arc::new(job);
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let (next, job) = (next.clone(), job.clone());
            std::thread::spawn(move || {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= count {
                        return out;
                    }
                    out.push(job(i));
                }
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().expect("worker thread"))
        .collect()
}

fn allocs(args: &Args, server: SocketAddr, bind: IpAddr) {
    let count = args.num("count", 1000) as usize;
    let concurrency = args.num("concurrency", 32) as usize;
    let secret = args.str("secret").to_owned();
    // A fresh user per run: quotas are per user and earlier runs may still hold allocations.
    let user = format!("load-{}", std::process::id());
    let started = Instant::now();
    let results = parallel(count, concurrency, move |_| {
        Allocation::open(server, bind, &secret, &user)
    });
    let secs = started.elapsed().as_secs_f64();
    let mut held = Vec::new();
    let mut first_error = None;
    for r in results {
        match r {
            Ok(a) => held.push(a),
            Err(e) => first_error = first_error.or(Some(e.to_string())),
        }
    }
    println!(
        "RESULT workload=allocs ok={} failed={} seconds={secs:.3} allocs_per_s={:.0}",
        held.len(),
        count - held.len(),
        held.len() as f64 / secs
    );
    if let Some(e) = first_error {
        eprintln!("first failure: {e}");
    }
    println!("READY");
    std::thread::sleep(Duration::from_secs(args.num("hold", 3)));
    let held = Arc::new(Mutex::new(held));
    parallel(concurrency, concurrency, move |_| loop {
        let Some(a) = held.lock().expect("lock").pop() else {
            return;
        };
        a.release();
    });
}

fn flood(args: &Args, server: SocketAddr, bind: IpAddr) {
    let requests = args.num("requests", 100_000);
    let sockets = args.num("sockets", 1000) as usize;
    let threads = args.num("threads", 16) as usize;
    let answered = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let per_thread_sockets = sockets.div_ceil(threads);
    {
        let (answered, sent) = (answered.clone(), sent.clone());
        parallel(threads, threads, move |_| {
            let socks: Vec<UdpSocket> = (0..per_thread_sockets)
                .map(|_| {
                    let s = UdpSocket::bind(SocketAddr::new(bind, 0)).expect("bind");
                    s.set_read_timeout(Some(Duration::from_millis(200)))
                        .expect("timeout");
                    s
                })
                .collect();
            let mut buf = [0u8; 1500];
            for i in 0.. {
                if sent.fetch_add(1, Ordering::Relaxed) >= requests {
                    break;
                }
                let sock = &socks[i % socks.len()];
                let req = request_msg(METHOD_ALLOCATE, &[&UDP, &FINGERPRINT]);
                if sock.send_to(&req.raw, server).is_err() {
                    continue;
                }
                // Wait for this request's answer; a late answer to an earlier one is skipped.
                while let Ok((n, _)) = sock.recv_from(&mut buf) {
                    if decode(&buf[..n]).is_some_and(|m| m.transaction_id == req.transaction_id) {
                        answered.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        });
    }
    let secs = started.elapsed().as_secs_f64();
    let answered = answered.load(Ordering::Relaxed);
    println!(
        "RESULT workload=flood requests={requests} sockets={sockets} answered={answered} seconds={secs:.2} per_s={:.0}",
        requests as f64 / secs
    );
}

/// ChannelData frame (RFC 8656 §12.4): channel, length, payload: a sequence number and the
/// send instant (µs since `base`), then padding to `size`.
fn channel_data(buf: &mut [u8], size: usize, seq: u64, sent_us: u64) -> usize {
    buf[0..2].copy_from_slice(&CHANNEL.to_be_bytes());
    buf[2..4].copy_from_slice(&(size as u16).to_be_bytes());
    buf[4..12].copy_from_slice(&seq.to_be_bytes());
    buf[12..20].copy_from_slice(&sent_us.to_be_bytes());
    4 + size
}

fn relay(args: &Args, server: SocketAddr, bind: IpAddr) {
    let pairs = args.num("pairs", 4) as usize;
    let rate = args.num("rate", 10_000) as f64;
    let seconds = args.num("seconds", 3) as f64;
    let size = (args.num("size", 100) as usize).clamp(16, 1400);
    let secret = args.str("secret");
    let user = format!("relay-{}", std::process::id());
    let mut sides = Vec::new();
    for _ in 0..pairs {
        let mut a = Allocation::open(server, bind, secret, &user).expect("allocate A");
        let mut b = Allocation::open(server, bind, secret, &user).expect("allocate B");
        a.bind_channel(b.relayed, CHANNEL).expect("A -> B channel");
        b.bind_channel(a.relayed, CHANNEL).expect("B -> A channel");
        sides.push((a, b));
    }
    let base = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<u32>::new()));
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    let per_pair = rate / pairs as f64;
    let total_per_pair = (per_pair * seconds) as u64;
    for (a, b) in sides.iter() {
        let rx = b.sock.try_clone().expect("clone socket");
        rx.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let (stop, received, latencies) = (stop.clone(), received.clone(), latencies.clone());
        receivers.push(std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            let mut local = Vec::with_capacity(total_per_pair as usize);
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, _)) = rx.recv_from(&mut buf) else {
                    continue;
                };
                if n < 20 || buf[0] & 0xC0 != 0x40 {
                    continue; // not ChannelData
                }
                let sent = u64::from_be_bytes(buf[12..20].try_into().expect("8 bytes"));
                let now = base.elapsed().as_micros() as u64;
                local.push(now.saturating_sub(sent).min(u32::MAX as u64) as u32);
                received.fetch_add(1, Ordering::Relaxed);
            }
            latencies.lock().expect("lock").extend(local);
        }));
        let tx = a.sock.try_clone().expect("clone socket");
        senders.push(std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            let interval = Duration::from_secs_f64(1.0 / per_pair);
            let start = Instant::now();
            let mut sent = 0u64;
            while sent < total_per_pair {
                // Catch up to the schedule in a burst, then sleep to the next slot: pacing
                // that holds the average rate without a busy loop.
                let due = ((start.elapsed().as_secs_f64() * per_pair) as u64).min(total_per_pair);
                while sent < due {
                    let n = channel_data(&mut buf, size, sent, base.elapsed().as_micros() as u64);
                    if tx.send_to(&buf[..n], server).is_ok() {
                        sent += 1;
                    }
                }
                std::thread::sleep(interval.max(Duration::from_micros(200)));
            }
            sent
        }));
    }
    let sent: u64 = senders.into_iter().map(|h| h.join().expect("sender")).sum();
    let send_secs = base.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500)); // drain what is still in flight
    stop.store(true, Ordering::Relaxed);
    for r in receivers {
        r.join().expect("receiver");
    }
    let got = received.load(Ordering::Relaxed);
    let mut l = latencies.lock().expect("lock").clone();
    l.sort_unstable();
    println!(
        "RESULT workload=relay pairs={pairs} size={size} sent={sent} received={got} offered_pps={:.0} delivered_pps={:.0} loss_pct={:.3} p50_us={:.0} p99_us={:.0}",
        sent as f64 / send_secs,
        got as f64 / send_secs,
        100.0 * sent.saturating_sub(got) as f64 / sent.max(1) as f64,
        percentile(&l, 0.5),
        percentile(&l, 0.99)
    );
    for (a, b) in sides {
        a.release();
        b.release();
    }
}

fn main() {
    let (cmd, args) = Args::parse();
    let server: SocketAddr = args.str("server").parse().expect("--server ADDR:PORT");
    let bind: IpAddr = args
        .0
        .get("bind")
        .map_or(server.ip(), |b| b.parse().expect("--bind IP"));
    match cmd.as_str() {
        "allocs" => allocs(&args, server, bind),
        "flood" => flood(&args, server, bind),
        "relay" => relay(&args, server, bind),
        other => {
            eprintln!("unknown workload `{other}` (allocs, flood, relay)");
            std::process::exit(2);
        }
    }
}

//! One worker thread: a `mio` loop over its UDP listening sockets, the relay sockets of its
//! allocations and its inbox, driving its own [`Engine`]. Reads come in batches of up to
//! [`quinn_udp::BATCH_SIZE`] datagrams per system call (`recvmmsg`); a datagram is handled where
//! it lies in the receive buffer (the frame to a client is written into the buffer's head-room).
//!
//! A socket that still has data after a few batches waits its next turn in a ready list, so a
//! busy one cannot starve the others; the inbox is served every turn.

use std::collections::{HashMap, VecDeque};

use crate::turn::engine::FastMap;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};

use super::{
    bind_relay_socket, random_port, Inbox, Reserved, Shared, MAX_RESERVATIONS, RESERVATION_TTL,
};
use crate::turn::engine::wire::{HEADROOM, TAILROOM};
use crate::turn::engine::{
    Bound, ClientId, Command, Engine, Family, Forward, Now, PortRequest, RelayKey, Stats, Transport,
};
use crate::turn::filter::{canonical, PeerFilter};

const WAKER: Token = Token(0);
const LISTENER_BASE: usize = 1;
const RELAY_BASE: usize = 1 << 20;
/// Largest UDP payload, and one receive slot: head-room, payload, tail-room.
const MAX_DATAGRAM: usize = 65_535;
const SLOT: usize = HEADROOM + MAX_DATAGRAM + TAILROOM;
/// Batches read from one socket before the others get a turn.
const BATCHES_PER_TURN: usize = 4;
/// Inbox messages handled per turn.
const INBOX_PER_TURN: usize = 1024;
/// Ports tried before an allocation fails for lack of a free one.
const BIND_ATTEMPTS: usize = 64;
/// Housekeeping (expiries, stream idleness, metrics) runs this often.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// A stream connection without an allocation for this long is closed (RFC 8656 §6.2 lets the
/// server close idle connections; this bounds what a stranger's connections cost).
const STREAM_IDLE: Duration = Duration::from_secs(30);
/// Receive buffer of the listening sockets: bursts from many clients land here.
const LISTENER_RCVBUF: usize = 4 << 20;

/// Everything a worker thread starts with.
pub struct Setup {
    pub index: usize,
    pub poll: Poll,
    pub rx: std::sync::mpsc::Receiver<Inbox>,
    /// This worker's socket of each UDP listening address.
    pub listeners: Vec<std::net::UdpSocket>,
    pub engine: Engine,
    pub filter: PeerFilter,
    pub shared: Arc<Shared>,
}

struct Listener {
    sock: UdpSocket,
    state: UdpSocketState,
    local: SocketAddr,
}

struct Relay {
    key: RelayKey,
    sock: UdpSocket,
    state: UdpSocketState,
}

struct StreamInfo {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    opened: Instant,
}

/// The socket a datagram leaves by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Listener(usize),
    Relay(usize),
}

/// Datagrams of one size from one socket to one destination, waiting to go out in one system
/// call with UDP generic segmentation offload (`UDP_SEGMENT`): a burst of media packets from a
/// peer to its client, or from a client to its peer, costs the kernel one send instead of one
/// per packet. The last datagram of a run may be shorter.
struct Run {
    via: Via,
    dest: SocketAddr,
    src_ip: Option<IpAddr>,
    seg: usize,
    count: usize,
    buf: Vec<u8>,
}

/// Bytes in one GSO send at most (the kernel's limit is 64 KiB).
const GSO_BYTES: usize = 60_000;
/// Largest datagram sent in a run: a segment must fit the path's MTU (1500 with IPv6 and UDP
/// headers), or the kernel refuses the whole send.
const GSO_MAX_SEGMENT: usize = 1400;

/// The worker's sockets, engine and tables: everything but the receive buffers, so a datagram
/// can be handled in its buffer while this is borrowed mutably.
struct Io {
    index: usize,
    poll: Poll,
    shared: Arc<Shared>,
    engine: Engine,
    filter: PeerFilter,
    listeners: Vec<Listener>,
    relays: Vec<Option<Relay>>,
    free: Vec<usize>,
    by_key: FastMap<RelayKey, usize>,
    streams: HashMap<ClientId, StreamInfo>,
    ready: VecDeque<Token>,
    /// What `ready` holds, for O(1) membership.
    in_ready: crate::turn::engine::FastSet<Token>,
    scratch: Vec<u8>,
    run: Option<Run>,
    send_failures: u64,
    handoffs_dropped: u64,
}

#[allow(clippy::disallowed_methods)] // the shell's clock
fn clock() -> Now {
    Now {
        mono: Instant::now(),
        unix: crate::time::now_ms() / 1000,
    }
}

/// Starts the worker thread.
pub fn spawn(setup: Setup) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("turn-worker-{}", setup.index))
        .spawn(move || {
            if let Err(e) = run(setup) {
                tracing::error!(error = %e, "TURN worker failed");
            }
        })
}

fn run(setup: Setup) -> std::io::Result<()> {
    let Setup {
        index,
        poll,
        rx,
        listeners,
        engine,
        filter,
        shared,
    } = setup;
    let mut io = Io {
        index,
        poll,
        shared,
        engine,
        filter,
        listeners: Vec::new(),
        relays: Vec::new(),
        free: Vec::new(),
        by_key: FastMap::default(),
        streams: HashMap::new(),
        ready: VecDeque::new(),
        in_ready: Default::default(),
        scratch: vec![0u8; SLOT],
        run: None,
        send_failures: 0,
        handoffs_dropped: 0,
    };
    for (i, sock) in listeners.into_iter().enumerate() {
        let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(LISTENER_RCVBUF);
        let local = sock.local_addr()?;
        let mut sock = UdpSocket::from_std(sock);
        let state = UdpSocketState::new(UdpSockRef::from(&sock))?;
        io.poll
            .registry()
            .register(&mut sock, Token(LISTENER_BASE + i), Interest::READABLE)?;
        io.listeners.push(Listener { sock, state, local });
        io.mark_ready(Token(LISTENER_BASE + i));
    }
    let mut bufs: Vec<Vec<u8>> = (0..quinn_udp::BATCH_SIZE)
        .map(|_| vec![0u8; SLOT])
        .collect();
    let mut metas = vec![RecvMeta::default(); quinn_udp::BATCH_SIZE];
    let mut events = Events::with_capacity(1024);
    let mut next_housekeeping = clock().mono + HOUSEKEEPING;
    let mut reported = Reported::default();
    let handle = &io.shared.clone().workers[index];
    loop {
        let now = clock();
        // Sleep only when nothing is pending: the ready list is empty, and the inbox was
        // empty after we said we would sleep (a sender that comes later sees the flag).
        let mut timeout = next_housekeeping.saturating_duration_since(now.mono);
        if let Some(t) = io.engine.poll_timeout() {
            timeout = timeout.min(t.saturating_duration_since(now.mono));
        }
        if !io.ready.is_empty() {
            timeout = Duration::ZERO;
        }
        handle
            .sleeping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut inbox: Vec<Inbox> = Vec::new();
        while inbox.len() < INBOX_PER_TURN {
            match rx.try_recv() {
                Ok(m) => inbox.push(m),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return Ok(()),
            }
        }
        if !inbox.is_empty() {
            timeout = Duration::ZERO;
        }
        if let Err(e) = io.poll.poll(&mut events, Some(timeout)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        handle
            .sleeping
            .store(false, std::sync::atomic::Ordering::SeqCst);
        for ev in events.iter() {
            if ev.token() != WAKER {
                io.mark_ready(ev.token());
            }
        }
        let now = clock();
        for msg in inbox {
            if msg.is_data() {
                handle
                    .queued
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            if !io.inbox(msg, now) {
                return Ok(());
            }
        }
        // One turn of every ready socket.
        for _ in 0..io.ready.len() {
            let Some(token) = io.ready.pop_front() else {
                break;
            };
            if io.drain(token, &mut bufs, &mut metas, now) {
                io.ready.push_back(token);
            } else {
                io.in_ready.remove(&token);
            }
        }
        if now.mono >= next_housekeeping {
            io.housekeeping(now, &mut reported);
            next_housekeeping = now.mono + HOUSEKEEPING;
        }
        if io.engine.poll_timeout().is_some_and(|t| t <= now.mono) {
            io.engine.handle_timeout(now.mono);
            io.commands(now);
        }
        io.flush();
    }
}

/// Metrics already reported (gauges move by deltas; several workers share them).
#[derive(Default)]
struct Reported {
    allocations: usize,
}

impl Io {
    /// Puts a socket in the ready list (once).
    fn mark_ready(&mut self, token: Token) {
        if self.in_ready.insert(token) {
            self.ready.push_back(token);
        }
    }

    /// Handles one inbox message; `false` to stop the worker.
    fn inbox(&mut self, msg: Inbox, now: Now) -> bool {
        match msg {
            Inbox::PeerData {
                to,
                from,
                mut buf,
                len,
            } => {
                let fwd = self
                    .engine
                    .handle_peer_input(&mut buf, HEADROOM, len, to, from, now);
                self.forward(fwd, &buf, now);
            }
            Inbox::StreamOpen { client, tx } => {
                self.streams.insert(
                    client,
                    StreamInfo {
                        tx,
                        opened: now.mono,
                    },
                );
            }
            Inbox::StreamFrame {
                client,
                frame,
                budget,
            } => {
                let fwd = self
                    .engine
                    .handle_client_input(&frame, 0..frame.len(), client, now);
                self.forward(fwd, &frame, now);
                self.commands(now);
                drop(budget); // handled: the connection may send more
            }
            Inbox::StreamClosed { client } => {
                self.streams.remove(&client);
                self.engine.stream_closed(client);
                self.commands(now);
            }
            Inbox::Reload(r) => {
                self.engine.set_secrets(r.secrets.clone());
                self.engine.set_filter(r.filter.clone());
                self.engine
                    .set_limits(r.max_allocation_lifetime, r.max_bps_per_allocation);
                self.filter = r.filter.clone();
            }
            Inbox::Stop => return false,
        }
        true
    }

    /// Reads up to a few batches from the socket of `token`; `true` if it may have more.
    fn drain(
        &mut self,
        token: Token,
        bufs: &mut [Vec<u8>],
        metas: &mut [RecvMeta],
        now: Now,
    ) -> bool {
        for _ in 0..BATCHES_PER_TURN {
            let received = {
                let mut iovs: Vec<IoSliceMut<'_>> = bufs
                    .iter_mut()
                    .map(|b| IoSliceMut::new(&mut b[HEADROOM..HEADROOM + MAX_DATAGRAM]))
                    .collect();
                let (sock, state) = match self.socket(token) {
                    Some(s) => s,
                    None => return false,
                };
                state.recv(UdpSockRef::from(sock), &mut iovs, metas)
            };
            let n = match received {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    // ICMP errors surface here on some kernels; the socket stays usable.
                    tracing::trace!(error = %e, "TURN socket receive error");
                    return true;
                }
            };
            for (buf, meta) in bufs.iter_mut().zip(metas.iter()).take(n) {
                self.datagrams(token, buf, meta, now);
            }
            self.flush();
            if n < quinn_udp::BATCH_SIZE {
                return false;
            }
        }
        true
    }

    fn socket(&self, token: Token) -> Option<(&UdpSocket, &UdpSocketState)> {
        if token.0 >= RELAY_BASE {
            let r = self.relays.get(token.0 - RELAY_BASE)?.as_ref()?;
            Some((&r.sock, &r.state))
        } else {
            let l = self.listeners.get(token.0 - LISTENER_BASE)?;
            Some((&l.sock, &l.state))
        }
    }

    /// One receive buffer: one datagram, or several of `meta.stride` bytes (GRO).
    fn datagrams(&mut self, token: Token, buf: &mut [u8], meta: &RecvMeta, now: Now) {
        let src = SocketAddr::new(canonical(meta.addr.ip()), meta.addr.port());
        let coalesced = meta.stride < meta.len;
        let mut at = 0;
        while at < meta.len {
            let len = meta.stride.min(meta.len - at);
            if token.0 >= RELAY_BASE {
                let Some(key) = self
                    .relays
                    .get(token.0 - RELAY_BASE)
                    .and_then(|r| r.as_ref().map(|r| r.key))
                else {
                    return;
                };
                if coalesced {
                    // Each datagram needs head-room and tail-room of its own.
                    let mut scratch = std::mem::take(&mut self.scratch);
                    scratch[HEADROOM..HEADROOM + len]
                        .copy_from_slice(&buf[HEADROOM + at..HEADROOM + at + len]);
                    let fwd =
                        self.engine
                            .handle_peer_input(&mut scratch, HEADROOM, len, key, src, now);
                    self.forward(fwd, &scratch, now);
                    self.scratch = scratch;
                } else {
                    let fwd = self
                        .engine
                        .handle_peer_input(buf, HEADROOM, len, key, src, now);
                    self.forward(fwd, buf, now);
                }
            } else {
                let Some(l) = self.listeners.get(token.0 - LISTENER_BASE) else {
                    return;
                };
                let local_ip = match meta.dst_ip {
                    Some(ip) if l.local.ip().is_unspecified() => canonical(ip),
                    _ => canonical(l.local.ip()),
                };
                let client = ClientId {
                    transport: Transport::Udp,
                    src,
                    local: SocketAddr::new(local_ip, l.local.port()),
                    stream: 0,
                };
                let start = HEADROOM + at;
                let fwd = self
                    .engine
                    .handle_client_input(buf, start..start + len, client, now);
                self.forward(fwd, buf, now);
                self.commands(now);
            }
            at += len;
        }
    }

    /// Carries out what the engine said about the bytes in `buf`.
    fn forward(&mut self, fwd: Forward, buf: &[u8], now: Now) {
        match fwd {
            Forward::Nothing => {}
            Forward::ToClient { client, range } => self.send_to_client(client, &buf[range]),
            Forward::ToPeer { relay, peer, range } => {
                self.send_to_peer(relay, peer, &buf[range], now)
            }
        }
    }

    /// Queues a datagram: it joins the pending run when it can, else the run goes out first.
    fn queue(&mut self, via: Via, dest: SocketAddr, src_ip: Option<IpAddr>, bytes: &[u8]) {
        let max = self.max_segments(via);
        if let Some(run) = &mut self.run {
            let fits = run.via == via
                && run.dest == dest
                && run.src_ip == src_ip
                && bytes.len() <= run.seg
                && run.buf.len() + bytes.len() <= GSO_BYTES
                && run.count < max;
            if fits {
                run.buf.extend_from_slice(bytes);
                run.count += 1;
                if bytes.len() < run.seg {
                    self.flush(); // a shorter one can only be the last
                }
                return;
            }
            self.flush();
        }
        if max <= 1 || bytes.len() > GSO_MAX_SEGMENT {
            self.transmit(via, dest, src_ip, bytes, None);
            return;
        }
        let mut buf = Vec::with_capacity(GSO_BYTES);
        buf.extend_from_slice(bytes);
        self.run = Some(Run {
            via,
            dest,
            src_ip,
            seg: bytes.len(),
            count: 1,
            buf,
        });
    }

    fn max_segments(&self, via: Via) -> usize {
        match via {
            Via::Listener(i) => self
                .listeners
                .get(i)
                .map_or(1, |l| l.state.max_gso_segments()),
            Via::Relay(i) => self
                .relays
                .get(i)
                .and_then(|r| r.as_ref())
                .map_or(1, |r| r.state.max_gso_segments()),
        }
        .min(64)
    }

    /// Sends the pending run, if any.
    fn flush(&mut self) {
        if let Some(run) = self.run.take() {
            let seg = (run.count > 1).then_some(run.seg);
            self.transmit(run.via, run.dest, run.src_ip, &run.buf, seg);
        }
    }

    fn transmit(
        &mut self,
        via: Via,
        dest: SocketAddr,
        src_ip: Option<IpAddr>,
        contents: &[u8],
        segment_size: Option<usize>,
    ) {
        let t = Transmit {
            destination: dest,
            ecn: None,
            contents,
            segment_size,
            src_ip,
        };
        let sent = match via {
            Via::Listener(i) => self
                .listeners
                .get(i)
                .map(|l| l.state.try_send(UdpSockRef::from(&l.sock), &t)),
            Via::Relay(i) => self
                .relays
                .get(i)
                .and_then(|r| r.as_ref())
                .map(|r| r.state.try_send(UdpSockRef::from(&r.sock), &t)),
        };
        match (sent, segment_size) {
            (Some(Ok(())), _) => {}
            // A full socket buffer drops the run, as it would drop each datagram.
            (Some(Err(e)), Some(seg)) if e.kind() != std::io::ErrorKind::WouldBlock => {
                // GSO refused (a device without it): quinn-udp stops using it; this run goes
                // out datagram by datagram.
                for chunk in contents.chunks(seg) {
                    self.transmit(via, dest, src_ip, chunk, None);
                }
            }
            (_, seg) => {
                self.send_failures += seg.map_or(1, |s| contents.len().div_ceil(s)) as u64;
            }
        }
    }

    fn send_to_client(&mut self, client: ClientId, bytes: &[u8]) {
        match client.transport {
            Transport::Udp => {
                let Some(i) = self.listeners.iter().position(|l| {
                    l.local.port() == client.local.port()
                        && (l.local.ip().is_unspecified()
                            || canonical(l.local.ip()) == client.local.ip())
                }) else {
                    return;
                };
                let local = self.listeners[i].local;
                let destination = for_socket(client.src, local);
                let src_ip = local
                    .ip()
                    .is_unspecified()
                    .then(|| for_socket_ip(client.local.ip(), local));
                self.queue(Via::Listener(i), destination, src_ip, bytes);
            }
            Transport::Tcp | Transport::Tls => {
                if let Some(s) = self.streams.get(&client) {
                    if s.tx.try_send(bytes.to_vec()).is_err() {
                        self.send_failures += 1;
                    }
                }
            }
        }
    }

    fn send_to_peer(&mut self, relay: RelayKey, peer: SocketAddr, payload: &[u8], now: Now) {
        if self.filter.is_internal(peer) {
            // One of our own relay addresses: handed over in-process, never through the
            // kernel to whatever else listens on this host.
            let family = Family::of(peer.ip());
            let (Some(owner), Some(ip)) = (
                self.shared.owner(family, peer.port()),
                self.shared.binding.advertised(relay.family),
            ) else {
                self.handoffs_dropped += 1;
                return;
            };
            let from = SocketAddr::new(ip, relay.port);
            let to = RelayKey {
                family,
                port: peer.port(),
            };
            if owner == self.index {
                let mut scratch = std::mem::take(&mut self.scratch);
                scratch[HEADROOM..HEADROOM + payload.len()].copy_from_slice(payload);
                let fwd = self.engine.handle_peer_input(
                    &mut scratch,
                    HEADROOM,
                    payload.len(),
                    to,
                    from,
                    now,
                );
                if let Forward::ToClient { client, range } = fwd {
                    self.send_to_client(client, &scratch[range]);
                }
                self.scratch = scratch;
            } else {
                let mut buf = vec![0u8; HEADROOM + payload.len() + TAILROOM];
                buf[HEADROOM..HEADROOM + payload.len()].copy_from_slice(payload);
                let msg = Inbox::PeerData {
                    to,
                    from,
                    buf,
                    len: payload.len(),
                };
                if !self.shared.workers[owner].send(msg) {
                    self.handoffs_dropped += 1;
                }
            }
            return;
        }
        let Some(&slot) = self.by_key.get(&relay) else {
            return;
        };
        self.queue(Via::Relay(slot), peer, None, payload);
    }

    /// Carries out the engine's control commands.
    fn commands(&mut self, now: Now) {
        while let Some(cmd) = self.engine.poll_command() {
            match cmd {
                Command::Send { client, bytes } => self.send_to_client(client, &bytes),
                Command::BindRelay {
                    alloc,
                    family,
                    port,
                } => match self.bind(family, port, now.mono) {
                    // A reserved port answers with its own family.
                    Ok((family, bound)) => self.engine.relay_bound(alloc, family, Ok(bound)),
                    Err(()) => self.engine.relay_bound(alloc, family, Err(())),
                },
                Command::CloseRelay { relay } => self.close_relay(relay),
                Command::CloseStream { client } => {
                    // Dropping the sender ends the connection's writer, which closes it.
                    self.streams.remove(&client);
                }
            }
        }
    }

    fn bind(
        &mut self,
        family: Family,
        req: PortRequest,
        now: Instant,
    ) -> Result<(Family, Bound), ()> {
        let range = self.shared.binding.ports.clone();
        match req {
            PortRequest::Reserved(token) => {
                let taken = self
                    .shared
                    .reservations
                    .lock()
                    .expect("reservations lock")
                    .remove(&token);
                match taken {
                    Some(r) if r.expires > now => {
                        self.register(r.family, r.port, r.sock).map_err(|_| ())?;
                        Ok((
                            r.family,
                            Bound {
                                port: r.port,
                                token: None,
                            },
                        ))
                    }
                    _ => Err(()),
                }
            }
            PortRequest::Any | PortRequest::Even { .. } => {
                let ip = self.shared.binding.bind_ip(family).ok_or(())?;
                let (even, reserve) = match req {
                    PortRequest::Even { reserve_next } => (true, reserve_next),
                    _ => (false, false),
                };
                // Reservations are capped: past the cap an even port comes without one.
                let reserve = reserve
                    && self
                        .shared
                        .reservations
                        .lock()
                        .expect("reservations lock")
                        .len()
                        < MAX_RESERVATIONS;
                for _ in 0..BIND_ATTEMPTS {
                    let Some(port) = random_port(&range, even) else {
                        return Err(());
                    };
                    if reserve && port == *range.end() {
                        continue;
                    }
                    let Ok(sock) = bind_relay_socket(ip, port) else {
                        continue;
                    };
                    let reserved = if reserve {
                        match bind_relay_socket(ip, port + 1) {
                            Ok(next) => Some(next),
                            Err(_) => continue,
                        }
                    } else {
                        None
                    };
                    self.register(family, port, sock).map_err(|_| ())?;
                    let token = reserved.map(|sock| {
                        let mut token = [0u8; 8];
                        getrandom::fill(&mut token).expect("the OS random source is available");
                        self.shared
                            .reservations
                            .lock()
                            .expect("reservations lock")
                            .insert(
                                token,
                                Reserved {
                                    family,
                                    port: port + 1,
                                    sock,
                                    expires: now + RESERVATION_TTL,
                                },
                            );
                        token
                    });
                    return Ok((family, Bound { port, token }));
                }
                Err(())
            }
        }
    }

    fn register(
        &mut self,
        family: Family,
        port: u16,
        sock: std::net::UdpSocket,
    ) -> std::io::Result<()> {
        let mut sock = UdpSocket::from_std(sock);
        let state = UdpSocketState::new(UdpSockRef::from(&sock))?;
        let slot = self.free.pop().unwrap_or_else(|| {
            self.relays.push(None);
            self.relays.len() - 1
        });
        let token = Token(RELAY_BASE + slot);
        self.poll
            .registry()
            .register(&mut sock, token, Interest::READABLE)?;
        let key = RelayKey { family, port };
        self.relays[slot] = Some(Relay { key, sock, state });
        self.by_key.insert(key, slot);
        self.shared.set_owner(family, port, self.index);
        // Data may have arrived before the socket was registered.
        self.mark_ready(token);
        Ok(())
    }

    fn close_relay(&mut self, key: RelayKey) {
        let Some(slot) = self.by_key.remove(&key) else {
            return;
        };
        // A pending run may leave by this socket: it goes before the socket does.
        if self.run.as_ref().is_some_and(|r| r.via == Via::Relay(slot)) {
            self.flush();
        }
        // Before the socket closes: once it has, another worker may bind the port and own it.
        self.shared.clear_owner(key.family, key.port, self.index);
        if let Some(mut r) = self.relays[slot].take() {
            let _ = self.poll.registry().deregister(&mut r.sock);
        }
        self.free.push(slot);
        let token = Token(RELAY_BASE + slot);
        if self.in_ready.remove(&token) {
            self.ready.retain(|t| *t != token);
        }
    }

    fn housekeeping(&mut self, now: Now, reported: &mut Reported) {
        self.engine.handle_timeout(now.mono);
        self.commands(now);
        // Streams that never got an allocation are closed.
        let idle: Vec<ClientId> = self
            .streams
            .iter()
            .filter(|(c, s)| {
                now.mono.saturating_duration_since(s.opened) > STREAM_IDLE
                    && !self.engine.has_allocation(c)
            })
            .map(|(c, _)| *c)
            .collect();
        for c in idle {
            self.streams.remove(&c);
        }
        if self.index == 0 {
            self.shared.sweep_reservations(now.mono);
        }
        let stats = std::mem::take(&mut self.engine.stats);
        report(&stats, self.send_failures, self.handoffs_dropped);
        self.send_failures = 0;
        self.handoffs_dropped = 0;
        let count = self.engine.allocation_count();
        let delta = count as f64 - reported.allocations as f64;
        if delta != 0.0 {
            metrics::gauge!("switchboard_turn_allocations_active").increment(delta);
            reported.allocations = count;
        }
    }
}

/// `addr` in the form a socket bound to `local` can send to (IPv4 as mapped IPv6 on an IPv6
/// socket).
fn for_socket(addr: SocketAddr, local: SocketAddr) -> SocketAddr {
    SocketAddr::new(for_socket_ip(addr.ip(), local), addr.port())
}

fn for_socket_ip(ip: IpAddr, local: SocketAddr) -> IpAddr {
    match (ip, local) {
        (IpAddr::V4(v4), SocketAddr::V6(_)) => IpAddr::V6(v4.to_ipv6_mapped()),
        _ => ip,
    }
}

/// Adds a worker's counters to the metrics.
fn report(s: &Stats, send_failures: u64, handoffs_dropped: u64) {
    let add = |name: &'static str, labels: &[(&'static str, &'static str)], n: u64| {
        if n > 0 {
            let labels: Vec<metrics::Label> = labels
                .iter()
                .map(|(k, v)| metrics::Label::new(*k, *v))
                .collect();
            metrics::counter!(name, labels).increment(n);
        }
    };
    add(
        "switchboard_turn_relayed_bytes_total",
        &[("direction", "client_to_peer")],
        s.to_peer_bytes,
    );
    add(
        "switchboard_turn_relayed_bytes_total",
        &[("direction", "peer_to_client")],
        s.to_client_bytes,
    );
    add(
        "switchboard_turn_relayed_packets_total",
        &[("direction", "client_to_peer")],
        s.to_peer_packets,
    );
    add(
        "switchboard_turn_relayed_packets_total",
        &[("direction", "peer_to_client")],
        s.to_client_packets,
    );
    for (reason, n) in [
        ("no_route", s.dropped_no_route),
        ("no_permission", s.dropped_no_permission),
        ("bandwidth", s.dropped_over_bandwidth),
        ("invalid", s.dropped_invalid),
        ("send_failed", send_failures),
        ("handoff", handoffs_dropped),
    ] {
        add(
            "switchboard_turn_dropped_packets_total",
            &[("reason", reason)],
            n,
        );
    }
    add(
        "switchboard_turn_allocations_created_total",
        &[],
        s.allocations_created,
    );
    for (reason, n) in [
        ("user_quota", s.refused_user_quota),
        ("total_quota", s.refused_total_quota),
        ("no_port", s.refused_no_port),
    ] {
        add(
            "switchboard_turn_allocations_failed_total",
            &[("reason", reason)],
            n,
        );
    }
    for (reason, n) in [
        ("bad_credential", s.auth_failures),
        ("stale_nonce", s.stale_nonces),
        ("wrong_credentials", s.wrong_credentials),
    ] {
        add(
            "switchboard_turn_auth_failures_total",
            &[("reason", reason)],
            n,
        );
    }
    add("switchboard_turn_peer_denied_total", &[], s.peer_denied);
}

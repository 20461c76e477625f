//! The embedded TURN/STUN server: a sans-IO [`engine`] (RFC 8656 on the webrtc-rs `turn` and
//! `stun` protocol types) driven by thin [`io`] shells — one UDP worker thread per core, tokio
//! tasks for TURN over TCP and TLS (also on the HTTPS port, see `http::tls`). [`filter`] is the
//! pure peer filter. Must not import the hub, WebSocket or HTTP layers.

pub mod engine;
pub mod filter;
pub mod io;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::wire::models::IceServer;
use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::auth::turn_rest;
use crate::config::TurnConfig;
use engine::{Engine, Nonces, QuotaBook, Secrets};
use filter::PeerFilter;
use io::{Inbox, RelayBinding};

/// Most permissions and channels per allocation (an ICE agent needs a handful).
const MAX_PERMISSIONS: usize = 64;
const MAX_CHANNELS: usize = 64;
/// Worker threads at most (the relay-port owner table keeps a worker in a byte).
const MAX_WORKERS: usize = 64;

/// The address other machines reach this one at in `family`, when nothing is configured: the
/// source address the kernel would pick for a public destination (no packet is sent).
fn detect_ip(v6: bool) -> Option<IpAddr> {
    let probe = || -> std::io::Result<IpAddr> {
        let (bind, to): (SocketAddr, SocketAddr) = if v6 {
            (
                (Ipv6Addr::UNSPECIFIED, 0).into(),
                "[2001:4860:4860::8888]:9".parse().expect("literal"),
            )
        } else {
            (
                (Ipv4Addr::UNSPECIFIED, 0).into(),
                "203.0.113.1:9".parse().expect("literal"),
            )
        };
        let s = StdUdpSocket::bind(bind)?;
        s.connect(to)?;
        Ok(s.local_addr()?.ip())
    };
    probe().ok().filter(|ip| !ip.is_unspecified())
}

/// The worker threads: one per core.
fn worker_count() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_WORKERS)
}

/// `count` UDP sockets sharing `addr` (its port resolved once, for port 0).
fn bind_listeners(addr: SocketAddr, count: usize) -> std::io::Result<Vec<StdUdpSocket>> {
    if addr.port() != 0 {
        // SO_REUSEPORT would let a second instance share the port with this one and split its
        // clients silently; a plain bind first makes it fail as "address in use" instead.
        drop(StdUdpSocket::bind(addr)?);
    }
    let first = bind_reuseport(addr)?;
    let addr = first.local_addr()?;
    let mut socks = vec![first];
    for _ in 1..count {
        socks.push(bind_reuseport(addr)?);
    }
    Ok(socks)
}

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<StdUdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    #[cfg(unix)]
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // `[::]` serves IPv4 clients too (as mapped addresses).
        sock.set_only_v6(false)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// Where the TURN server listens and relays, decided once at start.
#[derive(Debug, Clone)]
pub struct Addresses {
    pub udp: SocketAddr,
    pub tcp: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
    pub binding: RelayBinding,
}

/// The reloadable TURN settings.
#[derive(Debug, Clone)]
pub struct Limits {
    pub allow_peers: Vec<ipnet::IpNet>,
    pub deny_peers: Vec<ipnet::IpNet>,
    pub user_quota: u32,
    pub total_quota: u32,
    pub max_allocation_lifetime: Duration,
    pub max_bps_per_allocation: u64,
}

impl Limits {
    pub fn from_config(cfg: &TurnConfig) -> Limits {
        Limits {
            allow_peers: cfg.allow_peers.clone(),
            deny_peers: cfg.deny_peers.clone(),
            user_quota: cfg.user_quota,
            total_quota: cfg.total_quota,
            max_allocation_lifetime: cfg.max_allocation_lifetime,
            max_bps_per_allocation: cfg.max_bps_per_allocation,
        }
    }
}

/// What the rest of the process holds of a running TURN server: credentials to mint, the
/// stream entry for the HTTPS demux, reload and stop.
pub struct TurnHandle {
    pub addresses: Addresses,
    secrets: RwLock<Secrets>,
    shared: Arc<io::Shared>,
    quotas: Arc<Mutex<QuotaBook>>,
    streams: Arc<io::stream::StreamHub>,
    /// The relay IPs, which are this host's own addresses whatever the interfaces say.
    relay_ips: Vec<IpAddr>,
}

impl TurnHandle {
    /// The secret credentials are minted with now.
    pub fn current_secret(&self) -> String {
        self.secrets.read().expect("secrets lock").current.clone()
    }

    pub fn secrets(&self) -> Secrets {
        self.secrets.read().expect("secrets lock").clone()
    }

    /// Where TURN-over-TLS connections found on the HTTPS port go.
    pub fn streams(&self) -> Arc<io::stream::StreamHub> {
        self.streams.clone()
    }

    fn filter(&self, limits: &Limits) -> PeerFilter {
        let own: Vec<IpAddr> = filter::host_addresses()
            .into_iter()
            .chain(self.relay_ips.iter().copied())
            .collect();
        PeerFilter::new(
            &limits.allow_peers,
            &limits.deny_peers,
            own,
            self.addresses.binding.ports.clone(),
        )
    }

    /// Applies new secrets and limits to every worker (SIGHUP); the host's addresses are read
    /// again for the peer filter.
    pub fn reload(&self, secrets: Secrets, limits: &Limits) {
        *self.secrets.write().expect("secrets lock") = secrets.clone();
        self.quotas
            .lock()
            .expect("quota lock")
            .set_limits(limits.user_quota, limits.total_quota);
        let reload = Arc::new(io::Reload {
            secrets,
            filter: self.filter(limits),
            max_allocation_lifetime: limits.max_allocation_lifetime,
            max_bps_per_allocation: limits.max_bps_per_allocation,
        });
        for w in &self.shared.workers {
            w.send(Inbox::Reload(reload.clone()));
        }
    }
}

/// A running TURN server.
pub struct TurnServer {
    pub handle: Arc<TurnHandle>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop_streams: CancellationToken,
    stream_tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TurnServer {
    /// Binds the configured listeners and relays and starts serving. `secret` is the resolved
    /// current secret; `tls` the certificate for `turn.listen_tls` (when set).
    pub async fn start(
        cfg: &TurnConfig,
        secret: String,
        tls: Option<crate::tls::TlsReloader>,
    ) -> anyhow::Result<TurnServer> {
        let listen = cfg.listen_udp;
        let limits = Limits::from_config(cfg);
        let workers = worker_count();
        let socks =
            bind_listeners(listen, workers).with_context(|| format!("turn.listen_udp {listen}"))?;
        let udp = socks[0].local_addr()?;
        let binding = relay_binding(cfg, listen);
        let tcp = match cfg.listen_tcp {
            None => None,
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("turn.listen_tcp {a}"))?,
            ),
        };
        let tls_listener = match cfg.listen_tls {
            None => None,
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("turn.listen_tls {a}"))?,
            ),
        };
        let addresses = Addresses {
            udp,
            tcp: tcp.as_ref().map(|l| l.local_addr()).transpose()?,
            tls: tls_listener.as_ref().map(|l| l.local_addr()).transpose()?,
            binding: binding.clone(),
        };
        let secrets = Secrets {
            current: secret,
            previous: (!cfg.previous_secret.is_empty()).then(|| cfg.previous_secret.clone()),
        };
        let relay_ips: Vec<IpAddr> = [
            binding.advertised_v4,
            binding.advertised_v6,
            binding.bind_v4.filter(|ip| !ip.is_unspecified()),
            binding.bind_v6.filter(|ip| !ip.is_unspecified()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let quotas = Arc::new(Mutex::new(QuotaBook::new(
            limits.user_quota,
            limits.total_quota,
        )));
        let mut nonce_key = [0u8; 32];
        getrandom::fill(&mut nonce_key).map_err(|e| anyhow::anyhow!("random source: {e}"))?;
        let mut polls = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        let mut inboxes = Vec::with_capacity(workers);
        for _ in 0..workers {
            let poll = mio::Poll::new().context("turn: cannot create a poll")?;
            let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0))?);
            let (tx, rx) = std::sync::mpsc::channel();
            handles.push(io::new_handle(tx, waker));
            polls.push(poll);
            inboxes.push(rx);
        }
        let shared = Arc::new(io::shared(handles, binding.clone()));
        let streams = io::stream::StreamHub::new(shared.clone());
        let handle = Arc::new(TurnHandle {
            addresses: addresses.clone(),
            secrets: RwLock::new(secrets.clone()),
            shared: shared.clone(),
            quotas: quotas.clone(),
            streams: streams.clone(),
            relay_ips,
        });
        let filter = handle.filter(&limits);
        let mut threads = Vec::with_capacity(workers);
        for (index, ((poll, rx), sock)) in polls.into_iter().zip(inboxes).zip(socks).enumerate() {
            let mut salt = [0u8; 4];
            getrandom::fill(&mut salt).map_err(|e| anyhow::anyhow!("random source: {e}"))?;
            let engine = Engine::new(
                engine::Config {
                    realm: cfg.realm.clone(),
                    relay_v4: binding.advertised_v4,
                    relay_v6: binding.advertised_v6,
                    max_allocation_lifetime: limits.max_allocation_lifetime,
                    max_bps_per_allocation: limits.max_bps_per_allocation,
                    total_bps: cfg.total_bps / workers as u64,
                    max_permissions: MAX_PERMISSIONS,
                    max_channels: MAX_CHANNELS,
                },
                secrets.clone(),
                filter.clone(),
                Nonces::new(nonce_key),
                quotas.clone(),
                salt,
            );
            threads.push(io::udp::spawn(io::udp::Setup {
                index,
                poll,
                rx,
                listeners: vec![sock],
                engine,
                filter: filter.clone(),
                shared: shared.clone(),
            })?);
        }
        let stop_streams = CancellationToken::new();
        let mut stream_tasks = Vec::new();
        if let Some(l) = tcp {
            stream_tasks.push(tokio::spawn(io::stream::listen_tcp(
                l,
                streams.clone(),
                stop_streams.clone(),
            )));
        }
        if let Some(l) = tls_listener {
            let tls = tls.context("turn.listen_tls needs a certificate: set turn.tls_cert_file and turn.tls_key_file (or http.tls_*)")?;
            stream_tasks.push(tokio::spawn(io::stream::listen_tls(
                l,
                streams.clone(),
                tls,
                stop_streams.clone(),
            )));
        }
        tracing::info!(
            addr = %addresses.udp,
            relay_v4 = ?binding.advertised_v4,
            relay_v6 = ?binding.advertised_v6,
            workers,
            "turn listening (udp)"
        );
        if let Some(a) = addresses.tcp {
            tracing::info!(addr = %a, "turn listening (tcp)");
        }
        if let Some(a) = addresses.tls {
            tracing::info!(addr = %a, "turn listening (tls)");
        }
        Ok(TurnServer {
            handle,
            threads,
            stop_streams,
            stream_tasks,
        })
    }

    /// Stops the server: workers end, listening and relay ports are released.
    pub async fn stop(self) {
        self.stop_streams.cancel();
        for t in self.stream_tasks {
            let _ = t.await;
        }
        for w in &self.handle.shared.workers {
            w.send(Inbox::Stop);
        }
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        self.handle
            .shared
            .reservations
            .lock()
            .expect("reservations lock")
            .clear();
    }
}

/// Which families are relayed, bound where and advertised as what (RFC 6156: IPv6 relaying
/// when listening on IPv6). `turn.public_ip` may name one address per family, comma-separated.
fn relay_binding(cfg: &TurnConfig, listen: SocketAddr) -> RelayBinding {
    let ports = cfg.relay_ports.range();
    let public_v4 = cfg.public_ip.v4.map(IpAddr::V4);
    let public_v6 = cfg.public_ip.v6.map(IpAddr::V6);
    let ip = filter::canonical(listen.ip());
    let (bind_v4, bind_v6) = match ip {
        IpAddr::V4(v4) => (Some(IpAddr::V4(v4)), None),
        IpAddr::V6(v6) if v6.is_unspecified() => (
            Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        ),
        v6 => (None, Some(v6)),
    };
    // Advertise the configured public IP, else the bound IP, else the detected one. A failed
    // detection advertises loopback (a laptop without a network still relays locally); that
    // opens nothing: own addresses are only ever reached in-process.
    let advertise = |bind: Option<IpAddr>, public: Option<IpAddr>, v6: bool| -> Option<IpAddr> {
        let bind = bind?;
        public.or(Some(bind).filter(|b| !b.is_unspecified())).or_else(|| {
            detect_ip(v6).or_else(|| {
                if v6 {
                    None
                } else {
                    tracing::warn!(
                        "turn: cannot find this host's address; advertising 127.0.0.1 (set turn.public_ip)"
                    );
                    Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
                }
            })
        })
    };
    let advertised_v4 = advertise(bind_v4, public_v4, false);
    let advertised_v6 = advertise(bind_v6, public_v6, true);
    RelayBinding {
        bind_v4: bind_v4.filter(|_| advertised_v4.is_some()),
        bind_v6: bind_v6.filter(|_| advertised_v6.is_some()),
        advertised_v4,
        advertised_v6,
        ports,
    }
}

/// What browsers need to reach the TURN server (PROTOCOL §4).
#[derive(Debug, Clone)]
pub struct IceConfig {
    /// `turn.public_host`; empty: the host the client used for the HTTP API.
    pub public_host: String,
    pub udp_port: u16,
    /// `turn.listen_tcp`'s port, when enabled.
    pub tcp_port: Option<u16>,
    /// `turn.listen_tls`'s port, when enabled.
    pub tls_port: Option<u16>,
    /// The HTTPS listener's port, when TURN over TLS shares it (`turn.share_https`).
    pub https_port: Option<u16>,
    pub ttl_secs: i64,
}

/// `host` as it goes into a STUN/TURN URI (IPv6 in brackets).
fn uri_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// The host part of an HTTP `Host` header.
pub fn host_of(host_header: &str) -> &str {
    if let Some(rest) = host_header.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host_header.split(':').next().unwrap_or(host_header)
}

impl IceConfig {
    /// `(iceServers, credential)` for `user_id` at `now` (unix seconds).
    pub fn ice_servers(
        &self,
        secret: &str,
        user_id: &str,
        request_host: &str,
        now: i64,
    ) -> (Vec<IceServer>, turn_rest::TurnCredential) {
        let host = if self.public_host.is_empty() {
            host_of(request_host)
        } else {
            &self.public_host
        };
        let cred = turn_rest::mint(secret, user_id, now, self.ttl_secs);
        let servers = vec![
            IceServer {
                urls: vec![format!("stun:{}:{}", uri_host(host), self.udp_port)],
                username: None,
                credential: None,
            },
            IceServer {
                urls: self.uris(request_host),
                username: Some(cred.username.clone()),
                credential: Some(cred.password.clone()),
            },
        ];
        (servers, cred)
    }

    /// Every enabled TURN transport as a URI: UDP, TCP, TLS, and TLS on the HTTPS port.
    pub fn uris(&self, request_host: &str) -> Vec<String> {
        let host = if self.public_host.is_empty() {
            host_of(request_host)
        } else {
            &self.public_host
        };
        let host = uri_host(host);
        let mut out = vec![format!("turn:{host}:{}?transport=udp", self.udp_port)];
        if let Some(p) = self.tcp_port {
            out.push(format!("turn:{host}:{p}?transport=tcp"));
        }
        for p in [self.tls_port, self.https_port].into_iter().flatten() {
            out.push(format!("turns:{host}:{p}?transport=tcp"));
        }
        out.dedup();
        out
    }
}

/// Whether a STUN Binding request to `addr` is answered within a second (RFC 8489 §6): the
/// readiness probe of our own listener.
pub async fn answers_stun(addr: SocketAddr) -> bool {
    let probe = async {
        let sock = tokio::net::UdpSocket::bind((addr.ip(), 0)).await.ok()?;
        let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        let mut txid = [0u8; 12];
        getrandom::fill(&mut txid).ok()?;
        req.extend_from_slice(&txid);
        sock.send_to(&req, addr).await.ok()?;
        let mut buf = [0u8; 512];
        let (n, _) = sock.recv_from(&mut buf).await.ok()?;
        Some(n >= 20 && buf[0..2] == [0x01, 0x01] && buf[8..20] == txid)
    };
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(1), probe).await,
        Ok(Some(true))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(host_of("example.org:8080"), "example.org");
        assert_eq!(host_of("example.org"), "example.org");
        assert_eq!(host_of("[::1]:8080"), "::1");
        assert_eq!(uri_host("::1"), "[::1]");
        let ice = IceConfig {
            public_host: String::new(),
            udp_port: 3478,
            tcp_port: None,
            tls_port: None,
            https_port: None,
            ttl_secs: 60,
        };
        let (servers, cred) = ice.ice_servers("s", "u1", "[::1]:8080", 1000);
        assert_eq!(servers[0].urls[0], "stun:[::1]:3478");
        assert_eq!(servers[0].username, None);
        assert_eq!(servers[1].urls[0], "turn:[::1]:3478?transport=udp");
        assert_eq!(servers[1].username.as_deref(), Some("1060:u1"));
        assert_eq!(cred.expires_at, 1060);
        let ice = IceConfig {
            public_host: "turn.example.org".into(),
            ..ice
        };
        assert_eq!(
            ice.uris("10.0.0.5:8080"),
            vec!["turn:turn.example.org:3478?transport=udp"]
        );
        let ice = IceConfig {
            tcp_port: Some(3478),
            tls_port: Some(5349),
            https_port: Some(443),
            ..ice
        };
        assert_eq!(
            ice.uris("x"),
            vec![
                "turn:turn.example.org:3478?transport=udp",
                "turn:turn.example.org:3478?transport=tcp",
                "turns:turn.example.org:5349?transport=tcp",
                "turns:turn.example.org:443?transport=tcp",
            ]
        );
    }
}

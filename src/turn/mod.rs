//! The embedded TURN/STUN server: the webrtc-rs `turn` crate behind our policy [`gate`]
//! (REST-credential auth with secret rotation, expiry only at allocation time, quotas, peer
//! filtering), with [`relay`] sockets that filter peers in both directions. [`filter`] and
//! [`policy`] are pure. Must not import the hub, WebSocket or HTTP layers.

pub mod filter;
pub mod gate;
pub mod nonce;
pub mod policy;
pub mod relay;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::auth::turn_rest;
use crate::config::TurnConfig;
use filter::PeerFilter;
use gate::{AuthHandler, GateConn, Secrets, Shared};
use policy::Policy;

/// `"49152-65535"` → `49152..=65535`.
pub fn parse_port_range(s: &str) -> Option<RangeInclusive<u16>> {
    let (a, b) = s.trim().split_once('-')?;
    let (a, b): (u16, u16) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a > 0 && a <= b).then_some(a..=b)
}

/// The address other machines reach this one at, when nothing is configured: the source
/// address the kernel would use for a public destination (no packet is sent), or loopback.
fn detect_local_ip() -> IpAddr {
    let probe = || -> std::io::Result<IpAddr> {
        let s = StdUdpSocket::bind("0.0.0.0:0")?;
        s.connect("203.0.113.1:9")?; // TEST-NET-3: only selects a route
        Ok(s.local_addr()?.ip())
    };
    probe().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// How many sockets listen on the TURN port. The crate reads each listener in one sequential
/// loop; with `SO_REUSEPORT` the kernel spreads clients over several sockets on the same port by
/// a hash of their address, so a client always reaches the same loop, which keeps its
/// allocations. A loop waits on locks and sends for every packet, so it is bound by latency
/// more than by CPU: on 2 cores, `turnutils_uclient -y -m 8` took 20 s with one loop (6 % lost),
/// 20 s with two and 10 s (coturn's time, nothing lost) with four; eight and sixteen cost no
/// more CPU per packet than four. Hence four per core.
fn listener_count() -> usize {
    std::thread::available_parallelism().map_or(4, |n| (4 * n.get()).min(32))
}

/// `count` UDP sockets sharing `addr` (its port resolved once, for port 0).
fn bind_listeners(addr: SocketAddr, count: usize) -> std::io::Result<Vec<UdpSocket>> {
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

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    #[cfg(unix)]
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

/// A running TURN server.
pub struct TurnServer {
    server: turn::server::Server,
    pub shared: Arc<Shared>,
    pub local_addr: SocketAddr,
    pub relay_ip: IpAddr,
    /// This server's relay IPs and port range, for rebuilding the peer filter on reload.
    pub own_ips: Vec<IpAddr>,
    pub relay_ports: RangeInclusive<u16>,
    closer: tokio::task::JoinHandle<()>,
    nonce_schedule: tokio::task::JoinHandle<()>,
}

impl TurnServer {
    /// Binds `turn.listen_udp` and starts serving. `secret` is the resolved current secret.
    pub async fn start(cfg: &TurnConfig, secret: String) -> anyhow::Result<TurnServer> {
        let listen: SocketAddr = cfg.listen_udp.parse().with_context(|| {
            format!(
                "turn.listen_udp: `{}` is not an address:port",
                cfg.listen_udp
            )
        })?;
        let ports =
            parse_port_range(&cfg.relay_ports).context("turn.relay_ports: expected `min-max`")?;
        let socks = bind_listeners(listen, listener_count())
            .with_context(|| format!("turn.listen_udp {listen}"))?;
        let local_addr = socks[0].local_addr()?;
        let advertised_ip: IpAddr = if !cfg.public_ip.is_empty() {
            cfg.public_ip.parse().context("turn.public_ip")?
        } else if listen.ip().is_unspecified() {
            detect_local_ip()
        } else {
            listen.ip()
        };
        let bind_ip = listen.ip();
        let mut own_ips = vec![advertised_ip];
        if !bind_ip.is_unspecified() && bind_ip != advertised_ip {
            own_ips.push(bind_ip);
        }
        let filter = PeerFilter::new(
            &cfg.allow_peers,
            &cfg.deny_peers,
            own_ips.clone(),
            ports.clone(),
        )?;
        let secrets = Secrets {
            current: secret,
            previous: (!cfg.previous_secret.is_empty()).then(|| cfg.previous_secret.clone()),
        };
        let policy = Policy::new(
            cfg.user_quota,
            cfg.total_quota,
            cfg.max_allocation_lifetime.as_millis() as i64,
        );
        let shared = Arc::new(Shared::new(cfg.realm.clone(), secrets, filter, policy));
        let mut conn_configs = Vec::with_capacity(socks.len());
        for sock in socks {
            conn_configs.push(turn::server::config::ConnConfig {
                conn: Arc::new(GateConn::new(Arc::new(sock), shared.clone())?),
                relay_addr_generator: Box::new(relay::Relays {
                    bind_ip,
                    advertised_ip,
                    ports: ports.clone(),
                    shared: shared.clone(),
                }),
            });
        }
        let (close_tx, mut close_rx) = mpsc::channel(256);
        let server = turn::server::Server::new(turn::server::config::ServerConfig {
            conn_configs,
            realm: cfg.realm.clone(),
            auth_handler: Arc::new(AuthHandler(shared.clone())),
            channel_bind_timeout: std::time::Duration::ZERO,
            alloc_close_notify: Some(close_tx),
        })
        .await
        .context("cannot start the TURN server")?;
        let closer_shared = shared.clone();
        let closer = tokio::spawn(async move {
            while let Some(info) = close_rx.recv().await {
                closer_shared.allocation_closed(info.five_tuple.src_addr);
            }
        });
        let (bell, bell_to) = doorbell(local_addr).await?;
        let nonce_schedule = tokio::spawn(run_nonce_schedule(shared.clone(), bell, bell_to));
        // The gate challenges clients with the crate's nonce: have one before serving.
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let issued = shared.nonce_issued.notified();
                if shared.has_nonce() {
                    return;
                }
                issued.await;
            }
        })
        .await
        .context("the TURN server did not issue a nonce")?;
        tracing::info!(addr = %local_addr, relay_ip = %advertised_ip, "turn listening (udp)");
        Ok(TurnServer {
            server,
            shared,
            local_addr,
            relay_ip: advertised_ip,
            own_ips,
            relay_ports: ports,
            closer,
            nonce_schedule,
        })
    }

    /// Stops the server: allocations close, the listening and relay ports are released.
    pub async fn stop(self) {
        if let Err(e) = self.server.close().await {
            tracing::warn!(error = %e, "turn server close");
        }
        self.closer.abort();
        self.nonce_schedule.abort();
    }
}

/// A socket to ring the doorbell of the listener at `listener` from, and where to ring it: an
/// empty datagram wakes a read loop that waits on an idle socket, so it picks up a probe.
async fn doorbell(listener: SocketAddr) -> anyhow::Result<(UdpSocket, SocketAddr)> {
    let to = match listener {
        SocketAddr::V4(a) if a.ip().is_unspecified() => (Ipv4Addr::LOCALHOST, a.port()).into(),
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            (std::net::Ipv6Addr::LOCALHOST, a.port()).into()
        }
        _ => listener,
    };
    let from: SocketAddr = if to.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(from)
        .await
        .context("turn: the doorbell socket")?;
    Ok((sock, to))
}

/// Keeps the gate's house nonces fresh ([`nonce`]): leaves each probe the schedule asks for
/// with the gate, rings the doorbell, and sleeps until the schedule's next instant or the
/// crate's answer.
async fn run_nonce_schedule(shared: Arc<Shared>, bell: UdpSocket, bell_to: SocketAddr) {
    loop {
        let issued = shared.nonce_issued.notified();
        let (probe, wait_ms) = shared.poll_probe();
        if let Some(datagram) = probe {
            shared.queue_probe(datagram);
            if let Err(e) = bell.send_to(&[], bell_to).await {
                tracing::warn!(error = %e, "turn: cannot ring the nonce doorbell");
            }
        }
        let wait = Duration::from_millis(wait_ms.clamp(10, 60_000) as u64);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = issued => {}
        }
    }
}

/// What browsers need to reach the TURN server (PROTOCOL §4).
#[derive(Debug, Clone)]
pub struct IceConfig {
    /// `turn.public_host`; empty: the host the client used for the HTTP API.
    pub public_host: String,
    pub udp_port: u16,
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
    ) -> (Value, turn_rest::TurnCredential) {
        let host = if self.public_host.is_empty() {
            host_of(request_host)
        } else {
            &self.public_host
        };
        let host = uri_host(host);
        let cred = turn_rest::mint(secret, user_id, now, self.ttl_secs);
        let servers = json!([
            {"urls": [format!("stun:{host}:{}", self.udp_port)]},
            {
                "urls": [format!("turn:{host}:{}?transport=udp", self.udp_port)],
                "username": cred.username,
                "credential": cred.password,
            }
        ]);
        (servers, cred)
    }

    pub fn uris(&self, request_host: &str) -> Vec<String> {
        let host = if self.public_host.is_empty() {
            host_of(request_host)
        } else {
            &self.public_host
        };
        vec![format!(
            "turn:{}:{}?transport=udp",
            uri_host(host),
            self.udp_port
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        assert_eq!(parse_port_range("49152-65535"), Some(49152..=65535));
        assert_eq!(parse_port_range(" 20000 - 20010 "), Some(20000..=20010));
        assert_eq!(parse_port_range("0-10"), None);
        assert_eq!(parse_port_range("10-5"), None);
        assert_eq!(parse_port_range("10"), None);
    }

    #[test]
    fn hosts() {
        assert_eq!(host_of("example.org:8080"), "example.org");
        assert_eq!(host_of("example.org"), "example.org");
        assert_eq!(host_of("[::1]:8080"), "::1");
        assert_eq!(uri_host("::1"), "[::1]");
        let ice = IceConfig {
            public_host: String::new(),
            udp_port: 3478,
            ttl_secs: 60,
        };
        let (servers, cred) = ice.ice_servers("s", "u1", "[::1]:8080", 1000);
        assert_eq!(servers[0]["urls"][0], "stun:[::1]:3478");
        assert_eq!(servers[1]["urls"][0], "turn:[::1]:3478?transport=udp");
        assert_eq!(servers[1]["username"], "1060:u1");
        assert_eq!(cred.expires_at, 1060);
        let ice = IceConfig {
            public_host: "turn.example.org".into(),
            ..ice
        };
        assert_eq!(
            ice.uris("10.0.0.5:8080"),
            vec!["turn:turn.example.org:3478?transport=udp"]
        );
    }
}

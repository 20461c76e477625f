//! Relay sockets: a port from `turn.relay_ports` per allocation, wrapped so that traffic to or
//! from a peer the [`PeerFilter`] denies is dropped in both directions (Send indications and
//! ChannelData have no response to refuse; the gate already answers 403 to permissions).

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;

use tokio::net::UdpSocket;
use turn::relay::RelayAddressGenerator;
use webrtc_util::Conn;

use super::gate::Shared;

/// Ports tried before an allocation fails for lack of a free one.
const BIND_ATTEMPTS: usize = 40;

pub struct Relays {
    pub bind_ip: IpAddr,
    pub advertised_ip: IpAddr,
    pub ports: RangeInclusive<u16>,
    pub shared: Arc<Shared>,
}

fn random_port(range: &RangeInclusive<u16>) -> u16 {
    let mut b = [0u8; 2];
    getrandom::fill(&mut b).expect("the OS random source is available");
    let span = (*range.end() - *range.start()) as u32 + 1;
    *range.start() + (u16::from_le_bytes(b) as u32 % span) as u16
}

#[async_trait::async_trait]
impl RelayAddressGenerator for Relays {
    fn validate(&self) -> Result<(), turn::Error> {
        if self.ports.is_empty() || *self.ports.start() == 0 {
            return Err(turn::Error::Other("empty relay port range".into()));
        }
        Ok(())
    }

    async fn allocate_conn(
        &self,
        _use_ipv4: bool,
        requested_port: u16,
    ) -> Result<(Arc<dyn Conn + Send + Sync>, SocketAddr), turn::Error> {
        let candidates: Vec<u16> = if requested_port != 0 && self.ports.contains(&requested_port) {
            vec![requested_port]
        } else {
            (0..BIND_ATTEMPTS)
                .map(|_| random_port(&self.ports))
                .collect()
        };
        for port in candidates {
            if let Ok(sock) = UdpSocket::bind(SocketAddr::new(self.bind_ip, port)).await {
                let conn = RelayConn {
                    sock,
                    shared: self.shared.clone(),
                };
                return Ok((Arc::new(conn), SocketAddr::new(self.advertised_ip, port)));
            }
        }
        metrics::counter!("switchboard_turn_allocations_failed_total", "reason" => "no_relay_port")
            .increment(1);
        Err(turn::Error::ErrMaxRetriesExceeded)
    }
}

/// One allocation's relay socket.
pub struct RelayConn {
    sock: UdpSocket,
    shared: Arc<Shared>,
}

impl RelayConn {
    fn allowed(&self, peer: SocketAddr) -> bool {
        self.shared
            .filter
            .read()
            .expect("filter lock")
            .allowed(peer)
    }
}

#[async_trait::async_trait]
impl Conn for RelayConn {
    async fn connect(&self, addr: SocketAddr) -> webrtc_util::Result<()> {
        self.sock.connect(addr).await?;
        Ok(())
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Ok(self.recv_from(buf).await?.0)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        loop {
            let (n, from) = self.sock.recv_from(buf).await?;
            if self.allowed(from) {
                self.shared.counters.from_peer_bytes.increment(n as u64);
                return Ok((n, from));
            }
            self.shared.counters.from_peer_dropped.increment(1);
        }
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        Ok(self.sock.send(buf).await?)
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        if !self.allowed(target) {
            self.shared.counters.to_peer_dropped.increment(1);
            return Ok(buf.len());
        }
        self.shared
            .counters
            .to_peer_bytes
            .increment(buf.len() as u64);
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

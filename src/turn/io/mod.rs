//! The I/O shells around the [`super::engine`]: a few OS threads, one per core, each running a
//! `mio` loop that owns its share of the UDP listening sockets (`SO_REUSEPORT`: the kernel keeps
//! a client on one of them), the relay sockets of its allocations and its own engine, reading in
//! batches (`recvmmsg` through `quinn-udp`); and tokio tasks for TURN over TCP and TLS, which
//! frame the stream and hand each frame to the worker that owns the connection.
//!
//! Workers share only what must be global: the quota book, the owner of every relay port (so a
//! datagram from one of our allocations to another is handed over in-process), the port
//! reservations of EVEN-PORT, and their inboxes.

pub mod stream;
pub mod udp;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::engine::{ClientId, Family, RelayKey, Secrets};
use super::filter::PeerFilter;

/// Data messages queued for a worker before more are dropped (the control messages of streams
/// are never dropped: a lost response over TCP is never retransmitted by the client).
pub const INBOX_DATA_LIMIT: usize = 8192;
/// How long a reserved port (EVEN-PORT with R) is held for its RESERVATION-TOKEN (RFC 8656 §7.2).
pub const RESERVATION_TTL: Duration = Duration::from_secs(30);
/// Ports held by reservations at most; past that, EVEN-PORT with R gets an even port and no
/// reservation (an allocate-and-delete loop cannot pile up held ports).
pub const MAX_RESERVATIONS: usize = 1024;

/// What reaches a worker from outside its own sockets.
pub enum Inbox {
    /// From one of our relay addresses to a relay port this worker owns (handed over in-process).
    /// `buf` holds the payload at `wire::HEADROOM..wire::HEADROOM + len`, with tail-room.
    PeerData {
        to: RelayKey,
        from: SocketAddr,
        buf: Vec<u8>,
        len: usize,
    },
    /// A stream connection now talks to this worker; frames to it go to `tx`.
    StreamOpen {
        client: ClientId,
        tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    },
    /// One frame of a stream connection, holding its share of the in-flight byte budget until
    /// the worker has handled it.
    StreamFrame {
        client: ClientId,
        frame: Vec<u8>,
        budget: tokio::sync::OwnedSemaphorePermit,
    },
    /// The stream connection closed.
    StreamClosed {
        client: ClientId,
    },
    /// A reload: new secrets, peer filter and limits.
    Reload(Arc<Reload>),
    Stop,
}

/// What a SIGHUP changes in the running TURN server.
#[derive(Debug, Clone)]
pub struct Reload {
    pub secrets: Secrets,
    pub filter: PeerFilter,
    pub max_allocation_lifetime: Duration,
    pub max_bps_per_allocation: u64,
}

impl Inbox {
    fn is_data(&self) -> bool {
        match self {
            Inbox::PeerData { .. } => true,
            // ChannelData (first bits 01) and Send indications (type 0x0016) may be dropped.
            Inbox::StreamFrame { frame, .. } => {
                frame.first().is_some_and(|b| b >> 6 == 1)
                    || frame.get(..2) == Some(&[0x00, 0x16][..])
            }
            _ => false,
        }
    }
}

/// A worker as the others see it.
pub struct WorkerHandle {
    tx: std::sync::mpsc::Sender<Inbox>,
    waker: Arc<mio::Waker>,
    /// Set while the worker waits in `poll`; a sender that finds it set wakes it.
    sleeping: AtomicBool,
    /// Data messages in the inbox (bounded by [`INBOX_DATA_LIMIT`]).
    queued: AtomicUsize,
}

impl WorkerHandle {
    /// Queues `msg`; data beyond the limit is dropped (`false`).
    pub fn send(&self, msg: Inbox) -> bool {
        let data = msg.is_data();
        if data {
            if self.queued.load(Ordering::Relaxed) >= INBOX_DATA_LIMIT {
                return false;
            }
            self.queued.fetch_add(1, Ordering::Relaxed);
        }
        if self.tx.send(msg).is_err() {
            return false;
        }
        if self.sleeping.swap(false, Ordering::AcqRel) {
            let _ = self.waker.wake();
        }
        true
    }
}

/// A port held for a RESERVATION-TOKEN: its socket waits here, read by nobody, until an
/// Allocate on any worker takes it or it expires.
pub struct Reserved {
    pub family: Family,
    pub port: u16,
    pub sock: std::net::UdpSocket,
    pub expires: Instant,
}

/// Where relay sockets are bound.
#[derive(Debug, Clone)]
pub struct RelayBinding {
    /// Bind address per family (`None`: that family is not relayed).
    pub bind_v4: Option<IpAddr>,
    pub bind_v6: Option<IpAddr>,
    /// Advertised relay IP per family (what peers see; the source of in-process hand-overs).
    pub advertised_v4: Option<IpAddr>,
    pub advertised_v6: Option<IpAddr>,
    pub ports: RangeInclusive<u16>,
}

impl RelayBinding {
    pub fn advertised(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => self.advertised_v4,
            Family::V6 => self.advertised_v6,
        }
    }

    pub fn bind_ip(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => self.bind_v4,
            Family::V6 => self.bind_v6,
        }
    }
}

/// What all workers and stream tasks share.
pub struct Shared {
    pub workers: Vec<WorkerHandle>,
    /// Owner of each relay port, per family: worker index + 1, 0 for none.
    owners: [Box<[AtomicU8]>; 2],
    pub reservations: Mutex<HashMap<[u8; 8], Reserved>>,
    pub binding: RelayBinding,
}

impl Shared {
    fn owners(&self, family: Family) -> &[AtomicU8] {
        match family {
            Family::V4 => &self.owners[0],
            Family::V6 => &self.owners[1],
        }
    }

    /// The worker that owns relay port `port` of `family`.
    pub fn owner(&self, family: Family, port: u16) -> Option<usize> {
        match self.owners(family)[port as usize].load(Ordering::Acquire) {
            0 => None,
            n => Some(n as usize - 1),
        }
    }

    pub fn set_owner(&self, family: Family, port: u16, worker: usize) {
        self.owners(family)[port as usize].store(worker as u8 + 1, Ordering::Release);
    }

    /// Clears the owner of `port` if it is still `worker` (called before the socket closes, so
    /// a worker that binds the port next cannot have its entry wiped).
    pub fn clear_owner(&self, family: Family, port: u16, worker: usize) {
        let _ = self.owners(family)[port as usize].compare_exchange(
            worker as u8 + 1,
            0,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    /// The worker a stream connection belongs to.
    pub fn worker_for_stream(&self, stream: u64) -> usize {
        (stream % self.workers.len() as u64) as usize
    }

    /// Drops reservations nobody took in time.
    pub fn sweep_reservations(&self, now: Instant) {
        self.reservations
            .lock()
            .expect("reservations lock")
            .retain(|_, r| r.expires > now);
    }
}

fn owner_table() -> Box<[AtomicU8]> {
    (0..=u16::MAX as usize).map(|_| AtomicU8::new(0)).collect()
}

/// Builds the shared state for `handles` (filled in by [`udp::spawn`]).
pub fn shared(workers: Vec<WorkerHandle>, binding: RelayBinding) -> Shared {
    Shared {
        workers,
        owners: [owner_table(), owner_table()],
        reservations: Mutex::new(HashMap::new()),
        binding,
    }
}

/// A random port of `range`; an even one when asked (`None` if the range has none).
pub fn random_port(range: &RangeInclusive<u16>, even: bool) -> Option<u16> {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("the OS random source is available");
    let r = u32::from_le_bytes(b);
    let (start, end) = (*range.start() as u32, *range.end() as u32);
    if even {
        let first = start + (start & 1);
        if first > end {
            return None;
        }
        let count = (end - first) / 2 + 1;
        Some((first + 2 * (r % count)) as u16)
    } else {
        Some((start + r % (end - start + 1)) as u16)
    }
}

/// Binds a UDP socket for a relay (IPv6 ones only IPv6: no mapped IPv4 peers on them).
pub fn bind_relay_socket(ip: IpAddr, port: u16) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr = SocketAddr::new(ip, port);
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

pub(crate) fn new_handle(
    tx: std::sync::mpsc::Sender<Inbox>,
    waker: Arc<mio::Waker>,
) -> WorkerHandle {
    WorkerHandle {
        tx,
        waker,
        sleeping: AtomicBool::new(false),
        queued: AtomicUsize::new(0),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn random_ports_stay_in_range_and_even_when_asked() {
        for _ in 0..2000 {
            let p = super::random_port(&(41_001..=41_004), true).unwrap();
            assert!(p == 41_002 || p == 41_004, "{p}");
            let p = super::random_port(&(7..=9), false).unwrap();
            assert!((7..=9).contains(&p));
        }
        assert_eq!(super::random_port(&(41_001..=41_001), true), None);
        assert_eq!(super::random_port(&(40_000..=40_000), true), Some(40_000));
    }
}

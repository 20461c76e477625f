//! TURN over TCP and TLS (RFC 8656 §3.1, §11.5): tokio tasks that frame a byte stream into
//! STUN messages and ChannelData (padded to 4 bytes) and hand each frame to the worker that owns
//! the connection, whose engine answers through a bounded channel back to the connection's
//! writer. The relay side of such an allocation is UDP, like every other.
//!
//! Bounded: at most [`MAX_STREAMS`] connections, [`MAX_STREAMS_PER_CLIENT`] from one address
//! (IPv6: one /64); a handshake gets [`HANDSHAKE_TIMEOUT`]; a connection without an allocation is
//! closed by its worker after 30 s, and one whose reader stops reading after [`WRITE_TIMEOUT`]
//! of a blocked write; one frame is at most a STUN message's maximum (64 KiB + header); frames
//! read but not yet handled by the workers hold at most [`INFLIGHT_BYTES`] in all — a
//! connection waits (and stops reading) until its frames are handled, so a stranger who sends
//! faster than the workers answer grows nothing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{Inbox, Shared};
use crate::turn::engine::wire::stream_frame_len;
use crate::turn::engine::{ClientId, Transport};
use crate::turn::filter::canonical;

/// Stream connections served at once.
pub const MAX_STREAMS: usize = 10_000;
/// Stream connections from one client address (IPv6: one /64) at once.
pub const MAX_STREAMS_PER_CLIENT: u32 = 64;
/// Bytes of frames read from all connections and not yet handled by a worker.
pub const INFLIGHT_BYTES: usize = 32 << 20;
/// A write blocked this long (the client stopped reading) ends the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// A TLS client that has not finished its handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued for one connection's writer before more are dropped.
const OUT_QUEUE: usize = 512;
/// Bytes coalesced into one write.
const WRITE_BATCH: usize = 64 * 1024;

/// What the stream listeners share.
pub struct StreamHub {
    shared: Arc<Shared>,
    next: AtomicU64,
    permits: Arc<Semaphore>,
    inflight: Arc<Semaphore>,
    per_client: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

/// A connection's place in the per-client count, given back when it ends.
struct ClientSlot<'a> {
    hub: &'a StreamHub,
    key: String,
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        let mut m = self.hub.per_client.lock().expect("per-client lock");
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

impl StreamHub {
    pub fn new(shared: Arc<Shared>) -> Arc<Self> {
        Arc::new(Self {
            shared,
            next: AtomicU64::new(1),
            permits: Arc::new(Semaphore::new(MAX_STREAMS)),
            inflight: Arc::new(Semaphore::new(INFLIGHT_BYTES)),
            per_client: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    fn client_slot(&self, peer: SocketAddr) -> Option<ClientSlot<'_>> {
        let key = crate::auth::throttle::address_key(peer.ip());
        let mut m = self.per_client.lock().expect("per-client lock");
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= MAX_STREAMS_PER_CLIENT {
            return None;
        }
        *n += 1;
        Some(ClientSlot { hub: self, key })
    }

    /// Serves one TURN connection until it closes. `prefix` holds bytes already read from it
    /// (the 443 demux peeks at the first ones).
    pub async fn serve<S>(
        self: Arc<Self>,
        io: S,
        peer: SocketAddr,
        local: SocketAddr,
        transport: Transport,
        prefix: Vec<u8>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Ok(_permit) = self.permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "TURN stream refused: too many connections");
            return;
        };
        let Some(_slot) = self.client_slot(peer) else {
            tracing::debug!(%peer, "TURN stream refused: too many connections from this client");
            return;
        };
        let stream = self.next.fetch_add(1, Ordering::Relaxed);
        let client = ClientId {
            transport,
            src: SocketAddr::new(canonical(peer.ip()), peer.port()),
            local: SocketAddr::new(canonical(local.ip()), local.port()),
            stream,
        };
        let worker = &self.shared.workers[self.shared.worker_for_stream(stream)];
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(OUT_QUEUE);
        worker.send(Inbox::StreamOpen { client, tx });
        let (mut reader, mut writer) = tokio::io::split(io);
        // Over TCP what is queued goes out in one write; over TLS each frame is a record of its
        // own (clients such as coturn's read one message per record), flushed together.
        let one_record_each = transport == Transport::Tls;
        let write = async move {
            let mut batch = Vec::with_capacity(4096);
            while let Some(frame) = rx.recv().await {
                batch.clear();
                let mut frames = vec![frame];
                while batch.len() < WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(more) if one_record_each => frames.push(more),
                        Ok(more) => batch.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                let written = tokio::time::timeout(WRITE_TIMEOUT, async {
                    if one_record_each {
                        for f in &frames {
                            writer.write_all(f).await?;
                        }
                    } else {
                        writer.write_all(&frames[0]).await?;
                        writer.write_all(&batch).await?;
                    }
                    // Flushed every time: TLS keeps written records until flushed.
                    writer.flush().await
                })
                .await;
                if !matches!(written, Ok(Ok(()))) {
                    return; // failed, or the client stopped reading
                }
            }
            // The worker let go of the connection (no allocation, or it ended).
            let _ = writer.shutdown().await;
        };
        let read = async {
            let mut buf = prefix;
            let mut chunk = vec![0u8; 16 * 1024];
            loop {
                // Every whole frame in the buffer goes to the worker.
                loop {
                    match stream_frame_len(&buf) {
                        Err(()) => return, // not TURN: close
                        Ok(Some(n)) if buf.len() >= n => {
                            let rest = buf.split_off(n);
                            let frame = std::mem::replace(&mut buf, rest);
                            // Waits while the workers are behind: this connection stops
                            // reading, and TCP tells the client to slow down.
                            let Ok(budget) = self
                                .inflight
                                .clone()
                                .acquire_many_owned(frame.len() as u32)
                                .await
                            else {
                                return;
                            };
                            worker.send(Inbox::StreamFrame {
                                client,
                                frame,
                                budget,
                            });
                        }
                        Ok(_) => break,
                    }
                }
                match reader.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        };
        tokio::select! {
            _ = write => {}
            _ = read => {}
        }
        worker.send(Inbox::StreamClosed { client });
    }
}

/// Accepts TURN over TCP on `listener` until `stop`.
pub async fn listen_tcp(listener: TcpListener, hub: Arc<StreamHub>, stop: CancellationToken) {
    let local = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "TURN TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().ok().or(local).unwrap_or(peer);
        tokio::spawn(
            hub.clone()
                .serve(tcp, peer, local, Transport::Tcp, Vec::new()),
        );
    }
}

/// Accepts TURN over TLS on `listener` until `stop`, with the certificate `tls` holds now.
pub async fn listen_tls(
    listener: TcpListener,
    hub: Arc<StreamHub>,
    tls: crate::tls::TlsReloader,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "TURN TLS accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let Ok(local) = tcp.local_addr() else {
            continue;
        };
        let acceptor = tls.acceptor();
        let hub = hub.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    hub.serve(stream, peer, local, Transport::Tls, Vec::new())
                        .await
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TURN TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TURN TLS handshake timed out"),
            }
        });
    }
}

//! TURN over TCP and TLS (RFC 8656 §3.1, §11.5): tokio tasks that frame a byte stream into
//! STUN messages and ChannelData (padded to 4 bytes) and hand each frame to the worker that owns
//! the connection, whose engine answers through a bounded channel back to the connection's
//! writer. The relay side of such an allocation is UDP, like every other.
//!
//! Bounded: at most [`MAX_STREAMS`] connections; a handshake gets [`HANDSHAKE_TIMEOUT`]; a
//! connection without an allocation is closed by its worker after 30 s; one frame is at most a
//! STUN message's maximum (64 KiB + header).

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
}

impl StreamHub {
    pub fn new(shared: Arc<Shared>) -> Arc<Self> {
        Arc::new(Self {
            shared,
            next: AtomicU64::new(1),
            permits: Arc::new(Semaphore::new(MAX_STREAMS)),
        })
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
                let mut written = true;
                if one_record_each {
                    written &= writer.write_all(&frame).await.is_ok();
                } else {
                    batch.extend_from_slice(&frame);
                }
                while batch.len() < WRITE_BATCH && written {
                    match rx.try_recv() {
                        Ok(more) if one_record_each => {
                            written &= writer.write_all(&more).await.is_ok()
                        }
                        Ok(more) => batch.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                if !batch.is_empty() {
                    written &= writer.write_all(&batch).await.is_ok();
                }
                // Flushed every time: TLS keeps written records until flushed.
                if !written || writer.flush().await.is_err() {
                    return;
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
                            worker.send(Inbox::StreamFrame { client, frame });
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

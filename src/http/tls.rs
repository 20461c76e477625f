//! Optional TLS on the HTTP listener (rustls, PEM files; see [`crate::tls`]), reloadable, and
//! shared with TURN over TLS. Handshakes run in their own tasks so one slow client cannot hold up
//! accepting others.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::server::Acceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

use crate::turn::engine::Transport;
use crate::turn::io::stream::StreamHub;

pub use crate::tls::{load, TlsError, TlsReloader};

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Completed handshakes waiting for the server to take them.
const ACCEPT_QUEUE: usize = 256;

/// A TCP listener that yields TLS streams for `axum::serve`, and hands TURN-over-TLS clients to
/// the TURN server when it shares this port (`turn.share_https`, PROTOCOL §6): a client whose
/// ClientHello asks for `http/1.1` or `h2` (ALPN) is the web app's; one asking for `stun.turn` is
/// TURN's; one asking for nothing (browsers' `turns:` URLs, but also some HTTP clients) is told
/// apart by its first bytes after the handshake: a STUN message (RFC 8489 magic cookie) is TURN,
/// anything else HTTP.
pub struct TlsListener {
    rx: mpsc::Receiver<(Prefixed<TlsStream<TcpStream>>, SocketAddr)>,
    local: SocketAddr,
    turn: Arc<OnceLock<Arc<StreamHub>>>,
}

/// Where a TLS client goes, from its ClientHello's ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Http,
    Turn,
    /// No ALPN: decided by the first bytes.
    Sniff,
}

/// `stun.turn` decides first: no HTTP client offers it, while TURN clients may offer it beside
/// `http/1.1` (coturn's offers `http/1.1`, `stun.turn`, `stun.nat-discovery`).
fn route(alpn: &[Vec<u8>], turn: bool) -> Route {
    if !turn {
        Route::Http
    } else if alpn.iter().any(|p| p == crate::tls::ALPN_TURN) {
        Route::Turn
    } else if alpn.is_empty() {
        Route::Sniff
    } else {
        Route::Http
    }
}

/// Whether the first bytes of a connection are a STUN message (a TURN client's first words).
fn looks_like_stun(b: &[u8]) -> bool {
    b.len() >= 8 && b[0] >> 6 == 0 && b[4..8] == [0x21, 0x12, 0xA4, 0x42]
}

/// `config` offering `alpn` instead of its own protocols.
fn with_alpn(config: &Arc<ServerConfig>, alpn: &[&[u8]]) -> Arc<ServerConfig> {
    let mut c = (**config).clone();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

impl TlsListener {
    pub fn new(tcp: TcpListener, tls: TlsReloader) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let turn: Arc<OnceLock<Arc<StreamHub>>> = Arc::new(OnceLock::new());
        let turn_slot = turn.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = tcp.accept() => a,
                    // The server is gone: stop accepting and release the port.
                    _ = tx.closed() => return,
                };
                let (stream, addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let config = tls.current();
                let tx = tx.clone();
                let turn = turn_slot.get().cloned();
                tokio::spawn(async move {
                    let done = tokio::time::timeout(
                        HANDSHAKE_TIMEOUT,
                        accept(stream, addr, local, config, turn, tx),
                    )
                    .await;
                    if done.is_err() {
                        tracing::debug!("TLS handshake timed out");
                    }
                });
            }
        });
        Ok(Self { rx, local, turn })
    }

    /// From now on TURN-over-TLS clients on this port go to `hub`.
    pub fn share_with_turn(&self, hub: Arc<StreamHub>) {
        let _ = self.turn.set(hub);
    }
}

/// One connection: the handshake, then HTTP or TURN. Bounded by the caller's timeout up to the
/// point where the connection is handed over.
async fn accept(
    stream: TcpStream,
    addr: SocketAddr,
    local: SocketAddr,
    config: Arc<ServerConfig>,
    turn: Option<Arc<StreamHub>>,
    tx: mpsc::Sender<(Prefixed<TlsStream<TcpStream>>, SocketAddr)>,
) {
    let start = match LazyConfigAcceptor::new(Acceptor::default(), stream).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            return;
        }
    };
    let alpn: Vec<Vec<u8>> = start
        .client_hello()
        .alpn()
        .map(|it| it.map(|p| p.to_vec()).collect())
        .unwrap_or_default();
    let route = route(&alpn, turn.is_some());
    tracing::trace!(%addr, ?route, alpn = ?alpn.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect::<Vec<_>>(), "TLS client");
    let config = match route {
        Route::Http => config,
        Route::Turn => with_alpn(&config, &[crate::tls::ALPN_TURN]),
        Route::Sniff => with_alpn(&config, &[]),
    };
    let mut tls = match start.into_stream(config).await {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(error = %e, ?route, "TLS handshake failed");
            return;
        }
    };
    let mut prefix = Vec::new();
    let is_turn = match route {
        Route::Http => false,
        Route::Turn => true,
        Route::Sniff => {
            let mut chunk = [0u8; 8];
            while prefix.len() < 8 {
                match tls.read(&mut chunk[..8 - prefix.len()]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => prefix.extend_from_slice(&chunk[..n]),
                }
                if prefix.first().is_some_and(|b| b >> 6 != 0) {
                    break; // not STUN: no need to wait for more
                }
            }
            looks_like_stun(&prefix)
        }
    };
    match turn {
        Some(hub) if is_turn => {
            // Served in a task of its own, past the handshake timeout.
            tokio::spawn(hub.serve(tls, addr, local, Transport::Tls, prefix));
        }
        _ => {
            let _ = tx.send((Prefixed::new(prefix, tls), addr)).await;
        }
    }
}

/// A stream with bytes already read from it put back in front.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = Prefixed<TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept loop ended (it only does when this listener is dropped).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_alpn() {
        let v = |l: &[&[u8]]| l.iter().map(|p| p.to_vec()).collect::<Vec<_>>();
        assert_eq!(route(&v(&[b"h2", b"http/1.1"]), true), Route::Http);
        assert_eq!(route(&v(&[b"stun.turn"]), true), Route::Turn);
        assert_eq!(
            route(
                &v(&[b"http/1.1", b"stun.turn", b"stun.nat-discovery"]),
                true
            ),
            Route::Turn,
            "coturn's client"
        );
        assert_eq!(route(&v(&[]), true), Route::Sniff);
        assert_eq!(route(&v(&[b"acme-tls/1"]), true), Route::Http);
        assert_eq!(
            route(&v(&[b"stun.turn"]), false),
            Route::Http,
            "no TURN here"
        );
        assert!(looks_like_stun(&[0, 1, 0, 0, 0x21, 0x12, 0xA4, 0x42]));
        assert!(!looks_like_stun(b"GET / HT"));
    }
}

//! A local UDP socket in front of a TURN server's TCP or TLS port. TURN clients that speak only
//! UDP (the webrtc-rs ICE agent, the `turn` crate's client) are pointed at it; each local client
//! gets a stream connection of its own, and datagrams become stream frames (ChannelData padded to
//! 4 bytes, RFC 8656 §11.5) and back. So the allocation, the relay address and every byte really
//! go through the server's TCP or TLS listener.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_rustls::rustls;

use crate::turn::engine::wire::{padded, stream_frame_len, CHANNEL_HEADER};

/// How the bridge reaches the server.
#[derive(Clone)]
pub enum Dial {
    Tcp(SocketAddr),
    Tls {
        addr: SocketAddr,
        name: rustls::pki_types::ServerName<'static>,
        config: Arc<rustls::ClientConfig>,
    },
}

/// Why a stream to the server could not be opened, in plain words.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DialError {
    #[error("{0} is closed (connection refused)")]
    Refused(SocketAddr),
    #[error("no answer from {0} within {1:?} (a firewall drops it?)")]
    Timeout(SocketAddr, Duration),
    #[error("cannot reach {0}: {1}")]
    Io(SocketAddr, String),
    #[error("TLS name mismatch: the certificate of {0} is not valid for `{1}`")]
    NameMismatch(SocketAddr, String),
    #[error("the certificate of {0} is not trusted ({1}); pass --ca-file for a private CA")]
    Untrusted(SocketAddr, String),
    #[error("TLS handshake with {0} failed: {1}")]
    Tls(SocketAddr, String),
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl Dial {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Dial::Tcp(a) | Dial::Tls { addr: a, .. } => *a,
        }
    }

    async fn connect(&self) -> Result<Box<dyn Stream>, DialError> {
        let addr = self.addr();
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Err(_) => return Err(DialError::Timeout(addr, CONNECT_TIMEOUT)),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(DialError::Refused(addr))
            }
            Ok(Err(e)) => return Err(DialError::Io(addr, e.to_string())),
            Ok(Ok(t)) => t,
        };
        let _ = tcp.set_nodelay(true);
        match self {
            Dial::Tcp(_) => Ok(Box::new(tcp)),
            Dial::Tls { name, config, .. } => {
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let handshake = connector.connect(name.clone(), tcp);
                match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
                    Err(_) => Err(DialError::Timeout(addr, CONNECT_TIMEOUT)),
                    Ok(Ok(s)) => Ok(Box::new(s)),
                    Ok(Err(e)) => Err(tls_error(addr, name, e)),
                }
            }
        }
    }
}

fn tls_error(
    addr: SocketAddr,
    name: &rustls::pki_types::ServerName<'static>,
    e: std::io::Error,
) -> DialError {
    let inner = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .cloned();
    match inner {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
        | Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForNameContext { .. },
        )) => DialError::NameMismatch(addr, name.to_str().into_owned()),
        Some(rustls::Error::InvalidCertificate(c)) => DialError::Untrusted(addr, format!("{c:?}")),
        _ => DialError::Tls(addr, e.to_string()),
    }
}

/// A running bridge: point UDP TURN clients at [`Bridge::local`].
pub struct Bridge {
    pub local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Bridge {
    /// Opens one stream first, so a port that is closed or a certificate that is wrong shows
    /// here, before anything else runs through the bridge.
    pub async fn start(dial: Dial) -> Result<Bridge, DialError> {
        drop(dial.connect().await?);
        let sock = Arc::new(
            UdpSocket::bind("127.0.0.1:0")
                .await
                .map_err(|e| DialError::Io(dial.addr(), e.to_string()))?,
        );
        let local = sock
            .local_addr()
            .map_err(|e| DialError::Io(dial.addr(), e.to_string()))?;
        let task = tokio::spawn(run(sock, dial));
        Ok(Bridge { local, task })
    }
}

async fn run(sock: Arc<UdpSocket>, dial: Dial) {
    let mut streams: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            return;
        };
        let datagram = buf[..n].to_vec();
        if let Some(tx) = streams.get(&from) {
            if tx.send(datagram).await.is_ok() {
                continue;
            }
            streams.remove(&from);
            continue;
        }
        let (tx, rx) = mpsc::channel(1024);
        let _ = tx.send(datagram).await;
        streams.insert(from, tx);
        let (sock, dial) = (sock.clone(), dial.clone());
        tokio::spawn(async move {
            if let Ok(stream) = dial.connect().await {
                serve(stream, rx, sock, from).await;
            }
        });
    }
}

/// One local client's stream: datagrams out as frames, frames back as datagrams.
async fn serve(
    stream: Box<dyn Stream>,
    mut rx: mpsc::Receiver<Vec<u8>>,
    sock: Arc<UdpSocket>,
    client: SocketAddr,
) {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let up = async move {
        while let Some(mut d) = rx.recv().await {
            // ChannelData is padded to 4 bytes on streams; STUN messages already are.
            if d.first().is_some_and(|b| b >> 6 == 1) {
                d.resize(padded(d.len()), 0);
            }
            if writer.write_all(&d).await.is_err() || writer.flush().await.is_err() {
                return;
            }
        }
    };
    let down = async move {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            loop {
                match stream_frame_len(&buf) {
                    Err(()) => return,
                    Ok(Some(n)) if buf.len() >= n => {
                        let rest = buf.split_off(n);
                        let mut frame = std::mem::replace(&mut buf, rest);
                        if frame[0] >> 6 == 1 {
                            // Without the padding: a datagram is exactly the ChannelData.
                            let len = u16::from_be_bytes([frame[2], frame[3]]) as usize;
                            frame.truncate(CHANNEL_HEADER + len);
                        }
                        let _ = sock.send_to(&frame, client).await;
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
        _ = up => {}
        _ = down => {}
    }
}

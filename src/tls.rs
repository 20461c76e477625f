//! TLS configuration from PEM files (rustls), reloadable: a SIGHUP swaps the certificate for new
//! handshakes while established connections keep theirs. Used by the HTTPS listener and by TURN
//! over TLS; no network I/O here.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// ALPN of the HTTP listener (axum serves HTTP/1.1).
pub const ALPN_HTTP: &[&[u8]] = &[b"http/1.1"];
/// ALPN of TURN over TLS (RFC 7443).
pub const ALPN_TURN: &[u8] = b"stun.turn";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("the key does not fit the certificate or is unsupported: {0}")]
    Config(String),
}

/// Builds a rustls server config for HTTPS from PEM files (certificate chain, private key).
pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    load_with_alpn(cert, key, ALPN_HTTP)
}

/// Builds a rustls server config from PEM files offering the given ALPN protocols.
pub fn load_with_alpn(
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |path: &Path, e: &dyn std::fmt::Display| TlsError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| read(cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| read(cert, &e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| read(key, &e))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The current certificate, swapped on reload.
#[derive(Clone)]
pub struct TlsReloader {
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl TlsReloader {
    pub fn new(config: Arc<ServerConfig>) -> Self {
        Self {
            current: Arc::new(RwLock::new(config)),
        }
    }

    /// The configuration new handshakes get.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().expect("tls lock").clone()
    }

    /// Serves `config` to new handshakes from now on.
    pub fn set(&self, config: Arc<ServerConfig>) {
        *self.current.write().expect("tls lock") = config;
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().expect("tls lock").clone())
    }
}

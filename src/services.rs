//! What every request handler and connection shares: the config, accounts, store, node, calls
//! and the TURN server's handle. Built by `app` (the composition root), passed to `client`,
//! `http` and every transport; listeners and certificate reloaders stay in `app`.
//!
//! Must not import a transport or `app`.
#![allow(clippy::disallowed_methods)] // mints TURN credentials at the current time

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Accounts;
use crate::calls::actor::Calls;
use crate::config::Config;
use crate::hub::node::Node;
use crate::store::Store;
use crate::wire::close::{self, CloseCode};
use crate::wire::models::IceServer;

pub struct Services {
    pub config: Arc<Config>,
    pub accounts: Arc<Accounts>,
    pub store: Arc<dyn Store>,
    pub node: Arc<Node>,
    pub calls: Calls,
    /// The embedded TURN server's shared state and what REST hands out; `None` when disabled.
    pub turn: Option<TurnInfo>,
    /// Cancelled when the process is going away.
    pub shutdown: CancellationToken,
    /// Live connections, awaited on shutdown.
    pub tracker: TaskTracker,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Set when the process is stopping for good (SIGINT): sockets get 1001 instead of 1012
    /// and calls end with `server_shutdown`.
    going_away: AtomicBool,
}

/// What the REST API and the connections need of the running TURN server.
pub struct TurnInfo {
    pub handle: Arc<crate::turn::TurnHandle>,
    pub ice: crate::turn::IceConfig,
    /// Where `/readyz` sends its STUN probe (the listener, via loopback when it binds 0.0.0.0).
    pub probe_addr: SocketAddr,
}

impl TurnInfo {
    /// `iceServers` and the credential in them, minted now with the current secret.
    pub fn mint(
        &self,
        user_id: &str,
        host: &str,
    ) -> (Vec<IceServer>, crate::auth::turn_rest::TurnCredential) {
        let secret = self.handle.current_secret();
        self.ice
            .ice_servers(&secret, user_id, host, crate::time::now_ms() / 1000)
    }
}

impl Services {
    #[allow(clippy::too_many_arguments)] // one field each; built in one place (`app`)
    pub fn new(
        config: Arc<Config>,
        accounts: Arc<Accounts>,
        store: Arc<dyn Store>,
        node: Arc<Node>,
        calls: Calls,
        turn: Option<TurnInfo>,
        shutdown: CancellationToken,
        metrics: metrics_exporter_prometheus::PrometheusHandle,
    ) -> Self {
        Self {
            config,
            accounts,
            store,
            node,
            calls,
            turn,
            shutdown,
            tracker: TaskTracker::new(),
            metrics,
            going_away: AtomicBool::new(false),
        }
    }

    /// `(iceServers, expiresAt)` (unix seconds) for `user_id`, reached through `host` (the HTTP
    /// Host header). Empty when TURN is disabled.
    pub fn ice_servers(&self, user_id: &str, host: &str) -> (Vec<IceServer>, Option<i64>) {
        match &self.turn {
            None => (Vec::new(), None),
            Some(t) => {
                let (servers, cred) = t.mint(user_id, host);
                (servers, Some(cred.expires_at))
            }
        }
    }

    /// The close code for connections when the server stops.
    pub fn shutdown_close_code(&self) -> CloseCode {
        if self.going_away.load(Ordering::Relaxed) {
            close::GOING_AWAY
        } else {
            close::RESTARTING
        }
    }

    /// Stop for good: end every call with `server_shutdown`, then shut down.
    pub async fn go_away(&self) {
        self.going_away.store(true, Ordering::Relaxed);
        self.calls.end_all().await;
        self.shutdown.cancel();
    }

    /// Why this node cannot serve now, if it cannot: shutting down, the store or the TURN
    /// listener not answering (`/readyz`).
    pub async fn unready(&self) -> Option<&'static str> {
        if self.shutdown.is_cancelled() {
            return Some("shutting down");
        }
        match tokio::time::timeout(std::time::Duration::from_secs(2), self.store.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readiness: store failed");
                return Some("store unavailable");
            }
            Err(_) => return Some("store timeout"),
        }
        if let Some(reason) = self.node.cluster_unready() {
            return Some(reason);
        }
        if let Some(turn) = &self.turn {
            if !crate::turn::answers_stun(turn.probe_addr).await {
                return Some("turn listener does not answer");
            }
        }
        None
    }
}

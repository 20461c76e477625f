//! Composition root: builds the store, broker, hub, node, calls, TURN server and router,
//! serves them on the listeners it is given, and owns shutdown and reload. Tests call
//! [`spawn`] with a listener bound to port 0.
//!
//! Nothing imports this module but `main` (and tests): what handlers share is
//! [`crate::services::Services`].

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::jwt::JwtKeys;
use crate::auth::Accounts;
use crate::calls::actor::Calls;
use crate::config::Config;
use crate::hub::node::Node;
use crate::hub::presence::Presence;
use crate::hub::{Hub, MemoryBroker, NodeId};
use crate::services::{Services, TurnInfo};
use crate::store::Store;

/// How long shutdown waits for sessions to say goodbye and finish their writes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The running process as `main` sees it: the services, and what only a reload touches.
pub struct App {
    pub services: Arc<Services>,
    /// The HTTP listener's certificate, when TLS is on.
    http_tls: Option<crate::tls::TlsReloader>,
    /// The certificate of TURN over TLS, when `turn.listen_tls` is on.
    turn_tls: Option<crate::tls::TlsReloader>,
}

/// Keys a SIGHUP applies to the running process; every other change needs a restart.
pub const RELOADABLE: &[&str] = &[
    "log.level",
    "http.tls_cert_file",
    "http.tls_key_file",
    "turn.secret",
    "turn.secret_file",
    "turn.previous_secret",
    "turn.previous_secret_file",
    "turn.allow_peers",
    "turn.deny_peers",
    "turn.user_quota",
    "turn.total_quota",
    "turn.max_allocation_lifetime",
    "turn.max_bps_per_allocation",
    "turn.tls_cert_file",
    "turn.tls_key_file",
];

/// `section.key` paths whose values differ between two configs.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (
        serde_json::to_value(old).expect("config serialises"),
        serde_json::to_value(new).expect("config serialises"),
    );
    let mut out = Vec::new();
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return out;
    };
    for (section, va) in a {
        let vb = &b[section];
        match (va.as_object(), vb.as_object()) {
            (Some(ka), Some(kb)) => {
                for (key, x) in ka {
                    if kb.get(key) != Some(x) {
                        out.push(format!("{section}.{key}"));
                    }
                }
            }
            _ if va != vb => out.push(section.clone()),
            _ => {}
        }
    }
    out
}

impl App {
    /// Cancelled when the process is going away.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.services.shutdown
    }

    /// Stop for good: end every call with `server_shutdown`, then shut down.
    pub async fn go_away(&self) {
        self.services.go_away().await;
    }

    /// Applies what can change without a restart (see [`RELOADABLE`]) from `new`, a config
    /// that passed validation with its secrets resolved. Everything is prepared first and
    /// swapped only when all of it worked, so a failed reload changes nothing. Returns the keys
    /// that changed but need a restart.
    pub fn reload(&self, new: &Config) -> anyhow::Result<Vec<String>> {
        let tls = match (
            &self.http_tls,
            &new.http.tls_cert_file,
            &new.http.tls_key_file,
        ) {
            (Some(_), Some(cert), Some(key)) => Some(crate::tls::load(cert, key)?),
            _ => None,
        };
        let turn = match &self.services.turn {
            Some(t) if new.turn.enabled => {
                let current = secret_or_generate(&new.turn.secret, &new.data_dir, "turn_secret")?;
                let limits = crate::turn::Limits::from_config(&new.turn);
                let tls = match (&self.turn_tls, new.turn.tls_pair(&new.http)) {
                    (Some(_), Some((cert, key))) => Some(crate::tls::load_with_alpn(
                        cert,
                        key,
                        &[crate::tls::ALPN_TURN],
                    )?),
                    _ => None,
                };
                Some((t, current, limits, tls))
            }
            _ => None,
        };
        if let (Some(reloader), Some(config)) = (&self.http_tls, tls) {
            reloader.set(config);
        }
        if let Some((t, current, limits, tls)) = turn {
            let old = t.handle.secrets();
            // A rotated secret keeps the old one valid, unless a previous one is configured.
            let previous = if !new.turn.previous_secret.is_empty() {
                Some(new.turn.previous_secret.clone())
            } else if old.current != current {
                Some(old.current.clone())
            } else {
                old.previous.clone()
            };
            t.handle
                .reload(crate::turn::engine::Secrets { current, previous }, &limits);
            if let (Some(reloader), Some(config)) = (&self.turn_tls, tls) {
                reloader.set(config);
            }
        }
        Ok(changed_keys(&self.services.config, new)
            .into_iter()
            .filter(|k| !RELOADABLE.contains(&k.as_str()))
            .collect())
    }
}

/// Reads a secret from the config or from `data_dir/<name>`, generating it there on first start.
fn secret_or_generate(configured: &str, data_dir: &Path, name: &str) -> anyhow::Result<String> {
    if !configured.is_empty() {
        return Ok(configured.to_owned());
    }
    let path = data_dir.join(name);
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let existing = existing.trim().to_owned();
        if !existing.is_empty() {
            return Ok(existing);
        }
    }
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("random source: {e}"))?;
    let secret = base64::Engine::encode(&base64::engine::general_purpose::STANDARD_NO_PAD, raw);
    write_private(&path, &secret).with_context(|| format!("cannot write {}", path.display()))?;
    tracing::info!(file = %path.display(), "generated a new secret");
    Ok(secret)
}

/// Creates the data directory (and missing parents) readable by this user only: it holds the
/// database and the secrets. An existing directory is left as the admin made it, with a warning
/// when others can read it.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        } else if std::fs::metadata(dir)?.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                dir = %dir.display(),
                "the data directory is accessible to other users; consider chmod 700"
            );
        }
        Ok(())
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir)
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

fn build_keys(config: &Config, jwt_secret: &str) -> anyhow::Result<JwtKeys> {
    let keys = JwtKeys::new(jwt_secret.as_bytes());
    let auth = &config.auth;
    if auth.issuer.is_empty() {
        return Ok(keys);
    }
    if let Some(path) = &auth.jwt_public_key_file {
        let pem = std::fs::read(path)
            .with_context(|| format!("auth.jwt_public_key_file: cannot read {}", path.display()))?;
        Ok(keys
            .with_external_pem(&auth.issuer, &auth.audience, &pem)
            .context("auth.jwt_public_key_file")?)
    } else {
        Ok(keys.with_external_secret(&auth.issuer, &auth.audience, auth.issuer_secret.as_bytes()))
    }
}

/// A running app: its address and the handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    /// The TURN server's UDP address, when enabled.
    pub turn_addr: Option<SocketAddr>,
    /// All of the TURN server's addresses, when enabled.
    pub turn: Option<crate::turn::Addresses>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Asks the app to stop and waits until it has.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await.context("app task panicked")?
    }
}

/// Prepares everything that can fail at start (data dir, secrets, store), then serves on
/// `listener` in a background task until `shutdown`.
pub async fn spawn(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let addr = listener.local_addr()?;
    let serve = prepare(config, shutdown.clone()).await?;
    let turn_addr = serve.turn_addr();
    let turn = serve.turn_addresses();
    let task = tokio::spawn(serve.run(listener));
    Ok(Running {
        addr,
        turn_addr,
        turn,
        shutdown,
        task,
    })
}

/// [`spawn`] behind HTTPS with `http.tls_cert_file`/`http.tls_key_file` (TURN over TLS may share
/// the port).
pub async fn spawn_https(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let (Some(cert), Some(key)) = (&config.http.tls_cert_file, &config.http.tls_key_file) else {
        anyhow::bail!("spawn_https needs http.tls_cert_file and http.tls_key_file");
    };
    let tls = crate::tls::TlsReloader::new(crate::tls::load(cert, key)?);
    let addr = listener.local_addr()?;
    let listener = crate::http::tls::TlsListener::new(listener, tls.clone())?;
    let serve = prepare_with_tls(config, shutdown.clone(), Some(tls), Some(addr.port())).await?;
    let turn_addr = serve.turn_addr();
    let turn = serve.turn_addresses();
    let task = tokio::spawn(serve.run(HttpListener::Tls(listener)));
    Ok(Running {
        addr,
        turn_addr,
        turn,
        shutdown,
        task,
    })
}

/// The bound HTTP listener: plain TCP, or TLS.
pub enum HttpListener {
    Plain(TcpListener),
    Tls(crate::http::tls::TlsListener),
}

impl HttpListener {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            HttpListener::Plain(l) => l.local_addr(),
            HttpListener::Tls(l) => axum::serve::Listener::local_addr(l),
        }
    }
}

impl From<TcpListener> for HttpListener {
    fn from(l: TcpListener) -> Self {
        HttpListener::Plain(l)
    }
}

/// Binds `http.listen`, with TLS when `http.tls_cert_file`/`http.tls_key_file` are set.
pub async fn bind_http(
    config: &Config,
) -> anyhow::Result<(HttpListener, Option<crate::tls::TlsReloader>)> {
    let tcp = TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("http.listen {}", config.http.listen))?;
    match (&config.http.tls_cert_file, &config.http.tls_key_file) {
        (Some(cert), Some(key)) => {
            let tls = crate::tls::TlsReloader::new(
                crate::tls::load(cert, key).context("http.tls_cert_file")?,
            );
            let listener = crate::http::tls::TlsListener::new(tcp, tls.clone())?;
            Ok((HttpListener::Tls(listener), Some(tls)))
        }
        _ => Ok((HttpListener::Plain(tcp), None)),
    }
}

/// Everything built and opened, not yet serving.
pub struct Prepared {
    app: Arc<App>,
    store: Arc<dyn Store>,
    deliveries_stop: CancellationToken,
    background: Vec<tokio::task::JoinHandle<()>>,
    calls_task: tokio::task::JoinHandle<()>,
    /// Call records being written.
    records: TaskTracker,
    turn_server: Option<crate::turn::TurnServer>,
    metrics_listener: Option<TcpListener>,
}

pub async fn prepare(config: Config, shutdown: CancellationToken) -> anyhow::Result<Prepared> {
    prepare_with_tls(config, shutdown, None, None).await
}

/// [`prepare`] for an HTTP listener that serves TLS with `tls` on port `https` (TURN over TLS
/// may share it).
pub async fn prepare_with_tls(
    mut config: Config,
    shutdown: CancellationToken,
    tls: Option<crate::tls::TlsReloader>,
    https: Option<u16>,
) -> anyhow::Result<Prepared> {
    config.resolve_secrets()?;
    create_private_dir(&config.data_dir)
        .with_context(|| format!("data_dir: cannot create {}", config.data_dir.display()))?;
    let jwt_secret = secret_or_generate(&config.auth.jwt_secret, &config.data_dir, "jwt_secret")?;
    let metrics_listener = match config.http.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("http.metrics_listen {addr}"))?,
        ),
        None => None,
    };
    let turn_tls = match (
        config.turn.enabled && config.turn.listen_tls.is_some(),
        config.turn.tls_pair(&config.http),
    ) {
        (true, Some((cert, key))) => Some(crate::tls::TlsReloader::new(
            crate::tls::load_with_alpn(cert, key, &[crate::tls::ALPN_TURN])
                .context("turn.tls_cert_file")?,
        )),
        _ => None,
    };
    let turn_server = if config.turn.enabled {
        let secret = secret_or_generate(&config.turn.secret, &config.data_dir, "turn_secret")?;
        Some(crate::turn::TurnServer::start(&config.turn, secret, turn_tls.clone()).await?)
    } else {
        None
    };
    // TURN over TLS shares the HTTPS port when both are on.
    let share_https = https.filter(|_| config.turn.share_https);
    let turn = turn_server.as_ref().map(|t| {
        let a = &t.handle.addresses;
        TurnInfo {
            probe_addr: match a.udp.ip() {
                ip if ip.is_unspecified() && ip.is_ipv4() => {
                    SocketAddr::from(([127, 0, 0, 1], a.udp.port()))
                }
                ip if ip.is_unspecified() => {
                    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.udp.port()))
                }
                _ => a.udp,
            },
            handle: t.handle.clone(),
            ice: crate::turn::IceConfig {
                public_host: config.turn.public_host.clone(),
                udp_port: a.udp.port(),
                tcp_port: a.tcp.map(|t| t.port()),
                tls_port: a.tls.map(|t| t.port()),
                https_port: share_https,
                ttl_secs: config.turn.credential_ttl.as_secs() as i64,
            },
        }
    });
    let keys = build_keys(&config, &jwt_secret)?;
    let store = crate::store::open(&config.database.url, &config.data_dir)
        .await
        .context("cannot open the database")?;
    let node_id = if config.cluster.node_id.is_empty() {
        let mut raw = [0u8; 8];
        getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("random source: {e}"))?;
        NodeId(u64::from_be_bytes(raw))
    } else {
        NodeId::from_name(&config.cluster.node_id)
    };
    let hub = Arc::new(Hub::new(
        node_id,
        config.ws.send_queue,
        crate::hub::UserLimits {
            max_connections: config.ws.max_connections_per_user,
            message_rate: config.ws.user_message_rate,
            message_burst: config.ws.user_message_burst,
        },
        Presence::new(
            config.presence.offline_grace.as_millis() as i64,
            config.presence.typing_timeout.as_millis() as i64,
        ),
    ));
    let (broker, cluster): (Arc<dyn crate::hub::Broker>, _) = if config.cluster.redis_url.is_empty()
    {
        (Arc::new(MemoryBroker::new()), None)
    } else {
        let c = &config.cluster;
        let broker = crate::hub::redis::RedisBroker::connect(&c.redis_url, &c.redis_prefix)
            .await
            .context("cannot reach Redis (cluster.redis_url)")?;
        let (cluster, stale) = crate::hub::cluster::Cluster::join(
            &c.redis_url,
            &c.redis_prefix,
            node_id,
            config.presence.offline_grace.as_millis() as i64,
        )
        .await
        .context("cannot join the cluster (cluster.redis_url)")?;
        // Who runs the calls is known before the first connection; what the first sweep
        // finds is handled with the stale connections of this node.
        let (first, failed) = cluster.tick().await;
        if let Some(e) = failed {
            tracing::warn!(error = %e, "first cluster heartbeat failed");
        }
        let mut stale = stale;
        stale.extend(first.lost);
        (
            broker as Arc<dyn crate::hub::Broker>,
            Some((cluster, stale)),
        )
    };
    let node = Node::start(
        store.clone(),
        hub,
        broker,
        cluster.as_ref().map(|(c, _)| c.clone()),
    )
    .await
    .context("cannot join the broker")?;
    let accounts = Arc::new(Accounts::new(store.clone(), keys, config.auth.clone()));
    let deliveries_stop = CancellationToken::new();
    let records = TaskTracker::new();
    let (calls, calls_task) = Calls::spawn(
        node.clone(),
        store.clone(),
        config.calls.ring_timeout,
        config.calls.reconnect_grace,
        records.clone(),
    );
    if let Some((_, stale)) = cluster {
        // What this node held before a crash: gone (calls hear it, presence follows).
        node.conns_lost(stale).await;
    }
    // Not among `background`: it runs until the node leaves, after those have ended.
    tokio::spawn(node.clone().run_cluster());
    let background = vec![
        tokio::spawn(node.clone().run_presence(shutdown.clone())),
        tokio::spawn(node.clone().run_deliveries(deliveries_stop.clone())),
    ];
    tracing::info!(node = %node_id, "node started");
    let services = Arc::new(Services::new(
        Arc::new(config),
        accounts,
        store.clone(),
        node,
        calls,
        turn,
        shutdown,
        crate::telemetry::metrics_handle(),
    ));
    let app = Arc::new(App {
        services,
        http_tls: tls,
        turn_tls,
    });
    Ok(Prepared {
        app,
        store,
        deliveries_stop,
        background,
        calls_task,
        records,
        turn_server,
        metrics_listener,
    })
}

impl Prepared {
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Where the TURN server listens (UDP), when enabled.
    pub fn turn_addr(&self) -> Option<SocketAddr> {
        self.turn_server.as_ref().map(|t| t.handle.addresses.udp)
    }

    /// The TURN server's addresses, when enabled.
    pub fn turn_addresses(&self) -> Option<crate::turn::Addresses> {
        self.turn_server
            .as_ref()
            .map(|t| t.handle.addresses.clone())
    }

    /// Serves until shutdown, then drains: sessions close with 1012 and finish their writes,
    /// queued delivery receipts are written, the database is closed.
    pub async fn run(self, listener: impl Into<HttpListener>) -> anyhow::Result<()> {
        let state = self.app.services.clone();
        let shutdown = state.shutdown.clone();
        let mut app = crate::http::router(state.clone());
        if state.config.socketio.enabled {
            let (layer, sio) = crate::socketio::layer(state.clone());
            app = app
                .layer(layer)
                .layer(axum::middleware::map_request(crate::socketio::detach_head));
            // At shutdown: sessions write what they had queued, then the transports close
            // (long-polling requests end, so the HTTP server can stop).
            let stop = shutdown.clone();
            tokio::spawn(async move {
                stop.cancelled().await;
                sio.shutdown().await;
            });
        }
        let app = crate::http::with_cors(app, &state.config.http.cors_origins);
        let listener = listener.into();
        let metrics_server = self.metrics_listener.map(|l| {
            let router = crate::http::metrics_router(state.clone());
            let stop = shutdown.clone().cancelled_owned();
            tokio::spawn(async move {
                if let Ok(addr) = l.local_addr() {
                    tracing::info!(%addr, "metrics listening");
                }
                axum::serve(l, router).with_graceful_shutdown(stop).await
            })
        });
        let make = app.into_make_service_with_connect_info::<SocketAddr>();
        let stop = shutdown.clone().cancelled_owned();
        match listener {
            HttpListener::Plain(listener) => {
                tracing::info!(addr = %listener.local_addr()?, "http listening");
                // Replies and pushes are small frames written back to back: without
                // TCP_NODELAY, Nagle and the peer's delayed ACK stall every second frame by ~40 ms.
                let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!(error = %e, "could not set TCP_NODELAY");
                    }
                });
                axum::serve(listener, make).with_graceful_shutdown(stop).await
            }
            HttpListener::Tls(listener) => {
                tracing::info!(addr = %axum::serve::Listener::local_addr(&listener)?, "https listening");
                if let (Some(turn), true) = (&state.turn, state.config.turn.share_https) {
                    listener.share_with_turn(turn.handle.streams());
                }
                // Through `tap_io` (a no-op here) axum knows how to give handlers the peer address.
                let listener = axum::serve::ListenerExt::tap_io(listener, |_| {});
                axum::serve(listener, make).with_graceful_shutdown(stop).await
            }
        }
        .context("http server failed")?;
        tracing::info!("shutting down: closing sessions");
        if let Some(m) = metrics_server {
            let _ = m.await;
        }
        state.tracker.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, state.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some sessions did not close in time");
        }
        // Sessions are gone: no more call inputs. Stop the actor, then let its records land.
        self.calls_task.abort();
        if let Some(cluster) = state.node.cluster() {
            // Another node runs the calls from its next heartbeat, not when the lease expires.
            cluster.release_lease().await;
        }
        self.records.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, self.records.wait())
            .await
            .is_err()
        {
            tracing::warn!("some call records were not written in time");
        }
        if let Some(turn) = self.turn_server {
            turn.stop().await;
        }
        self.deliveries_stop.cancel();
        for task in self.background {
            let _ = task.await;
        }
        state.node.leave().await;
        self.store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

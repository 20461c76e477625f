//! `switchboard doctor URL`: what an admin runs from another network to prove that calls will
//! work. It logs in (or takes a token), fetches the ICE servers the API hands to browsers, and
//! for every TURN transport listed (UDP, TCP, TLS, TLS on the HTTPS port) allocates a relay and
//! connects two local WebRTC peers relay-only through the server (webrtc-rs), measuring a
//! data-channel round trip. TCP and TLS go through a local [`bridge`], since the webrtc-rs ICE
//! agent speaks TURN over UDP only. Once, it also checks that a relay address answers from
//! outside (a wrong `turn.public_ip`, or closed relay ports, show there).
//!
//! Failures are said in plain words: a closed port, a TLS name mismatch, a refused credential,
//! a relay address that does not answer. A tool at the edge: nothing in the core imports it.

pub mod bridge;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;
use tokio::net::UdpSocket;
use tokio_rustls::rustls;
use webrtc::api::setting_engine::SettingEngine;
use webrtc::api::APIBuilder;
use webrtc::ice::mdns::MulticastDnsMode;
use webrtc::ice::network_type::NetworkType;
use webrtc::ice::url::{ProtoType, SchemeType, Url};
use webrtc::ice_transport::ice_server::RTCIceServer;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::policy::ice_transport_policy::RTCIceTransportPolicy;
use webrtc_util::Conn;

use bridge::{Bridge, Dial};

/// Data-channel round trips measured per transport.
const PINGS: usize = 5;

#[derive(Debug, Clone)]
pub struct Options {
    /// The server's base URL (`https://chat.example.org`).
    pub url: String,
    pub token: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// A PEM certificate to trust besides the public roots (a private CA, a test certificate).
    pub ca_file: Option<PathBuf>,
    /// How long one transport may take to connect.
    pub timeout: Duration,
}

/// One transport's outcome.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    /// `UDP`, `TCP`, `TLS`, or `TLS (HTTPS port)`.
    pub transport: String,
    pub uri: String,
    pub ok: bool,
    /// The relay address the server allocated.
    pub relay: Option<String>,
    /// Median data-channel round trip between the two peers, through the relay.
    pub rtt_ms: Option<f64>,
    pub problem: Option<String>,
}

/// Whether a relay address answers a packet sent from here.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Reachability {
    pub relay: Option<String>,
    /// `ok`, `failed` or `skipped`.
    pub outcome: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub checks: Vec<Check>,
    pub reachability: Option<Reachability>,
}

impl Report {
    pub fn ok(&self) -> bool {
        !self.checks.is_empty()
            && self.checks.iter().all(|c| c.ok)
            && self
                .reachability
                .as_ref()
                .is_none_or(|r| r.outcome != "failed")
    }

    /// The report as an admin reads it.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            if c.ok {
                out += &format!(
                    "ok    {:<18} {}  relay {}  data-channel round trip {:.1} ms\n",
                    c.transport,
                    c.uri,
                    c.relay.as_deref().unwrap_or("?"),
                    c.rtt_ms.unwrap_or(0.0)
                );
            } else {
                out += &format!(
                    "FAIL  {:<18} {}  {}\n",
                    c.transport,
                    c.uri,
                    c.problem.as_deref().unwrap_or("failed")
                );
            }
        }
        if let Some(r) = &self.reachability {
            let mark = match r.outcome.as_str() {
                "ok" => "ok   ",
                "failed" => "FAIL ",
                _ => "skip ",
            };
            out += &format!("{mark} relay reachability {}\n", r.detail);
        }
        out += if self.ok() {
            "calls will work through every transport listed\n"
        } else {
            "some transports do not work: see above\n"
        };
        out
    }
}

fn tls_roots(ca_file: Option<&PathBuf>) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        use rustls::pki_types::pem::PemObject;
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(path)
            .with_context(|| format!("--ca-file {}", path.display()))?
        {
            roots
                .add(cert.with_context(|| format!("--ca-file {}", path.display()))?)
                .context("--ca-file")?;
        }
    }
    Ok(roots)
}

/// Runs every check.
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    let base = opts.url.trim_end_matches('/').to_owned();
    let mut http = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(Duration::from_secs(15));
    if let Some(path) = &opts.ca_file {
        let pem = std::fs::read(path).with_context(|| format!("--ca-file {}", path.display()))?;
        http = http.add_root_certificate(
            reqwest::Certificate::from_pem(&pem).context("--ca-file: not a PEM certificate")?,
        );
    }
    let http = http.build().context("cannot build the HTTP client")?;
    let token = match (&opts.token, &opts.user) {
        (Some(t), _) => t.clone(),
        (None, Some(user)) => {
            let password = opts
                .password
                .clone()
                .context("--user needs a password (SWITCHBOARD_DOCTOR_PASSWORD)")?;
            let resp = http
                .post(format!("{base}/api/auth/login"))
                .json(&serde_json::json!({"username": user, "password": password}))
                .send()
                .await
                .with_context(|| format!("cannot reach {base}"))?;
            if !resp.status().is_success() {
                anyhow::bail!("login as {user} was refused ({})", resp.status());
            }
            let body: Value = resp.json().await.context("login: not JSON")?;
            body["accessToken"]
                .as_str()
                .context("login: no accessToken")?
                .to_owned()
        }
        (None, None) => anyhow::bail!("give --token, or --user with a password"),
    };
    let resp = http
        .get(format!("{base}/api/ice-servers"))
        .bearer_auth(&token)
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    if !resp.status().is_success() {
        anyhow::bail!(
            "GET /api/ice-servers answered {} (is the token valid?)",
            resp.status()
        );
    }
    let body: Value = resp.json().await.context("ice-servers: not JSON")?;
    let api_port = reqwest::Url::parse(&base)
        .ok()
        .and_then(|u| u.port_or_known_default());
    let roots = Arc::new(tls_roots(opts.ca_file.as_ref())?);
    let mut checks = Vec::new();
    let mut reachability = None;
    for server in body["iceServers"].as_array().into_iter().flatten() {
        let (Some(user), Some(cred)) = (server["username"].as_str(), server["credential"].as_str())
        else {
            continue; // the STUN entry
        };
        for uri in server["urls"].as_array().into_iter().flatten() {
            let Some(uri) = uri.as_str() else { continue };
            if !uri.starts_with("turn") {
                continue;
            }
            let (check, relay) = check(uri, user, cred, api_port, &roots, opts.timeout).await;
            checks.push(check);
            if reachability.is_none() {
                if let Some((server_udp, _)) = relay {
                    reachability = Some(reachable(server_udp, user, cred).await);
                }
            }
        }
    }
    if checks.is_empty() {
        anyhow::bail!("the server lists no TURN server (is turn.enabled off?)");
    }
    Ok(Report {
        checks,
        reachability,
    })
}

fn failed(transport: &str, uri: &str, problem: impl Into<String>) -> Check {
    Check {
        transport: transport.into(),
        uri: uri.into(),
        ok: false,
        relay: None,
        rtt_ms: None,
        problem: Some(problem.into()),
    }
}

/// One TURN URI; with the UDP address a TURN client can use for it (the server or a bridge) and
/// the bridge kept alive, when an allocation worked.
async fn check(
    uri: &str,
    user: &str,
    cred: &str,
    api_port: Option<u16>,
    roots: &Arc<rustls::RootCertStore>,
    timeout: Duration,
) -> (Check, Option<(SocketAddr, Option<Bridge>)>) {
    let url = match Url::parse_url(uri) {
        Ok(u) => u,
        Err(e) => return (failed("?", uri, format!("not a TURN URI: {e}")), None),
    };
    let transport = match (url.scheme, url.proto) {
        (SchemeType::Turn, ProtoType::Udp) => "UDP".to_owned(),
        (SchemeType::Turn, ProtoType::Tcp) => "TCP".to_owned(),
        (SchemeType::Turns, _) if Some(url.port) == api_port => "TLS (HTTPS port)".to_owned(),
        (SchemeType::Turns, _) => "TLS".to_owned(),
        _ => return (failed("?", uri, "not a TURN URI this tool knows"), None),
    };
    let addr = match tokio::net::lookup_host((url.host.as_str(), url.port)).await {
        Ok(mut a) => match a.next() {
            Some(a) => a,
            None => {
                return (
                    failed(&transport, uri, format!("{} has no address", url.host)),
                    None,
                )
            }
        },
        Err(e) => {
            return (
                failed(&transport, uri, format!("cannot resolve {}: {e}", url.host)),
                None,
            )
        }
    };
    let (server_udp, bridge, ice_uri) = match (url.scheme, url.proto) {
        (SchemeType::Turn, ProtoType::Udp) => (addr, None, uri.to_owned()),
        (scheme, _) => {
            let dial = if scheme == SchemeType::Turns {
                let Ok(name) = rustls::pki_types::ServerName::try_from(url.host.clone()) else {
                    return (
                        failed(&transport, uri, "the host is not a valid TLS name"),
                        None,
                    );
                };
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let mut config = match rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                {
                    Ok(b) => b
                        .with_root_certificates(roots.clone())
                        .with_no_client_auth(),
                    Err(e) => return (failed(&transport, uri, e.to_string()), None),
                };
                config.alpn_protocols = vec![crate::tls::ALPN_TURN.to_vec()];
                Dial::Tls {
                    addr,
                    name,
                    config: Arc::new(config),
                }
            } else {
                Dial::Tcp(addr)
            };
            match Bridge::start(dial).await {
                Ok(b) => {
                    let local = b.local;
                    (
                        local,
                        Some(b),
                        format!("turn:127.0.0.1:{}?transport=udp", local.port()),
                    )
                }
                Err(e) => return (failed(&transport, uri, e.to_string()), None),
            }
        }
    };
    let relay = match allocate(server_udp, user, cred).await {
        Ok((relay, client, conn)) => {
            let _ = conn.close().await;
            let _ = client.close().await;
            relay
        }
        Err(problem) => return (failed(&transport, uri, problem), None),
    };
    let outcome = match round_trip(&ice_uri, user, cred, timeout).await {
        Ok(rtt) => Check {
            transport,
            uri: uri.into(),
            ok: true,
            relay: Some(relay.to_string()),
            rtt_ms: Some(rtt),
            problem: None,
        },
        Err(problem) => Check {
            relay: Some(relay.to_string()),
            ..failed(&transport, uri, problem)
        },
    };
    (outcome, Some((server_udp, bridge)))
}

/// An allocation through `server` (the TURN server's UDP address, or a bridge).
async fn allocate(
    server: SocketAddr,
    user: &str,
    cred: &str,
) -> Result<(SocketAddr, turn::client::Client, impl Conn), String> {
    let bind = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    let client = turn::client::Client::new(turn::client::ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username: user.into(),
        password: cred.into(),
        realm: String::new(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(sock),
        vnet: None,
    })
    .await
    .map_err(|e| e.to_string())?;
    client.listen().await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(10), client.allocate()).await {
        Err(_) => {
            let _ = client.close().await;
            Err(format!(
                "no answer to the allocation from {server} within 10 s (UDP blocked on the way?)"
            ))
        }
        Ok(Err(e)) => {
            let _ = client.close().await;
            let text = e.to_string();
            Err(if text.contains("401") {
                "the TURN credential was refused (401): does turn.secret match the one the API mints with?".to_owned()
            } else if text.contains("486") {
                "allocation quota reached (486): turn.user_quota".to_owned()
            } else if text.contains("508") {
                "the server has no capacity (508): turn.total_quota or no free relay port"
                    .to_owned()
            } else {
                format!("the allocation failed: {text}")
            })
        }
        Ok(Ok(conn)) => {
            let relay = conn.local_addr().map_err(|e| e.to_string())?;
            Ok((relay, client, conn))
        }
    }
}

/// Two relay-only WebRTC peers through `ice_uri`: the median data-channel round trip in ms.
async fn round_trip(
    ice_uri: &str,
    user: &str,
    cred: &str,
    timeout: Duration,
) -> Result<f64, String> {
    let err = |e: webrtc::Error| e.to_string();
    let mut se = SettingEngine::default();
    se.set_ice_multicast_dns_mode(MulticastDnsMode::Disabled);
    se.set_network_types(vec![NetworkType::Udp4, NetworkType::Udp6]);
    let api = APIBuilder::new().with_setting_engine(se).build();
    let config = RTCConfiguration {
        ice_servers: vec![RTCIceServer {
            urls: vec![ice_uri.to_owned()],
            username: user.to_owned(),
            credential: cred.to_owned(),
        }],
        ice_transport_policy: RTCIceTransportPolicy::Relay,
        ..Default::default()
    };
    let a = Arc::new(api.new_peer_connection(config.clone()).await.map_err(err)?);
    let b = Arc::new(api.new_peer_connection(config).await.map_err(err)?);
    let result = async {
        // B echoes whatever arrives.
        b.on_data_channel(Box::new(|dc| {
            let echo = dc.clone();
            dc.on_message(Box::new(move |msg| {
                let echo = echo.clone();
                Box::pin(async move {
                    let _ = echo.send(&msg.data).await;
                })
            }));
            Box::pin(async {})
        }));
        let dc = a.create_data_channel("doctor", None).await.map_err(err)?;
        let (open_tx, open_rx) = tokio::sync::oneshot::channel::<()>();
        let open_tx = std::sync::Mutex::new(Some(open_tx));
        dc.on_open(Box::new(move || {
            if let Some(tx) = open_tx.lock().expect("open lock").take() {
                let _ = tx.send(());
            }
            Box::pin(async {})
        }));
        let (msg_tx, mut msg_rx) = tokio::sync::mpsc::channel::<()>(16);
        dc.on_message(Box::new(move |_| {
            let _ = msg_tx.try_send(());
            Box::pin(async {})
        }));
        let offer = a.create_offer(None).await.map_err(err)?;
        let mut gathered = a.gathering_complete_promise().await;
        a.set_local_description(offer).await.map_err(err)?;
        let _ = tokio::time::timeout(timeout, gathered.recv()).await;
        let offer = a.local_description().await.ok_or("no local description")?;
        if !offer.sdp.contains("typ relay") {
            return Err("no relay candidate was gathered".to_owned());
        }
        b.set_remote_description(offer).await.map_err(err)?;
        let answer = b.create_answer(None).await.map_err(err)?;
        let mut gathered = b.gathering_complete_promise().await;
        b.set_local_description(answer).await.map_err(err)?;
        let _ = tokio::time::timeout(timeout, gathered.recv()).await;
        let answer = b.local_description().await.ok_or("no local description")?;
        a.set_remote_description(answer).await.map_err(err)?;
        if tokio::time::timeout(timeout, open_rx).await.is_err() {
            return Err(format!(
                "the two peers did not connect through the relay within {timeout:?}"
            ));
        }
        let mut rtts = Vec::with_capacity(PINGS);
        for i in 0..PINGS {
            #[allow(clippy::disallowed_methods)] // a tool at the edge: it reads the clock
            let sent = Instant::now();
            dc.send_text(format!("ping {i}")).await.map_err(err)?;
            match tokio::time::timeout(Duration::from_secs(5), msg_rx.recv()).await {
                Ok(Some(())) => rtts.push(sent.elapsed().as_secs_f64() * 1000.0),
                _ => return Err("the data channel opened but an echo never came back".into()),
            }
        }
        rtts.sort_by(|x, y| x.total_cmp(y));
        Ok(rtts[rtts.len() / 2])
    }
    .await;
    let _ = a.close().await;
    let _ = b.close().await;
    result
}

/// Whether a relay address answers from outside: allocate, let the relay accept this host's
/// address, and send a packet to the relay address from another socket.
async fn reachable(server: SocketAddr, user: &str, cred: &str) -> Reachability {
    let done = |relay: Option<SocketAddr>, outcome: &str, detail: String| Reachability {
        relay: relay.map(|r| r.to_string()),
        outcome: outcome.into(),
        detail,
    };
    let (relay, client, conn) = match allocate(server, user, cred).await {
        Ok(a) => a,
        Err(e) => return done(None, "failed", e),
    };
    let outcome = async {
        let mine = match client.send_binding_request().await {
            Ok(a) => a,
            Err(e) => {
                return done(
                    Some(relay),
                    "skipped",
                    format!("(cannot learn this host's address: {e})"),
                )
            }
        };
        let bind = if relay.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let Ok(outside) = UdpSocket::bind(bind).await else {
            return done(Some(relay), "skipped", "(no local socket)".into());
        };
        // A permission for this host's address (the relay drops peers without one).
        if conn.send_to(b"doctor", mine).await.is_err() {
            return done(
                Some(relay),
                "skipped",
                format!(
                    "(the server will not relay to this host's address {}: expected when the \
                     doctor runs on the server itself)",
                    mine.ip()
                ),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            let _ = outside.send_to(b"knock", relay).await;
            if let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_secs(1), conn.recv_from(&mut buf)).await
            {
                if &buf[..n] == b"knock" {
                    return done(Some(relay), "ok", format!("{relay} answers from this host"));
                }
            }
        }
        done(
            Some(relay),
            "failed",
            format!(
                "{relay} does not answer from this host: is turn.public_ip right, and are the \
                 relay ports (turn.relay_ports, UDP) open in the firewall?"
            ),
        )
    }
    .await;
    let _ = conn.close().await;
    let _ = client.close().await;
    outcome
}

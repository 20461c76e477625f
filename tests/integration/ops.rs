//! Operations: systemd notify protocol, SIGHUP reload (TLS certificate, TURN secret) without
//! dropping anything, the install script, the unit file, backups.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use crate::binary::{Binary, BIN};
use crate::common::*;

/// Datagrams on a socket the test owns, as systemd's notify socket.
fn notify_socket(dir: &Path) -> (UnixDatagram, PathBuf) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    (sock, path)
}

fn next_notify(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notify datagram");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn notify_ready_only_after_the_ports_accept_then_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, path) = notify_socket(dir.path());
    let mut server = Binary::serve()
        .env("SWITCHBOARD_DATA_DIR", dir.path())
        .env("SWITCHBOARD_HTTP__LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD_TURN__LISTEN_UDP", "127.0.0.1:0")
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "300000")
        .spawn();
    let ready = next_notify(&sock);
    assert!(ready.contains("READY=1"), "{ready}");
    // STATUS names the bound ports: both must already answer.
    let status = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .expect("a STATUS line")
        .to_owned();
    let http: std::net::SocketAddr = status
        .split("serving http on ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let turn: std::net::SocketAddr = status
        .split("turn on ")
        .nth(1)
        .unwrap()
        .trim_end_matches("/udp")
        .parse()
        .unwrap();
    std::net::TcpStream::connect(http).expect("HTTP accepts when READY=1 arrives");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A STUN Binding request (RFC 8489): the TURN port answers it.
    let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    req.extend_from_slice(&[7u8; 12]);
    udp.send_to(&req, turn).unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = udp
        .recv_from(&mut buf)
        .expect("TURN answers a Binding request when READY=1 arrives");
    assert!(
        n >= 20 && buf[0] == 0x01 && buf[1] == 0x01,
        "a Binding success response"
    );
    // The watchdog keeps pinging at half the interval.
    let started = Instant::now();
    let mut watchdogs = 0;
    while watchdogs < 2 {
        if next_notify(&sock).contains("WATCHDOG=1") {
            watchdogs += 1;
        }
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    server.signal("-TERM");
    let mut stopping = false;
    for _ in 0..10 {
        if next_notify(&sock).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "STOPPING=1 on SIGTERM");
    assert_eq!(server.child.wait().unwrap().code(), Some(0));
}

fn der(cert: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(cert)
        .unwrap()
        .to_vec()
}

/// A TLS connection that trusts exactly `trusted`; the certificate the server presented.
async fn tls_connect(
    addr: std::net::SocketAddr,
    trusted: &Path,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>), String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(trusted).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    Ok((tls, presented))
}

/// One HTTP/1.1 request over TLS; the JSON body of the answer.
async fn https(
    addr: std::net::SocketAddr,
    trusted: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Value {
    let (mut tls, _) = tls_connect(addr, trusted).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    let _ = tls.read_to_end(&mut resp).await;
    let text = String::from_utf8_lossy(&resp);
    let json = text.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(json).unwrap_or(Value::Null)
}

type TlsWs = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

async fn next_event(ws: &mut TlsWs) -> Value {
    use futures_util::StreamExt;
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

/// The connection is open and answering: `ping` → `pong`.
async fn ping_pong(ws: &mut TlsWs) {
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        json!({"event": "ping"}).to_string().into(),
    ))
    .await
    .unwrap();
    loop {
        if next_event(ws).await["event"] == "pong" {
            return;
        }
    }
}

fn spawn_with_config(config: &Path) -> Binary {
    Binary::serve().config(config).wait_for_turn().spawn()
}

fn write_config(
    path: &Path,
    data_dir: &Path,
    cert: &Path,
    key: &Path,
    secret: &str,
    previous: &str,
) {
    std::fs::write(
        path,
        format!(
            "data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\ntls_cert_file = {:?}\ntls_key_file = {:?}\n\
             [turn]\nlisten_udp = \"127.0.0.1:0\"\nrelay_ports = \"43000-43999\"\nsecret = {:?}\nprevious_secret = {:?}\n",
            data_dir, cert, key, secret, previous
        ),
    )
    .unwrap();
}

#[tokio::test]
async fn sighup_swaps_certificate_and_turn_secret_without_dropping_anything() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_a, key_a) = make_cert(dir.path(), "a");
    let (cert_b, key_b) = make_cert(dir.path(), "b");
    let (cert, key) = (dir.path().join("live.crt"), dir.path().join("live.key"));
    std::fs::copy(&cert_a, &cert).unwrap();
    std::fs::copy(&key_a, &key).unwrap();
    let config = dir.path().join("switchboard.toml");
    write_config(&config, dir.path(), &cert, &key, "secret-one", "");
    let mut server = spawn_with_config(&config);

    // HTTPS with certificate A; a user; a WebSocket over TLS.
    let (_, presented) = tls_connect(server.addr, &cert_a).await.unwrap();
    assert_eq!(presented, der(&cert_a));
    let reg = https(
        server.addr,
        &cert_a,
        "POST",
        "/api/auth/register",
        Some(json!({"username": "alice", "password": "password123"})),
    )
    .await;
    let token = reg["accessToken"]
        .as_str()
        .expect("registered over HTTPS")
        .to_owned();
    let user_id = reg["user"]["id"].as_str().unwrap().to_owned();
    let (tls, _) = tls_connect(server.addr, &cert_a).await.unwrap();
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("wss://localhost/ws?token={token}"), tls)
            .await
            .unwrap();
    assert_eq!(next_event(&mut ws).await["event"], "connection:established");

    // Two TURN allocations with a credential of the first secret, relaying to each other.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let old_cred = switchboard::auth::turn_rest::mint("secret-one", &user_id, now, 3600);
    let a = crate::turn::TurnClient::new(
        server.turn.unwrap(),
        &old_cred.username,
        &old_cred.password,
        None,
    )
    .await;
    let b = crate::turn::TurnClient::new(
        server.turn.unwrap(),
        &old_cred.username,
        &old_cred.password,
        None,
    )
    .await;
    let (ra, rb) = (
        a.client.allocate().await.unwrap(),
        b.client.allocate().await.unwrap(),
    );
    let (addr_a, addr_b) = (
        webrtc_util::Conn::local_addr(&ra).unwrap(),
        webrtc_util::Conn::local_addr(&rb).unwrap(),
    );
    crate::turn::exchange(&ra, &rb, addr_a, addr_b, "before").await;

    // Replace the certificate and the TURN secret, then SIGHUP.
    std::fs::copy(&cert_b, &cert).unwrap();
    std::fs::copy(&key_b, &key).unwrap();
    write_config(&config, dir.path(), &cert, &key, "secret-two", "");
    server.signal("-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.logged(|l| l.contains("configuration reloaded")) {
        assert!(
            Instant::now() < deadline,
            "no reload: {:?}",
            server.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // New handshakes present the new certificate; the old one is no longer served.
    let (_, presented) = tls_connect(server.addr, &cert_b)
        .await
        .expect("new handshake with certificate B");
    assert_eq!(presented, der(&cert_b));
    assert!(
        tls_connect(server.addr, &cert_a).await.is_err(),
        "certificate A is no longer presented"
    );
    // The WebSocket opened before the reload stays open and working.
    ping_pong(&mut ws).await;
    // The allocations made before still relay.
    crate::turn::exchange(&ra, &rb, addr_a, addr_b, "after").await;
    // Credentials of the new secret work, and the old secret still works as the previous one.
    for secret in ["secret-two", "secret-one"] {
        let cred = switchboard::auth::turn_rest::mint(secret, &user_id, now, 3600);
        let c = crate::turn::TurnClient::new(
            server.turn.unwrap(),
            &cred.username,
            &cred.password,
            None,
        )
        .await;
        c.client
            .allocate()
            .await
            .unwrap_or_else(|e| panic!("{secret} after reload: {e}"));
        c.client.close().await.unwrap();
    }

    // A reload with an invalid config keeps the running one and says why.
    std::fs::write(&config, "[ws]\nheartbeat = 5\n").unwrap();
    server.signal("-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.logged(|l| {
        l.contains("reload failed, keeping the running configuration") && l.contains("heartbeat")
    }) {
        assert!(
            Instant::now() < deadline,
            "no failed-reload message: {:?}",
            server.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, presented) = tls_connect(server.addr, &cert_b).await.unwrap();
    assert_eq!(presented, der(&cert_b));
    ping_pong(&mut ws).await;
    server.signal("-TERM");
    assert_eq!(server.child.wait().unwrap().code(), Some(0));
}

#[test]
fn install_script_lays_down_a_working_installation_and_is_idempotent() {
    let root = tempfile::tempdir().unwrap();
    let install = |extra: &[&str]| {
        let out = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install.sh"))
            .args([
                "--destdir",
                root.path().to_str().unwrap(),
                "--binary",
                BIN,
                "--no-enable",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    install(&[]);
    let r = root.path();
    let bin = r.join("usr/local/bin/switchboard");
    let config = r.join("etc/switchboard/switchboard.toml");
    let unit = r.join("etc/systemd/system/switchboard.service");
    let jwt = r.join("etc/switchboard/credentials/jwt_secret");
    let turn = r.join("etc/switchboard/credentials/turn_secret");
    for f in [
        &bin,
        &config,
        &unit,
        &jwt,
        &turn,
        &r.join("usr/local/share/doc/switchboard/operations.md"),
    ] {
        assert!(f.exists(), "{} missing", f.display());
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&jwt), 0o600);
    assert_eq!(mode(&config), 0o640, "the config may hold secrets");
    assert!(
        std::fs::read_to_string(&jwt).unwrap().len() >= 40,
        "a fresh random secret"
    );
    assert_ne!(
        std::fs::read_to_string(&jwt).unwrap(),
        std::fs::read_to_string(&turn).unwrap()
    );
    let out = Command::new(&bin)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the written config passes check-config"
    );
    assert!(std::fs::read_to_string(&unit)
        .unwrap()
        .contains("ExecStart=/usr/local/bin/switchboard serve"));

    // Idempotent: an edited config and the secrets survive a second run.
    std::fs::write(&config, "# edited by the admin\n[log]\nlevel = \"debug\"\n").unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let secret = std::fs::read_to_string(&jwt).unwrap();
    let second = install(&[]);
    assert_eq!(
        mode(&config),
        0o640,
        "an old world-readable config is tightened"
    );
    assert!(second.contains("kept the existing"), "{second}");
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "# edited by the admin\n[log]\nlevel = \"debug\"\n"
    );
    assert_eq!(std::fs::read_to_string(&jwt).unwrap(), secret);

    // --uninstall removes the program and the unit, keeps the config unless --purge.
    install(&["--uninstall"]);
    assert!(!bin.exists() && !unit.exists());
    assert!(config.exists());
    install(&["--uninstall", "--purge"]);
    assert!(!config.exists());
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    assert!(
        analyze.exists(),
        "systemd-analyze is missing: install the Debian package `systemd` (scripts/test.sh does)"
    );
    // Verify a copy whose ExecStart points at the built binary (verify checks it exists).
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/switchboard.service"
    ))
    .unwrap()
    .replace("/usr/local/bin/switchboard", BIN);
    // The resource ceilings and the kernel-level address filter are there, and nothing
    // re-allows what the filter denies (an IPAddressAllow= entry would win).
    for line in [
        "MemoryMax=",
        "TasksMax=",
        "IPAddressDeny=link-local multicast",
        "User=switchboard",
    ] {
        assert!(
            unit.lines().any(|l| l.starts_with(line)),
            "the unit lacks {line}"
        );
    }
    assert!(!unit.lines().any(|l| l.starts_with("IPAddressAllow=")));
    let path = dir.path().join("switchboard.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    // Lines about other units on this machine are not ours to fix.
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("switchboard.service"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{text}"
    );
}

#[tokio::test]
async fn backup_writes_a_consistent_copy_while_running() {
    let s = TestServer::start().await;
    let a = s.register("alice").await;
    let b = s.register("bob").await;
    let chat = s.direct_chat(&a, &b).await;
    let mut ws = s.ws(&a).await;
    ws.ok("message", json!({"chatId": chat, "content": "keep me"}))
        .await;
    let copy = s.dir.path().join("backup.db");
    let out = Command::new(BIN)
        .args(["backup"])
        .arg(&copy)
        .env("SWITCHBOARD_DATA_DIR", s.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The copy is a complete database: serve it.
    let restored = tempfile::tempdir().unwrap();
    std::fs::copy(&copy, restored.path().join("switchboard.db")).unwrap();
    std::fs::copy(
        s.dir.path().join("jwt_secret"),
        restored.path().join("jwt_secret"),
    )
    .unwrap();
    let config = test_config(restored.path());
    let r = TestServer::start_in(restored, config).await;
    let (status, page) = r
        .get(&format!("/api/chats/{chat}/messages"), &b.token)
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"][0]["content"], "keep me");
    // It refuses to overwrite.
    let out = Command::new(BIN)
        .args(["backup"])
        .arg(&copy)
        .env("SWITCHBOARD_DATA_DIR", s.dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    r.stop().await;
    s.stop().await;
}

#[tokio::test]
async fn metrics_can_move_to_their_own_listener_and_include_store_latency() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = TestServer::start_with(|c| c.http.metrics_listen = Some(metrics_addr)).await;
    let u = s.register("alice").await;
    let (status, _) = s.get("/metrics", &u.token).await;
    assert_eq!(status, 404, "not on the public listener");
    let text = s
        .http
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("switchboard_store_seconds"), "{text}");
    assert!(text.contains(r#"op="create_user""#), "{text}");
    s.stop().await;
}

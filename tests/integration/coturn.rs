//! coturn's own client tools against the embedded TURN server: `turnutils_uclient` relaying to a
//! `turnutils_peer` echo peer, with credentials from `/api/turn-credentials`. The Debian package
//! `coturn` provides them; `scripts/test.sh` installs it (and excludes these tests, loudly, when
//! it cannot). Without the tools these tests fail rather than pass.

use std::process::{Child, Command, Stdio};

use crate::common::*;
use crate::turn::turn_config;

fn tool(name: &str) -> String {
    let path = format!("/usr/bin/{name}");
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} is missing: install the Debian package `coturn` (scripts/test.sh does)"
    );
    path
}

/// A free port outside the test relay range (a peer there would count as one of our relays).
fn free_udp_port() -> u16 {
    loop {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !(40_900..=42_100).contains(&port) {
            return port;
        }
    }
}

struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn echo_peer(port: u16) -> Peer {
    let child = Command::new(tool("turnutils_peer"))
        .args(["-L", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    Peer(child)
}

/// `(sent, received)` totals printed by uclient (`None` when it stopped before sending), and
/// everything it printed.
fn uclient(turn_port: u16, user: &str, pass: &str, extra: &[&str]) -> (Option<(u64, u64)>, String) {
    let port = turn_port.to_string();
    let mut args = vec![
        "-p", &port, "-u", user, "-w", pass, "-n", "50", "-l", "100", "-z", "5",
    ];
    args.extend_from_slice(extra);
    args.push("127.0.0.1");
    let out = Command::new(tool("turnutils_uclient"))
        .args(&args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let Some(line) = text.lines().rev().find(|l| {
        l.contains("tot_send_msgs=") && l.contains("tot_recv_msgs=") && !l.contains("msz=")
    }) else {
        return (None, text);
    };
    let num = |key: &str| -> u64 {
        let rest = line.split(key).nth(1).unwrap();
        rest.trim_start_matches('=')
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (Some((num("tot_send_msgs"), num("tot_recv_msgs"))), text)
}

async fn credentials(s: &TestServer, user: &TestUser) -> (String, String) {
    let (status, body) = s
        .get("/api/turn-credentials?service=turn", &user.token)
        .await;
    assert_eq!(status, 200);
    (
        body["username"].as_str().unwrap().into(),
        body["password"].as_str().unwrap().into(),
    )
}

#[tokio::test]
async fn coturn_uclient_relays_to_an_allowed_loopback_peer() {
    let s = TestServer::start_with(|c| {
        turn_config(c);
        c.turn.allow_peers = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let u = s.register("alice").await;
    let (user, pass) = credentials(&s, &u).await;
    let turn_port = s.turn_addr().unwrap().port();
    let peer_port = free_udp_port();
    let _peer = echo_peer(peer_port);
    let (totals, text) = tokio::task::spawn_blocking(move || {
        uclient(
            turn_port,
            &user,
            &pass,
            &["-e", "127.0.0.1", "-r", &peer_port.to_string(), "-m", "2"],
        )
    })
    .await
    .unwrap();
    let (sent, recv) = totals.unwrap_or_else(|| panic!("uclient did not relay:\n{text}"));
    assert_eq!(sent, 100);
    assert!(recv >= 95, "echoed {recv} of {sent}");
    s.stop().await;
}

#[tokio::test]
async fn coturn_uclient_gets_nothing_through_to_loopback_by_default() {
    let s = TestServer::start_with(turn_config).await;
    let u = s.register("alice").await;
    let (user, pass) = credentials(&s, &u).await;
    let turn_port = s.turn_addr().unwrap().port();
    let peer_port = free_udp_port();
    let _peer = echo_peer(peer_port);
    let (totals, text) = tokio::task::spawn_blocking(move || {
        uclient(
            turn_port,
            &user,
            &pass,
            &["-e", "127.0.0.1", "-r", &peer_port.to_string(), "-m", "1"],
        )
    })
    .await
    .unwrap();
    // uclient gives up when its channel bind is refused; if it ever got further, nothing may
    // have come back.
    assert!(
        text.contains("403"),
        "the permission must be refused with 403:\n{text}"
    );
    if let Some((_, recv)) = totals {
        assert_eq!(
            recv, 0,
            "the loopback peer must not be reachable through the relay"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn coturn_uclient_client_to_client_through_our_own_relays() {
    // Two allocations on this server reach each other even though loopback peers are denied.
    let s = TestServer::start_with(turn_config).await;
    let u = s.register("alice").await;
    let (user, pass) = credentials(&s, &u).await;
    let turn_port = s.turn_addr().unwrap().port();
    let (totals, text) =
        tokio::task::spawn_blocking(move || uclient(turn_port, &user, &pass, &["-y", "-m", "2"]))
            .await
            .unwrap();
    let (sent, recv) = totals.unwrap_or_else(|| panic!("uclient did not relay:\n{text}"));
    assert!(sent > 0);
    assert!(recv >= sent * 95 / 100, "received {recv} of {sent}");
    s.stop().await;
}

#[tokio::test]
async fn coturn_uclient_with_a_wrong_password_is_refused() {
    let s = TestServer::start_with(turn_config).await;
    let u = s.register("alice").await;
    let (user, _) = credentials(&s, &u).await;
    let turn_port = s.turn_addr().unwrap().port();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(tool("turnutils_uclient"))
            .args([
                "-p",
                &turn_port.to_string(),
                "-u",
                &user,
                "-w",
                "wrong",
                "-n",
                "5",
                "-y",
                "127.0.0.1",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Cannot complete Allocation"), "{text}");
    assert!(
        !text.contains("tot_recv_msgs"),
        "nothing was relayed: {text}"
    );
    s.stop().await;
}

/// Credentials minted with the test secret (what the REST API would hand out).
fn minted(user: &str) -> (String, String) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let c = switchboard::auth::turn_rest::mint(crate::turn::SECRET, user, now, 600);
    (c.username, c.password)
}

async fn uclient_c2c(port: u16, extra: &'static [&'static str]) -> (u64, u64) {
    let (user, pass) = minted("stream-user");
    let (totals, text) = tokio::task::spawn_blocking(move || {
        let mut args = vec!["-y", "-m", "2"];
        args.extend_from_slice(extra);
        uclient(port, &user, &pass, &args)
    })
    .await
    .unwrap();
    totals.unwrap_or_else(|| panic!("uclient {extra:?} did not relay:\n{text}"))
}

#[tokio::test]
async fn coturn_uclient_over_tcp_tls_and_the_shared_https_port() {
    let (s, _cert) = TestServer::start_https(|c| {
        turn_config(c);
        c.turn.listen_tcp = Some("127.0.0.1:0".parse().unwrap());
        c.turn.listen_tls = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let t = s.turn();
    for (port, extra, what) in [
        (t.tcp.unwrap().port(), &["-t"][..], "TCP"),
        (t.tls.unwrap().port(), &["-t", "-S"][..], "TLS"),
        (s.addr.port(), &["-t", "-S"][..], "TLS on the HTTPS port"),
    ] {
        let (sent, recv) = uclient_c2c(port, extra).await;
        assert!(sent > 0, "{what}");
        assert!(recv >= sent * 95 / 100, "{what}: received {recv} of {sent}");
    }
    s.stop().await;
}

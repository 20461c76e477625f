//! `switchboard doctor` against the real server: every transport working, and each failure named
//! in plain words (a closed port, a TLS name mismatch, a refused credential, a relay address that
//! does not answer). The doctor runs as the real binary, with its own WebRTC peers.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use crate::common::*;
use crate::turn::{turn_config, SECRET};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// Runs the doctor; its exit code and JSON report.
async fn doctor(url: String, token: &str, ca_file: Option<&Path>) -> (i32, Value) {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "doctor",
        &url,
        "--token",
        token,
        "--json",
        "--timeout",
        "10s",
    ]);
    if let Some(ca) = ca_file {
        cmd.arg("--ca-file").arg(ca);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let report = serde_json::from_str(&text).unwrap_or_else(|_| {
        panic!(
            "no JSON report:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), report)
}

fn check<'a>(report: &'a Value, transport: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["transport"] == transport)
        .unwrap_or_else(|| panic!("no {transport} check in {report}"))
}

/// A token of a fresh user, logged in over HTTPS (the test server speaks HTTPS only).
async fn token_over_https(s: &TestServer, cert: &Path) -> String {
    let pem = std::fs::read(cert).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let body: Value = http
        .post(format!(
            "https://127.0.0.1:{}/api/auth/register",
            s.addr.port()
        ))
        .json(&json!({"username": "doctor", "password": "password123"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["accessToken"].as_str().unwrap().to_owned()
}

fn streams(c: &mut switchboard::config::Config) {
    turn_config(c);
    c.turn.listen_tcp = Some("127.0.0.1:0".parse().unwrap());
    c.turn.listen_tls = Some("127.0.0.1:0".parse().unwrap());
}

#[tokio::test]
async fn every_transport_works_udp_tcp_tls_and_the_https_port() {
    let (s, cert) = TestServer::start_https(streams).await;
    let token = token_over_https(&s, &cert).await;
    let (code, report) = doctor(
        format!("https://127.0.0.1:{}", s.addr.port()),
        &token,
        Some(&cert),
    )
    .await;
    assert_eq!(code, 0, "{report:#}");
    for transport in ["UDP", "TCP", "TLS", "TLS (HTTPS port)"] {
        let c = check(&report, transport);
        assert_eq!(c["ok"], true, "{c}");
        assert!(c["rttMs"].as_f64().unwrap() > 0.0, "{c}");
        assert!(
            c["relay"].as_str().unwrap().starts_with("127.0.0.1:41"),
            "{c}"
        );
    }
    // On the server's own host its loopback address is not a peer: the check is skipped.
    assert_eq!(report["reachability"]["outcome"], "skipped", "{report:#}");
    s.stop().await;
}

#[tokio::test]
async fn a_tls_certificate_for_another_name_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (other_cert, other_key) = make_cert_for(dir.path(), "other", "DNS:other.test");
    let (s, cert) = TestServer::start_https(|c| {
        streams(c);
        c.turn.tls_cert_file = Some(other_cert.clone());
        c.turn.tls_key_file = Some(other_key.clone());
    })
    .await;
    let token = token_over_https(&s, &cert).await;
    // Both certificates are trusted: only the name is wrong.
    let both = dir.path().join("both.pem");
    let mut pem = std::fs::read(&cert).unwrap();
    pem.extend(std::fs::read(&other_cert).unwrap());
    std::fs::write(&both, pem).unwrap();
    let (code, report) = doctor(
        format!("https://127.0.0.1:{}", s.addr.port()),
        &token,
        Some(&both),
    )
    .await;
    assert_eq!(code, 1);
    let tls = check(&report, "TLS");
    assert_eq!(tls["ok"], false);
    assert!(
        tls["problem"]
            .as_str()
            .unwrap()
            .contains("TLS name mismatch"),
        "{tls}"
    );
    assert_eq!(check(&report, "UDP")["ok"], true);
    assert_eq!(check(&report, "TCP")["ok"], true);
    s.stop().await;
}

#[tokio::test]
async fn a_wrong_public_ip_shows_as_a_relay_address_that_does_not_answer() {
    let s = TestServer::start_with(|c| {
        turn_config(c);
        // TEST-NET-1: nobody answers there. Loopback is named a peer, so the doctor, on this
        // host, may knock on the relay from its own address.
        c.turn.public_ip = "192.0.2.1".parse().unwrap();
        c.turn.allow_peers = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let u = s.register("doctor").await;
    let (code, report) = doctor(s.url(""), &u.token, None).await;
    assert_eq!(code, 1, "{report:#}");
    let r = &report["reachability"];
    assert_eq!(r["outcome"], "failed", "{r}");
    assert!(
        r["relay"].as_str().unwrap().starts_with("192.0.2.1:"),
        "{r}"
    );
    assert!(
        r["detail"].as_str().unwrap().contains("turn.public_ip"),
        "{r}"
    );
    // With the right address the same knock gets through.
    let s2 = TestServer::start_with(|c| {
        turn_config(c);
        c.turn.relay_ports = "42000-42999".parse().unwrap();
        c.turn.allow_peers = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let u = s2.register("doctor").await;
    let (code, report) = doctor(s2.url(""), &u.token, None).await;
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["reachability"]["outcome"], "ok", "{report:#}");
    s.stop().await;
    s2.stop().await;
}

/// An API that lists what the test wants (the real TURN server behind it, or a closed port).
async fn fake_api(ice_servers: Value) -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/api/ice-servers",
        axum::routing::get(move || {
            let body = json!({"iceServers": ice_servers.clone(), "ttl": 600});
            async move { axum::Json(body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn a_closed_port_and_a_refused_credential_are_named() {
    let s = TestServer::start_with(turn_config).await;
    let udp = s.turn_addr().unwrap().port();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let good = switchboard::auth::turn_rest::mint(SECRET, "u1", now, 600);
    let bad = switchboard::auth::turn_rest::mint("another-secret", "u2", now, 600);
    let api = fake_api(json!([
        {"urls": [format!("turn:127.0.0.1:{closed}?transport=tcp")],
         "username": good.username, "credential": good.password},
        {"urls": [format!("turn:127.0.0.1:{udp}?transport=udp")],
         "username": bad.username, "credential": bad.password},
    ]))
    .await;
    let (code, report) = doctor(format!("http://{api}"), "any-token", None).await;
    assert_eq!(code, 1);
    let tcp = check(&report, "TCP");
    assert!(
        tcp["problem"]
            .as_str()
            .unwrap()
            .contains("closed (connection refused)"),
        "{tcp}"
    );
    let udp = check(&report, "UDP");
    assert!(
        udp["problem"]
            .as_str()
            .unwrap()
            .contains("credential was refused (401)"),
        "{udp}"
    );
    s.stop().await;
}

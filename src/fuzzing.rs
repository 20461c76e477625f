//! Entry points for fuzzing every parser that reads bytes from strangers (issue 17): the
//! cargo-fuzz targets in `fuzz/` call these, and `tests/fuzz_corpus.rs` replays the committed
//! corpus through them on stable, so CI checks every corpus file without nightly.
//!
//! Each takes any bytes and must neither panic nor hang; where a parser's answer has a property
//! that holds for all inputs, it is asserted here (a violated assertion is a finding too).
#![allow(clippy::disallowed_methods)] // a fixed clock is built from the real one once

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::turn::engine::{
    wire, Bound, ClientId, Command, Config as TurnConfig, Engine, Forward, Nonces, Now, QuotaBook,
    Secrets, Transport,
};
use crate::turn::filter::PeerFilter;

fn in_range(range: &Range<usize>, len: usize) -> bool {
    range.start <= range.end && range.end <= len
}

/// A TURN engine as the server builds it (one relay address, small quotas).
fn engine() -> Engine {
    let relay: std::net::IpAddr = "203.0.113.7".parse().expect("literal");
    Engine::new(
        TurnConfig {
            realm: "switchboard".into(),
            relay_v4: Some(relay),
            relay_v6: None,
            max_allocation_lifetime: Duration::from_secs(3600),
            max_bps_per_allocation: 0,
            total_bps: 0,
            max_permissions: 8,
            max_channels: 8,
        },
        Secrets {
            current: "fuzz-secret".into(),
            previous: None,
        },
        PeerFilter::new(&[], &[], vec![relay], 49152..=65535),
        Nonces::new([7; 32]),
        Arc::new(Mutex::new(QuotaBook::new(2, 4))),
        [1, 2, 3, 4],
    )
}

/// Datagrams and stream frames to the TURN engine: the input is cut into messages (a length
/// byte before each), sent from three clients (UDP, TCP, TLS) with the clock moving, relay
/// binds answered, timers run. What it forwards must lie inside the buffer it was given.
pub fn turn_engine(data: &[u8]) {
    let mut e = engine();
    let t0 = Instant::now();
    let local: SocketAddr = "203.0.113.7:3478".parse().expect("literal");
    let clients = [Transport::Udp, Transport::Tcp, Transport::Tls].map(|t| ClientId {
        transport: t,
        src: "198.51.100.1:50000".parse().expect("literal"),
        local,
        stream: 1,
    });
    let mut rest = data;
    let mut step = 0u64;
    while let Some((&head, tail)) = rest.split_first() {
        let len = (head as usize).min(tail.len());
        let (msg, next) = tail.split_at(len);
        rest = next;
        step += 1;
        let mono = t0 + Duration::from_millis(step * 997);
        let now = Now {
            mono,
            unix: 1_800_000_000 + (step as i64),
        };
        let client = clients[(head as usize) % clients.len()];
        let forward = e.handle_client_input(msg, 0..msg.len(), client, now);
        match forward {
            Forward::ToPeer { range, .. } | Forward::ToClient { range, .. } => {
                assert!(in_range(&range, msg.len()), "forward outside its input")
            }
            Forward::Nothing => {}
        }
        while let Some(cmd) = e.poll_command() {
            if let Command::BindRelay { alloc, family, .. } = cmd {
                let port = 49152 + (step % 1000) as u16;
                e.relay_bound(alloc, family, Ok(Bound { port, token: None }));
            }
        }
        e.handle_timeout(mono);
        assert!(e.allocation_count() <= 4, "the total quota holds");
    }
    e.stream_closed(clients[1]);
    while e.poll_command().is_some() {}
}

/// TURN over TCP/TLS framing: a byte stream cut into STUN messages and ChannelData frames as
/// the stream reader does. A frame's length is bounded, and the cutting ends.
pub fn turn_stream(data: &[u8]) {
    let mut rest = data;
    while !rest.is_empty() {
        match wire::stream_frame_len(rest) {
            Ok(Some(n)) => {
                // What the reader may have to buffer for one frame is bounded by the 16-bit
                // length field, whatever the stranger sends.
                assert!((4..=20 + 65_535 + 3).contains(&n), "frame length {n}");
                if n > rest.len() {
                    break; // the reader waits for the rest
                }
                let _ = wire::classify(&rest[..n]);
                rest = &rest[n..];
            }
            Ok(None) | Err(()) => break,
        }
    }
}

/// A `/ws` text frame: the envelope, then the typed request.
pub fn ws_frame(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let crate::client::session::Incoming::Request { event, data, .. } =
        crate::ws::codec::decode(text)
    {
        let _ = crate::wire::Request::decode(&event, data.as_deref());
    }
}

/// A Socket.IO event's payload (`["event", data, ...]`) as the Socket.IO transport decodes it.
pub fn socketio_event(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    crate::socketio::fuzz_decode(text);
}

/// A bearer token (ours, or a bad one of any shape).
pub fn jwt(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let keys = crate::auth::jwt::JwtKeys::new(b"fuzz-secret-fuzz-secret-fuzz-sec");
    // Nothing here was signed with the key: no input may verify.
    assert!(
        keys.verify(text, 1_800_000_000).is_err(),
        "a forged token verified"
    );
}

/// A config file (TOML) as `check-config` reads it.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crate::config::Config::from_toml_str(text);
}

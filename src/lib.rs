//! Switchboard: a chat WebSocket, WebRTC call signaling and a TURN server in one process.
//!
//! # Layout (`docs/architecture.md` draws it)
//! - [`config`]: the configuration tree (TOML + `SWITCHBOARD_*` env), typed and validated at start.
//! - [`app`]: composition root, shutdown and reload; tests run the real app on port 0 through it.
//! - [`services`]: what every handler and connection shares.
//! - [`wire`]: the contract's events, payloads, replies and close codes (pure).
//! - [`client`]: one connection over any transport: request handling (chat, calls) and its loop.
//! - [`ws`]: the WebSocket transport; [`socketio`]: the Socket.IO one; [`http`]: REST.
//! - [`hub`]: the registry of connections, fan-out, presence (pure) and the broker.
//! - [`calls`]: call signaling (a pure machine and its actor).
//! - [`auth`]: JWTs (pure), passwords, login throttling, accounts.
//! - [`store`]: the [`store::Store`] trait and its SQLite backend.
//! - [`turn`]: the TURN/STUN server (a sans-IO engine and its I/O shells).
//!
//! # Design notes
//! Pure state machines take `now` as an argument and return events; async shells own sockets,
//! tasks and clocks. Nothing is acknowledged to a client before the store committed it.

pub mod app;
pub mod auth;
pub mod calls;
pub mod client;
pub mod config;
pub mod doctor;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod hub;
pub mod limits;
pub mod services;
pub mod socketio;
pub mod store;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod turn;
pub mod wire;
pub mod ws;

//! Switchboard: a chat WebSocket, WebRTC call signaling and (soon) a TURN server in one process.
//!
//! # Layout
//! - [`config`]: the configuration tree (TOML + `SWITCHBOARD_*` env), validated at start.
//! - [`app`]: composition root and shutdown; tests run the real app on port 0 through it.
//! - [`auth`]: JWTs (pure), passwords, login throttling, accounts.
//! - [`store`]: the [`store::Store`] trait and its SQLite backend.
//! - [`hub`]: live connections, fan-out, presence/typing (pure) and the broker.
//! - [`ws`]: the WebSocket protocol (pure), the chat event handlers, the per-connection session.
//! - [`http`]: REST routes.
//!
//! # Design notes
//! Pure state machines take `now` as an argument and return events; async shells own sockets,
//! tasks and clocks. Nothing is acknowledged to a client before the store committed it.

pub mod app;
pub mod auth;
pub mod calls;
pub mod config;
pub mod doctor;
pub mod error;
pub mod http;
pub mod hub;
pub mod limits;
pub mod store;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod turn;
pub mod ws;

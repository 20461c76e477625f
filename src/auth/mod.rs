//! Accounts and tokens: JWT issue/verify ([`jwt`], pure), argon2id passwords ([`passwords`]),
//! login throttling ([`throttle`], pure) and the [`accounts::Accounts`] service that ties them to
//! the store. Must not import the hub, WebSocket or HTTP layers.

pub mod accounts;
pub mod jwt;
pub mod passwords;
pub mod throttle;
pub mod turn_rest;

pub use accounts::{Accounts, AuthResponse, Authed};

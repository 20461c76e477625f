//! The WebSocket endpoint: [`protocol`] (pure wire format), [`handlers`] (chat events),
//! [`session`] (one connection's loop).

pub mod calls;
pub mod handlers;
pub mod protocol;
pub mod session;

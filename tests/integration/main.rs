//! Integration tests: the real app on port 0 driven by real HTTP and WebSocket clients, and the
//! real binary for crash and memory tests.

#![allow(clippy::disallowed_methods)] // tests read the clock freely
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod binary;
mod calls;
mod common;
mod coturn;
mod doctor;
mod hardening;
mod ops;
mod postgres_app;
mod postgres_redis_cluster;
mod process;
mod resilience;
mod rest;
mod transcript;
mod turn;
mod ws_chat;

//! One WebSocket connection: authenticate, greet, then a single loop that reads client frames,
//! writes queued pushes, sends heartbeats and enforces the limits (PROTOCOL §2). Generic over the
//! socket's `Sink`/`Stream`, so it does not care whether axum or a test channel is underneath.
//!
//! Every way out says why with a close code: 1012 shutdown, 4401 token, 4408 silence,
//! 4429 send-queue overflow or flooding, 1009 oversize frame.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use serde_json::json;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::handlers::{self, Conn};
use super::protocol::{self as p, close};
use crate::app::AppState;
use crate::error::ApiError;
use crate::time::{now_ms, rfc3339_ms};

/// How long a closing connection may take to flush its close frame (and hear the reply).
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Longer for a connection cut for being slow: its close frame waits behind a full buffer,
/// and the client should still learn the code once it reads again.
const SLOW_CLOSE_LINGER: Duration = Duration::from_secs(10);

/// Why the loop ended.
enum End {
    Close(u16, &'static str),
    /// The peer closed or the transport failed: nothing more to say.
    Gone,
}

/// Token bucket on inbound events.
struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    rejected_in_row: u32,
}

impl RateLimit {
    fn new(per_sec: u32, now: Instant) -> Option<Self> {
        (per_sec > 0).then_some(Self {
            rate: per_sec as f64,
            burst: 2.0 * per_sec as f64,
            tokens: 2.0 * per_sec as f64,
            last: now,
            rejected_in_row: 0,
        })
    }

    fn allow(&mut self, now: Instant) -> bool {
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.rejected_in_row = 0;
            true
        } else {
            self.rejected_in_row += 1;
            false
        }
    }
}

fn is_too_long(err: &axum::Error) -> bool {
    let text = err.to_string();
    // axum wraps tungstenite's error; its capacity variant is the only "too long" one.
    text.contains("Space limit exceeded") || text.contains("too long")
}

pub async fn run<S>(mut socket: S, state: Arc<AppState>, token: Option<String>, host: String)
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin,
{
    let _in_flight = state.tracker.token();
    let authed = match token {
        None => Err(ApiError::unauthorized("missing token")),
        Some(t) => state.accounts.authenticate(&t).await,
    };
    let authed = match authed {
        Ok(a) => a,
        Err(e) => {
            let _ = socket.send(text(p::error_push(&e, None))).await;
            finish_close(
                &mut socket,
                close::UNAUTHORIZED,
                "unauthorized",
                CLOSE_LINGER,
            )
            .await;
            return;
        }
    };
    let user_id = authed.user_id.clone();
    let mut reg = match state.node.hub.register(&user_id) {
        Ok(reg) => reg,
        Err(too_many) => {
            metrics::counter!("switchboard_ws_refused_total", "reason" => "connections_per_user")
                .increment(1);
            let err = ApiError::new(crate::error::ErrorCode::RateLimited, too_many.to_string());
            let _ = socket.send(text(p::error_push(&err, None))).await;
            finish_close(
                &mut socket,
                close::TOO_SLOW,
                "too many connections",
                CLOSE_LINGER,
            )
            .await;
            return;
        }
    };
    let conn = Conn {
        user_id: user_id.clone(),
        conn_id: reg.conn_id,
    };
    tracing::debug!(user_id = %user_id, conn_id = %conn.conn_id, "ws connected");
    let ws_cfg = &state.config.ws;
    // Every (re)connect refreshes the TURN credentials.
    let (ice_servers, ice_expires) = state.ice_servers(&user_id, &host);
    let hello = p::push(
        "connection:established",
        json!({
            "userId": user_id,
            "connectionId": conn.conn_id.to_string(),
            "heartbeatIntervalMs": ws_cfg.heartbeat_interval.as_millis() as u64,
            "serverTime": rfc3339_ms(now_ms()),
            "iceServers": ice_servers,
            "iceExpiresAt": ice_expires.map(|e| rfc3339_ms(e * 1000)),
        }),
    );
    metrics::gauge!("switchboard_ws_connections").increment(1.0);
    // Presence goes up here and down at the end, on every path between.
    state.node.connected(&user_id).await;
    state.calls.connection_up(&user_id, conn.conn_id).await;
    let end = if socket.send(text(hello)).await.is_err() {
        End::Gone
    } else {
        session_loop(&mut socket, &state, &conn, &mut reg, authed.expires_at).await
    };
    state.node.hub.unregister(&user_id, conn.conn_id);
    metrics::gauge!("switchboard_ws_connections").decrement(1.0);
    drop(reg);
    if let End::Close(code, reason) = end {
        metrics::counter!("switchboard_ws_closes_total", "code" => code.to_string()).increment(1);
        let linger = if code == close::TOO_SLOW {
            SLOW_CLOSE_LINGER
        } else {
            CLOSE_LINGER
        };
        tokio::select! {
            _ = finish_close(&mut socket, code, reason, linger) => {}
            _ = state.shutdown.cancelled(), if code != close::RESTARTING && code != close::GOING_AWAY => {}
        }
    }
    state.calls.connection_down(&user_id, conn.conn_id).await;
    state.node.disconnected(&user_id).await;
    tracing::debug!(user_id = %user_id, conn_id = %conn.conn_id, "ws closed");
}

async fn session_loop<S>(
    socket: &mut S,
    state: &Arc<AppState>,
    conn: &Conn,
    reg: &mut crate::hub::Registration,
    mut token_expires_at: i64,
) -> End
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin,
{
    let cfg = &state.config.ws;
    let mut ping = tokio::time::interval_at(
        Instant::now() + cfg.heartbeat_interval,
        cfg.heartbeat_interval,
    );
    let mut idle_deadline = Instant::now() + cfg.idle_timeout;
    let mut limiter = RateLimit::new(cfg.rate_limit, Instant::now());
    let kill = reg.kill.clone();
    let shutdown = state.shutdown.clone();
    loop {
        let token_deadline = token_deadline(token_expires_at);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                drain_queue(socket, reg).await;
                let code = state.shutdown_close_code();
                let reason = if code == close::GOING_AWAY { "server going away" } else { "server restarting" };
                return End::Close(code, reason);
            }
            _ = kill.cancelled() => return End::Close(close::TOO_SLOW, "send queue overflow"),
            _ = sleep_until(token_deadline) => {
                let err = ApiError::unauthorized("token expired");
                let _ = guarded_send(socket, text(p::error_push(&err, None)), &kill, &shutdown).await;
                return End::Close(close::UNAUTHORIZED, "token expired");
            }
            _ = sleep_until(idle_deadline) => return End::Close(close::HEARTBEAT_TIMEOUT, "heartbeat timeout"),
            _ = ping.tick() => {
                if guarded_send(socket, Message::Ping(Default::default()), &kill, &shutdown).await.is_err() {
                    continue; // the next turn of the loop sees why
                }
            }
            out = reg.rx.recv() => {
                let Some(out) = out else { return End::Gone };
                if guarded_send(socket, text_shared(&out.text), &kill, &shutdown).await.is_err() {
                    continue;
                }
                if let Some(d) = out.delivery {
                    if *d.sender_id != *conn.user_id {
                        metrics::counter!("switchboard_messages_delivered_total").increment(1);
                        state.node.report_delivered(&d.chat_id, &conn.user_id, d.seq).await;
                    }
                }
            }
            msg = socket.next() => {
                let msg = match msg {
                    None => return End::Gone,
                    Some(Err(e)) if is_too_long(&e) => return End::Close(close::TOO_LARGE, "frame too large"),
                    Some(Err(_)) => return End::Gone,
                    Some(Ok(m)) => m,
                };
                idle_deadline = Instant::now() + cfg.idle_timeout;
                let body = match msg {
                    Message::Text(t) => t,
                    Message::Close(_) => return End::Gone,
                    Message::Ping(_) | Message::Pong(_) => continue,
                    Message::Binary(_) => {
                        let err = ApiError::bad_request("binary frames are not supported; send JSON text");
                        let _ = guarded_send(socket, text(p::error_push(&err, None)), &kill, &shutdown).await;
                        continue;
                    }
                };
                if body.len() > cfg.max_frame_bytes {
                    return End::Close(close::TOO_LARGE, "frame too large");
                }
                if let Some(l) = limiter.as_mut() {
                    if !l.allow(Instant::now()) {
                        if l.rejected_in_row as f64 > l.burst {
                            return End::Close(close::TOO_SLOW, "rate limited");
                        }
                        let err = ApiError::new(crate::error::ErrorCode::RateLimited, "too many events; slow down");
                        let frame = match p::parse_inbound(body.as_str()).ok().and_then(|i| i.id) {
                            Some(id) => p::reply_err(id, &err),
                            None => p::error_push(&err, None),
                        };
                        let _ = guarded_send(socket, text(frame), &kill, &shutdown).await;
                        continue;
                    }
                }
                // Boxed: an idle connection then holds a pointer, not the largest handler state.
                let frames = Box::pin(process(state, conn, body.as_str(), &mut token_expires_at)).await;
                for frame in frames.frames {
                    if guarded_send(socket, text(frame), &kill, &shutdown).await.is_err() {
                        break;
                    }
                }
                for (chat_id, seq) in frames.delivered {
                    state.node.report_delivered(&chat_id, &conn.user_id, seq).await;
                }
            }
        }
    }
}

/// Frames to write for one inbound text frame, and deliveries to report after writing them.
struct Output {
    frames: Vec<String>,
    delivered: Vec<(String, i64)>,
}

async fn process(
    state: &Arc<AppState>,
    conn: &Conn,
    body: &str,
    token_expires_at: &mut i64,
) -> Output {
    let inbound = match p::parse_inbound(body) {
        Ok(i) => i,
        Err(e) => {
            let err = ApiError::bad_request(e.message);
            let frame = match e.id {
                Some(id) => p::reply_err(id, &err),
                None => p::error_push(&err, e.event.as_deref()),
            };
            return Output {
                frames: vec![frame],
                delivered: Vec::new(),
            };
        }
    };
    metrics::counter!("switchboard_ws_events_total", "event" => p::event_label(&inbound.event))
        .increment(1);
    if inbound.event.starts_with("call:") {
        return match super::calls::handle(state, conn, &inbound.event, &inbound.data).await {
            Ok(data) => Output {
                frames: inbound
                    .id
                    .map(|id| p::reply_ok(id, data))
                    .into_iter()
                    .collect(),
                delivered: Vec::new(),
            },
            Err(f) => {
                metrics::counter!("switchboard_ws_errors_total", "code" => f.code).increment(1);
                let mut frames = vec![f.push()];
                frames.extend(inbound.id.map(|id| f.reply(id)));
                Output {
                    frames,
                    delivered: Vec::new(),
                }
            }
        };
    }
    match handlers::handle(state, conn, &inbound.event, &inbound.data).await {
        Ok(h) => {
            if let Some(exp) = h.new_expiry {
                *token_expires_at = exp;
            }
            let mut frames = h.frames;
            if let Some(id) = inbound.id {
                frames.push(p::reply_ok(id, h.data));
            }
            Output {
                frames,
                delivered: h.delivered,
            }
        }
        Err(err) => {
            metrics::counter!("switchboard_ws_errors_total", "code" => err.code.as_str())
                .increment(1);
            if err.code == crate::error::ErrorCode::Internal {
                tracing::warn!(event = %inbound.event, "request failed with an internal error");
            }
            let frame = match inbound.id {
                Some(id) => p::reply_err(id, &err),
                None => p::error_push(&err, Some(&inbound.event)),
            };
            Output {
                frames: vec![frame],
                delivered: Vec::new(),
            }
        }
    }
}

/// Writes what is already queued for this connection (e.g. the `call:end` of a shutdown),
/// within a short bound: a stopping server does not wait for slow readers.
async fn drain_queue<S>(socket: &mut S, reg: &mut crate::hub::Registration)
where
    S: Sink<Message, Error = axum::Error> + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        while let Ok(out) = reg.rx.try_recv() {
            if socket.send(text_shared(&out.text)).await.is_err() {
                return;
            }
        }
    })
    .await;
}

fn token_deadline(expires_at_secs: i64) -> Instant {
    let left_ms = (expires_at_secs * 1000 - now_ms()).max(0) as u64;
    Instant::now() + Duration::from_millis(left_ms)
}

fn text(s: String) -> Message {
    Message::Text(s.into())
}

fn text_shared(s: &str) -> Message {
    Message::Text(s.into())
}

/// Writes one frame unless the connection is being cut meanwhile (a blocked write to a reader
/// that stopped reading must not keep the session from closing).
async fn guarded_send<S>(
    socket: &mut S,
    msg: Message,
    kill: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<(), ()>
where
    S: Sink<Message, Error = axum::Error> + Unpin,
{
    tokio::select! {
        r = socket.send(msg) => r.map_err(|_| ()),
        _ = kill.cancelled() => Err(()),
        _ = shutdown.cancelled() => Err(()),
    }
}

/// Sends a close frame and waits (bounded) for the peer's close reply.
async fn finish_close<S>(socket: &mut S, code: u16, reason: &'static str, linger: Duration)
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin,
{
    let _ = tokio::time::timeout(linger, async {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        if socket.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        while let Some(Ok(m)) = socket.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

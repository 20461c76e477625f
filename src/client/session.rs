//! One connection's life, whatever the transport: authenticate, register with the node, greet,
//! then a single loop that writes queued pushes, handles requests in order, sends heartbeats
//! (where the transport has none of its own) and enforces the limits (PROTOCOL §2).
//!
//! Every way out says why with a close code: 1012/1001 shutdown, 4401 token, 4408 silence,
//! 4429 send-queue overflow or flooding, 1009 oversize frame.
//!
//! The seam to a transport is [`Transport`] (it only writes and closes) and a stream of
//! [`Incoming`] items it reads. A shell: reads the clock for deadlines.
#![allow(clippy::disallowed_methods)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use serde_json::value::RawValue;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::{Client, Outcome};
use crate::auth::Authed;
use crate::error::{ApiError, ErrorCode};
use crate::hub::{ConnId, Registration};
use crate::services::Services;
use crate::time::{now_ms, rfc3339_ms};
use crate::wire::chat::ConnectionEstablished;
use crate::wire::close::{self, CloseCode};
use crate::wire::{error_push, events, Failure, Push, Reply};

/// Pushes written in one go at most, when several are waiting for a connection.
const COALESCE: usize = 64;

/// How long a closing connection may take to flush its close frame (and hear the reply).
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Longer for a connection cut for being slow: its close frame waits behind a full buffer,
/// and the client should still learn the code once it reads again.
const SLOW_CLOSE_LINGER: Duration = Duration::from_secs(10);

/// The peer is gone or the transport failed: nothing more can be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// What a transport does for a session: write (a push, a reply, a heartbeat) and close. It
/// frames; it decides nothing.
pub trait Transport: Send {
    /// How the transport answers a request (a WebSocket request `id`, a Socket.IO ack).
    type ReplyTo: Send;

    fn push(&mut self, push: &Push) -> impl Future<Output = Result<(), Gone>> + Send;

    /// Queues a push without writing it yet; [`Transport::flush`] writes what was queued in one
    /// go (several pushes waiting for one connection cost one write, not one each). A transport
    /// that batches by itself keeps the default: a push.
    fn feed(&mut self, push: &Push) -> impl Future<Output = Result<(), Gone>> + Send {
        self.push(push)
    }

    /// Writes what [`Transport::feed`] queued.
    fn flush(&mut self) -> impl Future<Output = Result<(), Gone>> + Send {
        std::future::ready(Ok(()))
    }

    fn reply(
        &mut self,
        to: Self::ReplyTo,
        reply: Result<&Reply, &Failure>,
    ) -> impl Future<Output = Result<(), Gone>> + Send;

    /// A heartbeat (a WebSocket Ping), every [`Liveness::heartbeat`].
    fn ping(&mut self) -> impl Future<Output = Result<(), Gone>> + Send;

    /// Says goodbye with `code`; the session then reads (bounded) until the peer has closed.
    fn close(&mut self, code: CloseCode) -> impl Future<Output = ()> + Send;
}

/// What a transport read.
pub enum Incoming<R> {
    /// A request: its event, its `data` (not yet decoded), and how to answer it (`None`: the
    /// client asked for no reply).
    Request {
        event: String,
        data: Option<Box<RawValue>>,
        reply_to: Option<R>,
    },
    /// Something that is not a request (bad JSON, a binary frame): answered with `error`.
    Invalid {
        error: ApiError,
        event: Option<String>,
        reply_to: Option<R>,
    },
    /// A sign of life without content (a pong).
    Alive,
    /// A frame over the size limit.
    TooLarge,
    /// The peer closed, or the transport failed.
    Closed,
}

/// Timers the session keeps for a transport that has none of its own.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    /// Send a heartbeat this often.
    pub heartbeat: Option<Duration>,
    /// Close with 4408 after this long without anything read.
    pub idle_timeout: Option<Duration>,
}

/// Why the loop ended.
enum End {
    Close(CloseCode),
    /// The peer closed or the transport failed: nothing more to say.
    Gone,
}

/// Token bucket on a connection's inbound events.
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

/// Runs one connection from its first frame to its close. `token` is the access token the
/// transport found, `host` the HTTP Host the client used (for TURN URLs).
pub async fn serve<T, S>(
    services: Arc<Services>,
    token: Option<String>,
    host: String,
    mut transport: T,
    mut incoming: S,
    live: Liveness,
) where
    T: Transport,
    S: Stream<Item = Incoming<T::ReplyTo>> + Unpin + Send,
{
    let _in_flight = services.tracker.token();
    let authed = match token {
        None => Err(ApiError::unauthorized("missing token")),
        Some(t) => services.accounts.authenticate(&t).await,
    };
    let authed = match authed {
        Ok(a) => a,
        Err(e) => return refuse(&mut transport, &mut incoming, &e, close::UNAUTHORIZED).await,
    };
    serve_authed(services, authed, host, transport, incoming, live).await;
}

/// Turns a connection away before its session starts: the `error` that says why, then the close.
async fn refuse<T, S>(transport: &mut T, incoming: &mut S, err: &ApiError, code: CloseCode)
where
    T: Transport,
    S: Stream<Item = Incoming<T::ReplyTo>> + Unpin + Send,
{
    let _ = transport.push(&error_push(err, None)).await;
    goodbye(transport, incoming, code, CLOSE_LINGER).await;
}

/// [`serve`] for a connection whose token the transport already checked (Socket.IO checks it
/// in its handshake, where a refusal is a `connect_error`).
pub async fn serve_authed<T, S>(
    services: Arc<Services>,
    authed: Authed,
    host: String,
    mut transport: T,
    mut incoming: S,
    live: Liveness,
) where
    T: Transport,
    S: Stream<Item = Incoming<T::ReplyTo>> + Unpin + Send,
{
    let _in_flight = services.tracker.token();
    let user_id = authed.user_id;
    let mut reg = match services.node.connect(&user_id).await {
        Ok(reg) => reg,
        Err(too_many) => {
            metrics::counter!("switchboard_ws_refused_total", "reason" => "connections_per_user")
                .increment(1);
            let err = ApiError::new(ErrorCode::RateLimited, too_many.to_string());
            let code = close::TOO_SLOW.because("too many connections");
            return refuse(&mut transport, &mut incoming, &err, code).await;
        }
    };
    let conn_id = reg.conn_id;
    tracing::debug!(user_id = %user_id, conn_id = %conn_id, "connected");
    // Every (re)connect refreshes the TURN credentials. The greeting is dropped once written:
    // an idle connection keeps nothing it no longer needs.
    let hello = hello(&services, &user_id, conn_id, host);
    metrics::gauge!("switchboard_ws_connections").increment(1.0);
    services.calls.connection_up(&user_id, conn_id).await;
    let mut client = Client::new(services.clone(), user_id, conn_id, authed.expires_at);
    let greeted = transport.push(&hello).await;
    drop(hello);
    let end = if greeted.is_err() {
        End::Gone
    } else {
        let mut session = Session {
            services: &services,
            client: &mut client,
            transport: &mut transport,
            incoming: &mut incoming,
            reg: &mut reg,
            live,
        };
        session.run().await
    };
    services.node.disconnect(client.user_id(), conn_id).await;
    metrics::gauge!("switchboard_ws_connections").decrement(1.0);
    drop(reg);
    if let End::Close(code) = end {
        metrics::counter!("switchboard_ws_closes_total", "code" => code.code.to_string())
            .increment(1);
        let linger = if code.code == close::TOO_SLOW.code {
            SLOW_CLOSE_LINGER
        } else {
            CLOSE_LINGER
        };
        let shutting_down =
            code.code == close::RESTARTING.code || code.code == close::GOING_AWAY.code;
        tokio::select! {
            _ = goodbye(&mut transport, &mut incoming, code, linger) => {}
            _ = services.shutdown.cancelled(), if !shutting_down => {}
        }
    }
    services
        .calls
        .connection_down(client.user_id(), conn_id)
        .await;
    tracing::debug!(user_id = %client.user_id(), conn_id = %conn_id, "closed");
}

/// `connection:established`, the first frame of every connection.
fn hello(services: &Services, user_id: &str, conn_id: ConnId, host: String) -> Arc<Push> {
    let (ice_servers, ice_expires) = services.ice_servers(user_id, &host);
    Push::new(
        events::CONNECTION_ESTABLISHED,
        &ConnectionEstablished {
            user_id,
            connection_id: conn_id.to_string(),
            heartbeat_interval_ms: services.config.ws.heartbeat_interval.as_millis() as u64,
            server_time: rfc3339_ms(now_ms()),
            ice_servers: &ice_servers,
            ice_expires_at: ice_expires.map(|e| rfc3339_ms(e * 1000)),
        },
    )
}

/// Closes with `code` and reads until the peer closed too, for at most `linger`.
async fn goodbye<T, S>(transport: &mut T, incoming: &mut S, code: CloseCode, linger: Duration)
where
    T: Transport,
    S: Stream<Item = Incoming<T::ReplyTo>> + Unpin + Send,
{
    let _ = tokio::time::timeout(linger, async {
        transport.close(code).await;
        while let Some(item) = incoming.next().await {
            if matches!(item, Incoming::Closed) {
                break;
            }
        }
    })
    .await;
}

struct Session<'a, T: Transport, S> {
    services: &'a Arc<Services>,
    client: &'a mut Client,
    transport: &'a mut T,
    incoming: &'a mut S,
    reg: &'a mut Registration,
    live: Liveness,
}

impl<T, S> Session<'_, T, S>
where
    T: Transport,
    S: Stream<Item = Incoming<T::ReplyTo>> + Unpin + Send,
{
    async fn run(&mut self) -> End {
        let cfg = &self.services.config.ws;
        let mut ping = self
            .live
            .heartbeat
            .map(|every| tokio::time::interval_at(Instant::now() + every, every));
        let idle = self.live.idle_timeout;
        let mut idle_deadline = idle.map(|d| Instant::now() + d);
        let mut limiter = RateLimit::new(cfg.rate_limit, Instant::now());
        let kill = self.reg.kill.clone();
        let shutdown = self.services.shutdown.clone();
        loop {
            let token_deadline = token_deadline(self.client.token_expires_at());
            let ping_due = async {
                match ping.as_mut() {
                    Some(p) => {
                        p.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let idle_due = async move {
                match idle_deadline {
                    Some(at) => sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.drain_queue().await;
                    return End::Close(self.services.shutdown_close_code());
                }
                _ = kill.cancelled() => return End::Close(close::TOO_SLOW),
                _ = sleep_until(token_deadline) => {
                    let err = ApiError::unauthorized("token expired");
                    let push = error_push(&err, None);
                    let _ = guarded(self.transport.push(&push), &kill, &shutdown).await;
                    return End::Close(close::UNAUTHORIZED.because("token expired"));
                }
                _ = idle_due => return End::Close(close::HEARTBEAT_TIMEOUT),
                _ = ping_due => {
                    // A failed write is seen by the next turn of the loop.
                    let _ = guarded(self.transport.ping(), &kill, &shutdown).await;
                }
                push = self.reg.rx.recv() => {
                    let Some(push) = push else { return End::Gone };
                    // What else is queued for this connection goes out in the same write. A
                    // push alone (the common case) is written as it is: no batch to build.
                    let next = self.reg.rx.try_recv().ok();
                    let Some(next) = next else {
                        if guarded(self.transport.push(&push), &kill, &shutdown).await.is_ok() {
                            self.client.pushed(&push).await;
                        }
                        continue;
                    };
                    let mut batch = vec![push, next];
                    while batch.len() < COALESCE {
                        match self.reg.rx.try_recv() {
                            Ok(p) => batch.push(p),
                            Err(_) => break,
                        }
                    }
                    let transport = &mut self.transport;
                    // Boxed: inline, this write's state would size every connection's task.
                    let wrote = Box::pin(async {
                        for p in &batch {
                            transport.feed(p).await?;
                        }
                        transport.flush().await
                    });
                    if guarded(wrote, &kill, &shutdown).await.is_ok() {
                        for p in &batch {
                            self.client.pushed(p).await;
                        }
                    }
                }
                item = self.incoming.next() => {
                    let item = match item {
                        None | Some(Incoming::Closed) => return End::Gone,
                        Some(Incoming::TooLarge) => return End::Close(close::TOO_LARGE),
                        Some(item) => item,
                    };
                    idle_deadline = idle.map(|d| Instant::now() + d);
                    let wants = match &item {
                        Incoming::Alive => continue,
                        Incoming::Request { reply_to, .. } | Incoming::Invalid { reply_to, .. } => {
                            reply_to.is_some()
                        }
                        Incoming::Closed | Incoming::TooLarge => unreachable!("handled above"),
                    };
                    let limited = self.limited(&mut limiter, wants);
                    let (reply_to, outcome) = match (item, limited) {
                        (_, Some(Err(end))) => return end,
                        (
                            Incoming::Request { reply_to, .. } | Incoming::Invalid { reply_to, .. },
                            Some(Ok(outcome)),
                        ) => (reply_to, outcome),
                        (Incoming::Invalid { error, event, reply_to }, None) => {
                            (reply_to, Outcome::failed(&error, event.as_deref(), wants))
                        }
                        (Incoming::Request { event, data, reply_to }, None) => {
                            // Boxed: an idle connection then holds a pointer, not the largest
                            // handler's state.
                            let outcome =
                                Box::pin(self.client.handle(&event, data.as_deref(), wants)).await;
                            (reply_to, outcome)
                        }
                        (Incoming::Alive | Incoming::Closed | Incoming::TooLarge, _) => {
                            unreachable!("handled above")
                        }
                    };
                    // Boxed: the write's state would otherwise size every idle connection's
                    // task (it is the largest thing this loop awaits; measured with
                    // -Zprint-type-sizes), for one small allocation per request.
                    Box::pin(self.write(reply_to, outcome, &kill, &shutdown)).await;
                }
            }
        }
    }

    /// `None` when the event may go on; else the answer to a limited event, or the end of a
    /// connection that keeps flooding.
    fn limited(
        &self,
        limiter: &mut Option<RateLimit>,
        wants_reply: bool,
    ) -> Option<Result<Outcome, End>> {
        let l = limiter.as_mut()?;
        if l.allow(Instant::now()) {
            return None;
        }
        if l.rejected_in_row as f64 > l.burst {
            return Some(Err(End::Close(close::TOO_SLOW.because("rate limited"))));
        }
        let err = ApiError::new(ErrorCode::RateLimited, "too many events; slow down");
        Some(Ok(Outcome::failed(&err, None, wants_reply)))
    }

    async fn write(
        &mut self,
        reply_to: Option<T::ReplyTo>,
        outcome: Outcome,
        kill: &CancellationToken,
        shutdown: &CancellationToken,
    ) {
        // The pushes and the reply of one request leave in one write (a reply writes what was
        // fed before it).
        for push in &outcome.pushes {
            if guarded(self.transport.feed(push), kill, shutdown)
                .await
                .is_err()
            {
                return;
            }
        }
        let written = match (reply_to, &outcome.reply) {
            (Some(to), Some(reply)) => {
                guarded(self.transport.reply(to, reply.as_ref()), kill, shutdown).await
            }
            _ => guarded(self.transport.flush(), kill, shutdown).await,
        };
        if written.is_err() {
            return;
        }
        self.client.delivered(outcome.delivered).await;
    }

    /// Writes what is already queued for this connection (e.g. the `call:end` of a shutdown),
    /// within a short bound: a stopping server does not wait for slow readers.
    async fn drain_queue(&mut self) {
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            while let Ok(push) = self.reg.rx.try_recv() {
                if self.transport.push(&push).await.is_err() {
                    return;
                }
            }
        })
        .await;
    }
}

fn token_deadline(expires_at_secs: i64) -> Instant {
    let left_ms = (expires_at_secs * 1000 - now_ms()).max(0) as u64;
    Instant::now() + Duration::from_millis(left_ms)
}

/// One write, unless the connection is being cut meanwhile (a blocked write to a reader that
/// stopped reading must not keep the session from closing).
async fn guarded(
    write: impl Future<Output = Result<(), Gone>>,
    kill: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<(), Gone> {
    tokio::select! {
        // A write that is ready wins over a cut that is ready too: the reply to a durable
        // write is not dropped at shutdown by a coin toss.
        biased;
        r = write => r,
        _ = kill.cancelled() => Err(Gone),
        _ = shutdown.cancelled() => Err(Gone),
    }
}

//! The Socket.IO transport (PROTOCOL §7): Socket.IO v4 / Engine.IO v4 on `/socket.io/`, the
//! default namespace, `websocket` and `polling` with the upgrade, through `socketioxide` as a
//! tower layer in the same router. It is a transport and nothing more: each socket is one
//! ordinary connection of `client::session` (the hub's registry, our broker, the same limits,
//! acks after durable writes); socketioxide's rooms and adapters are not used.
//!
//! - The handshake's `auth.token` (with or without `Bearer `, or `?token=`) is checked before
//!   the namespace connects; a refusal is a `connect_error` whose message is `unauthorized`.
//! - Every event reaches the session in the order it arrived: the handler that receives them
//!   runs on socketioxide's receive path (no task per event) and queues them.
//! - Pushes are emits under their §2 names; replies are acks with §7's shapes ([`legacy`]);
//!   with `socketio.legacy_events` the seeds' older event names go out too.
//!
//! Must not import `store`.

pub mod legacy;

use std::future::Future as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use serde::Deserialize;
use serde_json::value::RawValue;
use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::{AckSender, SocketRef, TryData};
use socketioxide::handler::{
    ConnectHandler, DisconnectHandler, FromMessageParts, MessageHandler, Value,
};
use socketioxide::socket::{DisconnectReason, Socket};
use socketioxide::{SendError, SocketError, SocketIo};
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authed;
use crate::client::session::{self, Gone, Incoming, Liveness, Transport};
use crate::error::ApiError;
use crate::services::Services;
use crate::wire::close::{self, CloseCode};
use crate::wire::{Failure, Push, Reply};

/// Events a socket may have queued before the session takes them; beyond, each is refused with
/// `rate_limited` at once (socketioxide reads ahead of us, so this is the back-pressure).
const INBOX: usize = 256;
/// A queued event, boxed: a tokio channel allocates its first block of 32 slots up front, and
/// with the event inline that block was 3 kB of every idle socket (heaptrack); boxed, 0.3 kB.
/// With its size in bytes, for the inbox's byte budget.
type Boxed = Box<(Incoming<Ack>, usize)>;

/// Where a request's ack goes: the socket and the client's ack id. socketioxide's `AckSender`
/// is spent by one try; a full Engine.IO buffer needs another, so one is made per try.
pub struct Ack {
    socket: Arc<Socket<LocalAdapter>>,
    id: i64,
}

impl Ack {
    fn try_send(&self, body: &RawValue) -> Result<(), SendError> {
        let mut nothing = Value::Bytes(Default::default());
        let Ok(sender) = AckSender::from_message_parts(&self.socket, &mut nothing, &Some(self.id));
        sender.send(body)
    }
}
/// How long a full Engine.IO buffer (a client that is not polling) is waited for: the first
/// try, doubled per try up to [`FULL_RETRY_MAX`] (the session's guard or Engine.IO's heartbeat
/// ends the wait).
const FULL_RETRY: Duration = Duration::from_millis(20);
const FULL_RETRY_MAX: Duration = Duration::from_secs(1);
/// Bytes of events a socket may have queued before the session takes them (socketioxide reads
/// ahead without back-pressure: 256 events of `ws.max_frame_bytes` would be 16 MiB).
const INBOX_BYTES: usize = 1 << 20;
/// How long shutdown waits for sessions to write what they had queued before the transports
/// are closed.
const DRAIN: Duration = Duration::from_secs(2);

/// The Socket.IO side of the server, for `app` to mount and to stop.
#[derive(Clone)]
pub struct SocketIoServer {
    io: SocketIo,
    /// One token per live session, given back once it has written its last push at shutdown.
    sessions: TaskTracker,
}

/// The tower layer to put on the router, and the server to stop at shutdown.
pub fn layer(services: Arc<Services>) -> (socketioxide::layer::SocketIoLayer, SocketIoServer) {
    let ws = &services.config.ws;
    let (layer, io) = SocketIo::builder()
        .req_path("/socket.io")
        .ping_interval(ws.heartbeat_interval)
        // A client that has not answered a ping by the time a WebSocket one would be cut (4408)
        // is gone; its session is reaped with it.
        .ping_timeout(ws.idle_timeout.saturating_sub(ws.heartbeat_interval))
        // One request or frame is at most what one WebSocket frame may be.
        .max_payload(ws.max_frame_bytes as u64)
        .ws_max_message_size(ws.max_frame_bytes)
        .ws_max_frame_size(ws.max_frame_bytes)
        .ws_read_buffer_size(2048)
        .max_buffer_size(ws.send_queue)
        .connect_timeout(Duration::from_secs(10))
        .build_layer();
    let sessions = TaskTracker::new();
    let server = SocketIoServer {
        io: io.clone(),
        sessions: sessions.clone(),
    };
    let gate_services = services.clone();
    let gate = move |s: SocketRef, TryData(auth): TryData<HandshakeAuth>| {
        let services = gate_services.clone();
        async move { admit(&services, &s, auth.ok()).await }
    };
    let on_connect = move |s: SocketRef| {
        let (services, sessions) = (services.clone(), sessions.clone());
        async move { start(services, sessions, s) }
    };
    io.ns("/", on_connect.with(gate));
    (layer, server)
}

impl SocketIoServer {
    /// At shutdown: give sessions a moment to write what they had queued (a `call:end`), then
    /// close every transport. Clients see the transport close and reconnect by themselves, as
    /// after a WebSocket 1012.
    pub async fn shutdown(&self) {
        self.sessions.close();
        let _ = tokio::time::timeout(DRAIN, self.sessions.wait()).await;
        self.io.close().await;
    }
}

/// Copies a `/socket.io/` request's URI and header values out of the connection's read buffer.
///
/// hyper parses them as slices of that buffer (8 to 16 KiB), and socketioxide keeps each
/// session's handshake request for as long as the session lives: without the copy, every idle
/// Socket.IO client held a whole read buffer (39 kB per idle client instead of 15 in the
/// benchmark, heaptrack's peak consumers). Other requests pass untouched.
pub async fn detach_head(mut req: axum::extract::Request) -> axum::extract::Request {
    if !req.uri().path().starts_with("/socket.io") {
        return req;
    }
    if let Ok(uri) = req.uri().to_string().parse() {
        *req.uri_mut() = uri;
    }
    for value in req.headers_mut().values_mut() {
        if let Ok(owned) = axum::http::HeaderValue::from_bytes(value.as_bytes()) {
            let sensitive = value.is_sensitive();
            *value = owned;
            value.set_sensitive(sensitive);
        }
    }
    req
}

/// The handshake's `auth` object.
#[derive(Debug, Default, Deserialize)]
struct HandshakeAuth {
    #[serde(default)]
    token: Option<String>,
}

/// Why a handshake was refused: the `connect_error` message.
#[derive(Debug)]
struct Refused(&'static str);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// What the gate hands the connect handler (through the socket's extensions).
#[derive(Clone)]
struct Admitted(Arc<Mutex<Option<(Authed, Inbound)>>>);

/// The token of a handshake: `auth.token` with or without `Bearer `, else `?token=`.
fn handshake_token(auth: Option<HandshakeAuth>, query: Option<&str>) -> Option<String> {
    let from_auth = auth.and_then(|a| a.token).map(|t| {
        let t = t.trim();
        match (t.get(..6), t.get(6..)) {
            (Some(p), Some(rest))
                if p.eq_ignore_ascii_case("bearer")
                    && (rest.is_empty() || rest.starts_with(char::is_whitespace)) =>
            {
                rest.trim().to_owned()
            }
            _ => t.to_owned(),
        }
    });
    from_auth
        .filter(|t| !t.is_empty())
        .or_else(|| crate::http::extract::query_token(query))
}

/// The connect middleware: authenticates, and installs the receiving side before the namespace
/// connects (an event sent right after connecting must not find no handler).
async fn admit(
    services: &Services,
    s: &SocketRef,
    auth: Option<HandshakeAuth>,
) -> Result<(), Refused> {
    let token = handshake_token(auth, s.req_parts().uri.query()).ok_or(Refused("unauthorized"))?;
    let authed = services
        .accounts
        .authenticate(&token)
        .await
        .map_err(|_| Refused("unauthorized"))?;
    let (tx, rx) = mpsc::channel(INBOX);
    let gone = CancellationToken::new();
    let queued = Arc::new(AtomicUsize::new(0));
    s.on_fallback(Queue {
        tx,
        queued: queued.clone(),
        aliases: services.config.socketio.legacy_events,
    });
    s.on_disconnect(Hangup(gone.clone()));
    s.extensions.insert(Admitted(Arc::new(Mutex::new(Some((
        authed,
        Inbound::new(rx, queued, gone),
    ))))));
    Ok(())
}

/// The connect handler: the session runs from here.
fn start(services: Arc<Services>, sessions: TaskTracker, s: SocketRef) {
    let Some((authed, inbound)) = s
        .extensions
        .remove::<Admitted>()
        .and_then(|a| a.0.lock().expect("admitted lock").take())
    else {
        let _ = s.disconnect();
        return;
    };
    let host = s
        .req_parts()
        .headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_owned();
    let transport = SioTransport {
        legacy: services.config.socketio.legacy_events,
        socket: s,
        draining: Some(sessions.token()),
    };
    // Engine.IO keeps the heartbeat (ping/pong, its own timeout) for this transport.
    let live = Liveness {
        heartbeat: None,
        idle_timeout: None,
    };
    tokio::spawn(session::serve_authed(
        services, authed, host, transport, inbound, live,
    ));
}

/// Receives every event of a socket, in order, on socketioxide's receive path.
#[derive(Clone)]
struct Queue {
    tx: mpsc::Sender<Boxed>,
    /// Bytes queued and not yet taken by the session (shared with [`Inbound`]).
    queued: Arc<AtomicUsize>,
    /// Translate the seeds' older event names (`send-message`, ...).
    aliases: bool,
}

/// Marker for [`Queue`]'s handler impl.
struct Queued;

impl MessageHandler<LocalAdapter, Queued> for Queue {
    fn call(&self, s: Arc<Socket<LocalAdapter>>, v: Value, ack_id: Option<i64>) {
        let ack = ack_id.map(|id| Ack {
            socket: s.clone(),
            id,
        });
        let (item, size) = match &v {
            Value::Str(text, None) => (decode(text, self.aliases, ack), text.len()),
            // Attachments would be dropped and a placeholder read as the data: refused.
            _ => (
                Incoming::Invalid {
                    error: ApiError::bad_request("binary events are not supported; send JSON"),
                    event: None,
                    reply_to: ack,
                },
                0,
            ),
        };
        let over_budget = self.queued.load(Ordering::Acquire) + size > INBOX_BYTES;
        let refused = if over_budget {
            Some(item)
        } else {
            self.queued.fetch_add(size, Ordering::AcqRel);
            match self.tx.try_send(Box::new((item, size))) {
                Ok(()) => None,
                Err(mpsc::error::TrySendError::Full(item)) => {
                    self.queued.fetch_sub(size, Ordering::AcqRel);
                    Some(item.0)
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    // The session is over while the socket still connects: nothing would ever
                    // answer, so the client must see the disconnect and reconnect.
                    let _ = s.clone().disconnect();
                    None
                }
            }
        };
        if let Some(item) = refused {
            // More queued than the session takes: refuse this one now, in the shapes of §7.
            let err = ApiError::new(
                crate::error::ErrorCode::RateLimited,
                "too many events; slow down",
            );
            match item {
                Incoming::Request {
                    reply_to: Some(ack),
                    ..
                }
                | Incoming::Invalid {
                    reply_to: Some(ack),
                    ..
                } => {
                    let _ = ack.try_send(&legacy::ack_failure(&Failure::from(&err)));
                }
                _ => {
                    let push = crate::wire::error_push(&err, None);
                    let _ = s.emit(push.event(), push.data());
                }
            }
        }
    }
}

/// What a Socket.IO client's event text becomes, with and without the seeds' aliases, down to
/// the typed request (for `crate::fuzzing`).
#[doc(hidden)]
pub fn fuzz_decode(text: &str) {
    for aliases in [false, true] {
        if let Incoming::Request { event, data, .. } = decode(text, aliases, None) {
            let _ = crate::wire::Request::decode(&event, data.as_deref());
        }
    }
}

/// `["event", data, ...]` as a request (extra arguments are ignored; the ack is the callback).
fn decode(text: &str, aliases: bool, reply_to: Option<Ack>) -> Incoming<Ack> {
    let parts: Vec<&RawValue> = match serde_json::from_str(text) {
        Ok(p) => p,
        Err(e) => {
            return Incoming::Invalid {
                error: ApiError::bad_request(format!("invalid event: {e}")),
                event: None,
                reply_to,
            }
        }
    };
    let event: Option<String> = parts
        .first()
        .and_then(|e| serde_json::from_str(e.get()).ok());
    let Some(event) = event else {
        return Incoming::Invalid {
            error: ApiError::bad_request("invalid event: no event name"),
            event: None,
            reply_to,
        };
    };
    let event = if aliases {
        legacy::incoming_name(&event).unwrap_or(&event).to_owned()
    } else {
        event
    };
    Incoming::Request {
        event,
        data: parts.get(1).map(|d| (*d).to_owned()),
        reply_to,
    }
}

/// Ends the session's stream when the socket disconnects.
struct Hangup(CancellationToken);

impl DisconnectHandler<LocalAdapter, Queued> for Hangup {
    fn call_with_defer(
        &self,
        s: Arc<Socket<LocalAdapter>>,
        _reason: DisconnectReason,
        defer: fn(Arc<Socket<LocalAdapter>>),
    ) {
        self.0.cancel();
        defer(s);
    }
}

/// A socket's requests as the session's stream: what was queued first, then `Closed` once the
/// socket is gone.
struct Inbound {
    rx: mpsc::Receiver<Boxed>,
    queued: Arc<AtomicUsize>,
    gone: Pin<Box<WaitForCancellationFutureOwned>>,
    ended: bool,
}

impl Inbound {
    fn new(rx: mpsc::Receiver<Boxed>, queued: Arc<AtomicUsize>, gone: CancellationToken) -> Self {
        Self {
            rx,
            queued,
            gone: Box::pin(gone.cancelled_owned()),
            ended: false,
        }
    }
}

impl Stream for Inbound {
    type Item = Incoming<Ack>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => {
                let (item, size) = *item;
                self.queued.fetch_sub(size, Ordering::AcqRel);
                return Poll::Ready(Some(item));
            }
            Poll::Ready(None) => {
                self.ended = true;
                return Poll::Ready(Some(Incoming::Closed));
            }
            Poll::Pending => {}
        }
        match self.gone.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.ended = true;
                Poll::Ready(Some(Incoming::Closed))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A socket as a session's transport.
struct SioTransport {
    socket: SocketRef,
    legacy: bool,
    /// Held until the session has written its last push at shutdown.
    draining: Option<TaskTrackerToken>,
}

/// Runs `send` until the Engine.IO buffer has room for it (a polling client between polls, a
/// reader catching up), backing off from [`FULL_RETRY`] to [`FULL_RETRY_MAX`]; the session's
/// guard or Engine.IO's heartbeat ends the wait. `Err` only when the socket is closed.
async fn while_full<E>(
    mut send: impl FnMut() -> Result<(), E>,
    full: impl Fn(&E) -> bool,
) -> Result<(), E> {
    let mut wait = FULL_RETRY;
    loop {
        match send() {
            Err(e) if full(&e) => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(FULL_RETRY_MAX);
            }
            other => return other,
        }
    }
}

/// [`while_full`] for an emit or an ack: a closed socket is [`Gone`], an encoding failure is
/// logged and skipped.
async fn send_or_wait(send: impl FnMut() -> Result<(), SendError>, what: &str) -> Result<(), Gone> {
    let full = |e: &SendError| matches!(e, SendError::Socket(SocketError::InternalChannelFull));
    match while_full(send, full).await {
        Ok(()) => Ok(()),
        Err(SendError::Socket(_)) => Err(Gone),
        Err(SendError::Serialize(e)) => {
            tracing::warn!(error = %e, what, "could not encode");
            Ok(())
        }
    }
}

impl SioTransport {
    /// Emits, waiting while the Engine.IO buffer is full.
    async fn emit(&self, event: &str, data: &RawValue) -> Result<(), Gone> {
        send_or_wait(|| self.socket.emit(event, data), event).await
    }
}

impl Transport for SioTransport {
    type ReplyTo = Ack;

    async fn push(&mut self, push: &Push) -> Result<(), Gone> {
        self.emit(push.event(), push.data()).await?;
        if self.legacy {
            if let Some((event, data)) = legacy::outgoing(push) {
                self.emit(event, &data).await?;
            }
        }
        Ok(())
    }

    async fn reply(&mut self, ack: Ack, reply: Result<&Reply, &Failure>) -> Result<(), Gone> {
        let body = match reply {
            Ok(r) => legacy::ack_success(r),
            Err(f) => legacy::ack_failure(f),
        };
        // An ack is waited for like a push (a polling client between polls): dropping it would
        // leave the client's callback waiting for a write that happened.
        send_or_wait(|| ack.try_send(&body), "an ack").await
    }

    async fn ping(&mut self) -> Result<(), Gone> {
        Ok(())
    }

    async fn close(&mut self, code: CloseCode) {
        if code.code == close::RESTARTING.code || code.code == close::GOING_AWAY.code {
            // Shutdown closes the transports once every session has written its last push,
            // so clients reconnect by themselves (a namespace disconnect would stop them).
            self.draining = None;
            return;
        }
        // Socket.IO has no close codes: the session already pushed the `error` that says why
        // where §2 sends one; the namespace disconnect ends it. The disconnect packet needs room
        // in the Engine.IO buffer (a slow reader filled it): it is retried until it goes or
        // the socket is gone, so no socket stays connected with no session behind it.
        let socket = self.socket.clone();
        tokio::spawn(async move {
            let full = |e: &SocketError| matches!(e, SocketError::InternalChannelFull);
            let _ = while_full(|| socket.clone().disconnect(), full).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_tokens_with_or_without_bearer() {
        let auth = |t: &str| {
            Some(HandshakeAuth {
                token: Some(t.into()),
            })
        };
        assert_eq!(
            handshake_token(auth("Bearer abc"), None).as_deref(),
            Some("abc")
        );
        assert_eq!(
            handshake_token(auth("bearer  abc "), None).as_deref(),
            Some("abc")
        );
        assert_eq!(handshake_token(auth("abc"), None).as_deref(), Some("abc"));
        assert_eq!(
            handshake_token(auth(""), Some("token=q")).as_deref(),
            Some("q")
        );
        assert_eq!(handshake_token(None, Some("token=q")).as_deref(), Some("q"));
        assert_eq!(handshake_token(None, None), None);
        assert_eq!(handshake_token(auth("Bearer "), None), None);
    }

    fn request(text: &str, aliases: bool) -> (String, Option<String>) {
        match decode(text, aliases, None) {
            Incoming::Request { event, data, .. } => (event, data.map(|d| d.get().to_owned())),
            _ => panic!("not a request: {text}"),
        }
    }

    #[test]
    fn events_decode_with_their_first_argument_and_old_names() {
        assert_eq!(
            request(r#"["message",{"chatId":"c"}]"#, true),
            ("message".into(), Some(r#"{"chatId":"c"}"#.into()))
        );
        assert_eq!(request(r#"["ping"]"#, true), ("ping".into(), None));
        assert_eq!(
            request(r#"["send-message",{"a":1},"extra"]"#, true).0,
            "message"
        );
        assert_eq!(request(r#"["join-chat",{}]"#, true).0, "chat:join");
        assert_eq!(request(r#"["leave-chat",{}]"#, true).0, "chat:leave");
        assert_eq!(request(r#"["send-message",{}]"#, false).0, "send-message");
        assert!(matches!(
            decode("[1]", true, None),
            Incoming::Invalid { .. }
        ));
        assert!(matches!(
            decode("nope", true, None),
            Incoming::Invalid { .. }
        ));
    }
}

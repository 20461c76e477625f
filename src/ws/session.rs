//! A WebSocket as a `client::session` transport: writes push frames (framed once per push and
//! shared), replies, Pings and the close frame; reads text frames as requests. The session
//! itself (auth, queue, limits, close codes) is `client::session`'s.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, Stream, StreamExt};

use super::codec;
use crate::client::session::{self, Gone, Incoming, Liveness, Transport};
use crate::error::ApiError;
use crate::services::Services;
use crate::wire::close::CloseCode;
use crate::wire::{Failure, Push, Reply};

/// Runs one upgraded socket until it closes.
pub async fn run(socket: WebSocket, services: Arc<Services>, token: Option<String>, host: String) {
    let (sink, stream) = socket.split();
    let max = services.config.ws.max_frame_bytes;
    let live = Liveness {
        heartbeat: Some(services.config.ws.heartbeat_interval),
        idle_timeout: Some(services.config.ws.idle_timeout),
    };
    let incoming = requests(stream, max);
    session::serve(services, token, host, WsTransport { sink }, incoming, live).await;
}

struct WsTransport {
    sink: SplitSink<WebSocket, Message>,
}

impl WsTransport {
    async fn send(&mut self, m: Message) -> Result<(), Gone> {
        self.sink.send(m).await.map_err(|_| Gone)
    }
}

impl Transport for WsTransport {
    type ReplyTo = i64;

    async fn push(&mut self, push: &Push) -> Result<(), Gone> {
        let text = Utf8Bytes::try_from(codec::push_frame(push)).map_err(|_| Gone)?;
        self.send(Message::Text(text)).await
    }

    async fn feed(&mut self, push: &Push) -> Result<(), Gone> {
        let text = Utf8Bytes::try_from(codec::push_frame(push)).map_err(|_| Gone)?;
        self.sink.feed(Message::Text(text)).await.map_err(|_| Gone)
    }

    async fn flush(&mut self) -> Result<(), Gone> {
        self.sink.flush().await.map_err(|_| Gone)
    }

    async fn reply(&mut self, id: i64, reply: Result<&Reply, &Failure>) -> Result<(), Gone> {
        self.send(Message::Text(codec::reply_frame(id, reply).into()))
            .await
    }

    async fn ping(&mut self) -> Result<(), Gone> {
        self.send(Message::Ping(Default::default())).await
    }

    async fn close(&mut self, code: CloseCode) {
        let frame = CloseFrame {
            code: code.code,
            reason: code.reason.into(),
        };
        let _ = self.send(Message::Close(Some(frame))).await;
    }
}

fn is_too_long(err: &axum::Error) -> bool {
    let text = err.to_string();
    // axum wraps tungstenite's error; its capacity variant is the only "too long" one.
    text.contains("Space limit exceeded") || text.contains("too long")
}

/// What the socket reads, as the session's items.
fn requests(
    stream: SplitStream<WebSocket>,
    max_frame_bytes: usize,
) -> impl Stream<Item = Incoming<i64>> + Unpin + Send {
    stream.map(move |m| match m {
        Err(e) if is_too_long(&e) => Incoming::TooLarge,
        Err(_) => Incoming::Closed,
        Ok(Message::Text(t)) if t.len() > max_frame_bytes => Incoming::TooLarge,
        Ok(Message::Text(t)) => codec::decode(t.as_str()),
        Ok(Message::Binary(_)) => Incoming::Invalid {
            error: ApiError::bad_request("binary frames are not supported; send JSON text"),
            event: None,
            reply_to: None,
        },
        Ok(Message::Ping(_) | Message::Pong(_)) => Incoming::Alive,
        Ok(Message::Close(_)) => Incoming::Closed,
    })
}

//! The broker across machines (PROTOCOL §8): Redis pub/sub, with the `redis` crate's
//! reconnecting connection manager for publishing and a subscription that reconnects by itself.
//!
//! - A publication is delivered to this node's own connections at once, without Redis (so one
//!   node keeps serving its users while Redis is away), and published on `{prefix}pub` for the
//!   others; a node skips what it published itself when it comes back.
//! - A control message goes to `{prefix}node:{id}`, the channel of the node that holds the
//!   connection (a call's signals reach the callee's device wherever it is connected).
//! - Publishing never makes a sender wait for Redis: pushes queue (bounded) for one task that
//!   sends what is queued in one pipeline. While Redis is unreachable the queue drops what does
//!   not fit (`switchboard_broker_dropped_total`): PostgreSQL holds every message, and clients
//!   close such gaps with `sync` (§8). Pushes are at most once across nodes.
//!
//! A shell: reads the clock for the lag metric.
#![allow(clippy::disallowed_methods)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::broker::{Broker, BrokerError, Control, Publication, Subscriber};
use super::{ConnId, NodeId};
use crate::time::now_ms;
use crate::wire::{MessageRef, Push};

/// Pushes waiting to be published before new ones are dropped (Redis slow or away).
const QUEUE: usize = 16_384;
/// Pushes sent in one pipeline at most.
const BATCH: usize = 512;
/// How long one Redis command may take before it counts as failed.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Every node publishes a ping on its own channel this often, and takes a subscription that
/// heard nothing (not even its pings) for [`SILENCE`] for dead: a half-open TCP connection to
/// Redis would otherwise look subscribed forever.
const PING_EVERY: Duration = Duration::from_secs(3);
const SILENCE: Duration = Duration::from_secs(10);
/// Reconnection back-off of the subscription: from the first to the last value, doubling.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

pub struct RedisBroker {
    client: redis::Client,
    prefix: String,
    /// This process's node and its subscriber, once subscribed.
    local: RwLock<Option<(NodeId, Arc<dyn Subscriber>)>>,
    out: mpsc::Sender<(String, Vec<u8>)>,
    /// Both the subscription and the last publish worked.
    subscribed: Arc<AtomicBool>,
    publishing: Arc<AtomicBool>,
    stop: CancellationToken,
}

/// What travels on `{prefix}pub`.
#[derive(Serialize, Deserialize)]
struct PubEnvelope<'a> {
    /// The publishing node.
    o: u64,
    /// When it was published (unix ms), for the lag metric.
    t: i64,
    u: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    c: Option<String>,
    e: &'a str,
    #[serde(borrow)]
    d: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    m: Option<MessageRef>,
}

/// What travels on `{prefix}node:{id}`: a push for one connection of that node.
#[derive(Serialize, Deserialize)]
struct ControlEnvelope<'a> {
    t: i64,
    u: String,
    /// The connection: its node and its id.
    n: u64,
    i: String,
    e: &'a str,
    #[serde(borrow)]
    d: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    m: Option<MessageRef>,
}

/// A node's ping to itself, on its own channel.
#[derive(Serialize, Deserialize)]
struct PingEnvelope {
    ping: i64,
}

/// What travels on `{prefix}node:{id}` for the calls machine: opaque to the broker.
#[derive(Serialize, Deserialize)]
struct CallEnvelope<'a> {
    t: i64,
    /// The sending node.
    f: u64,
    #[serde(borrow)]
    call: std::borrow::Cow<'a, str>,
}

impl RedisBroker {
    /// A broker on the Redis server at `url` (`redis://…`, `rediss://…` for TLS), its channels
    /// named with `prefix` (nodes of one cluster share it). Connects once to check the URL and
    /// the server; later outages are ridden out.
    pub async fn connect(url: &str, prefix: &str) -> Result<Arc<Self>, BrokerError> {
        let unavailable = |e: redis::RedisError| BrokerError::Unavailable(e.to_string());
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_max_delay(BACKOFF.1)
            .set_number_of_retries(1);
        let conn = redis::aio::ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(unavailable)?;
        let (out, rx) = mpsc::channel(QUEUE);
        let broker = Arc::new(Self {
            client,
            prefix: prefix.to_owned(),
            local: RwLock::new(None),
            out,
            subscribed: Arc::new(AtomicBool::new(false)),
            publishing: Arc::new(AtomicBool::new(true)),
            stop: CancellationToken::new(),
        });
        tokio::spawn(publisher(
            conn,
            rx,
            broker.publishing.clone(),
            broker.stop.clone(),
        ));
        Ok(broker)
    }

    fn all_channel(&self) -> String {
        format!("{}pub", self.prefix)
    }

    fn node_channel(&self, node: NodeId) -> String {
        format!("{}node:{}", self.prefix, node.0)
    }

    fn local(&self) -> Option<(NodeId, Arc<dyn Subscriber>)> {
        self.local.read().expect("broker lock").clone()
    }

    fn enqueue(&self, channel: String, payload: Vec<u8>) -> Result<(), BrokerError> {
        match self.out.try_send((channel, payload)) {
            Ok(()) => Ok(()),
            Err(_) => {
                metrics::counter!("switchboard_broker_dropped_total").increment(1);
                Err(BrokerError::Unavailable(
                    "the queue to Redis is full; the push was dropped (clients sync)".into(),
                ))
            }
        }
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, p: Publication) -> Result<(), BrokerError> {
        let Some((node, sub)) = self.local() else {
            return Err(BrokerError::Unavailable("not subscribed yet".into()));
        };
        sub.publication(&p);
        let payload = serde_json::to_vec(&PubEnvelope {
            o: node.0,
            t: now_ms(),
            u: p.users,
            c: p.only_open_chat,
            e: p.push.event(),
            d: p.push.data(),
            m: p.push.message_ref().cloned(),
        })
        .expect("plain data serialises");
        self.enqueue(self.all_channel(), payload)
    }

    async fn send_control(&self, to: NodeId, c: Control) -> Result<(), BrokerError> {
        if let Some((node, sub)) = self.local() {
            if node == to {
                sub.control(c);
                return Ok(());
            }
        }
        let (user, conn, push) = match c {
            Control::Deliver { user, conn, push } => (user, conn, push),
            Control::Call { from, body } => {
                let payload = serde_json::to_vec(&CallEnvelope {
                    t: now_ms(),
                    f: from.0,
                    call: std::borrow::Cow::Borrowed(&body),
                })
                .expect("plain data serialises");
                return self.enqueue(self.node_channel(to), payload);
            }
        };
        let payload = serde_json::to_vec(&ControlEnvelope {
            t: now_ms(),
            u: user,
            n: conn.node().0,
            i: conn.uuid().to_string(),
            e: push.event(),
            d: push.data(),
            m: push.message_ref().cloned(),
        })
        .expect("plain data serialises");
        self.enqueue(self.node_channel(to), payload)
    }

    /// Subscribes `node` to its channels and waits (up to 3 s) for the subscription: if Redis
    /// is away it goes on trying in the background and `is_healthy` says so meanwhile.
    async fn subscribe(&self, node: NodeId, sub: Arc<dyn Subscriber>) -> Result<(), BrokerError> {
        {
            let mut local = self.local.write().expect("broker lock");
            if local.is_some() {
                return Err(BrokerError::AlreadySubscribed(node));
            }
            *local = Some((node, sub.clone()));
        }
        let (ready, is_ready) = oneshot::channel();
        let (out, channel, stop) = (self.out.clone(), self.node_channel(node), self.stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PING_EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let ping = serde_json::to_vec(&PingEnvelope { ping: now_ms() })
                    .expect("plain data serialises");
                // Dropped when the queue is full: the queue is then busy enough to prove life.
                let _ = out.try_send((channel.clone(), ping));
            }
        });
        tokio::spawn(listen(
            self.client.clone(),
            [self.all_channel(), self.node_channel(node)],
            node,
            sub,
            self.subscribed.clone(),
            self.stop.clone(),
            ready,
        ));
        if tokio::time::timeout(Duration::from_secs(3), is_ready)
            .await
            .is_err()
        {
            tracing::warn!("Redis subscription not up yet; retrying in the background");
        }
        Ok(())
    }

    /// Whether Redis works for this node now (`/readyz`).
    fn is_healthy(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed) && self.publishing.load(Ordering::Relaxed)
    }

    async fn unsubscribe(&self, _node: NodeId) {
        *self.local.write().expect("broker lock") = None;
        self.stop.cancel();
    }
}

/// Sends queued pushes, all that are queued in one pipeline, until `stop`. While the last
/// publish failed it pings Redis every second, so readiness comes back with Redis even when
/// nothing is published (an unready node gets no traffic to publish).
async fn publisher(
    mut conn: redis::aio::ConnectionManager,
    mut rx: mpsc::Receiver<(String, Vec<u8>)>,
    healthy: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut probe = tokio::time::interval(Duration::from_secs(1));
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => return,
            n = rx.recv_many(&mut batch, BATCH) => n,
            _ = probe.tick(), if !healthy.load(Ordering::Relaxed) => {
                let cmd = redis::cmd("PING");
                let ping = cmd.query_async::<()>(&mut conn);
                if matches!(tokio::time::timeout(RESPONSE_TIMEOUT, ping).await, Ok(Ok(()))) {
                    healthy.store(true, Ordering::Relaxed);
                }
                continue;
            }
        };
        if n == 0 {
            return;
        }
        let mut pipe = redis::pipe();
        for (channel, payload) in &batch {
            pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
        }
        // Bounded here too: the manager's own reconnect attempts can take longer than a
        // response timeout, and a push late by that much is better dropped (clients sync).
        match tokio::time::timeout(RESPONSE_TIMEOUT, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => {
                healthy.store(true, Ordering::Relaxed);
                metrics::counter!("switchboard_broker_published_total").increment(n as u64);
            }
            failed => {
                // Not retried: a push that may have gone out must not go twice, and the
                // clients close the gap with `sync`.
                healthy.store(false, Ordering::Relaxed);
                metrics::counter!("switchboard_broker_dropped_total").increment(n as u64);
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_owned(),
                };
                tracing::warn!(error, pushes = n, "publishing to Redis failed; dropped");
            }
        }
        batch.clear();
    }
}

/// Keeps `node` subscribed to `channels`, reconnecting with back-off, until `stop`; hands
/// what arrives to `sub`. `ready` fires at the first subscription.
async fn listen(
    client: redis::Client,
    channels: [String; 2],
    node: NodeId,
    sub: Arc<dyn Subscriber>,
    subscribed: Arc<AtomicBool>,
    stop: CancellationToken,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut backoff = BACKOFF.0;
    let mut first = true;
    loop {
        let attempt = async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(&channels[..]).await?;
            Ok::<_, redis::RedisError>(ps)
        };
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = attempt => r,
        };
        match result {
            Ok(ps) => {
                subscribed.store(true, Ordering::Relaxed);
                metrics::gauge!("switchboard_broker_connected").set(1.0);
                if !first {
                    metrics::counter!("switchboard_broker_reconnects_total").increment(1);
                    tracing::info!("Redis subscription restored");
                }
                first = false;
                backoff = BACKOFF.0;
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
                let mut messages = ps.into_on_message();
                loop {
                    let msg = tokio::select! {
                        _ = stop.cancelled() => return,
                        m = messages.next() => m,
                        _ = tokio::time::sleep(SILENCE) => {
                            tracing::warn!("Redis subscription silent (not even this node's pings arrive)");
                            break;
                        }
                    };
                    let Some(msg) = msg else { break };
                    receive(
                        node,
                        &*sub,
                        &channels,
                        msg.get_channel_name(),
                        msg.get_payload_bytes(),
                    );
                }
                tracing::warn!("Redis subscription lost; reconnecting");
            }
            Err(e) => tracing::warn!(error = %e, "Redis subscription failed; retrying"),
        }
        subscribed.store(false, Ordering::Relaxed);
        metrics::gauge!("switchboard_broker_connected").set(0.0);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

/// One message from Redis. Anything unreadable (another version, or someone else writing to
/// our channels) is counted and dropped.
fn receive(
    node: NodeId,
    sub: &dyn Subscriber,
    channels: &[String; 2],
    channel: &str,
    payload: &[u8],
) {
    let bad = || metrics::counter!("switchboard_broker_bad_messages_total").increment(1);
    let lag = |t: i64| {
        metrics::histogram!("switchboard_broker_lag_seconds")
            .record((now_ms() - t).max(0) as f64 / 1000.0)
    };
    if channel == channels[0] {
        let Ok(env) = serde_json::from_slice::<PubEnvelope>(payload) else {
            return bad();
        };
        if env.o == node.0 {
            return; // delivered locally when published
        }
        lag(env.t);
        let Some(push) = Push::from_parts(env.e, env.d.to_owned(), env.m) else {
            return bad();
        };
        sub.publication(&Publication {
            users: env.u,
            only_open_chat: env.c,
            push,
        });
    } else if channel == channels[1] {
        if serde_json::from_slice::<PingEnvelope>(payload).is_ok() {
            return; // proof that the subscription lives
        }
        if let Ok(env) = serde_json::from_slice::<CallEnvelope>(payload) {
            lag(env.t);
            return sub.control(Control::Call {
                from: NodeId(env.f),
                body: env.call.into_owned(),
            });
        }
        let Ok(env) = serde_json::from_slice::<ControlEnvelope>(payload) else {
            return bad();
        };
        let Ok(id) = uuid::Uuid::parse_str(&env.i) else {
            return bad();
        };
        lag(env.t);
        let Some(push) = Push::from_parts(env.e, env.d.to_owned(), env.m) else {
            return bad();
        };
        sub.control(Control::Deliver {
            user: env.u,
            conn: ConnId::new(NodeId(env.n), id),
            push,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Child, Command, Stdio};
    use std::sync::Mutex;

    use super::*;
    use crate::wire::events;

    /// A real `redis-server` on a free port, stopped on drop.
    pub struct RedisServer {
        pub port: u16,
        child: Child,
        _dir: tempfile::TempDir,
    }

    impl RedisServer {
        pub fn start() -> RedisServer {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            Self::start_on(port)
        }

        pub fn start_on(port: u16) -> RedisServer {
            let dir = tempfile::tempdir().unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server is needed (apt-get install redis-server; scripts/test.sh installs it)");
            for _ in 0..100 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            RedisServer {
                port,
                child,
                _dir: dir,
            }
        }

        pub fn url(&self) -> String {
            format!("redis://127.0.0.1:{}", self.port)
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Subscriber for Recorder {
        fn publication(&self, p: &Publication) {
            self.0.lock().unwrap().push(format!(
                "pub {} {} {:?} {:?}",
                p.push.event(),
                p.push.data_json(),
                p.users,
                p.push.message_ref().map(|m| m.seq)
            ));
        }
        fn control(&self, c: Control) {
            let Control::Deliver { user, conn, push } = c else {
                return;
            };
            self.0.lock().unwrap().push(format!(
                "ctl {} {} {user} {}",
                push.event(),
                push.data_json(),
                conn.node().0
            ));
        }
    }

    impl Recorder {
        async fn wait_for(&self, n: usize) -> Vec<String> {
            for _ in 0..200 {
                if self.0.lock().unwrap().len() >= n {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            self.0.lock().unwrap().clone()
        }
    }

    fn text(users: &[&str], text: &str) -> Publication {
        Publication {
            users: users.iter().map(|u| u.to_string()).collect(),
            only_open_chat: None,
            push: Push::new(events::PONG, text),
        }
    }

    async fn node(redis: &RedisServer, prefix: &str, id: u64) -> (Arc<RedisBroker>, Arc<Recorder>) {
        let b = RedisBroker::connect(&redis.url(), prefix).await.unwrap();
        let rec = Arc::new(Recorder::default());
        b.subscribe(NodeId(id), rec.clone()).await.unwrap();
        assert!(b.is_healthy());
        (b, rec)
    }

    #[tokio::test]
    async fn redis_publications_reach_every_node_once_and_controls_only_theirs() {
        let redis = RedisServer::start();
        let (a, ra) = node(&redis, "t:", 1).await;
        let (_b, rb) = node(&redis, "t:", 2).await;
        // Another cluster on the same Redis hears nothing of this one.
        let (_c, rc) = node(&redis, "other:", 3).await;
        a.publish(text(&["u1", "u2"], "hello")).await.unwrap();
        let conn = ConnId::new(NodeId(2), uuid::Uuid::now_v7());
        a.send_control(
            NodeId(2),
            Control::Deliver {
                user: "u2".into(),
                conn,
                push: Push::new("call:offer", "sdp"),
            },
        )
        .await
        .unwrap();
        // A message push keeps what it delivers across nodes.
        let record = crate::store::MessageRecord {
            id: "m7".into(),
            chat_id: "chat".into(),
            seq: 7,
            sender_id: "u1".into(),
            content: "hi".into(),
            client_msg_id: None,
            created_at: 0,
            pinned: false,
            forwarded_from: None,
            call: None,
        };
        let msg = crate::wire::models::Message::new(&record, crate::store::MessageStatus::Sent);
        a.publish(Publication {
            users: vec!["u2".into()],
            only_open_chat: Some("chat".into()),
            push: Push::message(events::MESSAGE, &msg, true),
        })
        .await
        .unwrap();
        let got_b = rb.wait_for(3).await;
        assert_eq!(got_b[0], r#"pub pong "hello" ["u1", "u2"] None"#);
        assert_eq!(got_b[1], r#"ctl call:offer "sdp" u2 2"#);
        assert!(got_b[2].starts_with("pub message ") && got_b[2].ends_with("Some(7)"));
        // The publisher got its own publications once (locally), not again through Redis.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let got_a = ra.0.lock().unwrap().clone();
        assert_eq!(got_a.len(), 2, "{got_a:?}");
        assert!(rc.0.lock().unwrap().is_empty());
        assert_eq!(rb.0.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn junk_on_the_channels_is_dropped_and_delivery_goes_on() {
        let redis = RedisServer::start();
        let (a, _ra) = node(&redis, "t:", 1).await;
        let (_b, rb) = node(&redis, "t:", 2).await;
        let client = redis::Client::open(redis.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        for junk in [
            &b"not json"[..],
            br#"{"o":9,"t":0,"u":[],"e":"no-such-event","d":1}"#,
            br#"{"t":0,"u":"x","n":2,"i":"nope","e":"pong","d":1}"#,
        ] {
            let channel = if junk.starts_with(br#"{"t""#) {
                "t:node:2"
            } else {
                "t:pub"
            };
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(junk)
                .query_async::<i64>(&mut c)
                .await
                .unwrap();
        }
        a.publish(text(&["u"], "after")).await.unwrap();
        let got = rb.wait_for(1).await;
        assert_eq!(got, [r#"pub pong "after" ["u"] None"#]);
    }

    #[tokio::test]
    async fn redis_restarted_delivery_resumes_and_local_delivery_never_stops() {
        let redis = RedisServer::start();
        let port = redis.port;
        let (a, ra) = node(&redis, "t:", 1).await;
        let (_b, rb) = node(&redis, "t:", 2).await;
        a.publish(text(&["u"], "before")).await.unwrap();
        assert_eq!(rb.wait_for(1).await.len(), 1);
        drop(redis);
        // Redis is away: this node's own users still get their pushes; the others' are
        // dropped (PostgreSQL has the messages; clients sync).
        a.publish(text(&["u"], "during")).await.unwrap();
        assert!(ra.0.lock().unwrap().iter().any(|l| l.contains("during")));
        for _ in 0..100 {
            if !a.is_healthy() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!a.is_healthy(), "a lost subscription shows in readiness");
        let _redis = RedisServer::start_on(port);
        // Readiness comes back by itself, with nothing published meanwhile.
        for _ in 0..200 {
            if a.is_healthy() && _b.is_healthy() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(a.is_healthy() && _b.is_healthy());
        a.publish(text(&["u"], "after")).await.unwrap();
        for _ in 0..200 {
            if rb.0.lock().unwrap().iter().any(|l| l.contains("after")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = rb.0.lock().unwrap().clone();
        assert!(got.iter().any(|l| l.contains("after")), "{got:?}");
        assert!(
            !got.iter().any(|l| l.contains("during")),
            "nothing replayed twice: {got:?}"
        );
    }
}

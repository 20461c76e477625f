//! WebSocket load client for `scripts/bench/ws.sh`: the same workloads against Switchboard's
//! `/ws` (`--proto sb`), the Node Socket.IO 4 baseline (`--proto sio`) and Switchboard's
//! Socket.IO endpoint (`--proto sbio`, PROTOCOL §7; the token goes in the connect packet). The
//! Socket.IO protocols run over a WebSocket (`--transport websocket`, the default) or Engine.IO
//! long-polling (`--transport polling`: one long GET in flight per client, sends as POSTs).
//! Prints one `RESULT key=value ...` line per workload; the script turns them into a table.
//!
//! `--url` may list several nodes of one cluster, comma-separated: clients connect to them in
//! turn (`call`: the caller to the first, the callee to the last).
//!   ws-load idle   --url URL --proto sb|sio|sbio --conns N [--setup FILE] --hold SECS
//!   ws-load fanout --url URL --proto sb|sio|sbio --clients C --group G --messages M [--setup FILE]
//!   ws-load ack    --url URL --proto sb|sio|sbio --messages M [--setup FILE]
//!   ws-load e2e    --url URL --proto sb --messages M --setup FILE
//!   ws-load call   --url URL --proto sb|sio|sbio --calls K [--setup FILE]
//!
//! `--setup` (Switchboard only) is JSON written by the script: `{"tokens": [...],
//! "chats": [["chatId", [userIndex, ...]], ...], "direct": "chatId of users 0 and 1"}`.

#![allow(clippy::disallowed_methods)] // a load generator reads the clock all the time

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    /// Switchboard's `/ws`.
    Sb,
    /// The Node Socket.IO baseline (rooms joined with a `join` event).
    Sio,
    /// Switchboard's Socket.IO endpoint (chats from the setup, token in the connect packet).
    SbIo,
}

impl Proto {
    /// Speaks Socket.IO (Engine.IO framing, acks).
    fn socketio(self) -> bool {
        self != Proto::Sb
    }
    /// Talks to Switchboard (chats and tokens from the setup, calls ended).
    fn switchboard(self) -> bool {
        self != Proto::Sio
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Transport {
    WebSocket,
    Polling,
}

/// One HTTP client (a pool of keep-alive connections) for every polling socket.
fn http() -> &'static reqwest::Client {
    static HTTP: OnceLock<reqwest::Client> = OnceLock::new();
    HTTP.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(90))
            .build()
            .expect("an HTTP client")
    })
}

/// An Engine.IO long-polling session: a task keeps one GET in flight and queues the packets it
/// returns; sends are POSTs, one at a time (Engine.IO refuses overlapping POSTs).
struct Polling {
    url: String,
    packets: mpsc::UnboundedReceiver<String>,
    reader: tokio::task::JoinHandle<()>,
}

impl Polling {
    async fn open(base: &str) -> anyhow::Result<Polling> {
        let url = format!("{base}/socket.io/?EIO=4&transport=polling");
        let open = http()
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        let handshake: Value = serde_json::from_str(open.get(1..).unwrap_or_default())?;
        let sid = handshake["sid"].as_str().unwrap_or_default();
        anyhow::ensure!(!sid.is_empty(), "no sid in {open}");
        let url = format!("{url}&sid={sid}");
        let (tx, packets) = mpsc::unbounded_channel();
        let get = url.clone();
        let reader = tokio::spawn(async move {
            loop {
                let Ok(r) = http().get(&get).send().await else {
                    break;
                };
                if !r.status().is_success() {
                    break;
                }
                let Ok(body) = r.text().await else { break };
                for p in body.split('\x1e') {
                    if tx.send(p.to_owned()).is_err() || p.starts_with('1') {
                        return;
                    }
                }
            }
        });
        Ok(Polling {
            url,
            packets,
            reader,
        })
    }

    async fn send(&self, packet: String) -> anyhow::Result<()> {
        http()
            .post(&self.url)
            .header("content-type", "text/plain;charset=UTF-8")
            .body(packet)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }
}

impl Drop for Polling {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// What carries a client's frames.
enum Link {
    Ws(Box<Ws>),
    Poll(Polling),
}

impl Link {
    async fn send(&mut self, text: String) -> anyhow::Result<()> {
        match self {
            Link::Ws(ws) => Ok(ws.send(Message::Text(text.into())).await?),
            Link::Poll(p) => p.send(text).await,
        }
    }

    async fn recv(&mut self) -> anyhow::Result<String> {
        match self {
            Link::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e.into()),
                    None => anyhow::bail!("closed"),
                }
            },
            Link::Poll(p) => p
                .packets
                .recv()
                .await
                .ok_or_else(|| anyhow::anyhow!("closed")),
        }
    }
}

struct Args(HashMap<String, String>);

impl Args {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
    fn num(&self, k: &str, default: u64) -> u64 {
        self.get(k)
            .map(|v| v.parse().expect("a number"))
            .unwrap_or(default)
    }
}

fn micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// One client connection, speaking either protocol.
struct Client {
    link: Link,
    proto: Proto,
    next_id: u64,
}

impl Client {
    async fn connect(
        url: &str,
        proto: Proto,
        transport: Transport,
        token: Option<&str>,
    ) -> anyhow::Result<Client> {
        let link = match (proto, transport) {
            (Proto::Sb, _) => {
                let url = match token {
                    Some(t) => format!("{url}?token={t}"),
                    None => url.to_owned(),
                };
                Link::Ws(Box::new(tokio_tungstenite::connect_async(url).await?.0))
            }
            (_, Transport::WebSocket) => {
                let url = format!("{url}/socket.io/?EIO=4&transport=websocket");
                Link::Ws(Box::new(tokio_tungstenite::connect_async(url).await?.0))
            }
            (_, Transport::Polling) => {
                Link::Poll(Polling::open(&url.replacen("ws", "http", 1)).await?)
            }
        };
        let mut c = Client {
            link,
            proto,
            next_id: 1,
        };
        if !proto.socketio() {
            // connection:established
            c.next_event().await?;
            return Ok(c);
        }
        if matches!(c.link, Link::Ws(_)) {
            c.raw().await?; // the Engine.IO open packet (polling got it from the handshake GET)
        }
        // The namespace connect, with the token where Switchboard reads it.
        let connect = match (proto, token) {
            (Proto::SbIo, Some(t)) => format!("40{}", json!({ "token": t })),
            _ => "40".to_owned(),
        };
        c.link.send(connect).await?;
        loop {
            let p = c.raw().await?;
            if p.starts_with("40") {
                break;
            }
            anyhow::ensure!(!p.starts_with("44"), "refused: {p}");
        }
        Ok(c)
    }

    /// Next frame or packet, answering Engine.IO pings on the way.
    async fn raw(&mut self) -> anyhow::Result<String> {
        loop {
            let t = self.link.recv().await?;
            if self.proto.socketio() {
                match t.as_str() {
                    "2" => {
                        self.link.send("3".into()).await?;
                        continue;
                    }
                    "6" | "" => continue,
                    _ if t.starts_with('1') => anyhow::bail!("closed"),
                    _ => {}
                }
            }
            return Ok(t);
        }
    }

    /// Next event as (name, data); replies/acks come back as ("reply", {id, data}).
    async fn next_event(&mut self) -> anyhow::Result<(String, Value)> {
        let text = self.raw().await?;
        match self.proto {
            Proto::Sb => {
                let v: Value = serde_json::from_str(&text)?;
                let name = v["event"].as_str().unwrap_or_default().to_owned();
                if name == "reply" {
                    return Ok((name, json!({"id": v["id"], "data": v["data"]})));
                }
                Ok((name, v["data"].clone()))
            }
            Proto::Sio | Proto::SbIo => {
                // 42["event",data]  or  43<id>[data]
                let digits: String = text
                    .get(2..)
                    .unwrap_or_default()
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                let body = &text[(2 + digits.len()).min(text.len())..];
                let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
                if text.starts_with("43") {
                    let id = digits.parse::<u64>().unwrap_or(0);
                    return Ok(("reply".into(), json!({"id": id, "data": v[0]})));
                }
                Ok((v[0].as_str().unwrap_or_default().to_owned(), v[1].clone()))
            }
        }
    }

    /// Sends a request with an id; returns the id.
    async fn request(&mut self, event: &str, data: Value) -> anyhow::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let text = match self.proto {
            Proto::Sb => json!({"event": event, "data": data, "id": id}).to_string(),
            Proto::Sio | Proto::SbIo => format!("42{id}{}", json!([event, data])),
        };
        self.link.send(text).await?;
        Ok(id)
    }

    async fn wait_reply(&mut self, id: u64) -> anyhow::Result<Value> {
        loop {
            let (name, v) = self.next_event().await?;
            if name == "reply" && v["id"].as_u64() == Some(id) {
                return Ok(v["data"].clone());
            }
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

struct Setup {
    tokens: Vec<String>,
    chats: Vec<String>,
    direct: Option<String>,
}

fn load_setup(args: &Args) -> anyhow::Result<Setup> {
    let Some(path) = args.get("setup") else {
        return Ok(Setup {
            tokens: Vec::new(),
            chats: Vec::new(),
            direct: None,
        });
    };
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(Setup {
        tokens: strings(&v["tokens"]),
        chats: strings(&v["chats"]),
        direct: v["direct"].as_str().map(str::to_owned),
    })
}

async fn connect_many(
    url: &str,
    proto: Proto,
    transport: Transport,
    setup: &Setup,
    n: usize,
) -> Vec<Client> {
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::with_capacity(n);
    // Several nodes (`--url A,B`): client i connects to node i mod n, so the two members of a
    // chat of 2 are on different nodes.
    let urls: Vec<&str> = url.split(',').collect();
    for i in 0..n {
        let token = setup.tokens.get(i % setup.tokens.len().max(1)).cloned();
        let (url, sem) = (urls[i % urls.len()].to_owned(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.expect("semaphore");
            for attempt in 0..5 {
                match Client::connect(&url, proto, transport, token.as_deref()).await {
                    Ok(c) => return Some(c),
                    Err(_) => tokio::time::sleep(Duration::from_millis(50 << attempt)).await,
                }
            }
            None
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        if let Ok(Some(c)) = t.await {
            out.push(c);
        }
    }
    out
}

/// Room (chat) of client `i` when rooms hold `group` consecutive clients.
fn room_of(rooms: &[String], i: usize, group: usize) -> String {
    rooms[(i / group).min(rooms.len() - 1)].clone()
}

async fn fanout(
    url: &str,
    proto: Proto,
    transport: Transport,
    setup: &Setup,
    args: &Args,
) -> anyhow::Result<()> {
    let clients_n = args.num("clients", 100) as usize;
    let group = args.num("group", 2) as usize;
    let messages = args.num("messages", 1000);
    let mut clients = connect_many(url, proto, transport, setup, clients_n).await;
    let rooms: Vec<String> = match proto {
        Proto::Sb | Proto::SbIo => setup.chats.clone(),
        Proto::Sio => (0..clients_n.div_ceil(group))
            .map(|r| format!("room-{r}"))
            .collect(),
    };
    anyhow::ensure!(!rooms.is_empty(), "no rooms");
    if proto == Proto::Sio {
        for (i, c) in clients.iter_mut().enumerate() {
            let id = c.request("join", json!(room_of(&rooms, i, group))).await?;
            c.wait_reply(id).await?;
        }
    }
    let per_room = (messages / rooms.len() as u64).max(1);
    let total_expected = per_room * rooms.len() as u64 * group as u64;
    let received = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(
        total_expected as usize,
    )));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        let room = room_of(&rooms, i, group);
        let sender = i % group == 0;
        let (received, latencies) = (received.clone(), latencies.clone());
        tasks.push(tokio::spawn(async move {
            // A sender keeps one message in flight: the next goes when the previous is acked.
            let mut sent = 0u64;
            let mut waiting: Option<u64> = None;
            loop {
                if sender && waiting.is_none() && sent < per_room {
                    let content = format!("t={}", micros());
                    match c
                        .request("message", json!({"chatId": room, "content": content}))
                        .await
                    {
                        Ok(id) => waiting = Some(id),
                        Err(_) => break,
                    }
                    sent += 1;
                }
                let Ok((name, data)) = c.next_event().await else {
                    break;
                };
                if name == "reply" && data["id"].as_u64() == waiting {
                    waiting = None;
                } else if name == "message" {
                    let t = data["content"]
                        .as_str()
                        .and_then(|s| s.strip_prefix("t="))
                        .and_then(|s| s.parse::<u64>().ok());
                    if let Some(t) = t {
                        let ms = micros().saturating_sub(t) as f64 / 1000.0;
                        latencies.lock().expect("lock").push(ms);
                    }
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(args.num("seconds", 120));
    while received.load(Ordering::Relaxed) < total_expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let got = received.load(Ordering::Relaxed);
    let mut l = latencies.lock().expect("lock").clone();
    l.sort_by(|a, b| a.total_cmp(b));
    println!(
        "RESULT workload=fanout group={group} clients={clients_n} deliveries={got} expected={total_expected} seconds={secs:.2} deliveries_per_s={:.0} p50_ms={:.2} p99_ms={:.2}",
        got as f64 / secs,
        percentile(&l, 0.5),
        percentile(&l, 0.99)
    );
    for t in tasks {
        t.abort();
    }
    Ok(())
}

async fn join_room(c: &mut Client, room: &str) -> anyhow::Result<String> {
    let id = c.request("join", json!(room)).await?;
    c.wait_reply(id).await?;
    Ok(room.to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut argv = std::env::args().skip(1);
    let cmd = argv.next().unwrap_or_default();
    let rest: Vec<String> = argv.collect();
    let mut map = HashMap::new();
    for pair in rest.chunks(2) {
        if let [k, v] = pair {
            map.insert(k.trim_start_matches("--").to_owned(), v.clone());
        }
    }
    let args = Args(map);
    let url = args.get("url").expect("--url").to_owned();
    // The first node, and the last (the callee's in `call`: another node than the caller's).
    let first = url.split(',').next().unwrap_or_default().to_owned();
    let last = url.rsplit(',').next().unwrap_or_default().to_owned();
    let proto = match args.get("proto") {
        Some("sio") => Proto::Sio,
        Some("sbio") => Proto::SbIo,
        _ => Proto::Sb,
    };
    let transport = match args.get("transport") {
        Some("polling") => Transport::Polling,
        _ => Transport::WebSocket,
    };
    let setup = load_setup(&args)?;
    match cmd.as_str() {
        "idle" => {
            let n = args.num("conns", 1000) as usize;
            let started = Instant::now();
            let clients = connect_many(&url, proto, transport, &setup, n).await;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "RESULT workload=idle connected={} seconds={secs:.2} connect_per_s={:.0}",
                clients.len(),
                clients.len() as f64 / secs
            );
            println!("READY");
            // Keep answering pings while the script measures the server.
            let hold = Duration::from_secs(args.num("hold", 5));
            let mut tasks = Vec::new();
            for mut c in clients {
                tasks.push(tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(hold, async { while c.raw().await.is_ok() {} }).await;
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }
        "fanout" => fanout(&url, proto, transport, &setup, &args).await?,
        "ack" => {
            let messages = args.num("messages", 1000);
            let token = setup.tokens.first().map(String::as_str);
            let mut c = Client::connect(&first, proto, transport, token).await?;
            let room = match proto {
                Proto::Sb | Proto::SbIo => setup.direct.clone().expect("setup.direct"),
                Proto::Sio => join_room(&mut c, "ack-room").await?,
            };
            let mut l = Vec::with_capacity(messages as usize);
            for i in 0..messages {
                let t = Instant::now();
                let id = c
                    .request(
                        "message",
                        json!({"chatId": room, "content": format!("ack {i}")}),
                    )
                    .await?;
                c.wait_reply(id).await?;
                l.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            l.sort_by(|a, b| a.total_cmp(b));
            println!(
                "RESULT workload=ack messages={messages} p50_ms={:.3} p99_ms={:.3}",
                percentile(&l, 0.5),
                percentile(&l, 0.99)
            );
        }
        "e2e" => {
            // One message at a time from a sender on the first node to a receiver on the last:
            // the latency of one delivery with nothing queued (across nodes when they differ).
            let messages = args.num("messages", 1000);
            let token = |i: usize| setup.tokens.get(i).map(String::as_str);
            let mut sender = Client::connect(&first, proto, transport, token(0)).await?;
            let mut receiver = Client::connect(&last, proto, transport, token(1)).await?;
            let room = setup.direct.clone().expect("setup.direct");
            let mut l = Vec::with_capacity(messages as usize);
            for i in 0..messages {
                let t = Instant::now();
                let id = sender
                    .request(
                        "message",
                        json!({"chatId": room, "content": format!("e2e {i}")}),
                    )
                    .await?;
                while receiver.next_event().await?.0 != "message" {}
                l.push(t.elapsed().as_secs_f64() * 1000.0);
                sender.wait_reply(id).await?;
            }
            l.sort_by(|a, b| a.total_cmp(b));
            println!(
                "RESULT workload=e2e messages={messages} p50_ms={:.3} p99_ms={:.3}",
                percentile(&l, 0.5),
                percentile(&l, 0.99)
            );
        }
        "call" => {
            let calls = args.num("calls", 100);
            let token = |i: usize| setup.tokens.get(i).map(String::as_str);
            let mut caller = Client::connect(&first, proto, transport, token(0)).await?;
            let mut callee = Client::connect(&last, proto, transport, token(1)).await?;
            let room = match proto {
                Proto::Sb | Proto::SbIo => setup.direct.clone().expect("setup.direct"),
                Proto::Sio => {
                    join_room(&mut callee, "call-room").await?;
                    join_room(&mut caller, "call-room").await?
                }
            };
            let offer = json!({"type": "offer", "sdp": "v=0\r\n".repeat(40)});
            let mut l = Vec::with_capacity(calls as usize);
            for _ in 0..calls {
                let t = Instant::now();
                caller
                    .request(
                        "call:initiate",
                        json!({"chatId": room, "offer": offer, "callType": "audio"}),
                    )
                    .await?;
                while callee.next_event().await?.0 != "call:offer" {}
                l.push(t.elapsed().as_secs_f64() * 1000.0);
                if proto.switchboard() {
                    let id = caller.request("call:end", json!({"chatId": room})).await?;
                    caller.wait_reply(id).await?;
                }
            }
            l.sort_by(|a, b| a.total_cmp(b));
            println!(
                "RESULT workload=call calls={calls} p50_ms={:.3} p99_ms={:.3}",
                percentile(&l, 0.5),
                percentile(&l, 0.99)
            );
        }
        other => anyhow::bail!("unknown workload `{other}`"),
    }
    Ok(())
}

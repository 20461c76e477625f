//! Who is connected, and fan-out. The [`Hub`] is this node's one registry of live connections:
//! each connection's user, the chats it has open and its bounded send queue, with presence (the
//! pure [`Presence`]) kept under the same lock so a user's first and last connection are seen
//! in the order they happened. Every publish goes through a [`Broker`] whose subscribe side
//! hands this node its share ([`Hub`] is the subscriber), so a single-node test exercises the
//! same path a cluster does.
//!
//! A connection whose queue is full is not waited for: it is cancelled (closed with 4429 by its
//! session), so one slow reader never holds up the others or grows memory without bound.
//!
//! Per-user limits live here too, since the hub sees all of a user's connections on this node:
//! at most `max_connections` connections, and one message-rate bucket shared by all of them.
//!
//! Must not import a transport or `app`.

pub mod broker;
pub mod cluster;
pub mod memory;
pub mod node;
pub mod presence;
pub mod redis;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use broker::{Broker, BrokerError, Control, Publication, Subscriber};
pub use memory::MemoryBroker;

use crate::limits::KeyedBuckets;
use crate::wire::Push;
use presence::{Presence, PresenceEvent};

/// Users whose message-rate bucket is held at once (full buckets are dropped first).
const RATE_MAX_USERS: usize = 100_000;

/// A node of a deployment (`cluster.node_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u64);

impl NodeId {
    /// The id of a named node: the same name always gives the same id.
    pub fn from_name(name: &str) -> NodeId {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(name.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        NodeId(u64::from_be_bytes(first))
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A connection: the node holding it and its own id, a UUIDv7 (PROTOCOL: every id is one; the
/// client sees only that, as `connectionId`). The node is what routes a signal for a
/// connection to where it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    node: NodeId,
    id: uuid::Uuid,
}

impl ConnId {
    pub fn new(node: NodeId, id: uuid::Uuid) -> ConnId {
        ConnId { node, id }
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    pub fn uuid(&self) -> uuid::Uuid {
        self.id
    }
}

/// As `"{node}:{uuid}"` (the calls machine's state travels between nodes).
impl serde::Serialize for ConnId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}:{}", self.node.0, self.id))
    }
}

impl<'de> serde::Deserialize<'de> for ConnId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        let bad = || serde::de::Error::custom("a connection id: node:uuid");
        let (node, id) = s.split_once(':').ok_or_else(bad)?;
        Ok(ConnId {
            node: NodeId(node.parse().map_err(|_| bad())?),
            id: uuid::Uuid::parse_str(id).map_err(|_| bad())?,
        })
    }
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.id.fmt(f)
    }
}

struct Conn {
    /// One word per slot: every connection's queue is allocated as it fills.
    tx: mpsc::Sender<Arc<Push>>,
    kill: CancellationToken,
    open_chats: HashSet<String>,
}

/// What a session gets when it registers.
pub struct Registration {
    pub conn_id: ConnId,
    pub rx: mpsc::Receiver<Arc<Push>>,
    /// Cancelled when the send queue overflowed.
    pub kill: CancellationToken,
}

/// Why a connection could not register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this user already has {0} connections, the most allowed")]
pub struct TooManyConnections(pub usize);

/// Per-user limits of a hub.
#[derive(Debug, Clone, Copy)]
pub struct UserLimits {
    pub max_connections: usize,
    /// Messages per second across a user's connections (0: off) and the burst above it.
    pub message_rate: u32,
    pub message_burst: u32,
}

impl Default for UserLimits {
    fn default() -> Self {
        Self {
            max_connections: usize::MAX,
            message_rate: 0,
            message_burst: 0,
        }
    }
}

struct Registry {
    users: HashMap<String, HashMap<ConnId, Conn>>,
    presence: Presence,
}

pub struct Hub {
    node: NodeId,
    queue_len: usize,
    max_per_user: usize,
    registry: Mutex<Registry>,
    message_rates: Mutex<KeyedBuckets>,
    overflows: AtomicU64,
    /// Where call controls from other nodes go (set once by the calls actor).
    call_handler: std::sync::OnceLock<CallHandler>,
}

/// Takes a call control from another node (its node and body). Must not block.
pub type CallHandler = Arc<dyn Fn(NodeId, String) + Send + Sync>;

impl Hub {
    pub fn new(node: NodeId, queue_len: usize, limits: UserLimits, presence: Presence) -> Self {
        Self {
            node,
            queue_len,
            max_per_user: limits.max_connections,
            registry: Mutex::new(Registry {
                users: HashMap::new(),
                presence,
            }),
            message_rates: Mutex::new(KeyedBuckets::new(
                limits.message_rate,
                limits.message_burst,
                RATE_MAX_USERS,
            )),
            overflows: AtomicU64::new(0),
            call_handler: std::sync::OnceLock::new(),
        }
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    /// From now on call controls go to `h` (the first handler set stays).
    pub fn set_call_handler(&self, h: CallHandler) {
        let _ = self.call_handler.set(h);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().expect("hub lock")
    }

    /// A new connection of `user_id` at `now`, unless the user already holds the most allowed;
    /// with the presence event it causes (the user's first connection).
    pub fn register(
        &self,
        user_id: &str,
        now: i64,
    ) -> Result<(Registration, Option<PresenceEvent>), TooManyConnections> {
        let conn_id = ConnId::new(self.node, uuid::Uuid::now_v7());
        let mut reg = self.lock();
        let held = reg.users.get(user_id).map_or(0, HashMap::len);
        if held >= self.max_per_user {
            return Err(TooManyConnections(self.max_per_user));
        }
        let first = held == 0;
        let (tx, rx) = mpsc::channel(self.queue_len);
        let kill = CancellationToken::new();
        reg.users.entry(user_id.to_owned()).or_default().insert(
            conn_id,
            Conn {
                tx,
                kill: kill.clone(),
                open_chats: HashSet::new(),
            },
        );
        let event = if first {
            reg.presence.connected(user_id, now)
        } else {
            None
        };
        Ok((Registration { conn_id, rx, kill }, event))
    }

    /// The connection is gone; the presence events it causes (the user's last connection).
    pub fn unregister(&self, user_id: &str, conn_id: ConnId, now: i64) -> Vec<PresenceEvent> {
        let mut reg = self.lock();
        let Some(user) = reg.users.get_mut(user_id) else {
            return Vec::new();
        };
        if user.remove(&conn_id).is_none() || !user.is_empty() {
            return Vec::new();
        }
        reg.users.remove(user_id);
        reg.presence.disconnected(user_id, now)
    }

    /// A user's connection on another node died with it, and it was their last anywhere: the
    /// grace runs here. Nothing when they are connected here.
    pub fn presence_gone(&self, user_id: &str, now: i64) -> Vec<PresenceEvent> {
        let mut reg = self.lock();
        if reg.users.contains_key(user_id) {
            return Vec::new();
        }
        reg.presence.disconnected(user_id, now)
    }

    /// Spends `n` of `user_id`'s message allowance at `now_ms` (shared by all the user's
    /// connections): `Err(retry_after_ms)` when it is used up.
    pub fn take_messages(&self, user_id: &str, n: u32, now_ms: i64) -> Result<(), i64> {
        self.message_rates
            .lock()
            .expect("rate lock")
            .take(user_id, n, now_ms)
    }

    pub fn set_chat_open(&self, user_id: &str, conn_id: ConnId, chat_id: &str, open: bool) {
        let mut reg = self.lock();
        if let Some(conn) = reg.users.get_mut(user_id).and_then(|u| u.get_mut(&conn_id)) {
            if open {
                conn.open_chats.insert(chat_id.to_owned());
            } else {
                conn.open_chats.remove(chat_id);
            }
        }
    }

    /// Whether `conn` of `user_id` is live on this node.
    pub fn has_connection(&self, user_id: &str, conn: ConnId) -> bool {
        self.lock()
            .users
            .get(user_id)
            .is_some_and(|u| u.contains_key(&conn))
    }

    /// Whether `user_id` has a live connection on this node.
    pub fn is_connected(&self, user_id: &str) -> bool {
        self.lock().users.contains_key(user_id)
    }

    /// Whether `user_id` is shown online: connected, or gone less than the grace ago.
    pub fn is_online(&self, user_id: &str) -> bool {
        let reg = self.lock();
        reg.users.contains_key(user_id) || reg.presence.in_grace(user_id)
    }

    /// Users shown online.
    pub fn online_count(&self) -> usize {
        let reg = self.lock();
        reg.users.len() + reg.presence.in_grace_count()
    }

    /// The live connections of `user_id`, oldest first.
    pub fn connections_of(&self, user_id: &str) -> Vec<ConnId> {
        let mut out: Vec<ConnId> = self
            .lock()
            .users
            .get(user_id)
            .map(|u| u.keys().copied().collect())
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Every live connection on this node, with its user.
    pub fn all_connections(&self) -> Vec<(String, ConnId)> {
        let reg = self.lock();
        reg.users
            .iter()
            .flat_map(|(u, conns)| conns.keys().map(move |c| (u.clone(), *c)))
            .collect()
    }

    pub fn connection_count(&self) -> usize {
        self.lock().users.values().map(HashMap::len).sum()
    }

    /// Times a connection was cut because its queue was full.
    pub fn overflow_count(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }

    /// `typing-start`: true when this starts typing (not a refresh).
    pub fn typing_start(&self, user_id: &str, chat_id: &str, now: i64) -> bool {
        self.lock().presence.typing_start(user_id, chat_id, now)
    }

    /// `typing-stop`: true when the user was typing.
    pub fn typing_stop(&self, user_id: &str, chat_id: &str) -> bool {
        self.lock().presence.typing_stop(user_id, chat_id)
    }

    /// When presence's next deadline is due.
    pub fn presence_timeout(&self) -> Option<i64> {
        self.lock().presence.poll_timeout()
    }

    /// Fires the presence deadlines due at `now`.
    pub fn presence_expire(&self, now: i64) -> Vec<PresenceEvent> {
        self.lock().presence.handle_timeout(now)
    }

    /// Queues the publication on every matching local connection, never waiting.
    pub fn deliver_local(&self, p: &Publication) {
        let reg = self.lock();
        for user in p.users.iter() {
            let Some(user_conns) = reg.users.get(user) else {
                continue;
            };
            for (id, conn) in user_conns {
                if let Some(chat) = &p.only_open_chat {
                    if !conn.open_chats.contains(chat) {
                        continue;
                    }
                }
                self.offer(*id, conn, &p.push);
            }
        }
    }

    /// Queues `push` on one local connection, if it is still there.
    pub fn deliver_to(&self, user_id: &str, conn_id: ConnId, push: &Arc<Push>) {
        let reg = self.lock();
        if let Some(conn) = reg.users.get(user_id).and_then(|u| u.get(&conn_id)) {
            self.offer(conn_id, conn, push);
        }
    }

    fn offer(&self, id: ConnId, conn: &Conn, push: &Arc<Push>) {
        match conn.tx.try_send(push.clone()) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !conn.kill.is_cancelled() {
                    self.overflows.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("switchboard_ws_send_queue_overflows_total").increment(1);
                    tracing::info!(conn_id = %id, "send queue full; closing with 4429");
                    conn.kill.cancel();
                }
            }
            // The session is already gone; it unregisters itself.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

impl Subscriber for Hub {
    fn publication(&self, p: &Publication) {
        self.deliver_local(p);
    }

    fn control(&self, c: Control) {
        match c {
            Control::Deliver { user, conn, push } => self.deliver_to(&user, conn, &push),
            Control::Call { from, body } => match self.call_handler.get() {
                Some(h) => h(from, body),
                None => tracing::debug!("a call control arrived before the calls actor"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: NodeId = NodeId(1);

    fn hub(queue: usize) -> Hub {
        Hub::new(NODE, queue, UserLimits::default(), Presence::new(0, 6000))
    }

    fn register(hub: &Hub, user: &str) -> Registration {
        hub.register(user, 0).unwrap().0
    }

    fn publication(users: &[&str], text: &str) -> Publication {
        Publication {
            users: users.iter().map(|u| u.to_string()).collect(),
            only_open_chat: None,
            push: Push::new("t", text),
        }
    }

    fn got(r: &mut Registration) -> Option<String> {
        r.rx.try_recv().ok().map(|p| p.data_json().to_owned())
    }

    #[test]
    fn delivers_to_every_connection_of_each_user() {
        let hub = hub(4);
        let mut a1 = register(&hub, "a");
        let mut a2 = register(&hub, "a");
        let mut b = register(&hub, "b");
        hub.deliver_local(&publication(&["a"], "x"));
        assert_eq!(got(&mut a1).as_deref(), Some("\"x\""));
        assert_eq!(got(&mut a2).as_deref(), Some("\"x\""));
        assert_eq!(got(&mut b), None);
    }

    #[test]
    fn open_chat_filter_and_one_connection() {
        let hub = hub(4);
        let mut a1 = register(&hub, "a");
        let mut a2 = register(&hub, "a");
        hub.set_chat_open("a", a1.conn_id, "c", true);
        let mut p = publication(&["a"], "t");
        p.only_open_chat = Some("c".into());
        hub.deliver_local(&p);
        assert!(got(&mut a1).is_some());
        assert!(got(&mut a2).is_none());
        hub.control(Control::Deliver {
            user: "a".into(),
            conn: a2.conn_id,
            push: Push::new("t", "only"),
        });
        assert!(got(&mut a1).is_none());
        assert_eq!(got(&mut a2).as_deref(), Some("\"only\""));
    }

    #[test]
    fn overflow_cancels_only_the_slow_connection() {
        let hub = hub(2);
        let slow = register(&hub, "a");
        let mut fast = register(&hub, "b");
        for i in 0..3 {
            hub.deliver_local(&publication(&["a", "b"], &i.to_string()));
            assert!(got(&mut fast).is_some());
        }
        assert!(slow.kill.is_cancelled());
        assert!(!fast.kill.is_cancelled());
        assert_eq!(hub.overflow_count(), 1);
        hub.unregister("a", slow.conn_id, 0);
        assert!(!hub.is_connected("a"));
        assert!(hub.is_connected("b"));
    }

    #[test]
    fn connections_per_user_are_capped() {
        let hub = Hub::new(
            NODE,
            4,
            UserLimits {
                max_connections: 2,
                ..UserLimits::default()
            },
            Presence::new(0, 6000),
        );
        let a1 = register(&hub, "a");
        let a2 = register(&hub, "a");
        assert_eq!(hub.register("a", 0).err(), Some(TooManyConnections(2)));
        assert!(hub.register("b", 0).is_ok(), "other users are not affected");
        hub.unregister("a", a1.conn_id, 0);
        assert!(hub.register("a", 0).is_ok());
        assert_ne!(a1.conn_id, a2.conn_id);
        assert_eq!(a1.conn_id.uuid().get_version_num(), 7);
        assert_eq!(a1.conn_id.node(), NODE);
    }

    #[test]
    fn presence_follows_the_first_and_last_connection() {
        let hub = Hub::new(NODE, 4, UserLimits::default(), Presence::new(5000, 6000));
        let (a1, ev) = hub.register("a", 0).unwrap();
        assert_eq!(
            ev,
            Some(PresenceEvent::Online {
                user_id: "a".into()
            })
        );
        let (a2, ev) = hub.register("a", 10).unwrap();
        assert_eq!(ev, None, "a second device changes nothing");
        assert!(hub.unregister("a", a1.conn_id, 20).is_empty());
        assert!(hub.unregister("a", a2.conn_id, 30).is_empty(), "grace");
        assert!(hub.is_online("a") && !hub.is_connected("a"));
        assert_eq!(hub.online_count(), 1);
        assert_eq!(hub.presence_timeout(), Some(5030));
        assert_eq!(
            hub.presence_expire(5030),
            vec![PresenceEvent::Offline {
                user_id: "a".into(),
                at: 30
            }]
        );
        assert!(!hub.is_online("a"));
        // Unregistering twice is harmless.
        assert!(hub.unregister("a", a2.conn_id, 40).is_empty());
    }

    #[test]
    fn the_message_allowance_is_per_user() {
        let hub = Hub::new(
            NODE,
            4,
            UserLimits {
                max_connections: 10,
                message_rate: 1,
                message_burst: 3,
            },
            Presence::new(0, 6000),
        );
        assert_eq!(hub.take_messages("a", 2, 0), Ok(()));
        assert_eq!(hub.take_messages("a", 1, 0), Ok(()));
        assert_eq!(hub.take_messages("a", 1, 0), Err(1000));
        assert_eq!(hub.take_messages("b", 3, 0), Ok(()));
        assert_eq!(hub.take_messages("a", 1, 1000), Ok(()));
    }

    #[test]
    fn node_ids_of_names_are_stable() {
        assert_eq!(NodeId::from_name("a"), NodeId::from_name("a"));
        assert_ne!(NodeId::from_name("a"), NodeId::from_name("b"));
        assert_eq!(NodeId(255).to_string(), "00000000000000ff");
    }
}

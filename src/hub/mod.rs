//! Node-local sessions and fan-out. The [`Hub`] knows every live connection of this node, which
//! chats each has open, and its bounded send queue. Every publish goes through a [`Broker`]
//! (in memory on one node), so single-node tests exercise the same path a cluster would.
//!
//! A connection whose queue is full is not waited for: it is cancelled (closed with 4429 by its
//! session), so one slow reader never holds up the others or grows memory without bound.
//!
//! Per-user limits live here too, since the hub sees all of a user's connections on this node:
//! at most `max_per_user` connections, and one message-rate bucket shared by all of them.

pub mod broker;
pub mod node;
pub mod presence;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use broker::{Broker, MemoryBroker};

use crate::limits::KeyedBuckets;

/// A connection's id: a UUIDv7 (PROTOCOL: every id is one), unique across nodes and restarts.
pub type ConnId = uuid::Uuid;

/// Users whose message-rate bucket is held at once (full buckets are dropped first).
const RATE_MAX_USERS: usize = 100_000;

/// A frame on its way to one connection. The JSON text is shared between recipients.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub text: Arc<str>,
    /// Set on `message` pushes: writing it to a connection marks it delivered for that user.
    /// Behind an `Arc`: a queue slot stays two words, and every connection's queue allocates its
    /// slots up front (idle memory per connection).
    pub delivery: Option<Arc<Delivery>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub chat_id: Arc<str>,
    pub seq: i64,
    pub sender_id: Arc<str>,
}

impl Outbound {
    pub fn frame(text: impl Into<Arc<str>>) -> Self {
        Self {
            text: text.into(),
            delivery: None,
        }
    }
}

/// Who a publish is for.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub users: Vec<String>,
    /// Only connections that have this chat open (typing events).
    pub only_open_chat: Option<String>,
    /// Not to this connection (e.g. the one that caused it).
    pub except_conn: Option<ConnId>,
    /// Only to this connection (call signaling addresses one device).
    pub only_conn: Option<ConnId>,
    pub out: Outbound,
}

struct Conn {
    tx: mpsc::Sender<Outbound>,
    kill: CancellationToken,
    open_chats: HashSet<String>,
}

/// What a session gets when it registers.
pub struct Registration {
    pub conn_id: ConnId,
    pub rx: mpsc::Receiver<Outbound>,
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

pub struct Hub {
    queue_len: usize,
    max_per_user: usize,
    conns: Mutex<HashMap<String, HashMap<ConnId, Conn>>>,
    message_rates: Mutex<KeyedBuckets>,
    overflows: AtomicU64,
}

impl Hub {
    pub fn new(queue_len: usize) -> Self {
        Self::with_limits(queue_len, UserLimits::default())
    }

    pub fn with_limits(queue_len: usize, limits: UserLimits) -> Self {
        Self {
            queue_len,
            max_per_user: limits.max_connections,
            conns: Mutex::new(HashMap::new()),
            message_rates: Mutex::new(KeyedBuckets::new(
                limits.message_rate,
                limits.message_burst,
                RATE_MAX_USERS,
            )),
            overflows: AtomicU64::new(0),
        }
    }

    /// A new connection of `user_id`, unless the user already holds the most allowed.
    pub fn register(&self, user_id: &str) -> Result<Registration, TooManyConnections> {
        let conn_id = uuid::Uuid::now_v7();
        let mut conns = self.conns.lock().expect("hub lock");
        let user = conns.entry(user_id.to_owned()).or_default();
        if user.len() >= self.max_per_user {
            if user.is_empty() {
                conns.remove(user_id);
            }
            return Err(TooManyConnections(self.max_per_user));
        }
        let (tx, rx) = mpsc::channel(self.queue_len);
        let kill = CancellationToken::new();
        user.insert(
            conn_id,
            Conn {
                tx,
                kill: kill.clone(),
                open_chats: HashSet::new(),
            },
        );
        Ok(Registration { conn_id, rx, kill })
    }

    /// Spends `n` of `user_id`'s message allowance at `now_ms` (shared by all the user's
    /// connections): `Err(retry_after_ms)` when it is used up.
    pub fn take_messages(&self, user_id: &str, n: u32, now_ms: i64) -> Result<(), i64> {
        self.message_rates
            .lock()
            .expect("rate lock")
            .take(user_id, n, now_ms)
    }

    pub fn unregister(&self, user_id: &str, conn_id: ConnId) {
        let mut conns = self.conns.lock().expect("hub lock");
        if let Some(user) = conns.get_mut(user_id) {
            user.remove(&conn_id);
            if user.is_empty() {
                conns.remove(user_id);
            }
        }
    }

    pub fn set_chat_open(&self, user_id: &str, conn_id: ConnId, chat_id: &str, open: bool) {
        let mut conns = self.conns.lock().expect("hub lock");
        if let Some(conn) = conns.get_mut(user_id).and_then(|u| u.get_mut(&conn_id)) {
            if open {
                conn.open_chats.insert(chat_id.to_owned());
            } else {
                conn.open_chats.remove(chat_id);
            }
        }
    }

    /// Whether `user_id` has a live connection on this node.
    pub fn is_connected(&self, user_id: &str) -> bool {
        self.conns.lock().expect("hub lock").contains_key(user_id)
    }

    pub fn connection_count(&self) -> usize {
        self.conns
            .lock()
            .expect("hub lock")
            .values()
            .map(HashMap::len)
            .sum()
    }

    /// Times a connection was cut because its queue was full.
    pub fn overflow_count(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }

    /// Queues the envelope on every matching local connection, never waiting.
    pub fn deliver_local(&self, env: &Envelope) {
        let conns = self.conns.lock().expect("hub lock");
        for user in &env.users {
            let Some(user_conns) = conns.get(user) else {
                continue;
            };
            for (id, conn) in user_conns {
                if env.except_conn == Some(*id) || env.only_conn.is_some_and(|c| c != *id) {
                    continue;
                }
                if let Some(chat) = &env.only_open_chat {
                    if !conn.open_chats.contains(chat) {
                        continue;
                    }
                }
                match conn.tx.try_send(env.out.clone()) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        if !conn.kill.is_cancelled() {
                            self.overflows.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!("switchboard_ws_send_queue_overflows_total")
                                .increment(1);
                            tracing::info!(conn_id = %id, "send queue full; closing with 4429");
                            conn.kill.cancel();
                        }
                    }
                    // The session is already gone; it unregisters itself.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(users: &[&str], text: &str) -> Envelope {
        Envelope {
            users: users.iter().map(|u| u.to_string()).collect(),
            only_open_chat: None,
            except_conn: None,
            only_conn: None,
            out: Outbound::frame(text),
        }
    }

    #[test]
    fn delivers_to_every_connection_of_each_user() {
        let hub = Hub::new(4);
        let mut a1 = hub.register("a").unwrap();
        let mut a2 = hub.register("a").unwrap();
        let mut b = hub.register("b").unwrap();
        hub.deliver_local(&env(&["a"], "x"));
        assert_eq!(&*a1.rx.try_recv().unwrap().text, "x");
        assert_eq!(&*a2.rx.try_recv().unwrap().text, "x");
        assert!(b.rx.try_recv().is_err());
    }

    #[test]
    fn open_chat_filter_and_exception() {
        let hub = Hub::new(4);
        let mut a1 = hub.register("a").unwrap();
        let mut a2 = hub.register("a").unwrap();
        hub.set_chat_open("a", a1.conn_id, "c", true);
        let mut e = env(&["a"], "t");
        e.only_open_chat = Some("c".into());
        hub.deliver_local(&e);
        assert!(a1.rx.try_recv().is_ok());
        assert!(a2.rx.try_recv().is_err());
        let mut e = env(&["a"], "t");
        e.except_conn = Some(a1.conn_id);
        hub.deliver_local(&e);
        assert!(a1.rx.try_recv().is_err());
        assert!(a2.rx.try_recv().is_ok());
    }

    #[test]
    fn overflow_cancels_only_the_slow_connection() {
        let hub = Hub::new(2);
        let slow = hub.register("a").unwrap();
        let mut fast = hub.register("b").unwrap();
        for i in 0..3 {
            hub.deliver_local(&env(&["a", "b"], &i.to_string()));
            fast.rx.try_recv().unwrap();
        }
        assert!(slow.kill.is_cancelled());
        assert!(!fast.kill.is_cancelled());
        assert_eq!(hub.overflow_count(), 1);
        hub.unregister("a", slow.conn_id);
        assert!(!hub.is_connected("a"));
        assert!(hub.is_connected("b"));
    }

    #[test]
    fn connections_per_user_are_capped() {
        let hub = Hub::with_limits(
            4,
            UserLimits {
                max_connections: 2,
                ..UserLimits::default()
            },
        );
        let a1 = hub.register("a").unwrap();
        let _a2 = hub.register("a").unwrap();
        assert_eq!(hub.register("a").err(), Some(TooManyConnections(2)));
        assert!(hub.register("b").is_ok(), "other users are not affected");
        hub.unregister("a", a1.conn_id);
        assert!(hub.register("a").is_ok());
        assert_ne!(a1.conn_id, _a2.conn_id);
        assert_eq!(a1.conn_id.get_version_num(), 7);
    }

    #[test]
    fn the_message_allowance_is_per_user() {
        let hub = Hub::with_limits(
            4,
            UserLimits {
                max_connections: 10,
                message_rate: 1,
                message_burst: 3,
            },
        );
        assert_eq!(hub.take_messages("a", 2, 0), Ok(()));
        assert_eq!(hub.take_messages("a", 1, 0), Ok(()));
        assert_eq!(hub.take_messages("a", 1, 0), Err(1000));
        assert_eq!(hub.take_messages("b", 3, 0), Ok(()));
        assert_eq!(hub.take_messages("a", 1, 1000), Ok(()));
    }
}

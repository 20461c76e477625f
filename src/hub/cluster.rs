//! What the nodes of a cluster share in Redis besides the broker (PROTOCOL §8): who is connected
//! where, presence across nodes, which nodes are alive, and which node coordinates calls.
//!
//! Keys (all under the cluster's prefix):
//! - `conns:{user}`: hash, one field per connection (`{node}:{uuid}` → node) on any node;
//! - `nodeconns:{node}`: hash, the same connections by node (`{node}:{uuid}` → user), so a dead
//!   node's connections can be removed by whoever notices it died;
//! - `gone:{user}`: set when a user's last connection anywhere went away, holding the token of
//!   the node that runs the offline grace; a connection anywhere deletes it (the user came back
//!   within the grace, nobody saw them leave), and only the holder of the token shows the user
//!   offline when its grace runs out;
//! - `alive:{node}` (expires after [`NODE_TTL`] unless renewed) and the set `nodes`: a node not
//!   alive is swept by one survivor (`sweep:{node}` decides who): its connections are removed as
//!   if they had closed, so its users go offline after the grace and their calls follow §2.2's
//!   reconnect grace;
//! - `leader` (expires after [`NODE_TTL`] unless renewed): the node that runs the calls machine
//!   for the whole cluster, so busy state, glare and ringing every device need no distributed
//!   protocol; the others forward call signals to it;
//! - `calls`: the state of the calls the leader runs, for a successor to take over if it dies;
//! - `graces`: sorted set of users inside their offline grace (score: when their last
//!   connection went), so that if the node running a grace stops, another shows them offline.
//!
//! Every change of several keys is one Lua script, so two nodes never see half of one. Each
//! call may fail (Redis away): callers fall back to what this node knows by itself.
//!
//! A shell: the clock is only read for timeouts.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use super::{ConnId, NodeId};

/// How long a node counts as alive after its last heartbeat, and the leader as leader.
pub const NODE_TTL: Duration = Duration::from_secs(10);
/// How often a node renews its heartbeat and looks for dead nodes.
pub const TICK: Duration = Duration::from_secs(3);
/// How long a node trusts what it last learnt of the calls lease (less than [`NODE_TTL`], so a
/// leader cut off stops before the lease can pass to another node).
const LEADER_VIEW: Duration = Duration::from_secs(7);
/// How long after a grace should have ended another node may end it (its node stopped).
const GRACE_SLACK_MS: i64 = 3_000;
/// How long one Redis command may take.
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long a `gone:` entry outlives the grace (then it is only garbage).
const GONE_SLACK_MS: i64 = 60_000;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer in time")]
    Timeout,
    #[error("node {0} is already running (its heartbeat is alive); every node needs its own cluster.node_id")]
    DuplicateNode(NodeId),
}

type Result<T> = std::result::Result<T, ClusterError>;

/// A connection of a dead node, removed by the sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    pub user: String,
    pub conn: ConnId,
    /// Set when it was the user's last connection anywhere: this node now runs their grace.
    pub gone_token: Option<String>,
}

/// What a [`Cluster::resync`] changed.
#[derive(Debug, Default)]
pub struct Resynced {
    /// Users shown online by it (their first connection anywhere).
    pub online: Vec<String>,
    /// Users whose last connection anywhere it removed: this node runs their grace.
    pub gone: Vec<String>,
}

/// What a [`Cluster::tick`] found.
#[derive(Debug, Default)]
pub struct Tick {
    /// Users whose grace a stopped node left running: show them offline (with when they left).
    pub offline: Vec<(String, i64)>,
    /// Connections of nodes that died.
    pub lost: Vec<Lost>,
    /// The nodes swept.
    pub dead: Vec<NodeId>,
}

pub struct Cluster {
    conn: ConnectionManager,
    prefix: String,
    node: NodeId,
    grace_ms: i64,
    /// The calls leader (0: not known) and when that was last learnt from Redis: a view older
    /// than [`LEADER_VIEW`] is not trusted (a node cut off from Redis must not go on believing
    /// it runs the calls while another takes the lease).
    leader: AtomicU64,
    leader_seen: Mutex<Option<tokio::time::Instant>>,
    /// A write of a connection failed: the next resync compares everything.
    dirty: AtomicBool,
    healthy: AtomicBool,
    /// Counter for `gone:` tokens.
    tokens: AtomicU64,
    /// Tokens of users whose offline grace this node runs.
    pending: Mutex<HashMap<String, String>>,
}

const UP: &str = r#"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZREM', KEYS[4], ARGV[3])
local gone = redis.call('DEL', KEYS[3])
if redis.call('HLEN', KEYS[1]) == 1 and gone == 0 then return 1 end
return 0
"#;

const DOWN: &str = r#"
local had = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if had == 1 and redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4])
  return 1
end
return 0
"#;

const OFFLINE_DUE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('HLEN', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[3], ARGV[2])
  return 1
end
return 0
"#;

/// Graces whose node did not end them in time (KEYS[1] the sorted set; ARGV[1] the latest
/// start that is overdue, ARGV[2] the key prefix): the users to show offline, with when they
/// left, as a flat list.
const CLAIM_GRACES: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, 200)
local out = {}
for i = 1, #due, 2 do
  local user = due[i]
  redis.call('ZREM', KEYS[1], user)
  if redis.call('HLEN', ARGV[2] .. 'conns:' .. user) == 0 then
    redis.call('DEL', ARGV[2] .. 'gone:' .. user)
    table.insert(out, user)
    table.insert(out, due[i + 1])
  end
end
return out
"#;

/// Renews the lease in KEYS[1] if ARGV[1] holds it, takes it if nobody does; returns the holder.
const LEASE: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return holder
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return holder
"#;

/// Deletes KEYS[1] if ARGV[1] holds it.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

fn field(conn: ConnId) -> String {
    format!("{}:{}", conn.node().0, conn.uuid())
}

fn parse_field(f: &str) -> Option<ConnId> {
    let (node, id) = f.split_once(':')?;
    Some(ConnId::new(
        NodeId(node.parse().ok()?),
        uuid::Uuid::parse_str(id).ok()?,
    ))
}

async fn timed<T>(f: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T> {
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ClusterError::Timeout),
    }
}

impl Cluster {
    /// Joins the cluster at `url` as `node`. If a node of that id is alive, waits for its
    /// heartbeat to run out (a restart of a crashed node), and refuses if it stays alive (two
    /// processes configured with one `cluster.node_id`). Connections the node held before a
    /// crash are removed first.
    pub async fn join(
        url: &str,
        prefix: &str,
        node: NodeId,
        grace_ms: i64,
    ) -> Result<(std::sync::Arc<Self>, Vec<Lost>)> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(TIMEOUT))
            .set_connection_timeout(Some(TIMEOUT))
            .set_max_delay(Duration::from_secs(5))
            .set_number_of_retries(1);
        let conn = timed(ConnectionManager::new_with_config(client, config)).await?;
        let cluster = std::sync::Arc::new(Self {
            conn,
            prefix: prefix.to_owned(),
            node,
            grace_ms,
            leader: AtomicU64::new(0),
            leader_seen: Mutex::new(None),
            dirty: AtomicBool::new(false),
            healthy: AtomicBool::new(true),
            tokens: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
        });
        let alive = cluster.key(&format!("alive:{}", node.0));
        let deadline = tokio::time::Instant::now() + NODE_TTL + TICK;
        loop {
            let mut c = cluster.conn.clone();
            let set: Option<String> = timed(
                redis::cmd("SET")
                    .arg(&alive)
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(NODE_TTL.as_millis() as u64)
                    .query_async(&mut c),
            )
            .await?;
            if set.is_some() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ClusterError::DuplicateNode(node));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let mut stale = Vec::new();
        cluster.sweep_node(node, &mut stale).await?;
        let mut c = cluster.conn.clone();
        let _: () = timed(c.sadd(cluster.key("nodes"), node.0)).await?;
        Ok((cluster, stale))
    }

    fn key(&self, k: &str) -> String {
        format!("{}{}", self.prefix, k)
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Whether the last exchange with Redis worked (`/readyz`).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn seen<T>(&self, r: Result<T>) -> Result<T> {
        self.healthy.store(r.is_ok(), Ordering::Relaxed);
        r
    }

    /// The node running the calls machine, if known.
    pub fn leader(&self) -> Option<NodeId> {
        let fresh = self
            .leader_seen
            .lock()
            .expect("leader lock")
            .is_some_and(|t| t.elapsed() < LEADER_VIEW);
        if !fresh {
            return None;
        }
        match self.leader.load(Ordering::Relaxed) {
            0 => None,
            n => Some(NodeId(n)),
        }
    }

    /// A connection came up here; true when its user came online for the whole cluster (no
    /// connection anywhere before and not inside an offline grace).
    pub async fn conn_up(&self, user: &str, conn: ConnId) -> Result<bool> {
        self.pending.lock().expect("pending lock").remove(user);
        let mut c = self.conn.clone();
        let r = timed(
            redis::Script::new(UP)
                .key(self.key(&format!("conns:{user}")))
                .key(self.key(&format!("nodeconns:{}", conn.node().0)))
                .key(self.key(&format!("gone:{user}")))
                .key(self.key("graces"))
                .arg(field(conn))
                .arg(conn.node().0)
                .arg(user)
                .invoke_async::<i64>(&mut c),
        )
        .await;
        if r.is_err() {
            self.dirty.store(true, Ordering::Relaxed);
        }
        self.seen(r).map(|n| n == 1)
    }

    /// A connection went away; true when it was its user's last anywhere: this node then runs
    /// the offline grace ([`Cluster::offline_due`] when it runs out).
    pub async fn conn_down(&self, user: &str, conn: ConnId) -> Result<bool> {
        let token = self.remove_conn(user, conn, conn.node()).await?;
        Ok(token.is_some())
    }

    async fn remove_conn(&self, user: &str, conn: ConnId, of: NodeId) -> Result<Option<String>> {
        let token = format!(
            "{}:{}",
            self.node.0,
            self.tokens.fetch_add(1, Ordering::Relaxed)
        );
        let mut c = self.conn.clone();
        let r = timed(
            redis::Script::new(DOWN)
                .key(self.key(&format!("conns:{user}")))
                .key(self.key(&format!("nodeconns:{}", of.0)))
                .key(self.key(&format!("gone:{user}")))
                .key(self.key("graces"))
                .arg(field(conn))
                .arg(&token)
                .arg(self.grace_ms.max(0) + GONE_SLACK_MS)
                .arg(user)
                .arg(crate::time::now_ms())
                .invoke_async::<i64>(&mut c),
        )
        .await;
        if r.is_err() {
            self.dirty.store(true, Ordering::Relaxed);
        }
        if self.seen(r)? == 1 {
            self.pending
                .lock()
                .expect("pending lock")
                .insert(user.to_owned(), token.clone());
            Ok(Some(token))
        } else {
            Ok(None)
        }
    }

    /// The grace of `user` ran out here: true when they are to be shown offline (this node
    /// ran their grace, and they did not come back anywhere).
    pub async fn offline_due(&self, user: &str) -> Result<bool> {
        let Some(token) = self.pending.lock().expect("pending lock").remove(user) else {
            return Ok(false);
        };
        let mut c = self.conn.clone();
        let r = timed(
            redis::Script::new(OFFLINE_DUE)
                .key(self.key(&format!("gone:{user}")))
                .key(self.key(&format!("conns:{user}")))
                .key(self.key("graces"))
                .arg(token)
                .arg(user)
                .invoke_async::<i64>(&mut c),
        )
        .await;
        self.seen(r).map(|n| n == 1)
    }

    /// For each user, whether they are shown online anywhere (connected, or inside a grace).
    pub async fn online(&self, users: &[&str]) -> Result<Vec<bool>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for u in users {
            pipe.cmd("HLEN").arg(self.key(&format!("conns:{u}")));
            pipe.cmd("EXISTS").arg(self.key(&format!("gone:{u}")));
        }
        let mut c = self.conn.clone();
        let r: Result<Vec<i64>> = timed(pipe.query_async(&mut c)).await;
        let counts = self.seen(r)?;
        Ok(counts.chunks(2).map(|p| p[0] > 0 || p[1] > 0).collect())
    }

    /// Every live connection of `user`, on any node, oldest first.
    pub async fn connections_of(&self, user: &str) -> Result<Vec<ConnId>> {
        let mut c = self.conn.clone();
        let r: Result<HashMap<String, String>> =
            timed(c.hgetall(self.key(&format!("conns:{user}")))).await;
        let mut out: Vec<ConnId> = self
            .seen(r)?
            .keys()
            .filter_map(|f| parse_field(f))
            .collect();
        // UUIDv7: in creation order.
        out.sort_by_key(|c| c.uuid());
        Ok(out)
    }

    /// Renews this node's heartbeat and the calls lease, and sweeps nodes that died.
    /// What was found is returned even when a later step failed (then with its error).
    pub async fn tick(&self) -> (Tick, Option<ClusterError>) {
        let mut tick = Tick::default();
        let r = self.tick_inner(&mut tick).await;
        let e = self.seen(r).err();
        (tick, e)
    }

    async fn tick_inner(&self, out: &mut Tick) -> Result<()> {
        let mut c = self.conn.clone();
        let ttl = NODE_TTL.as_millis() as u64;
        let _: () = timed(
            redis::cmd("SET")
                .arg(self.key(&format!("alive:{}", self.node.0)))
                .arg(1)
                .arg("PX")
                .arg(ttl)
                .query_async(&mut c),
        )
        .await?;
        let _: () = timed(c.sadd(self.key("nodes"), self.node.0)).await?;
        let holder: String = timed(
            redis::Script::new(LEASE)
                .key(self.key("leader"))
                .arg(self.node.0.to_string())
                .arg(ttl)
                .invoke_async(&mut c),
        )
        .await?;
        self.leader
            .store(holder.parse().unwrap_or(0), Ordering::Relaxed);
        *self.leader_seen.lock().expect("leader lock") = Some(tokio::time::Instant::now());
        // Graces a stopped node left running: shown offline here.
        let overdue = crate::time::now_ms() - self.grace_ms.max(0) - GRACE_SLACK_MS;
        let claimed: Vec<String> = timed(
            redis::Script::new(CLAIM_GRACES)
                .key(self.key("graces"))
                .arg(overdue)
                .arg(&self.prefix)
                .invoke_async(&mut c),
        )
        .await?;
        for pair in claimed.chunks(2) {
            if let [user, at] = pair {
                out.offline
                    .push((user.clone(), at.parse().unwrap_or(overdue)));
            }
        }
        let nodes: Vec<String> = timed(c.smembers(self.key("nodes"))).await?;
        let nodes = nodes.into_iter().filter_map(|n| n.parse::<u64>().ok());
        for n in nodes.filter(|n| *n != self.node.0) {
            let alive: bool = timed(c.exists(self.key(&format!("alive:{n}")))).await?;
            if alive {
                continue;
            }
            // One survivor sweeps; the lock outlives a slow sweep, not a dead sweeper.
            let lock: Option<String> = timed(
                redis::cmd("SET")
                    .arg(self.key(&format!("sweep:{n}")))
                    .arg(self.node.0)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl * 3)
                    .query_async(&mut c),
            )
            .await?;
            if lock.is_none() {
                continue;
            }
            // What was removed before a failure is reported all the same.
            let failed = self.sweep_node(NodeId(n), &mut out.lost).await.err();
            if let Some(e) = failed {
                return Err(e);
            }
            let _: () = timed(c.srem(self.key("nodes"), n)).await?;
            out.dead.push(NodeId(n));
            tracing::warn!(node = %NodeId(n), "node stopped sending heartbeats; its connections were removed");
        }
        Ok(())
    }

    /// Removes every connection `node` holds in Redis, each as if it had closed.
    async fn sweep_node(&self, node: NodeId, lost: &mut Vec<Lost>) -> Result<()> {
        let mut c = self.conn.clone();
        let conns: HashMap<String, String> =
            timed(c.hgetall(self.key(&format!("nodeconns:{}", node.0)))).await?;
        for (f, user) in conns {
            let Some(conn) = parse_field(&f) else {
                let _: () = timed(c.hdel(self.key(&format!("nodeconns:{}", node.0)), &f)).await?;
                continue;
            };
            let gone_token = self.remove_conn(&user, conn, node).await?;
            lost.push(Lost {
                user,
                conn,
                gone_token,
            });
        }
        Ok(())
    }

    /// Makes what Redis holds of this node's connections what its hub holds (`local`), when
    /// the counts differ: Redis restarted and lost them, a close could not be written while
    /// Redis was away, or this node was swept during a partition. Returns the users that came
    /// online by it and those whose last connection it removed (this node runs their grace).
    pub async fn resync(&self, local: &[(String, ConnId)]) -> Result<Resynced> {
        let r = self.resync_inner(local).await;
        self.seen(r)
    }

    async fn resync_inner(&self, local: &[(String, ConnId)]) -> Result<Resynced> {
        let mut c = self.conn.clone();
        let mine = self.key(&format!("nodeconns:{}", self.node.0));
        let held: usize = timed(c.hlen(&mine)).await?;
        let dirty = self.dirty.swap(false, Ordering::Relaxed);
        if held == local.len() && !dirty {
            return Ok(Resynced::default());
        }
        let stored: HashMap<String, String> = timed(c.hgetall(&mine)).await?;
        let local: HashMap<String, (&str, ConnId)> = local
            .iter()
            .map(|(u, conn)| (field(*conn), (u.as_str(), *conn)))
            .collect();
        let mut out = Resynced::default();
        let missing: Vec<(&String, &(&str, ConnId))> = local
            .iter()
            .filter(|(f, _)| !stored.contains_key(*f))
            .collect();
        if !missing.is_empty() {
            let mut pipe = redis::pipe();
            for (f, (user, conn)) in &missing {
                pipe.cmd("EVAL")
                    .arg(UP)
                    .arg(4)
                    .arg(self.key(&format!("conns:{user}")))
                    .arg(&mine)
                    .arg(self.key(&format!("gone:{user}")))
                    .arg(self.key("graces"))
                    .arg(f.as_str())
                    .arg(conn.node().0)
                    .arg(*user);
            }
            let came: Vec<i64> = timed(pipe.query_async(&mut c)).await?;
            for ((_, (user, _)), first) in missing.iter().zip(came) {
                if first == 1 {
                    out.online.push((*user).to_owned());
                }
            }
        }
        for (f, user) in stored.iter().filter(|(f, _)| !local.contains_key(*f)) {
            let Some(conn) = parse_field(f) else {
                let _: () = timed(c.hdel(&mine, f)).await?;
                continue;
            };
            if self.remove_conn(user, conn, self.node).await?.is_some() {
                out.gone.push(user.clone());
            }
        }
        tracing::info!(
            added = missing.len(),
            removed = held.saturating_sub(local.len() - missing.len()),
            "this node's connections in Redis brought in line with the node"
        );
        Ok(out)
    }

    /// For each (user, connection), whether Redis holds it.
    pub async fn conns_exist(&self, conns: &[(String, ConnId)]) -> Result<Vec<bool>> {
        if conns.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (user, conn) in conns {
            pipe.hexists(self.key(&format!("conns:{user}")), field(*conn));
        }
        let mut c = self.conn.clone();
        let r = timed(pipe.query_async(&mut c)).await;
        self.seen(r)
    }

    /// Gives the calls lease up (this node stops running calls), so another takes it at its
    /// next heartbeat rather than when it expires.
    pub async fn release_lease(&self) {
        *self.leader_seen.lock().expect("leader lock") = None;
        let mut c = self.conn.clone();
        let _ = timed(
            redis::Script::new(RELEASE)
                .key(self.key("leader"))
                .arg(self.node.0.to_string())
                .invoke_async::<i64>(&mut c),
        )
        .await;
    }

    /// Whether this node holds the calls lease now.
    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.node)
    }

    /// Keeps `call` (JSON) as open on the leader, for a successor to end if the leader dies.
    pub async fn save_call(&self, call_id: &str, call: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let r = timed(c.hset(self.key("calls"), call_id, call)).await;
        self.seen(r)
    }

    pub async fn drop_call(&self, call_id: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let r = timed(c.hdel(self.key("calls"), call_id)).await;
        self.seen(r)
    }

    /// The calls a previous leader left open (removed: whoever takes them ends them).
    pub async fn take_calls(&self) -> Result<Vec<String>> {
        let mut c = self.conn.clone();
        let key = self.key("calls");
        let (calls,): (HashMap<String, String>,) = timed(
            redis::pipe()
                .atomic()
                .hgetall(&key)
                .del(&key)
                .ignore()
                .query_async(&mut c),
        )
        .await?;
        Ok(calls.into_values().collect())
    }

    /// Leaves the cluster (a clean stop): no heartbeat, no lease, nothing to sweep.
    pub async fn leave(&self) {
        let mut c = self.conn.clone();
        let node = self.node.0.to_string();
        let _ = timed(
            redis::Script::new(RELEASE)
                .key(self.key("leader"))
                .arg(&node)
                .invoke_async::<i64>(&mut c),
        )
        .await;
        let mut pipe = redis::pipe();
        pipe.srem(self.key("nodes"), self.node.0)
            .ignore()
            .del(self.key(&format!("alive:{}", self.node.0)))
            .ignore();
        let _ = timed(pipe.query_async::<()>(&mut c)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_fields_round_trip() {
        let conn = ConnId::new(NodeId(42), uuid::Uuid::now_v7());
        assert_eq!(parse_field(&field(conn)), Some(conn));
        assert_eq!(parse_field("x:y"), None);
        assert_eq!(parse_field("nocolon"), None);
    }
}

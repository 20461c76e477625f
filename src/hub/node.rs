//! The node: what every connection of this process shares. It registers connections in the
//! [`Hub`] (and says when a user comes online or goes offline), publishes through the
//! [`Broker`] (its hub is subscribed, so its own publications come back to it the way other
//! nodes' do), runs presence's timers, and batches delivery receipts: a session that wrote a
//! `message` push reports it here, and one task moves the delivered cursors in the store and
//! pushes `message:status` to the senders.
//!
//! A shell: reads the clock and passes it into the hub's pure presence.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::cluster::{Cluster, Lost};
use super::presence::PresenceEvent;
use super::{
    Broker, BrokerError, ConnId, Control, Hub, NodeId, Publication, Registration,
    TooManyConnections,
};
use crate::store::{CursorKind, CursorUpdate, Member, MessageRecord, StatusChange, Store};
use crate::time::{now_ms, rfc3339_ms};
use crate::wire::chat::{MessageStatusChanged, Typing, UsersUpdate};
use crate::wire::models::Message;
use crate::wire::{events, Push};

/// Delivery reports queued before sessions wait for the batcher.
const DELIVERY_QUEUE: usize = 4096;

pub struct Node {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    presence_changed: Notify,
    delivery_tx: mpsc::Sender<CursorUpdate>,
    delivery_rx: std::sync::Mutex<Option<mpsc::Receiver<CursorUpdate>>>,
    /// Presence and connections across nodes (`None`: one node, the hub knows everything).
    cluster: Option<Arc<Cluster>>,
    /// Connections of dead nodes, for the calls machine.
    lost_tx: mpsc::UnboundedSender<(String, ConnId)>,
    lost_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<(String, ConnId)>>>,
    /// Cancelled when the node leaves (the cluster heartbeat stops then).
    left: CancellationToken,
}

impl Node {
    /// A node around `hub`, subscribed to `broker`; in a cluster, `cluster` tells it who is
    /// connected on the other nodes.
    pub async fn start(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        broker: Arc<dyn Broker>,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<Arc<Node>, BrokerError> {
        broker.subscribe(hub.node(), hub.clone()).await?;
        let (delivery_tx, delivery_rx) = mpsc::channel(DELIVERY_QUEUE);
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        Ok(Arc::new(Self {
            cluster,
            lost_tx,
            lost_rx: std::sync::Mutex::new(Some(lost_rx)),
            left: CancellationToken::new(),
            store,
            hub,
            broker,
            presence_changed: Notify::new(),
            delivery_tx,
            delivery_rx: std::sync::Mutex::new(Some(delivery_rx)),
        }))
    }

    pub fn id(&self) -> NodeId {
        self.hub.node()
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Registers a connection of `user_id`; presence goes up with the user's first one (on any
    /// node, in a cluster).
    pub async fn connect(&self, user_id: &str) -> Result<Registration, TooManyConnections> {
        let (reg, event) = self.hub.register(user_id, now_ms())?;
        self.presence_changed.notify_one();
        let event = match &self.cluster {
            None => event,
            Some(c) => match c.conn_up(user_id, reg.conn_id).await {
                Ok(true) => Some(PresenceEvent::Online {
                    user_id: user_id.to_owned(),
                }),
                Ok(false) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster presence unavailable; this node decides");
                    event
                }
            },
        };
        self.dispatch_presence(event.into_iter().collect()).await;
        Ok(reg)
    }

    /// A connection is gone; presence goes down (after the grace) with the user's last one.
    pub async fn disconnect(&self, user_id: &str, conn: ConnId) {
        let events = self.hub.unregister(user_id, conn, now_ms());
        if let Some(c) = &self.cluster {
            if let Err(e) = c.conn_down(user_id, conn).await {
                tracing::warn!(error = %e, "cluster presence unavailable; this node decides");
            }
        }
        self.presence_changed.notify_one();
        self.dispatch_presence(events).await;
    }

    /// For each of `users`, whether they are shown online (on any node).
    pub async fn online(&self, users: &[&str]) -> Vec<bool> {
        if let Some(c) = &self.cluster {
            match c.online(users).await {
                Ok(v) => return v,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster presence unavailable; this node answers")
                }
            }
        }
        users.iter().map(|u| self.hub.is_online(u)).collect()
    }

    /// Whether `user_id` is shown online (on any node).
    pub async fn is_online(&self, user_id: &str) -> bool {
        self.online(&[user_id]).await[0]
    }

    /// Why this node cannot reach the others, if it cannot (`/readyz`).
    pub fn cluster_unready(&self) -> Option<&'static str> {
        if !self.broker.is_healthy() {
            return Some("redis unavailable (broker)");
        }
        match &self.cluster {
            Some(c) if !c.is_healthy() => Some("redis unavailable (cluster state)"),
            _ => None,
        }
    }

    /// The connections of `user_id` on every node, oldest first.
    pub async fn connections_of(&self, user_id: &str) -> Vec<ConnId> {
        if let Some(c) = &self.cluster {
            match c.connections_of(user_id).await {
                Ok(v) => return v,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster registry unavailable; local connections only")
                }
            }
        }
        self.hub.connections_of(user_id)
    }

    /// Connections of a dead node were removed: users whose last connection it was start
    /// their offline grace here, and the calls machine hears each connection went away.
    pub async fn conns_lost(&self, lost: Vec<Lost>) {
        let now = now_ms();
        for l in lost {
            if l.gone_token.is_some() {
                let events = self.hub.presence_gone(&l.user, now);
                self.presence_changed.notify_one();
                self.dispatch_presence(events).await;
            }
            let _ = self.lost_tx.send((l.user, l.conn));
        }
    }

    /// Connections of dead nodes, as they are found (taken once, by the calls machine).
    pub fn take_lost(&self) -> Option<mpsc::UnboundedReceiver<(String, ConnId)>> {
        self.lost_rx.lock().expect("lost lock").take()
    }

    /// Renews this node's heartbeat, sweeps dead nodes and keeps Redis in line with the hub,
    /// until the node leaves (clusters only: heartbeats go on while sessions drain, so a
    /// draining node is not swept). What it finds is dispatched off this loop, so slow presence
    /// work never delays a heartbeat.
    pub async fn run_cluster(self: Arc<Self>) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        let mut tick = tokio::time::interval(super::cluster::TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.left.cancelled() => return,
                _ = tick.tick() => {}
            }
            let (found, failed) = cluster.tick().await;
            if let Some(e) = failed {
                tracing::warn!(error = %e, "cluster heartbeat failed");
            }
            let resynced = if cluster.is_healthy() {
                match cluster.resync(&self.hub.all_connections()).await {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not bring Redis in line");
                        None
                    }
                }
            } else {
                None
            };
            let node = self.clone();
            tokio::spawn(async move {
                node.conns_lost(found.lost).await;
                for (user_id, at) in found.offline {
                    // Claimed from Redis already: shown offline without asking again.
                    node.show_offline(&user_id, at).await;
                }
                let mut events: Vec<PresenceEvent> = Vec::new();
                if let Some(r) = resynced {
                    let now = now_ms();
                    events.extend(
                        r.online
                            .into_iter()
                            .map(|user_id| PresenceEvent::Online { user_id }),
                    );
                    for user in r.gone {
                        events.extend(node.hub.presence_gone(&user, now));
                    }
                }
                node.presence_changed.notify_one();
                node.dispatch_presence(events).await;
            });
        }
    }

    /// Publishes through the broker. A failure is logged and counted: what it announces is
    /// stored already, and clients close the gap with `sync`.
    pub async fn publish(&self, p: Publication) {
        if let Err(e) = self.broker.publish(p).await {
            metrics::counter!("switchboard_broker_errors_total", "op" => "publish").increment(1);
            tracing::warn!(error = %e, "publish failed");
        }
    }

    /// `push` for every connection of `users`.
    pub async fn publish_to(&self, users: Vec<String>, push: Arc<Push>) {
        self.publish(Publication {
            users,
            only_open_chat: None,
            push,
        })
        .await;
    }

    /// `push` for one connection, on whichever node holds it.
    pub async fn send_to(&self, user: &str, conn: ConnId, push: Arc<Push>) {
        let c = Control::Deliver {
            user: user.to_owned(),
            conn,
            push,
        };
        if let Err(e) = self.broker.send_control(conn.node(), c).await {
            metrics::counter!("switchboard_broker_errors_total", "op" => "control").increment(1);
            tracing::warn!(error = %e, "control message failed");
        }
    }

    /// A call control (opaque here) for the calls machine of node `to`.
    pub async fn send_call(&self, to: NodeId, body: String) {
        let c = Control::Call {
            from: self.id(),
            body,
        };
        if let Err(e) = self.broker.send_control(to, c).await {
            metrics::counter!("switchboard_broker_errors_total", "op" => "control").increment(1);
            tracing::warn!(error = %e, "call control failed");
        }
    }

    /// Pushes a newly stored message to every connection of every member; the push (its data
    /// is the wire `Message`, for a reply to reuse).
    pub async fn publish_message(&self, record: &MessageRecord, members: &[Member]) -> Arc<Push> {
        let status = crate::store::status_of(record.seq, &record.sender_id, members);
        let push = Push::message(events::MESSAGE, &Message::new(record, status), true);
        self.publish_to(
            members.iter().map(|m| m.user_id.clone()).collect(),
            push.clone(),
        )
        .await;
        push
    }

    /// Pushes `message:status` to each sender whose messages changed status.
    pub async fn publish_status(&self, changes: Vec<StatusChange>) {
        for c in changes {
            let push = Push::new(
                events::MESSAGE_STATUS,
                &MessageStatusChanged {
                    message_id: &c.message_id,
                    chat_id: &c.chat_id,
                    seq: c.seq,
                    status: c.status,
                },
            );
            self.publish_to(vec![c.sender_id], push).await;
        }
    }

    /// A session wrote messages up to `seq` of `chat_id` to a connection of `user_id`.
    pub async fn report_delivered(&self, chat_id: &str, user_id: &str, seq: i64) {
        let update = CursorUpdate {
            chat_id: chat_id.to_owned(),
            user_id: user_id.to_owned(),
            kind: CursorKind::Delivered,
            seq,
        };
        // Waiting here when the batcher lags is deliberate back-pressure on the writers.
        let _ = self.delivery_tx.send(update).await;
    }

    /// `typing-start`; pushes `user-typing` to the other members' connections that have the
    /// chat open.
    pub async fn typing_start(&self, user_id: &str, chat_id: &str, others: Vec<String>) {
        self.hub.typing_start(user_id, chat_id, now_ms());
        self.presence_changed.notify_one();
        self.publish_typing(events::USER_TYPING, user_id, chat_id, others)
            .await;
    }

    /// `typing-stop` (or a sent message): pushes `user-stopped-typing` if the user was typing.
    pub async fn typing_stop(&self, user_id: &str, chat_id: &str, others: Vec<String>) {
        if self.hub.typing_stop(user_id, chat_id) {
            self.publish_typing(events::USER_STOPPED_TYPING, user_id, chat_id, others)
                .await;
        }
    }

    async fn publish_typing(
        &self,
        event: &'static str,
        user_id: &str,
        chat_id: &str,
        others: Vec<String>,
    ) {
        self.publish(Publication {
            users: others,
            only_open_chat: Some(chat_id.to_owned()),
            push: Push::new(event, &Typing { user_id, chat_id }),
        })
        .await;
    }

    async fn dispatch_presence(&self, events: Vec<PresenceEvent>) {
        metrics::gauge!("switchboard_users_online").set(self.hub.online_count() as f64);
        for ev in events {
            match ev {
                PresenceEvent::Online { user_id } => {
                    self.users_update(&user_id, true, None).await;
                }
                PresenceEvent::Offline { user_id, at } => {
                    if let Some(c) = &self.cluster {
                        // Shown offline by the node that ran the grace, if nobody came back.
                        match c.offline_due(&user_id).await {
                            Ok(true) => {}
                            Ok(false) => continue,
                            Err(e) => {
                                tracing::warn!(error = %e, "cluster presence unavailable; this node decides")
                            }
                        }
                    }
                    self.show_offline(&user_id, at).await;
                }
                PresenceEvent::TypingStopped { user_id, chat_id } => {
                    match self.store.members(&chat_id).await {
                        Ok(members) => {
                            let others = members
                                .into_iter()
                                .map(|m| m.user_id)
                                .filter(|u| *u != user_id)
                                .collect();
                            self.publish_typing(
                                events::USER_STOPPED_TYPING,
                                &user_id,
                                &chat_id,
                                others,
                            )
                            .await;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "typing expiry: members lookup failed")
                        }
                    }
                }
            }
        }
    }

    /// Stores the last-seen time and tells the user's contacts they are offline. In a cluster
    /// a connection may have come up on another node meanwhile, and its `online` may have
    /// reached the contacts first: then they hear `online` again, after this.
    async fn show_offline(&self, user_id: &str, at: i64) {
        if let Err(e) = self.store.set_last_seen(user_id, at).await {
            tracing::warn!(error = %e, "could not store last-seen time");
        }
        self.users_update(user_id, false, Some(at)).await;
        if let Some(c) = &self.cluster {
            if let Ok(v) = c.connections_of(user_id).await {
                if !v.is_empty() {
                    self.users_update(user_id, true, None).await;
                }
            }
        }
    }

    async fn users_update(&self, user_id: &str, online: bool, last_seen: Option<i64>) {
        let last_seen = match last_seen {
            Some(t) => Some(t),
            None => self
                .store
                .user_by_id(user_id)
                .await
                .ok()
                .and_then(|u| u.last_seen_at),
        };
        match self.store.contacts_of(user_id).await {
            Ok(contacts) if !contacts.is_empty() => {
                let push = Push::new(
                    events::USERS_UPDATE,
                    &UsersUpdate {
                        user_id,
                        is_online: online,
                        last_seen_at: last_seen.map(rfc3339_ms),
                    },
                );
                self.publish_to(contacts, push).await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "presence: contacts lookup failed"),
        }
    }

    /// Runs the presence timers until `shutdown`.
    pub async fn run_presence(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let next = self.hub.presence_timeout();
            let sleep = async {
                match next {
                    Some(at) => {
                        let wait = (at - now_ms()).max(0) as u64;
                        tokio::time::sleep(Duration::from_millis(wait)).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.presence_changed.notified() => continue,
                _ = sleep => {}
            }
            let events = self.hub.presence_expire(now_ms());
            self.dispatch_presence(events).await;
        }
    }

    /// Runs the delivery batcher: drains what is queued, coalesces per (chat, user), writes once,
    /// pushes the status changes. After `stop` (cancelled once the sessions are gone) it writes
    /// what is left and returns.
    pub async fn run_deliveries(self: Arc<Self>, stop: CancellationToken) {
        let Some(mut rx) = self.delivery_rx.lock().expect("delivery lock").take() else {
            return;
        };
        loop {
            let first = tokio::select! {
                biased;
                u = rx.recv() => u,
                _ = stop.cancelled() => None,
            };
            let mut batch: HashMap<(String, String), i64> = HashMap::new();
            let mut add = |u: CursorUpdate| {
                let e = batch.entry((u.chat_id, u.user_id)).or_insert(0);
                *e = (*e).max(u.seq);
            };
            let stopping = first.is_none();
            if let Some(u) = first {
                add(u);
            }
            while let Ok(u) = rx.try_recv() {
                add(u);
            }
            if !batch.is_empty() {
                let updates = batch
                    .into_iter()
                    .map(|((chat_id, user_id), seq)| CursorUpdate {
                        chat_id,
                        user_id,
                        kind: CursorKind::Delivered,
                        seq,
                    })
                    .collect();
                match self.store.advance_cursors(updates).await {
                    Ok(changes) => self.publish_status(changes).await,
                    Err(e) => tracing::warn!(error = %e, "could not store delivery receipts"),
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// Leaves the broker (the node is stopping).
    pub async fn leave(&self) {
        self.left.cancel();
        self.broker.unsubscribe(self.id()).await;
        if let Some(c) = &self.cluster {
            c.leave().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::presence::Presence;
    use crate::hub::{MemoryBroker, UserLimits};

    fn hub(node: u64) -> Arc<Hub> {
        Arc::new(Hub::new(
            NodeId(node),
            8,
            UserLimits::default(),
            Presence::new(0, 6000),
        ))
    }

    /// Two nodes on one broker, as a cluster runs: a publication from one reaches the other's
    /// connections, and a push for one connection goes to the node its id names.
    #[tokio::test]
    async fn two_nodes_on_one_broker_reach_each_others_connections() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open("", dir.path()).await.unwrap();
        let broker = Arc::new(MemoryBroker::new());
        let a = Node::start(store.clone(), hub(1), broker.clone(), None)
            .await
            .unwrap();
        let b = Node::start(store.clone(), hub(2), broker.clone(), None)
            .await
            .unwrap();
        assert!(
            Node::start(store, hub(2), broker.clone(), None)
                .await
                .is_err(),
            "one subscription per node id"
        );
        let mut on_a = a.connect("u").await.unwrap();
        let mut on_b = b.connect("u").await.unwrap();
        assert_eq!(on_b.conn_id.node(), NodeId(2));
        a.publish_to(vec!["u".into()], Push::new("e", "all")).await;
        assert_eq!(on_a.rx.try_recv().unwrap().data_json(), "\"all\"");
        assert_eq!(on_b.rx.try_recv().unwrap().data_json(), "\"all\"");
        a.send_to("u", on_b.conn_id, Push::new("e", "one")).await;
        assert_eq!(on_b.rx.try_recv().unwrap().data_json(), "\"one\"");
        assert!(on_a.rx.try_recv().is_err(), "only the addressed connection");
        b.leave().await;
        a.send_to("u", on_b.conn_id, Push::new("e", "gone")).await;
        assert!(on_b.rx.try_recv().is_err(), "a node that left gets nothing");
    }
}

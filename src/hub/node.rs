//! The node: what every connection shares. It owns presence/typing (the pure [`Presence`] behind
//! a lock, woken by one timer task), publishes through the [`Broker`], and batches delivery
//! receipts: a session that wrote a `message` frame reports it here, and one task moves the
//! delivered cursors in the store and pushes `message:status` to the senders.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::presence::{Presence, PresenceEvent};
use super::{Broker, Envelope, Hub, Outbound};
use crate::error::ApiError;
use crate::store::{CursorKind, CursorUpdate, Member, MessageRecord, StatusChange, Store, User};
use crate::time::{now_ms, rfc3339_ms};
use crate::ws::protocol::push;

/// Delivery reports queued before sessions wait for the batcher.
const DELIVERY_QUEUE: usize = 4096;

pub struct Node {
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    presence: Mutex<Presence>,
    presence_changed: Notify,
    delivery_tx: mpsc::Sender<CursorUpdate>,
    delivery_rx: Mutex<Option<mpsc::Receiver<CursorUpdate>>>,
}

impl Node {
    pub fn new(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        broker: Arc<dyn Broker>,
        offline_grace: Duration,
        typing_timeout: Duration,
    ) -> Self {
        let (delivery_tx, delivery_rx) = mpsc::channel(DELIVERY_QUEUE);
        Self {
            store,
            hub,
            broker,
            presence: Mutex::new(Presence::new(
                offline_grace.as_millis() as i64,
                typing_timeout.as_millis() as i64,
            )),
            presence_changed: Notify::new(),
            delivery_tx,
            delivery_rx: Mutex::new(Some(delivery_rx)),
        }
    }

    /// Members of `chat_id` if `user_id` is one: `not_found` / `forbidden` otherwise. The access
    /// check every chat request makes, over the WebSocket and REST alike.
    pub async fn members_for(&self, chat_id: &str, user_id: &str) -> Result<Vec<Member>, ApiError> {
        let members = self.store.members(chat_id).await?;
        if members.is_empty() {
            // Every chat has members; none means no such chat.
            return Err(ApiError::not_found("chat not found"));
        }
        if !members.iter().any(|m| m.user_id == user_id) {
            return Err(ApiError::forbidden("not a participant of this chat"));
        }
        Ok(members)
    }

    /// Every user as `viewer` may see them: online state and last-seen time only of users who
    /// share a chat with the viewer (and of the viewer), `isOnline: false, lastSeenAt: null`
    /// for everyone else. What `GET /api/users` and `users:list` return.
    pub async fn users_seen_by(&self, viewer: &str) -> Result<Vec<User>, ApiError> {
        let contacts: HashSet<String> = self.store.contacts_of(viewer).await?.into_iter().collect();
        Ok(self
            .store
            .list_users()
            .await?
            .iter()
            .map(|u| {
                if u.id == viewer || contacts.contains(&u.id) {
                    u.to_wire(self.is_online(&u.id))
                } else {
                    User {
                        last_seen_at: None,
                        ..u.to_wire(false)
                    }
                }
            })
            .collect())
    }

    pub fn publish(&self, env: Envelope) {
        self.broker.publish(env);
    }

    pub fn publish_to(&self, users: Vec<String>, text: String) {
        self.publish(Envelope {
            users,
            only_open_chat: None,
            except_conn: None,
            only_conn: None,
            out: Outbound::frame(text),
        });
    }

    /// Pushes a newly stored message to every connection of every member.
    pub fn publish_message(&self, record: &MessageRecord, members: &[Member]) {
        let wire = record.to_wire(crate::store::status_of(
            record.seq,
            &record.sender_id,
            members,
        ));
        self.publish(Envelope {
            users: members.iter().map(|m| m.user_id.clone()).collect(),
            only_open_chat: None,
            except_conn: None,
            only_conn: None,
            out: Outbound {
                text: push("message", &wire).into(),
                delivery: Some(Arc::new(super::Delivery {
                    chat_id: record.chat_id.as_str().into(),
                    seq: record.seq,
                    sender_id: record.sender_id.as_str().into(),
                })),
            },
        });
    }

    /// Pushes `message:status` to each sender whose messages changed status.
    pub fn publish_status(&self, changes: Vec<StatusChange>) {
        for c in changes {
            self.publish_to(
                vec![c.sender_id.clone()],
                push(
                    "message:status",
                    json!({"messageId": c.message_id, "chatId": c.chat_id, "seq": c.seq, "status": c.status}),
                ),
            );
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

    pub fn is_online(&self, user_id: &str) -> bool {
        self.presence
            .lock()
            .expect("presence lock")
            .is_online(user_id)
    }

    pub async fn connected(&self, user_id: &str) {
        let ev = self
            .presence
            .lock()
            .expect("presence lock")
            .connect(user_id, now_ms());
        self.presence_changed.notify_one();
        if let Some(ev) = ev {
            self.dispatch_presence(vec![ev]).await;
        }
    }

    pub async fn disconnected(&self, user_id: &str) {
        let events = self
            .presence
            .lock()
            .expect("presence lock")
            .disconnect(user_id, now_ms());
        self.presence_changed.notify_one();
        self.dispatch_presence(events).await;
    }

    /// `typing-start`; pushes `user-typing` to the other members' connections that have the
    /// chat open.
    pub fn typing_start(&self, user_id: &str, chat_id: &str, others: Vec<String>) {
        self.presence
            .lock()
            .expect("presence lock")
            .typing_start(user_id, chat_id, now_ms());
        self.presence_changed.notify_one();
        self.publish_typing("user-typing", user_id, chat_id, others);
    }

    /// `typing-stop` (or a sent message): pushes `user-stopped-typing` if the user was typing.
    pub fn typing_stop(&self, user_id: &str, chat_id: &str, others: Vec<String>) {
        let was = self
            .presence
            .lock()
            .expect("presence lock")
            .typing_stop(user_id, chat_id);
        if was {
            self.publish_typing("user-stopped-typing", user_id, chat_id, others);
        }
    }

    fn publish_typing(&self, event: &str, user_id: &str, chat_id: &str, others: Vec<String>) {
        self.publish(Envelope {
            users: others,
            only_open_chat: Some(chat_id.to_owned()),
            except_conn: None,
            only_conn: None,
            out: Outbound::frame(push(event, json!({"userId": user_id, "chatId": chat_id}))),
        });
    }

    async fn dispatch_presence(&self, events: Vec<PresenceEvent>) {
        let online = self.presence.lock().expect("presence lock").online_count();
        metrics::gauge!("switchboard_users_online").set(online as f64);
        for ev in events {
            match ev {
                PresenceEvent::Online { user_id } => {
                    self.users_update(&user_id, true, None).await;
                }
                PresenceEvent::Offline { user_id, at } => {
                    if let Err(e) = self.store.set_last_seen(&user_id, at).await {
                        tracing::warn!(error = %e, "could not store last-seen time");
                    }
                    self.users_update(&user_id, false, Some(at)).await;
                }
                PresenceEvent::TypingStopped { user_id, chat_id } => {
                    match self.store.members(&chat_id).await {
                        Ok(members) => {
                            let others = members
                                .into_iter()
                                .map(|m| m.user_id)
                                .filter(|u| *u != user_id)
                                .collect();
                            self.publish_typing("user-stopped-typing", &user_id, &chat_id, others);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "typing expiry: members lookup failed")
                        }
                    }
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
            Ok(contacts) if !contacts.is_empty() => self.publish_to(
                contacts,
                push(
                    "users:update",
                    json!({"userId": user_id, "isOnline": online, "lastSeenAt": last_seen.map(rfc3339_ms)}),
                ),
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "presence: contacts lookup failed"),
        }
    }

    /// Runs the presence timers until `shutdown`.
    pub async fn run_presence(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let next = self.presence.lock().expect("presence lock").poll_timeout();
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
            let events = self
                .presence
                .lock()
                .expect("presence lock")
                .handle_timeout(now_ms());
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
                    Ok(changes) => self.publish_status(changes),
                    Err(e) => tracing::warn!(error = %e, "could not store delivery receipts"),
                }
            }
            if stopping {
                return;
            }
        }
    }
}

//! The path between nodes. Every publish goes through a [`Broker`]: [`super::MemoryBroker`] on
//! one node (or several nodes in one process, in tests), a cluster broker (Redis) across
//! machines. Publishing is async and may fail (the broker may be unreachable; what was stored
//! stays stored and clients close gaps with `sync`). The subscribe side hands each node what is
//! for it: publications (a push for users' connections) and control messages addressed to that
//! node (a push for one connection it holds: call signaling).

use std::sync::Arc;

use async_trait::async_trait;

use super::{ConnId, NodeId};
use crate::wire::Push;

/// A push for every connection of some users.
#[derive(Debug, Clone)]
pub struct Publication {
    pub users: Vec<String>,
    /// Only connections that have this chat open (typing events).
    pub only_open_chat: Option<String>,
    pub push: Arc<Push>,
}

/// A message for one node.
#[derive(Debug, Clone)]
pub enum Control {
    /// A push for one connection (call signaling addresses one device).
    Deliver {
        user: String,
        conn: ConnId,
        push: Arc<Push>,
    },
    /// An input for the calls machine that node runs, or its reply (calls across nodes):
    /// opaque to the broker, encoded by the calls module.
    Call { from: NodeId, body: String },
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("no node {0} is subscribed")]
    UnknownNode(NodeId),
    #[error("node {0} is already subscribed")]
    AlreadySubscribed(NodeId),
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

/// What a node gives the broker to be handed its share. Called from the broker's delivery
/// path: must not block.
pub trait Subscriber: Send + Sync + 'static {
    fn publication(&self, p: &Publication);
    fn control(&self, c: Control);
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Hands `p` to every node (each delivers to its own connections of `p.users`). Returns
    /// once the broker took it.
    async fn publish(&self, p: Publication) -> Result<(), BrokerError>;

    /// Hands `c` to node `to`.
    async fn send_control(&self, to: NodeId, c: Control) -> Result<(), BrokerError>;

    /// From now on, what is for `node` goes to `sub`.
    async fn subscribe(&self, node: NodeId, sub: Arc<dyn Subscriber>) -> Result<(), BrokerError>;

    /// Stops handing `node` anything (it is shutting down).
    async fn unsubscribe(&self, node: NodeId);

    /// Whether the broker can carry pushes between nodes now (`/readyz`).
    fn is_healthy(&self) -> bool {
        true
    }
}

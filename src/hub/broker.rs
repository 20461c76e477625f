//! The publish path. On one node the [`MemoryBroker`] hands envelopes straight to the local
//! [`Hub`]; a cluster broker (Redis) will forward them to every node's hub instead.

use std::sync::Arc;

use super::{Envelope, Hub};

pub trait Broker: Send + Sync + 'static {
    fn publish(&self, env: Envelope);
}

pub struct MemoryBroker {
    hub: Arc<Hub>,
}

impl MemoryBroker {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, env: Envelope) {
        self.hub.deliver_local(&env);
    }
}

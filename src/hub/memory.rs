//! The broker of one process: a publish is handed to every subscribed node's hub right away,
//! without a queue or a task in between (the single-node hot path). Several nodes may share one
//! `MemoryBroker`, which is how tests run a cluster in one process.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;

use super::broker::{Broker, BrokerError, Control, Publication, Subscriber};
use super::NodeId;

#[derive(Default)]
pub struct MemoryBroker {
    nodes: RwLock<HashMap<NodeId, Arc<dyn Subscriber>>>,
}

impl MemoryBroker {
    pub fn new() -> Self {
        Self::default()
    }

    fn nodes(&self) -> std::sync::RwLockReadGuard<'_, HashMap<NodeId, Arc<dyn Subscriber>>> {
        self.nodes.read().expect("broker lock")
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, p: Publication) -> Result<(), BrokerError> {
        for sub in self.nodes().values() {
            sub.publication(&p);
        }
        Ok(())
    }

    async fn send_control(&self, to: NodeId, c: Control) -> Result<(), BrokerError> {
        let sub = self
            .nodes()
            .get(&to)
            .cloned()
            .ok_or(BrokerError::UnknownNode(to))?;
        sub.control(c);
        Ok(())
    }

    async fn subscribe(&self, node: NodeId, sub: Arc<dyn Subscriber>) -> Result<(), BrokerError> {
        let mut nodes = self.nodes.write().expect("broker lock");
        if nodes.contains_key(&node) {
            return Err(BrokerError::AlreadySubscribed(node));
        }
        nodes.insert(node, sub);
        Ok(())
    }

    async fn unsubscribe(&self, node: NodeId) {
        self.nodes.write().expect("broker lock").remove(&node);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::hub::ConnId;
    use crate::wire::Push;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Subscriber for Recorder {
        fn publication(&self, p: &Publication) {
            self.0
                .lock()
                .unwrap()
                .push(format!("pub {}", p.push.data_json()));
        }
        fn control(&self, c: Control) {
            let Control::Deliver { push, .. } = c else {
                return;
            };
            self.0
                .lock()
                .unwrap()
                .push(format!("ctl {}", push.data_json()));
        }
    }

    #[tokio::test]
    async fn publications_reach_every_node_controls_only_theirs() {
        let broker = MemoryBroker::new();
        let (a, b) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
        broker.subscribe(NodeId(1), a.clone()).await.unwrap();
        broker.subscribe(NodeId(2), b.clone()).await.unwrap();
        assert!(matches!(
            broker.subscribe(NodeId(2), b.clone()).await,
            Err(BrokerError::AlreadySubscribed(_))
        ));
        let p = Publication {
            users: vec!["u".into()],
            only_open_chat: None,
            push: Push::new("e", "all"),
        };
        broker.publish(p).await.unwrap();
        let conn = ConnId::new(NodeId(2), uuid::Uuid::now_v7());
        let c = Control::Deliver {
            user: "u".into(),
            conn,
            push: Push::new("e", "one"),
        };
        broker.send_control(NodeId(2), c.clone()).await.unwrap();
        assert!(matches!(
            broker.send_control(NodeId(3), c).await,
            Err(BrokerError::UnknownNode(NodeId(3)))
        ));
        assert_eq!(*a.0.lock().unwrap(), ["pub \"all\""]);
        assert_eq!(*b.0.lock().unwrap(), ["pub \"all\"", "ctl \"one\""]);
        broker.unsubscribe(NodeId(1)).await;
        broker
            .publish(Publication {
                users: vec![],
                only_open_chat: None,
                push: Push::new("e", "later"),
            })
            .await
            .unwrap();
        assert_eq!(a.0.lock().unwrap().len(), 1, "unsubscribed");
    }
}

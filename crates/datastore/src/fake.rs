//! An in-memory datastore: tests edit the snapshot directly; `publish` writes back into it as a
//! real store would (the write then arrives as a watch event).

use std::sync::Mutex;

use async_trait::async_trait;

use super::{Datastore, DatastoreError, ObjectProblem, ReadScope, SnapshotSender, SyncHealth};
use wiremesh_core::model::{ClusterSnapshot, NodeResource, PublishedWireguard};

pub struct FakeDatastore {
    cache: SnapshotSender,
    /// Every publish call, in order.
    pub published: Mutex<Vec<(String, PublishedWireguard)>>,
    /// Make the next publish fail.
    pub fail_next_publish: Mutex<bool>,
    /// Every reported problem, in order.
    pub reported: Mutex<Vec<ObjectProblem>>,
    /// What the tests say the connection is like.
    pub health: std::sync::Arc<SyncHealth>,
}

impl FakeDatastore {
    /// A fake that is synced (tests mark it failed through `health`).
    pub fn new(cache: SnapshotSender) -> Self {
        let health = std::sync::Arc::new(SyncHealth::default());
        health.synced();
        FakeDatastore {
            cache,
            published: Mutex::new(Vec::new()),
            fail_next_publish: Mutex::new(false),
            reported: Mutex::new(Vec::new()),
            health,
        }
    }

    pub fn edit(&self, f: impl FnOnce(&mut ClusterSnapshot)) {
        self.cache.send_modify(f);
    }

    pub fn reported(&self) -> Vec<ObjectProblem> {
        self.reported.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn publish_count(&self) -> usize {
        self.published.lock().map(|p| p.len()).unwrap_or_default()
    }
}

#[async_trait]
impl Datastore for FakeDatastore {
    fn kind(&self) -> &'static str {
        "fake"
    }

    async fn run(&self, _cache: SnapshotSender) -> Result<(), DatastoreError> {
        std::future::pending().await
    }

    fn sync_health(&self) -> std::sync::Arc<SyncHealth> {
        std::sync::Arc::clone(&self.health)
    }

    async fn read_once(&self, _scope: ReadScope) -> Result<ClusterSnapshot, DatastoreError> {
        Ok(self.cache.borrow().clone())
    }

    async fn publish(
        &self,
        node: &str,
        published: &PublishedWireguard,
    ) -> Result<(), DatastoreError> {
        if let Ok(mut fail) = self.fail_next_publish.lock()
            && std::mem::take(&mut *fail)
        {
            return Err(DatastoreError::Publish {
                node: node.into(),
                source: "injected failure".into(),
            });
        }
        let mut found = true;
        self.cache.send_if_modified(|snap| {
            let Some(n) = snap.nodes.get_mut(node) else {
                found = false;
                return false;
            };
            apply_published(n, published);
            true
        });
        if !found {
            return Err(DatastoreError::NodeNotFound { node: node.into() });
        }
        if let Ok(mut log) = self.published.lock() {
            log.push((node.to_string(), published.clone()));
        }
        Ok(())
    }

    async fn report(&self, problems: &[ObjectProblem]) {
        if let Ok(mut log) = self.reported.lock() {
            log.extend_from_slice(problems);
        }
    }
}

/// Writes the published fields into a node resource (shared with adapters' tests).
fn apply_published(node: &mut NodeResource, published: &PublishedWireguard) {
    node.wireguard_public_key = published.public_key_v4.map(|k| k.to_string());
    node.wireguard_public_key_v6 = published.public_key_v6.map(|k| k.to_string());
    node.wireguard_interface_ipv4_address = published.interface_ipv4_address.map(|a| a.to_string());
    node.wireguard_interface_ipv6_address = published.interface_ipv6_address.map(|a| a.to_string());
}

//! The datastore behind one trait: list + watch into a shared snapshot, and publish this
//! node's WireGuard fields. `etcd` (Calico's key layout) is the adapter for bare metal and the
//! lab; `kube` is the adapter for Kubernetes (Node annotations, Calico's CRDs).

pub mod config;
pub mod etcd;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod kube;

pub use config::DatastoreConfig;

use async_trait::async_trait;
use tokio::sync::watch;

use wiremesh_core::model::{ClusterSnapshot, PublishedWireguard};

/// The snapshot every adapter keeps current; the reconcile loop waits on its receiver.
pub type SnapshotSender = watch::Sender<ClusterSnapshot>;

#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error("connecting to {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("listing {what}")]
    List {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("watching {what}")]
    Watch {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "node {node} does not exist in the datastore; it must be registered before this agent can publish its key"
    )]
    NodeNotFound { node: String },
    #[error("publishing WireGuard fields on node {node}")]
    Publish {
        node: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("node {node} kept changing while we updated it ({attempts} attempts)")]
    Conflict { node: String, attempts: u32 },
    #[error(
        "the CustomResourceDefinition {crd} is not installed; apply the CRDs first (kubectl apply -f crds/)"
    )]
    MissingCrd { crd: String },
    #[error(
        "not allowed to {verb} {resource} ({message}); check the agent's ClusterRole and binding (deploy/rbac.yaml)"
    )]
    Forbidden {
        verb: String,
        resource: String,
        message: String,
    },
}

impl DatastoreError {
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            DatastoreError::NodeNotFound { .. }
                | DatastoreError::MissingCrd { .. }
                | DatastoreError::Forbidden { .. }
        )
    }
}

/// The object a problem concerns.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProblemObject {
    Node(String),
    FelixConfiguration(String),
    /// A host-endpoint policy resource; `namespace` only for namespaced kinds.
    Policy {
        kind: wiremesh_core::wire::Kind,
        namespace: Option<String>,
        name: String,
    },
}

/// An object the agent could not use (a skipped node, an invalid setting), to be reported where
/// its owner looks: a Kubernetes Event on that object. The reconciler builds these; logs and
/// `status.json` carry them whatever the adapter does.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectProblem {
    pub object: ProblemObject,
    /// Short CamelCase reason, e.g. `MalformedWireguardKey`.
    pub reason: String,
    /// What is wrong, for a person.
    pub message: String,
}

#[async_trait]
pub trait Datastore: Send + Sync {
    /// Short name for logs and status (`etcd`, `kubernetes`).
    fn kind(&self) -> &'static str;

    /// Lists every resource, marks the snapshot synced, then watches, keeping `cache` current;
    /// reconnects and resumes (or re-lists) by itself. Returns only on a fatal error.
    async fn run(&self, cache: SnapshotSender) -> Result<(), DatastoreError>;

    /// Writes this node's WireGuard public keys and tunnel addresses (a `None` clears the
    /// field), touching nothing else on the node object.
    async fn publish(
        &self,
        node: &str,
        published: &PublishedWireguard,
    ) -> Result<(), DatastoreError>;

    /// Reads the resources in `scope` once, without watching or writing anything (for the
    /// command-line tools). The snapshot is marked synced.
    async fn read_once(&self, scope: ReadScope) -> Result<ClusterSnapshot, DatastoreError>;

    /// Reports problems with specific objects, best effort: it must return quickly, never fail
    /// the caller and rate-limit repeats itself. Called when problems appear. The default does
    /// nothing (etcd has no event stream).
    async fn report(&self, _problems: &[ObjectProblem]) {}

    /// How current [`Datastore::run`]'s view is.
    fn sync_health(&self) -> std::sync::Arc<SyncHealth>;
}

/// How current an adapter's view of the datastore is: the adapter records each list, watch
/// event and failure; the agent reads it for `/readyz`, metrics and status. While the datastore
/// is unreachable the last synced snapshot stays in force (the dataplane is not torn down); this
/// is how that becomes visible.
#[derive(Debug, Default)]
pub struct SyncHealth(std::sync::Mutex<SyncState>);

/// A copy of [`SyncHealth`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncState {
    /// Unix seconds when the view was last known current: now while the watches are live.
    /// `None` before the first successful list.
    pub last_sync: Option<u64>,
    /// Unix seconds since when the datastore cannot be reached or watched; `None` while it can.
    pub unreachable_since: Option<u64>,
    /// The latest failure while unreachable.
    pub error: Option<String>,
}

impl SyncState {
    /// Whether the view is current (synced once, no failure since).
    pub fn current(&self) -> bool {
        self.last_sync.is_some() && self.unreachable_since.is_none()
    }

    /// What an operator must know when the view is not current, as of `now` (Unix seconds).
    pub fn problem(&self, now: u64) -> Option<String> {
        let since = self.unreachable_since?;
        let error = self
            .error
            .as_deref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        Some(format!(
            "the datastore has been unreachable for {}s{error}; the last synced state stays in force",
            now.saturating_sub(since)
        ))
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl SyncHealth {
    /// A list or a watch event arrived, or the watches were (re-)established.
    pub fn synced(&self) {
        if let Ok(mut state) = self.0.lock() {
            if let Some(since) = state.unreachable_since.take() {
                tracing::info!(
                    unreachable_seconds = unix_now().saturating_sub(since),
                    "the datastore is reachable again"
                );
            }
            state.last_sync = Some(unix_now());
            state.error = None;
        }
    }

    /// Listing or watching failed; the adapter retries by itself.
    pub fn failed(&self, error: &str) {
        if let Ok(mut state) = self.0.lock() {
            if state.current() {
                // It was current until now.
                state.last_sync = Some(unix_now());
                tracing::warn!(
                    error,
                    "the datastore is unreachable; the last synced state stays in force"
                );
            }
            state.unreachable_since.get_or_insert_with(unix_now);
            state.error = Some(error.to_string());
        }
    }

    pub fn state(&self) -> SyncState {
        let mut state = self.0.lock().map(|s| s.clone()).unwrap_or_default();
        if state.current() {
            state.last_sync = Some(unix_now());
        }
        state
    }
}

/// What [`Datastore::read_once`] reads: only what a tool needs, so it needs no more rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadScope {
    /// Nodes (with their pod CIDRs and published WireGuard fields).
    pub nodes: bool,
    /// FelixConfigurations.
    pub configuration: bool,
    /// The policy kinds (GlobalNetworkPolicy, NetworkPolicy, Tier, HostEndpoint, network sets).
    pub policy: bool,
}

impl ReadScope {
    pub const NODES: ReadScope = ReadScope {
        nodes: true,
        configuration: false,
        policy: false,
    };
    pub const POLICY: ReadScope = ReadScope {
        nodes: false,
        configuration: false,
        policy: true,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_health_follows_failures_and_recovery() {
        let health = SyncHealth::default();
        assert!(
            !health.state().current(),
            "not current before the first list"
        );
        health.failed("connection refused");
        let state = health.state();
        assert_eq!(state.last_sync, None);
        assert!(state.unreachable_since.is_some());
        health.synced();
        assert!(health.state().current());
        assert_eq!(health.state().problem(unix_now()), None);
        health.failed("watch stream ended");
        health.failed("connection refused");
        let state = health.state();
        let since = state.unreachable_since.expect("unreachable");
        let problem = state.problem(since + 42).expect("a problem");
        assert_eq!(
            problem,
            "the datastore has been unreachable for 42s (connection refused); the last synced state stays in force"
        );
        assert!(state.last_sync.is_some_and(|t| t <= since + 1));
        health.synced();
        assert!(health.state().current());
    }
}

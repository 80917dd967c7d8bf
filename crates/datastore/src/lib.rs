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

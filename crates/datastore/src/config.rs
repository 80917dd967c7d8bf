//! Which datastore a command or the agent uses, and connecting to it.

use std::path::PathBuf;
use std::sync::Arc;

use crate::{Datastore, DatastoreError, etcd, kube};

/// Which datastore to use and how to reach it: the one choice every command makes the same way
/// (`--datastore`, `--etcd-endpoints`, `--kubeconfig`, `--context`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatastoreConfig {
    /// etcd v3 with Calico's key layout.
    Etcd { endpoints: Vec<String> },
    /// The Kubernetes API: a kubeconfig file and context, or else the in-cluster service
    /// account (then `KUBECONFIG` / `~/.kube/config`).
    Kubernetes {
        kubeconfig: Option<PathBuf>,
        context: Option<String>,
    },
}

impl DatastoreConfig {
    /// Connects. `watch_policy`: whether the adapter list-watches the policy kinds too (on
    /// Kubernetes their CRDs and read access are then required).
    pub async fn connect(&self, watch_policy: bool) -> Result<Arc<dyn Datastore>, DatastoreError> {
        Ok(match self {
            DatastoreConfig::Etcd { endpoints } => {
                Arc::new(etcd::EtcdDatastore::connect(endpoints.clone()).await?)
            }
            DatastoreConfig::Kubernetes {
                kubeconfig,
                context,
            } => Arc::new(
                kube::KubeDatastore::connect(kubeconfig.as_deref(), context.as_deref())
                    .await?
                    .with_policy(watch_policy),
            ),
        })
    }
}

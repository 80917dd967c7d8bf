//! How every command picks its datastore: the same four flags and environment variables.

use std::path::PathBuf;

use wiremesh_datastore::DatastoreConfig;

/// Which datastore a command reads or the agent uses: the same flags and environment variables
/// in every command.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DatastoreArgs {
    /// `etcd` (Calico's key layout) or `kubernetes` (Node annotations and the projectcalico.org
    /// CRDs). Without it: etcd when endpoints are given, Kubernetes when a kubeconfig or
    /// context is.
    #[arg(long, env = "WIREMESH_DATASTORE", value_enum)]
    pub datastore: Option<DatastoreKind>,
    /// etcd endpoints, comma-separated.
    #[arg(long, env = "WIREMESH_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Kubeconfig for the Kubernetes datastore; without it, the in-cluster service account (or
    /// KUBECONFIG / ~/.kube/config).
    #[arg(long, env = "WIREMESH_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context for the Kubernetes datastore (default: the current context).
    #[arg(long, env = "WIREMESH_CONTEXT")]
    pub context: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DatastoreKind {
    /// etcd v3 with Calico's key layout (bare metal, the lab).
    Etcd,
    /// The Kubernetes API: Node annotations and Calico's projectcalico.org/v3 CRDs.
    Kubernetes,
}

impl DatastoreArgs {
    /// The datastore these flags name, if any. `--datastore etcd` without endpoints is `None`
    /// (nothing to connect to).
    pub fn config(&self) -> Option<DatastoreConfig> {
        let kubernetes = || DatastoreConfig::Kubernetes {
            kubeconfig: self.kubeconfig.clone(),
            context: self.context.clone(),
        };
        let etcd = || {
            (!self.etcd_endpoints.is_empty()).then(|| DatastoreConfig::Etcd {
                endpoints: self.etcd_endpoints.clone(),
            })
        };
        match self.datastore {
            Some(DatastoreKind::Kubernetes) => Some(kubernetes()),
            Some(DatastoreKind::Etcd) => etcd(),
            None if !self.etcd_endpoints.is_empty() => etcd(),
            None if self.kubeconfig.is_some() || self.context.is_some() => Some(kubernetes()),
            None => None,
        }
    }
}

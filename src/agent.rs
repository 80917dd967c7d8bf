//! Wiring of the agent: flags -> settings, the datastore adapter, the dataplane backends and
//! the reconcile loop, plus signal handling. Stopping the agent never tears the dataplane down.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::dataplane::DataplaneError;
use crate::dataplane::kernel::{self, BackendChoice, NetlinkLinks, NetlinkRouting};
use crate::dataplane::uapi::UserspaceConfig;
use crate::datastore::etcd::EtcdDatastore;
use crate::datastore::kube::KubeDatastore;
use crate::datastore::{Datastore, DatastoreError};
use crate::model::ClusterSnapshot;
use crate::reconcile::{AgentSettings, Reconciler};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DatastoreKind {
    /// etcd v3 with Calico's key layout (bare metal, the lab).
    Etcd,
    /// The Kubernetes API: Node annotations and Calico's projectcalico.org/v3 CRDs.
    Kubernetes,
}

/// `wiremesh agent`: every flag also reads an environment variable.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  wiremesh agent --node-name node1 --etcd-endpoints http://10.0.0.1:2379
  NODENAME=node1 WIREMESH_LOG=debug wiremesh --log-format json agent

Metrics on :9091/metrics, health on :9099/healthz and /readyz (docs/metrics.md).
Encryption itself is switched on in FelixConfiguration (docs/encryption.md).")]
pub struct AgentArgs {
    /// This node's name in the datastore (the DaemonSet sets it from spec.nodeName).
    #[arg(long, env = "NODENAME")]
    pub node_name: String,
    #[arg(long, env = "WIREMESH_DATASTORE", value_enum, default_value = "etcd")]
    pub datastore: DatastoreKind,
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    /// Kubeconfig for `--datastore kubernetes`; without it, the in-cluster service account
    /// (or KUBECONFIG / ~/.kube/config when run outside a cluster).
    #[arg(long, env = "WIREMESH_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Where the private keys and the agent's records live (0700).
    #[arg(long, env = "WIREMESH_STATE_DIR", default_value = "/var/lib/wiremesh")]
    pub state_dir: PathBuf,
    /// WireGuard implementation: the kernel module when present, else wireguard-go.
    #[arg(
        long,
        env = "WIREMESH_WIREGUARD_BACKEND",
        value_enum,
        default_value = "auto"
    )]
    pub wireguard_backend: BackendChoice,
    /// wireguard-go binary for the userspace backend.
    #[arg(long, env = "WIREMESH_WIREGUARD_GO", default_value = "wireguard-go")]
    pub wireguard_go: PathBuf,
    /// Full resync period even without datastore changes (Go duration, e.g. 90s).
    #[arg(long, env = "WIREMESH_RESYNC_INTERVAL", default_value = "90s", value_parser = parse_duration)]
    pub resync_interval: Duration,
    /// Firewall mark bit of WireGuard's own packets (Felix's default with mask 0xffff0000).
    #[arg(long, env = "WIREMESH_FWMARK", default_value = "0x200000", value_parser = parse_u32)]
    pub fwmark: u32,
    /// Routing table for WireGuard routes (Felix takes the first of RouteTableRanges: 1).
    #[arg(long, env = "WIREMESH_ROUTING_TABLE", default_value = "1", value_parser = parse_u32)]
    pub routing_table: u32,
    /// Port of `/metrics` (Felix's prometheusMetricsPort); 0 turns it off.
    #[arg(long, env = "WIREMESH_METRICS_PORT", default_value = "9091")]
    pub metrics_port: u16,
    /// Address the metrics port binds.
    #[arg(long, env = "WIREMESH_METRICS_ADDRESS", default_value = "0.0.0.0")]
    pub metrics_address: IpAddr,
    /// Port of `/healthz` and `/readyz` (Felix's healthPort); 0 turns it off.
    #[arg(long, env = "WIREMESH_HEALTH_PORT", default_value = "9099")]
    pub health_port: u16,
    /// Address the health port binds.
    #[arg(long, env = "WIREMESH_HEALTH_ADDRESS", default_value = "0.0.0.0")]
    pub health_address: IpAddr,
    /// Enforce HostEndpoint policy in the nftables table `inet wiremesh`. With `false`, the
    /// table is removed at start-up and never written.
    #[arg(long, env = "WIREMESH_HOST_POLICY", default_value_t = true, action = clap::ArgAction::Set)]
    pub host_policy: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    crate::config::parse_go_duration(text)
}

fn parse_u32(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|e| format!("{text:?}: {e}"))
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid flag: {0}")]
    Flag(String),
    #[error("creating state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up the dataplane")]
    Dataplane(#[from] DataplaneError),
    #[error("datastore")]
    Datastore(#[from] DatastoreError),
    #[error("installing signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("admin endpoints")]
    Admin(#[from] crate::admin::AdminError),
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    if args.fwmark == 0 || !args.fwmark.is_power_of_two() {
        return Err(AgentError::Flag(format!(
            "--fwmark {:#x} must be a single bit",
            args.fwmark
        )));
    }
    if args.routing_table == 0 || (253..=255).contains(&args.routing_table) {
        return Err(AgentError::Flag(format!(
            "--routing-table {} is reserved",
            args.routing_table
        )));
    }
    create_state_dir(&args.state_dir)?;
    let settings = AgentSettings {
        fwmark: args.fwmark,
        routing_table: args.routing_table,
        resync_interval: args.resync_interval,
        ..AgentSettings::new(&args.node_name, &args.state_dir)
    };
    let metrics = Arc::new(crate::metrics::Metrics::new(crate::reconcile::stale_after(
        settings.resync_interval,
    )));
    let admin_addrs: Vec<SocketAddr> = [
        (args.metrics_address, args.metrics_port),
        (args.health_address, args.health_port),
    ]
    .into_iter()
    .filter(|(_, port)| *port != 0)
    .map(SocketAddr::from)
    .collect();
    crate::admin::serve(&admin_addrs, Arc::clone(&metrics)).await?;
    let datastore: Arc<dyn Datastore> = match args.datastore {
        DatastoreKind::Etcd => Arc::new(EtcdDatastore::connect(args.etcd_endpoints.clone()).await?),
        // Policy CRDs are watched (and so must be installed and readable) only with host policy.
        DatastoreKind::Kubernetes => Arc::new(
            KubeDatastore::connect(args.kubeconfig.as_deref())
                .await?
                .with_policy(args.host_policy),
        ),
    };
    let handle = kernel::netlink_handle()?;
    let userspace = UserspaceConfig {
        binary: args.wireguard_go.clone(),
        ..UserspaceConfig::default()
    };
    let wg = kernel::select_backend(args.wireguard_backend, handle.clone(), userspace)?;
    let (links, routing) = (
        NetlinkLinks::new(handle.clone()),
        NetlinkRouting::new(handle),
    );
    info!(
        node = %args.node_name,
        datastore = datastore.kind(),
        backend = %crate::dataplane::wg::WireguardDataplane::backend(&wg),
        state_dir = %args.state_dir.display(),
        "wiremesh agent starting"
    );

    let (tx, rx) = watch::channel(ClusterSnapshot::default());
    let (kernel_tx, kernel_rx) = tokio::sync::mpsc::channel(1);
    crate::dataplane::events::watch_kernel(args.routing_table, kernel_tx)?;
    let reconciler = Reconciler::new(
        Arc::new(settings),
        wg,
        links,
        routing,
        Arc::clone(&datastore),
    )
    .with_kernel_events(kernel_rx)
    .with_metrics(metrics);
    let reconciler = if args.host_policy {
        reconciler.with_filter(Box::new(crate::dataplane::nft::KernelNft::new()))
    } else {
        let mut nft = crate::dataplane::nft::KernelNft::new();
        if let Err(e) = crate::dataplane::nft::remove_table(&mut nft).await {
            warn!(error = %crate::reconcile::error_chain(&e), "could not remove the nftables table inet wiremesh");
        }
        reconciler
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AgentError::Signals)?;
    let watcher = tokio::spawn(async move { datastore.run(tx).await });
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
        }
    };
    tokio::select! {
        () = reconciler.run(rx, shutdown) => {}
        result = watcher => {
            match result {
                Ok(Ok(())) => info!("datastore watcher ended"),
                Ok(Err(e)) => {
                    error!(error = %crate::reconcile::error_chain(&e), "datastore watcher failed");
                    return Err(e.into());
                }
                Err(e) => error!(error = %e, "datastore watcher task failed"),
            }
        }
    }
    Ok(())
}

fn create_state_dir(path: &std::path::Path) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt as _;
    let wrap = |source| AgentError::StateDir {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path).map_err(wrap)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(wrap)
}

//! Start-up wiring of the agent: a validated [`AgentConfig`] -> the datastore adapter, the
//! dataplane backends, the admin endpoints and the reconcile loop, plus signal handling.
//! Stopping the agent never tears the dataplane down.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info, warn};
use wiremesh_core::error_chain;
use wiremesh_core::model::ClusterSnapshot;
use wiremesh_dataplane::DataplaneError;
use wiremesh_dataplane::link::NetlinkLinks;
use wiremesh_dataplane::netlink::netlink_handle;
use wiremesh_dataplane::nft::{KernelNft, remove_table};
use wiremesh_dataplane::route::NetlinkRouting;
use wiremesh_dataplane::wireguard::WireguardDataplane as _;
use wiremesh_dataplane::wireguard::backend::{BackendChoice, select_backend};
use wiremesh_dataplane::wireguard::userspace::UserspaceConfig;
use wiremesh_datastore::{DatastoreConfig, DatastoreError};

use crate::reconcile::Reconciler;
use crate::settings::{AgentSettings, stale_after};

/// Everything the agent is started with (the command line builds it; runtime settings come
/// from FelixConfiguration instead).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    pub datastore: DatastoreConfig,
    pub state_dir: PathBuf,
    pub wireguard_backend: BackendChoice,
    pub wireguard_go: PathBuf,
    pub resync_interval: Duration,
    pub fwmark: u32,
    pub routing_table: u32,
    /// Where `/metrics` listens; `None` turns it off.
    pub metrics_address: Option<SocketAddr>,
    /// Where `/healthz` and `/readyz` listen; `None` turns them off.
    pub health_address: Option<SocketAddr>,
    /// Enforce HostEndpoint policy in the nftables table `inet wiremesh`; without it the table
    /// is removed at start-up and never written.
    pub host_policy: bool,
    /// With `host_policy`, also enforce policy on this node's pods.
    pub pod_policy: bool,
    /// How long pod traffic that would leave in clear is dropped after a deliberate stop
    /// (`guard::hold_script`); zero: not at all.
    pub shutdown_hold: Duration,
}

/// The longest shutdown hold: past it an agent that is not coming back (an uninstall) would
/// keep dropping traffic for too long.
const MAX_SHUTDOWN_HOLD: Duration = Duration::from_secs(3600);

/// The shortest and longest full-resync period the agent accepts.
const RESYNC_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(24 * 3600));

impl AgentConfig {
    /// Checks what the type cannot: a single-bit mark, a usable table, a sane resync period.
    pub fn validate(&self) -> Result<(), AgentError> {
        validate_node_name(&self.node_name).map_err(AgentError::Flag)?;
        if self.fwmark == 0 || !self.fwmark.is_power_of_two() {
            return Err(AgentError::Flag(format!(
                "--fwmark {:#x} must be a single bit",
                self.fwmark
            )));
        }
        if self.routing_table == 0 || (253..=255).contains(&self.routing_table) {
            return Err(AgentError::Flag(format!(
                "--routing-table {} is reserved",
                self.routing_table
            )));
        }
        let (min, max) = RESYNC_RANGE;
        if !(min..=max).contains(&self.resync_interval) {
            return Err(AgentError::Flag(format!(
                "--resync-interval {:?} is not between {min:?} and {max:?}",
                self.resync_interval
            )));
        }
        if self.shutdown_hold > MAX_SHUTDOWN_HOLD {
            return Err(AgentError::Flag(format!(
                "--shutdown-hold {:?} is longer than {MAX_SHUTDOWN_HOLD:?}",
                self.shutdown_hold
            )));
        }
        Ok(())
    }
}

/// A node name as a Node object and Calico's etcd keys can carry it (an empty one, as from
/// `NODENAME=`, would run as node "" and match no Node).
fn validate_node_name(name: &str) -> Result<(), String> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    match name {
        "" => Err("--node-name is empty (is NODENAME set to the node's name?)".into()),
        _ if name.len() > 253 => Err(format!(
            "--node-name is {} characters long; a node name has at most 253",
            name.len()
        )),
        _ if !valid_chars => Err(format!(
            "--node-name {name:?} is not a node name (letters, digits, '-', '.' and '_')"
        )),
        _ => Ok(()),
    }
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
pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    config.validate()?;
    create_state_dir(&config.state_dir)?;
    let settings = AgentSettings {
        fwmark: config.fwmark,
        routing_table: config.routing_table,
        resync_interval: config.resync_interval,
        shutdown_hold: config.shutdown_hold,
        ..AgentSettings::new(&config.node_name, &config.state_dir)
    };
    let metrics = Arc::new(crate::metrics::Metrics::new(stale_after(
        settings.resync_interval,
    )));
    let admin_addrs: Vec<SocketAddr> = [config.metrics_address, config.health_address]
        .into_iter()
        .flatten()
        .collect();
    crate::admin::serve(&admin_addrs, Arc::clone(&metrics)).await?;
    // Policy kinds are watched (and so their CRDs must be installed and readable) only with
    // host policy.
    let datastore = config.datastore.connect(config.host_policy).await?;
    let handle = netlink_handle()?;
    let userspace = UserspaceConfig {
        binary: config.wireguard_go.clone(),
        restart_unresponsive: true,
        ..UserspaceConfig::default()
    };
    let (wg, why) = select_backend(config.wireguard_backend, handle.clone(), userspace).await?;
    info!(backend = %wg.backend(), reason = %why, "WireGuard backend chosen");
    let (links, routing) = (
        NetlinkLinks::new(handle.clone()),
        NetlinkRouting::new(handle),
    );
    info!(
        node = %config.node_name,
        datastore = datastore.kind(),
        backend = %wg.backend(),
        state_dir = %config.state_dir.display(),
        "wiremesh agent starting"
    );

    let (tx, rx) = watch::channel(ClusterSnapshot::default());
    let (kernel_tx, kernel_rx) = tokio::sync::mpsc::channel(1);
    wiremesh_dataplane::events::watch_kernel(config.routing_table, kernel_tx)?;
    let reconciler = Reconciler::new(
        Arc::new(settings),
        wg,
        links,
        routing,
        Arc::clone(&datastore),
    )
    .with_kernel_events(kernel_rx)
    .with_metrics(metrics);
    let reconciler = if config.host_policy {
        let (nftables_tx, nftables_rx) = tokio::sync::mpsc::channel(1);
        wiremesh_dataplane::events::watch_nftables(
            wiremesh_core::policy::render::TABLE,
            nftables_tx,
        )?;
        reconciler
            .with_filter(Box::new(KernelNft::new()))
            .with_pod_policy(config.pod_policy)
            .with_nftables_events(nftables_rx)
    } else {
        if let Err(e) = remove_table(&mut KernelNft::new()).await {
            warn!(error = %error_chain(&e), "could not remove the nftables table inet wiremesh");
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
                    error!(error = %error_chain(&e), "datastore watcher failed");
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

#[cfg(test)]
mod tests {
    use super::validate_node_name;

    #[test]
    fn node_names() {
        for good in ["node1", "ip-10-0-0-1.ec2.internal", "worker_3"] {
            assert_eq!(validate_node_name(good), Ok(()), "{good}");
        }
        for bad in ["", " ", "a/b", "node 1", &"n".repeat(254)] {
            assert!(validate_node_name(bad).is_err(), "{bad:?}");
        }
    }
}

//! `wiremesh agent`: the flags (each with its `WIREMESH_*` environment variable), turned once
//! into a validated `AgentConfig`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser as _;

use wiremesh_agent::run::AgentConfig;
use wiremesh_dataplane::wireguard::backend::BackendChoice;
use wiremesh_datastore::DatastoreConfig;

use super::datastore::DatastoreArgs;

/// The etcd the agent uses when no datastore is given.
const DEFAULT_ETCD: &str = "http://127.0.0.1:2379";

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  wiremesh agent --node-name node1 --etcd-endpoints http://10.0.0.1:2379
  WIREMESH_NODE_NAME=node1 WIREMESH_LOG=debug wiremesh --log-format json agent

Without a datastore flag the agent uses etcd at http://127.0.0.1:2379.
Metrics on :9091/metrics, health on :9099/healthz and /readyz (docs/metrics.md).
Encryption itself is switched on in FelixConfiguration (docs/encryption.md).")]
pub struct AgentArgs {
    /// This node's name in the datastore (the DaemonSet sets it from spec.nodeName).
    #[arg(long, env = "WIREMESH_NODE_NAME")]
    pub node_name: String,
    #[command(flatten)]
    pub datastore: DatastoreArgs,
    /// Where the private keys and the agent's records live (0700).
    #[arg(long, env = "WIREMESH_STATE_DIR", default_value = "/var/lib/wiremesh")]
    pub state_dir: PathBuf,
    /// WireGuard implementation: the kernel module when present, else wireguard-go.
    #[arg(
        long,
        env = "WIREMESH_WIREGUARD_BACKEND",
        default_value = "auto",
        value_parser = clap::builder::PossibleValuesParser::new(BackendChoice::NAMES)
            .try_map(|s| s.parse::<BackendChoice>())
    )]
    pub wireguard_backend: BackendChoice,
    /// wireguard-go binary for the userspace backend.
    #[arg(long, env = "WIREMESH_WIREGUARD_GO", default_value = "wireguard-go")]
    pub wireguard_go: PathBuf,
    /// Full resync period even without datastore changes (Go duration, 1s to 24h).
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
    /// Enforce policy (host endpoints, and pods unless `--pod-policy=false`) in the nftables
    /// table `inet wiremesh`. With `false`, the table is removed at start-up and never written.
    #[arg(long, env = "WIREMESH_HOST_POLICY", default_value_t = true, action = clap::ArgAction::Set)]
    pub host_policy: bool,
    /// Enforce policy on this node's pods too (with `--host-policy`): per-pod chains and
    /// dispatch. `false` leaves pods to another policy engine (encryption and host policy
    /// only).
    #[arg(long, env = "WIREMESH_POD_POLICY", default_value_t = true, action = clap::ArgAction::Set)]
    pub pod_policy: bool,
    /// After SIGTERM, drop pod traffic to encrypting nodes that would leave in clear (a
    /// wireguard-go that dies with the container) for this long, or until the next agent is up
    /// (Go duration, at most 1h; 0s: off; strict mode drops anyway).
    #[arg(long, env = "WIREMESH_SHUTDOWN_HOLD", default_value = "60s", value_parser = parse_duration)]
    pub shutdown_hold: Duration,
}

impl AgentArgs {
    /// The agent's configuration (validated when the agent starts).
    pub fn config(&self) -> AgentConfig {
        let address = |ip, port| (port != 0).then(|| SocketAddr::new(ip, port));
        AgentConfig {
            node_name: self.node_name.clone(),
            datastore: self
                .datastore
                .config()
                .unwrap_or_else(|| DatastoreConfig::Etcd {
                    endpoints: vec![DEFAULT_ETCD.to_string()],
                }),
            state_dir: self.state_dir.clone(),
            wireguard_backend: self.wireguard_backend,
            wireguard_go: self.wireguard_go.clone(),
            resync_interval: self.resync_interval,
            fwmark: self.fwmark,
            routing_table: self.routing_table,
            metrics_address: address(self.metrics_address, self.metrics_port),
            health_address: address(self.health_address, self.health_port),
            host_policy: self.host_policy,
            pod_policy: self.pod_policy,
            shutdown_hold: self.shutdown_hold,
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    wiremesh_core::config::parse_go_duration(text)
}

fn parse_u32(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|e| format!("{text:?}: {e}"))
}

//! `wiremesh bench`: programs a wireguard-go device with N synthetic peers through the real
//! reconciler and compares it with `wg setconf` of the same peers on the same backend.
//!
//! Each N runs in a fresh network namespace that holds only `lo` (nothing can leave it) with a
//! private `/run/wireguard` ([`crate::netns`]). The datastore is an in-memory snapshot of N+1
//! synthetic nodes: `node0` is this agent, `node<i>` sits at `172.31.<i/256>.<i%256>` with pod
//! CIDR `10.<100+i/256>.<i%256>.0/24` and a fresh key; keepalive is 0, so wireguard-go sends
//! nothing. Measured per N:
//! - cold converge: one `reconcile_once` from nothing (device, key, N peers, N+1 routes, rule,
//!   MTU, address, publish), with the time spent starting wireguard-go measured on its own;
//! - `wg setconf` of the same key, port, fwmark and peers into a second wireguard-go device
//!   (whose start-up is timed separately, and not included);
//! - one node change (a pod CIDR added to one node): the ops issued and the time;
//! - an idle resync (no change): must issue nothing;
//! - the peak RSS of this process (`getrusage`).
//!
//! Documented in docs/testing.md (Benchmark).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::netns::{Netns, NetnsError};
use wiremesh_agent::outcome::{Outcome, ReconcileError};
use wiremesh_agent::reconcile::Reconciler;
use wiremesh_agent::settings::AgentSettings;
use wiremesh_core::config::DEFAULT_FWMARK;
use wiremesh_core::dataplane::wireguard::{DeviceState, WgOp};
use wiremesh_core::keys::PrivateKey;
use wiremesh_core::model::{ClusterSnapshot, NodeResource, PublishedWireguard, WgKey};
use wiremesh_core::wire::FelixConfigurationSpec;
use wiremesh_dataplane::link::NetlinkLinks;
use wiremesh_dataplane::netlink::netlink_handle;
use wiremesh_dataplane::route::NetlinkRouting;
use wiremesh_dataplane::wireguard::backend::find_binary;
use wiremesh_dataplane::wireguard::userspace::{UserspaceConfig, UserspaceWireguard};
use wiremesh_dataplane::wireguard::{WireguardDataplane, WireguardStats};
use wiremesh_dataplane::{Backend, DataplaneError};
use wiremesh_datastore::{Datastore, DatastoreError, ReadScope, SnapshotSender, SyncHealth};

/// Our device, configured by the reconciler.
const DEVICE: &str = "wmbench0";
/// The device `wg setconf` configures.
const SETCONF_DEVICE: &str = "wmbench1";
const LOCAL_NODE: &str = "node0";
/// Largest N the address plan supports (pod CIDRs 10.100.0.0/24 .. 10.255.255.0/24).
const MAX_PEERS: usize = 156 * 256 - 1;
/// The target: cold converge (without device start-up) at most this many times `wg setconf`.
const TARGET_RATIO: f64 = 1.5;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Peer counts to measure, each in its own namespace.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    pub peers: Vec<usize>,
    /// The wireguard-go binary (a bare name is looked up in PATH).
    #[arg(long, default_value = "wireguard-go")]
    pub wireguard_go: PathBuf,
    /// The wg(8) binary used for `wg setconf`.
    #[arg(long, default_value = "wg")]
    pub wg: PathBuf,
    /// Repetitions per peer count, each in a fresh namespace; the table shows medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(
        "the benchmark must run as root (it creates network namespaces, TUN devices and mounts)"
    )]
    NotRoot,
    #[error("{0} not found (Debian/Ubuntu: apt-get install wireguard-go wireguard-tools)")]
    MissingBinary(String),
    #[error("--peers: {0}")]
    BadPeers(String),
    #[error("network namespace")]
    Netns(#[from] NetnsError),
    #[error("reconcile")]
    Reconcile(#[from] ReconcileError),
    #[error("dataplane")]
    Dataplane(#[from] DataplaneError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("wg setconf failed ({status}): {stderr}")]
    Setconf { status: String, stderr: String },
    #[error("unexpected result: {0}")]
    Unexpected(String),
    #[error("the benchmark thread failed: {0}")]
    Join(String),
}

/// Runs the benchmark, printing as it goes and a table at the end.
pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    tokio::task::spawn_blocking(move || run_blocking(&args))
        .await
        .map_err(|e| BenchError::Join(e.to_string()))?
}

fn run_blocking(args: &BenchArgs) -> Result<(), BenchError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(BenchError::NotRoot);
    }
    for binary in [&args.wireguard_go, &args.wg] {
        if find_binary(binary).is_none() {
            return Err(BenchError::MissingBinary(binary.display().to_string()));
        }
    }
    if args.peers.is_empty() {
        return Err(BenchError::BadPeers("give at least one count".into()));
    }
    if let Some(n) = args.peers.iter().find(|n| **n == 0 || **n > MAX_PEERS) {
        return Err(BenchError::BadPeers(format!(
            "{n} is outside 1..={MAX_PEERS}"
        )));
    }
    crate::outln!(
        "wiremesh bench: userspace backend ({}), {} and {}",
        args.wireguard_go.display(),
        args.wg.display(),
        std::env::consts::ARCH
    );
    let mut rows = Vec::new();
    for &n in &args.peers {
        crate::outln!();
        let mut runs = Vec::new();
        for run in 1..=args.runs {
            crate::outln!("== {n} peers, run {run} of {}", args.runs);
            let row = measure(n, args)?;
            row.print_details();
            runs.push(row);
        }
        rows.push(Row::median(runs));
    }
    crate::outln!();
    crate::outln!(
        "medians of {} run(s) per peer count (ratio = median cold without start-up / median wg setconf):",
        args.runs
    );
    print_table(&rows);
    Ok(())
}

/// What one N produced.
struct Row {
    peers: usize,
    cold: Duration,
    cold_outcome: Outcome,
    /// Of the cold run: starting wireguard-go (CreateDevice).
    cold_startup: Duration,
    setconf: Duration,
    setconf_startup: Duration,
    change_outcome: Outcome,
    change: Duration,
    change_ok: bool,
    idle: Duration,
    idle_outcome: Outcome,
    peak_rss_kib: i64,
}

impl Row {
    /// The median of every time over the runs (the ops of the first run, the checks of all,
    /// the largest RSS).
    fn median(mut runs: Vec<Row>) -> Row {
        fn med(mut values: Vec<Duration>) -> Duration {
            values.sort();
            values.get(values.len() / 2).copied().unwrap_or_default()
        }
        fn med_steps(outcomes: &[&Outcome]) -> BTreeMap<&'static str, Duration> {
            let steps: BTreeSet<&'static str> = outcomes
                .iter()
                .flat_map(|o| o.durations.keys().copied())
                .collect();
            steps
                .into_iter()
                .map(|step| {
                    let values = outcomes
                        .iter()
                        .map(|o| o.durations.get(step).copied().unwrap_or_default())
                        .collect();
                    (step, med(values))
                })
                .collect()
        }
        let field = |f: fn(&Row) -> Duration, runs: &[Row]| med(runs.iter().map(f).collect());
        let cold = field(|r| r.cold, &runs);
        let cold_startup = field(|r| r.cold_startup, &runs);
        let setconf = field(|r| r.setconf, &runs);
        let setconf_startup = field(|r| r.setconf_startup, &runs);
        let change = field(|r| r.change, &runs);
        let idle = field(|r| r.idle, &runs);
        let cold_steps = med_steps(&runs.iter().map(|r| &r.cold_outcome).collect::<Vec<_>>());
        let change_steps = med_steps(&runs.iter().map(|r| &r.change_outcome).collect::<Vec<_>>());
        let idle_steps = med_steps(&runs.iter().map(|r| &r.idle_outcome).collect::<Vec<_>>());
        let change_ok = runs.iter().all(|r| r.change_ok);
        let idle_ops_max = runs
            .iter()
            .map(|r| r.idle_outcome.total_ops())
            .max()
            .unwrap_or(0);
        let peak_rss_kib = runs.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0);
        let idle_max_run = runs
            .iter()
            .position(|r| r.idle_outcome.total_ops() == idle_ops_max)
            .unwrap_or(0);
        let mut row = runs.remove(0);
        row.cold = cold;
        row.cold_startup = cold_startup;
        row.setconf = setconf;
        row.setconf_startup = setconf_startup;
        row.change = change;
        row.idle = idle;
        row.cold_outcome.durations = cold_steps;
        row.change_outcome.durations = change_steps;
        if idle_max_run != 0 {
            // Show the worst idle run's ops, so a non-empty one is never hidden.
            if let Some(r) = runs.get(idle_max_run - 1) {
                row.idle_outcome = r.idle_outcome.clone();
            }
        }
        row.idle_outcome.durations = idle_steps;
        row.change_ok = change_ok;
        row.peak_rss_kib = peak_rss_kib;
        row
    }

    fn cold_without_startup(&self) -> Duration {
        self.cold.saturating_sub(self.cold_startup)
    }

    fn ratio(&self) -> f64 {
        self.cold_without_startup().as_secs_f64() / self.setconf.as_secs_f64().max(1e-9)
    }

    fn ratio_with_startup(&self) -> f64 {
        self.cold.as_secs_f64() / self.setconf.as_secs_f64().max(1e-9)
    }

    fn meets_target(&self) -> bool {
        self.ratio() <= TARGET_RATIO
    }

    fn print_details(&self) {
        crate::outln!(
            "cold converge        {} total, {} without wireguard-go start-up ({}); by step: {}",
            ms(self.cold),
            ms(self.cold_without_startup()),
            ms(self.cold_startup),
            steps(&self.cold_outcome)
        );
        crate::outln!("                     ops: {}", ops_text(&self.cold_outcome));
        crate::outln!(
            "wg setconf           {} (device start-up before it: {})",
            ms(self.setconf),
            ms(self.setconf_startup)
        );
        crate::outln!(
            "ratio                {:.2}x without start-up, {:.2}x with (target <= {TARGET_RATIO}x without)",
            self.ratio(),
            self.ratio_with_startup()
        );
        crate::outln!(
            "one node change      {}: {} [{}]; by step: {}",
            ms(self.change),
            ops_text(&self.change_outcome),
            if self.change_ok { "ok" } else { "FAIL" },
            steps(&self.change_outcome)
        );
        crate::outln!(
            "idle resync          {}: {} ops [{}]; by step: {}",
            ms(self.idle),
            self.idle_outcome.total_ops(),
            if self.idle_outcome.total_ops() == 0 {
                "ok"
            } else {
                "FAIL"
            },
            steps(&self.idle_outcome)
        );
        crate::outln!(
            "peak RSS             {:.1} MiB (this process; wireguard-go not included)",
            self.peak_rss_kib as f64 / 1024.0
        );
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn steps(outcome: &Outcome) -> String {
    outcome
        .durations
        .iter()
        .map(|(step, d)| format!("{step} {}", ms(*d)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ops_text(outcome: &Outcome) -> String {
    if outcome.ops.is_empty() {
        return "none".into();
    }
    outcome
        .ops
        .iter()
        .map(|((subsystem, kind), n)| format!("{subsystem}.{kind}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_table(rows: &[Row]) {
    let header = [
        "peers",
        "cold converge",
        "of which wg",
        "cold w/o start",
        "wg setconf",
        "ratio",
        "one-change ops",
        "one-change",
        "idle resync",
        "peak RSS",
    ];
    let mut lines = vec![header.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    for r in rows {
        let wg = r
            .cold_outcome
            .durations
            .get("wireguard")
            .copied()
            .unwrap_or_default();
        lines.push(vec![
            r.peers.to_string(),
            ms(r.cold),
            ms(wg),
            ms(r.cold_without_startup()),
            ms(r.setconf),
            format!("{:.2}x", r.ratio()),
            format!(
                "{} {}",
                compact_ops(&r.change_outcome),
                if r.change_ok { "ok" } else { "FAIL" }
            ),
            ms(r.change),
            ms(r.idle),
            format!("{:.1} MiB", r.peak_rss_kib as f64 / 1024.0),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| lines.iter().map(|l| l[c].len()).max().unwrap_or(0))
        .collect();
    for line in &lines {
        let mut out = String::new();
        for (c, cell) in line.iter().enumerate() {
            let _ = write!(out, "{cell:>w$}  ", w = widths[c]);
        }
        crate::outln!("{}", out.trim_end());
    }
    crate::outln!();
    let verdicts: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{} peers {:.2}x {}",
                r.peers,
                r.ratio(),
                if r.meets_target() { "met" } else { "MISSED" }
            )
        })
        .collect();
    crate::outln!(
        "target: cold converge (without wireguard-go start-up) <= {TARGET_RATIO}x wg setconf: {}",
        verdicts.join("; ")
    );
    crate::outln!(
        "target: one node change = 1 wireguard.set_peer + that node's routes: {}",
        rows.iter()
            .map(|r| format!(
                "{} peers {}",
                r.peers,
                if r.change_ok { "ok" } else { "FAIL" }
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
}

/// `wg setconf`'s compact form of the one-change ops, e.g. `1 peer + 1 route`.
fn compact_ops(outcome: &Outcome) -> String {
    let get = |s: &str, k: &str| outcome.ops.get(&(s, k)).copied().unwrap_or(0);
    let peers = get("wireguard", "set_peer") + get("wireguard", "remove_peer");
    let routes = get("routing", "add_route") + get("routing", "delete_route");
    let other = outcome.total_ops() - peers - routes;
    let mut text = format!("{peers} peer + {routes} route");
    if other > 0 {
        let _ = write!(text, " + {other} other");
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Synthetic cluster

/// A synthetic remote node: its key, endpoint address and pod CIDR.
struct SyntheticNode {
    name: String,
    key: WgKey,
    address: String,
    pod_cidr: String,
}

fn pod_cidr(i: usize) -> String {
    format!("10.{}.{}.0/24", 100 + i / 256, i % 256)
}

fn synthetic_nodes(n: usize) -> Vec<SyntheticNode> {
    (1..=n)
        .map(|i| SyntheticNode {
            name: format!("node{i}"),
            key: PrivateKey::generate().public_key(),
            address: format!("172.31.{}.{}", i / 256, i % 256),
            pod_cidr: pod_cidr(i),
        })
        .collect()
}

fn snapshot(nodes: &[SyntheticNode]) -> ClusterSnapshot {
    let local = NodeResource {
        name: LOCAL_NODE.into(),
        ipv4_address: Some("172.30.0.1/24".into()),
        pod_cidrs: vec![pod_cidr(0)],
        ..Default::default()
    };
    let remote = nodes.iter().map(|n| NodeResource {
        name: n.name.clone(),
        ipv4_address: Some(format!("{}/16", n.address)),
        pod_cidrs: vec![n.pod_cidr.clone()],
        wireguard_public_key: Some(n.key.to_base64()),
        ..Default::default()
    });
    let felix = FelixConfigurationSpec {
        wireguard_enabled: Some(true),
        wireguard_interface_name: Some(DEVICE.into()),
        wireguard_keep_alive: Some("0s".into()),
        ..Default::default()
    };
    ClusterSnapshot {
        nodes: std::iter::once(local)
            .chain(remote)
            .map(|n| (n.name.clone(), n))
            .collect(),
        felix_configurations: [("default".to_string(), Ok(felix.into()))].into(),
        synced: true,
        ..Default::default()
    }
}

/// The same device in `wg setconf` form (`wg showconf` syntax).
fn setconf_file(private_key: &PrivateKey, port: u16, nodes: &[SyntheticNode]) -> String {
    let mut out = String::with_capacity(200 + nodes.len() * 160);
    let _ = write!(
        out,
        "[Interface]\nPrivateKey = {}\nListenPort = {port}\nFwMark = {DEFAULT_FWMARK:#x}\n",
        WgKey(*private_key.to_bytes()).to_base64()
    );
    for n in nodes {
        let _ = write!(
            out,
            "\n[Peer]\nPublicKey = {}\nEndpoint = {}:{}\nAllowedIPs = {}\nPersistentKeepalive = 0\n",
            n.key.to_base64(),
            n.address,
            wiremesh_core::config::DEFAULT_PORT_V4,
            n.pod_cidr
        );
    }
    out
}

/// Remembers what the agent publishes; nothing else.
#[derive(Default)]
struct BenchDatastore {
    published: std::sync::Mutex<Option<PublishedWireguard>>,
}

#[async_trait]
impl Datastore for BenchDatastore {
    fn kind(&self) -> &'static str {
        "bench"
    }

    async fn run(&self, _cache: SnapshotSender) -> Result<(), DatastoreError> {
        std::future::pending().await
    }

    async fn read_once(&self, _scope: ReadScope) -> Result<ClusterSnapshot, DatastoreError> {
        Ok(ClusterSnapshot::default())
    }

    async fn publish(
        &self,
        _node: &str,
        published: &PublishedWireguard,
    ) -> Result<(), DatastoreError> {
        if let Ok(mut slot) = self.published.lock() {
            *slot = Some(published.clone());
        }
        Ok(())
    }

    fn sync_health(&self) -> Arc<SyncHealth> {
        Arc::default()
    }
}

/// The real backend, with the time spent in `CreateDevice` (starting wireguard-go) recorded.
struct TimedWireguard {
    inner: UserspaceWireguard,
    create_nanos: Arc<AtomicU64>,
}

#[async_trait]
impl WireguardStats for TimedWireguard {
    async fn read_device(&self, name: &str) -> Result<Option<DeviceState>, DataplaneError> {
        self.inner.read_device(name).await
    }
}

#[async_trait]
impl WireguardDataplane for TimedWireguard {
    fn backend(&self) -> Backend {
        self.inner.backend()
    }

    fn stats_reader(&self) -> Option<Arc<dyn WireguardStats>> {
        self.inner.stats_reader()
    }

    async fn apply(&mut self, ops: &[WgOp]) -> Result<(), DataplaneError> {
        // Device creation on its own (timed); everything else in the same batches as before.
        let mut rest = ops;
        while !rest.is_empty() {
            let split = rest
                .iter()
                .position(|op| matches!(op, WgOp::CreateDevice { .. }))
                .unwrap_or(rest.len());
            let (batch, tail) = rest.split_at(split);
            if !batch.is_empty() {
                self.inner.apply(batch).await?;
            }
            rest = tail;
            if let Some((create, tail)) = rest.split_first() {
                let start = Instant::now();
                self.inner.apply(std::slice::from_ref(create)).await?;
                let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
                self.create_nanos.fetch_add(nanos, Ordering::Relaxed);
                rest = tail;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// One N

fn measure(n: usize, args: &BenchArgs) -> Result<Row, BenchError> {
    let nodes = Arc::new(synthetic_nodes(n));
    let ns = Netns::new("wmbench")?;
    let state_dir = tempfile::Builder::new()
        .prefix("wmbench-state-")
        .tempdir()
        .map_err(|source| BenchError::Io {
            what: "creating the state directory".into(),
            source,
        })?;
    let conf_path = state_dir.path().join("setconf.conf");
    let userspace = UserspaceConfig {
        binary: args.wireguard_go.clone(),
        timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let wg_binary = args.wg.clone();
    let state_path = state_dir.path().to_path_buf();
    let row = ns.enter(move || async move {
        measure_inside(n, &nodes, userspace, &wg_binary, &state_path, &conf_path).await
    })??;
    // Dropping `ns` kills both wireguard-go daemons and deletes the namespace.
    drop(ns);
    Ok(row)
}

async fn measure_inside(
    n: usize,
    nodes: &[SyntheticNode],
    userspace: UserspaceConfig,
    wg_binary: &Path,
    state_dir: &Path,
    conf_path: &Path,
) -> Result<Row, BenchError> {
    let handle = netlink_handle()?;
    let create_nanos = Arc::new(AtomicU64::new(0));
    let wireguard = TimedWireguard {
        inner: UserspaceWireguard::with_config(handle.clone(), userspace.clone()),
        create_nanos: Arc::clone(&create_nanos),
    };
    let store = Arc::new(BenchDatastore::default());
    let settings = Arc::new(AgentSettings::new(LOCAL_NODE, state_dir));
    let mut reconciler = Reconciler::new(
        settings,
        wireguard,
        NetlinkLinks::new(handle.clone()),
        NetlinkRouting::new(handle.clone()),
        store.clone(),
    );
    let mut snap = snapshot(nodes);

    // Cold converge.
    let start = Instant::now();
    let cold_outcome = reconciler.reconcile_once(&snap).await?;
    let cold = start.elapsed();
    let cold_startup = Duration::from_nanos(create_nanos.load(Ordering::Relaxed));
    let get = |o: &Outcome, s: &'static str, k: &'static str| o.ops.get(&(s, k)).copied();
    if get(&cold_outcome, "wireguard", "set_peer") != Some(n) {
        return Err(BenchError::Unexpected(format!(
            "cold converge set {} peers, not {n}",
            ops_text(&cold_outcome)
        )));
    }
    // Write what was published back, as the datastore's watch would.
    let published = store
        .published
        .lock()
        .ok()
        .and_then(|p| p.clone())
        .ok_or_else(|| BenchError::Unexpected("the cold converge published nothing".into()))?;
    if let Some(local) = snap.nodes.get_mut(LOCAL_NODE) {
        local.wireguard_public_key = published.public_key_v4.map(|k| k.to_string());
        local.wireguard_interface_ipv4_address =
            published.interface_ipv4_address.map(|a| a.to_string());
    }

    // wg setconf on a second wireguard-go device, same key, port + 10, fwmark and peers.
    let (private_key, _) = wiremesh_agent::keystore::KeyStore::new(state_dir)
        .load_or_generate(wiremesh_core::model::Family::V4)
        .map_err(|e| BenchError::Unexpected(format!("reading the agent's key: {e}")))?;
    std::fs::write(
        conf_path,
        setconf_file(
            &private_key,
            wiremesh_core::config::DEFAULT_PORT_V4 + 10,
            nodes,
        ),
    )
    .map_err(|source| BenchError::Io {
        what: format!("writing {}", conf_path.display()),
        source,
    })?;
    let mut other = UserspaceWireguard::with_config(handle.clone(), userspace);
    let start = Instant::now();
    other
        .apply(&[WgOp::CreateDevice {
            name: SETCONF_DEVICE.into(),
        }])
        .await?;
    let setconf_startup = start.elapsed();
    let start = Instant::now();
    let output = tokio::process::Command::new(wg_binary)
        .arg("setconf")
        .arg(SETCONF_DEVICE)
        .arg(conf_path)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| BenchError::Io {
            what: format!("running {} setconf", wg_binary.display()),
            source,
        })?;
    let setconf = start.elapsed();
    if !output.status.success() {
        return Err(BenchError::Setconf {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    // Both devices hold the same peers.
    let names: BTreeSet<String> = [DEVICE.to_string(), SETCONF_DEVICE.to_string()].into();
    let devices = other.observe(&names).await?;
    let peers = |name: &str| {
        devices.get(name).map(|d| {
            d.peers
                .iter()
                .map(|(k, p)| (*k, (p.endpoint, p.allowed_ips.clone(), p.keepalive)))
                .collect::<BTreeMap<_, _>>()
        })
    };
    let (ours, theirs) = (peers(DEVICE), peers(SETCONF_DEVICE));
    if ours.as_ref().map(BTreeMap::len) != Some(n) || ours != theirs {
        return Err(BenchError::Unexpected(format!(
            "{DEVICE} and {SETCONF_DEVICE} do not hold the same {n} peers ({:?} vs {:?})",
            ours.map(|p| p.len()),
            theirs.map(|p| p.len())
        )));
    }

    // One node change: a second pod CIDR on one node.
    let changed = &nodes[n / 2];
    if let Some(node) = snap.nodes.get_mut(&changed.name) {
        node.pod_cidrs.push("10.250.0.0/24".into());
    }
    let start = Instant::now();
    let change_outcome = reconciler.reconcile_once(&snap).await?;
    let change = start.elapsed();
    let expected: BTreeMap<(&'static str, &'static str), usize> = [
        (("wireguard", "set_peer"), 1),
        (("routing", "add_route"), 1),
    ]
    .into();
    let change_ok = change_outcome.ops == expected && !change_outcome.published;

    // Idle resync.
    let start = Instant::now();
    let idle_outcome = reconciler.reconcile_once(&snap).await?;
    let idle = start.elapsed();

    let peak_rss_kib = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|u| u.max_rss())
        .unwrap_or(0);
    Ok(Row {
        peers: n,
        cold,
        cold_outcome,
        cold_startup,
        setconf,
        setconf_startup,
        change_outcome,
        change,
        change_ok,
        idle,
        idle_outcome,
        peak_rss_kib,
    })
}

//! The one level-triggered reconcile loop: datastore changes, a slow resync timer and retries
//! only mark the state dirty; one task snapshots and runs desired -> observe -> plan -> apply.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tracing::{Instrument as _, debug, info, info_span, warn};

use wiremesh_core::config::ConfigFieldError;
use wiremesh_core::dataplane::{filter as nft, link, routing as route, wireguard as wg};
use wiremesh_core::error_chain;
use wiremesh_core::keys::PrivateKey;
use wiremesh_core::mesh::{self, DataplaneSpec, Inputs, LocalFacts, SkipReason, SkippedNode};
use wiremesh_core::model::{ClusterSnapshot, Family, WgKey};
use wiremesh_dataplane::DataplaneError;
use wiremesh_dataplane::link::LinkDataplane;
use wiremesh_dataplane::nft::FilterDataplane;
use wiremesh_dataplane::route::RoutingDataplane;
use wiremesh_dataplane::wireguard::WireguardDataplane;
use wiremesh_datastore::{Datastore, DatastoreError, ObjectProblem, ProblemObject};

use crate::keystore::{KeyError, KeyStore};
use crate::metrics::Metrics;
use crate::status_file::{AgentStatus, DeviceStatus, PeerStatus, unix_now};

/// Agent settings that come from flags, not from FelixConfiguration.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub node_name: String,
    pub state_dir: PathBuf,
    pub fwmark: u32,
    pub routing_table: u32,
    /// Full resync even without datastore changes (Felix's RouteRefreshInterval: 90 s).
    pub resync_interval: Duration,
    /// Least time between two runs; changes arriving meanwhile are coalesced.
    pub min_interval: Duration,
}

impl AgentSettings {
    pub fn new(node_name: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        AgentSettings {
            node_name: node_name.into(),
            state_dir: state_dir.into(),
            fwmark: wiremesh_core::config::DEFAULT_FWMARK,
            routing_table: wiremesh_core::config::DEFAULT_ROUTING_TABLE,
            resync_interval: Duration::from_secs(90),
            min_interval: Duration::from_millis(50),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("loading the {family} private key")]
    Keys {
        family: Family,
        #[source]
        source: KeyError,
    },
    #[error("programming the dataplane")]
    Dataplane(#[from] DataplaneError),
    #[error("publishing this node's WireGuard fields")]
    Publish(#[from] DatastoreError),
}

impl ReconcileError {
    /// A short, stable label for metrics (`wiremesh_reconcile_failures_total{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            ReconcileError::Keys { .. } => "keys",
            ReconcileError::Dataplane(e) => match e.kind() {
                "observe" => "dataplane_observe",
                "apply" => "dataplane_apply",
                "not_wireguard" => "dataplane_not_wireguard",
                "no_backend" => "dataplane_no_backend",
                _ => "dataplane_timeout",
            },
            ReconcileError::Publish(_) => "publish",
        }
    }

    pub fn is_transient(&self) -> bool {
        match self {
            ReconcileError::Keys { .. } => false,
            ReconcileError::Dataplane(e) => e.is_transient(),
            ReconcileError::Publish(e) => e.is_transient(),
        }
    }
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Operation counts by subsystem and kind, e.g. `("wireguard", "set_peer") -> 2`.
    pub ops: BTreeMap<(&'static str, &'static str), usize>,
    pub published: bool,
    /// Time spent per step of the run: `desired`, `routing` (observe, deletes and adds),
    /// `wireguard` (observe and apply), `link`, `publish`.
    pub durations: BTreeMap<&'static str, Duration>,
}

impl Outcome {
    pub fn total_ops(&self) -> usize {
        self.ops.values().sum()
    }
}

pub struct Reconciler<W, L, R> {
    settings: Arc<AgentSettings>,
    keys: KeyStore,
    loaded_keys: BTreeMap<Family, PrivateKey>,
    wg: W,
    links: L,
    routing: R,
    datastore: Arc<dyn Datastore>,
    last_skipped: BTreeSet<SkippedNode>,
    last_config_errors: Vec<String>,
    /// Problems seen since the last run, for `Datastore::report`.
    pending_reports: Vec<ObjectProblem>,
    /// Names of the devices we programmed, persisted so a rename or a restart still knows them.
    created_interfaces: BTreeSet<String>,
    /// Wakes the loop when the kernel reports a change to our links, routes or rules.
    kernel_events: Option<tokio::sync::mpsc::Receiver<()>>,
    status: AgentStatus,
    metrics: Arc<Metrics>,
    /// When each peer key was last set by this agent (Unix seconds).
    programmed_at: BTreeMap<WgKey, u64>,
    /// Each peer's datastore endpoint as of the last successful WireGuard apply, so a roamed
    /// peer keeps its learned endpoint until the datastore moves it.
    programmed_endpoints: BTreeMap<(String, WgKey), std::net::SocketAddr>,
    /// Host-endpoint policy in our nftables table; `None` = policy not enforced by this agent.
    filter: Option<Box<dyn FilterDataplane>>,
    /// Last valid version of every policy object, so a bad edit keeps the previous one.
    policy_last_good: wiremesh_core::policy::RawPolicyResources,
}

const INTERFACES_FILE: &str = "interfaces.json";

impl<W: WireguardDataplane, L: LinkDataplane, R: RoutingDataplane> Reconciler<W, L, R> {
    pub fn new(
        settings: Arc<AgentSettings>,
        wg: W,
        links: L,
        routing: R,
        datastore: Arc<dyn Datastore>,
    ) -> Self {
        let status = AgentStatus {
            node: settings.node_name.clone(),
            backend: Some(wg.backend()),
            resync_seconds: settings.resync_interval.as_secs(),
            ..Default::default()
        };
        let metrics = Arc::new(Metrics::new(stale_after(settings.resync_interval)));
        let created_interfaces = std::fs::read(settings.state_dir.join(INTERFACES_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Reconciler {
            created_interfaces,
            kernel_events: None,
            keys: KeyStore::new(&settings.state_dir),
            settings,
            loaded_keys: BTreeMap::new(),
            wg,
            links,
            routing,
            datastore,
            last_skipped: BTreeSet::new(),
            pending_reports: Vec::new(),
            last_config_errors: Vec::new(),
            status,
            metrics,
            programmed_at: BTreeMap::new(),
            programmed_endpoints: BTreeMap::new(),
            filter: None,
            policy_last_good: Default::default(),
        }
    }

    /// Records metrics and health into `metrics` (shared with the admin server).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Also enforce host-endpoint policy through this nftables dataplane.
    pub fn with_filter(mut self, filter: Box<dyn FilterDataplane>) -> Self {
        self.filter = Some(filter);
        self
    }

    /// Also run when the kernel reports a change (see `dataplane::events`).
    pub fn with_kernel_events(mut self, events: tokio::sync::mpsc::Receiver<()>) -> Self {
        self.kernel_events = Some(events);
        self
    }

    pub fn status(&self) -> &AgentStatus {
        &self.status
    }

    fn key(&mut self, family: Family) -> Result<PrivateKey, ReconcileError> {
        if let Some(k) = self.loaded_keys.get(&family) {
            return Ok(k.clone());
        }
        let (key, created) = self
            .keys
            .load_or_generate(family)
            .map_err(|source| ReconcileError::Keys { family, source })?;
        if created {
            info!(%family, public_key = %key.public_key(), "generated new private/public key pair");
        } else {
            info!(%family, public_key = %key.public_key(), "loaded private key from state directory");
        }
        self.loaded_keys.insert(family, key.clone());
        Ok(key)
    }

    /// Builds the desired state for a snapshot (reporting bad input once per change).
    fn desired(
        &mut self,
        snapshot: &ClusterSnapshot,
        host_mtu: u32,
    ) -> Result<DataplaneSpec, ReconcileError> {
        let settings = Arc::clone(&self.settings);
        let node = &settings.node_name;
        let (settings, config_errors) =
            mesh::effective_settings(node, &snapshot.felix_configurations);
        let config_problems: Vec<ObjectProblem> =
            config_errors.iter().map(config_problem).collect();
        let config_errors: Vec<String> = config_errors
            .iter()
            .map(ConfigFieldError::to_string)
            .collect();
        if config_errors != self.last_config_errors {
            for e in &config_errors {
                warn!(error = %e, "ignoring invalid FelixConfiguration field");
            }
            self.pending_reports.extend(
                config_problems
                    .into_iter()
                    .filter(|p| !self.last_config_errors.contains(&p.message)),
            );
            self.last_config_errors = config_errors.clone();
        }
        let mut private_keys = BTreeMap::new();
        for family in Family::ALL {
            if settings.family(family).enabled {
                private_keys.insert(family, self.key(family)?);
            }
        }
        let inputs = Inputs {
            local: LocalFacts {
                node_name: node.clone(),
                private_keys,
                fwmark: self.settings.fwmark,
                routing_table: self.settings.routing_table,
                host_mtu,
                previous_interfaces: self.created_interfaces.clone(),
            },
            settings,
            nodes: snapshot.nodes.clone(),
        };
        let spec = mesh::desired(&inputs);
        if spec.skipped != self.last_skipped {
            for s in spec.skipped.difference(&self.last_skipped) {
                warn!(node = %s.node, family = %s.family, reason = %s.reason, "not peering with node");
                if let Some(problem) = skipped_problem(s) {
                    self.pending_reports.push(problem);
                }
            }
            for s in self.last_skipped.difference(&spec.skipped) {
                if !spec
                    .skipped
                    .iter()
                    .any(|n| n.node == s.node && n.family == s.family)
                {
                    info!(node = %s.node, family = %s.family, "node no longer skipped");
                }
            }
            self.last_skipped = spec.skipped.clone();
        }
        self.status.config_errors = config_errors;
        Ok(spec)
    }

    /// One pass: desired -> (observe, plan, apply) per subsystem -> publish.
    pub async fn reconcile_once(
        &mut self,
        snapshot: &ClusterSnapshot,
    ) -> Result<Outcome, ReconcileError> {
        let mut outcome = Outcome::default();
        let mut clock = Instant::now();
        let mut lap = |outcome: &mut Outcome, step: &'static str| {
            let now = Instant::now();
            *outcome.durations.entry(step).or_default() += now - clock;
            clock = now;
        };
        let host_mtu = self
            .links
            .host_mtu()
            .await?
            .unwrap_or(wiremesh_core::config::FALLBACK_HOST_MTU);
        lap(&mut outcome, "link");
        let spec = self.desired(snapshot, host_mtu)?;
        lap(&mut outcome, "desired");
        if !self.pending_reports.is_empty() {
            let problems = std::mem::take(&mut self.pending_reports);
            self.datastore.report(&problems).await;
        }

        // Rules and routes go first when removed and last when added.
        let routing_actual = self.routing.observe(spec.routing_table).await?;
        let route_ops = route::plan(&spec, &routing_actual);
        let (route_deletes, route_adds): (Vec<_>, Vec<_>) =
            route_ops.into_iter().partition(|op| op.is_delete());
        self.routing.apply(&route_deletes).await?;
        apply_logged(&mut outcome, "routing", &route_deletes, |op| op.kind());
        lap(&mut outcome, "routing");

        let wg_actual = self.wg.observe(&spec.owned_interfaces).await?;
        let wg_ops = wg::plan_with(
            &spec,
            &wg_actual,
            Some(wg::Learned {
                now: SystemTime::now(),
                programmed: &self.programmed_endpoints,
            }),
        );
        self.wg.apply(&wg_ops).await?;
        self.programmed_endpoints = spec
            .devices
            .values()
            .flat_map(|d| {
                d.peers
                    .iter()
                    .map(|(key, peer)| ((d.name.clone(), *key), peer.endpoint))
            })
            .collect();
        apply_logged(&mut outcome, "wireguard", &wg_ops, |op| op.kind());
        let now = unix_now();
        for op in &wg_ops {
            match op {
                wg::WgOp::SetPeer { public_key, .. } => {
                    self.programmed_at.insert(*public_key, now);
                }
                wg::WgOp::RemovePeer { public_key, .. } => {
                    self.programmed_at.remove(public_key);
                }
                _ => {}
            }
        }
        let device_names: BTreeSet<String> =
            spec.devices.values().map(|d| d.name.clone()).collect();
        // The WireGuard series are read at scrape time; the loop only names the devices.
        self.metrics.set_wireguard_devices(&device_names);
        if device_names != self.created_interfaces {
            self.created_interfaces = device_names.clone();
            self.persist_created_interfaces();
        }
        lap(&mut outcome, "wireguard");

        let link_actual = self.links.observe(&device_names).await?;
        let link_ops = link::plan(&spec, &link_actual);
        self.links.apply(&link_ops).await?;
        apply_logged(&mut outcome, "link", &link_ops, |op| op.kind());
        lap(&mut outcome, "link");

        self.routing.apply(&route_adds).await?;
        apply_logged(&mut outcome, "routing", &route_adds, |op| op.kind());
        lap(&mut outcome, "routing");

        let node = &self.settings.node_name;
        match snapshot.nodes.get(node) {
            Some(local) if !spec.publish.matches(local) => {
                info!(
                    public_key_v4 = ?spec.publish.public_key_v4.map(|k| k.to_string()),
                    public_key_v6 = ?spec.publish.public_key_v6.map(|k| k.to_string()),
                    "publishing WireGuard public key on node"
                );
                self.datastore.publish(node, &spec.publish).await?;
                outcome.published = true;
            }
            Some(_) => {}
            None => {
                debug!(node = %node, "this node is not in the datastore yet; nothing to publish")
            }
        }
        lap(&mut outcome, "publish");
        // Last, so a policy failure never holds back the mesh.
        if self.filter.is_some() {
            self.reconcile_policy(snapshot, &spec, &mut outcome).await?;
            lap(&mut outcome, "policy");
        }
        self.record_status(&spec);
        Ok(outcome)
    }

    /// Host-endpoint policy: validate, compile for this node, render, observe, plan, apply.
    async fn reconcile_policy(
        &mut self,
        snapshot: &ClusterSnapshot,
        spec: &DataplaneSpec,
        outcome: &mut Outcome,
    ) -> Result<(), ReconcileError> {
        use wiremesh_core::policy::{self, FailsafePort, PolicyResources, PolicySettings};
        let resources = PolicyResources::from_raw_keeping_last_good(
            &snapshot.policy,
            &mut self.policy_last_good,
        );
        let mut errors: Vec<String> = resources.errors.iter().map(|e| e.to_string()).collect();
        let node = &self.settings.node_name;
        let mut settings = PolicySettings::default();
        // FelixConfiguration `node.<name>` wins over `default`.
        for name in ["default".to_string(), format!("node.{node}")] {
            let Some(Ok(felix)) = snapshot.felix_configurations.get(&name) else {
                continue;
            };
            for (field, value, target) in [
                (
                    "failsafeInboundHostPorts",
                    &felix.failsafe_inbound_host_ports,
                    &mut settings.failsafe_inbound,
                ),
                (
                    "failsafeOutboundHostPorts",
                    &felix.failsafe_outbound_host_ports,
                    &mut settings.failsafe_outbound,
                ),
            ] {
                if let Some(v) = value {
                    match FailsafePort::from_json(v) {
                        Ok(list) => *target = list,
                        Err(e) => errors.push(format!("FelixConfiguration {name:?}: {field}{e}")),
                    }
                }
            }
            if let Some(p) = felix.log_prefix.as_ref().filter(|p| !p.is_empty()) {
                settings.log_prefix = p.clone();
            }
        }
        settings.wireguard_ports = spec.devices.values().map(|d| d.listen_port).collect();
        settings.wireguard_ports.sort_unstable();
        settings.wireguard_ports.dedup();
        if errors != self.status.policy_errors {
            for e in errors
                .iter()
                .filter(|e| !self.status.policy_errors.contains(e))
            {
                warn!(error = %e, "invalid policy object");
            }
            // Reported once when it appears (like the other problems), as an Event on the object.
            let problems: Vec<ObjectProblem> = resources
                .errors
                .iter()
                .filter(|e| !self.status.policy_errors.contains(&e.to_string()))
                .map(policy_problem)
                .collect();
            if !problems.is_empty() {
                self.datastore.report(&problems).await;
            }
            self.status.policy_errors = errors;
        }
        let Some(filter) = self.filter.as_mut() else {
            return Ok(());
        };
        // Host endpoints identified by expectedIPs only need this host's interface addresses.
        let local_interfaces = if resources
            .host_endpoints
            .iter()
            .any(|h| &h.node == node && h.interface_name.is_none())
        {
            filter.local_interfaces().await?
        } else {
            Default::default()
        };
        let program = policy::compile(&policy::PolicyInputs {
            node,
            resources: Some(&resources),
            local_interfaces,
            settings,
        });
        let desired = policy::render::render(&program);
        let actual = filter.observe().await?;
        let ops = nft::plan(&desired, &actual);
        filter.apply(&ops).await?;
        apply_logged(outcome, "nftables", &ops, |op| op.kind());
        // The counters are read at scrape time; the loop only names them.
        self.metrics.set_policy_counters(&desired.counters);
        Ok(())
    }

    fn record_status(&mut self, spec: &DataplaneSpec) {
        self.status.enabled = Family::ALL
            .iter()
            .map(|f| (*f, spec.devices.contains_key(f)))
            .collect();
        self.status.devices = spec
            .devices
            .values()
            .map(|d| DeviceStatus {
                family: d.family,
                interface: d.name.clone(),
                public_key: d.private_key.public_key(),
                listen_port: d.listen_port,
                mtu: d.mtu,
                peers: d
                    .peers
                    .iter()
                    .map(|(key, peer)| PeerStatus {
                        public_key: *key,
                        spec: peer.clone(),
                        programmed_at: self.programmed_at.get(key).copied(),
                    })
                    .collect(),
            })
            .collect();
        self.status.skipped = spec.skipped.iter().cloned().collect();
        let peers = spec
            .devices
            .iter()
            .map(|(f, d)| (*f, d.peers.len()))
            .collect();
        self.metrics.set_mesh(&peers, &self.status.skipped);
    }

    fn persist_created_interfaces(&self) {
        let path = self.settings.state_dir.join(INTERFACES_FILE);
        let result = serde_json::to_vec(&self.created_interfaces)
            .map_err(std::io::Error::other)
            .and_then(|body| std::fs::write(&path, body));
        if let Err(e) = result {
            warn!(error = %e, path = %path.display(), "could not record our interface names");
        }
    }

    fn write_status(&mut self) {
        self.status.updated_at = unix_now();
        if let Err(e) = self.status.write(&self.settings.state_dir) {
            debug!(error = %e, state_dir = %self.settings.state_dir.display(), "could not write status file");
        }
    }

    /// Runs until `shutdown` resolves. Nothing is applied before the datastore's initial sync.
    /// Leaving does not tear anything down: a restarted agent finds the dataplane in place.
    pub async fn run(
        mut self,
        mut snapshots: watch::Receiver<ClusterSnapshot>,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut resync = tokio::time::interval(self.settings.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = Duration::ZERO;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut kernel_events = self.kernel_events.take();
        // The earliest datastore change not yet reflected in an apply (convergence metric).
        let mut pending_change: Option<Instant> = None;
        let mut trigger: &'static str;
        self.metrics.set_backend(self.wg.backend());
        // The admin server reads WireGuard statistics and nftables counters at scrape time
        // through handles of their own, never through the loop.
        self.metrics.set_wireguard_source(self.wg.stats_reader());
        self.metrics
            .set_counter_source(self.filter.as_ref().and_then(|f| f.counter_reader()));
        loop {
            let kernel_event = async {
                match kernel_events.as_mut() {
                    Some(events) => events.recv().await,
                    None => std::future::pending().await,
                }
            };
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut shutdown => {
                    info!("shutting down; the dataplane stays in place");
                    return;
                }
                changed = snapshots.changed() => {
                    trigger = "datastore";
                    if changed.is_err() {
                        warn!("datastore cache closed; stopping the reconcile loop");
                        return;
                    }
                    pending_change.get_or_insert_with(Instant::now);
                }
                _ = resync.tick() => trigger = "resync",
                () = retry => trigger = "retry",
                event = kernel_event => {
                    trigger = "kernel";
                    if event.is_none() {
                        warn!("kernel notifications stopped; relying on the resync timer");
                        kernel_events = None;
                    }
                }
            }
            self.metrics.health.beat();
            let snapshot = snapshots.borrow_and_update().clone();
            if !snapshot.synced {
                debug!("waiting for the datastore's initial sync before the first apply");
                continue;
            }
            self.status.reconciles += 1;
            let span = info_span!("reconcile", run = self.status.reconciles, trigger);
            let started = Instant::now();
            let result = self.reconcile_once(&snapshot).instrument(span).await;
            self.metrics.reconciled(
                started.elapsed(),
                result.as_ref().err().map(ReconcileError::kind),
            );
            self.metrics.health.beat();
            match result {
                Ok(outcome) => {
                    backoff = Duration::ZERO;
                    retry_at = None;
                    self.status.last_error = None;
                    self.status.last_success_at = Some(unix_now());
                    self.metrics.applied(&outcome.ops);
                    let converged = pending_change.take().map(|at| at.elapsed());
                    if outcome.total_ops() > 0 {
                        if let Some(elapsed) = converged {
                            self.metrics.converged(elapsed);
                        }
                        debug!(
                            ops = outcome.total_ops(),
                            convergence_ms = converged.map(|c| c.as_millis() as u64),
                            "dataplane updated"
                        );
                    }
                    if !self.status.ready {
                        self.status.ready = true;
                        self.metrics.set_ready();
                        info!(run = self.status.reconciles, "initial sync applied; ready");
                    }
                }
                Err(e) => {
                    backoff =
                        (backoff * 2).clamp(Duration::from_millis(500), Duration::from_secs(30));
                    let message = error_chain(&e);
                    warn!(error = %message, transient = e.is_transient(), retry_in = ?backoff, "reconcile failed");
                    self.status.last_error = Some(message);
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                }
            }
            self.write_status();
            tokio::time::sleep(self.settings.min_interval).await;
            if snapshots.has_changed().unwrap_or(false) {
                // A change arrived while we were busy: it is pending from now at the latest.
                pending_change.get_or_insert_with(Instant::now);
            }
        }
    }
}

/// How long the loop may go without an iteration before `/healthz` fails: twice the resync
/// interval (the loop wakes at least that often) plus a margin.
pub fn stale_after(resync_interval: Duration) -> Duration {
    resync_interval * 2 + Duration::from_secs(30)
}

/// Counts the applied ops and logs each change once at info (a summary when there are many).
/// Called after a successful apply, so a failing change that is retried is not logged again
/// as done (the failure is logged with the error).
/// The problem to report for a skipped node, if it is one (a node without a key is normal:
/// WireGuard is off there or not started yet).
fn skipped_problem(skipped: &SkippedNode) -> Option<ObjectProblem> {
    let reason = match &skipped.reason {
        SkipReason::NoKey | SkipReason::NoUnderlayAddress => return None,
        SkipReason::MalformedKey { .. } => "MalformedWireguardKey",
        SkipReason::KeyCollision { .. } => "WireguardKeyCollision",
        SkipReason::MalformedUnderlayAddress { .. } => "MalformedNodeAddress",
        SkipReason::MalformedPodCidr { .. } => "MalformedPodCIDR",
        SkipReason::MalformedInterfaceAddress { .. } => "MalformedWireguardInterfaceAddress",
        SkipReason::Undecodable { .. } => "UndecodableNode",
    };
    Some(ObjectProblem {
        object: ProblemObject::Node(skipped.node.clone()),
        reason: reason.to_string(),
        message: format!("not peered for {}: {}", skipped.family, skipped.reason),
    })
}

fn config_problem(error: &ConfigFieldError) -> ObjectProblem {
    ObjectProblem {
        object: ProblemObject::FelixConfiguration(error.object.clone()),
        reason: "InvalidFelixConfiguration".to_string(),
        message: error.to_string(),
    }
}

/// The problem to report for a policy object that failed validation: `Invalid<Kind>` on it.
fn policy_problem(error: &wiremesh_core::policy::ValidationError) -> ObjectProblem {
    // Validation names namespaced objects `namespace/name`.
    let (namespace, name) = match error.name.split_once('/') {
        Some((ns, name)) if error.kind.namespaced() => (Some(ns.to_string()), name.to_string()),
        _ => (None, error.name.clone()),
    };
    ObjectProblem {
        object: ProblemObject::Policy {
            kind: error.kind,
            namespace,
            name,
        },
        reason: format!("Invalid{}", error.kind),
        message: error.to_string(),
    }
}

/// Counts the ops and logs each change once at info (a summary when there are many).
fn apply_logged<T: std::fmt::Display>(
    outcome: &mut Outcome,
    subsystem: &'static str,
    ops: &[T],
    kind: impl Fn(&T) -> &'static str,
) {
    const DETAIL_LIMIT: usize = 16;
    for (i, op) in ops.iter().enumerate() {
        *outcome.ops.entry((subsystem, kind(op))).or_default() += 1;
        if i < DETAIL_LIMIT {
            info!(subsystem, "{op}");
        }
    }
    if ops.len() > DETAIL_LIMIT {
        info!(
            subsystem,
            more = ops.len() - DETAIL_LIMIT,
            "further dataplane changes not shown"
        );
    }
}

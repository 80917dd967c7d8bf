//! The one level-triggered reconcile loop: datastore changes, kernel notifications, a slow
//! resync timer and retries only mark the state dirty; one task takes the latest snapshot and
//! runs one pass ([`Reconciler::reconcile_once`]): the effective configuration, then each
//! subsystem's desired -> observe -> plan -> apply ([`crate::mesh`], [`crate::policy`]), then
//! publishing this node's key. Problems are reported ([`crate::report`]) and the status file
//! and metrics written after every pass.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{Instrument as _, debug, info, info_span, warn};
use wiremesh_core::config::{EffectiveConfig, LastValid};
use wiremesh_core::error_chain;
use wiremesh_core::guard::{EncryptionGuard, joining_cidrs};
use wiremesh_core::mesh::{DataplaneSpec, LastGoodNodes};
use wiremesh_core::model::{ClusterSnapshot, Family};
use wiremesh_dataplane::link::LinkDataplane;
use wiremesh_dataplane::nft::FilterDataplane;
use wiremesh_dataplane::route::RoutingDataplane;
use wiremesh_dataplane::wireguard::WireguardDataplane;
use wiremesh_datastore::Datastore;

use crate::mesh::{MeshSubsystems, device_names};
use crate::metrics::Metrics;
use crate::outcome::{Outcome, ReconcileError, Stopwatch};
use crate::policy::PolicySubsystem;
use crate::report::Reports;
use crate::settings::AgentSettings;
use crate::status_file::{AgentStatus, unix_now};

/// Where the last valid FelixConfiguration values are kept.
const LAST_VALID_CONFIG_FILE: &str = "last-valid-config.json";

/// The last valid FelixConfiguration values the agent with `state_dir` keeps in force (none
/// when it has not recorded any).
pub fn load_last_valid(state_dir: &std::path::Path) -> LastValid {
    let path = state_dir.join(LAST_VALID_CONFIG_FILE);
    match std::fs::read(&path) {
        Err(_) => LastValid::default(),
        Ok(body) => serde_json::from_slice(&body).unwrap_or_else(|e| {
            warn!(error = %e, path = %path.display(), "could not read the last valid FelixConfiguration values; starting without them");
            LastValid::default()
        }),
    }
}

/// Written atomically (a temporary file, then a rename) so a crash leaves the old or the new.
fn save_last_valid(state_dir: &std::path::Path, last: &LastValid) {
    let path = state_dir.join(LAST_VALID_CONFIG_FILE);
    let tmp = state_dir.join(format!("{LAST_VALID_CONFIG_FILE}.tmp"));
    let result = serde_json::to_vec(last)
        .map_err(std::io::Error::other)
        .and_then(|body| std::fs::write(&tmp, body))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = result {
        warn!(error = %e, path = %path.display(), "could not record the last valid FelixConfiguration values");
    }
}

pub struct Reconciler<W, L, R> {
    settings: Arc<AgentSettings>,
    mesh: MeshSubsystems<W, L, R>,
    /// Host-endpoint policy in our nftables table; `None` = policy not enforced by this agent.
    policy: Option<PolicySubsystem>,
    datastore: Arc<dyn Datastore>,
    reports: Reports,
    /// Each FelixConfiguration field's last valid value (persisted in the state directory),
    /// which stays in force while the field is invalid, across restarts too.
    last_valid_config: LastValid,
    /// Each node's last version that decoded, used while its object does not.
    last_good_nodes: LastGoodNodes,
    /// Wakes the loop when the kernel reports a change to our links, routes or rules.
    kernel_events: Option<tokio::sync::mpsc::Receiver<()>>,
    /// Wakes the loop, with a fresh look at the table, when our nftables table changes.
    nftables_events: Option<tokio::sync::mpsc::Receiver<()>>,
    status: AgentStatus,
    metrics: Arc<Metrics>,
    /// What the last successful pass applied, for the periodic device check.
    last_applied: Option<DataplaneSpec>,
    /// The encryption guard of the last pass, held on a deliberate stop.
    last_guard: Option<EncryptionGuard>,
}

impl<W: WireguardDataplane, L: LinkDataplane, R: RoutingDataplane> Reconciler<W, L, R> {
    pub fn new(
        settings: Arc<AgentSettings>,
        wg: W,
        links: L,
        routing: R,
        datastore: Arc<dyn Datastore>,
    ) -> Self {
        let last_valid_config = load_last_valid(&settings.state_dir);
        let status = AgentStatus {
            node: settings.node_name.clone(),
            backend: Some(wg.backend()),
            resync_seconds: settings.resync_interval.as_secs(),
            ..Default::default()
        };
        Reconciler {
            mesh: MeshSubsystems::new(wg, links, routing, settings.state_dir.clone()),
            metrics: Arc::new(Metrics::new(settings.stale_after())),
            settings,
            policy: None,
            datastore,
            reports: Reports::default(),
            last_valid_config,
            last_good_nodes: LastGoodNodes::default(),
            kernel_events: None,
            nftables_events: None,
            last_applied: None,
            last_guard: None,
            status,
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
        self.policy = Some(PolicySubsystem::new(filter));
        self
    }

    /// Whether policy also applies to this node's pods (default: yes). Call after
    /// [`Reconciler::with_filter`].
    pub fn with_pod_policy(mut self, on: bool) -> Self {
        if let Some(policy) = self.policy.as_mut() {
            policy.pods = on;
        }
        self
    }

    /// Also run when the kernel reports a change (see `wiremesh_dataplane::events`).
    pub fn with_kernel_events(mut self, events: tokio::sync::mpsc::Receiver<()>) -> Self {
        self.kernel_events = Some(events);
        self
    }

    /// Also run, observing the table afresh, when the kernel reports a change to our nftables
    /// table (see `wiremesh_dataplane::events::watch_nftables`).
    pub fn with_nftables_events(mut self, events: tokio::sync::mpsc::Receiver<()>) -> Self {
        self.nftables_events = Some(events);
        self
    }

    pub fn status(&self) -> &AgentStatus {
        &self.status
    }

    /// One pass: configuration -> mesh (desired, observe, plan, apply) -> publish -> policy.
    pub async fn reconcile_once(
        &mut self,
        snapshot: &ClusterSnapshot,
    ) -> Result<Outcome, ReconcileError> {
        let mut outcome = Outcome::default();
        let mut stopwatch = Stopwatch::start();
        let settings = Arc::clone(&self.settings);
        let node = settings.node_name.as_str();
        let before = self.last_valid_config.clone();
        let config = EffectiveConfig::for_node_remembering(
            node,
            &snapshot.felix_configurations,
            &mut self.last_valid_config,
        );
        if self.last_valid_config != before {
            save_last_valid(&settings.state_dir, &self.last_valid_config);
        }
        self.status.config_errors = self.reports.config(&config.errors);
        self.reports.unknown_fields(&config.unknown_fields);
        let host_mtu = self.mesh.host_mtu().await?;
        stopwatch.lap(&mut outcome, "link");
        let (nodes, stale) = self.last_good_nodes.resolve(&snapshot.nodes);
        self.status.stale_nodes = self.reports.stale_nodes(&stale);
        let spec = self
            .mesh
            .desired(&settings, config.wireguard.clone(), &nodes, host_mtu)
            .await?;
        self.reports.skipped(&spec.skipped);
        stopwatch.lap(&mut outcome, "desired");
        report(&mut self.reports, self.datastore.as_ref()).await;

        self.mesh
            .converge(&spec, &mut outcome, &mut stopwatch)
            .await?;
        // The WireGuard series are read at scrape time; the loop only names the devices.
        self.metrics.set_wireguard_devices(&device_names(&spec));

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
        stopwatch.lap(&mut outcome, "publish");

        // Last, so a policy failure never holds back the mesh.
        if let Some(policy) = self.policy.as_mut() {
            let resources = policy.validate(&snapshot.policy);
            self.status.policy_errors = self.reports.policy(&resources.errors);
            report(&mut self.reports, self.datastore.as_ref()).await;
            let mut ports: Vec<u16> = spec.devices.values().map(|d| d.listen_port).collect();
            ports.sort_unstable();
            ports.dedup();
            let joining = joining_cidrs(&spec, &nodes, &snapshot.felix_configurations);
            let guard = EncryptionGuard::for_mesh(&spec, config.wireguard.strict, &joining);
            let table = policy
                .converge(
                    node,
                    &resources,
                    config.policy_settings(ports),
                    &guard,
                    &mut outcome,
                )
                .await?;
            // The counters are read at scrape time; the loop only names them.
            self.metrics.set_policy_counters(&table.counters);
            self.last_guard = Some(guard);
            stopwatch.lap(&mut outcome, "policy");
        }
        self.record_status(&spec);
        self.last_applied = Some(spec);
        Ok(outcome)
    }

    fn record_status(&mut self, spec: &DataplaneSpec) {
        let mesh = &self.mesh;
        self.status.record_mesh(spec, |key| mesh.programmed_at(key));
        let peers: BTreeMap<Family, usize> = spec
            .devices
            .iter()
            .map(|(f, d)| (*f, d.peers.len()))
            .collect();
        self.metrics.set_mesh(&peers, &self.status.skipped);
        self.metrics.set_local_skipped(
            self.status
                .skipped
                .iter()
                .any(|s| s.node == self.settings.node_name),
        );
    }

    /// A deliberate stop (SIGTERM: a rolling update, a restart): pod traffic to encrypting nodes
    /// that would leave in clear is dropped for the shutdown hold, or until the next agent's
    /// first pass (a userspace WireGuard may die with this process's container).
    async fn hold_on_shutdown(&mut self) {
        let (Some(policy), Some(guard)) = (self.policy.as_mut(), self.last_guard.as_ref()) else {
            return;
        };
        let hold = self.settings.shutdown_hold;
        let Some(script) = wiremesh_core::guard::hold_script(guard, hold) else {
            return;
        };
        match policy.apply_script(&script).await {
            Ok(()) => info!(
                hold = ?hold,
                "until the next agent is up (at most the hold), pod traffic to encrypting nodes is dropped rather than sent in clear"
            ),
            Err(e) => {
                warn!(error = %error_chain(&e), "could not hold pod traffic for the shutdown")
            }
        }
    }

    /// Records how current the datastore view is (metrics, `/readyz`, status); the status file
    /// is rewritten when that changes, so `wiremesh status` shows an outage within a second.
    fn observe_datastore(&mut self) {
        let state = self.datastore.sync_health().state();
        self.metrics.set_datastore(&state);
        let known = self.status.datastore.as_ref();
        let changed = known.map(|k| (k.unreachable_since, &k.error))
            != Some((state.unreachable_since, &state.error));
        self.status.datastore = Some(state);
        if changed {
            self.write_status();
        }
    }

    /// Whether the WireGuard devices differ from what the last pass applied (a `wg set` behind
    /// our back). A failed check counts as drift: the full pass then reports the failure.
    async fn devices_drifted(&mut self) -> bool {
        let Some(spec) = self.last_applied.as_ref() else {
            return false;
        };
        if self.mesh.rotation_pending() {
            return true;
        }
        match self.mesh.wireguard_drift(spec).await {
            Ok(0) if self.mesh.confirmations_changed() => {
                info!("handshakes changed which peers carry host traffic; re-planning routes");
                true
            }
            Ok(0) => false,
            Ok(ops) => {
                info!(
                    ops,
                    "WireGuard device changed behind the agent's back; repairing"
                );
                true
            }
            Err(e) => {
                debug!(error = %error_chain(&e), "checking the WireGuard devices failed");
                true
            }
        }
    }

    fn write_status(&mut self) {
        self.status.updated_at = unix_now();
        if let Err(e) = self.status.write(&self.settings.state_dir) {
            debug!(error = %e, state_dir = %self.settings.state_dir.display(), "could not write status file");
        }
    }

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
        let mut nftables_events = self.nftables_events.take();
        let mut device_check = tokio::time::interval(self.settings.device_check_interval);
        device_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The earliest datastore change not yet reflected in an apply (convergence metric).
        let mut pending_change: Option<Instant> = None;
        let mut trigger: &'static str;
        self.metrics.set_backend(self.mesh.backend());
        // The admin server reads WireGuard statistics and nftables counters at scrape time
        // through handles of their own, never through the loop.
        self.metrics.set_wireguard_source(self.mesh.stats_reader());
        self.metrics
            .set_counter_source(self.policy.as_ref().and_then(|p| p.counter_reader()));
        loop {
            let kernel_event = async {
                match kernel_events.as_mut() {
                    Some(events) => events.recv().await,
                    None => std::future::pending().await,
                }
            };
            let nftables_event = async {
                match nftables_events.as_mut() {
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
                    self.hold_on_shutdown().await;
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
                _ = device_check.tick() => {
                    trigger = "device-check";
                    self.observe_datastore();
                    if !self.devices_drifted().await {
                        continue;
                    }
                }
                () = retry => trigger = "retry",
                event = nftables_event => {
                    trigger = "nftables";
                    if event.is_none() {
                        warn!("nftables notifications stopped; relying on the resync timer");
                        nftables_events = None;
                    }
                    // Our own applies notify too; the fresh look then finds nothing to do.
                    if let Some(policy) = self.policy.as_mut() {
                        policy.forget_observation();
                    }
                }
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
            self.observe_datastore();
            self.write_status();
            tokio::time::sleep(self.settings.min_interval).await;
            if snapshots.has_changed().unwrap_or(false) {
                // A change arrived while we were busy: it is pending from now at the latest.
                pending_change.get_or_insert_with(Instant::now);
            }
        }
    }
}

/// Hands the problems seen since the last report to the datastore (Events).
async fn report(reports: &mut Reports, datastore: &dyn Datastore) {
    let problems = reports.take();
    if !problems.is_empty() {
        datastore.report(&problems).await;
    }
}

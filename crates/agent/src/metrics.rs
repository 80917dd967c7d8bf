//! The agent's Prometheus metrics and health state, in one registry created by the agent and
//! handed to the reconciler and the admin server (no globals).
//!
//! Two groups (every name is documented in `docs/metrics.md`; a test keeps the two in step):
//! - Felix's WireGuard series with Felix's names and labels (`wireguard_meta`,
//!   `wireguard_bytes_rcvd`, `wireguard_bytes_sent`, `wireguard_latest_handshake_seconds`), so
//!   existing dashboards work;
//! - our own `wiremesh_*` series: reconcile runs, failures, durations, convergence time,
//!   dataplane operations, peers, skipped nodes, backend, and per-policy-rule packet and byte
//!   counters read from the nftables table.
//!
//! Scrape-time values: the WireGuard devices and the nftables counters are read by
//! [`Metrics::refresh`], which the `/metrics` handler calls before encoding, through read-only
//! sources ([`WireguardStats`], [`CounterReader`]) that the reconciler installs; a read is
//! reused for [`SCRAPE_CACHE`] (Felix caches its WireGuard statistics for 1 s), and concurrent
//! scrapes share one read. The reconcile loop only tells which devices and counters exist.
//!
//! OpenMetrics requires a counter's sample to end in `_total`; Felix's byte counters do not, so
//! they are exposed untyped (`# TYPE wireguard_bytes_rcvd unknown`) to keep the exact series
//! names that Felix dashboards query.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use wiremesh_core::dataplane::filter::CounterValue;
use wiremesh_core::dataplane::wireguard::DeviceState;
use wiremesh_core::error_chain;
use wiremesh_core::guard::{BLOCKED_COUNTER, LEAK_COUNTER};
use wiremesh_core::mesh::SkippedNode;
use wiremesh_core::model::Family as IpFamily;
use wiremesh_core::policy::render::CounterLabels;
use wiremesh_dataplane::nft::CounterReader;
use wiremesh_dataplane::wireguard::WireguardStats;
use wiremesh_dataplane::{Backend, DataplaneError};
use wiremesh_datastore::SyncState;

/// How long values read at scrape time are served again before the next read.
pub const SCRAPE_CACHE: Duration = Duration::from_secs(1);
/// A scrape-time read that takes longer is abandoned; the previous values are served.
const SCRAPE_READ_TIMEOUT: Duration = Duration::from_secs(1);

type Labels1 = [(&'static str, String); 1];
type Labels2 = [(&'static str, String); 2];

/// Content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Buckets (seconds) of the reconcile-duration histogram: 1 ms to ~33 s.
fn duration_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 16)
}

/// Buckets (seconds) of the convergence histogram: 1 ms to ~8.7 min.
fn convergence_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 20)
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconcile_runs: Counter,
    reconcile_failures: Family<Labels1, Counter>,
    reconcile_duration: Histogram,
    convergence: Histogram,
    dataplane_ops: Family<Labels2, Counter>,
    peers: Family<Labels1, Gauge>,
    skipped: Family<Labels1, Gauge>,
    backend: Family<Labels1, Gauge>,
    ready: Gauge,
    datastore_up: Gauge,
    datastore_last_sync: Gauge,
    local_skipped: Gauge,
    wireguard: Arc<WireguardCollector>,
    rule_counters: Arc<RuleCounterCollector>,
    scrape: Scrape,
    /// Liveness and readiness, served on the health port.
    pub health: Health,
}

/// Where scrape-time values come from, and when they were read.
#[derive(Default)]
struct Scrape {
    sources: Mutex<Sources>,
    /// Held during a refresh, so concurrent scrapes share one read.
    refresh: tokio::sync::Mutex<Refreshed>,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrape").finish_non_exhaustive()
    }
}

#[derive(Default, Clone)]
struct Sources {
    wireguard: Option<Arc<dyn WireguardStats>>,
    counters: Option<Arc<dyn CounterReader>>,
    /// The WireGuard devices the agent manages.
    devices: BTreeSet<String>,
}

#[derive(Default)]
struct Refreshed {
    wireguard: ReadState,
    counters: ReadState,
}

#[derive(Default)]
struct ReadState {
    at: Option<Instant>,
    failing: bool,
}

impl ReadState {
    fn due(&self) -> bool {
        self.at.is_none_or(|at| at.elapsed() >= SCRAPE_CACHE)
    }

    /// Logs a failure when it starts and the recovery when it ends, not every scrape.
    fn outcome(&mut self, what: &str, result: Result<(), String>) {
        self.at = Some(Instant::now());
        match result {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!(what, "reading for /metrics works again");
            }
            Ok(()) => {}
            Err(e) => {
                if !self.failing {
                    tracing::warn!(what, error = %e, "reading for /metrics failed; serving the last values");
                } else {
                    tracing::debug!(what, error = %e, "reading for /metrics failed");
                }
                self.failing = true;
            }
        }
    }
}

async fn read_with_timeout<T>(
    read: impl Future<Output = Result<T, DataplaneError>>,
) -> Result<T, String> {
    match tokio::time::timeout(SCRAPE_READ_TIMEOUT, read).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(error_chain(&e)),
        Err(_) => Err(format!(
            "no answer within {}s",
            SCRAPE_READ_TIMEOUT.as_secs()
        )),
    }
}

impl Metrics {
    /// A registry with every metric registered. `stale_after` is how long the reconcile loop may
    /// go without an iteration before `/healthz` fails.
    pub fn new(stale_after: Duration) -> Self {
        let mut registry = Registry::default();
        let reconcile_runs = Counter::default();
        registry.register(
            "wiremesh_reconcile_runs",
            "Reconcile runs (successful or not)",
            reconcile_runs.clone(),
        );
        let reconcile_failures = Family::<Labels1, Counter>::default();
        registry.register(
            "wiremesh_reconcile_failures",
            "Failed reconcile runs by error kind",
            reconcile_failures.clone(),
        );
        let reconcile_duration = Histogram::new(duration_buckets());
        registry.register(
            "wiremesh_reconcile_duration_seconds",
            "Duration of one reconcile run (desired, observe, plan, apply, publish)",
            reconcile_duration.clone(),
        );
        let convergence = Histogram::new(convergence_buckets());
        registry.register(
            "wiremesh_convergence_seconds",
            "Time from a datastore change to the dataplane change it caused being applied",
            convergence.clone(),
        );
        let dataplane_ops = Family::<Labels2, Counter>::default();
        registry.register(
            "wiremesh_dataplane_operations",
            "Dataplane operations applied, by subsystem and kind",
            dataplane_ops.clone(),
        );
        let peers = Family::<Labels1, Gauge>::default();
        registry.register(
            "wiremesh_peers",
            "WireGuard peers this node programs, by IP family",
            peers.clone(),
        );
        let skipped = Family::<Labels1, Gauge>::default();
        registry.register(
            "wiremesh_skipped_nodes",
            "Nodes not peered (one per node and family), by reason",
            skipped.clone(),
        );
        let backend = Family::<Labels1, Gauge>::default();
        registry.register(
            "wiremesh_backend_info",
            "The WireGuard implementation in use (value 1)",
            backend.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "wiremesh_ready",
            "1 once the initial datastore sync and the first successful apply are done",
            ready.clone(),
        );
        let datastore_up = Gauge::default();
        registry.register(
            "wiremesh_datastore_up",
            "1 while the datastore is reachable and watched, 0 while the agent runs on the last synced state",
            datastore_up.clone(),
        );
        let datastore_last_sync = Gauge::default();
        registry.register(
            "wiremesh_datastore_last_sync_timestamp_seconds",
            "Unix time the agent's view of the datastore was last known current (now while it is up)",
            datastore_last_sync.clone(),
        );
        let local_skipped = Gauge::default();
        registry.register(
            "wiremesh_local_node_skipped",
            "1 while every node skips this one (a key collision or a pod-CIDR conflict): it peers none and its pod traffic is in clear",
            local_skipped.clone(),
        );
        let wireguard = Arc::new(WireguardCollector::default());
        registry.register_collector(Box::new(Arc::clone(&wireguard)));
        let rule_counters = Arc::new(RuleCounterCollector::default());
        registry.register_collector(Box::new(Arc::clone(&rule_counters)));
        Metrics {
            registry,
            reconcile_runs,
            reconcile_failures,
            reconcile_duration,
            convergence,
            dataplane_ops,
            peers,
            skipped,
            backend,
            ready,
            datastore_up,
            datastore_last_sync,
            local_skipped,
            wireguard,
            rule_counters,
            scrape: Scrape::default(),
            health: Health::new(stale_after),
        }
    }

    /// Where the WireGuard series are read from at scrape time (`None`: not at all).
    pub fn set_wireguard_source(&self, source: Option<Arc<dyn WireguardStats>>) {
        if let Ok(mut s) = self.scrape.sources.lock() {
            s.wireguard = source;
        }
    }

    /// Where the policy rule counters are read from at scrape time (`None`: not at all).
    pub fn set_counter_source(&self, source: Option<Arc<dyn CounterReader>>) {
        if let Ok(mut s) = self.scrape.sources.lock() {
            s.counters = source;
        }
    }

    /// The WireGuard devices the agent manages (the reconcile loop sets this every run).
    pub fn set_wireguard_devices(&self, names: &BTreeSet<String>) {
        if let Ok(mut s) = self.scrape.sources.lock()
            && s.devices != *names
        {
            s.devices = names.clone();
        }
    }

    /// The counters of the table as last applied, with the labels of their series (empty: no
    /// table). Counters that are not listed here are not exported.
    pub fn set_policy_counters(&self, counters: &BTreeMap<String, CounterLabels>) {
        self.rule_counters.set_labels(counters);
    }

    /// Reads the scrape-time values whose last read is older than [`SCRAPE_CACHE`]. Called by
    /// the `/metrics` handler before [`Metrics::encode`]; failures are logged (once while they
    /// last) and the previous values are served.
    pub async fn refresh(&self) {
        let mut state = self.scrape.refresh.lock().await;
        let sources = self
            .scrape
            .sources
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        if let Some(source) = &sources.wireguard
            && state.wireguard.due()
        {
            let result = read_with_timeout(source.read_devices(&sources.devices))
                .await
                .map(|devices| self.observed_wireguard(&devices));
            state.wireguard.outcome("WireGuard devices", result);
        }
        if let Some(source) = &sources.counters
            && state.counters.due()
        {
            let result = read_with_timeout(source.read_counters())
                .await
                .map(|values| self.rule_counters.set_values(values));
            state.counters.outcome("nftables counters", result);
        }
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    pub fn set_backend(&self, backend: Backend) {
        self.backend.clear();
        self.backend
            .get_or_create(&[("backend", backend.to_string())])
            .set(1);
    }

    /// One reconcile run ended after `elapsed`; `error_kind` names the failure, if any.
    pub fn reconciled(&self, elapsed: Duration, error_kind: Option<&'static str>) {
        self.health.run_ended(error_kind.is_none());
        self.reconcile_runs.inc();
        self.reconcile_duration.observe(elapsed.as_secs_f64());
        if let Some(kind) = error_kind {
            self.reconcile_failures
                .get_or_create(&[("kind", kind.to_string())])
                .inc();
        }
    }

    pub fn converged(&self, elapsed: Duration) {
        self.convergence.observe(elapsed.as_secs_f64());
    }

    /// Operation counts of one run, keyed by (subsystem, kind).
    pub fn applied(&self, ops: &BTreeMap<(&'static str, &'static str), usize>) {
        for ((subsystem, kind), n) in ops {
            self.dataplane_ops
                .get_or_create(&[
                    ("subsystem", subsystem.to_string()),
                    ("kind", kind.to_string()),
                ])
                .inc_by(*n as u64);
        }
    }

    /// Whether every node skips this one (see `mesh::validate_nodes`).
    pub fn set_local_skipped(&self, skipped: bool) {
        self.local_skipped.set(i64::from(skipped));
    }

    /// Peers per family and skipped nodes per reason, as of the last desired state.
    pub fn set_mesh(&self, peers: &BTreeMap<IpFamily, usize>, skipped: &[SkippedNode]) {
        self.peers.clear();
        for (family, n) in peers {
            self.peers
                .get_or_create(&[("family", family_label(*family).to_string())])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        let mut by_reason: BTreeMap<&'static str, i64> = BTreeMap::new();
        for s in skipped {
            *by_reason.entry(s.reason.code()).or_default() += 1;
        }
        self.skipped.clear();
        for (reason, n) in by_reason {
            self.skipped
                .get_or_create(&[("reason", reason.to_string())])
                .set(n);
        }
    }

    /// The devices as last read; Felix's WireGuard series are encoded from this.
    fn observed_wireguard(&self, devices: &BTreeMap<String, DeviceState>) {
        self.wireguard.set(devices.values().cloned().collect());
    }

    /// How current the datastore view is: the two gauges, and `/readyz`.
    pub fn set_datastore(&self, state: &SyncState) {
        self.datastore_up.set(i64::from(state.current()));
        if let Some(at) = state.last_sync {
            self.datastore_last_sync
                .set(i64::try_from(at).unwrap_or(i64::MAX));
        }
        if let Ok(mut problem) = self.health.datastore_problem.lock() {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            *problem = state.problem(now);
        }
    }

    pub fn set_ready(&self) {
        self.health.ready.store(true, Ordering::Relaxed);
        self.ready.set(1);
    }
}

/// `v4` / `v6`, the label value of an IP family.
fn family_label(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "v4",
        IpFamily::V6 => "v6",
    }
}

/// Liveness (the loop iterates) and readiness (synced and applied once).
#[derive(Debug)]
pub struct Health {
    heartbeat: Mutex<Instant>,
    stale_after: Duration,
    ready: AtomicBool,
    /// Why the datastore view is not current, if it is not.
    datastore_problem: Mutex<Option<String>>,
    /// Since when every reconcile run has failed (a dataplane that cannot be repaired, such as
    /// a wireguard-go that cannot be restarted).
    failing_since: Mutex<Option<Instant>>,
}

impl Health {
    fn new(stale_after: Duration) -> Self {
        Health {
            heartbeat: Mutex::new(Instant::now()),
            stale_after,
            ready: AtomicBool::new(false),
            datastore_problem: Mutex::new(None),
            failing_since: Mutex::new(None),
        }
    }

    /// The reconcile loop calls this on every iteration.
    pub fn beat(&self) {
        if let Ok(mut h) = self.heartbeat.lock() {
            *h = Instant::now();
        }
    }

    /// `Err(reason)` when the loop has not iterated for longer than allowed.
    pub fn live(&self) -> Result<(), String> {
        let age = self
            .heartbeat
            .lock()
            .map(|h| h.elapsed())
            .map_err(|_| "health state poisoned".to_string())?;
        if age > self.stale_after {
            return Err(format!(
                "the reconcile loop has not run for {}s (limit {}s)",
                age.as_secs(),
                self.stale_after.as_secs()
            ));
        }
        let failing = self
            .failing_since
            .lock()
            .ok()
            .and_then(|f| f.map(|since| since.elapsed()));
        if let Some(failing) = failing.filter(|f| *f > self.stale_after) {
            return Err(format!(
                "every reconcile run has failed for {}s (limit {}s); the agent log and `wiremesh status` say why",
                failing.as_secs(),
                self.stale_after.as_secs()
            ));
        }
        Ok(())
    }

    /// A reconcile run ended, successfully or not.
    fn run_ended(&self, succeeded: bool) {
        if let Ok(mut since) = self.failing_since.lock() {
            match succeeded {
                true => *since = None,
                false => {
                    since.get_or_insert_with(Instant::now);
                }
            }
        }
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// `/readyz`: synced and applied once, and the datastore view is current.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.ready() {
            return Err(
                "waiting for the initial datastore sync and the first successful apply".into(),
            );
        }
        match self.datastore_problem.lock().ok().and_then(|p| p.clone()) {
            Some(problem) => Err(problem),
            None => Ok(()),
        }
    }
}

/// Felix's WireGuard series, encoded on scrape from the last observation.
#[derive(Debug, Default)]
struct WireguardCollector {
    devices: Mutex<Vec<DeviceState>>,
}

impl WireguardCollector {
    fn set(&self, devices: Vec<DeviceState>) {
        if let Ok(mut d) = self.devices.lock() {
            *d = devices;
        }
    }
}

/// `wiremesh_policy_rule_packets_total` / `_bytes_total`: the table's named counters as last
/// read, for the counters of the table as last applied.
#[derive(Debug, Default)]
struct RuleCounterCollector {
    state: Mutex<RuleCounters>,
}

#[derive(Debug, Default)]
struct RuleCounters {
    labels: BTreeMap<String, CounterLabels>,
    values: BTreeMap<String, CounterValue>,
}

impl RuleCounterCollector {
    fn set_labels(&self, labels: &BTreeMap<String, CounterLabels>) {
        if let Ok(mut s) = self.state.lock()
            && s.labels != *labels
        {
            s.labels = labels.clone();
        }
    }

    fn set_values(&self, values: BTreeMap<String, CounterValue>) {
        if let Ok(mut s) = self.state.lock() {
            s.values = values;
        }
    }
}

impl Collector for RuleCounterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(state) = self.state.lock() else {
            return Ok(());
        };
        type Series = (&'static str, &'static str, fn(&CounterValue) -> u64);
        let series: [Series; 2] = [
            (
                "wiremesh_policy_rule_packets",
                "Packets that matched a policy rule, a tier's end-of-tier drop or the host endpoints' default deny (nftables counter; reset when the table is replaced)",
                |v| v.packets,
            ),
            (
                "wiremesh_policy_rule_bytes",
                "Bytes of the packets counted by wiremesh_policy_rule_packets",
                |v| v.bytes,
            ),
        ];
        for (name, help, value) in series {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (counter, l) in &state.labels {
                let Some(v) = state.values.get(counter) else {
                    continue;
                };
                let labels = [
                    ("tier", l.tier.as_str()),
                    ("policy", l.policy.as_str()),
                    ("direction", l.direction),
                    ("rule", l.rule.as_str()),
                    ("action", l.action),
                ];
                ConstCounter::new(value(v)).encode(family.encode_family(&labels)?)?;
            }
        }
        // The encryption guard's two counters (present while this node encrypts).
        let guard: [(&str, &str, &str); 2] = [
            (
                "wiremesh_plaintext_leak_packets",
                "Pod packets to encrypting nodes that left outside the WireGuard device, in clear (0 in a healthy mesh; strict mode drops them instead)",
                LEAK_COUNTER,
            ),
            (
                "wiremesh_plaintext_blocked_packets",
                "Pod packets to encrypting nodes that strict mode dropped instead of sending them in clear",
                BLOCKED_COUNTER,
            ),
        ];
        for (name, help, counter) in guard {
            // 0 without the guard (this node does not encrypt): nothing leaked.
            let packets = state.values.get(counter).map_or(0, |v| v.packets);
            let metric = ConstCounter::new(packets);
            let encoder = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            metric.encode(encoder)?;
        }
        Ok(())
    }
}

/// The OS hostname (Felix's `hostname` label).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Collector for WireguardCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let devices = self.devices.lock().map(|d| d.clone()).unwrap_or_default();
        let host = hostname();
        let key_of = |d: &DeviceState| d.public_key.map(|k| k.to_string()).unwrap_or_default();

        let mut meta = encoder.encode_descriptor(
            "wireguard_meta",
            "WireGuard interface and runtime metadata",
            None,
            MetricType::Gauge,
        )?;
        for d in &devices {
            let labels = [
                ("hostname", host.clone()),
                ("public_key", key_of(d)),
                ("iface", d.name.clone()),
                ("listen_port", d.listen_port.to_string()),
            ];
            ConstGauge::new(1i64).encode(meta.encode_family(&labels)?)?;
        }

        let peer_labels = |d: &DeviceState| {
            d.peers
                .iter()
                .map(|(key, p)| {
                    let labels = [
                        ("hostname", host.clone()),
                        ("public_key", key_of(d)),
                        ("peer_key", key.to_string()),
                        (
                            "peer_endpoint",
                            p.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                        ),
                    ];
                    (labels, p.clone())
                })
                .collect::<Vec<_>>()
        };
        let series: [(&str, &str, MetricType); 3] = [
            (
                "wireguard_bytes_rcvd",
                "Bytes received from the peer (a counter, untyped to keep Felix's name)",
                MetricType::Unknown,
            ),
            (
                "wireguard_bytes_sent",
                "Bytes sent to the peer (a counter, untyped to keep Felix's name)",
                MetricType::Unknown,
            ),
            (
                "wireguard_latest_handshake_seconds",
                "Unix time of the latest handshake with the peer (0: none yet)",
                MetricType::Gauge,
            ),
        ];
        for (name, help, kind) in series {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for d in &devices {
                for (labels, p) in peer_labels(d) {
                    let value = match name {
                        "wireguard_bytes_rcvd" => i64::try_from(p.rx_bytes).unwrap_or(i64::MAX),
                        "wireguard_bytes_sent" => i64::try_from(p.tx_bytes).unwrap_or(i64::MAX),
                        _ => p.last_handshake.map(unix_seconds).unwrap_or(0),
                    };
                    let mut sample = family.encode_family(&labels)?;
                    sample.encode_gauge(&value)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wiremesh_core::dataplane::wireguard::PeerState;
    use wiremesh_core::model::WgKey;

    fn device() -> DeviceState {
        let mut peers = BTreeMap::new();
        peers.insert(
            WgKey([2; 32]),
            PeerState {
                endpoint: Some("10.0.0.2:51820".parse().expect("addr")),
                allowed_ips: Default::default(),
                keepalive: 0,
                last_handshake: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
                rx_bytes: 1234,
                tx_bytes: 5678,
            },
        );
        DeviceState {
            name: "wireguard.cali".into(),
            public_key: Some(WgKey([1; 32])),
            listen_port: 51820,
            fwmark: 0x200000,
            peers,
        }
    }

    #[test]
    fn felix_series_carry_felix_labels() {
        let m = Metrics::new(Duration::from_secs(60));
        let d = device();
        m.observed_wireguard(&[(d.name.clone(), d)].into_iter().collect());
        let text = m.encode().expect("encode");
        let me = WgKey([1; 32]).to_string();
        let peer = WgKey([2; 32]).to_string();
        let host = hostname();
        assert!(
            text.contains(&format!(
                "wireguard_meta{{hostname=\"{host}\",public_key=\"{me}\",iface=\"wireguard.cali\",listen_port=\"51820\"}} 1\n"
            )),
            "{text}"
        );
        let labels = format!(
            "{{hostname=\"{host}\",public_key=\"{me}\",peer_key=\"{peer}\",peer_endpoint=\"10.0.0.2:51820\"}}"
        );
        assert!(
            text.contains(&format!("wireguard_bytes_rcvd{labels} 1234\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("wireguard_bytes_sent{labels} 5678\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "wireguard_latest_handshake_seconds{labels} 1700000000\n"
            )),
            "{text}"
        );
        assert!(!text.contains("wireguard_bytes_rcvd_total"), "{text}");
    }

    #[test]
    fn wiremesh_series() {
        let m = Metrics::new(Duration::from_secs(60));
        m.set_backend(Backend::Userspace);
        m.reconciled(Duration::from_millis(3), None);
        m.reconciled(Duration::from_millis(3), Some("dataplane_apply"));
        m.converged(Duration::from_millis(120));
        let mut ops = BTreeMap::new();
        ops.insert(("wireguard", "set_peer"), 2);
        m.applied(&ops);
        m.set_mesh(&[(IpFamily::V4, 2)].into_iter().collect(), &[]);
        let text = m.encode().expect("encode");
        for line in [
            "wiremesh_reconcile_runs_total 2\n",
            "wiremesh_reconcile_failures_total{kind=\"dataplane_apply\"} 1\n",
            "wiremesh_reconcile_duration_seconds_count 2\n",
            "wiremesh_convergence_seconds_count 1\n",
            "wiremesh_dataplane_operations_total{subsystem=\"wireguard\",kind=\"set_peer\"} 2\n",
            "wiremesh_peers{family=\"v4\"} 2\n",
            "wiremesh_backend_info{backend=\"userspace\"} 1\n",
            "wiremesh_ready 0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    fn labels(tier: &str, policy: &str, rule: &str, action: &'static str) -> CounterLabels {
        CounterLabels {
            tier: tier.into(),
            policy: policy.into(),
            direction: "ingress",
            rule: rule.into(),
            action,
        }
    }

    /// Counts its reads; serves fixed values.
    #[derive(Default)]
    struct Source {
        reads: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl CounterReader for Source {
        async fn read_counters(&self) -> Result<BTreeMap<String, CounterValue>, DataplaneError> {
            let n = self.reads.fetch_add(1, Ordering::SeqCst) as u64;
            Ok(BTreeMap::from([
                (
                    "gnp/allow-ssh/in0".to_string(),
                    CounterValue {
                        packets: 10 + n,
                        bytes: 600,
                    },
                ),
                (
                    "tier/default/in".to_string(),
                    CounterValue {
                        packets: 3,
                        bytes: 180,
                    },
                ),
                ("not/in/the/spec".to_string(), CounterValue::default()),
            ]))
        }
    }

    #[async_trait::async_trait]
    impl WireguardStats for Source {
        async fn read_device(&self, name: &str) -> Result<Option<DeviceState>, DataplaneError> {
            Ok(Some(device()).filter(|d| d.name == name))
        }

        /// Counts whole reads: the scrape must read the devices once, not once per series.
        async fn read_devices(
            &self,
            names: &BTreeSet<String>,
        ) -> Result<BTreeMap<String, DeviceState>, DataplaneError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let d = device();
            Ok(names
                .contains(&d.name)
                .then(|| (d.name.clone(), d))
                .into_iter()
                .collect())
        }
    }

    #[tokio::test]
    async fn rule_counters_are_read_at_scrape_time_with_exact_labels() {
        let m = Metrics::new(Duration::from_secs(60));
        let source = Arc::new(Source::default());
        m.set_counter_source(Some(Arc::clone(&source) as Arc<dyn CounterReader>));
        m.set_policy_counters(&BTreeMap::from([
            (
                "gnp/allow-ssh/in0".to_string(),
                labels("default", "gnp/allow-ssh", "0", "allow"),
            ),
            (
                "tier/default/in".to_string(),
                labels("default", "", "end-of-tier", "deny"),
            ),
            (
                "np/ns1/unread/in0".to_string(),
                labels("default", "np/ns1/unread", "0", "deny"),
            ),
        ]));
        assert!(
            !m.encode()
                .expect("encode")
                .contains("wiremesh_policy_rule_packets_total{"),
            "nothing is read before a scrape"
        );
        m.refresh().await;
        let text = m.encode().expect("encode");
        for line in [
            "# TYPE wiremesh_policy_rule_packets counter\n",
            "wiremesh_policy_rule_packets_total{tier=\"default\",policy=\"gnp/allow-ssh\",direction=\"ingress\",rule=\"0\",action=\"allow\"} 10\n",
            "wiremesh_policy_rule_bytes_total{tier=\"default\",policy=\"gnp/allow-ssh\",direction=\"ingress\",rule=\"0\",action=\"allow\"} 600\n",
            "wiremesh_policy_rule_packets_total{tier=\"default\",policy=\"\",direction=\"ingress\",rule=\"end-of-tier\",action=\"deny\"} 3\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(
            !text.contains("unread"),
            "a counter the kernel lacks: {text}"
        );
        assert!(!text.contains("not/in/the/spec"), "{text}");
        // Within SCRAPE_CACHE the values are served again, not re-read.
        m.refresh().await;
        m.refresh().await;
        assert_eq!(source.reads.load(Ordering::SeqCst), 1);
        // The table is gone: no series.
        m.set_policy_counters(&BTreeMap::new());
        assert!(
            !m.encode()
                .expect("encode")
                .contains("wiremesh_policy_rule_packets_total{")
        );
    }

    #[tokio::test]
    async fn wireguard_series_are_at_most_a_second_old() {
        let m = Metrics::new(Duration::from_secs(60));
        let source = Arc::new(Source::default());
        m.set_wireguard_source(Some(Arc::clone(&source) as Arc<dyn WireguardStats>));
        m.set_wireguard_devices(&BTreeSet::from(["wireguard.cali".to_string()]));
        m.refresh().await;
        assert!(
            m.encode()
                .expect("encode")
                .contains("wireguard_bytes_rcvd{")
        );
        // Concurrent scrapes within the cache period share one read.
        tokio::join!(m.refresh(), m.refresh(), m.refresh());
        assert_eq!(source.reads.load(Ordering::SeqCst), 1);
        tokio::time::sleep(SCRAPE_CACHE + Duration::from_millis(50)).await;
        m.refresh().await;
        assert_eq!(source.reads.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn documented_metrics_match_the_registry() {
        // Families without samples are not encoded: give every one a sample.
        let m = Metrics::new(Duration::from_secs(60));
        m.set_backend(Backend::Kernel);
        m.reconciled(Duration::from_millis(1), Some("keys"));
        m.applied(&[(("wireguard", "set_peer"), 1)].into_iter().collect());
        let skipped = SkippedNode {
            node: "n".into(),
            family: IpFamily::V4,
            reason: wiremesh_core::mesh::SkipReason::NoKey,
        };
        m.set_mesh(&[(IpFamily::V4, 1)].into_iter().collect(), &[skipped]);
        let text = m.encode().expect("encode");
        let registered: std::collections::BTreeSet<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect();
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/metrics.md"
        ))
        .expect("docs/metrics.md");
        let documented: std::collections::BTreeSet<String> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .filter(|n| n.starts_with("wireguard_") || n.starts_with("wiremesh_"))
            .map(str::to_string)
            .collect();
        assert_eq!(
            registered, documented,
            "docs/metrics.md and the registry differ"
        );
        assert!(registered.len() >= 13, "{registered:?}");
    }

    #[test]
    fn the_grafana_dashboard_queries_only_documented_metrics() {
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/metrics.md"
        ))
        .expect("docs/metrics.md");
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/grafana/wiremesh.json"
        );
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard"))
                .expect("dashboard JSON");
        let mut used = std::collections::BTreeSet::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr");
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if word.starts_with("wireguard_") || word.starts_with("wiremesh_") {
                        let base = ["_total", "_bucket", "_count", "_sum"]
                            .iter()
                            .find_map(|s| word.strip_suffix(s))
                            .unwrap_or(word);
                        used.insert(base.to_string());
                    }
                }
            }
        }
        assert!(used.len() >= 10, "{used:?}");
        for name in used {
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "the dashboard queries {name}, which docs/metrics.md does not list"
            );
        }
    }

    #[test]
    fn health_goes_stale() {
        let h = Health::new(Duration::from_millis(20));
        assert!(h.live().is_ok());
        std::thread::sleep(Duration::from_millis(40));
        assert!(h.live().is_err());
        h.beat();
        assert!(h.live().is_ok());
        assert!(!h.ready());
    }

    #[test]
    fn health_fails_when_every_run_fails_for_too_long() {
        let h = Health::new(Duration::from_millis(30));
        h.run_ended(false);
        h.beat();
        assert!(h.live().is_ok(), "a failure is retried first");
        std::thread::sleep(Duration::from_millis(40));
        h.beat();
        h.run_ended(false);
        let why = h.live().expect_err("failing for longer than allowed");
        assert!(why.contains("every reconcile run has failed"), "{why}");
        h.run_ended(true);
        assert!(h.live().is_ok());
    }
}

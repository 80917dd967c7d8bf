//! The agent's Prometheus metrics and health state, in one registry created by the agent and
//! handed to the reconciler and the admin server (no globals).
//!
//! Two groups (every name is documented in `docs/metrics.md`; a test keeps the two in step):
//! - Felix's WireGuard series with Felix's names and labels (`wireguard_meta`,
//!   `wireguard_bytes_rcvd`, `wireguard_bytes_sent`, `wireguard_latest_handshake_seconds`), read
//!   on scrape from the last observation of the devices, so existing dashboards work;
//! - our own `wiremesh_*` series: reconcile runs, failures, durations, convergence time,
//!   dataplane operations, peers, skipped nodes, backend.
//!
//! OpenMetrics requires a counter's sample to end in `_total`; Felix's byte counters do not, so
//! they are exposed untyped (`# TYPE wireguard_bytes_rcvd unknown`) to keep the exact series
//! names that Felix dashboards query.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::dataplane::Backend;
use crate::dataplane::wg::DeviceState;
use crate::mesh::SkippedNode;
use crate::model::Family as IpFamily;

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
    wireguard: Arc<WireguardCollector>,
    /// Liveness and readiness, served on the health port.
    pub health: Health,
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
        let wireguard = Arc::new(WireguardCollector::default());
        registry.register_collector(Box::new(Arc::clone(&wireguard)));
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
            wireguard,
            health: Health::new(stale_after),
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

    /// The devices as last observed; Felix's WireGuard series are read from this on scrape.
    pub fn observed_wireguard(&self, devices: &BTreeMap<String, DeviceState>) {
        self.wireguard.set(devices.values().cloned().collect());
    }

    pub fn set_ready(&self) {
        self.health.ready.store(true, Ordering::Relaxed);
        self.ready.set(1);
    }
}

/// `v4` / `v6`, the label value of an IP family.
pub fn family_label(family: IpFamily) -> &'static str {
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
}

impl Health {
    fn new(stale_after: Duration) -> Self {
        Health {
            heartbeat: Mutex::new(Instant::now()),
            stale_after,
            ready: AtomicBool::new(false),
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
        Ok(())
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
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
    use crate::dataplane::wg::PeerState;
    use crate::model::WgKey;

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
            reason: crate::mesh::SkipReason::NoKey,
        };
        m.set_mesh(&[(IpFamily::V4, 1)].into_iter().collect(), &[skipped]);
        let text = m.encode().expect("encode");
        let registered: std::collections::BTreeSet<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect();
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md"))
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
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md"))
            .expect("docs/metrics.md");
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/wiremesh.json");
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
}

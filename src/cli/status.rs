//! `wiremesh status`: what this node programmed, what it sees on the live device and whether
//! that agrees with what every peer published, as a verdict line, a table, or JSON with a
//! stable schema (`docs/status.md`). `wiremesh status --cluster` shows every node's published
//! WireGuard data from the datastore and flags what stops nodes from peering.
//!
//! The report is a pure function ([`build`], [`build_cluster`]) of the agent's
//! `status.json`, the observed devices, and optionally the datastore's nodes, so it is unit
//! tested without a kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::UNIX_EPOCH;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use wiremesh_agent::status_file::{AgentStatus, StatusFileError, unix_now};
use wiremesh_core::dataplane::wireguard::{DeviceState, LIVE_SESSION};
use wiremesh_core::error_chain;
use wiremesh_core::mesh::{parse_address, validate_nodes};
use wiremesh_core::model::{Family, NodeResource, WgKey};
use wiremesh_dataplane::Backend;
use wiremesh_dataplane::wireguard::backend::read_devices_once;
use wiremesh_datastore::{DatastoreConfig, ReadScope};

use super::datastore::DatastoreArgs;
use super::output::{self, EncodeError, OutputArgs, Table};

/// Version of the JSON output; bumped only when a field changes meaning or is removed.
pub const SCHEMA_VERSION: u32 = 1;

/// A handshake older than this is "stale" (WireGuard renews every 2 min while traffic flows).
const FRESH_HANDSHAKE: u64 = 180;

/// A peer programmed this long ago that sent bytes but never completed a handshake disagrees.
const HANDSHAKE_GRACE: u64 = 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Degraded,
    Down,
}

impl Level {
    /// The process exit code: 0 ok, 1 degraded, 2 down.
    pub fn exit_code(self) -> i32 {
        match self {
            Level::Ok => 0,
            Level::Degraded => 1,
            Level::Down => 2,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Degraded => "DEGRADED",
            Level::Down => "DOWN",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub level: Level,
    pub summary: String,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.level.word(), self.summary)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Handshake {
    Fresh,
    Stale,
    None,
}

/// `wiremesh status --output json` (schema in `docs/status.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub schema_version: u32,
    pub verdict: Verdict,
    pub node: String,
    pub backend: Option<Backend>,
    pub agent: Option<AgentReport>,
    pub devices: Vec<DeviceReport>,
    pub skipped: Vec<SkippedReport>,
    /// Problems not tied to one peer (agent, device, unexpected peers).
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentReport {
    pub ready: bool,
    pub reconciles: u64,
    pub updated_at: u64,
    pub status_age_seconds: u64,
    pub last_success_at: Option<u64>,
    pub last_error: Option<String>,
    pub config_errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceReport {
    pub family: Family,
    pub interface: String,
    pub present: bool,
    pub listen_port: u16,
    pub mtu: u32,
    pub public_key: WgKey,
    pub peers: Vec<PeerReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerReport {
    pub node: String,
    pub public_key: WgKey,
    /// As programmed on the device (`ip:port`), `null` when the peer is missing or has none.
    pub endpoint: Option<String>,
    /// The endpoint differs from the published one because WireGuard learned it from the
    /// peer's packets (roaming, NAT) and the session is live; not a disagreement.
    #[serde(default)]
    pub endpoint_learned: bool,
    pub allowed_ips: Vec<IpNet>,
    /// Unix time of the latest handshake.
    pub latest_handshake: Option<u64>,
    pub handshake_age_seconds: Option<u64>,
    pub handshake: Handshake,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// What this node programmed matches what the peer published, and nothing shows that
    /// the peer's device uses another key.
    pub agrees: bool,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SkippedReport {
    pub node: String,
    pub family: Family,
    /// Stable code, e.g. `no_key`, `malformed_key`, `key_collision`.
    pub reason: String,
    pub detail: String,
}

fn nets(set: &BTreeSet<IpNet>) -> String {
    if set.is_empty() {
        return "(none)".into();
    }
    set.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The report for this node. `agent` is `status.json` (None: missing), `live` the devices as
/// observed now (Err: could not observe), `published` the datastore's nodes when it was read.
pub fn build(
    node: &str,
    agent: Option<&AgentStatus>,
    live: Result<&BTreeMap<String, DeviceState>, &str>,
    published: Option<&BTreeMap<String, NodeResource>>,
    now: u64,
) -> StatusReport {
    let mut problems = Vec::new();
    let empty = BTreeMap::new();
    let live_devices = match live {
        Ok(l) => l,
        Err(e) => {
            problems.push(format!("could not read the WireGuard devices: {e}"));
            &empty
        }
    };
    let Some(agent) = agent else {
        return StatusReport {
            schema_version: SCHEMA_VERSION,
            verdict: Verdict {
                level: Level::Down,
                summary: "no agent status (is the agent running on this node?)".into(),
            },
            node: node.to_string(),
            backend: None,
            agent: None,
            devices: Vec::new(),
            skipped: Vec::new(),
            problems,
        };
    };
    let age = now.saturating_sub(agent.updated_at);
    if let Some(e) = &agent.last_error {
        problems.push(format!("the last reconcile failed: {e}"));
    }
    if !agent.ready {
        problems
            .push("the agent is not ready (initial datastore sync or first apply not done)".into());
    }
    problems.extend(agent.stale_nodes.iter().cloned());
    // With symmetric verdicts, a node the others skip knows it: it peers none itself.
    for s in agent.skipped.iter().filter(|s| s.node == agent.node) {
        problems.push(format!(
            "every node skips this one for {} and it peers none, so its pod traffic is in clear: {}",
            s.family, s.reason
        ));
    }
    if let Some(problem) = agent.datastore.as_ref().and_then(|d| d.problem(now)) {
        problems.push(problem);
    }
    // What was written is not what runs: the operator must know, even when the
    // fallback (the last valid value) keeps the mesh as it was.
    match agent.config_errors.as_slice() {
        [] => {}
        [only] => problems.push(only.clone()),
        [first, rest @ ..] => problems.push(format!(
            "{first} (and {} more FelixConfiguration problems)",
            rest.len()
        )),
    }
    let stale_limit = agent.resync_seconds.max(30) * 2 + 60;
    if age > stale_limit {
        problems.push(format!(
            "the agent's status is {age}s old (it writes at least every {}s): is the agent running?",
            agent.resync_seconds
        ));
    }

    let mut devices = Vec::new();
    for d in &agent.devices {
        let live_dev = live_devices.get(&d.interface);
        if live.is_ok() && live_dev.is_none() {
            problems.push(format!("device {} does not exist", d.interface));
        }
        if let Some(ld) = live_dev {
            if ld.public_key != Some(d.public_key) {
                problems.push(format!(
                    "device {} has public key {}, the agent programmed {}",
                    d.interface,
                    ld.public_key
                        .map(|k| k.to_string())
                        .unwrap_or_else(|| "(none)".into()),
                    d.public_key
                ));
            }
            let wanted: BTreeSet<WgKey> = d.peers.iter().map(|p| p.public_key).collect();
            for key in ld.peers.keys().filter(|k| !wanted.contains(k)) {
                problems.push(format!(
                    "device {} has peer {key} that no node publishes",
                    d.interface
                ));
            }
        }
        let mut peers = Vec::new();
        for p in &d.peers {
            let mut peer_problems = Vec::new();
            let live_peer = live_dev.and_then(|ld| ld.peers.get(&p.public_key));
            if live.is_ok() && live_peer.is_none() {
                peer_problems.push(format!(
                    "not programmed: {} has no peer with key {}",
                    d.interface, p.public_key
                ));
            }
            let mut endpoint_learned = false;
            if let Some(lp) = live_peer {
                let live_session = lp.last_handshake.is_some_and(|at| {
                    at.duration_since(UNIX_EPOCH)
                        .is_ok_and(|t| now.saturating_sub(t.as_secs()) < LIVE_SESSION.as_secs())
                });
                if lp.endpoint != Some(p.spec.endpoint) && live_session {
                    // WireGuard learned it from the peer's packets and the agent keeps it
                    // while the session is live (see docs/architecture.md).
                    endpoint_learned = true;
                } else if lp.endpoint != Some(p.spec.endpoint) {
                    peer_problems.push(format!(
                        "endpoint on the device is {}, {} publishes {}",
                        lp.endpoint
                            .map(|e| e.to_string())
                            .unwrap_or_else(|| "(none)".into()),
                        p.spec.node,
                        p.spec.endpoint
                    ));
                }
                if lp.allowed_ips != p.spec.allowed_ips {
                    peer_problems.push(format!(
                        "allowed IPs on the device are {}, {} publishes {}",
                        nets(&lp.allowed_ips),
                        p.spec.node,
                        nets(&p.spec.allowed_ips)
                    ));
                }
                let programmed_long_ago = p
                    .programmed_at
                    .is_none_or(|t| now.saturating_sub(t) >= HANDSHAKE_GRACE);
                if lp.last_handshake.is_none() && lp.tx_bytes > 0 && programmed_long_ago {
                    peer_problems.push(format!(
                        "no handshake although {} bytes were sent: {}'s device does not answer to the key it publishes ({}), or lacks this node's key, or UDP to {} is blocked",
                        lp.tx_bytes, p.spec.node, p.public_key, p.spec.endpoint
                    ));
                }
            }
            if let Some(nodes) = published {
                match nodes.get(&p.spec.node) {
                    None => {
                        peer_problems.push(format!("{} is no longer in the datastore", p.spec.node))
                    }
                    Some(n) => {
                        match n.public_key(d.family) {
                            Some(k) if k.trim() == p.public_key.to_string() => {}
                            Some(k) => peer_problems.push(format!(
                                "{} publishes key {k}, this node programmed {}",
                                p.spec.node, p.public_key
                            )),
                            None => peer_problems.push(format!(
                                "{} publishes no key, this node programmed {}",
                                p.spec.node, p.public_key
                            )),
                        }
                        let underlay = n.underlay_address(d.family).and_then(parse_address);
                        if underlay != Some(p.spec.endpoint.ip()) {
                            peer_problems.push(format!(
                                "{} publishes address {}, the endpoint is {}",
                                p.spec.node,
                                n.underlay_address(d.family).unwrap_or("(none)"),
                                p.spec.endpoint
                            ));
                        }
                        for cidr in &n.pod_cidrs {
                            if let Ok(net) = cidr.trim().parse::<IpNet>()
                                && Family::of_net(&net) == d.family
                                && !p.spec.allowed_ips.contains(&net.trunc())
                            {
                                peer_problems.push(format!(
                                    "{} publishes pod CIDR {net}, which is not an allowed IP",
                                    p.spec.node
                                ));
                            }
                        }
                    }
                }
            }
            let latest = live_peer
                .and_then(|lp| lp.last_handshake)
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
            let handshake_age = latest.map(|t| now.saturating_sub(t));
            peers.push(PeerReport {
                node: p.spec.node.clone(),
                public_key: p.public_key,
                endpoint: live_peer.and_then(|lp| lp.endpoint).map(|e| e.to_string()),
                endpoint_learned,
                allowed_ips: live_peer
                    .map(|lp| lp.allowed_ips.iter().copied().collect())
                    .unwrap_or_default(),
                latest_handshake: latest,
                handshake_age_seconds: handshake_age,
                handshake: match handshake_age {
                    Some(a) if a <= FRESH_HANDSHAKE => Handshake::Fresh,
                    Some(_) => Handshake::Stale,
                    None => Handshake::None,
                },
                rx_bytes: live_peer.map(|lp| lp.rx_bytes).unwrap_or(0),
                tx_bytes: live_peer.map(|lp| lp.tx_bytes).unwrap_or(0),
                agrees: peer_problems.is_empty() && live.is_ok(),
                problems: peer_problems,
            });
        }
        peers.sort_by(|a, b| a.node.cmp(&b.node));
        devices.push(DeviceReport {
            family: d.family,
            interface: d.interface.clone(),
            present: live_dev.is_some(),
            listen_port: live_dev.map(|l| l.listen_port).unwrap_or(d.listen_port),
            mtu: d.mtu,
            public_key: d.public_key,
            peers,
        });
    }
    let skipped: Vec<SkippedReport> = agent
        .skipped
        .iter()
        .map(|s| SkippedReport {
            node: s.node.clone(),
            family: s.family,
            reason: s.reason.code().to_string(),
            detail: s.reason.to_string(),
        })
        .collect();
    let verdict = verdict(&devices, &skipped, &problems);
    StatusReport {
        schema_version: SCHEMA_VERSION,
        verdict,
        node: node.to_string(),
        backend: agent.backend,
        agent: Some(AgentReport {
            ready: agent.ready,
            reconciles: agent.reconciles,
            updated_at: agent.updated_at,
            status_age_seconds: age,
            last_success_at: agent.last_success_at,
            last_error: agent.last_error.clone(),
            config_errors: agent.config_errors.clone(),
        }),
        devices,
        skipped,
        problems,
    }
}

impl StatusReport {
    /// Adds a problem found outside [`build`]; the verdict follows.
    pub fn add_problem(&mut self, problem: String) {
        self.problems.push(problem);
        if self.agent.is_some() {
            self.verdict = verdict(&self.devices, &self.skipped, &self.problems);
        }
    }
}

fn verdict(devices: &[DeviceReport], skipped: &[SkippedReport], problems: &[String]) -> Verdict {
    let peers: Vec<&PeerReport> = devices.iter().flat_map(|d| &d.peers).collect();
    let agreeing = peers.iter().filter(|p| p.agrees).count();
    let skipped_nodes: BTreeSet<&str> = skipped.iter().map(|s| s.node.as_str()).collect();
    let skipped_text = match skipped_nodes.len() {
        0 => String::new(),
        1 => "; 1 node skipped".into(),
        n => format!("; {n} nodes skipped"),
    };
    let disagreeing: Vec<String> = peers
        .iter()
        .filter(|p| !p.agrees)
        .map(|p| match p.problems.first() {
            Some(why) => format!("{} ({why})", p.node),
            None => p.node.clone(),
        })
        .collect();
    if devices.is_empty() {
        let level = if problems.is_empty() {
            Level::Ok
        } else {
            Level::Degraded
        };
        let mut summary = "WireGuard is off on this node".to_string();
        if let Some(p) = problems.first() {
            summary = format!("{summary}; {p}");
        }
        return Verdict { level, summary };
    }
    if !disagreeing.is_empty() || !problems.is_empty() {
        let mut parts = Vec::new();
        if !disagreeing.is_empty() {
            parts.push(format!(
                "{agreeing}/{} peers agree; disagreeing: {}",
                peers.len(),
                disagreeing.join("; ")
            ));
        }
        parts.extend(problems.iter().cloned());
        return Verdict {
            level: Level::Degraded,
            summary: format!("{}{skipped_text}", parts.join("; ")),
        };
    }
    let count = |h: Handshake| peers.iter().filter(|p| p.handshake == h).count();
    let handshakes = if count(Handshake::Fresh) == peers.len() {
        "handshakes fresh".to_string()
    } else {
        format!(
            "handshakes: {} fresh, {} idle, {} none yet",
            count(Handshake::Fresh),
            count(Handshake::Stale),
            count(Handshake::None)
        )
    };
    Verdict {
        level: Level::Ok,
        summary: format!(
            "{agreeing}/{} peers agree, {handshakes}{skipped_text}",
            peers.len()
        ),
    }
}

/// Human form: the verdict line first, then the details.
pub fn render_text(r: &StatusReport) -> String {
    let mut out = format!("{}\n", r.verdict);
    out.push_str(&format!("node       {}\n", r.node));
    out.push_str(&format!(
        "backend    {}\n",
        r.backend
            .map(|b| b.to_string())
            .unwrap_or_else(|| "unknown".into())
    ));
    if let Some(a) = &r.agent {
        out.push_str(&format!(
            "agent      {}, {} runs, status written {}s ago{}\n",
            if a.ready { "ready" } else { "NOT READY" },
            a.reconciles,
            a.status_age_seconds,
            a.last_error
                .as_deref()
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        ));
        for e in &a.config_errors {
            out.push_str(&format!("config     {e}\n"));
        }
    }
    for d in &r.devices {
        out.push_str(&format!(
            "interface  {} ({}){}  port {}  mtu {}  public key {}\n",
            d.interface,
            d.family,
            if d.present { "" } else { " MISSING" },
            d.listen_port,
            d.mtu,
            d.public_key
        ));
        if d.peers.is_empty() {
            out.push_str("  no peers\n");
            continue;
        }
        let mut table = Table::new(&[
            "PEER",
            "ENDPOINT",
            "ALLOWED IPS",
            ">HANDSHAKE",
            ">RX",
            ">TX",
            "AGREES",
        ]);
        let mut details = Vec::new();
        for p in &d.peers {
            let ips = p
                .allowed_ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",");
            table.row(vec![
                p.node.clone(),
                p.endpoint.clone().unwrap_or_else(|| "-".into()),
                if ips.is_empty() { "-".into() } else { ips },
                match p.handshake_age_seconds {
                    Some(a) => format!("{a}s ago"),
                    None => "never".into(),
                },
                bytes(p.rx_bytes),
                bytes(p.tx_bytes),
                if p.agrees { "yes" } else { "NO" }.into(),
            ]);
            details.extend(
                p.problems
                    .iter()
                    .map(|why| format!("      {}: {why}\n", p.node)),
            );
        }
        out.push_str(&table.render("  "));
        details.iter().for_each(|d| out.push_str(d));
    }
    if !r.skipped.is_empty() {
        out.push_str("skipped nodes (not peered; their pod traffic goes in clear)\n");
        for s in &r.skipped {
            out.push_str(&format!("  {} ({}): {}\n", s.node, s.family, s.detail));
        }
    }
    for p in &r.problems {
        out.push_str(&format!("problem    {p}\n"));
    }
    out
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster view: only published data is visible in the datastore.

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterReport {
    pub schema_version: u32,
    pub verdict: Verdict,
    pub nodes: Vec<ClusterNode>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNode {
    pub node: String,
    pub address: Option<String>,
    pub public_key: Option<String>,
    pub tunnel_address: Option<String>,
    /// Shown when some node publishes an IPv6 key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_v6: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_v6: Option<String>,
    pub pod_cidrs: Vec<String>,
    /// Whether every other node can peer with this one (each family in use).
    pub peerable: bool,
    pub problems: Vec<String>,
}

/// Every node's published WireGuard data and what stops the others peering with it, judged by
/// the agent's own node validation (`mesh::validate_nodes`): IPv4, and IPv6 when any node
/// publishes an IPv6 key.
pub fn build_cluster(nodes: &BTreeMap<String, NodeResource>) -> ClusterReport {
    let families: Vec<Family> = Family::ALL
        .into_iter()
        .filter(|f| *f == Family::V4 || nodes.values().any(|n| n.public_key(*f).is_some()))
        .collect();
    let mut problems: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for family in &families {
        let prefix = if *family == Family::V4 {
            String::new()
        } else {
            format!("{family}: ")
        };
        let validation = validate_nodes(nodes, *family, None);
        for s in &validation.skipped {
            problems
                .entry(s.node.clone())
                .or_default()
                .push(format!("{prefix}{}", s.reason));
        }
    }
    let out: Vec<ClusterNode> = nodes
        .iter()
        .map(|(name, n)| {
            let problems = problems.remove(name).unwrap_or_default();
            let v6 = families.contains(&Family::V6);
            ClusterNode {
                node: name.clone(),
                address: n.underlay_address(Family::V4).map(str::to_string),
                public_key: n.public_key(Family::V4).map(str::to_string),
                tunnel_address: n.interface_address(Family::V4).map(str::to_string),
                address_v6: n
                    .underlay_address(Family::V6)
                    .filter(|_| v6)
                    .map(str::to_string),
                public_key_v6: n.public_key(Family::V6).filter(|_| v6).map(str::to_string),
                pod_cidrs: n.pod_cidrs.clone(),
                peerable: problems.is_empty(),
                problems,
            }
        })
        .collect();
    let bad: Vec<String> = out
        .iter()
        .filter(|n| !n.peerable)
        .map(|n| format!("{} ({})", n.node, n.problems.join("; ")))
        .collect();
    let verdict = if bad.is_empty() {
        Verdict {
            level: Level::Ok,
            summary: format!(
                "{} nodes publish consistent WireGuard data; every pair can peer",
                out.len()
            ),
        }
    } else {
        Verdict {
            level: Level::Degraded,
            summary: format!(
                "{}/{} nodes cannot be peered: {}",
                bad.len(),
                out.len(),
                bad.join("; ")
            ),
        }
    };
    ClusterReport {
        schema_version: SCHEMA_VERSION,
        verdict,
        nodes: out,
    }
}

pub fn render_cluster_text(r: &ClusterReport) -> String {
    let mut out = format!("{}\n", r.verdict);
    let v6 = r.nodes.iter().any(|n| n.public_key_v6.is_some());
    let mut titles = vec!["NODE", "ADDRESS", "PUBLIC KEY", "TUNNEL"];
    if v6 {
        titles.extend(["ADDRESS V6", "PUBLIC KEY V6"]);
    }
    titles.extend(["POD CIDRS", "OK"]);
    let mut table = Table::new(&titles);
    let cell = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    for n in &r.nodes {
        let mut row = vec![
            n.node.clone(),
            cell(&n.address),
            cell(&n.public_key),
            cell(&n.tunnel_address),
        ];
        if v6 {
            row.extend([cell(&n.address_v6), cell(&n.public_key_v6)]);
        }
        row.extend([
            if n.pod_cidrs.is_empty() {
                "-".to_string()
            } else {
                n.pod_cidrs.join(",")
            },
            if n.peerable { "yes" } else { "NO" }.into(),
        ]);
        table.row(row);
    }
    out.push_str(&table.render(""));
    for n in r.nodes.iter().filter(|n| !n.problems.is_empty()) {
        for p in &n.problems {
            out.push_str(&format!("  {}: {p}\n", n.node));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The command.

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    StatusFile(#[from] StatusFileError),
    #[error("datastore")]
    Datastore(#[from] wiremesh_datastore::DatastoreError),
    #[error(
        "--cluster reads the datastore: give --etcd-endpoints, or --datastore kubernetes (set in the agent's pod)"
    )]
    NoDatastore,
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// `wiremesh status`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  wiremesh status                          verdict, device, peers, skipped nodes
  wiremesh status -o json                  the same, as JSON (schema: docs/status.md); -o yaml
  wiremesh status --etcd-endpoints http://10.0.0.1:2379
                                           also compare with what each peer publishes now
  wiremesh status --cluster --etcd-endpoints http://10.0.0.1:2379
                                           every node's published data, and what stops peering
  kubectl -n wiremesh exec ds/wiremesh -- wiremesh status --cluster
                                           the same on Kubernetes (the pod's WIREMESH_DATASTORE
                                           is kubernetes: Nodes are read with its service account)
  wiremesh lab exec node1 -- wiremesh status
                                           a lab node (lab exec sets WIREMESH_STATE_DIR)

Exit codes: 0 OK, 1 DEGRADED, 2 DOWN or the status could not be read.")]
pub struct StatusArgs {
    /// The agent's state directory (where it writes status.json).
    #[arg(long, env = "WIREMESH_STATE_DIR", default_value = "/var/lib/wiremesh")]
    pub state_dir: PathBuf,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Read the datastore too (read-only): the agreement check then compares with what each
    /// peer publishes now, not with what the agent last saw.
    #[command(flatten)]
    pub datastore: DatastoreArgs,
    /// Show every node's published state from the datastore instead of this node's view.
    #[arg(long)]
    pub cluster: bool,
}

/// Every node as published, read once (read-only: Nodes only).
async fn fetch_published(
    config: &DatastoreConfig,
) -> Result<BTreeMap<String, NodeResource>, StatusError> {
    let datastore = config.connect(false).await?;
    Ok(datastore.read_once(ReadScope::NODES).await?.nodes)
}

/// Runs the command; returns the exit code.
pub async fn run(args: StatusArgs) -> Result<i32, StatusError> {
    let source = args.datastore.config();
    if args.cluster {
        let Some(source) = &source else {
            return Err(StatusError::NoDatastore);
        };
        let nodes = fetch_published(source).await?;
        let report = build_cluster(&nodes);
        output::print(&report, args.output.format, render_cluster_text)?;
        return Ok(report.verdict.level.exit_code());
    }
    let agent = AgentStatus::read(&args.state_dir)?;
    let names: BTreeSet<String> = agent
        .as_ref()
        .map(|a| a.devices.iter().map(|d| d.interface.clone()).collect())
        .unwrap_or_default();
    let live = read_devices_once(agent.as_ref().and_then(|a| a.backend), &names)
        .await
        .map_err(|e| error_chain(&e));
    // A datastore that cannot be read is a finding, not a reason to show nothing: the local
    // view still stands (the agent keeps its last synced state).
    let (published, datastore_error) = match &source {
        None => (None, None),
        Some(source) => match fetch_published(source).await {
            Ok(nodes) => (Some(nodes), None),
            Err(e) => (None, Some(error_chain(&e))),
        },
    };
    let node = agent
        .as_ref()
        .map(|a| a.node.clone())
        .unwrap_or_else(wiremesh_agent::metrics::hostname);
    let mut report = build(
        &node,
        agent.as_ref(),
        live.as_ref().map_err(String::as_str),
        published.as_ref(),
        unix_now(),
    );
    if let Some(e) = datastore_error {
        report.add_problem(format!(
            "could not read the datastore to compare with what nodes publish: {e}"
        ));
    }
    output::print(&report, args.output.format, render_text)?;
    Ok(report.verdict.level.exit_code())
}

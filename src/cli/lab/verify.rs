//! `lab verify`: ping every ordered pair of pods while capturing the underlay bridge, then check
//! per pair that traffic flowed and, where encryption is expected, that none of it was clear.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::sys::{self, wait_until};
use super::{Lab, LabError, NodeState};
use wiremesh_agent::reconcile::load_last_valid;
use wiremesh_agent::status_file::AgentStatus;
use wiremesh_core::config::EffectiveConfig;
use wiremesh_core::mesh::SkipReason;
use wiremesh_core::model::Family;

/// What `verify` should expect of the underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VerifyExpect {
    /// From the effective FelixConfiguration (`default` + `node.<name>`) of both nodes.
    Auto,
    Encrypted,
    Clear,
}

/// What was expected of one pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expectation {
    Encrypted,
    Clear,
}

impl fmt::Display for Expectation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Expectation::Encrypted => "encrypted",
            Expectation::Clear => "clear",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairResult {
    pub from: String,
    pub to: String,
    /// The pods' addresses pinged, and the WireGuard device expected to carry them.
    #[serde(default = "ipv4")]
    pub family: Family,
    pub expected: Expectation,
    pub sent: u32,
    pub received: u32,
    /// Packets between the two pod addresses seen on the underlay.
    pub clear_packets: u64,
    /// UDP packets between the two nodes on their WireGuard ports.
    pub wireguard_packets: u64,
    pub ok: bool,
    /// Why the pair failed (empty when ok).
    pub problem: String,
}

fn ipv4() -> Family {
    Family::V4
}

impl fmt::Display for PairResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} {}  {}  {} ({} clear, {} wireguard packets; {}/{} replies)",
            self.from,
            self.to,
            self.family,
            if self.ok { "ok  " } else { "FAIL" },
            self.expected,
            self.clear_packets,
            self.wireguard_packets,
            self.received,
            self.sent
        )?;
        if !self.ok {
            write!(f, ": {}", self.problem)?;
        }
        Ok(())
    }
}

/// Whether a node's agent runs WireGuard in each family, and on which port.
#[derive(Debug, Clone, Copy)]
struct NodeWireguard {
    index: u32,
    v4: (bool, u16),
    v6: (bool, u16),
}

impl NodeWireguard {
    fn family(&self, family: Family) -> (bool, u16) {
        match family {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }
}

/// Effective WireGuard expectation and port of every node: its FelixConfiguration objects, as
/// its agent sees them (with the last valid values it keeps for fields that are invalid now).
async fn effective(lab: &Lab) -> Result<Vec<NodeWireguard>, LabError> {
    let nodes: Vec<(u32, String, PathBuf)> = lab
        .state
        .nodes
        .values()
        .map(|n| (n.index, n.name.clone(), n.state_dir.clone()))
        .collect();
    let all = match &lab.state.kubeconfig {
        Some(kubeconfig) => {
            let client = super::k8s::client(kubeconfig).await?;
            Some(super::k8s::felix_configurations(&client).await?)
        }
        None => None,
    };
    let names: Vec<String> = nodes.iter().map(|(_, name, _)| name.clone()).collect();
    let per_node = match all {
        Some(all) => names.iter().map(|_| all.clone()).collect(),
        None => {
            lab.with_store("reading FelixConfiguration", move |mut w| async move {
                let mut out = Vec::new();
                for name in &names {
                    out.push(w.node_felix_configurations(name).await?);
                }
                Ok(out)
            })
            .await?
        }
    };
    Ok(nodes
        .into_iter()
        .zip(per_node)
        .map(|((index, name, state_dir), configs)| {
            let mut last = load_last_valid(&state_dir);
            let config = EffectiveConfig::for_node_remembering(&name, &configs, &mut last);
            expectation(index, &name, config)
        })
        .collect())
}

/// What the agent of `name` runs, as it sees its configuration.
fn expectation(index: u32, name: &str, config: EffectiveConfig) -> NodeWireguard {
    for e in &config.errors {
        warn!(node = %name, error = %e, "ignored as the agent ignores it");
    }
    let wg = &config.wireguard;
    NodeWireguard {
        index,
        v4: (wg.v4.enabled, wg.v4.listening_port),
        v6: (wg.v6.enabled, wg.v6.listening_port),
    }
}

/// tcpdump on the hub's bridge (the underlay every node's traffic crosses), into a file.
pub struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    pub fn start(hub: &str, dir: &Path) -> Result<Capture, LabError> {
        let file = dir.join("underlay.pcap");
        let err_path = dir.join("tcpdump.log");
        let _ = fs::remove_file(&file);
        let err = fs::File::create(&err_path).map_err(|source| LabError::Io {
            step: "creating capture log".into(),
            path: err_path.clone(),
            source,
        })?;
        // -Z root: Debian's tcpdump otherwise drops to user tcpdump before opening the file.
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                hub,
                "tcpdump",
                "-i",
                "br0",
                "-nn",
                "-U",
                "--immediate-mode",
                "-Z",
                "root",
                "-w",
            ])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|source| LabError::Spawn {
                step: "starting capture".into(),
                object: "br0".into(),
                source,
            })?;
        let mut capture = Capture { child, file };
        let listening = wait_until(Duration::from_secs(5), || {
            fs::read_to_string(&err_path).is_ok_and(|t| t.contains("listening on"))
        });
        if !listening {
            capture.stop();
            let detail = fs::read_to_string(&err_path).unwrap_or_default();
            return Err(LabError::Timeout {
                step: "waiting for tcpdump to capture".into(),
                object: format!("br0 in {hub}: {}", detail.trim()),
            });
        }
        Ok(capture)
    }

    /// SIGINT lets tcpdump flush; SIGKILL only if it will not stop.
    pub fn stop(&mut self) {
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGINT);
        let exited = wait_until(Duration::from_secs(5), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            warn!("tcpdump ignored SIGINT; killing it");
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Packets in the capture that match the tcpdump `filter`.
    pub fn count(&self, filter: &str) -> Result<u64, LabError> {
        Ok(self.packets(filter)?.len() as u64)
    }

    /// The packets in the capture that match the tcpdump `filter`, one line each.
    pub fn packets(&self, filter: &str) -> Result<Vec<String>, LabError> {
        self.read(filter, &[])
    }

    /// The packets matching `filter` captured at or after `since`, one line each (each starts
    /// with its Unix time).
    pub fn packets_since(
        &self,
        filter: &str,
        since: std::time::SystemTime,
    ) -> Result<Vec<String>, LabError> {
        self.packets_between(filter, since, None)
    }

    /// The packets matching `filter` captured from `since` up to `until` (None: the end).
    pub fn packets_between(
        &self,
        filter: &str,
        since: std::time::SystemTime,
        until: Option<std::time::SystemTime>,
    ) -> Result<Vec<String>, LabError> {
        let seconds = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
        };
        let (since, until) = (seconds(since), until.map_or(f64::MAX, seconds));
        Ok(self
            .read(filter, &["-tt"])?
            .into_iter()
            .filter(|line| {
                line.split_whitespace()
                    .next()
                    .and_then(|t| t.parse::<f64>().ok())
                    .is_some_and(|t| t >= since && t < until)
            })
            .collect())
    }

    fn read(&self, filter: &str, extra: &[&str]) -> Result<Vec<String>, LabError> {
        let file = self.file.display().to_string();
        let mut args = vec!["-r", &file, "-nn", "-e"];
        args.extend_from_slice(extra);
        args.push(filter);
        let output = sys::run("reading capture", filter, "tcpdump", &args)?;
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

/// Checks every ordered pair of nodes in each of the lab's families; see the module comment.
pub async fn verify(
    lab: &Lab,
    expect: VerifyExpect,
    count: u32,
) -> Result<Vec<PairResult>, LabError> {
    let nodes: Vec<NodeState> = lab.state.nodes.values().cloned().collect();
    let families = lab.state.ip_family.families();
    let config = effective(lab).await?;
    let lookup = |i: u32, family: Family| {
        config
            .iter()
            .find(|n| n.index == i)
            .map(|n| n.family(family))
    };

    if lab.state.agents {
        wait_for_agents(lab, &nodes, &families, &lookup, AGENT_WAIT).await;
    }

    let dir = lab.state.dir.join("verify");
    fs::create_dir_all(&dir).map_err(|source| LabError::Io {
        step: "creating verify dir".into(),
        path: dir.clone(),
        source,
    })?;
    let mut capture = Capture::start(&lab.state.hub_netns, &dir)?;
    let mut pings = Vec::new();
    for &family in &families {
        for from in &nodes {
            for to in nodes.iter().filter(|n| n.index != from.index) {
                let result = lab.ping_in(&from.pod_name, &to.pod_name, count, family)?;
                info!(from = %from.pod_name, to = %to.pod_name, %family, received = result.received, "ping");
                pings.push((family, from, to, result));
            }
        }
    }
    // A pair that got no reply at all is pinged once more (a loaded machine can lose a burst);
    // the capture covers both attempts, so clear packets still count against it.
    for (family, from, to, result) in pings.iter_mut().filter(|(_, _, _, r)| r.received == 0) {
        *result = lab.ping_in(&from.pod_name, &to.pod_name, count, *family)?;
        info!(from = %from.pod_name, to = %to.pod_name, %family, received = result.received, "ping again");
    }
    capture.stop();

    let mut results = Vec::new();
    for (family, from, to, ping) in pings {
        let default_port = match family {
            Family::V4 => wiremesh_core::config::DEFAULT_PORT_V4,
            Family::V6 => wiremesh_core::config::DEFAULT_PORT_V6,
        };
        let (from_on, from_port) = lookup(from.index, family).unwrap_or((false, default_port));
        let (to_on, to_port) = lookup(to.index, family).unwrap_or((false, default_port));
        let expected = match expect {
            VerifyExpect::Encrypted => Expectation::Encrypted,
            VerifyExpect::Clear => Expectation::Clear,
            VerifyExpect::Auto if from_on && to_on => Expectation::Encrypted,
            VerifyExpect::Auto => Expectation::Clear,
        };
        let ip_family = lab.state.ip_family;
        let (Some(from_pod), Some(to_pod), Some(from_node), Some(to_node)) = (
            from.pod_address(family, ip_family),
            to.pod_address(family, ip_family),
            from.underlay(family),
            to.underlay(family),
        ) else {
            continue; // Pinged above, so both have the family's addresses.
        };
        let clear_packets = capture.count(&format!("host {from_pod} and host {to_pod}"))?;
        let wireguard_packets = capture.count(&format!(
            "udp and host {from_node} and host {to_node} and (port {from_port} or port {to_port})"
        ))?;
        let mut problems = Vec::new();
        if ping.received == 0 {
            problems.push(format!("{to_pod} unreachable from {}", from.pod_name));
        }
        if expected == Expectation::Encrypted {
            if clear_packets > 0 {
                problems.push(format!("{clear_packets} clear pod packets on the underlay"));
            }
            if wireguard_packets == 0 {
                problems.push("no WireGuard packets between the nodes".into());
            }
        }
        results.push(PairResult {
            from: from.name.clone(),
            to: to.name.clone(),
            family,
            expected,
            sent: ping.sent,
            received: ping.received,
            clear_packets,
            wireguard_packets,
            ok: problems.is_empty(),
            problem: problems.join("; "),
        });
    }
    // A failed run keeps its capture for a look with tcpdump -r.
    if results.iter().all(|r| r.ok) {
        let _ = fs::remove_dir_all(&dir);
    }
    Ok(results)
}

/// `N/M pairs ok` and whether all hold.
/// How long `verify` waits for the agents to apply the current configuration.
const AGENT_WAIT: Duration = Duration::from_secs(30);

/// Whether the agent of `node` has applied what the configuration asks of it in `family`, from
/// its status file: ready, its last run succeeded, WireGuard on or off as configured, and when
/// on, a peer programmed for every other node that is on (but those it refuses for a reason
/// other than a key not yet published: a broken node stays broken however long we wait).
/// Returns the device and the keys of the peers that should have a handshake (those with
/// keepalive).
fn agent_applied(
    status: &AgentStatus,
    family: Family,
    on: bool,
    peers_on: &[&NodeState],
) -> Result<Option<(String, Vec<String>)>, String> {
    let device = status.devices.iter().find(|d| d.family == family);
    match (on, device) {
        (false, None) => Ok(None),
        (false, Some(_)) => Err(format!("{family} WireGuard still on")),
        (true, None) => Err(format!("{family} WireGuard not on yet")),
        (true, Some(d)) => {
            let refused: Vec<&str> = status
                .skipped
                .iter()
                .filter(|s| s.family == family && s.reason != SkipReason::NoKey)
                .map(|s| s.node.as_str())
                .collect();
            let mut keys = Vec::new();
            for peer in peers_on
                .iter()
                .filter(|p| !refused.contains(&p.name.as_str()))
            {
                match d.peers.iter().find(|p| p.spec.node == peer.name) {
                    // Without keepalive nothing starts a handshake before traffic does.
                    Some(p) if p.spec.keepalive > 0 => keys.push(p.public_key.to_string()),
                    Some(_) => {}
                    None => return Err(format!("no {family} peer for {} yet", peer.name)),
                }
            }
            Ok(Some((d.interface.clone(), keys)))
        }
    }
}

/// The status file of `node`'s agent, if it is ready and its last run succeeded.
fn settled_status(node: &NodeState) -> Result<AgentStatus, String> {
    let status = AgentStatus::read(&node.state_dir)
        .map_err(|e| e.to_string())?
        .ok_or("no status file yet")?;
    if !status.ready {
        return Err("not ready".into());
    }
    if let Some(e) = &status.last_error {
        return Err(format!("last run failed: {e}"));
    }
    Ok(status)
}

/// Whether `node`'s device `interface` has completed a handshake with each of `keys` (a peer
/// added just before the other side added us waits WireGuard's 5 s REKEY_TIMEOUT to retry).
fn handshakes_done(lab: &Lab, node: &str, interface: &str, keys: &[String]) -> Result<(), String> {
    let out = lab
        .exec_in_node(node, &["wg", "show", interface, "latest-handshakes"])
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let done: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, at)| at.trim().parse::<u64>().is_ok_and(|t| t > 0))
        .map(|(key, _)| key)
        .collect();
    match keys.iter().find(|k| !done.contains(&k.as_str())) {
        Some(k) => Err(format!("no handshake with {k} yet")),
        None => Ok(()),
    }
}

/// Waits (up to `limit`) until every running agent has applied the configuration and its
/// peers have completed a handshake, so `verify` right after `lab set` checks the new state
/// instead of racing the agents. Verifying goes ahead after `limit` either way; what is not in
/// place then shows in the results.
async fn wait_for_agents(
    lab: &Lab,
    nodes: &[NodeState],
    families: &[Family],
    lookup: &impl Fn(u32, Family) -> Option<(bool, u16)>,
    limit: Duration,
) {
    let on = |n: &NodeState, family| lookup(n.index, family).is_some_and(|(on, _)| on);
    let node_ready = |n: &NodeState| -> Result<(), String> {
        let status = settled_status(n)?;
        for &family in families {
            let peers: Vec<&NodeState> = nodes
                .iter()
                .filter(|p| p.index != n.index && on(p, family))
                .collect();
            if let Some((interface, keys)) = agent_applied(&status, family, on(n, family), &peers)?
            {
                handshakes_done(lab, &n.name, &interface, &keys)?;
            }
        }
        Ok(())
    };
    let pending = || -> Vec<String> {
        nodes
            .iter()
            .filter(|n| {
                n.agent_pid
                    .is_some_and(|pid| sys::is_alive(pid) && sys::pid_in_netns(pid, &n.netns))
            })
            .filter_map(|n| node_ready(n).err().map(|why| format!("{}: {why}", n.name)))
            .collect()
    };
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let waiting = pending();
        if waiting.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(agents = %waiting.join("; "), "the mesh has not settled; verifying anyway");
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `wiremesh lab verify`: every pair, and the summary.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub pairs: Vec<PairResult>,
    pub summary: String,
    /// Every pair as expected.
    pub ok: bool,
}

impl VerifyReport {
    pub fn new(pairs: Vec<PairResult>) -> VerifyReport {
        let (summary, ok) = summary(&pairs);
        VerifyReport { pairs, summary, ok }
    }

    pub fn text(&self) -> String {
        let mut out: String = self.pairs.iter().map(|p| format!("{p}\n")).collect();
        out.push_str(&self.summary);
        out.push('\n');
        out
    }
}

pub fn summary(results: &[PairResult]) -> (String, bool) {
    let ok = results.iter().filter(|r| r.ok).count();
    let all = ok == results.len();
    (
        format!(
            "{ok}/{} pairs ok{}",
            results.len(),
            if all { "" } else { "; verification FAILED" }
        ),
        all,
    )
}

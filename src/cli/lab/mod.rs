//! `wiremesh lab`: a cluster on one machine. Nodes and pods are network namespaces joined by an
//! underlay bridge in a hub namespace that also runs etcd; one agent per node. Everything the
//! lab makes is recorded under one state directory so `down` can clean up even after a crash.

pub mod cli;
mod hub;
pub mod k8s;
pub mod pods;
pub mod policy;
pub mod probe;
pub mod serve;
mod sys;
mod topology;
pub mod verify;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{info, warn};

pub use verify::{Capture, Expectation, PairResult, VerifyExpect};
use wiremesh_core::config;
use wiremesh_core::model::Family;
use wiremesh_core::wire::FelixConfigurationSpec;
/// The lab's datastore errors are those of the etcd adapter's writer.
pub use wiremesh_datastore::etcd::WriteError as StoreError;
use wiremesh_datastore::etcd::{EtcdWriter, NodeRegistration};

pub const DEFAULT_NAME: &str = "wiremesh";
const DEFAULT_STATE_ROOT: &str = "/run/wiremesh-lab";
pub const HUB_ADDRESS: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 254);
/// The hub's IPv6 underlay address (labs with IPv6); nodes are `fd00:172:30::<index in hex>`.
pub const HUB_ADDRESS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x30, 0, 0, 0, 0, 0xfe);
const ETCD_ENDPOINT: &str = "http://172.30.0.254:2379";
/// Node indexes stay below the hub's .254 and fit in one octet of the pod CIDRs.
const MAX_NODES: u32 = 250;
const STATE_FILE: &str = "lab.json";
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The address families of a lab's pods and mesh (`lab up --ip-family`). The hub's etcd is
/// reached over IPv4 in every family: the underlay always has IPv4 for that.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    #[default]
    Ipv4,
    Ipv6,
    Dual,
}

impl IpFamily {
    /// The families pods are addressed in and WireGuard is switched on for, IPv4 first.
    pub fn families(self) -> Vec<Family> {
        match self {
            IpFamily::Ipv4 => vec![Family::V4],
            IpFamily::Ipv6 => vec![Family::V6],
            IpFamily::Dual => vec![Family::V4, Family::V6],
        }
    }

    pub fn has(self, family: Family) -> bool {
        self.families().contains(&family)
    }

    /// As on the command line.
    pub fn name(self) -> &'static str {
        match self {
            IpFamily::Ipv4 => "ipv4",
            IpFamily::Ipv6 => "ipv6",
            IpFamily::Dual => "dual",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab must run as root (it creates network namespaces and mounts)")]
    NotRoot,
    #[error(transparent)]
    Output(#[from] crate::cli::output::EncodeError),
    #[error("invalid lab name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("invalid {what}: {reason}")]
    InvalidArgument { what: String, reason: String },
    #[error(
        "lab {name} already exists (state {dir}, or its namespaces); run `wiremesh lab down --name {name}` first"
    )]
    AlreadyExists { name: String, dir: PathBuf },
    #[error("no lab {name}: {dir} has no lab.json (is it up?)")]
    NotFound { name: String, dir: PathBuf },
    #[error("unknown node or pod {node} in lab {lab}")]
    UnknownNode { lab: String, node: String },
    #[error("{step} ({object}): `{command}` failed: {detail}")]
    Command {
        step: String,
        object: String,
        command: String,
        detail: String,
    },
    #[error("{step} ({object}): could not run the command")]
    Spawn {
        step: String,
        object: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{step}: {path}")]
    Io {
        step: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lab state {path} is not valid")]
    State {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{step}: namespace {ns}")]
    Netns {
        step: String,
        ns: String,
        #[source]
        source: nix::Error,
    },
    #[error("{step} (etcd {object})")]
    Store {
        step: String,
        object: String,
        #[source]
        source: StoreError,
    },
    #[error("{step} (Kubernetes)")]
    Kube {
        step: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("timed out {step} ({object})")]
    Timeout { step: String, object: String },
    #[error("down left things behind: {0}")]
    Leftovers(String),
}

/// One node of the lab and its pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub index: u32,
    pub name: String,
    pub pod_name: String,
    pub netns: String,
    pub pod_netns: String,
    /// On every node (etcd is reached over it); registered in the datastore when the lab has
    /// IPv4.
    pub underlay_ip: Ipv4Addr,
    /// The IPv4 pod addresses; in an IPv6-only lab they are reserved but not configured.
    pub pod_cidr: Ipv4Net,
    pub gateway_ip: Ipv4Addr,
    pub pod_ip: Ipv4Addr,
    /// The IPv6 addresses, in labs with IPv6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<NodeIpv6>,
    /// The agent's `--state-dir`.
    pub state_dir: PathBuf,
    /// Bind-mounted over /run/wireguard in this node's processes (UAPI sockets are not per-netns).
    pub run_dir: PathBuf,
    pub log: PathBuf,
    pub agent_pid: Option<i32>,
    /// The API-server relay of a Kubernetes lab (see `k8s`).
    #[serde(default)]
    pub relay_pid: Option<i32>,
}

/// A lab node's IPv6 underlay and pod addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIpv6 {
    pub underlay_ip: Ipv6Addr,
    pub pod_cidr: Ipv6Net,
    pub gateway_ip: Ipv6Addr,
    pub pod_ip: Ipv6Addr,
}

impl NodeState {
    /// The underlay address of `family` (None: the lab has no IPv6).
    pub fn underlay(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => Some(self.underlay_ip.into()),
            Family::V6 => self.ipv6.as_ref().map(|v6| v6.underlay_ip.into()),
        }
    }

    /// The pod's address of `family`, when the lab has that family.
    pub fn pod_address(&self, family: Family, lab: IpFamily) -> Option<IpAddr> {
        if !lab.has(family) {
            return None;
        }
        match family {
            Family::V4 => Some(self.pod_ip.into()),
            Family::V6 => self.ipv6.as_ref().map(|v6| v6.pod_ip.into()),
        }
    }

    /// The pod CIDRs the node claims, IPv4 first.
    pub fn pod_cidrs(&self, lab: IpFamily) -> Vec<IpNet> {
        let mut out = Vec::new();
        if lab.has(Family::V4) {
            out.push(self.pod_cidr.into());
        }
        if let Some(v6) = self.ipv6.as_ref().filter(|_| lab.has(Family::V6)) {
            out.push(v6.pod_cidr.into());
        }
        out
    }
}

/// Everything `down` needs, persisted as `lab.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub dir: PathBuf,
    pub hub_netns: String,
    pub etcd_endpoint: String,
    pub etcd_pid: Option<i32>,
    pub etcd_data_dir: PathBuf,
    pub etcd_log: PathBuf,
    /// The wiremesh binary the agents run.
    pub binary: PathBuf,
    pub agents: bool,
    pub wireguard_backend: String,
    pub nodes: BTreeMap<u32, NodeState>,
    /// Kubernetes instead of etcd: the kubeconfig the lab was brought up with.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    #[serde(default)]
    pub ip_family: IpFamily,
    /// Pods made by `lab apply` of `v1` Pods, by `namespace/name`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pods: BTreeMap<String, pods::LabPod>,
    /// Kubernetes namespaces the lab knows (applied, or `default` once a pod used it), with
    /// their labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

/// Options of `lab up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub name: String,
    /// Defaults to `/run/wiremesh-lab/<name>`.
    pub state_dir: Option<PathBuf>,
    pub nodes: u32,
    pub encryption: bool,
    /// `wireguardKeepAlive` written to FelixConfiguration `default` (None: not set).
    pub keepalive: Option<String>,
    pub agents: bool,
    /// Defaults to this executable.
    pub binary: Option<PathBuf>,
    pub wireguard_backend: String,
    /// Use this cluster as the datastore (Node objects, FelixConfigurations) instead of etcd.
    pub kubeconfig: Option<PathBuf>,
    pub ip_family: IpFamily,
}

impl UpOptions {
    pub fn new(name: impl Into<String>, nodes: u32) -> Self {
        UpOptions {
            name: name.into(),
            state_dir: None,
            nodes,
            encryption: true,
            keepalive: Some("10s".into()),
            agents: true,
            binary: None,
            wireguard_backend: "userspace".into(),
            kubeconfig: None,
            ip_family: IpFamily::Ipv4,
        }
    }
}

/// A node or a pod, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Node(u32),
    Pod(u32),
}

impl Target {
    /// `node1`, `pod1`, or a bare `1` (a node).
    pub fn parse(text: &str) -> Option<Target> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("node") {
            return rest.parse().ok().map(Target::Node);
        }
        if let Some(rest) = text.strip_prefix("pod") {
            return rest.parse().ok().map(Target::Pod);
        }
        text.parse().ok().map(Target::Node)
    }

    pub fn index(self) -> u32 {
        match self {
            Target::Node(i) | Target::Pod(i) => i,
        }
    }
}

/// The labels of a lab node's object in the datastore (both datastores). The last two are
/// HostEndpoint-friendly (docs/policy.md): copy them onto a node's HEPs.
pub fn node_labels(node: &NodeState, lab: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), node.name.clone()),
        (k8s::LAB_LABEL.to_string(), lab.to_string()),
        ("wiremesh.io/node".to_string(), node.name.clone()),
        ("wiremesh.io/node-index".to_string(), node.index.to_string()),
    ])
}

/// Node `index`'s IPv6 addresses: underlay `fd00:172:30::<index>`, pods `fd00:10:244:<index>::/64`
/// (the index in hex, as IPv6 text has it).
fn node_ipv6(index: u32) -> Result<NodeIpv6, LabError> {
    let group = u16::try_from(index).map_err(|_| LabError::InvalidArgument {
        what: "node index".into(),
        reason: format!("{index} does not fit an IPv6 group"),
    })?;
    let pod = |last: u16| Ipv6Addr::new(0xfd00, 0x10, 0x244, group, 0, 0, 0, last);
    Ok(NodeIpv6 {
        underlay_ip: Ipv6Addr::new(0xfd00, 0x172, 0x30, 0, 0, 0, 0, group),
        pod_cidr: Ipv6Net::new(pod(0), 64).map_err(|e| LabError::InvalidArgument {
            what: "IPv6 pod CIDR".into(),
            reason: e.to_string(),
        })?,
        gateway_ip: pod(1),
        pod_ip: pod(2),
    })
}

pub fn validate_name(name: &str) -> Result<(), LabError> {
    let bad = |reason: &str| LabError::InvalidName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() || name.len() > 32 {
        return Err(bad("must be 1-32 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(bad("only letters, digits, '-' and '_' are allowed"));
    }
    Ok(())
}

pub fn default_state_dir(name: &str) -> PathBuf {
    Path::new(DEFAULT_STATE_ROOT).join(name)
}

pub fn hub_netns(name: &str) -> String {
    format!("wm-{name}-hub")
}

pub fn node_netns(name: &str, index: u32) -> String {
    format!("wm-{name}-n{index}")
}

pub fn pod_netns(name: &str, index: u32) -> String {
    format!("wm-{name}-p{index}")
}

/// The namespace of the `number`th pod made by `lab apply` (a workload).
pub fn workload_netns(name: &str, number: u32) -> String {
    format!("wm-{name}-w{number}")
}

/// Whether `ns` is one of lab `name`'s namespaces (exactly, so lab `a` never matches `a-b`'s).
pub fn is_lab_netns(name: &str, ns: &str) -> bool {
    let Some(rest) = ns.strip_prefix(&format!("wm-{name}-")) else {
        return false;
    };
    let numbered = |p: &str| {
        rest.strip_prefix(p)
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
    };
    rest == "hub" || numbered("n") || numbered("p") || numbered("w")
}

pub fn require_root() -> Result<(), LabError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(LabError::NotRoot)
    }
}

fn io_err(step: &str, path: &Path) -> impl FnOnce(std::io::Error) -> LabError {
    let (step, path) = (step.to_string(), path.to_path_buf());
    move |source| LabError::Io { step, path, source }
}

fn create_dir(step: &str, path: &Path) -> Result<(), LabError> {
    fs::create_dir_all(path).map_err(io_err(step, path))
}

/// A running (or half-built) lab.
#[derive(Debug, Clone)]
pub struct Lab {
    pub state: LabState,
}

impl Lab {
    /// Builds the lab: hub + etcd, nodes and pods, datastore content, agents. On failure it
    /// tears down whatever it made.
    pub async fn up(options: UpOptions) -> Result<Lab, LabError> {
        require_root()?;
        validate_name(&options.name)?;
        if options.nodes == 0 || options.nodes > MAX_NODES {
            return Err(LabError::InvalidArgument {
                what: "--nodes".into(),
                reason: format!("{} is not in 1-{MAX_NODES}", options.nodes),
            });
        }
        let dir = options
            .state_dir
            .clone()
            .unwrap_or_else(|| default_state_dir(&options.name));
        let exists = dir.join(STATE_FILE).exists()
            || sys::list_netns()
                .iter()
                .any(|ns| is_lab_netns(&options.name, ns));
        if exists {
            return Err(LabError::AlreadyExists {
                name: options.name.clone(),
                dir,
            });
        }
        let binary = match &options.binary {
            Some(b) => b.clone(),
            None => std::env::current_exe().map_err(io_err(
                "finding this executable",
                Path::new("/proc/self/exe"),
            ))?,
        };
        let mut lab = Lab {
            state: LabState {
                name: options.name.clone(),
                hub_netns: hub_netns(&options.name),
                etcd_endpoint: ETCD_ENDPOINT.into(),
                etcd_pid: None,
                etcd_data_dir: dir.join("etcd"),
                etcd_log: dir.join("logs").join("etcd.log"),
                binary,
                agents: options.agents,
                wireguard_backend: options.wireguard_backend.clone(),
                nodes: BTreeMap::new(),
                kubeconfig: options.kubeconfig.clone(),
                ip_family: options.ip_family,
                pods: BTreeMap::new(),
                namespaces: BTreeMap::new(),
                dir,
            },
        };
        match lab.build(&options).await {
            Ok(()) => Ok(lab),
            Err(e) => {
                warn!(error = %e, "lab up failed; tearing down what was made");
                if let Err(down) = down(&lab.state.name, Some(&lab.state.dir)) {
                    warn!(error = %down, "teardown after a failed up");
                }
                Err(e)
            }
        }
    }

    async fn build(&mut self, options: &UpOptions) -> Result<(), LabError> {
        let dir = self.state.dir.clone();
        create_dir("creating state dir", &dir.join("logs"))?;
        create_dir("creating etcd data dir", &self.state.etcd_data_dir)?;
        create_dir("creating pid dir", &dir.join("pids"))?;
        // Recorded before anything exists, so a crash at any later point can still be cleaned up.
        self.save()?;

        topology::create_hub(&self.state.hub_netns, self.state.ip_family)?;
        let mut spec = serde_json::json!({});
        for family in self.state.ip_family.families() {
            let field = match family {
                Family::V4 => "wireguardEnabled",
                Family::V6 => "wireguardEnabledV6",
            };
            spec[field] = Value::Bool(options.encryption);
        }
        if let Some(keepalive) = &options.keepalive {
            spec["wireguardKeepAlive"] = Value::String(keepalive.clone());
        }
        if let Some(kubeconfig) = &self.state.kubeconfig {
            let client = k8s::client(kubeconfig).await?;
            k8s::merge_felix_configuration(&client, "default", spec).await?;
        } else {
            self.start_etcd()?;
            self.save()?;
            self.with_store(
                "writing FelixConfiguration default",
                move |mut w| async move { w.put_felix_configuration("default", &spec).await },
            )
            .await?;
        }
        for i in 1..=options.nodes {
            self.add_node(i).await?;
        }
        if self.state.agents {
            // An agent that exits at once (bad flags, wrong binary) is worth saying so here.
            tokio::time::sleep(Duration::from_millis(300)).await;
            for n in self.state.nodes.values() {
                if !n.agent_pid.is_some_and(sys::is_alive) {
                    warn!(node = %n.name, log = %n.log.display(), "agent is not running");
                }
            }
        }
        info!(lab = %self.state.name, nodes = options.nodes, "lab is up");
        Ok(())
    }

    /// Loads a running lab by name from its default state directory.
    pub fn load(name: &str) -> Result<Lab, LabError> {
        validate_name(name)?;
        Lab::load_from(name, &default_state_dir(name))
    }

    pub fn load_from(name: &str, dir: &Path) -> Result<Lab, LabError> {
        let path = dir.join(STATE_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LabError::NotFound {
                    name: name.to_string(),
                    dir: dir.to_path_buf(),
                });
            }
            Err(e) => return Err(io_err("reading lab state", &path)(e)),
        };
        let state: LabState =
            serde_json::from_str(&text).map_err(|source| LabError::State { path, source })?;
        Ok(Lab { state })
    }

    /// Writes lab.json atomically.
    fn save(&self) -> Result<(), LabError> {
        let path = self.state.dir.join(STATE_FILE);
        let tmp = self.state.dir.join(format!("{STATE_FILE}.tmp"));
        let text = serde_json::to_string_pretty(&self.state).map_err(|source| LabError::State {
            path: path.clone(),
            source,
        })?;
        fs::write(&tmp, text).map_err(io_err("writing lab state", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("writing lab state", &path))
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn node(&self, index: u32) -> Result<&NodeState, LabError> {
        self.state
            .nodes
            .get(&index)
            .ok_or_else(|| LabError::UnknownNode {
                lab: self.state.name.clone(),
                node: format!("node{index}"),
            })
    }

    /// Resolves `node1` / `pod1` / `1`.
    pub fn target(&self, text: &str) -> Result<(Target, &NodeState), LabError> {
        let unknown = || LabError::UnknownNode {
            lab: self.state.name.clone(),
            node: text.to_string(),
        };
        let target = Target::parse(text).ok_or_else(unknown)?;
        let node = self.state.nodes.get(&target.index()).ok_or_else(unknown)?;
        Ok((target, node))
    }

    pub fn node_netns(&self, index: u32) -> String {
        node_netns(&self.state.name, index)
    }

    pub fn pod_netns(&self, index: u32) -> String {
        pod_netns(&self.state.name, index)
    }

    pub fn hub_netns(&self) -> &str {
        &self.state.hub_netns
    }

    /// Every namespace of this lab, pods first, hub last (the order `down` deletes them in).
    pub fn namespaces(&self) -> Vec<String> {
        let mut out: Vec<String> = self.state.pods.values().map(|p| p.netns.clone()).collect();
        out.extend(self.state.nodes.values().map(|n| n.pod_netns.clone()));
        out.extend(self.state.nodes.values().map(|n| n.netns.clone()));
        out.push(self.state.hub_netns.clone());
        out
    }

    pub async fn with_store<T, F, Fut>(&self, step: &str, f: F) -> Result<T, LabError>
    where
        T: Send + 'static,
        F: FnOnce(EtcdWriter) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        hub::with_store(&self.state.hub_netns, &self.state.etcd_endpoint, step, f).await
    }

    fn start_etcd(&mut self) -> Result<(), LabError> {
        let url = |port: u16| format!("http://{HUB_ADDRESS}:{port}");
        let args = vec![
            "--name".to_string(),
            "hub".into(),
            "--data-dir".into(),
            self.state.etcd_data_dir.display().to_string(),
            "--listen-client-urls".into(),
            format!("{},http://127.0.0.1:2379", url(2379)),
            "--advertise-client-urls".into(),
            url(2379),
            "--listen-peer-urls".into(),
            "http://127.0.0.1:2380".into(),
            "--initial-advertise-peer-urls".into(),
            "http://127.0.0.1:2380".into(),
            "--initial-cluster".into(),
            "hub=http://127.0.0.1:2380".into(),
            "--initial-cluster-state".into(),
            "new".into(),
        ];
        let pid = sys::spawn_daemon(
            &self.state.hub_netns,
            None,
            Path::new("etcd"),
            &args,
            &self.state.etcd_log,
            &self.state.dir.join("pids").join("etcd.pid"),
        )?;
        info!(pid, endpoint = %self.state.etcd_endpoint, "etcd started in the hub");
        self.state.etcd_pid = Some(pid);
        Ok(())
    }

    /// Adds node `index`: namespaces and links, routes to and from every other node, its Node
    /// object and pod-CIDR affinity, and its agent.
    pub async fn add_node(&mut self, index: u32) -> Result<(), LabError> {
        if index == 0 || index > MAX_NODES {
            return Err(LabError::InvalidArgument {
                what: "node index".into(),
                reason: format!("{index} is not in 1-{MAX_NODES}"),
            });
        }
        if self.state.nodes.contains_key(&index) {
            return Err(LabError::InvalidArgument {
                what: "node index".into(),
                reason: format!("node{index} already exists"),
            });
        }
        let octet = u8::try_from(index).map_err(|_| LabError::InvalidArgument {
            what: "node index".into(),
            reason: format!("{index} does not fit an address octet"),
        })?;
        let node_dir = self.state.dir.join("nodes").join(format!("node{index}"));
        let node = NodeState {
            index,
            name: format!("node{index}"),
            pod_name: format!("pod{index}"),
            netns: self.node_netns(index),
            pod_netns: self.pod_netns(index),
            underlay_ip: Ipv4Addr::new(172, 30, 0, octet),
            pod_cidr: Ipv4Net::new(Ipv4Addr::new(10, 244, octet, 0), 24).map_err(|e| {
                LabError::InvalidArgument {
                    what: "pod CIDR".into(),
                    reason: e.to_string(),
                }
            })?,
            gateway_ip: Ipv4Addr::new(10, 244, octet, 1),
            pod_ip: Ipv4Addr::new(10, 244, octet, 2),
            ipv6: self
                .state
                .ip_family
                .has(Family::V6)
                .then(|| node_ipv6(index))
                .transpose()?,
            state_dir: node_dir.join("state"),
            run_dir: node_dir.join("run"),
            log: self.state.dir.join("logs").join(format!("node{index}.log")),
            agent_pid: None,
            relay_pid: None,
        };
        create_dir("creating node state dir", &node.state_dir)?;
        create_dir("creating node run dir", &node.run_dir)?;
        self.state.nodes.insert(index, node.clone());
        self.save()?;

        let family = self.state.ip_family;
        topology::create_node(&self.state.hub_netns, &node, family)?;
        for other in self.state.nodes.values().filter(|n| n.index != index) {
            topology::add_pod_route(&node, other, family)?;
            topology::add_pod_route(other, &node, family)?;
        }
        let registration = NodeRegistration {
            name: node.name.clone(),
            ipv4_address: family
                .has(Family::V4)
                .then(|| format!("{}/24", node.underlay_ip)),
            ipv6_address: node
                .ipv6
                .as_ref()
                .map(|v6| format!("{}/64", v6.underlay_ip)),
            labels: node_labels(&node, &self.state.name),
        };
        let cidrs = node.pod_cidrs(family);
        if let Some(kubeconfig) = self.state.kubeconfig.clone() {
            let client = k8s::client(&kubeconfig).await?;
            k8s::register_node(&client, &node, &self.state.name, family).await?;
            self.start_relay(&node, &kubeconfig)?;
        } else {
            let step = format!("registering {}", node.name);
            self.with_store(&step, move |mut w| async move {
                w.put_node(&registration).await?;
                for cidr in &cidrs {
                    w.put_block_affinity(&registration.name, cidr).await?;
                }
                Ok(())
            })
            .await?;
        }
        if self.state.agents {
            self.start_agent(&node.name)?;
        }
        info!(node = %node.name, "node added");
        Ok(())
    }

    /// Removes node `index`: its datastore objects, its processes, its namespaces and routes.
    pub async fn remove_node(&mut self, index: u32) -> Result<(), LabError> {
        let node = self.node(index)?.clone();
        let (name, cidrs) = (node.name.clone(), node.pod_cidrs(self.state.ip_family));
        if let Some(kubeconfig) = &self.state.kubeconfig {
            let client = k8s::client(kubeconfig).await?;
            k8s::delete_node(&client, &name).await?;
        } else {
            self.with_store(&format!("deregistering {name}"), move |mut w| async move {
                // Node first, as in a cluster (IPAM releases the block later): peers then drop
                // the node in one step instead of first seeing it without its pod CIDR.
                w.delete_node(&name).await?;
                for cidr in &cidrs {
                    w.delete_block_affinity(&name, cidr).await?;
                }
                Ok(())
            })
            .await?;
        }
        clear_netns(&[node.pod_netns.clone(), node.netns.clone()])?;
        for other in self.state.nodes.values().filter(|n| n.index != index) {
            if let Err(e) = topology::delete_pod_route(other, &node, self.state.ip_family) {
                warn!(error = %e, "route to the removed node was already gone");
            }
        }
        self.state.nodes.remove(&index);
        self.save()?;
        if let Some(dir) = node.state_dir.parent() {
            let _ = fs::remove_dir_all(dir);
        }
        info!(node = %node.name, "node removed");
        Ok(())
    }

    /// Starts `node`'s agent as a daemon in the node's namespace with its private /run/wireguard.
    pub fn start_agent(&mut self, node: &str) -> Result<i32, LabError> {
        let (_, n) = self.target(node)?;
        let n = n.clone();
        if let Some(pid) = n
            .agent_pid
            .filter(|p| sys::is_alive(*p) && sys::pid_in_netns(*p, &n.netns))
        {
            return Err(LabError::InvalidArgument {
                what: "start agent".into(),
                reason: format!("{} already runs an agent (pid {pid})", n.name),
            });
        }
        let mut args = vec!["agent".to_string(), "--node-name".into(), n.name.clone()];
        for (flag, value) in self.datastore_flags(&n) {
            args.extend([format!("--{flag}"), value]);
        }
        args.extend([
            "--state-dir".into(),
            n.state_dir.display().to_string(),
            "--wireguard-backend".into(),
            self.state.wireguard_backend.clone(),
        ]);
        let pid = sys::spawn_daemon(
            &n.netns,
            Some(&n.run_dir),
            &self.state.binary,
            &args,
            &n.log,
            &self.state.dir.join("pids").join(format!("{}.pid", n.name)),
        )?;
        info!(node = %n.name, pid, "agent started");
        if let Some(entry) = self.state.nodes.get_mut(&n.index) {
            entry.agent_pid = Some(pid);
        }
        self.save()?;
        Ok(pid)
    }

    /// Starts the API-server relay in `node`'s namespace and writes the agent's kubeconfig
    /// pointing at it (see `k8s`).
    fn start_relay(&mut self, node: &NodeState, kubeconfig: &Path) -> Result<(), LabError> {
        let target = k8s::agent_kubeconfig(kubeconfig, &agent_kubeconfig_path(node))?;
        let args = vec![
            "lab".to_string(),
            "relay".into(),
            "--listen".into(),
            k8s::RELAY_LISTEN.into(),
            "--listen-netns".into(),
            Path::new(sys::NETNS_DIR)
                .join(&node.netns)
                .display()
                .to_string(),
            "--connect".into(),
            target,
        ];
        // In the host's namespace (""), from where the API server is reachable.
        let pid = sys::spawn_daemon(
            "",
            None,
            &self.state.binary,
            &args,
            &self
                .state
                .dir
                .join("logs")
                .join(format!("{}-relay.log", node.name)),
            &self
                .state
                .dir
                .join("pids")
                .join(format!("{}-relay.pid", node.name)),
        )?;
        info!(node = %node.name, pid, "API-server relay started");
        if let Some(entry) = self.state.nodes.get_mut(&node.index) {
            entry.relay_pid = Some(pid);
        }
        self.save()
    }

    /// Stops `node`'s agent (SIGTERM, then SIGKILL), leaving whatever it started (wireguard-go)
    /// running, as a real agent restart would.
    pub fn stop_agent(&mut self, node: &str) -> Result<(), LabError> {
        let (_, n) = self.target(node)?;
        let n = n.clone();
        if let Some(pid) = n.agent_pid.filter(|p| sys::pid_in_netns(*p, &n.netns)) {
            let left = sys::terminate(&[pid], STOP_GRACE, || {
                if sys::is_alive(pid) {
                    vec![pid]
                } else {
                    Vec::new()
                }
            });
            if !left.is_empty() {
                return Err(LabError::Leftovers(format!(
                    "agent of {} (pid {pid})",
                    n.name
                )));
            }
            // Wait (best effort) until PID 1 has reaped it, so callers see it gone.
            sys::wait_until(STOP_GRACE, || !Path::new(&format!("/proc/{pid}")).exists());
            info!(node = %n.name, pid, "agent stopped");
        }
        if let Some(entry) = self.state.nodes.get_mut(&n.index) {
            entry.agent_pid = None;
        }
        self.save()
    }

    pub fn restart_agent(&mut self, node: &str) -> Result<i32, LabError> {
        self.stop_agent(node)?;
        self.start_agent(node)
    }

    /// Runs `cmd` in a node (inside its namespace and its /run/wireguard mount, so `wg show`
    /// works) or in a pod, and collects its output.
    pub fn exec_in_node<S: AsRef<OsStr>>(&self, node: &str, cmd: &[S]) -> Result<Output, LabError> {
        let args = self.exec_args(node, cmd)?;
        sys::output("running a command", node, "ip", &args)
    }

    /// The `ip netns exec ...` argument list that runs `cmd` in `node` or a pod.
    pub fn exec_args<S: AsRef<OsStr>>(
        &self,
        node: &str,
        cmd: &[S],
    ) -> Result<Vec<String>, LabError> {
        if cmd.is_empty() {
            return Err(LabError::InvalidArgument {
                what: "command".into(),
                reason: "is empty".into(),
            });
        }
        let mut args = vec!["netns".to_string(), "exec".into()];
        if let Some(pod) = self.state.pods.get(node) {
            args.push(pod.netns.clone());
            args.extend(
                cmd.iter()
                    .map(|c| c.as_ref().to_string_lossy().into_owned()),
            );
            return Ok(args);
        }
        let (target, n) = self.target(node)?;
        match target {
            Target::Pod(_) => args.push(n.pod_netns.clone()),
            Target::Node(_) => {
                args.push(n.netns.clone());
                // The node's own environment, so `wiremesh status` (or any wiremesh command)
                // needs no flags there: its state directory and datastore, and this binary.
                args.push("env".into());
                args.extend(self.node_environment(n));
                args.extend([
                    "sh".into(),
                    "-c".into(),
                    r#"mkdir -p /run/wireguard && mount --bind "$0" /run/wireguard && exec "$@""#
                        .into(),
                    n.run_dir.display().to_string(),
                ]);
            }
        }
        args.extend(
            cmd.iter()
                .map(|c| c.as_ref().to_string_lossy().into_owned()),
        );
        Ok(args)
    }

    /// The datastore flags of `node`'s agent (flag name without `--`, value): etcd on the hub,
    /// or the Kubernetes API through the node's relay.
    fn datastore_flags(&self, node: &NodeState) -> Vec<(&'static str, String)> {
        if self.state.kubeconfig.is_some() {
            vec![
                ("datastore", "kubernetes".into()),
                (
                    "kubeconfig",
                    agent_kubeconfig_path(node).display().to_string(),
                ),
            ]
        } else {
            vec![
                ("datastore", "etcd".into()),
                ("etcd-endpoints", self.state.etcd_endpoint.clone()),
            ]
        }
    }

    /// `NAME=VALUE` for `env`: what `lab exec <node>` sets, the agent's own flags as their
    /// `WIREMESH_*` variables, and `PATH` led by the directory of the lab's wiremesh binary.
    fn node_environment(&self, node: &NodeState) -> Vec<String> {
        let variable = |flag: &str| format!("WIREMESH_{}", flag.to_uppercase().replace('-', "_"));
        let mut env = vec![
            format!("{}={}", variable("node-name"), node.name),
            format!("{}={}", variable("state-dir"), node.state_dir.display()),
        ];
        env.extend(
            self.datastore_flags(node)
                .into_iter()
                .map(|(flag, value)| format!("{}={value}", variable(flag))),
        );
        let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        match self
            .state
            .binary
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            Some(dir) => env.push(format!("PATH={}:{path}", dir.display())),
            None => env.push(format!("PATH={path}")),
        }
        env
    }

    /// Address of a node (underlay) or pod, in the lab's first family (IPv4 unless IPv6-only).
    pub fn address_of(&self, target: &str) -> Result<IpAddr, LabError> {
        self.address_in(target, self.state.ip_family.families()[0])
    }

    /// Address of a node (underlay) or pod in `family`.
    pub fn address_in(&self, target: &str, family: Family) -> Result<IpAddr, LabError> {
        let (t, n) = self.target(target)?;
        let address = match t {
            Target::Node(_) => n.underlay(family),
            Target::Pod(_) => n.pod_address(family, self.state.ip_family),
        };
        address.ok_or_else(|| LabError::InvalidArgument {
            what: target.to_string(),
            reason: format!(
                "has no {family} address in this lab (--ip-family {})",
                self.state.ip_family.name()
            ),
        })
    }

    /// Pings `to` from `from` (each a node or pod) in the lab's first family; returns how
    /// many replies came back.
    pub fn ping(&self, from: &str, to: &str, count: u32) -> Result<PingResult, LabError> {
        self.ping_in(from, to, count, self.state.ip_family.families()[0])
    }

    /// Pings `to`'s `family` address from `from`.
    pub fn ping_in(
        &self,
        from: &str,
        to: &str,
        count: u32,
        family: Family,
    ) -> Result<PingResult, LabError> {
        let (t, n) = self.target(from)?;
        let ns = match t {
            Target::Node(_) => n.netns.clone(),
            Target::Pod(_) => n.pod_netns.clone(),
        };
        let address = self.address_in(to, family)?.to_string();
        let count_text = count.to_string();
        let output = sys::output(
            "pinging",
            &format!("{from} -> {to}"),
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "ping",
                "-n",
                "-q",
                "-c",
                &count_text,
                "-i",
                "0.2",
                "-W",
                "2",
                &address,
            ],
        )?;
        let text = String::from_utf8_lossy(&output.stdout);
        let received = text
            .lines()
            .find(|l| l.contains("received"))
            .and_then(|l| l.split(',').nth(1))
            .and_then(|part| part.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        Ok(PingResult {
            sent: count,
            received,
        })
    }

    pub async fn write_raw(&self, key: &str, value: &str) -> Result<(), LabError> {
        let (key, value) = (key.to_string(), value.to_string());
        self.with_store(&format!("writing {key}"), move |mut w| async move {
            w.put_raw(&key, value).await
        })
        .await
    }

    pub async fn read_raw(&self, key: &str) -> Result<Option<String>, LabError> {
        let key = key.to_string();
        let value = self
            .with_store(&format!("reading {key}"), move |mut w| async move {
                w.get_raw(&key).await
            })
            .await?;
        Ok(value.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }

    pub async fn delete_raw(&self, key: &str) -> Result<(), LabError> {
        let key = key.to_string();
        self.with_store(&format!("deleting {key}"), move |mut w| async move {
            w.delete_raw(&key).await
        })
        .await
    }

    /// Sets one FelixConfiguration field, in `default` or (with `node`) in `node.<name>`.
    /// `Value::Null` removes the field. A value the agent would not take (wrong type, out of
    /// range, a field no Felix has) is refused and nothing is written.
    pub async fn set(&self, field: &str, value: Value, node: Option<&str>) -> Result<(), LabError> {
        let object = match node {
            None => "default".to_string(),
            Some(n) => format!("node.{}", self.target(n)?.1.name),
        };
        check_felix_field(&object, field, &value)?;
        if let Some(kubeconfig) = &self.state.kubeconfig {
            let client = k8s::client(kubeconfig).await?;
            let mut spec = serde_json::Map::new();
            spec.insert(field.to_string(), value);
            return k8s::merge_felix_configuration(&client, &object, Value::Object(spec)).await;
        }
        let field = field.to_string();
        self.with_store(
            &format!("setting {field} in FelixConfiguration {object}"),
            move |mut w| async move { w.patch_felix_configuration(&object, &field, value).await },
        )
        .await
    }

    /// One line per node: namespaces present, agent alive.
    /// `wiremesh status --output json` run in every node (a node whose report cannot be read
    /// is left out: the graph shows it without a report).
    pub fn status_reports(&self) -> Result<Vec<crate::cli::status::StatusReport>, LabError> {
        let mut reports = Vec::new();
        for n in self.state.nodes.values() {
            let state_dir = n.state_dir.display().to_string();
            let binary = self.state.binary.display().to_string();
            let out = self.exec_in_node(
                &n.name,
                &[
                    binary.as_str(),
                    "status",
                    "--output",
                    "json",
                    "--state-dir",
                    &state_dir,
                ],
            )?;
            match serde_json::from_slice(&out.stdout) {
                Ok(report) => reports.push(report),
                Err(e) => warn!(node = %n.name, error = %e, "no status report"),
            }
        }
        Ok(reports)
    }

    /// What `lab status` shows: the hub, each node and pod namespace, and whether the
    /// processes are alive.
    pub fn status_report(&self) -> LabStatus {
        let alive = |pid: Option<i32>, ns: &str| match pid {
            Some(p) if sys::is_alive(p) && sys::pid_in_netns(p, ns) => format!("running (pid {p})"),
            Some(p) => format!("dead (pid {p})"),
            None => "not started".into(),
        };
        let s = &self.state;
        LabStatus {
            lab: s.name.clone(),
            state_dir: s.dir.clone(),
            hub: s.hub_netns.clone(),
            hub_present: sys::netns_exists(&s.hub_netns),
            datastore: s.etcd_endpoint.clone(),
            etcd: alive(s.etcd_pid, &s.hub_netns),
            nodes: s
                .nodes
                .values()
                .map(|n| LabNodeStatus {
                    node: n.name.clone(),
                    netns: n.netns.clone(),
                    netns_present: sys::netns_exists(&n.netns),
                    underlay: join_addresses(
                        s.ip_family
                            .families()
                            .into_iter()
                            .filter_map(|f| n.underlay(f)),
                    ),
                    pod_netns: n.pod_netns.clone(),
                    pod_netns_present: sys::netns_exists(&n.pod_netns),
                    pod: join_addresses(
                        s.ip_family
                            .families()
                            .into_iter()
                            .filter_map(|f| n.pod_address(f, s.ip_family)),
                    ),
                    agent: if s.agents {
                        alive(n.agent_pid, &n.netns)
                    } else {
                        "disabled".into()
                    },
                })
                .collect(),
            pods: s
                .pods
                .values()
                .map(|p| LabPodStatus {
                    pod: p.key(),
                    node: p.node_name.clone(),
                    netns: p.netns.clone(),
                    netns_present: sys::netns_exists(&p.netns),
                    interface: p.interface.clone(),
                    addresses: join_addresses(p.addresses().into_iter()),
                    server: match p.server_pid {
                        None => "none (no TCP or UDP ports)".into(),
                        pid => alive(pid, &p.netns),
                    },
                })
                .collect(),
        }
    }
}

/// `wiremesh lab status` (`-o json|yaml` for scripts).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LabStatus {
    pub lab: String,
    pub state_dir: PathBuf,
    pub hub: String,
    pub hub_present: bool,
    /// The etcd endpoint (on the hub).
    pub datastore: String,
    pub etcd: String,
    pub nodes: Vec<LabNodeStatus>,
    /// Pods made by `lab apply`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<LabPodStatus>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LabPodStatus {
    /// `namespace/name`.
    pub pod: String,
    pub node: String,
    pub netns: String,
    pub netns_present: bool,
    /// The node side of its veth.
    pub interface: String,
    pub addresses: String,
    /// Its port server.
    pub server: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LabNodeStatus {
    pub node: String,
    pub netns: String,
    pub netns_present: bool,
    /// The lab's families' underlay addresses, comma-separated.
    pub underlay: String,
    pub pod_netns: String,
    pub pod_netns_present: bool,
    /// The pod's addresses, comma-separated.
    pub pod: String,
    pub agent: String,
}

impl LabStatus {
    pub fn text(&self) -> String {
        let present = |p: bool| if p { "present" } else { "MISSING" };
        let mut out = format!("lab {}  state {}\n", self.lab, self.state_dir.display());
        out.push_str(&format!(
            "hub {} {}  etcd {} {}\n",
            self.hub,
            present(self.hub_present),
            self.datastore,
            self.etcd
        ));
        let mut table = crate::cli::output::Table::new(&[
            "NODE",
            "NAMESPACE",
            "",
            "UNDERLAY",
            "POD NAMESPACE",
            "",
            "POD",
            "AGENT",
        ]);
        for n in &self.nodes {
            table.row(vec![
                n.node.clone(),
                n.netns.clone(),
                present(n.netns_present).into(),
                n.underlay.clone(),
                n.pod_netns.clone(),
                present(n.pod_netns_present).into(),
                n.pod.clone(),
                n.agent.clone(),
            ]);
        }
        out.push_str(&table.render(""));
        if !self.pods.is_empty() {
            let mut pods = crate::cli::output::Table::new(&[
                "POD",
                "NODE",
                "NAMESPACE",
                "",
                "INTERFACE",
                "ADDRESSES",
                "SERVER",
            ]);
            for p in &self.pods {
                pods.row(vec![
                    p.pod.clone(),
                    p.node.clone(),
                    p.netns.clone(),
                    present(p.netns_present).into(),
                    p.interface.clone(),
                    p.addresses.clone(),
                    p.server.clone(),
                ]);
            }
            out.push('\n');
            out.push_str(&pods.render(""));
        }
        out
    }
}

fn join_addresses(addresses: impl Iterator<Item = IpAddr>) -> String {
    addresses
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingResult {
    pub sent: u32,
    pub received: u32,
}

impl PingResult {
    pub fn reachable(&self) -> bool {
        self.received > 0
    }
}

pub fn start_agent(lab: &mut Lab, node: &str) -> Result<i32, LabError> {
    lab.start_agent(node)
}

pub fn stop_agent(lab: &mut Lab, node: &str) -> Result<(), LabError> {
    lab.stop_agent(node)
}

pub fn restart_agent(lab: &mut Lab, node: &str) -> Result<i32, LabError> {
    lab.restart_agent(node)
}

/// Whether `pid` is alive and one of our relays (a pid may have been reused).
fn is_relay(pid: i32) -> bool {
    sys::is_alive(pid)
        && fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("--listen-netns"))
}

/// The kubeconfig a Kubernetes lab's agent uses (pointing at its relay).
fn agent_kubeconfig_path(node: &NodeState) -> PathBuf {
    node.state_dir
        .parent()
        .unwrap_or(&node.state_dir)
        .join("kubeconfig")
}

/// Kills every process in `namespaces` (this also catches daemonized wireguard-go, etcd and
/// stray captures, and with them their mounts), then deletes the namespaces, in order.
fn clear_netns(namespaces: &[String]) -> Result<(), LabError> {
    let existing: Vec<&String> = namespaces
        .iter()
        .filter(|ns| sys::netns_exists(ns))
        .collect();
    let all_pids = || -> Vec<i32> { existing.iter().flat_map(|ns| sys::netns_pids(ns)).collect() };
    let pids = all_pids();
    if !pids.is_empty() {
        info!(?existing, ?pids, "stopping processes");
        let left = sys::terminate(&pids, STOP_GRACE, all_pids);
        if !left.is_empty() {
            return Err(LabError::Leftovers(format!(
                "processes {left:?} in {existing:?}"
            )));
        }
        // Daemons were re-parented to PID 1, which reaps them a little later; wait for that so
        // no zombie outlives `down` (best effort).
        sys::wait_until(Duration::from_secs(3), || {
            pids.iter()
                .all(|p| !Path::new(&format!("/proc/{p}")).exists())
        });
    }
    for ns in existing {
        sys::ip("deleting namespace", ns, &format!("netns del {ns}"))?;
    }
    Ok(())
}

/// Removes every namespace, process and file of lab `name`. Works from lab.json, and without
/// it from the namespace names alone. Idempotent.
pub fn down(name: &str, state_dir: Option<&Path>) -> Result<(), LabError> {
    require_root()?;
    validate_name(name)?;
    let dir = state_dir.map_or_else(|| default_state_dir(name), Path::to_path_buf);
    let mut relays = Vec::new();
    let mut kubeconfig = None;
    let mut pod_objects = Vec::new();
    let mut namespaces = match Lab::load_from(name, &dir) {
        Ok(lab) => {
            kubeconfig = lab.state.kubeconfig.clone();
            pod_objects = lab
                .state
                .pods
                .values()
                .map(|p| (p.namespace.clone(), p.name.clone()))
                .collect();
            relays = lab
                .state
                .nodes
                .values()
                .filter_map(|n| n.relay_pid)
                .filter(|pid| is_relay(*pid))
                .collect();
            lab.namespaces()
        }
        Err(LabError::NotFound { .. }) => Vec::new(),
        Err(e) => {
            warn!(error = %e, "lab state unreadable; cleaning up by namespace names");
            Vec::new()
        }
    };
    // Also whatever exists under the lab's prefix (a crash between creating and recording).
    for ns in sys::list_netns() {
        if is_lab_netns(name, &ns) && !namespaces.contains(&ns) {
            namespaces.insert(0, ns);
        }
    }
    // Every process first (an agent may still be reconfiguring its node), then the namespaces;
    // the hub goes last so etcd outlives the agents.
    let mut problems = Vec::new();
    if let Some(kubeconfig) = &kubeconfig {
        // Only the Pod objects of its pods and the Node objects this lab created (labelled
        // with its name).
        match k8s::delete_lab_objects_blocking(kubeconfig, name, pod_objects) {
            Ok(deleted) => {
                info!(lab = name, objects = ?deleted, "deleted the lab's Pod and Node objects")
            }
            Err(e) => problems.push(format!("Pod and Node objects of the lab: {e}")),
        }
    }
    if !relays.is_empty() {
        // The API-server relays of a Kubernetes lab live in the host's namespace.
        let left = sys::terminate(&relays, STOP_GRACE, || {
            relays.iter().copied().filter(|p| is_relay(*p)).collect()
        });
        if !left.is_empty() {
            problems.push(format!("relay processes {left:?}"));
        }
    }
    let (hub, rest): (Vec<String>, Vec<String>) = namespaces
        .into_iter()
        .partition(|ns| *ns == hub_netns(name));
    for group in [rest, hub] {
        if let Err(e) = clear_netns(&group) {
            problems.push(e.to_string());
        }
    }
    if dir.exists()
        && let Err(e) = fs::remove_dir_all(&dir)
    {
        problems.push(format!("removing {}: {e}", dir.display()));
    }
    if state_dir.is_none() {
        // Only succeeds when no other lab is left.
        let _ = fs::remove_dir(DEFAULT_STATE_ROOT);
    }
    if problems.is_empty() {
        info!(lab = name, "lab is down");
        Ok(())
    } else {
        Err(LabError::Leftovers(problems.join("; ")))
    }
}

/// Refuses a FelixConfiguration field value the agent would not take.
fn check_felix_field(object: &str, field: &str, value: &Value) -> Result<(), LabError> {
    if value.is_null() {
        return Ok(());
    }
    let refuse = |reason: String| LabError::InvalidArgument {
        what: format!("FelixConfiguration {object} field {field}"),
        reason,
    };
    let stored = FelixConfigurationSpec::from_object(&serde_json::json!({
        "spec": { field: value }
    }));
    if let Some(e) = config::check_object(object, &stored).first() {
        return Err(refuse(e.problem()));
    }
    if let Ok(decoded) = &stored
        && !config::unknown_fields(decoded).is_empty()
    {
        return Err(refuse(
            "is not a FelixConfiguration field (docs/encryption.md lists the fields wiremesh reads)"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_namespaces_match_exactly() {
        assert!(is_lab_netns("a", "wm-a-hub"));
        assert!(is_lab_netns("a", "wm-a-n12"));
        assert!(is_lab_netns("a", "wm-a-p3"));
        assert!(is_lab_netns("a", "wm-a-w7"));
        assert!(!is_lab_netns("a", "wm-a-w"));
        assert!(!is_lab_netns("a", "wm-a-b-hub"));
        assert!(!is_lab_netns("a", "wm-a-n"));
        assert!(!is_lab_netns("a", "wm-ab-hub"));
        assert!(!is_lab_netns("a", "lab-n1"));
    }

    #[test]
    fn targets_parse() {
        assert_eq!(Target::parse("node2"), Some(Target::Node(2)));
        assert_eq!(Target::parse("pod3"), Some(Target::Pod(3)));
        assert_eq!(Target::parse("4"), Some(Target::Node(4)));
        assert_eq!(Target::parse("nodeX"), None);
    }

    #[test]
    fn ipv6_addresses_follow_the_node_index() {
        let v6 = node_ipv6(10).expect("index fits");
        assert_eq!(v6.underlay_ip.to_string(), "fd00:172:30::a");
        assert_eq!(v6.pod_cidr.to_string(), "fd00:10:244:a::/64");
        assert_eq!(v6.gateway_ip.to_string(), "fd00:10:244:a::1");
        assert_eq!(v6.pod_ip.to_string(), "fd00:10:244:a::2");
        assert_ne!(
            node_ipv6(MAX_NODES).expect("fits").underlay_ip,
            HUB_ADDRESS_V6
        );
        assert_eq!(IpFamily::Dual.families(), [Family::V4, Family::V6]);
        assert!(!IpFamily::Ipv6.has(Family::V4));
    }

    #[test]
    fn a_lab_json_of_an_older_version_is_an_ipv4_lab() {
        let state: LabState = serde_json::from_value(serde_json::json!({
            "name": "a", "dir": "/tmp/a", "hub_netns": "wm-a-hub",
            "etcd_endpoint": "http://172.30.0.254:2379", "etcd_pid": null,
            "etcd_data_dir": "/tmp/a/etcd", "etcd_log": "/tmp/a/etcd.log",
            "binary": "/bin/true", "agents": true, "wireguard_backend": "userspace",
            "nodes": {}
        }))
        .expect("decodes");
        assert_eq!(state.ip_family, IpFamily::Ipv4);
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("wiremesh").is_ok());
        assert!(validate_name("t-1_a").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("../x").is_err());
        assert!(validate_name(&"x".repeat(33)).is_err());
    }
}

//! `wiremesh policy`: checks and queries over policy resources from manifests and/or a
//! datastore (read-only). The analyses themselves are `wiremesh_core::policy`; this module
//! reads, and prints in `-o text|json|yaml`.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::Serialize;
use wiremesh_core::manifest::Manifest;
use wiremesh_core::policy::analysis::{Finding, unused};
use wiremesh_core::policy::explain::{
    Outcome, Packet, PacketPath, PodStage, Verdict, explain, explain_pods,
};
use wiremesh_core::policy::model::Protocol;
use wiremesh_core::policy::program::{PolicyInputs, PolicySettings, compile};
use wiremesh_core::policy::resources::PolicyResources;
use wiremesh_core::policy::workload;
use wiremesh_core::selector::Scope;
use wiremesh_core::wire::RawPolicyResources;
use wiremesh_datastore::{DatastoreError, ReadScope};

use super::datastore::DatastoreArgs;
use super::output::{self, EncodeError, OutputArgs};

#[derive(Debug, thiserror::Error)]
pub enum PolicyToolError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading policy from the datastore")]
    Datastore(#[from] DatastoreError),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Where resources come from: manifest files and/or a datastore (read-only).
#[derive(Debug, Clone, clap::Args)]
pub struct Source {
    /// projectcalico.org/v3 manifests (YAML or JSON, multi-document); repeatable.
    #[arg(short = 'f', long = "file")]
    pub files: Vec<PathBuf>,
    /// Read the resources from this datastore too (the same flags as every command).
    #[command(flatten)]
    pub datastore: DatastoreArgs,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum PolicyCommand {
    /// Validate manifests offline; prints positioned errors, exit 1 if any.
    Check {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Which host endpoints a GlobalNetworkPolicy applies to (directions and flavour).
    WhichEndpoints {
        /// Policy name (`name`, or `namespace/name` for a NetworkPolicy).
        policy: String,
        #[command(flatten)]
        source: Source,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Policies that apply to no host endpoint or sit in an unreachable tier, tiers that do not
    /// exist, rules whose selector or named ports match nothing.
    Unused {
        #[command(flatten)]
        source: Source,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Which tier, policy and rule decide a packet (or a connection between two pods), and
    /// the verdict.
    Explain(Box<ExplainArgs>),
}

/// `policy explain`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    source: Source,
    /// The node whose host endpoints are evaluated (default: the only node with any).
    #[arg(long)]
    node: Option<String>,
    /// A pod-to-pod connection instead of a packet on a host interface: the source pod
    /// (`namespace/pod`); needs --to.
    #[arg(long, requires = "to", conflicts_with_all = ["iface", "src", "dst"])]
    from: Option<String>,
    /// The destination pod (`namespace/pod`); needs --from.
    #[arg(long, requires = "from")]
    to: Option<String>,
    /// With --from/--to: `PORT/PROTOCOL` (`80/TCP`, `53/UDP`; TCP when only a port).
    #[arg(long, requires = "from")]
    port: Option<String>,
    /// Input interface (output interface with --path output).
    #[arg(long, required_unless_present = "from")]
    iface: Option<String>,
    #[arg(long, required_unless_present = "from")]
    src: Option<IpAddr>,
    #[arg(long, required_unless_present = "from")]
    dst: Option<IpAddr>,
    /// tcp, udp, icmp, icmpv6, sctp or a number.
    #[arg(long, default_value = "tcp")]
    proto: String,
    #[arg(long)]
    dport: Option<u16>,
    #[arg(long, default_value_t = 40000)]
    sport: u16,
    #[arg(long)]
    icmp_type: Option<u8>,
    #[arg(long)]
    icmp_code: Option<u8>,
    /// input (to this host), output (from this host) or forward.
    #[arg(long, default_value = "input")]
    path: String,
    /// Output interface of a forwarded packet.
    #[arg(long)]
    out_iface: Option<String>,
    /// WireGuard listening port accepted on host interfaces.
    #[arg(long, default_value_t = 51820)]
    wireguard_port: u16,
    #[command(flatten)]
    output: OutputArgs,
}

/// Loads manifests and the datastore's policy resources.
async fn load(source: &Source) -> Result<RawPolicyResources, PolicyToolError> {
    let mut raw = RawPolicyResources::default();
    for path in &source.files {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyToolError::Read {
            path: path.clone(),
            source,
        })?;
        let m = Manifest::parse(&path.display().to_string(), &text);
        for (kind, objects) in m.raw().objects {
            for (k, v) in objects {
                raw.insert(kind, k, v);
            }
        }
    }
    let datastore = source.datastore.config();
    if let Some(config) = &datastore {
        let store = config.connect(true).await?;
        for (kind, objects) in store.read_once(ReadScope::POLICY).await?.policy.objects {
            for (key, value) in objects {
                raw.insert(kind, key, value);
            }
        }
    }
    if source.files.is_empty() && datastore.is_none() {
        return Err(PolicyToolError::Usage(
            "give manifests with -f FILE or a datastore with --etcd-endpoints or --datastore kubernetes"
                .into(),
        ));
    }
    Ok(raw)
}

/// Validates; objects that fail are reported on stderr and left out.
fn validated(raw: &RawPolicyResources) -> PolicyResources {
    let res = PolicyResources::from_raw(raw);
    for e in &res.errors {
        eprintln!("skipped invalid object: {e}");
    }
    res
}

/// `policy check`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckReport {
    pub objects: usize,
    /// `file:line: problem`, one per problem.
    pub problems: Vec<String>,
    /// `file:line: field has no effect ...`: reported, but the check passes.
    pub warnings: Vec<String>,
}

impl CheckReport {
    fn text(&self) -> String {
        let mut out: String = self
            .problems
            .iter()
            .chain(&self.warnings)
            .map(|p| format!("{p}\n"))
            .collect();
        if self.problems.is_empty() {
            out.push_str(&format!("{} objects OK\n", self.objects));
        } else {
            out.push_str(&format!(
                "{} problem(s) in {} objects\n",
                self.problems.len(),
                self.objects
            ));
        }
        out
    }
}

/// `policy which-endpoints`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WhichEndpointsReport {
    pub policy: String,
    pub tier: String,
    /// `ingress`, `egress` or both.
    pub directions: Vec<&'static str>,
    /// `normal`, `normal+applyOnForward`, `preDNAT` or `doNotTrack`.
    pub flavour: &'static str,
    pub selector: String,
    /// False for NetworkPolicies and policies with a namespace or service-account selector.
    pub selects_host_endpoints: bool,
    pub endpoints: Vec<SelectedEndpoint>,
    /// The pods it applies to, of those given as `v1` Pod objects (with their Namespace and
    /// ServiceAccount objects for namespace and account labels).
    pub pods: Vec<SelectedPod>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SelectedPod {
    pub namespace: String,
    pub pod: String,
    pub node: String,
    /// The host-side interface Calico's CNI naming gives it.
    pub interface: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SelectedEndpoint {
    pub node: String,
    /// `None`: identified by expectedIPs.
    pub interface: Option<String>,
    pub host_endpoint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl WhichEndpointsReport {
    fn text(&self) -> String {
        let mut out = format!(
            "{} (tier {}, {}, {}, selector {})\n",
            self.policy,
            self.tier,
            self.directions.join("+"),
            self.flavour,
            self.selector
        );
        if !self.selects_host_endpoints {
            out.push_str("  selects no host endpoint: NetworkPolicies and GNPs with a namespace or service-account selector select only pods\n");
        } else if self.endpoints.is_empty() {
            out.push_str("  no host endpoint matches\n");
        }
        for p in &self.pods {
            out.push_str(&format!(
                "  node {} interface {} pod {}/{}\n",
                p.node, p.interface, p.namespace, p.pod
            ));
        }
        for e in &self.endpoints {
            out.push_str(&format!(
                "  node {} interface {} host endpoint {}{}\n",
                e.node,
                e.interface.as_deref().unwrap_or("(by expectedIPs)"),
                e.host_endpoint,
                e.note
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            ));
        }
        out
    }
}

/// `policy unused`.
#[derive(Debug, Serialize)]
pub struct UnusedReport {
    pub findings: Vec<Finding>,
}

impl UnusedReport {
    fn text(&self) -> String {
        if self.findings.is_empty() {
            return "nothing unused\n".into();
        }
        self.findings.iter().map(|f| format!("{f}\n")).collect()
    }
}

/// Runs a policy subcommand; returns the exit code.
pub async fn run(cmd: PolicyCommand) -> Result<i32, PolicyToolError> {
    match cmd {
        PolicyCommand::Check { files, output } => {
            let mut report = CheckReport {
                objects: 0,
                problems: Vec::new(),
                warnings: Vec::new(),
            };
            for path in &files {
                let text =
                    std::fs::read_to_string(path).map_err(|source| PolicyToolError::Read {
                        path: path.clone(),
                        source,
                    })?;
                let m = Manifest::parse(&path.display().to_string(), &text);
                report.objects += m.objects.len();
                let (res, problems) = m.validate();
                report.problems.extend(problems);
                report.warnings.extend(m.warnings(&res));
            }
            output::print(&report, output.format, CheckReport::text)?;
            Ok(if report.problems.is_empty() { 0 } else { 1 })
        }
        PolicyCommand::WhichEndpoints {
            policy,
            source,
            output,
        } => {
            let res = validated(&load(&source).await?);
            let Some(p) = res.policies.iter().find(|p| {
                p.name == policy
                    || p.namespace
                        .as_ref()
                        .is_some_and(|ns| format!("{ns}/{}", p.name) == policy)
            }) else {
                return Err(PolicyToolError::Usage(format!(
                    "no valid policy named {policy:?}"
                )));
            };
            let flavour = if p.do_not_track {
                "doNotTrack"
            } else if p.pre_dnat {
                "preDNAT"
            } else if p.apply_on_forward {
                "normal+applyOnForward"
            } else {
                "normal"
            };
            let endpoints = if p.selects_host_endpoints {
                res.host_endpoints
                    .iter()
                    .filter(|h| p.selector.matches_in(&h.labels, Scope::Global))
                    .map(|h| SelectedEndpoint {
                        node: h.node.clone(),
                        interface: h.interface_name.clone(),
                        host_endpoint: h.name.clone(),
                        note: (h.interface_name.as_deref() == Some("*") && p.do_not_track)
                            .then(|| "doNotTrack is ignored on a \"*\" endpoint".to_string()),
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let pods = res
                .workload_endpoints
                .iter()
                .filter(|w| {
                    let labels = workload::effective_labels(w, &res.profiles);
                    workload::selects(p, w, &labels)
                })
                .map(|w| SelectedPod {
                    namespace: w.namespace.clone(),
                    pod: w.pod.clone(),
                    node: w.node.clone(),
                    interface: w.interface_name.clone(),
                })
                .collect();
            let report = WhichEndpointsReport {
                policy: p.display_name(),
                tier: p.tier.clone(),
                directions: [
                    ("ingress", p.ingress.is_some()),
                    ("egress", p.egress.is_some()),
                ]
                .into_iter()
                .filter_map(|(d, on)| on.then_some(d))
                .collect(),
                flavour,
                selector: p.selector.to_string(),
                selects_host_endpoints: p.selects_host_endpoints,
                endpoints,
                pods,
            };
            output::print(&report, output.format, WhichEndpointsReport::text)?;
            Ok(0)
        }
        PolicyCommand::Unused { source, output } => {
            let res = validated(&load(&source).await?);
            let report = UnusedReport {
                findings: unused(&res),
            };
            output::print(&report, output.format, UnusedReport::text)?;
            Ok(0)
        }
        PolicyCommand::Explain(args) if args.from.is_some() => {
            let ExplainArgs {
                source,
                from,
                to,
                port,
                output,
                ..
            } = *args;
            let (Some(from), Some(to)) = (from, to) else {
                return Err(PolicyToolError::Usage("--from and --to go together".into()));
            };
            let res = validated(&load(&source).await?);
            let (protocol, dport) = pod_port(port.as_deref())?;
            let stages = explain_pods(
                &res,
                &PolicySettings::default(),
                &from,
                &to,
                protocol,
                dport,
            )
            .map_err(|e| PolicyToolError::Usage(e.to_string()))?;
            output::print(&stages, output.format, |stages: &Vec<PodStage>| {
                let mut text: String = stages.iter().map(|s| format!("{s}\n")).collect();
                let allowed = stages
                    .last()
                    .is_some_and(|s| s.verdict.outcome == Outcome::Accept);
                text.push_str(if allowed {
                    "=> allowed\n"
                } else {
                    "=> denied\n"
                });
                text
            })?;
            Ok(0)
        }
        PolicyCommand::Explain(args) => {
            let ExplainArgs {
                source,
                node,
                iface,
                src,
                dst,
                proto,
                dport,
                sport,
                icmp_type,
                icmp_code,
                path,
                out_iface,
                wireguard_port,
                output,
                ..
            } = *args;
            let res = validated(&load(&source).await?);
            let nodes: BTreeSet<&str> =
                res.host_endpoints.iter().map(|h| h.node.as_str()).collect();
            let node = match node {
                Some(n) => n,
                None if nodes.len() == 1 => nodes
                    .iter()
                    .next()
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
                None => {
                    return Err(PolicyToolError::Usage(format!(
                        "host endpoints exist on {} nodes; choose one with --node ({})",
                        nodes.len(),
                        nodes.iter().copied().collect::<Vec<_>>().join(", ")
                    )));
                }
            };
            let protocol = Protocol::parse_loose(&proto)
                .ok_or_else(|| PolicyToolError::Usage(format!("unknown protocol {proto:?}")))?;
            let path = match path.as_str() {
                "input" | "in" => PacketPath::Input,
                "output" | "out" => PacketPath::Output,
                "forward" | "fwd" => PacketPath::Forward,
                other => {
                    return Err(PolicyToolError::Usage(format!(
                        "--path {other:?}: use input, output or forward"
                    )));
                }
            };
            let program = compile(&PolicyInputs {
                node: &node,
                resources: Some(&res),
                settings: PolicySettings {
                    wireguard_ports: vec![wireguard_port],
                    ..PolicySettings::default()
                },
                ..Default::default()
            });
            let (Some(iface), Some(src), Some(dst)) = (iface, src, dst) else {
                return Err(PolicyToolError::Usage(
                    "give --iface, --src and --dst (a packet on a host interface) or --from and --to (pods)".into(),
                ));
            };
            let ports = matches!(protocol.number(), 6 | 17 | 132 | 136);
            let packet = Packet {
                path,
                iface,
                out_iface,
                src,
                dst,
                protocol,
                sport: ports.then_some(sport),
                dport: if ports { dport } else { None },
                icmp_type,
                icmp_code,
            };
            let verdict = explain(&program, &packet);
            output::print(&verdict, output.format, |v: &Verdict| format!("{v}\n"))?;
            Ok(0)
        }
    }
}

/// `--port` of a pod explanation: `80/TCP`, `53/udp`, `80` (TCP) or absent (TCP, no port).
fn pod_port(text: Option<&str>) -> Result<(Protocol, Option<u16>), PolicyToolError> {
    let Some(text) = text else {
        return Ok((Protocol::Tcp, None));
    };
    let (port, proto) = text.split_once('/').unwrap_or((text, "TCP"));
    let protocol = Protocol::parse_loose(proto).ok_or_else(|| {
        PolicyToolError::Usage(format!("--port {text:?}: unknown protocol {proto:?}"))
    })?;
    let port = port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
        PolicyToolError::Usage(format!("--port {text:?}: {port:?} is not a port (1-65535)"))
    })?;
    Ok((protocol, Some(port)))
}

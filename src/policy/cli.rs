//! `wiremesh policy`: offline checks and queries over manifests (or the etcd datastore).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;

use etcd_client::GetOptions;

use super::explain::{Packet, PacketPath, explain};
use super::manifest::Manifest;
use super::model::{Direction, Protocol};
use super::program::{
    EndpointProgram, FailsafePort, Hook, PolicyInputs, PolicySettings, Program, TierProgram,
    compile, named_port_members, selector_members,
};
use super::resources::{PolicyResources, RawPolicyResources};
use crate::datastore::etcd::{POLICY_PREFIXES, connect_client, decode_policy_key};
use crate::selector::Scope;

#[derive(Debug, thiserror::Error)]
pub enum PolicyToolError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading policy from etcd")]
    Etcd(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("reading policy from the Kubernetes API")]
    Kubernetes(#[source] crate::datastore::DatastoreError),
    #[error("{0}")]
    Usage(String),
}

/// Where resources come from: manifest files, etcd and/or the Kubernetes API.
#[derive(Debug, Clone, clap::Args)]
pub struct Source {
    /// projectcalico.org/v3 manifests (YAML or JSON, multi-document); repeatable.
    #[arg(short = 'f', long = "file")]
    pub files: Vec<PathBuf>,
    /// Read the resources from this etcd instead of (or as well as) files.
    #[arg(long, env = "WIREMESH_POLICY_ETCD", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Read the resources from the Kubernetes API (the projectcalico.org/v3 CRDs), read-only.
    #[arg(long)]
    pub kubernetes: bool,
    /// Kubeconfig for --kubernetes; without it, the in-cluster service account (or
    /// KUBECONFIG / ~/.kube/config).
    #[arg(long, env = "WIREMESH_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum PolicyCommand {
    /// Validate manifests offline; prints positioned errors, exit 1 if any.
    Check {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
    },
    /// Which host endpoints a GlobalNetworkPolicy applies to (directions and flavour).
    WhichEndpoints {
        /// Policy name (`name`, or `namespace/name` for a NetworkPolicy).
        policy: String,
        #[command(flatten)]
        source: Source,
    },
    /// Policies that apply to no host endpoint or sit in an unreachable tier, tiers that do not
    /// exist, rules whose selector or named ports match nothing.
    Unused {
        #[command(flatten)]
        source: Source,
    },
    /// Which tier, policy and rule decide a packet, and the verdict.
    Explain {
        #[command(flatten)]
        source: Source,
        /// The node whose host endpoints are evaluated (default: the only node with any).
        #[arg(long)]
        node: Option<String>,
        /// Input interface (output interface with --path output).
        #[arg(long)]
        iface: String,
        #[arg(long)]
        src: IpAddr,
        #[arg(long)]
        dst: IpAddr,
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
    },
}

/// Loads manifests (positioned problems are returned) and etcd resources.
async fn load(source: &Source) -> Result<(RawPolicyResources, Vec<Manifest>), PolicyToolError> {
    let mut raw = RawPolicyResources::default();
    let mut manifests = Vec::new();
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
        manifests.push(m);
    }
    if !source.etcd_endpoints.is_empty() {
        let mut client = connect_client(&source.etcd_endpoints)
            .await
            .map_err(|e| PolicyToolError::Etcd(Box::new(e)))?;
        for prefix in POLICY_PREFIXES {
            let resp = client
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .map_err(|e| PolicyToolError::Etcd(Box::new(e)))?;
            for kv in resp.kvs() {
                let (Ok(key), Ok(value)) = (
                    kv.key_str(),
                    serde_json::from_slice::<serde_json::Value>(kv.value()),
                ) else {
                    continue;
                };
                if let Some((kind, name)) = decode_policy_key(key) {
                    raw.insert(kind, name, value);
                }
            }
        }
    }
    if source.kubernetes {
        let api = crate::datastore::kube::KubeDatastore::connect(source.kubeconfig.as_deref())
            .await
            .map_err(PolicyToolError::Kubernetes)?;
        for (kind, objects) in api
            .list_policy()
            .await
            .map_err(PolicyToolError::Kubernetes)?
            .objects
        {
            for (key, value) in objects {
                raw.insert(kind, key, value);
            }
        }
    }
    if source.files.is_empty() && source.etcd_endpoints.is_empty() && !source.kubernetes {
        return Err(PolicyToolError::Usage(
            "give manifests with -f FILE or a datastore with --etcd-endpoints or --kubernetes"
                .into(),
        ));
    }
    Ok((raw, manifests))
}

fn report_invalid(res: &PolicyResources) {
    for e in &res.errors {
        eprintln!("skipped invalid object: {e}");
    }
}

/// Runs a policy subcommand; returns the exit code.
pub async fn run(cmd: PolicyCommand) -> Result<i32, PolicyToolError> {
    match cmd {
        PolicyCommand::Check { files } => {
            let mut problems = Vec::new();
            let mut count = 0;
            for path in &files {
                let text =
                    std::fs::read_to_string(path).map_err(|source| PolicyToolError::Read {
                        path: path.clone(),
                        source,
                    })?;
                let m = Manifest::parse(&path.display().to_string(), &text);
                count += m.objects.len();
                for o in m.objects.iter().filter(|o| o.kind.is_none()) {
                    for field in ["failsafeInboundHostPorts", "failsafeOutboundHostPorts"] {
                        if let Some(v) = o.value.pointer(&format!("/spec/{field}"))
                            && let Err(e) = FailsafePort::from_json(v)
                        {
                            problems.push(format!(
                                "{}: FelixConfiguration {:?}: spec.{field}{e}",
                                o.field_position(&format!("spec.{field}")),
                                o.key
                            ));
                        }
                    }
                }
                problems.extend(m.validate().1);
            }
            for p in &problems {
                println!("{p}");
            }
            if problems.is_empty() {
                println!("{count} objects OK");
                Ok(0)
            } else {
                println!("{} problem(s) in {count} objects", problems.len());
                Ok(1)
            }
        }
        PolicyCommand::WhichEndpoints { policy, source } => {
            let (raw, _) = load(&source).await?;
            let res = PolicyResources::from_raw(&raw);
            report_invalid(&res);
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
            let dirs: Vec<&str> = [
                ("ingress", p.ingress.is_some()),
                ("egress", p.egress.is_some()),
            ]
            .into_iter()
            .filter_map(|(d, on)| on.then_some(d))
            .collect();
            println!(
                "{} (tier {}, {}, {flavour}, selector {})",
                p.display_name(),
                p.tier,
                dirs.join("+"),
                p.selector
            );
            if !p.selects_host_endpoints {
                println!(
                    "  selects no host endpoint: NetworkPolicies and GNPs with a namespace or service-account selector select only pods"
                );
                return Ok(0);
            }
            let mut any = false;
            for h in &res.host_endpoints {
                if p.selector.matches_in(&h.labels, Scope::Global) {
                    any = true;
                    let note = if h.interface_name.as_deref() == Some("*") && p.do_not_track {
                        " (doNotTrack is ignored on a \"*\" endpoint)"
                    } else {
                        ""
                    };
                    println!(
                        "  node {} interface {} host endpoint {}{note}",
                        h.node,
                        h.interface_name.as_deref().unwrap_or("(by expectedIPs)"),
                        h.name
                    );
                }
            }
            if !any {
                println!("  no host endpoint matches");
            }
            Ok(0)
        }
        PolicyCommand::Unused { source } => {
            let (raw, _) = load(&source).await?;
            let res = PolicyResources::from_raw(&raw);
            report_invalid(&res);
            let mut findings = 0;
            for p in &res.policies {
                let mut why = Vec::new();
                if !p.selects_host_endpoints {
                    why.push("can never select a host endpoint".to_string());
                } else if !res
                    .host_endpoints
                    .iter()
                    .any(|h| p.selector.matches_in(&h.labels, Scope::Global))
                {
                    why.push("its selector matches no host endpoint".into());
                } else if p.do_not_track
                    && res.host_endpoints.iter().all(|h| {
                        h.interface_name.as_deref() == Some("*")
                            || !p.selector.matches_in(&h.labels, Scope::Global)
                    })
                {
                    why.push("doNotTrack but selects only \"*\" host endpoints".into());
                }
                if !res.tiers.contains_key(&p.tier) {
                    why.push(format!(
                        "its tier {:?} does not exist (runs last, as Deny)",
                        p.tier
                    ));
                }
                for w in &why {
                    findings += 1;
                    println!("{}: {w}", p.display_name());
                }
                for (dir, rules) in [
                    (Direction::Ingress, &p.ingress),
                    (Direction::Egress, &p.egress),
                ] {
                    for (i, r) in rules.iter().flatten().enumerate() {
                        for (side, e) in [("source", &r.source), ("destination", &r.destination)] {
                            if let Some(sel) = &e.selector {
                                let m = selector_members(sel, &res);
                                if m.v4.is_empty() && m.v6.is_empty() {
                                    findings += 1;
                                    println!(
                                        "{}: {dir} rule {i}: {side} selector {sel} matches no address (the rule never matches)",
                                        p.display_name()
                                    );
                                }
                            }
                            // Only named ports: an empty named-port set means no match.
                            if e.ports.is_empty()
                                && !e.named_ports.is_empty()
                                && named_port_members(r, e, false, &res).is_empty()
                            {
                                findings += 1;
                                println!(
                                    "{}: {dir} rule {i}: {side} named port(s) {} match no port of a host endpoint with expectedIPs (the rule never matches)",
                                    p.display_name(),
                                    e.named_ports.join(", ")
                                );
                            }
                        }
                    }
                }
            }
            let unreachable = unreachable_tiers(&res);
            for (id, why) in &unreachable {
                findings += 1;
                println!("{id}: {why}");
            }
            for (id, why) in shadowed(&res) {
                // An unreachable policy is also shadowed; one reason is enough.
                if unreachable.iter().any(|(u, _)| *u == id) {
                    continue;
                }
                findings += 1;
                println!("{id}: {why}");
            }
            let used: BTreeSet<&str> = res.policies.iter().map(|p| p.tier.as_str()).collect();
            for t in res.tiers.keys() {
                if !used.contains(t.as_str())
                    && !["default", "kube-admin", "kube-baseline"].contains(&t.as_str())
                {
                    findings += 1;
                    println!("tier {t}: holds no policy");
                }
            }
            if findings == 0 {
                println!("nothing unused");
            }
            Ok(0)
        }
        PolicyCommand::Explain {
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
        } => {
            let (raw, _) = load(&source).await?;
            let res = PolicyResources::from_raw(&raw);
            report_invalid(&res);
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
            let v = explain(&program, &packet);
            println!("{v}");
            Ok(0)
        }
    }
}

/// A rule with no match field: it decides every packet that reaches it.
fn unconditional(r: &super::model::Rule) -> bool {
    let empty = |e: &super::model::Entity| {
        e.nets.is_empty()
            && e.not_nets.is_empty()
            && e.selector.is_none()
            && e.not_selector.is_none()
            && !e.has_ports()
            && !e.has_not_ports()
    };
    r.ip_version.is_none()
        && r.protocol.is_none()
        && r.not_protocol.is_none()
        && r.icmp.is_none()
        && r.not_icmp.is_none()
        && empty(&r.source)
        && empty(&r.destination)
}

/// For each policy: on how many endpoint chains it is programmed, on how many a check flagged
/// it, and the last reason given.
#[derive(Default)]
struct Tally(std::collections::BTreeMap<String, (usize, usize, String)>);

impl Tally {
    fn appears(&mut self, policy: &str, flagged: Option<String>) {
        let entry = self.0.entry(policy.to_string()).or_default();
        entry.0 += 1;
        if let Some(why) = flagged {
            entry.1 += 1;
            entry.2 = why;
        }
    }

    /// The policies flagged on every chain they appear on, with the reason.
    fn everywhere(self) -> Vec<(String, String)> {
        self.0
            .into_iter()
            .filter(|(_, (n, flagged, _))| *n > 0 && n == flagged)
            .map(|(id, (_, _, why))| (id, why))
            .collect()
    }
}

/// Calls `visit` with every endpoint chain (hook and direction) of every node's program.
fn each_chain(
    res: &PolicyResources,
    mut visit: impl FnMut(&Program, &EndpointProgram, Hook, Direction, &[TierProgram]),
) {
    let nodes: BTreeSet<&str> = res.host_endpoints.iter().map(|h| h.node.as_str()).collect();
    for node in nodes {
        let program = compile(&PolicyInputs {
            node,
            resources: Some(res),
            ..Default::default()
        });
        for ep in &program.endpoints {
            for ((hook, dir), tiers) in &ep.chains {
                visit(&program, ep, *hook, *dir, tiers);
            }
        }
    }
}

/// Policies that are fully shadowed (§5, 76e): on every endpoint chain where they appear, an
/// earlier policy already decides every packet (an unconditional Allow or Deny earlier in the
/// same or an earlier tier, or an unconditional Pass earlier in the same tier).
pub fn shadowed(res: &PolicyResources) -> Vec<(String, String)> {
    use super::model::Action;
    let mut tally = Tally::default();
    each_chain(res, |program, ep, hook, dir, tiers| {
        let mut blocked_by: Option<String> = None;
        for tier in tiers {
            let mut tier_blocked_by: Option<String> = None;
            for pid in &tier.policies {
                if let Some(w) = blocked_by.as_ref().or(tier_blocked_by.as_ref()) {
                    let why = format!(
                        "fully shadowed: {w} decides first ({hook} {dir} of {})",
                        ep.hep
                    );
                    tally.appears(pid, Some(why));
                    continue;
                }
                tally.appears(pid, None);
                let Some(p) = program.policies.get(pid) else {
                    continue;
                };
                for r in p.rules(dir) {
                    if !unconditional(r) {
                        continue;
                    }
                    match r.action {
                        Action::Allow | Action::Deny => {
                            blocked_by = Some(pid.clone());
                            break;
                        }
                        Action::Pass => {
                            tier_blocked_by = Some(pid.clone());
                            break;
                        }
                        Action::Log => {}
                    }
                }
            }
        }
    });
    tally.everywhere()
}

/// Policies whose tier is never reached (docs/policy.md, "policy unused"). On one endpoint's
/// chain (hook and direction), a tier *ends evaluation* when the tier applies there (a policy
/// of it selects the endpoint), its end-of-tier action is a drop (defaultAction Deny, in a
/// hook that has tier defaults: filter input/output/forward) and none of its policies there
/// has a Pass rule: every packet then gets Allow or Deny in that tier. Later tiers on that
/// chain are unreachable. A policy is reported when it is unreachable on every chain it is
/// programmed into.
pub fn unreachable_tiers(res: &PolicyResources) -> Vec<(String, String)> {
    use super::model::{Action, TierDefault};
    let mut tally = Tally::default();
    each_chain(res, |program, ep, hook, dir, tiers| {
        let mut ended_by: Option<&str> = None;
        for tier in tiers {
            for pid in &tier.policies {
                let why = ended_by.map(|t| {
                    format!(
                        "tier {:?} is never reached: the earlier tier {t:?} ends in a default Deny and has no Pass rule ({hook} {dir} of {})",
                        tier.name, ep.hep
                    )
                });
                tally.appears(pid, why);
            }
            if ended_by.is_some() {
                continue;
            }
            let can_pass = tier.policies.iter().any(|pid| {
                program
                    .policies
                    .get(pid)
                    .is_none_or(|p| p.rules(dir).iter().any(|r| r.action == Action::Pass))
            });
            if hook.has_tier_default() && tier.default_action == TierDefault::Deny && !can_pass {
                ended_by = Some(&tier.name);
            }
        }
    });
    tally.everywhere()
}

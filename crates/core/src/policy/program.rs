//! The evaluation model: for one node's host endpoints, the ordered per-interface,
//! per-hook, per-direction program (tiers -> policies -> rules), plus failsafes, the WireGuard
//! port and the address sets that rule selectors refer to; for the node's pods (workload
//! endpoints), the ingress and egress program of each (tiers, then profiles). Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Serialize;

use super::model::{
    Direction, Entity, HostEndpoint, Policy, Protocol, Rule, TierDefault, cmp_order,
};
use super::resources::PolicyResources;
use super::workload::{WorkloadEndpoint, effective_labels, interface_name, selects};
use crate::model::Family;
use crate::selector::{Scope, Selector};
use crate::wire::felix::ProtoPort;

/// The profile that kube-controllers' auto host endpoints carry: allow everything.
pub const DEFAULT_ALLOW_PROFILE: &str = "projectcalico-default-allow";

/// One failsafe entry (`failsafeInboundHostPorts` / `failsafeOutboundHostPorts`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct FailsafePort {
    pub protocol: Protocol,
    pub port: u16,
    /// Source CIDR (inbound) or destination CIDR (outbound).
    pub net: Option<IpNet>,
}

impl FailsafePort {
    fn new(protocol: Protocol, port: u16) -> Self {
        FailsafePort {
            protocol,
            port,
            net: None,
        }
    }

    /// Felix's defaults.
    fn default_inbound() -> Vec<FailsafePort> {
        use Protocol::{Tcp, Udp};
        [
            (Tcp, 22),
            (Udp, 68),
            (Tcp, 179),
            (Tcp, 2379),
            (Tcp, 2380),
            (Tcp, 5473),
            (Tcp, 6443),
            (Tcp, 6666),
            (Tcp, 6667),
        ]
        .into_iter()
        .map(|(p, n)| FailsafePort::new(p, n))
        .collect()
    }

    fn default_outbound() -> Vec<FailsafePort> {
        use Protocol::{Tcp, Udp};
        [
            (Udp, 53),
            (Udp, 67),
            (Tcp, 179),
            (Tcp, 2379),
            (Tcp, 2380),
            (Tcp, 5473),
            (Tcp, 6443),
            (Tcp, 6666),
            (Tcp, 6667),
        ]
        .into_iter()
        .map(|(p, n)| FailsafePort::new(p, n))
        .collect()
    }
}

impl TryFrom<&ProtoPort> for FailsafePort {
    /// `(field, why)`: `protocol`, `port` or `net` of the entry.
    type Error = (&'static str, String);

    /// Like Felix: protocol TCP (the default) or UDP in any case, port 1..65535, an optional
    /// CIDR or address.
    fn try_from(entry: &ProtoPort) -> Result<Self, Self::Error> {
        let protocol = match entry.protocol.as_deref() {
            None | Some("") => Protocol::Tcp,
            Some(p) if p.eq_ignore_ascii_case("tcp") => Protocol::Tcp,
            Some(p) if p.eq_ignore_ascii_case("udp") => Protocol::Udp,
            Some(p) => return Err(("protocol", format!("{p:?} is not TCP or UDP"))),
        };
        let port = u16::try_from(entry.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| ("port", format!("{} is not in 1..65535", entry.port)))?;
        let net = match entry.net.as_deref().filter(|n| !n.is_empty()) {
            None => None,
            Some(n) => Some(
                n.parse::<IpNet>()
                    .or_else(|_| n.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| ("net", format!("{n:?} is not a CIDR")))?,
            ),
        };
        Ok(FailsafePort {
            protocol,
            port,
            net,
        })
    }
}

/// Settings that shape the program, from FelixConfiguration and the agent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicySettings {
    pub failsafe_inbound: Vec<FailsafePort>,
    pub failsafe_outbound: Vec<FailsafePort>,
    /// WireGuard listening ports, always accepted on host interfaces.
    pub wireguard_ports: Vec<u16>,
    /// Interface name prefixes of workloads (pods); never treated as host interfaces.
    pub workload_prefixes: Vec<String>,
    /// Log prefix base (`logPrefix`); tier, policy and rule are appended.
    pub log_prefix: String,
    /// What happens to a pod's traffic to its own host once its egress policy allowed it.
    pub endpoint_to_host: EndpointToHostAction,
    /// Enforce policy on this node's pods (the agent's `--pod-policy`); pods of every node
    /// still feed selector sets.
    pub pods: bool,
}

/// Felix's `defaultEndpointToHostAction`: the verdict on traffic from a local pod to its own
/// host after the pod's egress policy has allowed it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum EndpointToHostAction {
    Drop,
    /// On to the host's own input rules (host endpoint policy, other tables).
    Return,
    /// What every Calico manifest and the Tigera operator set (Felix's own default is Drop);
    /// Kubernetes expects a pod to reach its node.
    #[default]
    Accept,
}

impl EndpointToHostAction {
    /// Calico's values, in any case.
    pub fn parse(s: &str) -> Option<EndpointToHostAction> {
        match s.to_ascii_lowercase().as_str() {
            "drop" => Some(EndpointToHostAction::Drop),
            "return" => Some(EndpointToHostAction::Return),
            "accept" => Some(EndpointToHostAction::Accept),
            _ => None,
        }
    }
}

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            failsafe_inbound: FailsafePort::default_inbound(),
            failsafe_outbound: FailsafePort::default_outbound(),
            wireguard_ports: vec![51820],
            workload_prefixes: vec!["cali".into()],
            log_prefix: "calico-packet".into(),
            endpoint_to_host: EndpointToHostAction::default(),
            pods: true,
        }
    }
}

/// Where a chain is hooked (see docs/policy.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Hook {
    /// raw prerouting/output: doNotTrack policy.
    Untracked,
    /// mangle prerouting: preDNAT policy (ingress only).
    PreDnat,
    /// filter input/output: normal policy for local traffic.
    Normal,
    /// filter forward: applyOnForward policy.
    Forward,
}

impl Hook {
    pub const ALL: [Hook; 4] = [Hook::Untracked, Hook::PreDnat, Hook::Normal, Hook::Forward];

    pub fn short(self) -> &'static str {
        match self {
            Hook::Untracked => "untracked",
            Hook::PreDnat => "prednat",
            Hook::Normal => "filter",
            Hook::Forward => "forward",
        }
    }

    /// Whether a tier's default action (drop) applies at its end.
    pub fn has_tier_default(self) -> bool {
        matches!(self, Hook::Normal | Hook::Forward)
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short())
    }
}

/// Which interfaces an endpoint program covers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Iface {
    Named(String),
    /// The `"*"` host endpoint: every host interface without a specific one.
    Any,
}

impl fmt::Display for Iface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Iface::Named(n) => f.write_str(n),
            Iface::Any => f.write_str("*"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TierProgram {
    pub name: String,
    pub default_action: TierDefault,
    /// Policy IDs (`gnp/name`) in evaluation order; their rules are in [`Program::policies`].
    pub policies: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointProgram {
    pub hep: String,
    pub iface: Iface,
    pub profiles: Vec<String>,
    /// Per hook and direction, the tiers that apply (empty = no policy).
    pub chains: BTreeMap<(Hook, Direction), Vec<TierProgram>>,
}

impl EndpointProgram {
    pub fn tiers(&self, hook: Hook, dir: Direction) -> &[TierProgram] {
        self.chains
            .get(&(hook, dir))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// After all tiers of a normal chain: a profile allows, or the endpoint drops.
    pub fn default_allow(&self) -> bool {
        self.profiles.iter().any(|p| p == DEFAULT_ALLOW_PROFILE)
    }
}

/// Whether one of an endpoint's profiles allows each direction (Kubernetes' `kns.<namespace>`
/// allows both; `ksa.<namespace>.<account>` neither).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProfileVerdict {
    pub name: String,
    pub allow_ingress: bool,
    pub allow_egress: bool,
}

/// One local pod's program: its ingress (traffic to it) and egress (from it) tiers, then its
/// profiles, then drop.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkloadProgram {
    pub namespace: String,
    pub pod: String,
    /// The host-side interface when its name carries a workload prefix: packets are
    /// dispatched by it. Every pod is also dispatched by address where the interface is not a
    /// workload one (a CNI that names interfaces its own way).
    pub interface: Option<String>,
    pub ips: Vec<IpNet>,
    pub ingress: Vec<TierProgram>,
    pub egress: Vec<TierProgram>,
    /// The endpoint's profiles that exist, in its order (a missing one allows nothing).
    pub profiles: Vec<ProfileVerdict>,
}

impl WorkloadProgram {
    pub fn tiers(&self, dir: Direction) -> &[TierProgram] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// `namespace/pod`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.pod)
    }
}

/// The addresses one selector stands for, per family, aggregated (no overlaps).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SelectorSet {
    pub selector: String,
    pub v4: Vec<Ipv4Net>,
    pub v6: Vec<Ipv6Net>,
}

impl SelectorSet {
    pub fn contains(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => self.v4.iter().any(|n| n.contains(&a)),
            IpAddr::V6(a) => self.v6.iter().any(|n| n.contains(&a)),
        }
    }
}

/// The `(address, protocol, port)` triples one rule side's named ports stand for: the named
/// ports (`names`) of the host endpoints matching the side's positive selector (every host
/// endpoint when it has none), with the rule's protocol (any, when the rule has none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NamedPortSet {
    /// Canonical positive selector, `all()` when the side has none.
    pub selector: String,
    /// The rule's protocol number, if it has one.
    pub protocol: Option<u8>,
    pub names: Vec<String>,
    /// `(address, protocol number, port)`.
    pub v4: BTreeSet<(Ipv4Addr, u8, u16)>,
    pub v6: BTreeSet<(Ipv6Addr, u8, u16)>,
}

impl NamedPortSet {
    pub fn contains(&self, addr: IpAddr, protocol: u8, port: u16) -> bool {
        match addr {
            IpAddr::V4(a) => self.v4.contains(&(a, protocol, port)),
            IpAddr::V6(a) => self.v6.contains(&(a, protocol, port)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

/// The ID of the named-port set for one side of a rule: `ports` (`negated == false`) or
/// `notPorts`. `None` when that list has no named port. The ID depends only on the selector,
/// the protocol and the names, so a change of host endpoints' addresses or ports changes the
/// set's elements, never its name or the rules that refer to it. Calico also filters
/// `notPorts` names by the *positive* selector (the rule can only match inside it anyway).
pub fn named_port_set_id(rule: &Rule, side: &Entity, negated: bool) -> Option<String> {
    use sha2::Digest as _;
    let names = if negated {
        &side.not_named_ports
    } else {
        &side.named_ports
    };
    if names.is_empty() {
        return None;
    }
    let mut sorted = names.clone();
    sorted.sort();
    let digest = sha2::Sha224::digest(
        format!(
            "n:{}|{}|{}",
            named_port_selector(side),
            rule.protocol
                .map_or("any".to_string(), |p| p.number().to_string()),
            sorted.join(",")
        )
        .as_bytes(),
    );
    Some(format!("n:{}", URL_SAFE_NO_PAD.encode(digest)))
}

fn named_port_selector(side: &Entity) -> String {
    side.selector
        .as_ref()
        .map_or_else(|| Selector::all().canonical(), Selector::canonical)
}

/// Members of a named-port set (see [`NamedPortSet`]).
pub fn named_port_members(
    rule: &Rule,
    side: &Entity,
    negated: bool,
    res: &PolicyResources,
) -> NamedPortSet {
    named_port_members_with(rule, side, negated, res, &workload_labels(res))
}

/// [`named_port_members`] with the pods' labels worked out already.
fn named_port_members_with(
    rule: &Rule,
    side: &Entity,
    negated: bool,
    res: &PolicyResources,
    wep_labels: &[BTreeMap<String, String>],
) -> NamedPortSet {
    let names = if negated {
        &side.not_named_ports
    } else {
        &side.named_ports
    };
    let protocol = rule.protocol.map(Protocol::number);
    let mut set = NamedPortSet {
        selector: named_port_selector(side),
        protocol,
        names: names.clone(),
        ..Default::default()
    };
    let selected = |labels: &BTreeMap<String, String>, scope: Scope| {
        side.selector
            .as_ref()
            .is_none_or(|s| s.matches_in(labels, scope))
    };
    let hosts = res
        .host_endpoints
        .iter()
        .filter(|h| selected(&h.labels, Scope::Global))
        .map(|h| (&h.ports, h.expected_ips.clone()));
    let pods = res
        .workload_endpoints
        .iter()
        .zip(wep_labels)
        .filter(|(_, labels)| selected(labels, Scope::Namespaced))
        .map(|(w, _)| (&w.ports, w.ips.iter().map(|n| n.addr()).collect::<Vec<_>>()));
    for (ports, ips) in hosts.chain(pods) {
        for p in ports {
            let proto = p.protocol.number();
            if !names.contains(&p.name) || protocol.is_some_and(|want| want != proto) {
                continue;
            }
            for ip in &ips {
                match ip {
                    IpAddr::V4(a) => set.v4.insert((*a, proto, p.port)),
                    IpAddr::V6(a) => set.v6.insert((*a, proto, p.port)),
                };
            }
        }
    }
    set
}

/// A policy's rules, as programmed once and shared by every endpoint it selects.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyProgram {
    pub id: String,
    pub tier: String,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

impl PolicyProgram {
    pub fn rules(&self, dir: Direction) -> &[Rule] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// Everything the node's filter needs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Program {
    pub settings: PolicySettings,
    /// Specific interfaces in name order, then the `"*"` endpoint if any.
    pub endpoints: Vec<EndpointProgram>,
    /// This node's pods, by namespace and name.
    pub workloads: Vec<WorkloadProgram>,
    pub policies: BTreeMap<String, PolicyProgram>,
    /// Keyed by selector unique ID.
    pub sets: BTreeMap<String, SelectorSet>,
    /// Keyed by [`named_port_set_id`].
    pub named_port_sets: BTreeMap<String, NamedPortSet>,
}

impl Program {
    /// Nothing to enforce on this node: no host endpoint applies and no pod runs here. The
    /// table should be removed.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty() && self.workloads.is_empty()
    }

    /// The endpoint program that owns `iface`, if any: a specific one, else `"*"`. Workload
    /// interfaces have none.
    pub fn endpoint_for(&self, iface: &str) -> Option<&EndpointProgram> {
        if self
            .settings
            .workload_prefixes
            .iter()
            .any(|p| iface.starts_with(p.as_str()))
        {
            return None;
        }
        self.endpoints
            .iter()
            .find(|e| e.iface == Iface::Named(iface.to_string()))
            .or_else(|| self.endpoints.iter().find(|e| e.iface == Iface::Any))
    }
}

/// Inputs to [`compile`].
#[derive(Debug, Clone, Default)]
pub struct PolicyInputs<'a> {
    pub node: &'a str,
    pub resources: Option<&'a PolicyResources>,
    /// This host's interfaces and their addresses, for host endpoints identified by
    /// `expectedIPs` only. May be empty (such endpoints then apply to no interface).
    pub local_interfaces: BTreeMap<String, BTreeSet<IpAddr>>,
    pub settings: PolicySettings,
}

/// Resolves which host endpoint owns which interface on `node` (§3.3, 49–50).
fn resolve_interfaces<'a>(
    heps: &'a [HostEndpoint],
    node: &str,
    local: &BTreeMap<String, BTreeSet<IpAddr>>,
) -> Vec<(Iface, &'a HostEndpoint)> {
    let mine: Vec<&HostEndpoint> = heps.iter().filter(|h| h.node == node).collect();
    let mut owner: BTreeMap<String, &HostEndpoint> = BTreeMap::new();
    let mut consider = |iface: &str, h: &'a HostEndpoint| {
        let slot = owner.entry(iface.to_string()).or_insert(h);
        if h.name < slot.name {
            *slot = h;
        }
    };
    for h in &mine {
        match h.interface_name.as_deref() {
            Some("*") => {}
            Some(name) => consider(name, h),
            None => {
                for (iface, addrs) in local {
                    if h.expected_ips.iter().any(|ip| addrs.contains(ip)) {
                        consider(iface, h);
                    }
                }
            }
        }
    }
    let mut out: Vec<(Iface, &HostEndpoint)> = owner
        .into_iter()
        .map(|(i, h)| (Iface::Named(i), h))
        .collect();
    if let Some(star) = mine
        .iter()
        .filter(|h| h.interface_name.as_deref() == Some("*"))
        .min_by(|a, b| a.name.cmp(&b.name))
    {
        out.push((Iface::Any, star));
    }
    out
}

/// Which hooks a policy is programmed into.
fn policy_hooks(p: &Policy) -> Vec<Hook> {
    if p.do_not_track {
        vec![Hook::Untracked]
    } else if p.pre_dnat {
        vec![Hook::PreDnat]
    } else if p.apply_on_forward {
        vec![Hook::Normal, Hook::Forward]
    } else {
        vec![Hook::Normal]
    }
}

/// Tiers in evaluation order: existing tiers by (order, name); tiers that policies name but
/// that do not exist after them, by name, as Deny.
fn ordered_tiers(res: &PolicyResources) -> Vec<(&str, TierDefault)> {
    let mut tier_names: BTreeSet<&str> = res.policies.iter().map(|p| p.tier.as_str()).collect();
    tier_names.extend(res.tiers.keys().map(String::as_str));
    let mut tiers: Vec<(bool, Option<f64>, &str, TierDefault)> = tier_names
        .into_iter()
        .map(|name| match res.tiers.get(name) {
            Some(t) => (false, t.order, name, t.default_action),
            None => (true, None, name, TierDefault::Deny),
        })
        .collect();
    tiers.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| cmp_order(a.1, b.1))
            .then_with(|| a.2.as_bytes().cmp(b.2.as_bytes()))
    });
    tiers.into_iter().map(|(_, _, n, d)| (n, d)).collect()
}

/// The tiers (with the policies in each, in order) of the policies `applies` picks that have
/// rules for `dir`; tiers with none are left out. Each policy used lands in `used`.
fn tier_programs(
    res: &PolicyResources,
    tiers: &[(&str, TierDefault)],
    dir: Direction,
    applies: impl Fn(&Policy) -> bool,
    used: &mut BTreeMap<String, PolicyProgram>,
) -> Vec<TierProgram> {
    let mut out = Vec::new();
    for &(tier, default_action) in tiers {
        let ids: Vec<String> = res
            .policies
            .iter()
            .filter(|p| p.tier == tier && p.rules(dir).is_some() && applies(p))
            .map(|p| {
                let id = p.display_name();
                used.entry(id.clone()).or_insert_with(|| PolicyProgram {
                    id: id.clone(),
                    tier: p.tier.clone(),
                    ingress: p.ingress.clone().unwrap_or_default(),
                    egress: p.egress.clone().unwrap_or_default(),
                });
                id
            })
            .collect();
        if !ids.is_empty() {
            out.push(TierProgram {
                name: tier.to_string(),
                default_action,
                policies: ids,
            });
        }
    }
    out
}

/// The labels selectors see on every workload endpoint of the cluster (its own and its
/// profiles'), in `res.workload_endpoints` order.
fn workload_labels(res: &PolicyResources) -> Vec<BTreeMap<String, String>> {
    res.workload_endpoints
        .iter()
        .map(|w| effective_labels(w, &res.profiles))
        .collect()
}

/// The interface a local pod is dispatched by: its stored name, or for a pod whose name was
/// computed (a Kubernetes Pod) the name Calico's CNI gives it with the first configured
/// prefix; `None` when the name carries no workload prefix.
fn dispatch_interface(wep: &WorkloadEndpoint, prefixes: &[String]) -> Option<String> {
    let name = match (wep.interface_computed, prefixes.first()) {
        (true, Some(first)) => interface_name(first, &wep.namespace, &wep.pod),
        _ => wep.interface_name.clone(),
    };
    prefixes
        .iter()
        .any(|p| !p.is_empty() && name.starts_with(p.as_str()))
        .then_some(name)
}

/// Builds the node's program. Pure.
pub fn compile(inputs: &PolicyInputs<'_>) -> Program {
    let empty = PolicyResources::default();
    let res = inputs.resources.unwrap_or(&empty);
    let tiers = ordered_tiers(res);

    let mut policies_used: BTreeMap<String, PolicyProgram> = BTreeMap::new();
    let mut endpoints = Vec::new();
    for (iface, hep) in
        resolve_interfaces(&res.host_endpoints, inputs.node, &inputs.local_interfaces)
    {
        let mut chains: BTreeMap<(Hook, Direction), Vec<TierProgram>> = BTreeMap::new();
        for hook in Hook::ALL {
            // doNotTrack on a "*" endpoint is ignored (Felix logs a warning).
            if hook == Hook::Untracked && iface == Iface::Any {
                continue;
            }
            for dir in [Direction::Ingress, Direction::Egress] {
                if hook == Hook::PreDnat && dir == Direction::Egress {
                    continue;
                }
                let applies = |p: &Policy| {
                    p.selects_host_endpoints
                        && policy_hooks(p).contains(&hook)
                        && p.selector.matches_in(&hep.labels, Scope::Global)
                };
                let out = tier_programs(res, &tiers, dir, applies, &mut policies_used);
                chains.insert((hook, dir), out);
            }
        }
        endpoints.push(EndpointProgram {
            hep: hep.name.clone(),
            iface,
            profiles: hep.profiles.clone(),
            chains,
        });
    }

    // This node's pods. doNotTrack and preDNAT policies are host-endpoint only (as in Felix).
    let labels = workload_labels(res);
    let mut workloads = Vec::new();
    for (wep, wep_labels) in res.workload_endpoints.iter().zip(&labels) {
        if wep.node != inputs.node || !inputs.settings.pods {
            continue;
        }
        let applies = |p: &Policy| !p.do_not_track && !p.pre_dnat && selects(p, wep, wep_labels);
        let ingress = tier_programs(res, &tiers, Direction::Ingress, applies, &mut policies_used);
        let egress = tier_programs(res, &tiers, Direction::Egress, applies, &mut policies_used);
        let profiles = wep
            .profiles
            .iter()
            .filter_map(|name| res.profiles.get(name))
            .map(|p| ProfileVerdict {
                name: p.name.clone(),
                allow_ingress: p.allow_ingress,
                allow_egress: p.allow_egress,
            })
            .collect();
        workloads.push(WorkloadProgram {
            namespace: wep.namespace.clone(),
            pod: wep.pod.clone(),
            interface: dispatch_interface(wep, &inputs.settings.workload_prefixes),
            ips: wep.ips.clone(),
            ingress,
            egress,
            profiles,
        });
    }

    // Address sets for every selector the programmed rules use, and named-port sets.
    let mut selectors: BTreeMap<String, Selector> = BTreeMap::new();
    let mut named_port_sets: BTreeMap<String, NamedPortSet> = BTreeMap::new();
    for p in policies_used.values() {
        for r in p.ingress.iter().chain(&p.egress) {
            for e in [&r.source, &r.destination] {
                for s in e.selector.iter().chain(&e.not_selector) {
                    selectors.entry(s.unique_id()).or_insert_with(|| s.clone());
                }
                for negated in [false, true] {
                    if let Some(id) = named_port_set_id(r, e, negated) {
                        named_port_sets.entry(id).or_insert_with(|| {
                            named_port_members_with(r, e, negated, res, &labels)
                        });
                    }
                }
            }
        }
    }
    let sets = selectors
        .into_iter()
        .map(|(id, sel)| {
            let set = selector_members_with(&sel, res, &labels);
            (id, set)
        })
        .collect();
    Program {
        settings: inputs.settings.clone(),
        endpoints,
        workloads,
        policies: policies_used,
        sets,
        named_port_sets,
    }
}

/// Members of a selector's set: matching host endpoints' `expectedIPs` (any node), matching
/// pods' addresses (any node) and the nets of matching network sets.
pub fn selector_members(sel: &Selector, res: &PolicyResources) -> SelectorSet {
    selector_members_with(sel, res, &workload_labels(res))
}

/// [`selector_members`] with the pods' labels worked out already (see [`workload_labels`]).
fn selector_members_with(
    sel: &Selector,
    res: &PolicyResources,
    wep_labels: &[BTreeMap<String, String>],
) -> SelectorSet {
    let mut nets: Vec<IpNet> = Vec::new();
    for h in &res.host_endpoints {
        if sel.matches_in(&h.labels, Scope::Global) {
            nets.extend(h.expected_ips.iter().map(|ip| IpNet::from(*ip)));
        }
    }
    for (w, labels) in res.workload_endpoints.iter().zip(wep_labels) {
        if sel.matches_in(labels, Scope::Namespaced) {
            nets.extend(w.ips.iter().copied());
        }
    }
    for s in &res.network_sets {
        let scope = if s.namespace.is_some() {
            Scope::Namespaced
        } else {
            Scope::Global
        };
        if sel.matches_in(&s.labels, scope) {
            nets.extend(s.nets.iter().copied());
        }
    }
    let v4: Vec<Ipv4Net> = nets
        .iter()
        .filter_map(|n| match n {
            IpNet::V4(n) => Some(*n),
            IpNet::V6(_) => None,
        })
        .collect();
    let v6: Vec<Ipv6Net> = nets
        .iter()
        .filter_map(|n| match n {
            IpNet::V6(n) => Some(*n),
            IpNet::V4(_) => None,
        })
        .collect();
    SelectorSet {
        selector: sel.canonical(),
        v4: Ipv4Net::aggregate(&v4),
        v6: Ipv6Net::aggregate(&v6),
    }
}

/// Families a rule is rendered for and the nets it keeps in each (§2.1, 25–26). `None` for a
/// family means the rule is dropped from it.
pub fn rule_families(rule: &Rule) -> Vec<Family> {
    Family::ALL
        .into_iter()
        .filter(|f| rule.ip_version.is_none_or(|v| v == *f))
        .filter(|f| {
            [&rule.source, &rule.destination]
                .iter()
                .all(|e| e.nets.is_empty() || e.nets.iter().any(|n| Family::of_net(n) == *f))
        })
        .collect()
}

//! Kubernetes `networking.k8s.io/v1` NetworkPolicy -> Calico `projectcalico.org/v3`
//! NetworkPolicy, as Calico's libcalico-go converts it (`k8s/conversion`,
//! `K8sNetworkPolicyToCalico`), so that both go down one validation and enforcement path and a
//! Kubernetes policy means in wiremesh exactly what it means in Calico:
//!
//! - name `knp.default.<name>`, same namespace, tier `default`, order 1000;
//! - selectors: `projectcalico.org/orchestrator == 'k8s'` then the pod selector's `matchLabels`
//!   (sorted by key) and `matchExpressions` (in order) as `k == 'v'`, `k in { 'a', 'b' }`,
//!   `k not in { ... }`, `has(k)`, `! has(k)`; a namespace selector without that first term,
//!   `all()` when empty (the `pcns.` prefix is added where every namespace selector gets it);
//! - types: `Ingress` / `Egress` as listed (always in that order), `[Ingress]` when none;
//! - each Kubernetes rule becomes one Allow rule per protocol (sorted: none, SCTP, TCP, UDP) per
//!   peer (in order), the protocol's ports merged into ranges; no `ports` means any protocol, a
//!   port entry without a port means every port of its protocol (TCP when unset); `endPort`
//!   gives `port:endPort`; `ipBlock` gives `nets` and `except` gives `notNets`.
//!
//! Where Calico is silent about bad input wiremesh is not (the API server validates these
//! fields, so this only matters for objects that did not come through it, e.g. etcd): a rule
//! with a bad port, CIDR or selector operator is left out and reported, never widened (policy
//! validation then refuses the object and keeps its last valid version). Calico drops a rule
//! for a bad port too, but turns a bad `ipBlock` into a peer that matches everything and skips
//! a bad selector term.

use std::collections::BTreeMap;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{
    NetworkPolicy as KubernetesNetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::common::{Action, EntityRule, NumOrString, PolicyType, Rule};
use super::policy::NetworkPolicySpec;

/// The prefix of a converted policy's name (Calico's `K8sNetworkPolicyNamePrefix`).
pub const NAME_PREFIX: &str = "knp.default.";
/// The order of every converted policy (Calico: "This order might change in future").
pub const ORDER: f64 = 1000.0;
/// The first term of every pod selector: only Kubernetes pods, not host endpoints.
pub const ORCHESTRATOR_TERM: &str = "projectcalico.org/orchestrator == 'k8s'";

/// A Kubernetes NetworkPolicy as the Calico NetworkPolicy it stands for.
#[derive(Debug, Clone, PartialEq)]
pub struct Converted {
    /// `knp.default.<name>`.
    pub name: String,
    pub namespace: String,
    pub spec: NetworkPolicySpec,
    /// What could not be converted, and why: each such rule is left out of `spec` (a bad term
    /// of the policy's own pod selector is left out of its selector).
    pub problems: Vec<ConversionProblem>,
}

/// A part of a Kubernetes NetworkPolicy that was left out of the conversion.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConversionProblem {
    /// e.g. `spec.ingress[1]` (the rule that was dropped) or `spec.podSelector`.
    pub field: String,
    pub reason: String,
}

#[derive(Clone, Copy, PartialEq)]
enum SelectorType {
    Pod,
    Namespace,
}

/// Converts `np` (its namespace defaults to `default`).
pub fn convert(np: &KubernetesNetworkPolicy) -> Converted {
    let name = np.metadata.name.clone().unwrap_or_default();
    let namespace = np
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let spec = np.spec.clone().unwrap_or_default();
    let mut problems = Vec::new();

    let selector = match selector(spec.pod_selector.as_ref(), SelectorType::Pod) {
        Ok(s) => s,
        Err(reason) => {
            // Without the bad term the policy selects more pods, i.e. isolates more: closed.
            problems.push(ConversionProblem {
                field: "spec.podSelector".into(),
                reason: format!("{reason}; the term is left out"),
            });
            selector_lenient(spec.pod_selector.as_ref())
        }
    };

    let mut ingress = Vec::new();
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        match rules(rule.from.as_deref(), rule.ports.as_deref(), true) {
            Ok(mut out) => ingress.append(&mut out),
            Err(reason) => problems.push(ConversionProblem {
                field: format!("spec.ingress[{i}]"),
                reason,
            }),
        }
    }
    let mut egress = Vec::new();
    for (i, rule) in spec.egress.iter().flatten().enumerate() {
        match rules(rule.to.as_deref(), rule.ports.as_deref(), false) {
            Ok(mut out) => egress.append(&mut out),
            Err(reason) => problems.push(ConversionProblem {
                field: format!("spec.egress[{i}]"),
                reason,
            }),
        }
    }

    let listed = |t: &str| spec.policy_types.iter().flatten().any(|p| p == t);
    let mut types = Vec::new();
    if listed("Ingress") {
        types.push(PolicyType::Ingress);
    }
    if listed("Egress") {
        types.push(PolicyType::Egress);
    }
    if types.is_empty() {
        types.push(PolicyType::Ingress);
    }

    Converted {
        name: format!("{NAME_PREFIX}{name}"),
        namespace,
        spec: NetworkPolicySpec {
            tier: Some("default".into()),
            order: Some(ORDER),
            selector: Some(selector),
            types,
            ingress,
            egress,
            ..NetworkPolicySpec::default()
        },
        problems,
    }
}

/// Calico's selector for a Kubernetes label selector (see the module comment).
fn selector(s: Option<&LabelSelector>, kind: SelectorType) -> Result<String, String> {
    let mut terms = Vec::new();
    if kind == SelectorType::Pod {
        terms.push(ORCHESTRATOR_TERM.to_string());
    }
    let Some(s) = s else {
        return Ok(terms.join(" && "));
    };
    let labels = s.match_labels.as_ref().filter(|m| !m.is_empty());
    let expressions = s.match_expressions.as_ref().filter(|e| !e.is_empty());
    if kind == SelectorType::Namespace && labels.is_none() && expressions.is_none() {
        return Ok("all()".into());
    }
    // A BTreeMap iterates in byte order of the keys, as Go's sort.Strings.
    for (k, v) in labels.into_iter().flatten() {
        terms.push(format!("{k} == '{v}'"));
    }
    for e in expressions.into_iter().flatten() {
        let values = e.values.as_deref().unwrap_or_default().join("', '");
        terms.push(match e.operator.as_str() {
            "In" => format!("{} in {{ '{values}' }}", e.key),
            "NotIn" => format!("{} not in {{ '{values}' }}", e.key),
            "Exists" => format!("has({})", e.key),
            "DoesNotExist" => format!("! has({})", e.key),
            other => {
                return Err(format!(
                    "matchExpressions operator {other:?} is not In, NotIn, Exists or DoesNotExist"
                ));
            }
        });
    }
    Ok(terms.join(" && "))
}

/// The pod selector with terms of unknown operators left out (Calico's behaviour).
fn selector_lenient(s: Option<&LabelSelector>) -> String {
    let mut s = s.cloned().unwrap_or_default();
    if let Some(expressions) = s.match_expressions.as_mut() {
        expressions.retain(|e| {
            matches!(
                e.operator.as_str(),
                "In" | "NotIn" | "Exists" | "DoesNotExist"
            )
        });
    }
    selector(Some(&s), SelectorType::Pod).unwrap_or_else(|_| ORCHESTRATOR_TERM.into())
}

/// A peer's (selector, namespaceSelector, nets, notNets); `None` peer: no restriction.
type PeerFields = (Option<String>, Option<String>, Vec<String>, Vec<String>);

fn peer_fields(peer: Option<&NetworkPolicyPeer>) -> Result<PeerFields, String> {
    let Some(peer) = peer else {
        return Ok((None, None, Vec::new(), Vec::new()));
    };
    if let Some(block) = &peer.ip_block {
        // An ipBlock takes precedence over selectors (Calico ignores them then).
        let cidr = parse_cidr(&block.cidr, "ipBlock.cidr")?;
        let except = block
            .except
            .iter()
            .flatten()
            .map(|e| parse_cidr(e, "ipBlock.except"))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((None, None, vec![cidr], except));
    }
    let pods = selector(peer.pod_selector.as_ref(), SelectorType::Pod)?;
    let namespaces = selector(peer.namespace_selector.as_ref(), SelectorType::Namespace)?;
    Ok((
        Some(pods),
        Some(namespaces).filter(|n| !n.is_empty()),
        Vec::new(),
        Vec::new(),
    ))
}

/// The network of a CIDR (host bits cleared, as Go's net.ParseCIDR returns it).
fn parse_cidr(text: &str, field: &str) -> Result<String, String> {
    text.trim()
        .parse::<IpNet>()
        .map(|n| n.trunc().to_string())
        .map_err(|e| format!("{field} {text:?} is not a CIDR: {e}"))
}

/// Calico's rules for one Kubernetes rule (see the module comment).
fn rules(
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    ingress: bool,
) -> Result<Vec<Rule>, String> {
    // protocol ("" = none) -> its ports; `None` = every port of that protocol.
    let mut by_protocol: BTreeMap<String, Option<Vec<CalicoPort>>> = BTreeMap::new();
    let ports = ports.unwrap_or_default();
    if ports.is_empty() {
        by_protocol.insert(String::new(), None);
    }
    for p in ports {
        let protocol = canonical_protocol(p.protocol.as_deref().unwrap_or("TCP"));
        let port = calico_port(p)?;
        let entry = by_protocol
            .entry(protocol)
            .or_insert_with(|| Some(Vec::new()));
        match (port, entry.as_mut()) {
            // "Every port" wins over any list of that protocol.
            (None, _) => *entry = None,
            (Some(port), Some(list)) => list.push(port),
            (Some(_), None) => {}
        }
    }
    let peers: Vec<Option<&NetworkPolicyPeer>> = match peers {
        Some(list) if !list.is_empty() => list.iter().map(Some).collect(),
        _ => vec![None],
    };
    let peers = peers
        .into_iter()
        .map(peer_fields)
        .collect::<Result<Vec<_>, _>>()?;

    let mut out = Vec::new();
    for (protocol, ports) in by_protocol {
        let ports: Vec<NumOrString> = ports
            .map(simplify_ports)
            .unwrap_or_default()
            .into_iter()
            .map(CalicoPort::into_wire)
            .collect();
        let protocol = (!protocol.is_empty()).then_some(NumOrString::Str(protocol));
        for (selector, namespace_selector, nets, not_nets) in &peers {
            let peer = EntityRule {
                selector: selector.clone(),
                namespace_selector: namespace_selector.clone(),
                nets: nets.clone(),
                not_nets: not_nets.clone(),
                ..EntityRule::default()
            };
            let has_peer = peer != EntityRule::default();
            let (source, destination) = if ingress {
                let destination = EntityRule {
                    ports: ports.clone(),
                    ..EntityRule::default()
                };
                (has_peer.then_some(peer), Some(destination))
            } else {
                let destination = EntityRule {
                    ports: ports.clone(),
                    ..peer
                };
                (None, Some(destination))
            };
            out.push(Rule {
                action: Action::Allow,
                protocol: protocol.clone(),
                not_protocol: None,
                ip_version: None,
                icmp: None,
                not_icmp: None,
                source,
                destination: destination.filter(|d| *d != EntityRule::default()),
                http: None,
                metadata: None,
            });
        }
    }
    Ok(out)
}

/// Calico's spelling of a protocol name (case-insensitive); anything else as written, for
/// validation to judge.
fn canonical_protocol(name: &str) -> String {
    ["TCP", "UDP", "SCTP", "ICMP", "ICMPv6", "UDPLite"]
        .into_iter()
        .find(|p| p.eq_ignore_ascii_case(name))
        .map_or_else(|| name.to_string(), str::to_string)
}

#[derive(Debug, Clone, PartialEq)]
enum CalicoPort {
    Range(u16, u16),
    Named(String),
}

impl CalicoPort {
    fn into_wire(self) -> NumOrString {
        match self {
            CalicoPort::Range(lo, hi) if lo == hi => NumOrString::Num(i64::from(lo)),
            CalicoPort::Range(lo, hi) => NumOrString::Str(format!("{lo}:{hi}")),
            CalicoPort::Named(name) => NumOrString::Str(name),
        }
    }
}

/// A port entry's ports: `None` = every port (no `port`).
fn calico_port(p: &NetworkPolicyPort) -> Result<Option<CalicoPort>, String> {
    let Some(port) = &p.port else {
        return Ok(None);
    };
    let number = |n: i64| {
        u16::try_from(n)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("invalid port {n}: not in 1-65535"))
    };
    let text = match port {
        IntOrString::Int(n) => n.to_string(),
        IntOrString::String(s) => s.clone(),
    };
    if let Some(end) = p.end_port {
        let lo = text
            .parse::<i64>()
            .map_err(|_| format!("invalid port {text}:{end}: endPort needs a numeric port"))
            .and_then(number)?;
        let hi = number(i64::from(end))?;
        if lo > hi {
            return Err(format!(
                "invalid port {lo}:{hi}: port is greater than endPort"
            ));
        }
        return Ok(Some(CalicoPort::Range(lo, hi)));
    }
    if let Ok(n) = text.parse::<i64>() {
        let n = number(n)?;
        return Ok(Some(CalicoPort::Range(n, n)));
    }
    let valid_name = !text.is_empty()
        && text.len() <= 128
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid_name {
        return Err(format!(
            "invalid port {text:?}: not a number or a port name"
        ));
    }
    Ok(Some(CalicoPort::Named(text)))
}

/// Calico's `SimplifyPorts`: named ports first (in order), then numeric ports sorted with
/// adjacent and duplicate ones merged into ranges; a list with at most one numeric port is
/// left as it is.
fn simplify_ports(ports: Vec<CalicoPort>) -> Vec<CalicoPort> {
    if ports.len() <= 1 {
        return ports;
    }
    let mut named = Vec::new();
    let mut numbers = Vec::new();
    for p in &ports {
        match p {
            CalicoPort::Named(_) => named.push(p.clone()),
            CalicoPort::Range(lo, hi) => numbers.extend(*lo..=*hi),
        }
    }
    if numbers.len() <= 1 {
        return ports;
    }
    numbers.sort_unstable();
    numbers.dedup();
    let mut out = named;
    let mut start = numbers[0];
    let mut last = start;
    for &n in &numbers[1..] {
        if n != last + 1 {
            out.push(CalicoPort::Range(start, last));
            start = n;
        }
        last = n;
    }
    out.push(CalicoPort::Range(start, last));
    out
}

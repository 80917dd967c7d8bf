//! Validated policy domain types (no serde field names, no I/O).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::model::Family;
use crate::selector::Selector;

/// A rule's action: the wire type is already all the domain needs.
pub use crate::wire::common::Action;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    IcmpV6,
    Sctp,
    UdpLite,
    Number(u8),
}

impl Protocol {
    pub fn from_number(n: u8) -> Protocol {
        Protocol::Number(n)
    }

    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Icmp => 1,
            Protocol::IcmpV6 => 58,
            Protocol::Sctp => 132,
            Protocol::UdpLite => 136,
            Protocol::Number(n) => n,
        }
    }

    /// Parses a CLI spelling: a name (any case) or a number.
    pub fn parse_loose(s: &str) -> Option<Protocol> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "icmp" => Some(Protocol::Icmp),
            "icmpv6" => Some(Protocol::IcmpV6),
            "sctp" => Some(Protocol::Sctp),
            "udplite" => Some(Protocol::UdpLite),
            other => other.parse::<u8>().ok().map(Protocol::Number),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, p: u16) -> bool {
        self.lo <= p && p <= self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct IcmpMatch {
    pub type_: u8,
    pub code: Option<u8>,
}

/// A rule's source or destination. `selector` is the effective (namespace-scoped) selector.
/// Named ports are kept apart from numeric ones: `ports` matches if a numeric port *or* a named
/// port matches; `notPorts` excludes both.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Entity {
    pub nets: Vec<IpNet>,
    pub not_nets: Vec<IpNet>,
    pub selector: Option<Selector>,
    pub not_selector: Option<Selector>,
    pub ports: Vec<PortRange>,
    pub not_ports: Vec<PortRange>,
    pub named_ports: Vec<String>,
    pub not_named_ports: Vec<String>,
}

impl Entity {
    /// Whether `ports` has any entry (numeric or named).
    pub fn has_ports(&self) -> bool {
        !self.ports.is_empty() || !self.named_ports.is_empty()
    }

    pub fn has_not_ports(&self) -> bool {
        !self.not_ports.is_empty() || !self.not_named_ports.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rule {
    pub action: Action,
    pub ip_version: Option<Family>,
    pub protocol: Option<Protocol>,
    pub not_protocol: Option<Protocol>,
    pub icmp: Option<IcmpMatch>,
    pub not_icmp: Option<IcmpMatch>,
    pub source: Entity,
    pub destination: Entity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum PolicyKind {
    Global,
    Namespaced,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    pub kind: PolicyKind,
    pub namespace: Option<String>,
    pub name: String,
    pub tier: String,
    pub order: Option<f64>,
    pub selector: Selector,
    /// A GlobalNetworkPolicy's `namespaceSelector` / `serviceAccountSelector`, as written
    /// (they match the namespace's and account's labels: see `workload::selects`).
    pub namespace_selector: Option<Selector>,
    pub service_account_selector: Option<Selector>,
    /// False for NetworkPolicies and GNPs with a namespace or service-account selector.
    pub selects_host_endpoints: bool,
    /// `None` when the policy's types exclude the direction.
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
    pub do_not_track: bool,
    pub pre_dnat: bool,
    pub apply_on_forward: bool,
}

impl Policy {
    /// `gnp/name` or `np/ns/name`, as in Felix's chain names.
    pub fn display_name(&self) -> String {
        match (&self.kind, &self.namespace) {
            (PolicyKind::Namespaced, Some(ns)) => format!("np/{ns}/{}", self.name),
            _ => format!("gnp/{}", self.name),
        }
    }

    /// Calico's in-tier order: `order` (None = +inf), then bytewise `name/namespace/kind`.
    pub fn sort_key(&self) -> PolicyOrder {
        PolicyOrder {
            order: self.order,
            key: format!(
                "{}/{}/{}",
                self.name,
                self.namespace.as_deref().unwrap_or(""),
                match self.kind {
                    PolicyKind::Global => "GlobalNetworkPolicy",
                    PolicyKind::Namespaced => "NetworkPolicy",
                }
            ),
        }
    }

    pub fn rules(&self, dir: Direction) -> Option<&Vec<Rule>> {
        match dir {
            Direction::Ingress => self.ingress.as_ref(),
            Direction::Egress => self.egress.as_ref(),
        }
    }
}

/// Sort key with `None` ordering after every number.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyOrder {
    pub order: Option<f64>,
    pub key: String,
}

pub fn cmp_order(a: Option<f64>, b: Option<f64>) -> Ordering {
    match (a, b) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

impl Eq for PolicyOrder {}
impl PartialOrd for PolicyOrder {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for PolicyOrder {
    fn cmp(&self, other: &Self) -> Ordering {
        cmp_order(self.order, other.order)
            .then_with(|| self.key.as_bytes().cmp(other.key.as_bytes()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum TierDefault {
    Deny,
    Pass,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tier {
    pub name: String,
    pub order: Option<f64>,
    pub default_action: TierDefault,
}

impl Tier {
    pub fn builtin() -> [Tier; 3] {
        [
            Tier {
                name: "kube-admin".into(),
                order: Some(1_000.0),
                default_action: TierDefault::Pass,
            },
            Tier {
                name: "default".into(),
                order: Some(1_000_000.0),
                default_action: TierDefault::Deny,
            },
            Tier {
                name: "kube-baseline".into(),
                order: Some(10_000_000.0),
                default_action: TierDefault::Pass,
            },
        ]
    }
}

/// A named port of a host endpoint (`spec.ports[]`). `protocol` is TCP, UDP or SCTP.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct EndpointPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostEndpoint {
    pub name: String,
    pub node: String,
    /// `None` = identified by expected IPs only; `Some("*")` = every host interface.
    pub interface_name: Option<String>,
    pub expected_ips: Vec<IpAddr>,
    pub profiles: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<EndpointPort>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetworkSet {
    /// `None` for a GlobalNetworkSet.
    pub namespace: Option<String>,
    pub name: String,
    /// Own labels, plus `projectcalico.org/namespace` for a NetworkSet.
    pub labels: BTreeMap<String, String>,
    pub nets: Vec<IpNet>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Direction {
    Ingress,
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

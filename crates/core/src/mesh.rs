//! `desired()`: the whole WireGuard dataplane as a pure function of the datastore snapshot,
//! the effective settings and this node's keys. No I/O, no clock; ordered collections only.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::{FamilySettings, MTU_OVERHEAD_V4, MTU_OVERHEAD_V6, WireguardSettings};
use crate::keys::PrivateKey;
use crate::model::{Family, NodeResource, PublishedWireguard, WgKey};

/// Facts the agent itself contributes: identity, keys, marks and what it observed of the host.
#[derive(Debug, Clone)]
pub struct LocalFacts {
    pub node_name: String,
    /// This node's private key per family (present for every enabled family).
    pub private_keys: BTreeMap<Family, PrivateKey>,
    pub fwmark: u32,
    pub routing_table: u32,
    /// Smallest MTU of the host's uplinks (observed); used when the MTU setting is 0 (auto).
    pub host_mtu: u32,
    /// Devices this agent created under names no longer configured (recorded in the state
    /// directory), so that a rename removes the old device.
    pub previous_interfaces: BTreeSet<String>,
}

/// Everything `desired()` reads.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub local: LocalFacts,
    pub settings: WireguardSettings,
    pub nodes: BTreeMap<String, NodeResource>,
}

/// Why a node is not a WireGuard peer for one family. Reported in logs and status.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "camelCase")]
pub enum SkipReason {
    /// The node publishes no key for this family (WireGuard off there, or not started yet).
    NoKey,
    MalformedKey {
        value: String,
        error: String,
    },
    /// The key is also published by these nodes; none of them is peered.
    KeyCollision {
        with: Vec<String>,
    },
    NoUnderlayAddress,
    MalformedUnderlayAddress {
        value: String,
    },
    MalformedPodCidr {
        value: String,
    },
    MalformedInterfaceAddress {
        value: String,
    },
    /// The datastore object could not be decoded.
    Undecodable {
        error: String,
    },
}

impl SkipReason {
    /// A short, stable label (metrics, status JSON): the serialized tag in snake case.
    pub fn code(&self) -> &'static str {
        match self {
            SkipReason::NoKey => "no_key",
            SkipReason::MalformedKey { .. } => "malformed_key",
            SkipReason::KeyCollision { .. } => "key_collision",
            SkipReason::NoUnderlayAddress => "no_underlay_address",
            SkipReason::MalformedUnderlayAddress { .. } => "malformed_underlay_address",
            SkipReason::MalformedPodCidr { .. } => "malformed_pod_cidr",
            SkipReason::MalformedInterfaceAddress { .. } => "malformed_interface_address",
            SkipReason::Undecodable { .. } => "undecodable",
        }
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::NoKey => write!(f, "publishes no WireGuard public key"),
            SkipReason::MalformedKey { value, error } => {
                write!(f, "malformed WireGuard public key {value:?}: {error}")
            }
            SkipReason::KeyCollision { with } => {
                write!(f, "public key is also published by {}", with.join(", "))
            }
            SkipReason::NoUnderlayAddress => write!(f, "has no underlay address for this family"),
            SkipReason::MalformedUnderlayAddress { value } => {
                write!(f, "malformed underlay address {value:?}")
            }
            SkipReason::MalformedPodCidr { value } => write!(f, "malformed pod CIDR {value:?}"),
            SkipReason::MalformedInterfaceAddress { value } => {
                write!(f, "malformed WireGuard interface address {value:?}")
            }
            SkipReason::Undecodable { error } => {
                write!(f, "node object cannot be decoded: {error}")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SkippedNode {
    pub node: String,
    pub family: Family,
    #[serde(flatten)]
    pub reason: SkipReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSpec {
    pub node: String,
    pub endpoint: SocketAddr,
    pub allowed_ips: BTreeSet<IpNet>,
    /// Persistent keepalive in seconds; 0 = off.
    pub keepalive: u16,
}

/// One family's WireGuard device as it should be.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSpec {
    pub family: Family,
    pub name: String,
    pub private_key: PrivateKey,
    pub listen_port: u16,
    pub fwmark: u32,
    pub mtu: u32,
    /// The device's one address (/32 or /128), if this node has a tunnel address.
    pub address: Option<IpNet>,
    pub peers: BTreeMap<WgKey, PeerSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RouteKind {
    /// `<dest> dev <interface> scope link`
    Device { interface: String },
    /// `throw <dest>`: fall through to the main table (clear text).
    Throw,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RouteSpec {
    pub table: u32,
    pub dest: IpNet,
    pub kind: RouteKind,
}

impl RouteSpec {
    pub fn family(&self) -> Family {
        Family::of_net(&self.dest)
    }
}

/// `not fwmark <mark>/<mask> lookup <table> pref <priority>`, per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RuleSpec {
    pub family: Family,
    pub priority: u32,
    pub table: u32,
    pub fwmark: u32,
    pub mask: u32,
    pub invert: bool,
}

/// The complete desired WireGuard dataplane of this node.
#[derive(Debug, Clone, PartialEq)]
pub struct DataplaneSpec {
    /// Devices of the enabled families.
    pub devices: BTreeMap<Family, DeviceSpec>,
    /// Every interface name this agent may own (both families' configured names); a device with
    /// one of these names that is not in `devices` is removed.
    pub owned_interfaces: BTreeSet<String>,
    pub routing_table: u32,
    pub routes: BTreeSet<RouteSpec>,
    pub rules: BTreeSet<RuleSpec>,
    /// What this node publishes on its own node object.
    pub publish: PublishedWireguard,
    pub skipped: BTreeSet<SkippedNode>,
}

impl DataplaneSpec {
    pub fn enabled(&self) -> bool {
        !self.devices.is_empty()
    }
}

/// A node validated for one family: everything needed to peer with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCandidate {
    pub node: String,
    pub key: WgKey,
    pub underlay: IpAddr,
    pub cidrs: BTreeSet<IpNet>,
    pub interface_address: Option<IpAddr>,
}

/// Every node judged for one family: which can be peered, which cannot and why, and the pod
/// CIDRs that must not be routed into the tunnel. The one judgement `desired()` acts on and
/// `wiremesh status --cluster` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeValidation {
    /// Nodes that can be peered, by name.
    pub peers: BTreeMap<String, PeerCandidate>,
    pub skipped: BTreeSet<SkippedNode>,
    /// The pod CIDRs of nodes that are not peered (their traffic falls back to clear text).
    pub unpeered_cidrs: BTreeSet<IpNet>,
    /// Pod CIDRs more than one peer publishes, with those peers: routed to none of them
    /// (WireGuard would silently move an allowed IP from one peer to the other).
    pub shared_cidrs: BTreeMap<IpNet, BTreeSet<String>>,
}

/// The checks that decide whether `node` can be a peer for `family`, one node at a time (key
/// collisions and shared CIDRs need every node: [`validate_nodes`]). On failure, the reason and
/// the pod CIDRs that do parse (so their traffic can at least fall back to clear text).
pub fn validate_node(
    node: &NodeResource,
    family: Family,
) -> Result<PeerCandidate, (SkipReason, BTreeSet<IpNet>)> {
    if let Some(error) = &node.decode_error {
        let reason = SkipReason::Undecodable {
            error: error.clone(),
        };
        return Err((reason, BTreeSet::new()));
    }
    let cidrs = match pod_cidrs(node, family) {
        Ok(c) => c,
        Err(value) => {
            let parsed = node
                .pod_cidrs
                .iter()
                .filter_map(|c| c.trim().parse::<IpNet>().ok())
                .filter(|n| Family::of_net(n) == family)
                .map(|n| n.trunc())
                .collect();
            return Err((SkipReason::MalformedPodCidr { value }, parsed));
        }
    };
    let checked = (|| {
        let key_text = node.public_key(family).ok_or(SkipReason::NoKey)?;
        let key = key_text
            .parse::<WgKey>()
            .map_err(|e| SkipReason::MalformedKey {
                value: key_text.to_string(),
                error: e.to_string(),
            })?;
        let underlay_text = node
            .underlay_address(family)
            .ok_or(SkipReason::NoUnderlayAddress)?;
        let underlay = parse_address(underlay_text)
            .filter(|a| Family::of_addr(a) == family)
            .ok_or_else(|| SkipReason::MalformedUnderlayAddress {
                value: underlay_text.into(),
            })?;
        let interface_address = match node.interface_address(family) {
            None => None,
            Some(text) => Some(
                text.trim()
                    .parse::<IpAddr>()
                    .ok()
                    .filter(|a| Family::of_addr(a) == family)
                    .ok_or_else(|| SkipReason::MalformedInterfaceAddress { value: text.into() })?,
            ),
        };
        Ok((key, underlay, interface_address))
    })();
    match checked {
        Ok((key, underlay, interface_address)) => Ok(PeerCandidate {
            node: node.name.clone(),
            key,
            underlay,
            cidrs,
            interface_address,
        }),
        Err(reason) => Err((reason, cidrs)),
    }
}

/// Judges every node of `nodes` but `local` for `family`. `local` is this node and its own
/// public key, which no other node may publish; `None` judges every node alike (the cluster
/// view).
pub fn validate_nodes(
    nodes: &BTreeMap<String, NodeResource>,
    family: Family,
    local: Option<(&str, WgKey)>,
) -> NodeValidation {
    let mut out = NodeValidation::default();
    let mut candidates = Vec::new();
    for (name, node) in nodes {
        if local.is_some_and(|(local, _)| local == name) {
            continue;
        }
        match validate_node(node, family) {
            Ok(candidate) => candidates.push(candidate),
            Err((reason, cidrs)) => {
                out.skipped.insert(SkippedNode {
                    node: name.clone(),
                    family,
                    reason,
                });
                out.unpeered_cidrs.extend(cidrs);
            }
        }
    }
    // A key claimed by more than one node (this one included) peers none of them.
    let mut claimants: BTreeMap<WgKey, Vec<&str>> = BTreeMap::new();
    if let Some((name, key)) = local {
        claimants.entry(key).or_default().push(name);
    }
    for c in &candidates {
        claimants.entry(c.key).or_default().push(&c.node);
    }
    let mut collided = Vec::new();
    for c in &candidates {
        let owners = &claimants[&c.key];
        if owners.len() > 1 {
            let with = owners
                .iter()
                .filter(|o| **o != c.node)
                .map(|o| o.to_string())
                .collect();
            collided.push(SkippedNode {
                node: c.node.clone(),
                family,
                reason: SkipReason::KeyCollision { with },
            });
        }
    }
    for c in candidates {
        if collided.iter().any(|s| s.node == c.node) {
            out.unpeered_cidrs.extend(c.cidrs);
        } else {
            out.peers.insert(c.node.clone(), c);
        }
    }
    out.skipped.extend(collided);
    let mut cidr_owners: BTreeMap<IpNet, BTreeSet<String>> = BTreeMap::new();
    for p in out.peers.values() {
        for c in &p.cidrs {
            cidr_owners.entry(*c).or_default().insert(p.node.clone());
        }
    }
    out.shared_cidrs = cidr_owners
        .into_iter()
        .filter(|(_, owners)| owners.len() > 1)
        .collect();
    out
}

/// Parses an address that may carry a prefix length (Calico stores `172.30.0.1/24`).
pub fn parse_address(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    text.parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<IpNet>().ok().map(|n| n.addr()))
}

/// The node's pod CIDRs of one family, each normalised to its network; the first malformed
/// one is returned as the error.
fn pod_cidrs(node: &NodeResource, family: Family) -> Result<BTreeSet<IpNet>, String> {
    let mut out = BTreeSet::new();
    for raw in &node.pod_cidrs {
        let net: IpNet = raw.trim().parse().map_err(|_| raw.clone())?;
        if Family::of_net(&net) == family {
            out.insert(net.trunc());
        }
    }
    Ok(out)
}

/// With host-local IPAM the tunnel address is the first pod CIDR's network address + 1
/// (`10.244.1.0/24` -> `10.244.1.1`), as Calico does.
pub fn tunnel_address(cidrs: &BTreeSet<IpNet>) -> Option<IpAddr> {
    let net = cidrs.iter().find(|n| n.prefix_len() < n.max_prefix_len())?;
    match net.network() {
        IpAddr::V4(a) => Some(IpAddr::V4(u32::from(a).checked_add(1)?.into())),
        IpAddr::V6(a) => Some(IpAddr::V6(u128::from(a).checked_add(1)?.into())),
    }
}

fn host_net(addr: IpAddr) -> IpNet {
    IpNet::new(addr, Family::of_addr(&addr).host_prefix()).unwrap_or_else(|_| IpNet::from(addr))
}

fn auto_mtu(settings: &FamilySettings, family: Family, host_mtu: u32) -> u32 {
    if settings.mtu != 0 {
        return settings.mtu;
    }
    let overhead = match family {
        Family::V4 => MTU_OVERHEAD_V4,
        Family::V6 => MTU_OVERHEAD_V6,
    };
    host_mtu.saturating_sub(overhead).max(1280.min(host_mtu))
}

/// The desired dataplane. See docs/architecture.md for the rules this encodes.
pub fn desired(inputs: &Inputs) -> DataplaneSpec {
    let local = &inputs.local;
    let settings = &inputs.settings;
    let mut spec = DataplaneSpec {
        devices: BTreeMap::new(),
        owned_interfaces: [
            settings.v4.interface_name.clone(),
            settings.v6.interface_name.clone(),
        ]
        .into_iter()
        .chain(local.previous_interfaces.iter().cloned())
        .collect(),
        routing_table: local.routing_table,
        routes: BTreeSet::new(),
        rules: BTreeSet::new(),
        publish: PublishedWireguard::default(),
        skipped: BTreeSet::new(),
    };
    let local_node = inputs.nodes.get(&local.node_name);

    for family in Family::ALL {
        let fs = settings.family(family);
        if !fs.enabled {
            continue;
        }
        let Some(private_key) = local.private_keys.get(&family) else {
            continue;
        };
        let local_key = private_key.public_key();
        let local_cidrs = local_node
            .and_then(|n| pod_cidrs(n, family).ok())
            .unwrap_or_default();
        let local_tunnel = tunnel_address(&local_cidrs);
        let local_underlay = local_node
            .and_then(|n| n.underlay_address(family))
            .and_then(parse_address);

        let nodes = validate_nodes(&inputs.nodes, family, Some((&local.node_name, local_key)));
        spec.skipped.extend(nodes.skipped.iter().cloned());
        let mut non_peer_cidrs = nodes.unpeered_cidrs.clone();
        non_peer_cidrs.extend(nodes.shared_cidrs.keys().copied());

        let device_name = fs.interface_name.clone();
        let mut device = DeviceSpec {
            family,
            name: device_name.clone(),
            private_key: private_key.clone(),
            listen_port: fs.listening_port,
            fwmark: local.fwmark,
            mtu: auto_mtu(fs, family, local.host_mtu),
            address: local_tunnel.map(host_net),
            peers: BTreeMap::new(),
        };
        // A CIDR belongs to one place: local CIDRs are never allowed IPs of a peer, and a CIDR
        // claimed by two peers goes to neither.
        for p in nodes.peers.values() {
            let mut allowed: BTreeSet<IpNet> = p
                .cidrs
                .iter()
                .filter(|c| !nodes.shared_cidrs.contains_key(*c) && !local_cidrs.contains(*c))
                .copied()
                .collect();
            let tunnel = p.interface_address.or_else(|| tunnel_address(&p.cidrs));
            if let Some(addr) = tunnel
                && !allowed.iter().any(|n| n.contains(&addr))
            {
                allowed.insert(host_net(addr));
            }
            if settings.host_encryption && Some(p.underlay) != local_underlay {
                allowed.insert(host_net(p.underlay));
            }
            for dest in &allowed {
                spec.routes.insert(RouteSpec {
                    table: local.routing_table,
                    dest: *dest,
                    kind: RouteKind::Device {
                        interface: device_name.clone(),
                    },
                });
            }
            device.peers.insert(
                p.key,
                PeerSpec {
                    node: p.node.clone(),
                    endpoint: SocketAddr::new(p.underlay, fs.listening_port),
                    allowed_ips: allowed,
                    keepalive: u16::try_from(settings.keepalive.as_secs()).unwrap_or(u16::MAX),
                },
            );
        }
        let routed: BTreeSet<IpNet> = spec.routes.iter().map(|r| r.dest).collect();
        for dest in local_cidrs.iter().chain(non_peer_cidrs.iter()) {
            if !routed.contains(dest) {
                spec.routes.insert(RouteSpec {
                    table: local.routing_table,
                    dest: *dest,
                    kind: RouteKind::Throw,
                });
            }
        }
        spec.rules.insert(RuleSpec {
            family,
            priority: settings.routing_rule_priority,
            table: local.routing_table,
            fwmark: local.fwmark,
            mask: local.fwmark,
            invert: true,
        });
        match family {
            Family::V4 => {
                spec.publish.public_key_v4 = Some(local_key);
                spec.publish.interface_ipv4_address = local_tunnel;
            }
            Family::V6 => {
                spec.publish.public_key_v6 = Some(local_key);
                spec.publish.interface_ipv6_address = local_tunnel;
            }
        }
        spec.devices.insert(family, device);
    }
    spec
}

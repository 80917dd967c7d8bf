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
    /// Host encryption: per family, the peers the device has completed a handshake with since
    /// this node's current key was written (observed). A completed handshake proves the peer
    /// holds our current key, so only these peers get their node address routed into the
    /// tunnel (Calico's bootstrap lesson: never send host traffic through a key the other side
    /// has not seen yet; the others' host traffic goes direct meanwhile).
    pub confirmed_peers: BTreeMap<Family, BTreeSet<WgKey>>,
}

/// Persistent keepalive (seconds) of every peer when host encryption is on and none is
/// configured: setting it makes WireGuard send a keepalive at once, which starts the handshake
/// that confirms a peer, and keeps handshakes coming while the peer is alive, so a confirmation
/// that is no longer renewed means the peer lost our key (see `confirmed_peers`).
pub const HOST_ENCRYPTION_KEEPALIVE: u16 = 25;

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
    /// The node claims a pod CIDR that overlaps one `owner` claimed first: the claim is not
    /// honoured and the node is not peered (by any node, itself included).
    PodCidrConflict {
        cidr: String,
        owner: String,
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
            SkipReason::PodCidrConflict { .. } => "pod_cidr_conflict",
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
            SkipReason::PodCidrConflict { cidr, owner } => {
                write!(
                    f,
                    "claims pod CIDR {cidr}, which overlaps a CIDR {owner} claimed first"
                )
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
    /// Why every node (this one included) skips the local node, when it does: the local node
    /// then peers none, so no pair is encrypted on one side only.
    pub local_skipped: Option<SkipReason>,
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
///
/// Every node reaches the same verdict about every pair from the same datastore, so a conflict
/// never leaves one side encrypting to a side that dropped it (docs/encryption.md):
/// - a key published by more than one node (this node's own key included) peers none of them,
///   and such a node peers nobody itself;
/// - of overlapping pod CIDRs, the older claim wins (then the node name); a node with a claim
///   that loses is not peered, and peers nobody itself.
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
    // This node as the others see it. What they would skip it for, it skips itself for, except
    // a missing or stale key: it publishes its own key in the same pass.
    let mut local_published_key = None;
    if let Some((name, actual)) = local
        && let Some(node) = nodes.get(name)
    {
        match validate_node(node, family) {
            Ok(published) if published.key != actual => local_published_key = Some(published.key),
            Ok(_) | Err((SkipReason::NoKey | SkipReason::MalformedKey { .. }, _)) => {}
            Err((reason, _)) => out.local_skipped = Some(reason),
        }
    }
    let mut rejected = key_collisions(&candidates, local, local_published_key, family);
    if let Some((name, _)) = local {
        while let Some(mine) = rejected.iter().position(|s| s.node == name) {
            let reason = rejected.remove(mine).reason;
            out.local_skipped.get_or_insert(reason);
        }
    }
    for conflict in pod_cidr_conflicts(nodes, family) {
        match local {
            Some((name, _)) if name == conflict.node => {
                out.local_skipped.get_or_insert(conflict.reason);
            }
            _ if !rejected.iter().any(|s| s.node == conflict.node) => rejected.push(conflict),
            _ => {}
        }
    }
    // The CIDRs other nodes won stay theirs; the rest of a rejected node's fall back to clear.
    let won: BTreeSet<IpNet> = candidates
        .iter()
        .filter(|c| !rejected.iter().any(|s| s.node == c.node))
        .flat_map(|c| c.cidrs.iter().copied())
        .collect();
    for c in candidates {
        if rejected.iter().any(|s| s.node == c.node) {
            out.unpeered_cidrs
                .extend(c.cidrs.into_iter().filter(|cidr| !won.contains(cidr)));
        } else {
            out.peers.insert(c.node.clone(), c);
        }
    }
    out.skipped.extend(rejected);
    if out.local_skipped.is_some() {
        // Everyone skips this node: it must not encrypt to anyone either.
        for (_, peer) in std::mem::take(&mut out.peers) {
            out.unpeered_cidrs.extend(peer.cidrs);
        }
    }
    out
}

/// Every node (this one included, by its actual key and by the key it still publishes, if
/// that differs) whose key another node also publishes.
fn key_collisions(
    candidates: &[PeerCandidate],
    local: Option<(&str, WgKey)>,
    local_published_key: Option<WgKey>,
    family: Family,
) -> Vec<SkippedNode> {
    let mut claimants: BTreeMap<WgKey, Vec<&str>> = BTreeMap::new();
    if let Some((name, key)) = local {
        claimants.entry(key).or_default().push(name);
        if let Some(published) = local_published_key {
            claimants.entry(published).or_default().push(name);
        }
    }
    for c in candidates {
        claimants.entry(c.key).or_default().push(&c.node);
    }
    let mut out = Vec::new();
    for owners in claimants.values().filter(|o| o.len() > 1) {
        for node in owners {
            out.push(SkippedNode {
                node: node.to_string(),
                family,
                reason: SkipReason::KeyCollision {
                    with: owners
                        .iter()
                        .filter(|o| *o != node)
                        .map(|o| o.to_string())
                        .collect(),
                },
            });
        }
    }
    out
}

/// The nodes with a pod-CIDR claim that overlaps an older claim of another node. Judged over
/// every node with parseable CIDRs, whatever else is wrong with it, so every node agrees.
fn pod_cidr_conflicts(nodes: &BTreeMap<String, NodeResource>, family: Family) -> Vec<SkippedNode> {
    let mut claims: Vec<(u64, &str, IpNet)> = Vec::new();
    for (name, node) in nodes {
        for cidr in pod_cidrs(node, family).unwrap_or_default() {
            let claimed_at = node
                .pod_cidr_claimed_at
                .iter()
                .filter(|(text, _)| {
                    text.trim()
                        .parse::<IpNet>()
                        .is_ok_and(|n| n.trunc() == cidr)
                })
                .map(|(_, at)| *at)
                .min()
                .unwrap_or(u64::MAX);
            claims.push((claimed_at, name, cidr));
        }
    }
    claims.sort();
    // Accepted claims by network, so an overlap is found in O(log n) (a cluster has thousands
    // of CIDRs and this runs every pass).
    let mut accepted: BTreeMap<IpNet, &str> = BTreeMap::new();
    let mut out: BTreeMap<&str, SkippedNode> = BTreeMap::new();
    for (_, node, cidr) in claims {
        match overlapping_owner(&accepted, &cidr, node) {
            Some(owner) => {
                out.entry(node).or_insert_with(|| SkippedNode {
                    node: node.to_string(),
                    family,
                    reason: SkipReason::PodCidrConflict {
                        cidr: cidr.to_string(),
                        owner: owner.to_string(),
                    },
                });
            }
            None => {
                accepted.entry(cidr).or_insert(node);
            }
        }
    }
    out.into_values().collect()
}

/// Another node's accepted network that contains `cidr` or lies inside it.
fn overlapping_owner<'a>(
    accepted: &BTreeMap<IpNet, &'a str>,
    cidr: &IpNet,
    node: &str,
) -> Option<&'a str> {
    let other = |owner: &&&'a str| **owner != node;
    // Containing networks are `cidr`'s supernets, one per prefix length.
    let containing = (0..=cidr.prefix_len())
        .filter_map(|len| IpNet::new(cidr.addr(), len).ok().map(|n| n.trunc()))
        .find_map(|net| accepted.get(&net).filter(other));
    if let Some(owner) = containing {
        return Some(owner);
    }
    // Networks inside `cidr` sort between its first and last address.
    let first = IpNet::new(cidr.network(), 0).ok()?;
    let last = IpNet::new(cidr.broadcast(), cidr.max_prefix_len()).ok()?;
    accepted
        .range(first..=last)
        .find(|(net, owner)| **owner != node && cidr.contains(*net))
        .map(|(_, owner)| *owner)
}

/// The last version of every node that decoded, so that a node whose object turns to garbage
/// keeps being peered as it was (by every node that saw it good) instead of being cut off
/// while it keeps sending to the others. A node that is deleted is forgotten.
#[derive(Debug, Clone, Default)]
pub struct LastGoodNodes {
    nodes: BTreeMap<String, NodeResource>,
}

/// A node whose object does not decode and whose last good version stays in use.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StaleNode {
    pub node: String,
    pub error: String,
}

impl std::fmt::Display for StaleNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "node {} cannot be decoded ({}); its last good version stays in use",
            self.node, self.error
        )
    }
}

impl LastGoodNodes {
    /// `nodes` with each undecodable node replaced by its last good version where there is one;
    /// remembers the good ones.
    pub fn resolve(
        &mut self,
        nodes: &BTreeMap<String, NodeResource>,
    ) -> (BTreeMap<String, NodeResource>, Vec<StaleNode>) {
        self.nodes.retain(|name, _| nodes.contains_key(name));
        let mut stale = Vec::new();
        let mut out = BTreeMap::new();
        for (name, node) in nodes {
            let resolved = match (&node.decode_error, self.nodes.get(name)) {
                (None, _) => {
                    self.nodes.insert(name.clone(), node.clone());
                    node.clone()
                }
                (Some(error), Some(good)) => {
                    stale.push(StaleNode {
                        node: name.clone(),
                        error: error.clone(),
                    });
                    good.clone()
                }
                (Some(_), None) => node.clone(),
            };
            out.insert(name.clone(), resolved);
        }
        (out, stale)
    }
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
        if let Some(reason) = &nodes.local_skipped {
            spec.skipped.insert(SkippedNode {
                node: local.node_name.clone(),
                family,
                reason: reason.clone(),
            });
        }
        let non_peer_cidrs = nodes.unpeered_cidrs.clone();

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
        // A CIDR belongs to one place: local CIDRs are never allowed IPs of a peer (overlaps
        // between nodes were settled by `validate_nodes`).
        for p in nodes.peers.values() {
            let mut allowed: BTreeSet<IpNet> = p
                .cidrs
                .iter()
                .filter(|c| !local_cidrs.contains(*c))
                .copied()
                .collect();
            let tunnel = p.interface_address.or_else(|| tunnel_address(&p.cidrs));
            if let Some(addr) = tunnel
                && !allowed.iter().any(|n| n.contains(&addr))
            {
                allowed.insert(host_net(addr));
            }
            let mut keepalive = u16::try_from(settings.keepalive.as_secs()).unwrap_or(u16::MAX);
            // Host encryption: the peer's node address is always an allowed IP (its host
            // traffic is accepted from the tunnel as soon as it sends it there), but it is
            // routed into the tunnel only while the peer is confirmed; otherwise it is thrown
            // to the main table. A keepalive starts and renews the handshakes.
            let mut unconfirmed_node_address = None;
            if settings.host_encryption && Some(p.underlay) != local_underlay {
                let node_address = host_net(p.underlay);
                allowed.insert(node_address);
                let confirmed = local
                    .confirmed_peers
                    .get(&family)
                    .is_some_and(|keys| keys.contains(&p.key));
                if !confirmed {
                    unconfirmed_node_address = Some(node_address);
                }
                if keepalive == 0 {
                    keepalive = HOST_ENCRYPTION_KEEPALIVE;
                }
            }
            for dest in &allowed {
                let kind = if Some(*dest) == unconfirmed_node_address {
                    RouteKind::Throw
                } else {
                    RouteKind::Device {
                        interface: device_name.clone(),
                    }
                };
                spec.routes.insert(RouteSpec {
                    table: local.routing_table,
                    dest: *dest,
                    kind,
                });
            }
            device.peers.insert(
                p.key,
                PeerSpec {
                    node: p.node.clone(),
                    endpoint: SocketAddr::new(p.underlay, fs.listening_port),
                    allowed_ips: allowed,
                    keepalive,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        text.parse().expect("test CIDR")
    }

    #[test]
    fn overlaps_are_found_both_ways_and_neighbours_are_not_overlaps() {
        let accepted: BTreeMap<IpNet, &str> = [
            (net("10.244.2.0/24"), "node2"),
            (net("10.244.4.128/25"), "node4"),
            (net("fd00:244:2::/64"), "node2"),
        ]
        .into();
        let owner = |cidr: &str, node: &str| overlapping_owner(&accepted, &net(cidr), node);
        assert_eq!(
            owner("10.244.2.64/26", "node3"),
            Some("node2"),
            "inside an accepted one"
        );
        assert_eq!(
            owner("10.244.0.0/16", "node3"),
            Some("node2"),
            "around accepted ones"
        );
        assert_eq!(owner("10.244.4.0/24", "node3"), Some("node4"));
        assert_eq!(owner("10.244.3.0/24", "node3"), None, "a neighbour");
        assert_eq!(owner("10.244.4.0/25", "node3"), None, "the other half");
        assert_eq!(
            owner("10.244.2.64/26", "node2"),
            None,
            "a node never conflicts with itself"
        );
        assert_eq!(owner("fd00:244:2::/80", "node3"), Some("node2"));
        assert_eq!(owner("fd00:244:3::/64", "node3"), None);
        assert_eq!(owner("0.0.0.0/0", "node3"), Some("node2"));
    }
}

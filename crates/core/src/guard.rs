//! The encryption guard: rules in our nftables table that watch pod traffic to nodes that
//! encrypt. Such traffic must leave through the WireGuard device; when it would leave through
//! any other interface (the device or its routes are gone: start-up, an agent restart, a
//! wireguard-go that died, a node whose key is not published yet) it is counted as a leak, or,
//! in strict mode (`wiremeshStrictEncryption`), counted and dropped. The table outlives the
//! agent, so the guard holds across restarts and rolling updates.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use crate::config::EffectiveConfig;
use crate::mesh::{DataplaneSpec, SkipReason};
use crate::model::{Family, FelixConfigurations, NodeResource};
use crate::policy::render::{
    BaseHook, ChainSpec, FilterSpec, SetKind, SetSpec, TABLE, TABLE_FAMILY, element_text,
};

/// Counts pod packets to encrypting nodes that left in clear (strict mode off).
pub const LEAK_COUNTER: &str = "plaintext-leak";
/// Counts pod packets to encrypting nodes that were dropped instead of leaving in clear.
pub const BLOCKED_COUNTER: &str = "plaintext-blocked";
/// The guard's chain (hook postrouting: after routing chose the interface).
pub const CHAIN: &str = "encryption-guard";

/// What the guard watches, per family: the WireGuard device and the pod CIDRs of the nodes
/// traffic to which must go through it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncryptionGuard {
    pub strict: bool,
    pub families: BTreeMap<Family, GuardedFamily>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuardedFamily {
    pub interface: String,
    pub cidrs: BTreeSet<IpNet>,
}

impl EncryptionGuard {
    /// The guard for `spec` (this node's desired mesh): for each device, the peers' pod
    /// CIDRs (their endpoints, which carry the encrypted UDP, are left out), plus `joining`:
    /// pod CIDRs of nodes configured to encrypt that are not peered yet.
    pub fn for_mesh(
        spec: &DataplaneSpec,
        strict: bool,
        joining: &BTreeMap<Family, BTreeSet<IpNet>>,
    ) -> EncryptionGuard {
        let families = spec
            .devices
            .iter()
            .map(|(family, device)| {
                let endpoints: BTreeSet<_> =
                    device.peers.values().map(|p| p.endpoint.ip()).collect();
                let mut cidrs: BTreeSet<IpNet> = device
                    .peers
                    .values()
                    .flat_map(|p| p.allowed_ips.iter().copied())
                    .filter(|net| {
                        !(net.prefix_len() == net.max_prefix_len()
                            && endpoints.contains(&net.addr()))
                    })
                    .collect();
                cidrs.extend(joining.get(family).into_iter().flatten().copied());
                let guarded = GuardedFamily {
                    interface: device.name.clone(),
                    cidrs,
                };
                (*family, guarded)
            })
            .collect();
        EncryptionGuard { strict, families }
    }
}

/// Pod CIDRs of the nodes `spec` skips only for having no key yet while their configuration
/// turns encryption on (a node joining, or its agent starting): traffic to them must not go out
/// in clear either.
pub fn joining_cidrs(
    spec: &DataplaneSpec,
    nodes: &BTreeMap<String, NodeResource>,
    configs: &FelixConfigurations,
) -> BTreeMap<Family, BTreeSet<IpNet>> {
    let mut out: BTreeMap<Family, BTreeSet<IpNet>> = BTreeMap::new();
    for skipped in spec
        .skipped
        .iter()
        .filter(|s| s.reason == SkipReason::NoKey)
    {
        let Some(node) = nodes.get(&skipped.node) else {
            continue;
        };
        let config = EffectiveConfig::for_node(&skipped.node, configs);
        if !config.wireguard.family(skipped.family).enabled {
            continue;
        }
        let cidrs = node
            .pod_cidrs
            .iter()
            .filter_map(|c| c.trim().parse::<IpNet>().ok())
            .filter(|n| Family::of_net(n) == skipped.family)
            .map(|n| n.trunc());
        out.entry(skipped.family).or_default().extend(cidrs);
    }
    out
}

fn set_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "encrypted-pods4",
        Family::V6 => "encrypted-pods6",
    }
}

/// Adds the guard to `filter` (our table's desired state): a set of guarded CIDRs per family,
/// the two counters and one chain. Nothing when no family encrypts.
pub fn add_guard(filter: &mut FilterSpec, guard: &EncryptionGuard) {
    if guard.families.is_empty() {
        return;
    }
    let (counter, verdict) = match guard.strict {
        true => (BLOCKED_COUNTER, " drop"),
        false => (LEAK_COUNTER, ""),
    };
    filter.guard_counters.insert(LEAK_COUNTER.to_string());
    filter.guard_counters.insert(BLOCKED_COUNTER.to_string());
    let mut rules = Vec::new();
    for (family, guarded) in &guard.families {
        let set = set_name(*family);
        filter.sets.insert(
            set.to_string(),
            SetSpec {
                family: *family,
                kind: SetKind::Addr,
                comment: "pod CIDRs of nodes this node encrypts to".into(),
                elements: guarded.cidrs.iter().map(element_text).collect(),
            },
        );
        let ip = match family {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        };
        // The shutdown hold (empty while an agent runs; see `hold_script`), checked first.
        let hold = hold_set_name(*family);
        filter.sets.insert(
            hold.clone(),
            SetSpec {
                family: *family,
                kind: SetKind::TimedAddr,
                comment: "held while no agent runs".into(),
                elements: BTreeSet::new(),
            },
        );
        if !guard.strict {
            rules.push(format!(
                "{ip} daddr @{hold} oifname != \"{}\" counter name \"{BLOCKED_COUNTER}\" drop",
                guarded.interface
            ));
        }
        rules.push(format!(
            "{ip} daddr @{set} oifname != \"{}\" counter name \"{counter}\"{verdict}",
            guarded.interface
        ));
    }
    filter.chains.push(ChainSpec {
        name: CHAIN.to_string(),
        base: Some(BaseHook {
            hook: "postrouting",
            priority: "filter",
        }),
        rules,
    });
}

/// The set of a shutdown hold: `shutdown-hold4` / `shutdown-hold6`.
pub fn hold_set_name(family: Family) -> String {
    match family {
        Family::V4 => "shutdown-hold4".into(),
        Family::V6 => "shutdown-hold6".into(),
    }
}

/// What an agent that stops on purpose (a rolling update, a restart) leaves in force, as
/// `nft -f` text: the guarded pod CIDRs go into the guard's hold sets for `hold`, so pod
/// traffic to the nodes it encrypts to that would leave in clear is dropped (and counted as
/// blocked), as strict mode would. A userspace WireGuard that dies with the agent's container
/// then costs dropped packets, not clear ones, until the next agent has the device back (its
/// first pass empties the sets: element deletes only); if no agent comes back (an uninstall),
/// the hold runs out by itself (element timeouts). None when there is nothing to hold (no
/// guard, strict mode: it drops already, or a zero `hold`).
pub fn hold_script(guard: &EncryptionGuard, hold: std::time::Duration) -> Option<String> {
    use std::fmt::Write as _;

    let seconds = hold.as_secs();
    if guard.strict || seconds == 0 {
        return None;
    }
    let mut out = String::new();
    for (family, guarded) in guard.families.iter().filter(|(_, g)| !g.cidrs.is_empty()) {
        let elements: Vec<String> = guarded
            .cidrs
            .iter()
            .map(|c| format!("{} timeout {seconds}s", element_text(c)))
            .collect();
        let _ = writeln!(
            out,
            "add element {TABLE_FAMILY} {TABLE} {} {{ {} }}",
            hold_set_name(*family),
            elements.join(", ")
        );
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::{DeviceSpec, PeerSpec};
    use crate::model::WgKey;

    fn mesh() -> DataplaneSpec {
        let peer = PeerSpec {
            node: "node2".into(),
            endpoint: "172.30.0.2:51820".parse().expect("endpoint"),
            allowed_ips: ["10.244.2.0/24", "172.30.0.2/32"]
                .iter()
                .map(|n| n.parse().expect("net"))
                .collect(),
            keepalive: 0,
        };
        let device = DeviceSpec {
            family: Family::V4,
            name: "wireguard.cali".into(),
            private_key: crate::keys::PrivateKey::from_bytes([7; 32]),
            listen_port: 51820,
            fwmark: 0x20_0000,
            mtu: 1440,
            address: None,
            peers: [(WgKey([2; 32]), peer)].into(),
        };
        DataplaneSpec {
            devices: [(Family::V4, device)].into(),
            owned_interfaces: BTreeSet::new(),
            routing_table: 1,
            routes: BTreeSet::new(),
            rules: BTreeSet::new(),
            publish: Default::default(),
            skipped: BTreeSet::new(),
        }
    }

    /// The table `guard` gives, and its guard chain's rules.
    fn guarded(guard: &EncryptionGuard) -> (FilterSpec, Vec<String>) {
        let mut filter = FilterSpec::default();
        add_guard(&mut filter, guard);
        let rules = filter
            .chains
            .iter()
            .find(|c| c.name == CHAIN)
            .map(|c| c.rules.clone())
            .unwrap_or_default();
        (filter, rules)
    }

    #[test]
    fn pod_cidrs_of_peers_and_joining_nodes_are_guarded_not_their_endpoints() {
        let joining = [(Family::V4, ["10.244.3.0/24".parse().expect("net")].into())].into();
        let guard = EncryptionGuard::for_mesh(&mesh(), false, &joining);
        let (filter, rules) = guarded(&guard);
        assert_eq!(
            filter.sets["encrypted-pods4"].elements,
            ["10.244.2.0/24".to_string(), "10.244.3.0/24".to_string()].into()
        );
        assert_eq!(
            rules,
            [
                "ip daddr @shutdown-hold4 oifname != \"wireguard.cali\" counter name \"plaintext-blocked\" drop",
                "ip daddr @encrypted-pods4 oifname != \"wireguard.cali\" counter name \"plaintext-leak\""
            ]
        );
        let strict = EncryptionGuard::for_mesh(&mesh(), true, &BTreeMap::new());
        let (filter, rules) = guarded(&strict);
        assert_eq!(rules.len(), 1, "no hold rule: strict mode drops already");
        assert!(rules[0].ends_with("counter name \"plaintext-blocked\" drop"));
        assert!(filter.to_nft().contains("counter plaintext-leak {"));
    }

    #[test]
    fn a_shutdown_hold_drops_for_a_while_what_would_leave_in_clear() {
        let joining = [(Family::V4, ["10.244.3.0/24".parse().expect("net")].into())].into();
        let guard = EncryptionGuard::for_mesh(&mesh(), false, &joining);
        let script = hold_script(&guard, std::time::Duration::from_secs(60)).expect("a hold");
        assert_eq!(
            script,
            "add element inet wiremesh shutdown-hold4 { 10.244.2.0/24 timeout 60s, 10.244.3.0/24 timeout 60s }\n"
        );
        // The sets it fills are in the table all along (empty), checked before the leak counter.
        let (filter, rules) = guarded(&guard);
        assert_eq!(filter.sets["shutdown-hold4"].kind, SetKind::TimedAddr);
        assert!(filter.sets["shutdown-hold4"].elements.is_empty());
        assert_eq!(
            rules[0],
            "ip daddr @shutdown-hold4 oifname != \"wireguard.cali\" counter name \"plaintext-blocked\" drop"
        );
        assert!(filter.to_nft().contains("flags interval, timeout"));
        // Strict mode drops already; a zero hold or no guard holds nothing.
        let strict = EncryptionGuard::for_mesh(&mesh(), true, &BTreeMap::new());
        assert_eq!(
            hold_script(&strict, std::time::Duration::from_secs(60)),
            None
        );
        assert_eq!(hold_script(&guard, std::time::Duration::ZERO), None);
        assert_eq!(
            hold_script(
                &EncryptionGuard::default(),
                std::time::Duration::from_secs(60)
            ),
            None
        );
    }

    #[test]
    fn no_encryption_no_guard() {
        let mut filter = FilterSpec::default();
        add_guard(&mut filter, &EncryptionGuard::default());
        assert_eq!(filter, FilterSpec::default());
    }
}

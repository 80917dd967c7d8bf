//! Tier 1: `desired()` as a pure function: peers, allowed IPs, routes, rules, MTU, keys,
//! collisions and malformed input.

mod support;

use std::collections::BTreeSet;

use ipnet::IpNet;
use proptest::prelude::*;
use support::{inputs, key, node, node_dual};
use wiremesh_core::config::WireguardSettings;
use wiremesh_core::mesh::{RouteKind, RouteSpec, RuleSpec, SkipReason, desired};
use wiremesh_core::model::{Family, NodeResource};

fn net(s: &str) -> IpNet {
    s.parse().expect("test CIDR")
}

fn routes(spec: &wiremesh_core::mesh::DataplaneSpec) -> Vec<String> {
    spec.routes
        .iter()
        .map(|r| match &r.kind {
            RouteKind::Device { interface } => {
                format!("{} dev {interface} table {}", r.dest, r.table)
            }
            RouteKind::Throw => format!("throw {} table {}", r.dest, r.table),
        })
        .collect()
}

#[test]
fn three_nodes_peer_with_the_other_two() {
    let spec = desired(&inputs(1, [node(1), node(2), node(3)]));
    let device = &spec.devices[&Family::V4];
    assert_eq!(device.name, "wireguard.cali");
    assert_eq!(device.listen_port, 51820);
    assert_eq!(device.fwmark, 0x200000);
    assert_eq!(device.mtu, 1440, "host MTU 1500 - 60");
    assert_eq!(device.address, Some(net("10.244.1.1/32")));
    assert_eq!(device.private_key, key(1));
    let peers: Vec<_> = device
        .peers
        .values()
        .map(|p| (p.node.as_str(), p.endpoint.to_string()))
        .collect();
    assert_eq!(peers.len(), 2);
    assert!(peers.contains(&("node2", "172.30.0.2:51820".into())));
    assert!(peers.contains(&("node3", "172.30.0.3:51820".into())));
    let p2 = &device.peers[&key(2).public_key()];
    assert_eq!(
        p2.allowed_ips,
        BTreeSet::from([net("10.244.2.0/24")]),
        "tunnel address is inside the pod CIDR"
    );
    assert_eq!(p2.keepalive, 0);
    assert_eq!(
        routes(&spec),
        [
            "10.244.1.0/24 table 1".replace("10.244.1.0/24", "throw 10.244.1.0/24"),
            "10.244.2.0/24 dev wireguard.cali table 1".into(),
            "10.244.3.0/24 dev wireguard.cali table 1".into(),
        ]
    );
    assert_eq!(
        spec.rules,
        BTreeSet::from([RuleSpec {
            family: Family::V4,
            priority: 99,
            table: 1,
            fwmark: 0x200000,
            mask: 0x200000,
            invert: true
        }])
    );
    assert_eq!(spec.publish.public_key_v4, Some(key(1).public_key()));
    assert_eq!(
        spec.publish.interface_ipv4_address,
        Some("10.244.1.1".parse().expect("ip"))
    );
    assert_eq!(spec.publish.public_key_v6, None);
    assert!(spec.skipped.is_empty());
}

#[test]
fn tunnel_address_outside_the_pod_cidr_is_an_allowed_ip_and_route() {
    let mut n2 = node(2);
    n2.wireguard_interface_ipv4_address = Some("10.99.0.2".into());
    let spec = desired(&inputs(1, [node(1), n2]));
    let p2 = &spec.devices[&Family::V4].peers[&key(2).public_key()];
    assert_eq!(
        p2.allowed_ips,
        BTreeSet::from([net("10.244.2.0/24"), net("10.99.0.2/32")])
    );
    assert!(routes(&spec).contains(&"10.99.0.2/32 dev wireguard.cali table 1".to_string()));
}

#[test]
fn disabled_means_nothing_desired_and_nothing_published() {
    let mut i = inputs(1, [node(1), node(2)]);
    i.settings = WireguardSettings::default();
    let spec = desired(&i);
    assert!(spec.devices.is_empty() && spec.routes.is_empty() && spec.rules.is_empty());
    assert_eq!(spec.publish, Default::default());
    assert_eq!(
        spec.owned_interfaces,
        BTreeSet::from(["wireguard.cali".to_string(), "wg-v6.cali".to_string()])
    );
}

#[test]
fn node_without_key_is_skipped_and_its_cidrs_thrown() {
    let mut n3 = node(3);
    n3.wireguard_public_key = None;
    let spec = desired(&inputs(1, [node(1), node(2), n3]));
    assert_eq!(spec.devices[&Family::V4].peers.len(), 1);
    assert!(routes(&spec).contains(&"throw 10.244.3.0/24 table 1".to_string()));
    let skipped: Vec<_> = spec
        .skipped
        .iter()
        .map(|s| (s.node.as_str(), s.reason.clone()))
        .collect();
    assert_eq!(skipped, [("node3", SkipReason::NoKey)]);
}

#[test]
fn malformed_keys_are_skipped_with_the_reason() {
    for bad in [
        "not-base64!",
        "AAAA",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        " x ",
    ] {
        let mut n3 = node(3);
        n3.wireguard_public_key = Some(bad.into());
        let spec = desired(&inputs(1, [node(1), node(2), n3]));
        assert_eq!(spec.devices[&Family::V4].peers.len(), 1, "{bad}");
        let s = spec.skipped.iter().next().expect("one skipped");
        assert_eq!(s.node, "node3");
        assert!(
            matches!(&s.reason, SkipReason::MalformedKey { value, .. } if value == bad),
            "{bad}: {:?}",
            s.reason
        );
        assert!(routes(&spec).contains(&"throw 10.244.3.0/24 table 1".to_string()));
    }
}

#[test]
fn malformed_cidr_address_or_interface_address_skips_only_that_node() {
    type Mutation = Box<dyn Fn(&mut NodeResource)>;
    type Check = fn(&SkipReason) -> bool;
    let cases: Vec<(Mutation, Check)> = vec![
        (
            Box::new(|n| n.pod_cidrs.push("10.244.300.0/24".into())),
            |r| matches!(r, SkipReason::MalformedPodCidr { .. }),
        ),
        (
            Box::new(|n| n.ipv4_address = Some("172.30.0".into())),
            |r| matches!(r, SkipReason::MalformedUnderlayAddress { .. }),
        ),
        (Box::new(|n| n.ipv4_address = None), |r| {
            *r == SkipReason::NoUnderlayAddress
        }),
        (
            Box::new(|n| n.wireguard_interface_ipv4_address = Some("bogus".into())),
            |r| matches!(r, SkipReason::MalformedInterfaceAddress { .. }),
        ),
        (
            Box::new(|n| n.decode_error = Some("expected value at line 1".into())),
            |r| matches!(r, SkipReason::Undecodable { .. }),
        ),
    ];
    for (i, (mutate, expected)) in cases.iter().enumerate() {
        let mut n3 = node(3);
        mutate(&mut n3);
        let spec = desired(&inputs(1, [node(1), node(2), n3]));
        let peers: Vec<_> = spec.devices[&Family::V4]
            .peers
            .values()
            .map(|p| p.node.clone())
            .collect();
        assert_eq!(peers, ["node2"], "case {i}");
        let s = spec.skipped.iter().next().expect("skipped");
        assert!(expected(&s.reason), "case {i}: {:?}", s.reason);
    }
}

#[test]
fn shared_key_peers_neither_node_and_reports_both() {
    let mut n3 = node(3);
    n3.wireguard_public_key = node(2).wireguard_public_key;
    let spec = desired(&inputs(1, [node(1), node(2), n3]));
    assert!(spec.devices[&Family::V4].peers.is_empty());
    let skipped: Vec<_> = spec
        .skipped
        .iter()
        .map(|s| (s.node.as_str(), s.reason.clone()))
        .collect();
    assert_eq!(
        skipped,
        [
            (
                "node2",
                SkipReason::KeyCollision {
                    with: vec!["node3".into()]
                }
            ),
            (
                "node3",
                SkipReason::KeyCollision {
                    with: vec!["node2".into()]
                }
            ),
        ]
    );
    let r = routes(&spec);
    assert!(r.contains(&"throw 10.244.2.0/24 table 1".to_string()));
    assert!(r.contains(&"throw 10.244.3.0/24 table 1".to_string()));
}

/// A node publishing our key cuts both out on every side: the others skip both, and so do we
/// (we peer none), so no pair encrypts on one side only (issue 10: a black hole before).
#[test]
fn a_remote_node_using_our_key_cuts_both_out_everywhere() {
    let mut n2 = node(2);
    n2.wireguard_public_key = Some(key(1).public_key().to_string());
    let spec = desired(&inputs(1, [node(1), n2, node(3)]));
    let skipped: Vec<(&str, &SkipReason)> = spec
        .skipped
        .iter()
        .map(|s| (s.node.as_str(), &s.reason))
        .collect();
    assert_eq!(
        skipped,
        [
            (
                "node1",
                &SkipReason::KeyCollision {
                    with: vec!["node2".into()]
                }
            ),
            (
                "node2",
                &SkipReason::KeyCollision {
                    with: vec!["node1".into()]
                }
            ),
        ]
    );
    assert!(spec.devices[&Family::V4].peers.is_empty(), "we peer none");
    let r = routes(&spec);
    for cidr in ["10.244.2.0/24", "10.244.3.0/24"] {
        assert!(r.contains(&format!("throw {cidr} table 1")), "{r:?}");
    }
}

/// Overlapping pod CIDRs: the older claim wins (then the node name) and the node whose claim
/// loses is peered by nobody, itself included.
#[test]
fn overlapping_pod_cidrs_go_to_the_older_claim() {
    // node3 also claims node2's CIDR, later: node3 is skipped, node2 keeps its CIDR.
    let mut n2 = node(2);
    n2.pod_cidr_claimed_at = [("10.244.2.0/24".to_string(), 5)].into();
    let mut n3 = node(3);
    n3.pod_cidrs.push("10.244.2.0/26".into());
    n3.pod_cidr_claimed_at = [
        ("10.244.3.0/24".to_string(), 6),
        ("10.244.2.0/26".to_string(), 9),
    ]
    .into();
    let spec = desired(&inputs(1, [node(1), n2.clone(), n3.clone()]));
    let device = &spec.devices[&Family::V4];
    let peers: Vec<&str> = device.peers.values().map(|p| p.node.as_str()).collect();
    assert_eq!(peers, ["node2"]);
    assert!(
        device.peers[&key(2).public_key()]
            .allowed_ips
            .contains(&net("10.244.2.0/24"))
    );
    let skipped = spec.skipped.iter().next().expect("node3 skipped");
    assert_eq!(
        (skipped.node.as_str(), &skipped.reason),
        (
            "node3",
            &SkipReason::PodCidrConflict {
                cidr: "10.244.2.0/26".into(),
                owner: "node2".into()
            }
        )
    );
    let r = routes(&spec);
    assert!(
        r.contains(&"throw 10.244.3.0/24 table 1".to_string()),
        "{r:?}"
    );
    // node3 itself agrees: it peers none.
    let own = desired(&inputs(3, [node(1), n2.clone(), n3.clone()]));
    assert!(own.devices[&Family::V4].peers.is_empty());
    assert!(own.skipped.iter().any(|s| s.node == "node3"));
    // The older claim wins whoever it is: now node3's claim came first.
    n3.pod_cidr_claimed_at.insert("10.244.2.0/26".into(), 1);
    let spec = desired(&inputs(1, [node(1), n2, n3]));
    let peers: Vec<&str> = spec.devices[&Family::V4]
        .peers
        .values()
        .map(|p| p.node.as_str())
        .collect();
    assert_eq!(peers, ["node3"]);
}

#[test]
fn mtu_auto_and_explicit() {
    let mut i = inputs(1, [node(1)]);
    i.local.host_mtu = 9000;
    assert_eq!(desired(&i).devices[&Family::V4].mtu, 8940);
    i.settings.v4.mtu = 1380;
    assert_eq!(desired(&i).devices[&Family::V4].mtu, 1380);
}

#[test]
fn settings_flow_into_the_device_peers_and_rule() {
    let mut i = inputs(1, [node(1), node(2)]);
    i.settings.v4.interface_name = "wg0".into();
    i.settings.v4.listening_port = 28150;
    i.settings.routing_rule_priority = 100;
    i.settings.keepalive = std::time::Duration::from_secs(25);
    let spec = desired(&i);
    let device = &spec.devices[&Family::V4];
    assert_eq!((device.name.as_str(), device.listen_port), ("wg0", 28150));
    let p = device.peers.values().next().expect("peer");
    assert_eq!((p.endpoint.port(), p.keepalive), (28150, 25));
    assert_eq!(spec.rules.iter().next().map(|r| r.priority), Some(100));
    assert!(!spec.owned_interfaces.contains("wireguard.cali"));
    i.local.previous_interfaces.insert("wireguard.cali".into());
    let spec = desired(&i);
    assert!(
        spec.owned_interfaces.contains("wireguard.cali"),
        "a device we created before stays ours"
    );
}

#[test]
fn host_encryption_routes_node_addresses_of_confirmed_peers_only() {
    let mut i = inputs(1, [node(1), node(2)]);
    i.settings.host_encryption = true;
    let route = |kind| RouteSpec {
        table: 1,
        dest: net("172.30.0.2/32"),
        kind,
    };
    let device = RouteKind::Device {
        interface: "wireguard.cali".into(),
    };
    // Not confirmed yet (no handshake with our current key): accepted from the tunnel, but
    // host traffic to it goes direct, and a keepalive starts the handshake.
    let spec = desired(&i);
    let p = &spec.devices[&Family::V4].peers[&key(2).public_key()];
    assert!(p.allowed_ips.contains(&net("172.30.0.2/32")));
    assert_eq!(p.keepalive, wiremesh_core::mesh::HOST_ENCRYPTION_KEEPALIVE);
    assert!(spec.routes.contains(&route(RouteKind::Throw)));
    assert!(!spec.routes.contains(&route(device.clone())));
    // Pod traffic is not held back.
    assert!(spec.routes.contains(&RouteSpec {
        table: 1,
        dest: net("10.244.2.0/24"),
        kind: device.clone(),
    }));

    i.local.confirmed_peers = [(Family::V4, [key(2).public_key()].into())].into();
    let spec = desired(&i);
    let p = &spec.devices[&Family::V4].peers[&key(2).public_key()];
    assert_eq!(p.keepalive, wiremesh_core::mesh::HOST_ENCRYPTION_KEEPALIVE);
    assert!(spec.routes.contains(&route(device)));
    assert!(!spec.routes.contains(&route(RouteKind::Throw)));

    // A configured keepalive is kept either way; without host encryption nothing changes.
    i.local.confirmed_peers.clear();
    i.settings.keepalive = std::time::Duration::from_secs(10);
    let spec = desired(&i);
    assert_eq!(
        spec.devices[&Family::V4].peers[&key(2).public_key()].keepalive,
        10
    );
    i.settings.host_encryption = false;
    let spec = desired(&i);
    let p = &spec.devices[&Family::V4].peers[&key(2).public_key()];
    assert!(!p.allowed_ips.contains(&net("172.30.0.2/32")));
    assert!(!spec.routes.iter().any(|r| r.dest == net("172.30.0.2/32")));
}

#[test]
fn ipv6_family_has_its_own_device_key_and_rule() {
    let mut i = inputs(1, [node_dual(1), node_dual(2)]);
    i.settings.v6.enabled = true;
    let spec = desired(&i);
    let v6 = &spec.devices[&Family::V6];
    assert_eq!(
        (v6.name.as_str(), v6.listen_port, v6.mtu),
        ("wg-v6.cali", 51821, 1420)
    );
    assert_eq!(v6.address, Some(net("fd00:244:1::1/128")));
    let p = v6.peers.values().next().expect("v6 peer");
    assert_eq!(p.endpoint.to_string(), "[fd00:30::2]:51821");
    assert_eq!(p.allowed_ips, BTreeSet::from([net("fd00:244:2::/64")]));
    assert_eq!(
        spec.devices[&Family::V4]
            .peers
            .values()
            .next()
            .map(|p| p.allowed_ips.clone()),
        Some(BTreeSet::from([net("10.244.2.0/24")]))
    );
    assert_eq!(spec.rules.len(), 2);
    assert_eq!(spec.publish.public_key_v6, Some(key(101).public_key()));
    // A v4-only node is skipped for v6 only.
    let mut only_v4 = node(3);
    only_v4.wireguard_public_key_v6 = None;
    i.nodes.insert("node3".into(), only_v4);
    let spec = desired(&i);
    assert_eq!(spec.devices[&Family::V4].peers.len(), 2);
    assert_eq!(spec.devices[&Family::V6].peers.len(), 1);
    assert!(
        spec.skipped
            .iter()
            .all(|s| s.family == Family::V6 && s.node == "node3")
    );
}

#[test]
fn output_is_deterministic_whatever_the_input_order() {
    let a = desired(&inputs(1, [node(1), node(2), node(3), node(4)]));
    let b = desired(&inputs(1, [node(4), node(3), node(2), node(1)]));
    assert_eq!(a, b);
}

#[test]
fn local_node_missing_from_the_datastore_still_programs_peers() {
    let spec = desired(&inputs(1, [node(2)]));
    assert_eq!(spec.devices[&Family::V4].peers.len(), 1);
    assert_eq!(spec.devices[&Family::V4].address, None);
}

/// What the datastore can say wrong about one node (a key or address that is missing is left
/// out: a node publishes its own key in the same pass, so that window is not a verdict).
#[derive(Debug, Clone)]
enum Damage {
    None,
    /// Runs with a copy of node `j`'s state directory: node `j`'s key pair.
    CopiesKeyOf(u8),
    /// Also claims a part of node `j`'s pod CIDR, claimed at this time.
    ClaimsCidrOf(u8, u64),
    MalformedAddress,
    MalformedPodCidr,
    Undecodable,
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        3 => Just(Damage::None),
        1 => (1u8..=4).prop_map(Damage::CopiesKeyOf),
        1 => (1u8..=4, 0u64..20).prop_map(|(j, at)| Damage::ClaimsCidrOf(j, at)),
        1 => Just(Damage::MalformedAddress),
        1 => Just(Damage::MalformedPodCidr),
        1 => Just(Damage::Undecodable),
    ]
}

fn damaged(i: u8, damage: &Damage, claimed_at: u64) -> NodeResource {
    let mut n = node(i);
    n.pod_cidr_claimed_at = [(format!("10.244.{i}.0/24"), claimed_at)].into();
    match damage {
        Damage::None => {}
        Damage::CopiesKeyOf(j) => n.wireguard_public_key = Some(key(*j).public_key().to_string()),
        Damage::ClaimsCidrOf(j, at) => {
            let cidr = format!("10.244.{j}.128/25");
            n.pod_cidrs.push(cidr.clone());
            n.pod_cidr_claimed_at.insert(cidr, *at);
        }
        Damage::MalformedAddress => n.ipv4_address = Some("not-an-address".into()),
        Damage::MalformedPodCidr => n.pod_cidrs = vec!["10.244.999.0/24".into()],
        Damage::Undecodable => {
            n = NodeResource {
                name: n.name,
                decode_error: Some("expected value at line 1".into()),
                ..Default::default()
            }
        }
    }
    n
}

proptest! {
    /// Issue 10: every node reaches the same verdict about every pair from the same datastore,
    /// whatever is wrong in it: node i peers node j exactly when node j peers node i. (Before,
    /// a copied key or a claimed CIDR left the victim encrypting to nodes that dropped it.)
    #[test]
    fn peering_is_symmetric_whatever_the_datastore_says(
        damages in proptest::collection::vec(damage(), 4),
        claimed_at in proptest::collection::vec(0u64..20, 4),
    ) {
        let nodes: Vec<NodeResource> = (1u8..=4)
            .map(|i| damaged(i, &damages[usize::from(i - 1)], claimed_at[usize::from(i - 1)]))
            .collect();
        let peers_of = |i: u8| -> BTreeSet<String> {
            let mut view = inputs(i, nodes.clone());
            // An agent publishes the key it has; in a steady state the datastore shows it.
            if let Damage::CopiesKeyOf(j) = damages[usize::from(i - 1)] {
                view.local.private_keys.insert(Family::V4, key(j));
            }
            desired(&view)
                .devices
                .get(&Family::V4)
                .map(|d| d.peers.values().map(|p| p.node.clone()).collect())
                .unwrap_or_default()
        };
        let views: Vec<BTreeSet<String>> = (1u8..=4).map(peers_of).collect();
        for i in 1u8..=4 {
            for j in 1u8..=4 {
                if i == j {
                    continue;
                }
                let i_peers_j = views[usize::from(i - 1)].contains(&format!("node{j}"));
                let j_peers_i = views[usize::from(j - 1)].contains(&format!("node{i}"));
                prop_assert_eq!(
                    i_peers_j, j_peers_i,
                    "node{} {} node{}, but not the other way round ({:?})",
                    i, if i_peers_j { "peers" } else { "skips" }, j, damages
                );
            }
        }
    }
}

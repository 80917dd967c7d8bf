//! Tier 1: each subsystem's `plan()`: minimal operations, and idempotence (applying the plan
//! and planning again yields nothing), also as a property over random clusters.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use support::{inputs, key, node};
use wiremesh_core::dataplane::link;
use wiremesh_core::dataplane::routing as route;
use wiremesh_core::dataplane::wireguard::{self as wg, WgOp};
use wiremesh_core::mesh::{DataplaneSpec, PeerSpec, desired};
use wiremesh_core::model::{NodeResource, WgKey};
use wiremesh_dataplane::fake::FakeKernel;
use wiremesh_dataplane::link::LinkDataplane as _;
use wiremesh_dataplane::route::RoutingDataplane as _;
use wiremesh_dataplane::wireguard::WireguardDataplane as _;

/// Plans and applies every subsystem in the reconcile order; returns the op descriptions.
fn converge(kernel: &FakeKernel, spec: &DataplaneSpec) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (mut w, mut l, mut r) = (kernel.wireguard(), kernel.links(), kernel.routing());
        let routing = r.observe(spec.routing_table).await.expect("observe");
        let (dels, adds): (Vec<_>, Vec<_>) = route::plan(spec, &routing)
            .into_iter()
            .partition(|o| o.is_delete());
        r.apply(&dels).await.expect("route deletes");
        let devices = w.observe(&spec.owned_interfaces).await.expect("observe");
        w.apply(&wg::plan(spec, &devices)).await.expect("wg");
        let names: BTreeSet<String> = spec.devices.values().map(|d| d.name.clone()).collect();
        let links = l.observe(&names).await.expect("observe");
        l.apply(&link::plan(spec, &links)).await.expect("links");
        r.apply(&adds).await.expect("route adds");
    });
    kernel.take_log()
}

fn remaining(kernel: &FakeKernel, spec: &DataplaneSpec) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (mut w, mut l, mut r) = (kernel.wireguard(), kernel.links(), kernel.routing());
        let names: BTreeSet<String> = spec.devices.values().map(|d| d.name.clone()).collect();
        wg::plan(
            spec,
            &w.observe(&spec.owned_interfaces).await.expect("observe"),
        )
        .len()
            + link::plan(spec, &l.observe(&names).await.expect("observe")).len()
            + route::plan(spec, &r.observe(spec.routing_table).await.expect("observe")).len()
    })
}

#[test]
fn plan_of_desired_against_itself_is_empty() {
    let kernel = FakeKernel::new();
    let spec = desired(&inputs(1, [node(1), node(2), node(3)]));
    let first = converge(&kernel, &spec);
    assert!(
        first.iter().any(|o| o.starts_with("create_device")),
        "{first:?}"
    );
    assert_eq!(remaining(&kernel, &spec), 0);
    assert!(converge(&kernel, &spec).is_empty());
}

#[test]
fn cold_start_order_device_then_links_then_routes_then_rule() {
    let kernel = FakeKernel::new();
    let log = converge(&kernel, &desired(&inputs(1, [node(1), node(2)])));
    let kinds: Vec<&str> = log
        .iter()
        .map(|l| l.split(':').next().unwrap_or(""))
        .collect();
    assert_eq!(
        kinds,
        [
            "create_device",
            "configure_device",
            "set_peer",
            "set_mtu",
            "add_address",
            "set_up",
            "add_route",
            "add_route",
            "add_rule"
        ]
    );
}

#[test]
fn one_node_change_is_one_peer_op_plus_its_routes() {
    let kernel = FakeKernel::new();
    let nodes: Vec<NodeResource> = (1..=10).map(node).collect();
    converge(&kernel, &desired(&inputs(1, nodes.clone())));

    // Node 5 gets a second pod CIDR.
    let mut changed = nodes.clone();
    changed[4].pod_cidrs.push("10.245.5.0/24".into());
    let log = converge(&kernel, &desired(&inputs(1, changed.clone())));
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(
        log[0].starts_with("set_peer") && log[0].contains("node5"),
        "{log:?}"
    );
    assert!(
        log[1].starts_with("add_route") && log[1].contains("10.245.5.0/24"),
        "{log:?}"
    );

    // Node 7 leaves.
    let mut left = changed.clone();
    left.remove(6);
    let log = converge(&kernel, &desired(&inputs(1, left.clone())));
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(
        log.iter()
            .any(|l| l.starts_with("delete_route") && l.contains("10.244.7.0/24"))
    );
    assert!(log.iter().any(|l| l.starts_with("remove_peer")));

    // Node 11 joins.
    let mut joined = left.clone();
    joined.push(node(11));
    let log = converge(&kernel, &desired(&inputs(1, joined.clone())));
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(
        log.iter()
            .any(|l| l.starts_with("set_peer") && l.contains("node11"))
    );
    assert!(
        log.iter()
            .any(|l| l.starts_with("add_route") && l.contains("10.244.11.0/24"))
    );

    // Node 3 changes its key: the old peer goes, the new one comes; routes stay.
    let mut rekeyed = joined.clone();
    rekeyed[2].wireguard_public_key = Some(key(99).public_key().to_string());
    let log = converge(&kernel, &desired(&inputs(1, rekeyed)));
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(
        log[0].starts_with("remove_peer") && log[1].starts_with("set_peer"),
        "{log:?}"
    );
}

#[test]
fn losing_a_key_turns_routes_into_throws_without_touching_others() {
    let kernel = FakeKernel::new();
    let nodes = vec![node(1), node(2), node(3)];
    converge(&kernel, &desired(&inputs(1, nodes.clone())));
    let mut keyless = nodes.clone();
    keyless[2].wireguard_public_key = None;
    let log = converge(&kernel, &desired(&inputs(1, keyless)));
    assert_eq!(
        log,
        [
            "delete_route: delete route 10.244.3.0/24 dev wireguard.cali table 1",
            &format!(
                "remove_peer: remove peer {} from wireguard.cali",
                key(3).public_key()
            ),
            "add_route: add route throw 10.244.3.0/24 table 1",
        ]
    );
}

#[test]
fn disabling_removes_everything_we_made_and_nothing_else() {
    let kernel = FakeKernel::new();
    let foreign = wiremesh_core::mesh::RouteSpec {
        table: 1,
        dest: "192.168.7.0/24".parse().expect("net"),
        kind: wiremesh_core::mesh::RouteKind::Throw,
    };
    kernel.state().foreign_routes.insert(foreign.clone());
    converge(&kernel, &desired(&inputs(1, [node(1), node(2)])));
    let mut off = inputs(1, [node(1), node(2)]);
    off.settings.v4.enabled = false;
    let spec = desired(&off);
    let log = converge(&kernel, &spec);
    let kinds: Vec<&str> = log
        .iter()
        .map(|l| l.split(':').next().unwrap_or(""))
        .collect();
    assert_eq!(
        kinds,
        [
            "delete_rule",
            "delete_route",
            "delete_route",
            "delete_device"
        ]
    );
    let state = kernel.state();
    assert!(
        state.devices.is_empty()
            && state.links.is_empty()
            && state.routes.is_empty()
            && state.rules.is_empty()
    );
    assert!(state.foreign_routes.contains(&foreign));
}

#[test]
fn device_settings_change_reconfigures_without_touching_peers() {
    let kernel = FakeKernel::new();
    let mut i = inputs(1, [node(1), node(2), node(3)]);
    converge(&kernel, &desired(&i));
    i.settings.v4.listening_port = 40000;
    i.settings.v4.mtu = 1400;
    let log = converge(&kernel, &desired(&i));
    // The port is also every peer's endpoint port (Felix assumes one port cluster-wide).
    let kinds: Vec<&str> = log
        .iter()
        .map(|l| l.split(':').next().unwrap_or(""))
        .collect();
    assert_eq!(
        kinds,
        ["configure_device", "set_peer", "set_peer", "set_mtu"]
    );
}

#[test]
fn drift_is_repaired() {
    let kernel = FakeKernel::new();
    let spec = desired(&inputs(1, [node(1), node(2), node(3)]));
    converge(&kernel, &spec);
    {
        let mut state = kernel.state();
        let device = state.devices.get_mut("wireguard.cali").expect("device");
        device.peers.clear();
        device.fwmark = 0;
        state
            .links
            .get_mut("wireguard.cali")
            .expect("link")
            .addresses
            .insert("10.1.1.1/32".parse().expect("net"));
        state.rules.clear();
    }
    let log = converge(&kernel, &spec);
    assert_eq!(log.len(), 5, "{log:?}");
    assert_eq!(remaining(&kernel, &spec), 0);
}

#[test]
fn plan_never_replaces_all_peers() {
    let kernel = FakeKernel::new();
    let spec = desired(&inputs(1, (1..=50).map(node)));
    converge(&kernel, &spec);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let actual = rt
        .block_on(kernel.wireguard().observe(&spec.owned_interfaces))
        .expect("observe");
    let mut spec2 = spec.clone();
    spec2.devices.values_mut().for_each(|d| d.mtu = 1300);
    let ops = wg::plan(&spec2, &actual);
    assert!(
        ops.iter()
            .all(|o| !matches!(o, WgOp::RemovePeer { .. } | WgOp::SetPeer { .. }))
    );
}

/// The observed devices of a converged `spec`, with node 2's peer roamed to `roamed` and its
/// last handshake `age` ago.
fn roamed_state(
    spec: &DataplaneSpec,
    roamed: std::net::SocketAddr,
    age: Duration,
    now: SystemTime,
) -> (BTreeMap<String, wg::DeviceState>, WgKey) {
    let kernel = FakeKernel::new();
    converge(&kernel, spec);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut actual = rt
        .block_on(kernel.wireguard().observe(&spec.owned_interfaces))
        .expect("observe");
    let peer_key = key(2).public_key();
    let state = actual.values_mut().next().expect("one device");
    let peer = state.peers.get_mut(&peer_key).expect("node 2 is a peer");
    peer.endpoint = Some(roamed);
    peer.last_handshake = Some(now - age);
    (actual, peer_key)
}

fn learned(
    now: SystemTime,
    programmed: &BTreeMap<(String, WgKey), std::net::SocketAddr>,
) -> Option<wg::Learned<'_>> {
    Some(wg::Learned { now, programmed })
}

fn peer_of<'a>(spec: &'a mut DataplaneSpec, key: &WgKey) -> &'a mut PeerSpec {
    spec.devices
        .values_mut()
        .next()
        .and_then(|d| d.peers.get_mut(key))
        .expect("peer")
}

fn programmed(spec: &DataplaneSpec) -> BTreeMap<(String, WgKey), std::net::SocketAddr> {
    spec.devices
        .values()
        .flat_map(|d| {
            d.peers
                .iter()
                .map(|(k, p)| ((d.name.clone(), *k), p.endpoint))
        })
        .collect()
}

#[test]
fn learned_endpoint_is_kept_while_the_session_is_live() {
    let now = SystemTime::now();
    let spec = desired(&inputs(1, [node(1), node(2), node(3)]));
    let roamed: std::net::SocketAddr = "192.0.2.77:40000".parse().expect("addr");
    let (actual, peer_key) = roamed_state(&spec, roamed, Duration::from_secs(30), now);
    let before = programmed(&spec);
    assert!(
        wg::plan_with(&spec, &actual, learned(now, &before)).is_empty(),
        "a live roamed session must not be reset to the datastore endpoint"
    );
    // Without memory (after a restart) a live session is kept as well.
    let empty = BTreeMap::new();
    assert!(wg::plan_with(&spec, &actual, learned(now, &empty)).is_empty());
    // Plain plan() always sets the datastore's endpoint.
    let ops = wg::plan(&spec, &actual);
    assert!(
        matches!(&ops[..], [WgOp::SetPeer { public_key, peer, .. }]
            if *public_key == peer_key && peer.endpoint != roamed),
        "{ops:?}"
    );
}

#[test]
fn learned_endpoint_is_reset_when_the_session_is_stale() {
    let now = SystemTime::now();
    let spec = desired(&inputs(1, [node(1), node(2)]));
    let roamed: std::net::SocketAddr = "192.0.2.77:40000".parse().expect("addr");
    let (actual, peer_key) = roamed_state(
        &spec,
        roamed,
        wg::LIVE_SESSION + Duration::from_secs(1),
        now,
    );
    let before = programmed(&spec);
    let ops = wg::plan_with(&spec, &actual, learned(now, &before));
    let want = spec.devices.values().next().expect("device").peers[&peer_key].endpoint;
    assert!(
        matches!(&ops[..], [WgOp::SetPeer { peer, .. }] if peer.endpoint == want),
        "{ops:?}"
    );
}

#[test]
fn datastore_move_overrides_a_learned_endpoint_at_once() {
    let now = SystemTime::now();
    let spec = desired(&inputs(1, [node(1), node(2)]));
    let roamed: std::net::SocketAddr = "192.0.2.77:40000".parse().expect("addr");
    let (actual, peer_key) = roamed_state(&spec, roamed, Duration::from_secs(5), now);
    let before = programmed(&spec);
    // Node 2 now listens on another port: the datastore moved it.
    let mut moved = spec.clone();
    peer_of(&mut moved, &peer_key).endpoint.set_port(51999);
    let ops = wg::plan_with(&moved, &actual, learned(now, &before));
    assert!(
        matches!(&ops[..], [WgOp::SetPeer { peer, .. }] if peer.endpoint.port() == 51999),
        "{ops:?}"
    );
}

#[test]
fn allowed_ip_change_keeps_the_learned_endpoint() {
    let now = SystemTime::now();
    let spec = desired(&inputs(1, [node(1), node(2)]));
    let roamed: std::net::SocketAddr = "192.0.2.77:40000".parse().expect("addr");
    let (actual, peer_key) = roamed_state(&spec, roamed, Duration::from_secs(5), now);
    let before = programmed(&spec);
    let mut grown = spec.clone();
    let before_len = spec.devices.values().next().expect("device").peers[&peer_key]
        .allowed_ips
        .len();
    peer_of(&mut grown, &peer_key)
        .allowed_ips
        .insert("10.250.0.0/24".parse().expect("net"));
    let ops = wg::plan_with(&grown, &actual, learned(now, &before));
    assert!(
        matches!(&ops[..], [WgOp::SetPeer { peer, .. }]
            if peer.endpoint == roamed && peer.allowed_ips.len() == before_len + 1),
        "{ops:?}"
    );
}

fn arb_node(i: u8) -> impl Strategy<Value = NodeResource> {
    (any::<bool>(), 0u8..4, any::<bool>(), 0u8..3).prop_map(
        move |(has_key, key_choice, extra_cidr, quirk)| {
            let mut n = node(i);
            if !has_key {
                n.wireguard_public_key = None;
            } else if key_choice == 0 {
                // A key shared with node 2 sometimes.
                n.wireguard_public_key = Some(key(2).public_key().to_string());
            }
            if extra_cidr {
                n.pod_cidrs.push(format!("10.250.{}.0/24", i % 3));
            }
            match quirk {
                1 => n.wireguard_public_key = Some("garbage".into()),
                2 => n.ipv4_address = None,
                _ => {}
            }
            n
        },
    )
}

fn arb_cluster() -> impl Strategy<Value = Vec<NodeResource>> {
    prop::collection::vec(any::<bool>(), 2..9).prop_flat_map(|present| {
        let strategies: Vec<_> = present
            .iter()
            .enumerate()
            .filter(|(_, p)| **p)
            .map(|(i, _)| arb_node(i as u8 + 2).boxed())
            .collect();
        strategies
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// From any reachable state, converging to any other desired state leaves nothing to do,
    /// and the kernel's peers are exactly the desired peers.
    #[test]
    fn converging_is_idempotent(a in arb_cluster(), b in arb_cluster(), enabled_b in any::<bool>()) {
        let kernel = FakeKernel::new();
        let mut nodes_a = a.clone();
        nodes_a.push(node(1));
        converge(&kernel, &desired(&inputs(1, nodes_a)));
        let mut nodes_b = b.clone();
        nodes_b.push(node(1));
        let mut ib = inputs(1, nodes_b);
        ib.settings.v4.enabled = enabled_b;
        let spec_b = desired(&ib);
        converge(&kernel, &spec_b);
        prop_assert_eq!(remaining(&kernel, &spec_b), 0);
        prop_assert!(converge(&kernel, &spec_b).is_empty());
        let state = kernel.state();
        let have: BTreeSet<_> = state.devices.values().flat_map(|d| d.peers.keys().copied()).collect();
        let want: BTreeSet<_> = spec_b.devices.values().flat_map(|d| d.peers.keys().copied()).collect();
        prop_assert_eq!(have, want);
        // No allowed IP on two peers, none of them local.
        let mut seen = BTreeSet::new();
        for d in state.devices.values() {
            for p in d.peers.values() {
                for ip in &p.allowed_ips {
                    prop_assert!(seen.insert(*ip), "{} on two peers", ip);
                    prop_assert!(!ip.to_string().starts_with("10.244.1."));
                }
            }
        }
    }
}

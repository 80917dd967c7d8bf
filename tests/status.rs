//! Tier 1: the status model (`wiremesh status`): verdict, agreement check, JSON schema, and
//! the cluster view. Pure: no kernel, no datastore.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, UNIX_EPOCH};

use ipnet::IpNet;
use wiremesh::cli::status::{self, Handshake, Level};
use wiremesh_agent::status_file::{AgentStatus, DeviceStatus, PeerStatus};
use wiremesh_core::dataplane::wireguard::{DeviceState, PeerState};
use wiremesh_core::mesh::{PeerSpec, SkipReason, SkippedNode};
use wiremesh_core::model::{Family, NodeResource, WgKey};
use wiremesh_dataplane::Backend;

const NOW: u64 = 1_800_000_000;

fn nets(list: &[&str]) -> BTreeSet<IpNet> {
    list.iter().map(|n| n.parse().expect("net")).collect()
}

fn peer_spec(i: u8) -> PeerSpec {
    PeerSpec {
        node: format!("node{i}"),
        endpoint: format!("10.0.0.{i}:51820").parse().expect("endpoint"),
        allowed_ips: nets(&[&format!("10.244.{i}.0/24"), &format!("10.244.{i}.0/32")]),
        keepalive: 0,
    }
}

fn agent() -> AgentStatus {
    AgentStatus {
        node: "node1".into(),
        backend: Some(Backend::Userspace),
        devices: vec![DeviceStatus {
            family: Family::V4,
            interface: "wireguard.cali".into(),
            public_key: WgKey([1; 32]),
            listen_port: 51820,
            mtu: 1440,
            peers: [2u8, 3]
                .into_iter()
                .map(|i| PeerStatus {
                    public_key: WgKey([i; 32]),
                    spec: peer_spec(i),
                    programmed_at: Some(NOW - 100),
                })
                .collect(),
        }],
        skipped: vec![SkippedNode {
            node: "node4".into(),
            family: Family::V4,
            reason: SkipReason::NoKey,
        }],
        reconciles: 7,
        updated_at: NOW - 5,
        last_success_at: Some(NOW - 5),
        ready: true,
        resync_seconds: 90,
        ..Default::default()
    }
}

fn live_peer(i: u8, handshake_age: Option<u64>, tx: u64) -> PeerState {
    let spec = peer_spec(i);
    PeerState {
        endpoint: Some(spec.endpoint),
        allowed_ips: spec.allowed_ips,
        keepalive: 0,
        last_handshake: handshake_age.map(|a| UNIX_EPOCH + Duration::from_secs(NOW - a)),
        rx_bytes: if handshake_age.is_some() { 2048 } else { 0 },
        tx_bytes: tx,
    }
}

fn live(peers: Vec<(u8, PeerState)>) -> BTreeMap<String, DeviceState> {
    let d = DeviceState {
        name: "wireguard.cali".into(),
        public_key: Some(WgKey([1; 32])),
        listen_port: 51820,
        fwmark: 0x200000,
        peers: peers
            .into_iter()
            .map(|(i, p)| (WgKey([i; 32]), p))
            .collect(),
    };
    [(d.name.clone(), d)].into_iter().collect()
}

fn published(i: u8, key_byte: u8) -> NodeResource {
    NodeResource {
        name: format!("node{i}"),
        ipv4_address: Some(format!("10.0.0.{i}/24")),
        pod_cidrs: vec![format!("10.244.{i}.0/24")],
        wireguard_public_key: Some(WgKey([key_byte; 32]).to_string()),
        wireguard_interface_ipv4_address: Some(format!("10.244.{i}.0")),
        ..Default::default()
    }
}

#[test]
fn healthy_node_is_ok_with_fresh_handshakes() {
    let a = agent();
    let l = live(vec![
        (2, live_peer(2, Some(10), 4096)),
        (3, live_peer(3, Some(30), 4096)),
    ]);
    let nodes: BTreeMap<String, NodeResource> = [2u8, 3]
        .into_iter()
        .map(|i| (format!("node{i}"), published(i, i)))
        .collect();
    let r = status::build("node1", Some(&a), Ok(&l), Some(&nodes), NOW);
    assert_eq!(r.verdict.level, Level::Ok, "{}", r.verdict);
    assert_eq!(
        r.verdict.to_string(),
        "OK: 2/2 peers agree, handshakes fresh; 1 node skipped"
    );
    assert!(
        r.devices[0]
            .peers
            .iter()
            .all(|p| p.agrees && p.handshake == Handshake::Fresh)
    );
    assert_eq!(r.devices[0].peers[0].handshake_age_seconds, Some(10));
    assert_eq!(r.skipped[0].reason, "no_key");
    let text = status::render_text(&r);
    assert!(text.starts_with("OK: 2/2 peers agree"), "{text}");
    assert!(
        text.contains("node4 (IPv4): publishes no WireGuard public key"),
        "{text}"
    );
    assert!(!text.contains("private"), "{text}");
}

#[test]
fn idle_handshakes_are_ok_but_reported() {
    let a = agent();
    let l = live(vec![
        (2, live_peer(2, Some(600), 0)),
        (3, live_peer(3, None, 0)),
    ]);
    let r = status::build("node1", Some(&a), Ok(&l), None, NOW);
    assert_eq!(r.verdict.level, Level::Ok, "{}", r.verdict);
    assert!(r.verdict.summary.contains("1 fresh") || r.verdict.summary.contains("0 fresh"));
    assert_eq!(r.devices[0].peers[0].handshake, Handshake::Stale);
    assert_eq!(r.devices[0].peers[1].handshake, Handshake::None);
}

#[test]
fn a_published_key_that_differs_from_the_programmed_one_disagrees() {
    let a = agent();
    let l = live(vec![
        (2, live_peer(2, Some(10), 1)),
        (3, live_peer(3, Some(10), 1)),
    ]);
    let nodes: BTreeMap<String, NodeResource> = [(2u8, 2u8), (3, 9)]
        .into_iter()
        .map(|(i, k)| (format!("node{i}"), published(i, k)))
        .collect();
    let r = status::build("node1", Some(&a), Ok(&l), Some(&nodes), NOW);
    assert_eq!(r.verdict.level, Level::Degraded);
    let p3 = &r.devices[0].peers[1];
    assert!(!p3.agrees);
    assert!(
        p3.problems[0].contains(&format!("node3 publishes key {}", WgKey([9; 32]))),
        "{:?}",
        p3.problems
    );
    assert!(
        r.verdict
            .summary
            .starts_with("1/2 peers agree; disagreeing: node3"),
        "{}",
        r.verdict
    );
}

#[test]
fn bytes_sent_without_a_handshake_means_the_peer_uses_another_key() {
    let a = agent();
    let l = live(vec![
        (2, live_peer(2, Some(10), 1)),
        (3, live_peer(3, None, 444)),
    ]);
    let r = status::build("node1", Some(&a), Ok(&l), None, NOW);
    let p3 = &r.devices[0].peers[1];
    assert!(!p3.agrees);
    assert!(
        p3.problems[0].contains("no handshake although 444 bytes were sent"),
        "{:?}",
        p3.problems
    );
    assert_eq!(status::Level::Degraded.exit_code(), 1);

    // Within the grace period after programming it is not (yet) a disagreement.
    let mut fresh = agent();
    fresh.devices[0].peers[1].programmed_at = Some(NOW - 2);
    let r = status::build("node1", Some(&fresh), Ok(&l), None, NOW);
    assert!(r.devices[0].peers[1].agrees);
}

#[test]
fn missing_peer_wrong_ips_and_extra_peers_are_reported() {
    let a = agent();
    let mut p2 = live_peer(2, Some(5), 1);
    p2.allowed_ips = nets(&["10.244.2.0/24"]);
    let l = live(vec![(2, p2), (7, live_peer(7, None, 0))]);
    let r = status::build("node1", Some(&a), Ok(&l), None, NOW);
    assert_eq!(r.verdict.level, Level::Degraded);
    assert!(
        r.devices[0].peers[0].problems[0]
            .starts_with("allowed IPs on the device are 10.244.2.0/24")
    );
    assert!(r.devices[0].peers[1].problems[0].starts_with("not programmed"));
    assert!(
        r.problems
            .iter()
            .any(|p| p.contains("that no node publishes")),
        "{:?}",
        r.problems
    );
}

#[test]
fn no_agent_status_is_down_and_a_stale_or_failing_agent_is_degraded() {
    let l = live(vec![]);
    let r = status::build("node1", None, Ok(&l), None, NOW);
    assert_eq!(r.verdict.level, Level::Down);
    assert_eq!(r.verdict.level.exit_code(), 2);

    let mut a = agent();
    a.devices[0].peers.clear();
    a.updated_at = NOW - 3600;
    a.last_error = Some("programming the dataplane: boom".into());
    let r = status::build("node1", Some(&a), Ok(&l), None, NOW);
    assert_eq!(r.verdict.level, Level::Degraded);
    assert!(r.verdict.summary.contains("boom"), "{}", r.verdict);
    assert!(r.verdict.summary.contains("3600s old"), "{}", r.verdict);
}

/// A setting that does not take effect is not OK, whether or not WireGuard is on (issue 10:
/// "OK: WireGuard is off on this node" was all a bad `wireguardEnabled` got).
#[test]
fn a_configuration_error_is_degraded() {
    let error = "FelixConfiguration default: field wireguardEnabled = \"maybe\": invalid type: string \"maybe\", expected a boolean; its last valid value stays in force";
    let l = live(vec![
        (2, live_peer(2, Some(10), 1)),
        (3, live_peer(3, Some(10), 1)),
    ]);
    let mut a = agent();
    a.config_errors = vec![error.into(), "another".into()];
    let r = status::build("node1", Some(&a), Ok(&l), None, NOW);
    assert_eq!(r.verdict.level, Level::Degraded);
    assert!(
        r.verdict
            .summary
            .contains(&format!("{error} (and 1 more FelixConfiguration problems)")),
        "{}",
        r.verdict
    );
    let mut off = agent();
    off.devices.clear();
    off.config_errors = vec![error.into()];
    let r = status::build("node1", Some(&off), Ok(&live(vec![])), None, NOW);
    assert_eq!(r.verdict.level, Level::Degraded);
    assert_eq!(
        r.verdict.to_string(),
        format!("DEGRADED: WireGuard is off on this node; {error}")
    );
}

/// An unreachable datastore is DEGRADED even though the mesh is fine: the agent runs on the
/// last synced state and cannot follow changes.
#[test]
fn an_unreachable_datastore_is_degraded() {
    let l = live(vec![
        (2, live_peer(2, Some(10), 1)),
        (3, live_peer(3, Some(10), 1)),
    ]);
    let mut a = agent();
    a.datastore = Some(wiremesh_datastore::SyncState {
        last_sync: Some(NOW - 42),
        unreachable_since: Some(NOW - 42),
        error: Some("watching /calico/resources/v3/projectcalico.org/nodes/".into()),
    });
    let r = status::build("node1", Some(&a), Ok(&l), None, NOW);
    assert_eq!(r.verdict.level, Level::Degraded);
    assert!(
        r.verdict
            .summary
            .contains("the datastore has been unreachable for 42s"),
        "{}",
        r.verdict
    );
}

/// A node every node skips (its key is also published elsewhere) peers none, and says so.
#[test]
fn a_node_every_node_skips_is_degraded() {
    let mut a = agent();
    a.devices[0].peers.clear();
    a.skipped.push(SkippedNode {
        node: "node1".into(),
        family: Family::V4,
        reason: SkipReason::KeyCollision {
            with: vec!["node3".into()],
        },
    });
    let r = status::build("node1", Some(&a), Ok(&live(vec![])), None, NOW);
    assert_eq!(r.verdict.level, Level::Degraded);
    assert!(
        r.verdict.summary.contains(
            "every node skips this one for IPv4 and it peers none, so its pod traffic is in clear: public key is also published by node3"
        ),
        "{}",
        r.verdict
    );
}

#[test]
fn json_schema_is_stable() {
    let a = agent();
    let l = live(vec![
        (2, live_peer(2, Some(10), 1)),
        (3, live_peer(3, Some(10), 1)),
    ]);
    let r = status::build("node1", Some(&a), Ok(&l), None, NOW);
    let v = serde_json::to_value(&r).expect("json");
    assert_eq!(v["schemaVersion"], 1);
    assert_eq!(v["verdict"]["level"], "ok");
    assert_eq!(v["node"], "node1");
    assert_eq!(v["backend"], "userspace");
    assert_eq!(v["agent"]["ready"], true);
    let d = &v["devices"][0];
    for field in [
        "family",
        "interface",
        "present",
        "listenPort",
        "mtu",
        "publicKey",
        "peers",
    ] {
        assert!(d.get(field).is_some(), "device.{field} missing: {d}");
    }
    let p = &d["peers"][0];
    for field in [
        "node",
        "publicKey",
        "endpoint",
        "endpointLearned",
        "allowedIps",
        "latestHandshake",
        "handshakeAgeSeconds",
        "handshake",
        "rxBytes",
        "txBytes",
        "agrees",
        "problems",
    ] {
        assert!(p.get(field).is_some(), "peer.{field} missing: {p}");
    }
    assert_eq!(p["endpoint"], "10.0.0.2:51820");
    assert_eq!(p["handshake"], "fresh");
    assert_eq!(v["skipped"][0]["reason"], "no_key");
    // The documented schema names every top-level field.
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/status.md"))
        .expect("docs/status.md");
    for field in v.as_object().expect("object").keys() {
        assert!(
            doc.contains(&format!("`{field}`")),
            "docs/status.md does not document {field}"
        );
    }
    // Round trip: the status file the agent writes is read back by `wiremesh status`.
    let back: AgentStatus =
        serde_json::from_value(serde_json::to_value(&a).expect("agent json")).expect("decode");
    assert_eq!(back.devices[0].peers.len(), 2);
    assert_eq!(back.skipped, a.skipped);
}

#[test]
fn cluster_view_flags_collisions_malformed_and_missing_keys() {
    let mut nodes: BTreeMap<String, NodeResource> = BTreeMap::new();
    nodes.insert("node1".into(), published(1, 1));
    nodes.insert("node2".into(), published(2, 2));
    nodes.insert("node3".into(), published(3, 2));
    let mut n4 = published(4, 4);
    n4.wireguard_public_key = Some("not-a-key".into());
    nodes.insert("node4".into(), n4);
    let mut n5 = published(5, 5);
    n5.wireguard_public_key = None;
    nodes.insert("node5".into(), n5);
    let r = status::build_cluster(&nodes);
    assert_eq!(r.verdict.level, Level::Degraded);
    let by: BTreeMap<&str, &status::ClusterNode> =
        r.nodes.iter().map(|n| (n.node.as_str(), n)).collect();
    assert!(by["node1"].peerable);
    assert!(by["node2"].problems[0].contains("also published by node3"));
    assert!(by["node4"].problems[0].starts_with("malformed WireGuard public key"));
    assert_eq!(by["node5"].problems[0], "publishes no WireGuard public key");
    assert!(
        r.verdict.summary.starts_with("4/5 nodes cannot be peered"),
        "{}",
        r.verdict
    );
    let text = status::render_cluster_text(&r);
    assert!(text.lines().count() >= 6, "{text}");
}

/// `status --cluster` judges nodes with the agent's own validation: of two nodes claiming a
/// pod CIDR the later claim loses (node names break the tie), IPv6 problems are shown too, and
/// a skipped node reads as the agent's reason.
#[test]
fn cluster_view_judges_nodes_as_the_agent_does() {
    let mut nodes: BTreeMap<String, NodeResource> = BTreeMap::new();
    for i in 1..=3 {
        nodes.insert(format!("node{i}"), published(i, i));
    }
    // node3 claims node2's pod CIDR; node1 publishes a malformed IPv6 key.
    if let Some(n3) = nodes.get_mut("node3") {
        n3.pod_cidrs = vec!["10.244.2.0/24".into()];
    }
    if let Some(n1) = nodes.get_mut("node1") {
        n1.ipv6_address = Some("fd00::1".into());
        n1.wireguard_public_key_v6 = Some("bogus".into());
    }
    let r = status::build_cluster(&nodes);
    let by: BTreeMap<&str, &status::ClusterNode> =
        r.nodes.iter().map(|n| (n.node.as_str(), n)).collect();
    // IPv6 is in use (node1 publishes a key), so a node without one cannot be peered for it.
    assert_eq!(
        by["node2"].problems,
        ["IPv6: publishes no WireGuard public key"]
    );
    assert_eq!(
        by["node3"].problems[0],
        "claims pod CIDR 10.244.2.0/24, which overlaps a CIDR node2 claimed first"
    );
    assert!(
        by["node1"].problems[0].starts_with("IPv6: malformed WireGuard public key"),
        "{:?}",
        by["node1"].problems
    );
    let node4 =
        wiremesh_core::mesh::validate_node(&published(4, 4), Family::V6).expect_err("no IPv6 key");
    assert_eq!(node4.0, SkipReason::NoKey);
    let text = status::render_cluster_text(&r);
    assert!(text.contains("PUBLIC KEY V6"), "{text}");
}

#[test]
fn a_learned_endpoint_agrees_while_live_and_disagrees_when_stale() {
    let a = agent();
    let roamed = |age: u64| {
        let mut p = live_peer(2, Some(age), 1);
        p.endpoint = Some("192.0.2.9:40000".parse().expect("addr"));
        p
    };
    let l = live(vec![(2, roamed(30)), (3, live_peer(3, Some(10), 1))]);
    let r = status::build("node1", Some(&a), Ok(&l), None, NOW);
    let p = &r.devices[0].peers[0];
    assert_eq!(p.node, "node2");
    assert!(p.agrees && p.endpoint_learned, "{p:?}");
    assert_eq!(p.endpoint.as_deref(), Some("192.0.2.9:40000"));
    assert_eq!(r.verdict.level, Level::Ok, "{}", r.verdict);

    let l = live(vec![(2, roamed(600)), (3, live_peer(3, Some(10), 1))]);
    let r = status::build("node1", Some(&a), Ok(&l), None, NOW);
    let p = &r.devices[0].peers[0];
    assert!(!p.agrees && !p.endpoint_learned, "{p:?}");
    assert!(
        p.problems
            .iter()
            .any(|m| m.contains("endpoint on the device is 192.0.2.9:40000")),
        "{:?}",
        p.problems
    );
}

//! Real-kernel test of named ports: a HostEndpoint's `ports[]` rendered into an
//! `address . inet_proto . inet_service` set, in fresh network namespaces that are always
//! removed (the `Netns` guard deletes them on drop, panics included).
//! Must run as root; set `WIREMESH_SKIP_ROOT_TESTS=1` to skip (loudly) elsewhere.
//! Only addresses inside our namespaces are used (10.98.1.0/24, fd98:1::/64).

mod support;
use support::{root_or_skip, tcp_answers};

use serde_json::{Value, json};
use wiremesh::netns::Netns;
use wiremesh_core::dataplane::filter::{NftOp, plan};
use wiremesh_core::policy::render::{FilterSpec, render};
use wiremesh_core::policy::{PolicyInputs, PolicyResources, compile};
use wiremesh_core::wire::{Kind, RawPolicyResources};
use wiremesh_dataplane::nft::{FilterDataplane, KernelNft};

/// The host endpoint on `a` serves `web` on TCP `port`; one policy allows the named port.
fn spec_for(port: u16) -> FilterSpec {
    let objects: Vec<(Kind, Value)> = vec![
        (
            Kind::HostEndpoint,
            json!({"metadata": {"name": "a-veth", "labels": {"host-endpoint": "true"}},
            "spec": {"node": "a", "interfaceName": "veth-a", "expectedIPs": ["10.98.1.1", "fd98:1::1"],
                     "ports": [{"name": "web", "protocol": "TCP", "port": port}]}}),
        ),
        (
            Kind::GlobalNetworkPolicy,
            json!({"metadata": {"name": "allow-web"},
            "spec": {"selector": "host-endpoint == 'true'",
                     "ingress": [{"action": "Allow", "destination": {"ports": ["web"]}}],
                     "egress": [{"action": "Allow"}]}}),
        ),
    ];
    let mut raw = RawPolicyResources::default();
    for (kind, v) in &objects {
        let name = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        raw.insert(*kind, name, v.clone());
    }
    let res = PolicyResources::from_raw(&raw);
    assert!(res.errors.is_empty(), "{:?}", res.errors);
    render(&compile(&PolicyInputs {
        node: "a",
        resources: Some(&res),
        ..Default::default()
    }))
}

/// Applies `spec` and checks that a fresh observer (a full listing from the kernel) finds
/// nothing left to do: observed named-port elements equal the rendered ones.
async fn converge(nft: &mut KernelNft, ns: &Netns, spec: &FilterSpec) -> Vec<NftOp> {
    let before = nft.observe().await.expect("observe");
    let ops = plan(spec, &before);
    nft.apply(&ops).await.expect("apply");
    let after = KernelNft::in_netns(ns.name())
        .observe()
        .await
        .expect("observe");
    assert!(
        plan(spec, &after).is_empty(),
        "not converged: {:?}",
        plan(spec, &after)
    );
    ops
}

fn pair() -> (Netns, Netns) {
    let a = Netns::new("wmt-npa").expect("netns");
    let b = Netns::new("wmt-npb").expect("netns");
    a.ip(&[
        "link",
        "add",
        "veth-a",
        "type",
        "veth",
        "peer",
        "name",
        "veth-b",
        "netns",
        b.name(),
    ])
    .expect("veth");
    // Static IPv6 neighbours: the endpoint's default deny drops neighbour discovery (ICMPv6),
    // and this test is about the named port, not NDP.
    for (ns, dev, mac, v4, v6, peer6, peer_mac) in [
        (
            &a,
            "veth-a",
            "02:98:01:00:00:01",
            "10.98.1.1/24",
            "fd98:1::1/64",
            "fd98:1::2",
            "02:98:01:00:00:02",
        ),
        (
            &b,
            "veth-b",
            "02:98:01:00:00:02",
            "10.98.1.2/24",
            "fd98:1::2/64",
            "fd98:1::1",
            "02:98:01:00:00:01",
        ),
    ] {
        ns.ip(&["link", "set", dev, "address", mac]).expect("mac");
        ns.ip(&["addr", "add", v4, "dev", dev]).expect("addr");
        ns.ip(&["addr", "add", v6, "dev", dev, "nodad"])
            .expect("addr6");
        ns.ip(&["link", "set", dev, "up"]).expect("up");
        ns.ip(&[
            "-6",
            "neigh",
            "replace",
            peer6,
            "lladdr",
            peer_mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ])
        .expect("neigh");
    }
    (a, b)
}

#[tokio::test]
async fn named_port_allows_its_port_only_and_follows_endpoint_changes() {
    if !root_or_skip("named_port_allows_its_port_only_and_follows_endpoint_changes") {
        return;
    }
    let (a, b) = pair();
    let mut k = KernelNft::in_netns(a.name());
    assert!(
        tcp_answers(&b, "10.98.1.1", 8081),
        "no connectivity before policy"
    );

    let ops = converge(&mut k, &a, &spec_for(8080)).await;
    assert!(
        matches!(ops.as_slice(), [NftOp::ReplaceTable(_)]),
        "{ops:?}"
    );
    let listing = a
        .exec(&["nft", "list", "table", "inet", "wiremesh"])
        .expect("list");
    assert!(
        listing.contains("10.98.1.1 . tcp . 8080") && listing.contains("fd98:1::1 . tcp . 8080"),
        "{listing}"
    );
    for to in ["10.98.1.1", "fd98:1::1"] {
        assert!(tcp_answers(&b, to, 8080), "{to}: the named port is allowed");
        assert!(
            !tcp_answers(&b, to, 8081),
            "{to}: default deny drops tcp:8081"
        );
    }

    // The endpoint moves `web` to 8081: set elements only, no rule rewritten.
    let ops = converge(&mut k, &a, &spec_for(8081)).await;
    assert!(
        !ops.is_empty()
            && ops
                .iter()
                .all(|o| matches!(o, NftOp::AddElements { .. } | NftOp::DeleteElements { .. })),
        "{ops:?}"
    );
    assert!(tcp_answers(&b, "10.98.1.1", 8081), "web is now 8081");
    assert!(!tcp_answers(&b, "10.98.1.1", 8080), "8080 is no longer web");

    converge(&mut k, &a, &FilterSpec::default()).await;
    assert!(
        tcp_answers(&b, "10.98.1.1", 8080),
        "cleanup restores connectivity"
    );
}

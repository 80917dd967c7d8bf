//! Tier 3: pod policy in the real kernel. One node namespace routes for four pod namespaces
//! (Calico-style: a veth per pod, /32 routes, proxy ARP) and a remote host namespace; our table
//! is programmed from WorkloadEndpoints, Profiles and Kubernetes NetworkPolicies, and TCP
//! probes show who reaches whom. Pods `x/a` and `x/b` have `cali*` interfaces (dispatched by
//! interface), `y/c` has `vethc` (dispatched by address, as beside a CNI that names its
//! interfaces its own way), and a fourth pod on `caliunknown0` has no endpoint.
//! Must run as root; set `WIREMESH_SKIP_ROOT_TESTS=1` to skip (loudly) elsewhere.
//! Only addresses inside our namespaces are used (10.97.0.0/16).

mod support;
use support::{root_or_skip, tcp_answers};

use wiremesh::netns::Netns;
use wiremesh_core::dataplane::filter::{NftOp, plan};
use wiremesh_core::manifest::Manifest;
use wiremesh_core::policy::program::EndpointToHostAction;
use wiremesh_core::policy::render::FilterSpec;
use wiremesh_core::policy::workload::interface_name;
use wiremesh_core::policy::{PolicyInputs, PolicySettings, desired_filter};
use wiremesh_dataplane::nft::{FilterDataplane, KernelNft};

const NODE: &str = "10.97.0.1";
const REMOTE: &str = "10.97.0.2";

struct Pod {
    ns: Netns,
    ip: &'static str,
}

struct Topology {
    node: Netns,
    remote: Netns,
    a: Pod,
    b: Pod,
    c: Pod,
    unknown: Pod,
}

fn sh(ns: &Netns, cmd: &str) {
    ns.exec(&["sh", "-c", cmd])
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
}

/// A pod namespace behind host-side interface `iface` of `node`, addressed `ip`/32.
fn pod(node: &Netns, iface: &str, ip: &'static str) -> Pod {
    let ns = Netns::new("wmt-pod").expect("netns");
    node.ip(&[
        "link",
        "add",
        iface,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ])
    .expect("veth");
    sh(
        node,
        &format!(
            "ip link set {iface} up && sysctl -qw net.ipv4.conf.{iface}.proxy_arp=1 \
             && ip route add {ip}/32 dev {iface}"
        ),
    );
    sh(
        &ns,
        &format!(
            "ip link set lo up && ip link set eth0 up && ip addr add {ip}/32 dev eth0 \
             && ip route add 169.254.1.1 dev eth0 scope link \
             && ip route add default via 169.254.1.1 dev eth0"
        ),
    );
    Pod { ns, ip }
}

/// A node namespace (forwarding on, `NODE` on `eth-r`, then `node_setup`) and a remote host
/// behind `eth-r` (`REMOTE`, routing `pods` through the node).
fn node_and_remote(prefix: &str, pods: &str, node_setup: &str) -> (Netns, Netns) {
    let node = Netns::new(&format!("{prefix}node")).expect("netns");
    let remote = Netns::new(&format!("{prefix}remote")).expect("netns");
    node.ip(&[
        "link",
        "add",
        "eth-r",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        remote.name(),
    ])
    .expect("veth");
    sh(
        &node,
        &format!(
            "ip link set lo up && ip link set eth-r up && ip addr add {NODE}/24 dev eth-r \
             && sysctl -qw net.ipv4.ip_forward=1 && {node_setup}"
        ),
    );
    sh(
        &remote,
        &format!(
            "ip link set lo up && ip link set eth0 up && ip addr add {REMOTE}/24 dev eth0 \
             && ip route add {pods} via {NODE}"
        ),
    );
    (node, remote)
}

/// The node: a route to the pods' gateway address `169.254.1.1` so that proxy ARP on the pods'
/// interfaces answers for it (as on a Calico node, where the default route does).
fn topology() -> Topology {
    let (node, remote) = node_and_remote(
        "wmt-pod",
        "10.97.1.0/24",
        "ip route add 169.254.1.1 dev eth-r",
    );
    let a = pod(&node, &interface_name("cali", "x", "a"), "10.97.1.2");
    let b = pod(&node, &interface_name("cali", "x", "b"), "10.97.1.3");
    let c = pod(&node, "vethc", "10.97.1.4");
    let unknown = pod(&node, "caliunknown0", "10.97.1.5");
    Topology {
        node,
        remote,
        a,
        b,
        c,
        unknown,
    }
}

/// The endpoints (three pods on node `n1`, one elsewhere), their profiles, and `policies`.
fn spec(policies: &str, endpoint_to_host: EndpointToHostAction) -> FilterSpec {
    let wep = |ns: &str, pod: &str, iface: &str, ip: &str, node: &str| {
        format!(
            "apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {{name: {node}-k8s-{pod}-eth0, namespace: {ns}, labels: {{pod: {pod}}}}}
spec: {{node: {node}, orchestrator: k8s, pod: {pod}, endpoint: eth0, interfaceName: {iface},
        ipNetworks: [{ip}/32], profiles: [kns.{ns}]}}
---
"
        )
    };
    let mut text = String::new();
    text.push_str(&wep(
        "x",
        "a",
        &interface_name("cali", "x", "a"),
        "10.97.1.2",
        "n1",
    ));
    text.push_str(&wep(
        "x",
        "b",
        &interface_name("cali", "x", "b"),
        "10.97.1.3",
        "n1",
    ));
    text.push_str(&wep("y", "c", "vethc", "10.97.1.4", "n1"));
    text.push_str(&wep("y", "far", "cali0000000000f", "10.97.9.9", "n2"));
    for ns in ["x", "y"] {
        text.push_str(&format!(
            "apiVersion: projectcalico.org/v3
kind: Profile
metadata: {{name: kns.{ns}}}
spec:
  ingress: [{{action: Allow}}]
  egress: [{{action: Allow}}]
  labelsToApply: {{pcns.ns: {ns}, pcns.projectcalico.org/name: {ns}}}
---
"
        ));
    }
    text.push_str(policies);
    let manifest = Manifest::parse("pods.yaml", &text);
    assert!(manifest.errors.is_empty(), "{:?}", manifest.errors);
    let (res, problems) = manifest.validate();
    assert!(problems.is_empty(), "{problems:?}");
    desired_filter(&PolicyInputs {
        node: "n1",
        resources: Some(&res),
        settings: PolicySettings {
            endpoint_to_host,
            ..PolicySettings::default()
        },
        ..Default::default()
    })
}

/// Converges our table on `spec`; returns the ops it took.
async fn converge(nft: &mut KernelNft, spec: &FilterSpec) -> Vec<NftOp> {
    let before = nft.observe().await.expect("observe");
    let ops = plan(spec, &before);
    nft.apply(&ops).await.expect("apply");
    let after = nft.observe().await.expect("observe");
    assert!(plan(spec, &after).is_empty(), "not converged");
    ops
}

/// Converges on `spec` by changing only what differs (no table replacement), and returns the
/// chains the change wrote.
async fn update(nft: &mut KernelNft, spec: &FilterSpec) -> Vec<String> {
    let ops = converge(nft, spec).await;
    assert!(
        !ops.iter().any(|o| matches!(o, NftOp::ReplaceTable(_))),
        "{ops:?}"
    );
    ops.iter()
        .filter_map(|o| match o {
            NftOp::UpdateRules(u) => Some(u.write_chains.iter().map(|c| c.name.clone())),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Each `(from, to, port, expected)` probe; all mismatches are reported together.
fn expect(step: &str, probes: &[(&str, &Netns, &str, u16, bool)]) {
    let wrong: Vec<String> = probes
        .iter()
        .filter(|(_, from, to, port, want)| tcp_answers(from, to, *port) != *want)
        .map(|(what, _, _, port, want)| {
            let verdict = if *want { "answer" } else { "be dropped" };
            format!("{what}:{port} should {verdict}")
        })
        .collect();
    assert!(wrong.is_empty(), "{step}: {wrong:?}");
}

const DENY_INGRESS_X: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
";

const ALLOW_B_TO_A_80: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-b-to-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: 80}]}]
---
";

const ISOLATE_Y: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: isolate, namespace: y}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
---
";

#[tokio::test]
async fn pod_policy_is_enforced_by_interface_and_by_address() {
    if !root_or_skip("pod_policy_is_enforced_by_interface_and_by_address") {
        return;
    }
    let t = topology();
    let (a, b, c) = (t.a.ip, t.b.ip, t.c.ip);
    expect(
        "no table",
        &[
            ("b -> a", &t.b.ns, a, 80, true),
            ("unknown -> a", &t.unknown.ns, a, 80, true),
            ("remote -> c", &t.remote, c, 80, true),
        ],
    );
    let mut nft = KernelNft::in_netns(t.node.name());
    let accept = EndpointToHostAction::Accept;

    // Endpoints and their allow-all profiles: open, except for an interface with the
    // workload prefix that belongs to no endpoint.
    converge(&mut nft, &spec("", accept)).await;
    expect(
        "endpoints, no policy",
        &[
            ("b -> a", &t.b.ns, a, 80, true),
            ("remote -> a", &t.remote, a, 80, true),
            ("c -> a", &t.c.ns, a, 80, true),
            ("a -> c", &t.a.ns, c, 80, true),
            ("a -> node", &t.a.ns, NODE, 22, true),
            ("unknown -> a", &t.unknown.ns, a, 80, false),
        ],
    );

    // Default deny ingress in x: nothing reaches a or b, whatever the path; the host still
    // does (host to pod is never policed) and a still reaches out.
    // From here on each change is an update of what differs, in the running table.
    let written = update(&mut nft, &spec(DENY_INGRESS_X, accept)).await;
    assert_eq!(
        written,
        ["tw-x/a", "tw-x/b"],
        "the policy selects a and b (its own chain has no rules)"
    );
    expect(
        "default-deny-ingress in x",
        &[
            ("b -> a (same node)", &t.b.ns, a, 80, false),
            ("remote -> a (forwarded)", &t.remote, a, 80, false),
            (
                "c -> a (from an address-dispatched pod)",
                &t.c.ns,
                a,
                80,
                false,
            ),
            ("node -> a", &t.node, a, 80, true),
            ("a -> c", &t.a.ns, c, 80, true),
            ("a -> remote", &t.a.ns, REMOTE, 80, true),
            ("a -> node", &t.a.ns, NODE, 22, true),
        ],
    );

    // Allow b -> a on port 80 only.
    let both = format!("{DENY_INGRESS_X}{ALLOW_B_TO_A_80}");
    let written = update(&mut nft, &spec(&both, accept)).await;
    assert_eq!(
        written,
        ["tw-x/a", "pi-np/x/knp.default.allow-b-to-a"],
        "the policy selects a"
    );
    expect(
        "allow b -> a:80",
        &[
            ("b -> a", &t.b.ns, a, 80, true),
            ("b -> a", &t.b.ns, a, 81, false),
            ("c -> a", &t.c.ns, a, 80, false),
            ("a -> b", &t.a.ns, b, 80, false),
        ],
    );
    // Per-rule counters count pod policy as they do host policy: the allow rule saw b's
    // connection, the end of the default tier the refused ones.
    let counters = nft
        .counter_reader()
        .expect("counters")
        .read_counters()
        .await
        .expect("read");
    for name in ["np/x/knp.default.allow-b-to-a/in0", "tier/default/in"] {
        assert!(
            counters.get(name).is_some_and(|c| c.packets > 0),
            "{name}: {:?}",
            counters.get(name)
        );
    }

    // Isolate y (ingress and egress): c is dispatched by address both ways.
    let three = format!("{both}{ISOLATE_Y}");
    update(&mut nft, &spec(&three, accept)).await;
    expect(
        "isolate y",
        &[
            ("c -> remote", &t.c.ns, REMOTE, 80, false),
            ("c -> node", &t.c.ns, NODE, 22, false),
            ("remote -> c", &t.remote, c, 80, false),
            ("a -> c", &t.a.ns, c, 80, false),
            ("node -> c", &t.node, c, 80, true),
            ("b -> a", &t.b.ns, a, 80, true),
        ],
    );

    // defaultEndpointToHostAction Drop: a pod no longer reaches its host; others unchanged.
    let written = update(&mut nft, &spec(&both, EndpointToHostAction::Drop)).await;
    assert!(written.contains(&"wl-to-host".to_string()), "{written:?}");
    expect(
        "defaultEndpointToHostAction Drop",
        &[
            ("a -> node", &t.a.ns, NODE, 22, false),
            ("a -> remote", &t.a.ns, REMOTE, 80, true),
            ("node -> a", &t.node, a, 80, true),
        ],
    );

    // Removing the table opens everything again.
    converge(&mut nft, &FilterSpec::default()).await;
    expect(
        "table removed",
        &[
            ("b -> a", &t.b.ns, a, 81, true),
            ("unknown -> a", &t.unknown.ns, a, 80, true),
            ("c -> remote", &t.c.ns, REMOTE, 80, true),
        ],
    );
}

/// A pod behind a veth `veth` enslaved to bridge `cni0` of `node`, addressed `ip`/24 with the
/// bridge as gateway: what the `bridge` CNI plugin (and flannel) build.
fn bridged_pod(node: &Netns, veth: &str, ip: &'static str) -> Pod {
    let ns = Netns::new("wmt-brpod").expect("netns");
    node.ip(&[
        "link",
        "add",
        veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ])
    .expect("veth");
    sh(
        node,
        &format!("ip link set {veth} master cni0 && ip link set {veth} up"),
    );
    sh(
        &ns,
        &format!(
            "ip link set lo up && ip link set eth0 up && ip addr add {ip}/24 dev eth0 \
             && ip route add default via 10.97.2.1"
        ),
    );
    Pod { ns, ip }
}

const ISOLATE_D: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: isolate-d, namespace: z}
spec: {podSelector: {matchLabels: {pod: d}}, policyTypes: [Ingress]}
---
";

/// Bridge CNIs: pods on one bridge with interface names the CNI picks (`veth…`), so their
/// endpoints name interfaces (Calico's computed `cali…` names) that do not exist. Traffic
/// between them is bridged: the inet forward hook sees it only with `br_netfilter`'s
/// `bridge-nf-call-iptables` on, and then in and out interface are the bridge, so the pods are
/// dispatched by address. Traffic from elsewhere is routed and needs nothing.
#[tokio::test]
async fn bridged_pods_are_policed_by_address_with_br_netfilter() {
    if !root_or_skip("bridged_pods_are_policed_by_address_with_br_netfilter") {
        return;
    }
    let (node, remote) = node_and_remote(
        "wmt-br",
        "10.97.2.0/24",
        "ip link add cni0 type bridge && ip addr add 10.97.2.1/24 dev cni0 && ip link set cni0 up",
    );
    let d = bridged_pod(&node, "veth1a2b3c4d", "10.97.2.2");
    let e = bridged_pod(&node, "veth5e6f7a8b", "10.97.2.3");
    let mut text = String::new();
    for (pod, ip) in [("d", d.ip), ("e", e.ip)] {
        text.push_str(&format!(
            "apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {{name: n1-k8s-{pod}-eth0, namespace: z, labels: {{pod: {pod}}}}}
spec: {{node: n1, orchestrator: k8s, pod: {pod}, endpoint: eth0, ipNetworks: [{ip}/32], profiles: [kns.z]}}
---
"
        ));
    }
    text.push_str(
        "apiVersion: projectcalico.org/v3
kind: Profile
metadata: {name: kns.z}
spec: {ingress: [{action: Allow}], egress: [{action: Allow}]}
---
",
    );
    text.push_str(ISOLATE_D);
    let manifest = Manifest::parse("bridged.yaml", &text);
    let (res, problems) = manifest.validate();
    assert!(problems.is_empty(), "{problems:?}");
    let spec = desired_filter(&PolicyInputs {
        node: "n1",
        resources: Some(&res),
        ..Default::default()
    });
    let mut nft = KernelNft::in_netns(node.name());
    converge(&mut nft, &spec).await;

    let bridge_nf = |on: bool| {
        sh(
            &node,
            &format!(
                "sysctl -qw net.bridge.bridge-nf-call-iptables={}",
                u8::from(on)
            ),
        )
    };
    // Without br_netfilter the bridge passes pod-to-pod traffic by the IP hooks: unpoliced.
    bridge_nf(false);
    expect(
        "bridge-nf-call-iptables=0",
        &[
            ("e -> d (bridged)", &e.ns, d.ip, 80, true),
            ("remote -> d (routed)", &remote, d.ip, 80, false),
        ],
    );
    bridge_nf(true);
    expect(
        "bridge-nf-call-iptables=1",
        &[
            ("e -> d (bridged)", &e.ns, d.ip, 80, false),
            ("d -> e (bridged)", &d.ns, e.ip, 80, true),
            ("remote -> d (routed)", &remote, d.ip, 80, false),
            ("remote -> e (routed)", &remote, e.ip, 80, true),
        ],
    );
    converge(&mut nft, &FilterSpec::default()).await;
}

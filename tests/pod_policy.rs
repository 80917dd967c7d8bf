//! Tier 1: the pod part of the node's program and table (`policy::program`, `policy::render`):
//! which pods get chains, in which order tiers and profiles run, how packets reach a pod's
//! chains (by interface, by address), and the selector sets pods feed.

use wiremesh_core::manifest::Manifest;
use wiremesh_core::policy::program::{EndpointToHostAction, Program};
use wiremesh_core::policy::render::{FilterSpec, MapKey, render};
use wiremesh_core::policy::{PolicyInputs, PolicyResources, PolicySettings, compile};

/// Pods `x/a` (cali interface) and `x/b` (`vethb`) on `n1`, `y/c` on `n2`; profiles for x and
/// y; then `extra`.
fn resources(extra: &str) -> PolicyResources {
    let text = format!(
        "apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {{name: n1-k8s-a-eth0, namespace: x, labels: {{app: web}}}}
spec: {{node: n1, pod: a, endpoint: eth0, interfaceName: cali0a, ipNetworks: [10.1.0.2/32, 'fd00::2/128'],
        profiles: [kns.x, ksa.x.default], ports: [{{name: http, protocol: TCP, port: 8080}}]}}
---
apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {{name: n1-k8s-b-eth0, namespace: x, labels: {{app: db}}}}
spec: {{node: n1, pod: b, endpoint: eth0, interfaceName: vethb, ipNetworks: [10.1.0.3/32], profiles: [kns.x]}}
---
apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {{name: n2-k8s-c-eth0, namespace: y, labels: {{app: web}}}}
spec: {{node: n2, pod: c, endpoint: eth0, interfaceName: cali0c, ipNetworks: [10.2.0.2/32], profiles: [kns.y],
        ports: [{{name: http, protocol: TCP, port: 9090}}]}}
---
apiVersion: projectcalico.org/v3
kind: Profile
metadata: {{name: kns.x}}
spec: {{ingress: [{{action: Allow}}], egress: [{{action: Allow}}], labelsToApply: {{pcns.team: shop}}}}
---
apiVersion: projectcalico.org/v3
kind: Profile
metadata: {{name: kns.y}}
spec: {{ingress: [{{action: Allow}}], egress: [{{action: Allow}}], labelsToApply: {{pcns.team: ops}}}}
---
apiVersion: projectcalico.org/v3
kind: Profile
metadata: {{name: ksa.x.default}}
spec: {{labelsToApply: {{pcsa.role: none}}}}
---
{extra}"
    );
    let m = Manifest::parse("pods.yaml", &text);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    let (res, problems) = m.validate();
    assert!(problems.is_empty(), "{problems:?}");
    res
}

fn program_with(res: &PolicyResources, settings: PolicySettings) -> Program {
    compile(&PolicyInputs {
        node: "n1",
        resources: Some(res),
        settings,
        ..Default::default()
    })
}

fn program(extra: &str) -> (Program, FilterSpec) {
    let p = program_with(&resources(extra), PolicySettings::default());
    let spec = render(&p);
    (p, spec)
}

fn chain<'a>(spec: &'a FilterSpec, name: &str) -> &'a [String] {
    &spec
        .chains
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no chain {name} in\n{}", spec.to_nft()))
        .rules
}

#[test]
fn local_pods_get_chains_and_are_dispatched_by_interface_or_address() {
    let (p, spec) = program("");
    let local: Vec<String> = p.workloads.iter().map(|w| w.id()).collect();
    assert_eq!(local, ["x/a", "x/b"], "only this node's pods");
    assert_eq!(p.workloads[0].interface.as_deref(), Some("cali0a"));
    assert_eq!(
        p.workloads[1].interface, None,
        "vethb has no workload prefix: by address only"
    );
    assert!(!p.is_empty(), "pods alone make a table");

    let from_iface = &spec.maps["wl-from-iface"];
    assert_eq!(from_iface.key, MapKey::Interface);
    assert_eq!(
        from_iface.elements.iter().collect::<Vec<_>>(),
        [(&"\"cali0a\"".to_string(), &"fw-x/a".to_string())]
    );
    assert_eq!(
        spec.maps["wl-to-addr4"].elements.keys().collect::<Vec<_>>(),
        ["10.1.0.2", "10.1.0.3"]
    );
    assert_eq!(spec.maps["wl-to-addr6"].elements["fd00::2"], "tw-x/a");
    // Unknown workload interfaces get nothing; other interfaces go by address.
    assert_eq!(
        chain(&spec, "wl-from-dispatch"),
        [
            "iifname vmap @wl-from-iface",
            "drop comment \"unknown workload interface\""
        ]
    );
    let forward = chain(&spec, "filter-forward");
    for rule in [
        "iifname \"cali*\" jump wl-from-dispatch",
        "iifname != \"cali*\" jump wl-from-addr-dispatch",
        "oifname \"cali*\" jump wl-to-dispatch",
        "oifname != \"cali*\" jump wl-to-addr-dispatch",
    ] {
        assert!(forward.contains(&rule.to_string()), "{forward:?}");
    }
    // No policy: conntrack, then the allow-all namespace profile (the account profile has
    // no rules), then drop.
    let to_a = chain(&spec, "tw-x/a");
    assert_eq!(to_a[0], "ct state established,related accept");
    assert!(to_a[3].contains("comment \"profile kns.x\""), "{to_a:?}");
    assert_eq!(to_a.len(), 5, "{to_a:?}");
    assert!(to_a[4].ends_with("drop comment \"no profile of pod x/a allowed it\""));
    // A pod reaching its own host: its egress, then Accept (the default).
    let to_host = chain(&spec, "wl-to-host");
    assert!(
        to_host
            .last()
            .is_some_and(|r| r.ends_with("accept comment \"defaultEndpointToHostAction\"")),
        "{to_host:?}"
    );
    assert!(chain(&spec, "filter-input").contains(&"jump wl-to-host".to_string()));
}

#[test]
fn tiers_then_profiles_in_felix_order() {
    let (p, spec) = program(
        "apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: security}
spec: {order: 100, defaultAction: Pass}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.quarantine}
spec: {tier: security, selector: app == 'web', namespaceSelector: team == 'shop', ingress: [{action: Pass}], egress: [{action: Pass}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: ops}}}], ports: [{port: http}]}]
",
    );
    let a = &p.workloads[0];
    let ingress: Vec<(&str, Vec<&str>)> = a
        .ingress
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                t.policies.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        ingress,
        [
            ("security", vec!["gnp/security.quarantine"]),
            ("default", vec!["np/x/knp.default.web"]),
        ]
    );
    assert_eq!(a.egress.len(), 1, "the Kubernetes policy is ingress only");
    assert!(p.workloads[1].ingress.is_empty(), "b is not web");

    let to_a = chain(&spec, "tw-x/a");
    let pos = |needle: &str| {
        to_a.iter()
            .position(|r| r.contains(needle))
            .unwrap_or_else(|| panic!("{needle} not in {to_a:?}"))
    };
    assert!(pos("jump pi-gnp/security.quarantine") < pos("jump pi-np/x/knp.default.web"));
    assert!(pos("jump pi-np/x/knp.default.web") < pos("end of tier default"));
    assert!(pos("end of tier default") < pos("profile kns.x"));
    assert!(
        !to_a.iter().any(|r| r.contains("end of tier security")),
        "a Pass tier has no end-of-tier drop"
    );
    // The peer set holds pods of every node in namespaces labelled team=ops. The named port
    // has no destination selector, so (as in Calico) its set holds every pod's `http` port;
    // the rule only ever sees packets to a.
    let set = p
        .sets
        .values()
        .find(|s| s.selector.contains("pcns.team == \"ops\""))
        .expect("peer set");
    assert_eq!(
        set.v4.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        ["10.2.0.2/32"]
    );
    let named = p.named_port_sets.values().next().expect("named-port set");
    let v4: Vec<String> = named
        .v4
        .iter()
        .map(|(ip, proto, port)| format!("{ip}/{proto}/{port}"))
        .collect();
    assert_eq!(v4, ["10.1.0.2/6/8080", "10.2.0.2/6/9090"]);
}

#[test]
fn a_missing_profile_allows_nothing_and_settings_apply() {
    let mut res = resources("");
    res.profiles.remove("kns.x");
    let p = program_with(
        &res,
        PolicySettings {
            workload_prefixes: vec!["veth".into(), "cali".into()],
            endpoint_to_host: EndpointToHostAction::Drop,
            ..PolicySettings::default()
        },
    );
    let spec = render(&p);
    let to_a = chain(&spec, "tw-x/a");
    assert!(
        !to_a.iter().any(|r| r.contains("comment \"profile ")),
        "{to_a:?}"
    );
    assert_eq!(
        p.workloads[1].interface.as_deref(),
        Some("vethb"),
        "vethb now has a workload prefix"
    );
    assert!(
        chain(&spec, "filter-forward")
            .contains(&"iifname { \"veth*\", \"cali*\" } jump wl-from-dispatch".to_string())
    );
    assert!(
        chain(&spec, "wl-to-host")
            .last()
            .is_some_and(|r| r.contains(" drop comment"))
    );

    // Two local pods claiming one address: the first by namespace and name keeps it.
    let mut res = resources("");
    res.workload_endpoints[1].ips = res.workload_endpoints[0].ips.clone();
    let spec = render(&program_with(&res, PolicySettings::default()));
    assert_eq!(spec.maps["wl-from-addr4"].elements["10.1.0.2"], "fw-x/a");
}

#[test]
fn no_local_pod_and_no_host_endpoint_means_no_table() {
    let res = resources("");
    let p = compile(&PolicyInputs {
        node: "n3",
        resources: Some(&res),
        ..Default::default()
    });
    assert!(p.is_empty());
    assert!(render(&p).chains.is_empty());
}

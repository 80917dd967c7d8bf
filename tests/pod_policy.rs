//! Tier 1: the pod part of the node's program and table (`policy::program`, `policy::render`):
//! which pods get chains, in which order tiers and profiles run, how packets reach a pod's
//! chains (by interface, by address), and the selector sets pods feed.

use wiremesh_core::dataplane::filter::{NftOp, NftState, RuleUpdate, plan};
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

    // The agent's --pod-policy=false: no pod chains; remote pods still feed selector sets.
    let res = resources("");
    let p = program_with(
        &res,
        PolicySettings {
            pods: false,
            ..PolicySettings::default()
        },
    );
    assert!(p.workloads.is_empty() && p.is_empty());
    let set = wiremesh_core::policy::program::selector_members(
        &wiremesh_core::selector::Selector::parse("app == 'web'").expect("selector"),
        &res,
    );
    assert_eq!(set.v4.len(), 2, "a and c, of both nodes: {set:?}");
}

/// The kernel state right after `spec` was written whole.
fn written(spec: &FilterSpec) -> NftState {
    let mut state = NftState::default();
    state.apply_ops(&[NftOp::ReplaceTable(Box::new(spec.clone()))]);
    state
}

/// Plans `to` from the state after `from`, applies it, and checks nothing is left to do; returns
/// the rule update (there must be exactly one, and no table replacement).
fn update_between(from: &FilterSpec, to: &FilterSpec) -> RuleUpdate {
    let mut state = written(from);
    let ops = plan(to, &state);
    assert!(
        !ops.iter().any(|o| matches!(o, NftOp::ReplaceTable(_))),
        "{ops:?}"
    );
    state.apply_ops(&ops);
    assert!(plan(to, &state).is_empty(), "not converged");
    let updates: Vec<&RuleUpdate> = ops
        .iter()
        .filter_map(|o| match o {
            NftOp::UpdateRules(u) => Some(u.as_ref()),
            _ => None,
        })
        .collect();
    assert_eq!(updates.len(), 1, "{ops:?}");
    updates[0].clone()
}

fn names(chains: &[wiremesh_core::policy::render::ChainSpec]) -> Vec<&str> {
    chains.iter().map(|c| c.name.as_str()).collect()
}

const POD_C: &str = "apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {name: n1-k8s-c-eth0, namespace: x, labels: {app: web}}
spec: {node: n1, pod: c, endpoint: eth0, interfaceName: cali0cc, ipNetworks: [10.1.0.9/32], profiles: [kns.x]}
---
";

const WEB_POLICY: &str = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  selector: app == 'web'
  ingress: [{action: Allow, source: {selector: app == 'db'}, protocol: TCP, destination: {ports: [80]}}]
---
";

#[test]
fn a_pod_start_or_stop_touches_only_its_chains_map_entries_and_set_elements() {
    let (_, before) = program(WEB_POLICY);
    let (_, after) = program(&format!("{WEB_POLICY}{POD_C}"));
    let u = update_between(&before, &after);
    assert_eq!(names(&u.add_chains), ["fw-x/c", "tw-x/c"], "{u}");
    assert_eq!(names(&u.write_chains), ["fw-x/c", "tw-x/c"], "{u}");
    let keys: Vec<String> = u
        .map_adds
        .iter()
        .flat_map(|(map, e)| e.iter().map(move |(k, v)| format!("{map} {k} {v}")))
        .collect();
    assert_eq!(
        keys,
        [
            "wl-from-addr4 10.1.0.9 fw-x/c",
            "wl-from-iface \"cali0cc\" fw-x/c",
            "wl-to-addr4 10.1.0.9 tw-x/c",
            "wl-to-iface \"cali0cc\" tw-x/c"
        ]
    );
    assert!(u.delete_chains.is_empty() && u.map_deletes.is_empty() && u.add_sets.is_empty());

    // And back: its chains and map entries go, nothing else is written.
    let u = update_between(&after, &before);
    assert_eq!(u.delete_chains, ["fw-x/c", "tw-x/c"], "{u}");
    assert!(u.write_chains.is_empty() && u.add_chains.is_empty(), "{u}");
    assert_eq!(u.map_deletes.len(), 4, "{u}");
}

#[test]
fn a_policy_edit_rewrites_only_that_policys_chain() {
    let (_, before) = program(WEB_POLICY);
    let (_, after) = program(&WEB_POLICY.replace("ports: [80]", "ports: [8080]"));
    let u = update_between(&before, &after);
    assert_eq!(names(&u.write_chains), ["pi-np/x/web"], "{u}");
    assert!(u.add_chains.is_empty() && u.delete_chains.is_empty(), "{u}");
    assert!(u.map_adds.is_empty() && u.map_deletes.is_empty(), "{u}");

    // A label change that moves a pod under the policy rewrites that pod's chain only (and
    // the set element of its address, which is an element change, not a rule change).
    let relabelled = format!("{WEB_POLICY}{POD_C}");
    let (_, with_c) = program(&relabelled);
    let (_, c_as_db) = program(&relabelled.replace(
        "name: n1-k8s-c-eth0, namespace: x, labels: {app: web}",
        "name: n1-k8s-c-eth0, namespace: x, labels: {app: db}",
    ));
    let mut state = written(&with_c);
    let ops = plan(&c_as_db, &state);
    let NftOp::UpdateRules(u) = &ops[0] else {
        panic!("{ops:?}");
    };
    assert_eq!(names(&u.write_chains), ["tw-x/c"], "{u}");
    assert!(
        ops[1..]
            .iter()
            .all(|o| matches!(o, NftOp::AddElements { .. } | NftOp::DeleteElements { .. })),
        "{ops:?}"
    );
    state.apply_ops(&ops);
    assert!(plan(&c_as_db, &state).is_empty());
}

#[test]
fn without_knowing_the_kernels_rules_the_table_is_replaced() {
    let (_, before) = program(WEB_POLICY);
    let (_, after) = program(&format!("{WEB_POLICY}{POD_C}"));
    let mut state = written(&before);
    state.rules = None; // an agent restarted: the marker names rules it never wrote
    assert!(matches!(
        plan(&after, &state).as_slice(),
        [NftOp::ReplaceTable(_)]
    ));
    // A chain flushed behind our back (seen by a full listing) is not patched around.
    let mut state = written(&before);
    state.rule_counts = Some(Default::default());
    assert!(matches!(
        plan(&after, &state).as_slice(),
        [NftOp::ReplaceTable(_)]
    ));
}

/// Pods and policies that come and go in any combination.
fn variant(mask: u16) -> String {
    let mut text = String::new();
    for (bit, pod, node, ip, labels) in [
        (0, "c", "n1", "10.1.0.9", "app: web"),
        (1, "d", "n1", "10.1.0.10", "app: db"),
        (2, "e", "n2", "10.2.0.10", "app: db"),
        (3, "f", "n1", "10.1.0.11", "app: cache"),
    ] {
        if mask & (1 << bit) != 0 {
            text.push_str(&format!(
                "apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {{name: {node}-k8s-{pod}-eth0, namespace: x, labels: {{{labels}}}}}
spec: {{node: {node}, pod: {pod}, endpoint: eth0, interfaceName: cali0{pod}, ipNetworks: [{ip}/32], profiles: [kns.x]}}
---
"
            ));
        }
    }
    if mask & (1 << 4) != 0 {
        text.push_str(WEB_POLICY);
    }
    if mask & (1 << 5) != 0 {
        text.push_str(&WEB_POLICY.replace("ports: [80]", "ports: [8080]"));
    }
    if mask & (1 << 6) != 0 {
        text.push_str(
            "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: x}
spec: {podSelector: {matchLabels: {app: db}}, policyTypes: [Ingress, Egress], egress: [{to: [{podSelector: {}}]}]}
---
",
        );
    }
    text
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// From the table of any combination to that of any other: no replacement, and afterwards
    /// the kernel holds exactly the new rule part and sets.
    #[test]
    fn updates_converge_between_any_two_tables(a in 0u16..128, b in 0u16..128) {
        let (_, from) = program(&variant(a));
        let (_, to) = program(&variant(b));
        let mut state = written(&from);
        let ops = plan(&to, &state);
        proptest::prop_assert!(!ops.iter().any(|o| matches!(o, NftOp::ReplaceTable(_))));
        state.apply_ops(&ops);
        proptest::prop_assert!(plan(&to, &state).is_empty());
        let expected = written(&to);
        proptest::prop_assert_eq!(&state.sets, &expected.sets);
        proptest::prop_assert_eq!(&state.rules_hash, &expected.rules_hash);
        proptest::prop_assert_eq!(
            state.rules.as_ref().map(|r| r.spec.chains.clone()),
            Some(to.chains.clone())
        );
    }
}

#[test]
fn explain_follows_a_connection_from_pod_to_pod() {
    use wiremesh_core::policy::explain::{Outcome, Reason, explain_pods};
    use wiremesh_core::policy::model::Protocol;
    // x/a (web, n1) -> y/c (web, n2): no policy selects c; a is open too: both profiles allow.
    let res = resources(WEB_POLICY);
    let settings = PolicySettings::default();
    let stages =
        explain_pods(&res, &settings, "x/b", "x/a", Protocol::Tcp, Some(80)).expect("explain");
    assert_eq!(stages.len(), 2);
    assert_eq!(stages[0].node, "n1");
    assert_eq!(stages[0].verdict.reason, Reason::Profile("kns.x".into()));
    // a's ingress: the web policy allows db (b is app=db) on 80.
    let ingress = &stages[1].verdict;
    assert_eq!(ingress.outcome, Outcome::Accept);
    assert_eq!(
        (
            ingress.tier.as_deref(),
            ingress.policy.as_deref(),
            ingress.rule
        ),
        (Some("default"), Some("np/x/web"), Some(0))
    );
    // On another port the default tier's end drops it, on a's node.
    let stages =
        explain_pods(&res, &settings, "x/b", "x/a", Protocol::Tcp, Some(81)).expect("explain");
    let last = stages.last().expect("stage");
    assert_eq!(last.verdict.outcome, Outcome::Drop);
    assert_eq!(last.verdict.reason, Reason::EndOfTier);
    assert!(last.to_string().contains("ingress of pod x/a"), "{last}");
    assert!(explain_pods(&res, &settings, "x/zz", "x/a", Protocol::Tcp, None).is_err());
}

#[test]
fn unused_knows_pods() {
    use wiremesh_core::policy::analysis::unused;
    let res = resources(&format!(
        "{WEB_POLICY}apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: nobody, namespace: x}}
spec: {{selector: app == 'nothing', ingress: [{{action: Allow}}]}}
"
    ));
    let findings: Vec<String> = unused(&res).iter().map(ToString::to_string).collect();
    assert!(
        !findings.iter().any(|f| f.starts_with("np/x/web:")),
        "the web policy selects pods: {findings:?}"
    );
    assert!(
        findings
            .iter()
            .any(|f| f == "np/x/nobody: it can select pods only, and selects none"),
        "{findings:?}"
    );
}

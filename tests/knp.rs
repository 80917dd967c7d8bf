//! Tier 1: Kubernetes NetworkPolicy -> Calico NetworkPolicy, the cases of Calico's own
//! conversion tests (libcalico-go `lib/backend/k8s/conversion/conversion_test.go`: "Test
//! NetworkPolicy conversion", "... (k8s <= 1.7, no policyTypes)" and "Test selector
//! conversion"), each as a Kubernetes object in and the Calico spec out, plus the places where
//! wiremesh reports bad input Calico lets through.

use k8s_openapi::api::networking::v1::NetworkPolicy as KubernetesNetworkPolicy;
use serde_json::{Value, json};
use wiremesh_core::wire::NetworkPolicySpec;
use wiremesh_core::wire::knp::{Converted, convert};

const ORCH: &str = "projectcalico.org/orchestrator == 'k8s'";

/// Converts a `spec` (YAML) of policy `test.policy` in namespace `default`.
fn conv(spec_yaml: &str) -> Converted {
    let spec: Value = serde_norway::from_str(spec_yaml).expect("spec YAML");
    let np: KubernetesNetworkPolicy = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "test.policy", "namespace": "default"},
        "spec": spec,
    }))
    .expect("a Kubernetes NetworkPolicy");
    convert(&np)
}

/// The converted spec must equal `expected` (YAML of a Calico NetworkPolicy spec, where
/// `ORCH` stands for the orchestrator term); no problems.
fn check(spec_yaml: &str, expected_yaml: &str) -> Converted {
    let c = conv(spec_yaml);
    assert!(c.problems.is_empty(), "{:?}", c.problems);
    let expected: NetworkPolicySpec =
        serde_norway::from_str(&expected_yaml.replace("ORCH", ORCH)).expect("expected YAML");
    assert_eq!(
        c.spec,
        expected,
        "\n{}",
        serde_json::to_string_pretty(&c.spec).unwrap_or_default()
    );
    assert_eq!(
        (c.name.as_str(), c.namespace.as_str()),
        ("knp.default.test.policy", "default")
    );
    c
}

const HEAD: &str = "tier: default\norder: 1000\n";

fn expected(rest: &str) -> String {
    format!("{HEAD}{rest}")
}

#[test]
fn t1_basic() {
    check(
        "podSelector: {matchLabels: {label: value, label2: value2}}
policyTypes: [Ingress]
ingress: [{ports: [{port: 80}, {port: foo}], from: [{podSelector: {matchLabels: {k: v, k2: v2}}}]}]",
        &expected(
            "selector: \"ORCH && label == 'value' && label2 == 'value2'\"
types: [Ingress]
ingress:
- action: Allow
  protocol: TCP
  source: {selector: \"ORCH && k == 'v' && k2 == 'v2'\"}
  destination: {ports: [80, foo]}",
        ),
    );
}

#[test]
fn t2_no_ports_means_no_protocol() {
    check(
        "podSelector: {matchLabels: {label: value, label2: value2}}
policyTypes: [Ingress]
ingress: [{from: [{podSelector: {matchLabels: {k: v, k2: v2}}}]}]",
        &expected(
            "selector: \"ORCH && label == 'value' && label2 == 'value2'\"
types: [Ingress]
ingress:
- action: Allow
  source: {selector: \"ORCH && k == 'v' && k2 == 'v2'\"}",
        ),
    );
}

#[test]
fn t3_a_blank_port_is_every_tcp_port() {
    check(
        "podSelector: {matchLabels: {label: value, label2: value2}}
policyTypes: [Ingress]
ingress: [{ports: [{port: 80}, {}], from: [{podSelector: {matchLabels: {k: v, k2: v2}}}]}]",
        &expected(
            "selector: \"ORCH && label == 'value' && label2 == 'value2'\"
types: [Ingress]
ingress:
- action: Allow
  protocol: TCP
  source: {selector: \"ORCH && k == 'v' && k2 == 'v2'\"}",
        ),
    );
}

#[test]
fn t4_egress_with_blank_ports() {
    check(
        "podSelector: {matchLabels: {label: value, label2: value2}}
policyTypes: [Egress]
egress:
- {ports: [{}, {port: 80}], to: [{podSelector: {matchLabels: {k: v, k2: v2}}}]}
- {ports: [{port: 53, protocol: UDP}]}",
        &expected(
            "selector: \"ORCH && label == 'value' && label2 == 'value2'\"
types: [Egress]
egress:
- action: Allow
  protocol: TCP
  destination: {selector: \"ORCH && k == 'v' && k2 == 'v2'\"}
- action: Allow
  protocol: UDP
  destination: {ports: [53]}",
        ),
    );
}

#[test]
fn t5_a_rule_with_an_invalid_port_is_dropped_and_reported() {
    let c = conv(
        "podSelector: {matchLabels: {label: value, label2: value2}}
policyTypes: [Ingress]
ingress:
- {ports: [{port: 80}, {port: foo}], from: [{podSelector: {matchLabels: {k: v, k2: v2}}}]}
- {ports: [{port: 80}, {port: '-50:-1'}], from: [{podSelector: {matchLabels: {k: v, k2: v2}}}]}",
    );
    assert_eq!(c.spec.ingress.len(), 1, "the valid rule stays");
    assert_eq!(c.problems.len(), 1);
    assert_eq!(c.problems[0].field, "spec.ingress[1]");
    assert!(c.problems[0].reason.contains("-50:-1"), "{}", c.problems[0]);

    // Egress rules are converted (and their bad ones reported) even when the types leave
    // egress out, as Calico does.
    let c = conv(
        "podSelector: {matchLabels: {label: value, label2: value2}}
policyTypes: [Ingress]
egress:
- {ports: [{port: 80}, {port: foo}], to: [{podSelector: {matchLabels: {k: v, k2: v2}}}]}
- {ports: [{port: 80}, {port: '-50:-1'}], to: [{podSelector: {matchLabels: {k: v, k2: v2}}}]}
- {ports: [{port: 80}, {port: '-22:-3'}], to: [{podSelector: {matchLabels: {k: v, k2: v2}}}]}",
    );
    let fields: Vec<&str> = c.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(fields, ["spec.egress[1]", "spec.egress[2]"]);
    let expected: NetworkPolicySpec = serde_norway::from_str(
        &expected(
            "selector: \"ORCH && label == 'value' && label2 == 'value2'\"
types: [Ingress]
egress:
- action: Allow
  protocol: TCP
  destination: {ports: [80, foo], selector: \"ORCH && k == 'v' && k2 == 'v2'\"}",
        )
        .replace("ORCH", ORCH),
    )
    .expect("yaml");
    assert_eq!(c.spec, expected);
}

#[test]
fn t6_t7_t11_policies_without_rules() {
    check(
        "podSelector: {matchLabels: {label: value}}\npolicyTypes: [Ingress]",
        &expected("selector: \"ORCH && label == 'value'\"\ntypes: [Ingress]"),
    );
    // Default-deny egress.
    check(
        "podSelector: {}\npolicyTypes: [Egress]",
        &expected("selector: \"ORCH\"\ntypes: [Egress]"),
    );
    check(
        "podSelector: {}\npolicyTypes: [Ingress]",
        &expected("selector: \"ORCH\"\ntypes: [Ingress]"),
    );
}

#[test]
fn t8_t10_rules_are_per_protocol_then_per_peer() {
    check(
        "podSelector: {matchLabels: {label: value}}
policyTypes: [Ingress]
ingress: [{ports: [{}], from: [{podSelector: {matchLabels: {k: v}}}, {podSelector: {matchLabels: {k2: v2}}}]}]",
        &expected(
            "selector: \"ORCH && label == 'value'\"
types: [Ingress]
ingress:
- {action: Allow, protocol: TCP, source: {selector: \"ORCH && k == 'v'\"}}
- {action: Allow, protocol: TCP, source: {selector: \"ORCH && k2 == 'v2'\"}}",
        ),
    );
    check(
        "podSelector: {matchLabels: {label: value}}
policyTypes: [Ingress]
ingress:
- ports: [{port: 90, protocol: UDP}, {port: 80, protocol: TCP}]
  from: [{podSelector: {matchLabels: {k: v}}}, {podSelector: {matchLabels: {k2: v2}}}]",
        &expected(
            "selector: \"ORCH && label == 'value'\"
types: [Ingress]
ingress:
- {action: Allow, protocol: TCP, source: {selector: \"ORCH && k == 'v'\"}, destination: {ports: [80]}}
- {action: Allow, protocol: TCP, source: {selector: \"ORCH && k2 == 'v2'\"}, destination: {ports: [80]}}
- {action: Allow, protocol: UDP, source: {selector: \"ORCH && k == 'v'\"}, destination: {ports: [90]}}
- {action: Allow, protocol: UDP, source: {selector: \"ORCH && k2 == 'v2'\"}, destination: {ports: [90]}}",
        ),
    );
}

#[test]
fn t9_t16_match_expressions() {
    check(
        "podSelector: {matchLabels: {label: value, label2: value2}}
policyTypes: [Ingress]
ingress:
- ports: [{port: 80}, {port: foo}]
  from: [{podSelector: {matchExpressions: [{key: toast, operator: DoesNotExist}]}}]",
        &expected(
            "selector: \"ORCH && label == 'value' && label2 == 'value2'\"
types: [Ingress]
ingress:
- {action: Allow, protocol: TCP, source: {selector: \"ORCH && ! has(toast)\"}, destination: {ports: [80, foo]}}",
        ),
    );
    check(
        "podSelector: {matchExpressions: [{key: k, operator: In, values: [v1, v2]}]}
policyTypes: [Ingress]",
        &expected("selector: \"ORCH && k in { 'v1', 'v2' }\"\ntypes: [Ingress]"),
    );
}

#[test]
fn t12_to_t15_namespace_selectors() {
    let c = check(
        "podSelector: {matchLabels: {label: value}}
policyTypes: [Ingress]
ingress: [{from: [{namespaceSelector: {matchLabels: {namespaceRole: dev, namespaceFoo: bar}}}]}]",
        &expected(
            "selector: \"ORCH && label == 'value'\"
types: [Ingress]
ingress:
- action: Allow
  source: {selector: \"ORCH\", namespaceSelector: \"namespaceFoo == 'bar' && namespaceRole == 'dev'\"}",
        ),
    );
    assert_eq!(c.spec.ingress.len(), 1);
    // A nil namespace selector: the policy's own namespace.
    check(
        "podSelector: {}\npolicyTypes: [Ingress]\ningress: [{from: [{podSelector: {}}]}]",
        &expected(
            "selector: \"ORCH\"\ntypes: [Ingress]\ningress:\n- {action: Allow, source: {selector: \"ORCH\"}}",
        ),
    );
    // An empty one: every namespace.
    check(
        "podSelector: {}\npolicyTypes: [Ingress]\ningress: [{from: [{namespaceSelector: {matchLabels: {}}}]}]",
        &expected(
            "selector: \"ORCH\"\ntypes: [Ingress]\ningress:\n- {action: Allow, source: {selector: \"ORCH\", namespaceSelector: \"all()\"}}",
        ),
    );
    // Both in one peer: both must match.
    check(
        "podSelector: {}
policyTypes: [Ingress]
ingress:
- from: [{namespaceSelector: {matchLabels: {namespaceRole: dev, namespaceFoo: bar}}, podSelector: {matchLabels: {podA: B, podC: D}}}]",
        &expected(
            "selector: \"ORCH\"
types: [Ingress]
ingress:
- action: Allow
  source:
    selector: \"ORCH && podA == 'B' && podC == 'D'\"
    namespaceSelector: \"namespaceFoo == 'bar' && namespaceRole == 'dev'\"",
        ),
    );
}

#[test]
fn t17_to_t20_ports_and_port_ranges() {
    check(
        "podSelector: {}\npolicyTypes: [Ingress]\ningress: [{ports: [{protocol: TCP, port: 80}]}]",
        &expected(
            "selector: \"ORCH\"\ntypes: [Ingress]\ningress:\n- {action: Allow, protocol: TCP, destination: {ports: [80]}}",
        ),
    );
    check(
        "podSelector: {}\npolicyTypes: [Ingress]\ningress: [{ports: [{protocol: TCP, port: 32000, endPort: 32768}]}]",
        &expected(
            "selector: \"ORCH\"\ntypes: [Ingress]\ningress:\n- {action: Allow, protocol: TCP, destination: {ports: ['32000:32768']}}",
        ),
    );
    check(
        "podSelector: {}\npolicyTypes: [Egress]\negress: [{ports: [{protocol: TCP, port: 80}]}]",
        &expected(
            "selector: \"ORCH\"\ntypes: [Egress]\negress:\n- {action: Allow, protocol: TCP, destination: {ports: [80]}}",
        ),
    );
    check(
        "podSelector: {}\npolicyTypes: [Egress]\negress: [{ports: [{protocol: TCP, port: 32000, endPort: 32768}]}]",
        &expected(
            "selector: \"ORCH\"\ntypes: [Egress]\negress:\n- {action: Allow, protocol: TCP, destination: {ports: ['32000:32768']}}",
        ),
    );
}

#[test]
fn t21_to_t27_ip_blocks() {
    check(
        "podSelector: {}
policyTypes: [Ingress]
ingress: [{from: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.3.0/24, 192.168.4.0/24]}}]}]",
        &expected(
            "selector: \"ORCH\"
types: [Ingress]
ingress:
- {action: Allow, source: {nets: [192.168.0.0/16], notNets: [192.168.3.0/24, 192.168.4.0/24]}}",
        ),
    );
    check(
        "podSelector: {}
policyTypes: [Egress]
egress:
- ports: [{port: 90, protocol: UDP}, {port: 80, protocol: TCP}]
  to: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.3.0/24, 192.168.4.0/24, 192.168.5.0/24]}}]",
        &expected(
            "selector: \"ORCH\"
types: [Egress]
egress:
- action: Allow
  protocol: TCP
  destination: {ports: [80], nets: [192.168.0.0/16], notNets: [192.168.3.0/24, 192.168.4.0/24, 192.168.5.0/24]}
- action: Allow
  protocol: UDP
  destination: {ports: [90], nets: [192.168.0.0/16], notNets: [192.168.3.0/24, 192.168.4.0/24, 192.168.5.0/24]}",
        ),
    );
    // No except; a CIDR with host bits is its network (Go's net.ParseCIDR).
    check(
        "podSelector: {}\npolicyTypes: [Egress]\negress: [{to: [{ipBlock: {cidr: 10.1.2.3/16}}]}]",
        &expected(
            "selector: \"ORCH\"\ntypes: [Egress]\negress:\n- {action: Allow, destination: {nets: [10.1.0.0/16]}}",
        ),
    );
    // Both directions; the types always come out Ingress first.
    check(
        "podSelector: {}
policyTypes: [Egress, Ingress]
ingress: [{from: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.3.0/24, 192.168.4.0/24]}}]}]
egress: [{to: [{ipBlock: {cidr: 10.10.0.0/16, except: [192.168.13.0/24, 192.168.14.0/24, 192.168.15.0/24]}}]}]",
        &expected(
            "selector: \"ORCH\"
types: [Ingress, Egress]
ingress:
- {action: Allow, source: {nets: [192.168.0.0/16], notNets: [192.168.3.0/24, 192.168.4.0/24]}}
egress:
- {action: Allow, destination: {nets: [10.10.0.0/16], notNets: [192.168.13.0/24, 192.168.14.0/24, 192.168.15.0/24]}}",
        ),
    );
}

/// "k8s <= 1.7, no policyTypes": without policyTypes a policy is Ingress only.
#[test]
fn l1_to_l7_without_policy_types_a_policy_is_ingress_only() {
    check(
        "podSelector: {matchLabels: {label: value, label2: value2}}
ingress: [{ports: [{port: 80}], from: [{podSelector: {matchLabels: {k: v, k2: v2}}}]}]",
        &expected(
            "selector: \"ORCH && label == 'value' && label2 == 'value2'\"
types: [Ingress]
ingress:
- {action: Allow, protocol: TCP, source: {selector: \"ORCH && k == 'v' && k2 == 'v2'\"}, destination: {ports: [80]}}",
        ),
    );
    check(
        "podSelector: {matchLabels: {label: value}}",
        &expected("selector: \"ORCH && label == 'value'\"\ntypes: [Ingress]"),
    );
    check(
        "podSelector: {}",
        &expected("selector: \"ORCH\"\ntypes: [Ingress]"),
    );
    check(
        "podSelector: {matchExpressions: [{key: k, operator: In, values: [v1, v2]}]}",
        &expected("selector: \"ORCH && k in { 'v1', 'v2' }\"\ntypes: [Ingress]"),
    );
    // Egress rules without policyTypes are kept but not in force (types say Ingress).
    let c = conv("podSelector: {}\negress: [{ports: [{port: 53, protocol: UDP}]}]");
    assert_eq!(c.spec.types.len(), 1);
    assert_eq!(c.spec.egress.len(), 1);
}

/// "Test selector conversion": every operator, empty and absent selectors.
#[test]
fn s1_to_s9_selectors() {
    let policy_selector = |pod_selector: &str| {
        conv(&format!(
            "podSelector: {pod_selector}\npolicyTypes: [Ingress]"
        ))
        .spec
        .selector
        .unwrap_or_default()
    };
    let namespace_selector = |ns_selector: &str| {
        let c = conv(&format!(
            "podSelector: {{}}\ningress: [{{from: [{{namespaceSelector: {ns_selector}}}]}}]"
        ));
        c.spec.ingress[0]
            .source
            .as_ref()
            .and_then(|s| s.namespace_selector.clone())
            .unwrap_or_default()
    };
    assert_eq!(policy_selector("{}"), ORCH);
    assert_eq!(namespace_selector("{}"), "all()");
    let toast = |op: &str, values: &str| {
        format!("{{matchExpressions: [{{key: toast, operator: {op}{values}}}]}}")
    };
    assert_eq!(
        namespace_selector(&toast("DoesNotExist", "")),
        "! has(toast)"
    );
    assert_eq!(namespace_selector(&toast("Exists", "")), "has(toast)");
    assert_eq!(
        namespace_selector(&toast("In", ", values: [butter, jam]")),
        "toast in { 'butter', 'jam' }"
    );
    assert_eq!(
        namespace_selector(&toast("NotIn", ", values: [marmite, milk]")),
        "toast not in { 'marmite', 'milk' }"
    );
    assert_eq!(
        policy_selector(&toast("DoesNotExist", "")),
        format!("{ORCH} && ! has(toast)")
    );
    // Absent pod selector: every pod; absent namespace selector: none written.
    let c = conv("policyTypes: [Ingress]");
    assert_eq!(c.spec.selector.as_deref(), Some(ORCH));
    let c = conv("podSelector: {}\ningress: [{from: [{podSelector: {}}]}]");
    assert_eq!(
        c.spec.ingress[0]
            .source
            .as_ref()
            .and_then(|s| s.namespace_selector.clone()),
        None
    );
}

/// Ports of one protocol merge into ranges (Calico's SimplifyPorts), named ports first; every
/// port of a protocol absorbs its list; SCTP is a protocol like the others.
#[test]
fn ports_merge_per_protocol() {
    check(
        "podSelector: {}
ingress: [{ports: [{port: 82}, {port: 80}, {port: 81}, {port: 9090}, {port: http}, {port: 80}, {protocol: SCTP, port: 7}, {protocol: udp}]}]",
        &expected(
            "selector: \"ORCH\"
types: [Ingress]
ingress:
- {action: Allow, protocol: SCTP, destination: {ports: [7]}}
- {action: Allow, protocol: TCP, destination: {ports: [http, '80:82', 9090]}}
- {action: Allow, protocol: UDP}",
        ),
    );
}

/// Where Calico lets bad input through (the API server would have refused it, but etcd does
/// not), wiremesh drops the rule and says so: never a wider rule.
#[test]
fn bad_cidrs_and_operators_drop_the_rule_instead_of_widening_it() {
    // Calico turns this peer into one that matches everything.
    let c = conv(
        "podSelector: {}
ingress:
- from: [{ipBlock: {cidr: 192.168.0.0/55}}]
- from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/99]}}]
- from: [{podSelector: {matchExpressions: [{key: a, operator: Matches}]}}]
- ports: [{port: 80, endPort: 79}]
- ports: [{port: 0}]
- ports: [{port: http, endPort: 90}]
- from: [{podSelector: {}}]",
    );
    let fields: Vec<&str> = c.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.ingress[0]",
            "spec.ingress[1]",
            "spec.ingress[2]",
            "spec.ingress[3]",
            "spec.ingress[4]",
            "spec.ingress[5]"
        ]
    );
    assert_eq!(c.spec.ingress.len(), 1, "only the valid rule");
    assert!(c.problems[0].to_string().contains("is not a CIDR"));
    assert!(c.problems[2].to_string().contains("\"Matches\""));

    // In the policy's own pod selector the bad term is left out: the policy selects more pods,
    // i.e. isolates more (Calico's behaviour), and it is reported.
    let c = conv(
        "podSelector: {matchLabels: {app: db}, matchExpressions: [{key: a, operator: Matches}]}",
    );
    assert_eq!(c.spec.selector, Some(format!("{ORCH} && app == 'db'")));
    assert_eq!(c.problems.len(), 1);
    assert_eq!(c.problems[0].field, "spec.podSelector");
}

/// In a manifest (`policy check`, `lab apply`) a Kubernetes NetworkPolicy is recognised by its
/// apiVersion, validated as the Calico policy it converts to, and stored in etcd under our key.
#[test]
fn a_manifest_kubernetes_network_policy_is_enforced_as_its_calico_policy() {
    use wiremesh_core::manifest::Manifest;
    use wiremesh_core::policy::model::PolicyKind;
    use wiremesh_core::wire::Kind;

    let m = Manifest::parse(
        "np.yaml",
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: calico-one, namespace: shop}
spec: {selector: all()}
",
    );
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    assert_eq!(m.objects[0].kind, Some(Kind::KubernetesNetworkPolicy));
    assert_eq!(m.objects[0].key, "shop/allow-web");
    assert_eq!(m.objects[1].kind, Some(Kind::NetworkPolicy));
    let (resources, problems) = m.validate();
    assert!(problems.is_empty(), "{problems:?}");
    let p = resources
        .policies
        .iter()
        .find(|p| p.name == "knp.default.allow-web")
        .expect("converted policy");
    assert_eq!(p.kind, PolicyKind::Namespaced);
    assert_eq!(p.namespace.as_deref(), Some("shop"));
    assert_eq!((p.tier.as_str(), p.order), ("default", Some(1000.0)));
    assert!(p.egress.is_none(), "ingress only");
    assert_eq!(
        wiremesh_datastore::etcd::policy_key(Kind::KubernetesNetworkPolicy, "shop/allow-web"),
        "/calico/resources/v3/projectcalico.org/kubernetesnetworkpolicies/shop/allow-web"
    );
    assert_eq!(
        wiremesh_datastore::etcd::decode_policy_key(
            "/calico/resources/v3/projectcalico.org/kubernetesnetworkpolicies/shop/allow-web"
        ),
        Some((Kind::KubernetesNetworkPolicy, "shop/allow-web".to_string()))
    );
}

/// Bad input in a Kubernetes NetworkPolicy is reported with the field, positioned in the file,
/// and the object is not enforced (as any invalid object; its last valid version stays).
#[test]
fn a_bad_kubernetes_network_policy_is_reported_with_its_field() {
    use wiremesh_core::manifest::Manifest;

    let m = Manifest::parse(
        "np.yaml",
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: shop}
spec:
  podSelector: {}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/99}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: typo, namespace: shop}
spec:
  podSelector: {}
  ingres: []
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web}
",
    );
    assert_eq!(m.errors.len(), 1, "{:?}", m.errors);
    assert!(
        m.errors[0].contains("kind \"Ingress\" of networking.k8s.io/v1"),
        "{}",
        m.errors[0]
    );
    let (resources, problems) = m.validate();
    assert!(resources.policies.is_empty());
    let problems: Vec<&String> = problems.iter().skip(1).collect();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0]
            .starts_with("np.yaml:7: KubernetesNetworkPolicy \"shop/bad\": spec.ingress[0]:"),
        "{}",
        problems[0]
    );
    assert!(problems[0].contains("is not a CIDR"));
    assert!(
        problems[1].contains("spec.ingres: unknown field"),
        "{}",
        problems[1]
    );
}

//! Tier 1: pods as Calico workload endpoints, and the namespace and service-account profiles
//! (`wiremesh_core::policy::workload`), checked against Calico's own values where they exist.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use serde_json::{Value, json};
use wiremesh_core::policy::model::{EndpointPort, Protocol};
use wiremesh_core::policy::workload::{
    DEFAULT_INTERFACE_PREFIX, effective_labels, endpoint_name, from_pod, interface_name,
    namespace_profile, service_account_profile,
};

fn pod(value: Value) -> Pod {
    serde_json::from_value(value).expect("a Pod")
}

/// A running pod `web-0` in `shop` on `node-1`, with `changes` merged into it.
fn running(changes: Value) -> Pod {
    let mut base = json!({
        "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {
            "nodeName": "node-1",
            "serviceAccountName": "frontend",
            "containers": [{"name": "web", "ports": [
                {"name": "http", "containerPort": 8080},
                {"containerPort": 9090},
                {"name": "dns", "containerPort": 53, "protocol": "UDP"}
            ]}],
            "initContainers": [{"name": "init", "ports": [
                {"name": "probe", "containerPort": 7000, "protocol": "SCTP"}
            ]}]
        },
        "status": {"phase": "Running", "podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00:10:244:1::5"}]}
    });
    merge(&mut base, changes);
    pod(base)
}

fn merge(base: &mut Value, changes: Value) {
    match (base, changes) {
        (Value::Object(b), Value::Object(c)) => {
            for (k, v) in c {
                match b.get_mut(&k) {
                    Some(existing) if v.is_object() => merge(existing, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, c) => *b = c,
    }
}

#[test]
fn interface_and_endpoint_names_are_calicos() {
    // Calico's check vector (libcalico-go's interface name test).
    assert_eq!(
        interface_name(
            DEFAULT_INTERFACE_PREFIX,
            "default",
            "client-b6989bf87-2bgtc"
        ),
        "calic95a4947e07"
    );
    assert_eq!(
        interface_name("eni", "default", "client-b6989bf87-2bgtc"),
        "enic95a4947e07"
    );
    assert_eq!(
        endpoint_name("node-1", "web-0", "eth0"),
        "node--1-k8s-web--0-eth0"
    );
}

#[test]
fn a_running_pod_is_an_endpoint_with_calicos_labels_profiles_and_named_ports() {
    let (wep, problems) = from_pod(&running(json!({})), DEFAULT_INTERFACE_PREFIX);
    assert!(problems.is_empty(), "{problems:?}");
    let wep = wep.expect("an endpoint");
    assert_eq!(
        (wep.namespace.as_str(), wep.pod.as_str(), wep.node.as_str()),
        ("shop", "web-0", "node-1")
    );
    assert_eq!(wep.interface_name, interface_name("cali", "shop", "web-0"));
    let ips: Vec<String> = wep.ips.iter().map(ToString::to_string).collect();
    assert_eq!(ips, ["10.244.1.5/32", "fd00:10:244:1::5/128"]);
    assert_eq!(
        wep.labels,
        BTreeMap::from([
            ("app".to_string(), "web".to_string()),
            ("projectcalico.org/namespace".into(), "shop".into()),
            ("projectcalico.org/orchestrator".into(), "k8s".into()),
            ("projectcalico.org/serviceaccount".into(), "frontend".into()),
        ])
    );
    assert_eq!(wep.profiles, ["kns.shop", "ksa.shop.frontend"]);
    // Named ports of containers and init containers; unnamed ones are not named ports.
    let port = |name: &str, protocol, port| EndpointPort {
        name: name.into(),
        protocol,
        port,
    };
    assert_eq!(
        wep.ports,
        [
            port("http", Protocol::Tcp, 8080),
            port("dns", Protocol::Udp, 53),
            port("probe", Protocol::Sctp, 7000)
        ]
    );
}

#[test]
fn pods_calico_does_not_police_are_not_endpoints() {
    let not_endpoint = |changes: Value| from_pod(&running(changes), "cali").0.is_none();
    assert!(
        not_endpoint(json!({"spec": {"hostNetwork": true}})),
        "host network"
    );
    assert!(
        not_endpoint(json!({"spec": {"nodeName": ""}})),
        "not scheduled"
    );
    assert!(
        not_endpoint(json!({"status": {"phase": "Succeeded"}})),
        "finished"
    );
    assert!(
        not_endpoint(json!({"status": {"phase": "Failed"}})),
        "failed"
    );
    assert!(
        not_endpoint(json!({"status": {"podIP": null, "podIPs": null}})),
        "no IP yet"
    );
    // A terminating pod whose CNI gave its IP back (Calico's annotation emptied).
    assert!(not_endpoint(json!({
        "metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z",
                     "annotations": {"cni.projectcalico.org/podIP": ""}}
    })));
    // A terminating pod under another CNI keeps its IP until its phase changes.
    assert!(!not_endpoint(
        json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}})
    ));
}

#[test]
fn ips_come_from_status_else_from_cni_annotations() {
    let (wep, _) = from_pod(&running(json!({"status": {"podIPs": null}})), "cali");
    assert_eq!(wep.expect("endpoint").ips.len(), 1, "status.podIP alone");
    let (wep, _) = from_pod(
        &running(json!({
            "status": {"podIP": null, "podIPs": null},
            "metadata": {"annotations": {"cni.projectcalico.org/podIPs": "10.244.1.9/32,fd00::9/128"}}
        })),
        "cali",
    );
    let ips: Vec<String> = wep
        .expect("endpoint")
        .ips
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(ips, ["10.244.1.9/32", "fd00::9/128"]);
}

#[test]
fn a_pod_cannot_pose_as_another_namespace() {
    let (wep, _) = from_pod(
        &running(json!({"metadata": {"labels": {
            "pcns.team": "admins", "pcsa.role": "root",
            "projectcalico.org/namespace": "kube-system", "app": "web"
        }}})),
        "cali",
    );
    let labels = wep.expect("endpoint").labels;
    assert!(!labels.contains_key("pcns.team") && !labels.contains_key("pcsa.role"));
    assert_eq!(labels["projectcalico.org/namespace"], "shop");
}

#[test]
fn bad_pod_data_is_reported_and_left_out() {
    let (wep, problems) = from_pod(
        &running(json!({
            "status": {"podIPs": [{"ip": "10.244.1.5"}, {"ip": "not-an-ip"}]},
            "spec": {"containers": [{"name": "web", "ports": [
                {"name": "http", "containerPort": 8080},
                {"name": "odd", "containerPort": 99, "protocol": "ICMP"}
            ]}]}
        })),
        "cali",
    );
    let wep = wep.expect("still an endpoint");
    assert_eq!(wep.ips.len(), 1);
    assert!(wep.ports.iter().all(|p| p.name != "odd"));
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        ["status.podIPs", "spec.containers[web].ports[odd].protocol"]
    );
    assert!(
        problems[0]
            .to_string()
            .starts_with("Pod shop/web-0: status.podIPs:")
    );
}

#[test]
fn profiles_give_namespace_and_service_account_labels() {
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": {"name": "shop", "labels": {"team": "retail", "kubernetes.io/metadata.name": "shop"}}
    }))
    .expect("namespace");
    let sa: ServiceAccount = serde_json::from_value(json!({
        "metadata": {"name": "frontend", "namespace": "shop", "labels": {"role": "edge"}}
    }))
    .expect("service account");
    let kns = namespace_profile(&ns);
    assert_eq!(kns.name, "kns.shop");
    assert!(
        kns.allow_ingress && kns.allow_egress,
        "a pod no policy selects is open"
    );
    assert_eq!(kns.labels_to_apply["pcns.team"], "retail");
    assert_eq!(
        kns.labels_to_apply["pcns.kubernetes.io/metadata.name"],
        "shop"
    );
    assert_eq!(kns.labels_to_apply["pcns.projectcalico.org/name"], "shop");
    let ksa = service_account_profile(&sa);
    assert_eq!(ksa.name, "ksa.shop.frontend");
    assert!(!ksa.allow_ingress && !ksa.allow_egress);
    assert_eq!(ksa.labels_to_apply["pcsa.role"], "edge");
    assert_eq!(
        ksa.labels_to_apply["pcsa.projectcalico.org/name"],
        "frontend"
    );

    let wep = from_pod(&running(json!({})), "cali").0.expect("endpoint");
    let profiles = BTreeMap::from([(kns.name.clone(), kns), (ksa.name.clone(), ksa)]);
    let labels = effective_labels(&wep, &profiles);
    assert_eq!(labels["app"], "web");
    assert_eq!(labels["pcns.team"], "retail");
    assert_eq!(labels["pcsa.role"], "edge");
}

/// Which pods a policy applies to, from manifests (`policy which-endpoints -f`): a
/// NetworkPolicy (here a converted Kubernetes one) in its own namespace only; a
/// GlobalNetworkPolicy's namespaceSelector against the namespace's labels.
#[test]
fn policies_select_pods_as_felix_does() {
    use wiremesh_core::manifest::Manifest;
    use wiremesh_core::policy::workload::selects;

    let m = Manifest::parse(
        "pods.yaml",
        "apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: retail}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}}
spec: {nodeName: node1, containers: [{name: db}]}
status: {phase: Running, podIP: 10.244.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: other, labels: {app: db}}
spec: {nodeName: node2, containers: [{name: db}]}
status: {phase: Running, podIP: 10.244.2.6}
---
apiVersion: v1
kind: Pod
metadata: {name: batch, namespace: shop, labels: {app: db}}
spec: {nodeName: node2, containers: [{name: job}]}
status: {phase: Succeeded, podIP: 10.244.2.7}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec: {podSelector: {matchLabels: {app: db}}}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: retail-dbs}
spec: {selector: app == 'db', namespaceSelector: team == 'retail', ingress: [{action: Allow}]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: every-namespace}
spec: {selector: app == 'db', namespaceSelector: all(), ingress: [{action: Allow}]}
",
    );
    let (res, problems) = m.validate();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(
        res.workload_endpoints.len(),
        2,
        "the finished pod is no endpoint"
    );
    let selected = |policy: &str| -> Vec<String> {
        let p = res
            .policies
            .iter()
            .find(|p| p.name == policy)
            .expect("policy");
        res.workload_endpoints
            .iter()
            .filter(|w| selects(p, w, &effective_labels(w, &res.profiles)))
            .map(|w| format!("{}/{}", w.namespace, w.pod))
            .collect()
    };
    assert_eq!(selected("knp.default.db"), ["shop/db-0"]);
    assert_eq!(selected("retail-dbs"), ["shop/db-0"]);
    assert_eq!(selected("every-namespace"), ["other/db-0", "shop/db-0"]);
}

/// Calico's WorkloadEndpoint and Profile as the etcd datastore holds them (written by the CNI
/// plugin and calico-kube-controllers) give the same endpoint and profiles as Pods and
/// Namespaces do on Kubernetes.
#[test]
fn calico_workload_endpoints_and_profiles_from_etcd() {
    use wiremesh_core::manifest::Manifest;
    use wiremesh_core::policy::workload::selects;
    use wiremesh_core::wire::Kind;

    let m = Manifest::parse(
        "calico.yaml",
        "apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata:
  name: node--1-k8s-web--0-eth0
  namespace: shop
  labels: {app: web, projectcalico.org/namespace: shop, projectcalico.org/orchestrator: k8s, pcns.team: forged}
spec:
  orchestrator: k8s
  node: node-1
  pod: web-0
  endpoint: eth0
  serviceAccountName: frontend
  containerID: abc123
  interfaceName: cali0123456789a
  mac: 0e:00:00:00:00:01
  ipNetworks: [10.244.1.5/32, fd00:10:244:1::5/128]
  profiles: [kns.shop, ksa.shop.frontend]
  ports: [{name: http, protocol: TCP, port: 8080}, {name: '', port: 9090}]
---
apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {name: node--1-k8s-pending-eth0, namespace: shop}
spec: {node: node-1, pod: pending, endpoint: eth0}
---
apiVersion: projectcalico.org/v3
kind: Profile
metadata: {name: kns.shop}
spec:
  ingress: [{action: Allow}]
  egress: [{action: Allow}]
  labelsToApply: {pcns.team: retail, pcns.projectcalico.org/name: shop}
---
apiVersion: projectcalico.org/v3
kind: Profile
metadata: {name: ksa.shop.frontend}
spec:
  labelsToApply: {pcsa.role: edge, pcsa.projectcalico.org/name: frontend}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: retail-edge}
spec: {selector: app == 'web', namespaceSelector: team == 'retail', serviceAccountSelector: role == 'edge', ingress: [{action: Allow}]}
",
    );
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    assert_eq!(m.objects[0].kind, Some(Kind::WorkloadEndpoint));
    assert_eq!(m.objects[0].key, "shop/node--1-k8s-web--0-eth0");
    let (res, problems) = m.validate();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(
        res.workload_endpoints.len(),
        1,
        "the endpoint without an address is invisible"
    );
    let wep = &res.workload_endpoints[0];
    assert_eq!((wep.pod.as_str(), wep.node.as_str()), ("web-0", "node-1"));
    assert_eq!(wep.interface_name, "cali0123456789a");
    assert_eq!(wep.ips.len(), 2);
    assert_eq!(wep.ports.len(), 1, "only named ports");
    assert!(
        !wep.labels.contains_key("pcns.team"),
        "a forged namespace label is dropped"
    );
    assert_eq!(wep.labels["projectcalico.org/serviceaccount"], "frontend");
    let labels = effective_labels(wep, &res.profiles);
    assert_eq!(labels["pcns.team"], "retail");
    assert_eq!(labels["pcsa.role"], "edge");
    assert!(
        res.profiles["kns.shop"].allow_ingress && !res.profiles["ksa.shop.frontend"].allow_egress
    );
    let gnp = res
        .policies
        .iter()
        .find(|p| p.name == "retail-edge")
        .expect("policy");
    assert!(selects(gnp, wep, &labels));
    assert_eq!(
        wiremesh_datastore::etcd::decode_policy_key(
            "/calico/resources/v3/projectcalico.org/workloadendpoints/shop/node--1-k8s-web--0-eth0"
        ),
        Some((
            Kind::WorkloadEndpoint,
            "shop/node--1-k8s-web--0-eth0".to_string()
        ))
    );
    assert_eq!(
        wiremesh_datastore::etcd::decode_policy_key(
            "/calico/resources/v3/projectcalico.org/profiles/kns.shop"
        ),
        Some((Kind::Profile, "kns.shop".to_string()))
    );

    // Bad input is reported with its field; a profile with rules wiremesh does not apply yet is
    // reported as unsupported.
    let bad = Manifest::parse(
        "bad.yaml",
        "apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {name: node--1-k8s-x-eth0, namespace: shop}
spec: {node: node-1, pod: x, ipNetworks: [10.244.1.0/24]}
---
apiVersion: projectcalico.org/v3
kind: Profile
metadata: {name: custom}
spec: {ingress: [{action: Deny, protocol: TCP}]}
",
    );
    let (res, problems) = bad.validate();
    assert!(res.workload_endpoints.is_empty() && res.profiles.is_empty());
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].contains("spec.ipNetworks[0]") && problems[0].contains("not a single address")
    );
    assert!(
        problems[1].contains("Profile \"custom\": spec.ingress"),
        "{}",
        problems[1]
    );
}

//! The Kubernetes datastore adapter against the in-memory API server stand-in
//! (tests/support/apiserver.rs) over real HTTP: kube-runtime's watchers list, watch, resume,
//! re-list after 410 Gone, and stop with a clear error when a CRD disappears; `publish` merges
//! only our annotations. Complements the request-level tests in tests/kube_datastore.rs.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;
use support::apiserver::ApiServer;
use wiremesh_core::model::{ClusterSnapshot, PublishedWireguard, WgKey};
use wiremesh_core::wire::Kind;
use wiremesh_datastore::kube::{KubeDatastore, policy_resource};
use wiremesh_datastore::{Datastore as _, DatastoreError, ObjectProblem, ProblemObject};

const LIMIT: Duration = Duration::from_secs(20);

async fn client(server: &ApiServer) -> kube::Client {
    let config = kube::Config::new(server.url.parse().expect("url"));
    kube::Client::try_from(config).expect("client")
}

async fn create_node(client: &kube::Client, name: &str, annotations: serde_json::Value) {
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": name, "annotations": annotations },
        "spec": { "podCIDRs": [format!("10.244.{}.0/24", name.len())] },
        "status": { "addresses": [{ "type": "InternalIP", "address": "192.0.2.10" }] },
    }))
    .expect("node");
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .expect("create node");
}

async fn wait_snapshot(
    rx: &mut tokio::sync::watch::Receiver<ClusterSnapshot>,
    what: &str,
    condition: impl Fn(&ClusterSnapshot) -> bool,
) -> ClusterSnapshot {
    let snapshot =
        match tokio::time::timeout(LIMIT, rx.wait_for(|s| s.synced && condition(s))).await {
            Ok(Ok(snapshot)) => Some(snapshot.clone()),
            Ok(Err(_)) => panic!("the adapter stopped while waiting for {what}"),
            Err(_) => None,
        };
    snapshot.unwrap_or_else(|| panic!("timed out waiting for {what}: {:?}", *rx.borrow()))
}

#[tokio::test]
async fn watches_resume_relist_after_410_and_stop_on_a_missing_crd() {
    let server = ApiServer::start().await;
    let client = client(&server).await;
    create_node(&client, "node1", json!({ "keep": "me" })).await;
    create_node(&client, "node2", json!({})).await;

    let datastore =
        std::sync::Arc::new(KubeDatastore::from_client(client.clone()).with_policy(true));
    let (tx, mut rx) = tokio::sync::watch::channel(ClusterSnapshot::default());
    let runner = std::sync::Arc::clone(&datastore);
    let task = tokio::spawn(async move { runner.run(tx).await });

    let first = wait_snapshot(&mut rx, "the initial lists", |s| s.nodes.len() == 2).await;
    assert!(
        first.felix_configurations.contains_key("default"),
        "the adapter creates FelixConfiguration default as calico-node does"
    );

    // A watch event: a new GlobalNetworkSet.
    let sets: Api<DynamicObject> =
        Api::all_with(client.clone(), &policy_resource(Kind::GlobalNetworkSet));
    let set: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
        "metadata": { "name": "blocked", "labels": { "list": "blocked" } },
        "spec": { "nets": ["198.51.100.0/24"] },
    }))
    .expect("set");
    sets.create(&PostParams::default(), &set)
        .await
        .expect("create set");
    wait_snapshot(&mut rx, "the set from the watch", |s| {
        s.policy
            .objects
            .get(&Kind::GlobalNetworkSet)
            .is_some_and(|o| o.contains_key("blocked"))
    })
    .await;

    // The history is compacted and every watch ends: resuming from the old version gets 410
    // Gone; the watchers re-list and the snapshot catches up with a change made meanwhile.
    server.compact();
    server.end_watches();
    Api::<Node>::all(client.clone())
        .patch(
            "node2",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "podCIDRs": ["10.250.2.0/24"] } })),
        )
        .await
        .expect("patch node2");
    wait_snapshot(&mut rx, "node2's new pod CIDR after the re-list", |s| {
        s.nodes
            .get("node2")
            .is_some_and(|n| n.pod_cidrs == ["10.250.2.0/24"])
    })
    .await;
    let node_lists = server
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/nodes?") && !r.contains("watch=true"))
        .count();
    assert!(
        node_lists >= 2,
        "the node watcher re-listed: {:?}",
        server.requests()
    );

    // publish merges only our annotations: the foreign one stays.
    let key: WgKey = "hE3fN1H2cJYbD8lQ5S0m8pCq2n5dJ8mJ7oWw3gK0VXc="
        .parse()
        .expect("key");
    let published = PublishedWireguard {
        public_key_v4: Some(key),
        interface_ipv4_address: Some("10.244.5.1".parse().expect("address")),
        ..PublishedWireguard::default()
    };
    datastore
        .publish("node1", &published)
        .await
        .expect("publish");
    let node1 = server.object("v1", "nodes", "", "node1").expect("node1");
    let annotations = &node1["metadata"]["annotations"];
    assert_eq!(annotations["keep"], "me", "{node1}");
    assert_eq!(
        annotations["projectcalico.org/WireguardPublicKey"],
        key.to_string(),
        "{node1}"
    );
    assert!(
        !server.requests().iter().any(|r| r.starts_with("PUT ")),
        "never a full update"
    );

    // A problem with a FelixConfiguration becomes an Event on it, with its UID (which
    // `kubectl describe` matches on).
    datastore
        .report(&[ObjectProblem {
            object: ProblemObject::FelixConfiguration("default".into()),
            reason: "InvalidFelixConfiguration".into(),
            message: "spec.wireguardMTU: not a number".into(),
        }])
        .await;
    let uid = server
        .object("projectcalico.org/v3", "felixconfigurations", "", "default")
        .expect("default")["metadata"]["uid"]
        .clone();
    let mut events = Vec::new();
    for _ in 0..100 {
        events = server.objects("events.k8s.io/v1", "events");
        if !events.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["reason"], "InvalidFelixConfiguration");
    assert_eq!(events[0]["regarding"]["kind"], "FelixConfiguration");
    assert_eq!(events[0]["regarding"]["uid"], uid, "{:?}", events[0]);

    // The Tier CRD goes away: the next list is a 404 and the adapter stops with an error
    // naming it.
    server.uninstall("tiers");
    server.compact();
    server.end_watches();
    let stopped = tokio::time::timeout(LIMIT, task)
        .await
        .expect("the adapter stops")
        .expect("task");
    match stopped {
        Err(DatastoreError::MissingCrd { crd }) => assert_eq!(crd, "tiers.projectcalico.org"),
        other => panic!("expected MissingCrd for tiers, got {other:?}"),
    }
}

/// `wiremesh policy which-endpoints|unused --datastore kubernetes` read the CRDs through the API (here
/// the stand-in), read-only, with the same results as from manifest files. Multi-threaded: the
/// command blocks this thread while the stand-in answers on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_tools_read_the_kubernetes_api() {
    let server = ApiServer::start().await;
    let client = client(&server).await;
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/policy/tunnel-deny.yaml"
    ))
    .expect("example");
    for doc in manifest.split("\n---\n") {
        let value: serde_json::Value = serde_norway::from_str(doc).expect("YAML");
        let kind =
            Kind::from_kind_name(value["kind"].as_str().expect("kind")).expect("policy kind");
        let object: DynamicObject = serde_json::from_value(value).expect("object");
        Api::<DynamicObject>::all_with(client.clone(), &policy_resource(kind))
            .create(&PostParams::default(), &object)
            .await
            .expect("create");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig()).expect("kubeconfig");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wiremesh"))
            .arg("policy")
            .args(args)
            .args(["--datastore", "kubernetes", "--kubeconfig"])
            .arg(&kubeconfig)
            .output()
            .expect("wiremesh policy");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (stdout, stderr) = run(&["which-endpoints", "drop-node3-pods"]);
    assert!(
        stdout.contains("node node1 interface wireguard.cali host endpoint node1-tunnel"),
        "{stdout}{stderr}"
    );
    let before = server.requests().len();
    run(&["unused"]);
    let writes: Vec<String> = server.requests()[before..]
        .iter()
        .filter(|r| !r.starts_with("GET "))
        .cloned()
        .collect();
    assert!(writes.is_empty(), "the policy tools only read: {writes:?}");
}

/// Pods (with their status written through the status subresource, as a kubelet does),
/// Namespaces, ServiceAccounts and Kubernetes NetworkPolicies reach the snapshot over real
/// HTTP, are updated and deleted by watch events, and decode into endpoints, profiles and
/// policies.
#[tokio::test]
async fn pods_namespaces_service_accounts_and_network_policies_over_http() {
    use wiremesh_core::policy::PolicyResources;
    let server = ApiServer::start().await;
    let client = client(&server).await;
    let create = async |kind: Kind, namespace: Option<&str>, object: serde_json::Value| {
        let resource = policy_resource(kind);
        let api: Api<DynamicObject> = match namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        let object: DynamicObject = serde_json::from_value(object).expect("object");
        api.create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("create {kind}: {e}"));
    };
    create(
        Kind::Namespace,
        None,
        json!({ "apiVersion": "v1", "kind": "Namespace",
                "metadata": { "name": "shop", "labels": { "team": "a" } } }),
    )
    .await;
    create(
        Kind::ServiceAccount,
        Some("shop"),
        json!({ "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": { "name": "web", "labels": { "role": "frontend" } } }),
    )
    .await;
    // Pending, no IP yet: in the snapshot, but no endpoint.
    create(
        Kind::Pod,
        Some("shop"),
        json!({ "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": "web-0", "labels": { "app": "web" } },
                "spec": { "nodeName": "node1", "serviceAccountName": "web",
                          "containers": [{ "name": "main", "image": "nginx",
                                           "ports": [{ "name": "http", "containerPort": 80 }] }] },
                "status": { "phase": "Pending" } }),
    )
    .await;

    let datastore = KubeDatastore::from_client(client.clone()).with_policy(true);
    let (tx, mut rx) = tokio::sync::watch::channel(ClusterSnapshot::default());
    let task = tokio::spawn(async move { datastore.run(tx).await });
    let has = |s: &ClusterSnapshot, kind: Kind, key: &str| {
        s.policy
            .objects
            .get(&kind)
            .is_some_and(|o| o.contains_key(key))
    };
    let first = wait_snapshot(&mut rx, "the pod, namespace and account", |s| {
        has(s, Kind::Pod, "shop/web-0")
            && has(s, Kind::Namespace, "shop")
            && has(s, Kind::ServiceAccount, "shop/web")
    })
    .await;
    let validated = PolicyResources::from_raw(&first.policy);
    assert_eq!(validated.errors, vec![]);
    assert_eq!(validated.workload_endpoints, vec![], "no IP, no endpoint");
    assert_eq!(
        validated.profiles.keys().collect::<Vec<_>>(),
        ["kns.shop", "ksa.shop.web"]
    );

    // The kubelet's part: the pod's IP through the status subresource.
    let pods: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "shop", &policy_resource(Kind::Pod));
    pods.patch_status(
        "web-0",
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": { "phase": "Running", "podIP": "10.244.1.5",
                                          "podIPs": [{ "ip": "10.244.1.5" }],
                                          "conditions": [{ "type": "Ready", "status": "True" }] } })),
    )
    .await
    .expect("patch pod status");
    let policies: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "shop",
        &policy_resource(Kind::KubernetesNetworkPolicy),
    );
    let np: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": { "name": "web-ingress" },
        "spec": { "podSelector": { "matchLabels": { "app": "web" } }, "policyTypes": ["Ingress"],
                  "ingress": [{ "ports": [{ "port": "http" }] }] },
    }))
    .expect("policy");
    policies
        .create(&PostParams::default(), &np)
        .await
        .expect("create NetworkPolicy");
    let running = wait_snapshot(&mut rx, "the pod's IP and the NetworkPolicy", |s| {
        has(s, Kind::KubernetesNetworkPolicy, "shop/web-ingress")
            && s.policy.objects[&Kind::Pod]["shop/web-0"]["status"]["podIP"] == "10.244.1.5"
    })
    .await;
    let pod = &running.policy.objects[&Kind::Pod]["shop/web-0"];
    assert_eq!(
        pod["status"],
        json!({ "phase": "Running", "podIP": "10.244.1.5", "podIPs": [{ "ip": "10.244.1.5" }] }),
        "conditions are not kept"
    );
    assert!(pod["metadata"].get("uid").is_none(), "{pod}");
    let validated = PolicyResources::from_raw(&running.policy);
    assert_eq!(validated.errors, vec![]);
    assert_eq!(validated.workload_endpoints.len(), 1);
    assert_eq!(validated.workload_endpoints[0].pod, "web-0");
    assert_eq!(validated.policies.len(), 1);

    // Deletes.
    Api::<DynamicObject>::namespaced_with(
        client.clone(),
        "shop",
        &policy_resource(Kind::ServiceAccount),
    )
    .delete("web", &Default::default())
    .await
    .expect("delete account");
    pods.delete("web-0", &Default::default())
        .await
        .expect("delete pod");
    policies
        .delete("web-ingress", &Default::default())
        .await
        .expect("delete policy");
    let last = wait_snapshot(&mut rx, "the deletes", |s| {
        !has(s, Kind::Pod, "shop/web-0")
            && !has(s, Kind::ServiceAccount, "shop/web")
            && !has(s, Kind::KubernetesNetworkPolicy, "shop/web-ingress")
    })
    .await;
    task.abort();
    assert!(has(&last, Kind::Namespace, "shop"));
    // Every kind was watched across all namespaces.
    let requests = server.requests();
    for path in [
        "/api/v1/pods?",
        "/api/v1/namespaces?",
        "/api/v1/serviceaccounts?",
        "/apis/networking.k8s.io/v1/networkpolicies?",
    ] {
        assert!(
            requests
                .iter()
                .any(|r| r.starts_with(&format!("GET {path}")) && r.contains("watch=true")),
            "{path}: {requests:?}"
        );
    }
}

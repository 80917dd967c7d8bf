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

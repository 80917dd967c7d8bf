//! The Kubernetes end-to-end suite (docs/testing.md, "Kubernetes end-to-end suite"): runs only
//! when `WIREMESH_E2E_KUBECONFIG` names the kubeconfig of a disposable cluster without Calico;
//! otherwise it prints that it was skipped and why, and passes.
//!
//! Against that cluster: applies `crds/` and the RBAC of `deploy/` (server-side apply), checks
//! the agent's ServiceAccount rights with SubjectAccessReviews, brings up a 3-node lab whose
//! nodes are Node objects and whose agents run out of cluster with `--datastore kubernetes`,
//! enables WireGuard by patching FelixConfiguration `default` (as `kubectl patch --type=merge`
//! does), checks the annotations, `wg show` and encrypted pod-to-pod traffic (the lab's
//! `verify`), disables it and checks the cleanup, then deletes its Node objects. Apart from the
//! lab (no root needed): `kubernetes_pod_policy_kinds` reads Pods, Namespaces, ServiceAccounts
//! and NetworkPolicies with the agent's own ServiceAccount token. Then, in the same test (the
//! labs would share Node names): a subset of the Kubernetes NetworkPolicy conformance cases with
//! lab pods published as Namespace and Pod objects (`pod_policy_conformance`, also run against
//! the API stand-in).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, ResourceExt as _};
use serde::Deserialize as _;
use serde_json::{Value, json};

use wiremesh::cli::lab::{Lab, UpOptions, VerifyExpect, k8s, verify};
use wiremesh_core::model::WgKey;
use wiremesh_datastore::kube::{
    ANNOTATION_INTERFACE_V4, ANNOTATION_PUBLIC_KEY, felix_configuration_resource,
};

mod support;
use support::apiserver::ApiServer;

const ENV: &str = "WIREMESH_E2E_KUBECONFIG";
const MANAGER: &str = "wiremesh-e2e";
const CONVERGE: Duration = Duration::from_secs(60);
const SERVICE_ACCOUNT: &str = "system:serviceaccount:wiremesh:wiremesh";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

async fn wait_within(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + CONVERGE;
    while Instant::now() < deadline {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("timed out after {CONVERGE:?} waiting for {what}");
}

/// Server-side applies every CRD and waits until each is established.
async fn apply_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(MANAGER).force();
    for crd in wiremesh_core::wire::crds() {
        let name = crd.name_any();
        api.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        tokio::time::timeout(CONVERGE, established)
            .await
            .unwrap_or_else(|_| panic!("CRD {name} not established"))
            .unwrap_or_else(|e| panic!("waiting for CRD {name}: {e}"));
    }
}

fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

async fn apply_typed<K>(api: Api<K>, object: Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let typed: K = serde_json::from_value(object).expect("manifest decodes");
    let name = typed.name_any();
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&typed),
    )
    .await
    .unwrap_or_else(|e| panic!("applying {name}: {e}"));
}

/// Applies deploy/00-namespace.yaml and deploy/rbac.yaml (the DaemonSet is not needed: the agents
/// run out of cluster, in the lab).
async fn apply_rbac(client: &Client) {
    for file in ["deploy/00-namespace.yaml", "deploy/rbac.yaml"] {
        for doc in yaml_documents(&root().join(file)) {
            let namespace = doc
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("wiremesh")
                .to_string();
            match doc.get("kind").and_then(Value::as_str) {
                Some("Namespace") => apply_typed::<Namespace>(Api::all(client.clone()), doc).await,
                Some("ServiceAccount") => {
                    apply_typed::<ServiceAccount>(Api::namespaced(client.clone(), &namespace), doc)
                        .await
                }
                Some("ClusterRole") => {
                    apply_typed::<ClusterRole>(Api::all(client.clone()), doc).await
                }
                Some("ClusterRoleBinding") => {
                    apply_typed::<ClusterRoleBinding>(Api::all(client.clone()), doc).await
                }
                other => panic!("{file}: unexpected kind {other:?}"),
            }
        }
    }
}

/// Whether the agent's ServiceAccount may `verb` `resource` in `group`.
async fn allowed(client: &Client, verb: &str, group: &str, resource: &str) -> bool {
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(SERVICE_ACCOUNT.into()),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                "system:serviceaccounts:wiremesh".into(),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                namespace: (resource == "events").then(|| "default".to_string()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let answer = api
        .create(&PostParams::default(), &review)
        .await
        .unwrap_or_else(|e| panic!("SubjectAccessReview {verb} {resource}: {e}"));
    answer.status.is_some_and(|s| s.allowed)
}

async fn check_rbac(client: &Client) {
    // The authorizer sees a ClusterRoleBinding applied a moment ago only once its cache has
    // caught up (on a freshly started API server this took over a second): wait for the first
    // right before asserting the rest.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !allowed(client, "list", "", "nodes").await && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (verb, group, resource) in [
        ("list", "", "nodes"),
        ("watch", "", "nodes"),
        ("patch", "", "nodes"),
        ("list", "projectcalico.org", "felixconfigurations"),
        ("watch", "projectcalico.org", "felixconfigurations"),
        ("create", "projectcalico.org", "felixconfigurations"),
        ("create", "events.k8s.io", "events"),
    ] {
        assert!(
            allowed(client, verb, group, resource).await,
            "the agent may not {verb} {resource}"
        );
    }
    // Every policy kind the agent watches with host policy on.
    for kind in wiremesh_core::wire::Kind::CALICO {
        for verb in ["list", "watch"] {
            assert!(
                allowed(client, verb, "projectcalico.org", kind.plural()).await,
                "the agent may not {verb} {}",
                kind.plural()
            );
        }
    }
    // Pod policy: exactly list and watch of what a pod's endpoint, profiles and the
    // Kubernetes NetworkPolicies come from.
    for (group, resource) in [
        ("", "pods"),
        ("", "namespaces"),
        ("", "serviceaccounts"),
        ("networking.k8s.io", "networkpolicies"),
    ] {
        for verb in ["list", "watch"] {
            assert!(
                allowed(client, verb, group, resource).await,
                "the agent may not {verb} {resource}"
            );
        }
        for verb in ["get", "create", "update", "patch", "delete"] {
            assert!(
                !allowed(client, verb, group, resource).await,
                "least rights: the agent must not {verb} {resource}"
            );
        }
    }
    for (verb, group, resource) in [
        ("delete", "", "nodes"),
        ("update", "", "nodes"),
        ("list", "", "secrets"),
        ("patch", "projectcalico.org", "felixconfigurations"),
        ("create", "projectcalico.org", "globalnetworkpolicies"),
    ] {
        assert!(
            !allowed(client, verb, group, resource).await,
            "least rights: the agent must not {verb} {resource}"
        );
    }
}

/// Sets `wireguardEnabled` in FelixConfiguration `default` with a JSON merge patch, exactly
/// what `kubectl patch felixconfiguration default --type=merge -p ...` sends.
async fn set_wireguard(client: &Client, enabled: bool) {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &felix_configuration_resource());
    api.patch(
        "default",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "wireguardEnabled": enabled } })),
    )
    .await
    .unwrap_or_else(|e| panic!("patching FelixConfiguration default: {e}"));
}

async fn annotations(client: &Client, node: &str) -> std::collections::BTreeMap<String, String> {
    let api: Api<Node> = Api::all(client.clone());
    api.get(node)
        .await
        .unwrap_or_else(|e| panic!("reading Node {node}: {e}"))
        .annotations()
        .clone()
}

/// `wg show wireguard.cali dump` peers of a lab node: (public key, latest handshake).
fn wg_peers(lab: &Lab, node: &str) -> Option<Vec<(String, u64)>> {
    let out = lab
        .exec_in_node(node, &["wg", "show", "wireguard.cali", "dump"])
        .expect("exec");
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (
                    f[0].to_string(),
                    f.get(4).and_then(|h| h.parse().ok()).unwrap_or(0),
                )
            })
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_end_to_end() {
    let Some(kubeconfig) = std::env::var_os(ENV).map(PathBuf::from) else {
        println!(
            "kube_e2e: skipped: {ENV} is not set (it names the kubeconfig of a disposable cluster; see docs/testing.md)"
        );
        return;
    };
    assert!(
        nix::unistd::geteuid().is_root(),
        "kube_e2e needs root (the lab's nodes are network namespaces)"
    );
    let client = k8s::client(&kubeconfig)
        .await
        .expect("connect to the cluster");

    apply_crds(&client).await;
    apply_rbac(&client).await;
    check_rbac(&client).await;
    let name = format!("ke{}", std::process::id() % 100_000);
    mesh_on_and_off(&client, &kubeconfig, &name).await;
    let name = format!("kc{}", std::process::id() % 100_000);
    pod_policy_conformance(&client, &kubeconfig, &name).await;
}

/// Waits (at most CONVERGE) until the adapter's snapshot is synced and `done`; fails at once
/// when the adapter stops (a 403, say).
async fn wait_snapshot(
    rx: &mut tokio::sync::watch::Receiver<wiremesh_core::model::ClusterSnapshot>,
    task: &mut tokio::task::JoinHandle<Result<(), wiremesh_datastore::DatastoreError>>,
    what: &str,
    done: impl Fn(&wiremesh_core::model::ClusterSnapshot) -> bool,
) -> wiremesh_core::model::ClusterSnapshot {
    let outcome = tokio::select! {
        seen = tokio::time::timeout(CONVERGE, rx.wait_for(|s| s.synced && done(s))) => {
            seen.map(|r| r.map(|s| s.clone()))
        }
        ended = task => panic!("the adapter stopped while waiting for {what}: {ended:?}"),
    };
    match outcome {
        Ok(Ok(snapshot)) => snapshot,
        Ok(Err(_)) => panic!("the snapshot channel closed while waiting for {what}"),
        Err(_) => panic!("timed out waiting for {what}: {:?}", *rx.borrow()),
    }
}

/// Pod policy's kinds against the real API server, read as the agent reads them: with the
/// ServiceAccount token of deploy/'s RBAC (a TokenRequest), through `KubeDatastore::connect`.
/// A Namespace, a ServiceAccount, a Pod whose IP is written through the status subresource
/// (the server has no kubelet) and a NetworkPolicy reach the snapshot, a change and a delete
/// follow, and no list or watch is denied. Needs neither root nor the lab.
#[tokio::test]
async fn kubernetes_pod_policy_kinds() {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use wiremesh_core::model::ClusterSnapshot;
    use wiremesh_core::policy::PolicyResources;
    use wiremesh_core::wire::Kind;
    use wiremesh_datastore::Datastore as _;
    use wiremesh_datastore::kube::KubeDatastore;

    let Some(kubeconfig) = std::env::var_os(ENV).map(PathBuf::from) else {
        println!("kube_e2e: skipped: {ENV} is not set (see docs/testing.md)");
        return;
    };
    let client = k8s::client(&kubeconfig)
        .await
        .expect("connect to the cluster");
    apply_crds(&client).await;
    apply_rbac(&client).await;
    check_rbac(&client).await;

    let ns = format!("wm-pods-{}", std::process::id() % 100_000);
    let create = async |api: Api<DynamicObject>, object: Value| {
        let object: DynamicObject = serde_json::from_value(object).expect("object");
        let name = object.name_any();
        api.create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("creating {name}: {e}"));
    };
    let resource = wiremesh_datastore::kube::policy_resource;
    create(
        Api::all_with(client.clone(), &resource(Kind::Namespace)),
        json!({ "apiVersion": "v1", "kind": "Namespace",
                "metadata": { "name": ns, "labels": { "team": "shop" } } }),
    )
    .await;
    create(
        Api::namespaced_with(client.clone(), &ns, &resource(Kind::ServiceAccount)),
        json!({ "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": { "name": "web", "labels": { "role": "frontend" } } }),
    )
    .await;
    // No token controller runs: the pod must not ask for a mounted token.
    create(
        Api::namespaced_with(client.clone(), &ns, &resource(Kind::Pod)),
        json!({ "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": "web-0", "labels": { "app": "web" } },
                "spec": { "nodeName": "node1", "serviceAccountName": "web",
                          "automountServiceAccountToken": false,
                          "containers": [{ "name": "main", "image": "nginx:1.27",
                                           "ports": [{ "name": "http", "containerPort": 80 }] }] } }),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.patch_status(
        "web-0",
        &PatchParams::default(),
        &Patch::Merge(
            json!({ "status": { "phase": "Running", "podIP": "10.244.1.5",
                                          "podIPs": [{ "ip": "10.244.1.5" }] } }),
        ),
    )
    .await
    .expect("writing the pod's status");
    create(
        Api::namespaced_with(
            client.clone(),
            &ns,
            &resource(Kind::KubernetesNetworkPolicy),
        ),
        json!({ "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": { "name": "web-ingress" },
                "spec": { "podSelector": { "matchLabels": { "app": "web" } },
                          "ingress": [{ "ports": [{ "port": "http" }] }] } }),
    )
    .await;

    // The agent's credentials: a token of its ServiceAccount, in a kubeconfig of its own.
    let token = Api::<ServiceAccount>::namespaced(client.clone(), "wiremesh")
        .create_token_request(
            "wiremesh",
            &PostParams::default(),
            &TokenRequest {
                spec: TokenRequestSpec {
                    expiration_seconds: Some(600),
                    ..TokenRequestSpec::default()
                },
                ..TokenRequest::default()
            },
        )
        .await
        .expect("TokenRequest for wiremesh/wiremesh")
        .status
        .expect("token")
        .token;
    let admin: Value = serde_norway::from_str(
        &std::fs::read_to_string(&kubeconfig).expect("reading the kubeconfig"),
    )
    .expect("kubeconfig YAML");
    let cluster = admin
        .pointer("/clusters/0")
        .cloned()
        .expect("a cluster in the kubeconfig");
    let agent_config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [cluster.clone()],
        "users": [{ "name": "wiremesh", "user": { "token": token } }],
        "contexts": [{ "name": "wiremesh",
                       "context": { "cluster": cluster["name"], "user": "wiremesh" } }],
        "current-context": "wiremesh",
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let agent_kubeconfig = dir.path().join("kubeconfig");
    // JSON is YAML.
    std::fs::write(&agent_kubeconfig, agent_config.to_string()).expect("write kubeconfig");
    let datastore = KubeDatastore::connect(Some(&agent_kubeconfig), None)
        .await
        .expect("connect as the agent")
        .with_policy(true);
    let (tx, mut rx) = tokio::sync::watch::channel(ClusterSnapshot::default());
    let mut task = tokio::spawn(async move { datastore.run(tx).await });

    let has = |s: &ClusterSnapshot, kind: Kind, key: &str| {
        s.policy
            .objects
            .get(&kind)
            .is_some_and(|o| o.contains_key(key))
    };
    let pod_key = format!("{ns}/web-0");
    let sa_key = format!("{ns}/web");
    let np_key = format!("{ns}/web-ingress");
    let synced = wait_snapshot(
        &mut rx,
        &mut task,
        "the pod, namespace, account and NetworkPolicy",
        |s| {
            has(s, Kind::Pod, &pod_key)
                && has(s, Kind::Namespace, &ns)
                && has(s, Kind::ServiceAccount, &sa_key)
                && has(s, Kind::KubernetesNetworkPolicy, &np_key)
        },
    )
    .await;
    assert_eq!(
        synced.policy.objects[&Kind::Pod][&pod_key]["status"],
        json!({ "phase": "Running", "podIP": "10.244.1.5", "podIPs": [{ "ip": "10.244.1.5" }] })
    );
    // The API server defaulted `policyTypes`; the spec is kept as served.
    assert_eq!(
        synced.policy.objects[&Kind::KubernetesNetworkPolicy][&np_key]["spec"]["policyTypes"],
        json!(["Ingress"])
    );
    let validated = PolicyResources::from_raw(&synced.policy);
    let ours: Vec<String> = validated
        .errors
        .iter()
        .filter(|e| e.name.contains(&ns))
        .map(|e| e.to_string())
        .collect();
    assert_eq!(ours, Vec::<String>::new());
    let endpoint = validated
        .workload_endpoints
        .iter()
        .find(|e| e.namespace == ns && e.pod == "web-0")
        .expect("the pod's endpoint");
    assert_eq!(endpoint.ips, ["10.244.1.5/32".parse().expect("net")]);
    assert_eq!(
        endpoint.profiles,
        [format!("kns.{ns}"), format!("ksa.{ns}.web")]
    );
    assert!(
        validated.profiles[&format!("kns.{ns}")]
            .labels_to_apply
            .get("pcns.team")
            .is_some_and(|v| v == "shop")
    );
    assert!(
        validated
            .policies
            .iter()
            .any(|p| p.namespace.as_deref() == Some(ns.as_str())),
        "the NetworkPolicy converts: {:?}",
        validated.policies
    );

    // A label change arrives through the watch; a NetworkPolicy deleted goes.
    pods.patch(
        "web-0",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "labels": { "app": "web", "tier": "front" } } })),
    )
    .await
    .expect("relabel the pod");
    Api::<NetworkPolicy>::namespaced(client.clone(), &ns)
        .delete("web-ingress", &Default::default())
        .await
        .expect("delete the NetworkPolicy");
    wait_snapshot(&mut rx, &mut task, "the new label and the delete", |s| {
        !has(s, Kind::KubernetesNetworkPolicy, &np_key)
            && s.policy.objects[&Kind::Pod]
                .get(&pod_key)
                .is_some_and(|p| p["metadata"]["labels"]["tier"] == "front")
    })
    .await;
    task.abort();

    // The namespace stays Terminating (no controller finalizes it); its objects go (the pod at
    // once: no kubelet would confirm a graceful deletion).
    pods.delete("web-0", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .expect("delete the pod");
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .delete("web", &Default::default())
        .await
        .expect("delete the account");
    Api::<Namespace>::all(client.clone())
        .delete(&ns, &Default::default())
        .await
        .expect("delete the namespace");
}

/// The lab's part of the suite, against the in-memory API stand-in (tests/support/apiserver.rs)
/// so the Kubernetes datastore, the relays and `lab up/down --kubeconfig` run in CI, where no
/// cluster exists. The CRD and RBAC steps need a real API server and are not part of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_lab_against_the_api_stand_in() {
    if !support::root_or_skip("kubernetes_lab_against_the_api_stand_in") {
        return;
    }
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig()).expect("write kubeconfig");
    let client = k8s::client(&kubeconfig).await.expect("connect");
    // A Node the lab did not create: never touched, and never a lab node's name.
    let bystander: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": "bystander", "annotations": { "keep": "me" } },
    }))
    .expect("node");
    let api: Api<Node> = Api::all(client.clone());
    api.create(&PostParams::default(), &bystander)
        .await
        .expect("create bystander");
    let name = format!("ks{}", std::process::id() % 100_000);
    mesh_on_and_off(&client, &kubeconfig, &name).await;

    let left: Vec<String> = api
        .list(&Default::default())
        .await
        .expect("list nodes")
        .items
        .iter()
        .map(|n| n.name_any())
        .collect();
    assert_eq!(
        left,
        ["bystander"],
        "lab down deletes its Nodes and nothing else"
    );
    let kept = api.get("bystander").await.expect("bystander");
    assert_eq!(
        kept.annotations().get("keep").map(String::as_str),
        Some("me")
    );
    assert_eq!(kept.annotations().len(), 1, "{:?}", kept.annotations());
    // The agents watched through the relays, and published with merge patches only.
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /api/v1/nodes?") && r.contains("watch=true")),
        "{requests:?}"
    );
    assert!(
        !requests.iter().any(|r| r.starts_with("PUT ")),
        "no full updates: {requests:?}"
    );
    // A Node of another owner with a lab node's name stops `lab up` with a clear error.
    let squatter: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": { "name": "node1" },
    }))
    .expect("node");
    api.create(&PostParams::default(), &squatter)
        .await
        .expect("create node1");
    let mut options = UpOptions::new(&name, 1);
    options.kubeconfig = Some(kubeconfig.clone());
    options.binary = Some(PathBuf::from(env!("CARGO_BIN_EXE_wiremesh")));
    let _guard = support::lab::Guard(name.clone());
    let error = Lab::up(options).await.expect_err("lab up must refuse");
    assert!(
        error.to_string().contains("not created by lab")
            || format!("{error:?}").contains("not created by lab"),
        "{error:?}"
    );
    assert!(
        api.get_opt("node1").await.expect("get").is_some(),
        "node1 left alone"
    );
}

/// Brings up a 3-node lab against `kubeconfig`'s API server with encryption off, turns it on
/// and off with the FelixConfiguration patch, and checks annotations, `wg show` and traffic.
async fn mesh_on_and_off(client: &Client, kubeconfig: &Path, name: &str) {
    let kubeconfig = kubeconfig.to_path_buf();
    let name = name.to_string();
    let nodes: Vec<String> = (1..=3).map(|i| format!("node{i}")).collect();
    // `lab down` (also when the test fails) removes the lab and the Nodes it created.
    let _guard = support::lab::Guard(name.clone());
    let mut options = UpOptions::new(&name, 3);
    options.encryption = false;
    options.kubeconfig = Some(kubeconfig.clone());
    options.binary = Some(PathBuf::from(env!("CARGO_BIN_EXE_wiremesh")));
    let lab = Lab::up(options).await.expect("lab up --kubeconfig");

    // Encryption off: traffic flows in clear, nothing published.
    let results = verified(&lab, VerifyExpect::Clear).await;
    assert!(verify::summary(&results).1, "clear traffic: {results:?}");

    set_wireguard(client, true).await;
    wait_within(
        "every node to publish its key and tunnel address",
        async || {
            let mut all = true;
            for node in &nodes {
                let a = annotations(client, node).await;
                all &= a
                    .get(ANNOTATION_PUBLIC_KEY)
                    .is_some_and(|k| k.parse::<WgKey>().is_ok())
                    && a.contains_key(ANNOTATION_INTERFACE_V4);
            }
            all
        },
    )
    .await;
    let mut keys = std::collections::BTreeSet::new();
    for node in &nodes {
        keys.insert(annotations(client, node).await[ANNOTATION_PUBLIC_KEY].clone());
    }
    assert_eq!(keys.len(), 3, "three distinct keys: {keys:?}");
    // `wiremesh status --cluster` reads the same Node objects (read-only).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wiremesh"))
        .args([
            "status",
            "--cluster",
            "--datastore",
            "kubernetes",
            "--output",
            "json",
        ])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .output()
        .expect("wiremesh status");
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status JSON: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let listed: Vec<&Value> = report["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| nodes.iter().any(|name| n["node"] == name.as_str()))
        .collect();
    assert_eq!(listed.len(), 3, "{report}");
    assert!(
        listed
            .iter()
            .all(|n| n["peerable"] == true && keys.contains(n["publicKey"].as_str().unwrap_or(""))),
        "{report}"
    );

    // Traffic, then every node shows both peers with handshakes. Each agent applies the others'
    // keys when its own watch delivers them, so the first pairs may still be converging.
    let results = verified(&lab, VerifyExpect::Encrypted).await;
    assert!(
        verify::summary(&results).1,
        "encrypted traffic: {results:?}"
    );
    wait_within("two peers with handshakes on every node", async || {
        nodes.iter().all(|n| {
            wg_peers(&lab, n).is_some_and(|p| p.len() == 2 && p.iter().all(|(_, h)| *h > 0))
        })
    })
    .await;
    for node in &nodes {
        let peers = wg_peers(&lab, node).expect("wg show");
        let own = annotations(client, node).await[ANNOTATION_PUBLIC_KEY].clone();
        for (key, _) in peers {
            assert!(
                keys.contains(&key) && key != own,
                "{node}: unexpected peer {key}"
            );
        }
    }

    // Off again: annotations and devices go, traffic in clear.
    set_wireguard(client, false).await;
    wait_within("annotations and devices to be removed", async || {
        let mut clean = true;
        for node in &nodes {
            let a = annotations(client, node).await;
            clean &= !a.contains_key(ANNOTATION_PUBLIC_KEY)
                && !a.contains_key(ANNOTATION_INTERFACE_V4)
                && wg_peers(&lab, node).is_none();
        }
        clean
    })
    .await;
    let results = verified(&lab, VerifyExpect::Clear).await;
    assert!(verify::summary(&results).1, "clear again: {results:?}");
}

/// The lab's `verify` (3 pings per pair), retried until every pair passes or CONVERGE has
/// passed, as `scripts/lab.sh` does; returns the last results for the caller's assertion.
async fn verified(lab: &Lab, expect: VerifyExpect) -> Vec<verify::PairResult> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let results = verify::verify(lab, expect, 3).await.expect("verify");
        if verify::summary(&results).1 || Instant::now() > deadline {
            return results;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Host-endpoint policy through the Kubernetes datastore: `lab apply` creates the objects via
/// the API (here the stand-in), the agents' policy watchers pick them up, and a tunnel HEP with
/// an applyOnForward GNP drops exactly node3's pods at node1; deleting the objects lifts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_lab_policy_against_the_api_stand_in() {
    if !support::root_or_skip("kubernetes_lab_policy_against_the_api_stand_in") {
        return;
    }
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig()).expect("write kubeconfig");
    let name = format!("kp{}", std::process::id() % 100_000);
    let _guard = support::lab::Guard(name.clone());
    let mut options = UpOptions::new(&name, 3);
    options.kubeconfig = Some(kubeconfig.clone());
    options.binary = Some(PathBuf::from(env!("CARGO_BIN_EXE_wiremesh")));
    let lab = Lab::up(options).await.expect("lab up --kubeconfig");
    let reachable = |from: &str, to: &str| lab.ping(from, to, 2).expect("ping").reachable();
    wait_within("pods reachable over the mesh", async || {
        reachable("pod3", "pod1") && reachable("pod2", "pod1")
    })
    .await;

    let manifest = wiremesh_core::manifest::Manifest::parse(
        "policy.yaml",
        "
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata:
  name: node1-tunnel
  labels: {host-endpoint: \"true\"}
spec:
  node: node1
  interfaceName: wireguard.cali
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata:
  name: denied-pods
  labels: {list: denied-pods}
spec:
  nets: [10.244.3.0/24]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: drop-denied-pods
spec:
  order: 10
  selector: host-endpoint == \"true\"
  applyOnForward: true
  types: [Ingress]
  ingress:
    - action: Deny
      source: {selector: list == \"denied-pods\"}
    - action: Allow
",
    );
    let touched = lab.apply_manifest(&manifest, false).await.expect("apply");
    assert_eq!(touched.len(), 3, "{touched:?}");
    assert!(
        server
            .object(
                "projectcalico.org/v3",
                "globalnetworkpolicies",
                "",
                "drop-denied-pods"
            )
            .is_some(),
        "lab apply created the policy through the API"
    );
    wait_within("node3's pods dropped at node1", async || {
        !reachable("pod3", "pod1")
    })
    .await;
    assert!(reachable("pod2", "pod1"), "node2's pods pass");

    lab.apply_manifest(&manifest, true).await.expect("delete");
    wait_within("the policy lifted", async || reachable("pod3", "pod1")).await;
}

/// Policy steps converge within this (the agents' watches, then their rule updates).
const POLICY_CONVERGE: Duration = Duration::from_secs(20);

/// The pod network of the lab's pods: encrypted, each agent needs the others' keys first.
const MESH_CONVERGE: Duration = Duration::from_secs(60);

fn conformance_manifest(yaml: &str) -> wiremesh_core::manifest::Manifest {
    let m = wiremesh_core::manifest::Manifest::parse("conformance.yaml", yaml);
    let (_, problems) = m.validate();
    assert!(problems.is_empty(), "{problems:?}");
    m
}

/// Namespaces `x`, `y` (labelled `ns: <name>`) with pods `a`, `b`, each serving 80 and 81 on
/// TCP and UDP, as the upstream suite's model has them.
fn conformance_pods(x: &str, y: &str) -> String {
    let mut text = String::new();
    for ns in [x, y] {
        text.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n---\n"
        ));
        for pod in ["a", "b"] {
            text.push_str(&format!(
                "apiVersion: v1
kind: Pod
metadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}
spec:
  containers:
    - name: agnhost
      image: registry.k8s.io/e2e-test-images/agnhost:2.53
      ports:
        - {{containerPort: 80, protocol: TCP, name: serve-80-tcp}}
        - {{containerPort: 80, protocol: UDP, name: serve-80-udp}}
        - {{containerPort: 81, protocol: TCP, name: serve-81-tcp}}
        - {{containerPort: 81, protocol: UDP, name: serve-81-udp}}
---
"
            ));
        }
    }
    text
}

fn conformance_keys() -> Vec<wiremesh::cli::lab::probe::TableKey> {
    use wiremesh::cli::lab::pods::PortProtocol;
    let mut out = Vec::new();
    for protocol in [PortProtocol::Tcp, PortProtocol::Udp] {
        for port in [80, 81] {
            out.push(wiremesh::cli::lab::probe::TableKey {
                protocol,
                port,
                family: Some(wiremesh_core::model::Family::V4),
            });
        }
    }
    out
}

/// The truth tables `reachable(port, from, to)` describes, over `pods` (`namespace/name`).
fn conformance_tables(
    pods: &[String],
    reachable: impl Fn(u16, &str, &str) -> bool,
) -> Vec<wiremesh::cli::lab::probe::TruthTable> {
    conformance_keys()
        .into_iter()
        .map(|key| wiremesh::cli::lab::probe::TruthTable {
            key,
            from: pods.to_vec(),
            to: pods.to_vec(),
            reachable: pods
                .iter()
                .map(|from| {
                    pods.iter()
                        .map(|to| (from != to).then(|| reachable(key.port, from, to)))
                        .collect()
                })
                .collect(),
        })
        .collect()
}

/// Probes (the lab's `probe`, 1 s timeout) until the tables are `want`, at most `limit`.
async fn wait_for_tables(
    lab: &Lab,
    what: &str,
    limit: Duration,
    want: &[wiremesh::cli::lab::probe::TruthTable],
) {
    let started = Instant::now();
    let mut last = Vec::new();
    while started.elapsed() < limit {
        let tables = lab
            .probe(conformance_keys(), Duration::from_secs(1))
            .await
            .expect("probe");
        last = wiremesh::cli::lab::probe::compare(&tables, want);
        if last.is_empty() {
            eprintln!("{what}: as expected after {:?}", started.elapsed());
            for table in &tables {
                eprintln!("{}", table.text());
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let diffs: Vec<String> = last.iter().map(ToString::to_string).collect();
    panic!(
        "{what}: still different after {limit:?}:\n{}",
        diffs.join("\n")
    );
}

fn namespace_of(pod: &str) -> &str {
    pod.split_once('/').map_or("", |(ns, _)| ns)
}

/// A subset of the Kubernetes NetworkPolicy conformance cases through the Kubernetes
/// datastore: `lab apply` of Namespaces and Pods publishes them as objects (the agents derive
/// the endpoints), NetworkPolicies go through the API, and every step is a set of probe truth
/// tables: all reachable; default-deny-ingress in x; plus ingress from y on port 80; plus a
/// default-deny-egress in y; all policies deleted. Then a Pod and a Namespace are deleted with
/// `--delete`, and `lab down` deletes the remaining Pod objects.
async fn pod_policy_conformance(client: &Client, kubeconfig: &Path, name: &str) {
    use k8s_openapi::api::core::v1::Pod;
    // Unique namespaces: on a bare API server a deleted Namespace stays Terminating.
    let suffix = std::process::id() % 100_000;
    let (x, y) = (format!("x-{suffix}"), format!("y-{suffix}"));
    let _guard = support::lab::Guard(name.to_string());
    let mut options = UpOptions::new(name, 3);
    options.kubeconfig = Some(kubeconfig.to_path_buf());
    options.binary = Some(PathBuf::from(env!("CARGO_BIN_EXE_wiremesh")));
    let mut lab = Lab::up(options).await.expect("lab up --kubeconfig");

    let touched = lab
        .apply(&conformance_manifest(&conformance_pods(&x, &y)), false)
        .await
        .expect("apply namespaces and pods");
    eprintln!("applied:\n{}", touched.join("\n"));
    let pods: Vec<String> = [&x, &y]
        .iter()
        .flat_map(|ns| ["a", "b"].map(|p| format!("{ns}/{p}")))
        .collect();
    // Published as Kubernetes would have them: bound to the lab node, running, with the lab's
    // address; no WorkloadEndpoint objects (the agents derive them).
    for key in &pods {
        let lab_pod = lab.lab_pod(key).expect("lab pod").clone();
        let object = Api::<Pod>::namespaced(client.clone(), &lab_pod.namespace)
            .get(&lab_pod.name)
            .await
            .unwrap_or_else(|e| panic!("Pod {key}: {e}"));
        let spec = object.spec.expect("spec");
        assert_eq!(spec.node_name.as_deref(), Some(lab_pod.node_name.as_str()));
        assert_eq!(spec.automount_service_account_token, Some(false));
        let status = object.status.expect("status");
        assert_eq!(status.phase.as_deref(), Some("Running"), "{key}");
        let ipv4 = lab_pod.ipv4.expect("IPv4").to_string();
        assert_eq!(status.pod_ip.as_deref(), Some(ipv4.as_str()), "{key}");
    }
    assert!(
        touched.iter().all(|t| !t.contains("workloadendpoints")),
        "{touched:?}"
    );
    Api::<ServiceAccount>::namespaced(client.clone(), &x)
        .get("default")
        .await
        .expect("the lab created x's default ServiceAccount");

    wait_for_tables(
        &lab,
        "all reachable",
        MESH_CONVERGE,
        &conformance_tables(&pods, |_, _, _| true),
    )
    .await;

    let default_deny_ingress = format!(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: default-deny-ingress, namespace: {x}}}
spec:
  podSelector: {{}}
  policyTypes: [Ingress]
"
    );
    lab.apply(&conformance_manifest(&default_deny_ingress), false)
        .await
        .expect("apply default-deny-ingress");
    wait_for_tables(
        &lab,
        "default-deny-ingress in x",
        POLICY_CONVERGE,
        &conformance_tables(&pods, |_, _, to| namespace_of(to) != x),
    )
    .await;

    let allow_from_y_on_80 = format!(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-y-on-80, namespace: {x}}}
spec:
  podSelector: {{}}
  policyTypes: [Ingress]
  ingress:
    - from: [{{namespaceSelector: {{matchLabels: {{ns: {y}}}}}}}]
      ports: [{{port: 80, protocol: TCP}}, {{port: 80, protocol: UDP}}]
"
    );
    lab.apply(&conformance_manifest(&allow_from_y_on_80), false)
        .await
        .expect("apply allow-y-on-80");
    wait_for_tables(
        &lab,
        "ingress into x from y on port 80 only",
        POLICY_CONVERGE,
        &conformance_tables(&pods, |port, from, to| {
            namespace_of(to) != x || (namespace_of(from) == y && port == 80)
        }),
    )
    .await;

    let default_deny_egress = format!(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: default-deny-egress, namespace: {y}}}
spec:
  podSelector: {{}}
  policyTypes: [Egress]
"
    );
    lab.apply(&conformance_manifest(&default_deny_egress), false)
        .await
        .expect("apply default-deny-egress");
    // y's pods reach nobody now, not even x on port 80.
    wait_for_tables(
        &lab,
        "egress from y denied",
        POLICY_CONVERGE,
        &conformance_tables(&pods, |_, from, to| {
            namespace_of(from) != y && namespace_of(to) != x
        }),
    )
    .await;

    let all_policies = [
        default_deny_ingress,
        allow_from_y_on_80,
        default_deny_egress,
    ]
    .join("---\n");
    let touched = lab
        .apply(&conformance_manifest(&all_policies), true)
        .await
        .expect("delete the policies");
    assert_eq!(touched.len(), 3, "{touched:?}");
    wait_for_tables(
        &lab,
        "all reachable again",
        POLICY_CONVERGE,
        &conformance_tables(&pods, |_, _, _| true),
    )
    .await;

    // `--delete` of a Pod deletes its object and its plumbing; of a Namespace, its pods first.
    let x_b = lab.lab_pod(&format!("{x}/b")).expect("x/b").clone();
    let pod_b = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: b, namespace: {x}}}\nspec: {{containers: []}}\n"
    );
    lab.apply(&conformance_manifest(&pod_b), true)
        .await
        .expect("delete x/b");
    assert!(lab.lab_pod(&x_b.key()).is_none());
    assert!(!Path::new("/run/netns").join(&x_b.netns).exists());
    let x_pods: Api<Pod> = Api::namespaced(client.clone(), &x);
    assert!(
        x_pods.get_opt("b").await.expect("get").is_none(),
        "x/b's Pod object is gone"
    );
    let namespace_y = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {y}}}\n");
    let touched = lab
        .apply(&conformance_manifest(&namespace_y), true)
        .await
        .expect("delete namespace y");
    assert!(
        touched.iter().any(|t| t.contains("Terminating")),
        "{touched:?}"
    );
    let y_pods: Api<Pod> = Api::namespaced(client.clone(), &y);
    for pod in ["a", "b"] {
        assert!(
            y_pods.get_opt(pod).await.expect("get").is_none(),
            "{y}/{pod} is gone"
        );
    }
    let remaining: Vec<String> = lab.lab_pods().map(|p| p.key()).collect();
    assert_eq!(remaining, [format!("{x}/a")]);

    // `lab down` deletes the Pod objects it created.
    wiremesh::cli::lab::down(name, None).expect("lab down");
    assert!(
        x_pods.get_opt("a").await.expect("get").is_none(),
        "x/a's Pod object is gone"
    );
}

/// [`pod_policy_conformance`] against the in-memory API stand-in (no admission, no
/// defaulting, but the same objects and watches), so it runs where no cluster exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_pod_policy_against_the_api_stand_in() {
    if !support::root_or_skip("kubernetes_pod_policy_against_the_api_stand_in") {
        return;
    }
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig()).expect("write kubeconfig");
    let client = k8s::client(&kubeconfig).await.expect("connect");
    let name = format!("kc{}", std::process::id() % 100_000);
    pod_policy_conformance(&client, &kubeconfig, &name).await;
}

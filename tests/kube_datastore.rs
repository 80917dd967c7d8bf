//! The Kubernetes adapter at the request level: kube's client over tower-test's mock transport,
//! with a scripted API server. Checks the exact requests sent (publish = one JSON merge patch of
//! the annotations) and how list/watch answers (410 Gone, 404 for a missing CRD, 403) are handled.
//! The policy kinds are compared with what the etcd adapter keeps for the same objects (a private
//! etcd, as in tests/etcd.rs).

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::watch;
use tower_test::mock::{Handle, SendResponse};

use support::etcd::TestEtcd;
use wiremesh_core::model::{ClusterSnapshot, PublishedWireguard, WgKey};
use wiremesh_core::policy::PolicyResources;
use wiremesh_core::wire::{Kind, RawPolicyResources};
use wiremesh_datastore::etcd::{EtcdDatastore, EtcdWriter, policy_key};
use wiremesh_datastore::kube::{
    ANNOTATION_INTERFACE_V4, ANNOTATION_INTERFACE_V6, ANNOTATION_PUBLIC_KEY,
    ANNOTATION_PUBLIC_KEY_V6, KubeDatastore,
};
use wiremesh_datastore::{Datastore, DatastoreError};

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: String,
    content_type: Option<String>,
    body: Vec<u8>,
}

impl Seen {
    fn is_watch(&self) -> bool {
        self.query.contains("watch=true")
    }
}

/// What the scripted transport answers: a response, or `None` to leave the request pending
/// (a watch that stays open). These request-level tests drive kube's mock transport
/// (tower-test) to inject exact answers (410 Gone, 403, 404 of a CRD); everything that needs an
/// API server over HTTP uses the one stand-in, `support::apiserver`.
type Script = Box<dyn FnMut(&Seen) -> Option<Response<Body>> + Send>;

struct MockApi {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl MockApi {
    fn start(script: Script) -> (Client, MockApi) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let seen = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(serve(handle, script, Arc::clone(&seen)));
        (Client::new(service, "default"), MockApi { seen })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

async fn serve(
    mut handle: Handle<Request<Body>, Response<Body>>,
    mut script: Script,
    seen: Arc<Mutex<Vec<Seen>>>,
) {
    // Pending requests are kept so that their futures stay open.
    let mut pending: Vec<SendResponse<Response<Body>>> = Vec::new();
    while let Some((request, send)) = handle.next_request().await {
        let (parts, body) = request.into_parts();
        let body = body
            .collect_bytes()
            .await
            .map(|b| b.to_vec())
            .unwrap_or_default();
        let request = Seen {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or_default().to_string(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body,
        };
        if let Ok(mut log) = seen.lock() {
            log.push(request.clone());
        }
        match script(&request) {
            Some(response) => send.send_response(response),
            None => pending.push(send),
        }
    }
}

fn respond(status: StatusCode, body: &Value) -> Option<Response<Body>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap_or_default()))
        .ok()
}

fn ok(body: &Value) -> Option<Response<Body>> {
    respond(StatusCode::OK, body)
}

/// A watch answer: one JSON event per line, then the stream ends.
fn watch_events(events: &[Value]) -> Option<Response<Body>> {
    let mut text = Vec::new();
    for event in events {
        text.extend(serde_json::to_vec(event).unwrap_or_default());
        text.push(b'\n');
    }
    Response::builder()
        .status(StatusCode::OK)
        .body(Body::from(text))
        .ok()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

fn node(name: &str, rv: &str, ip: &str, cidr: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": name, "resourceVersion": rv, "annotations": annotations },
        "spec": { "podCIDR": cidr, "podCIDRs": [cidr] },
        "status": { "addresses": [
            { "type": "Hostname", "address": name },
            { "type": "InternalIP", "address": ip }
        ] }
    })
}

fn list(kind: &str, api_version: &str, rv: &str, items: Vec<Value>) -> Value {
    json!({
        "apiVersion": api_version, "kind": kind,
        "metadata": { "resourceVersion": rv }, "items": items
    })
}

fn felix_default(enabled: bool) -> Value {
    json!({
        "apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration",
        "metadata": { "name": "default", "resourceVersion": "5" },
        "spec": { "wireguardEnabled": enabled, "logSeverityScreen": "Info" }
    })
}

const NODES: &str = "/api/v1/nodes";
const FELIX: &str = "/apis/projectcalico.org/v3/felixconfigurations";

const KEY_A: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
const KEY_B: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";

/// Waits (bounded) until the snapshot satisfies `done`; returns it.
async fn wait_for(
    rx: &mut watch::Receiver<ClusterSnapshot>,
    done: impl Fn(&ClusterSnapshot) -> bool,
) -> ClusterSnapshot {
    let result = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            {
                let snap = rx.borrow_and_update();
                if done(&snap) {
                    return snap.clone();
                }
            }
            if rx.changed().await.is_err() {
                return rx.borrow().clone();
            }
        }
    })
    .await;
    match result {
        Ok(snap) => snap,
        Err(_) => panic!(
            "snapshot never reached the expected state: {:?}",
            rx.borrow()
        ),
    }
}

#[tokio::test]
async fn lists_then_watches_and_relists_after_410_gone() {
    let mut node_lists = 0;
    let mut node_watches = 0;
    let (client, server) = MockApi::start(Box::new(move |req| {
        match (req.path.as_str(), req.is_watch()) {
            (NODES, false) => {
                node_lists += 1;
                if node_lists == 1 {
                    ok(&list(
                        "NodeList",
                        "v1",
                        "10",
                        vec![node(
                            "a",
                            "9",
                            "192.0.2.1",
                            "10.244.1.0/24",
                            json!({ ANNOTATION_PUBLIC_KEY: KEY_A, "projectcalico.org/IPv4Address": "198.51.100.1/24" }),
                        )],
                    ))
                } else {
                    // After the 410: b is gone, c is new.
                    ok(&list(
                        "NodeList",
                        "v1",
                        "20",
                        vec![
                            node(
                                "a",
                                "9",
                                "192.0.2.1",
                                "10.244.1.0/24",
                                json!({ ANNOTATION_PUBLIC_KEY: KEY_A }),
                            ),
                            node("c", "19", "192.0.2.3", "10.244.3.0/24", json!({})),
                        ],
                    ))
                }
            }
            (NODES, true) => {
                node_watches += 1;
                if node_watches == 1 {
                    watch_events(&[
                        json!({ "type": "ADDED", "object": node("b", "11", "192.0.2.2", "10.244.2.0/24", json!({ ANNOTATION_PUBLIC_KEY: KEY_B })) }),
                        json!({ "type": "ERROR", "object": status(410, "Expired", "too old resource version: 11 (15)") }),
                    ])
                } else {
                    None
                }
            }
            (FELIX, false) if req.method == "POST" => respond(
                StatusCode::CONFLICT,
                &status(
                    409,
                    "AlreadyExists",
                    "felixconfigurations \"default\" already exists",
                ),
            ),
            (FELIX, false) => ok(&list(
                "FelixConfigurationList",
                "projectcalico.org/v3",
                "5",
                vec![felix_default(true)],
            )),
            _ => None,
        }
    }));
    let datastore = KubeDatastore::from_client(client);
    let (tx, mut rx) = watch::channel(ClusterSnapshot::default());
    let task = tokio::spawn(async move { datastore.run(tx).await });

    // The first list: a, with the IPv4Address annotation (prefix dropped) over the InternalIP.
    let first = wait_for(&mut rx, |s| s.synced).await;
    assert!(first.nodes.contains_key("a"));
    let a = &first.nodes["a"];
    assert_eq!(a.ipv4_address.as_deref(), Some("198.51.100.1"));
    assert_eq!(a.pod_cidrs, vec!["10.244.1.0/24".to_string()]);
    assert_eq!(a.wireguard_public_key.as_deref(), Some(KEY_A));
    let default = first.felix_configurations.get("default");
    assert!(
        matches!(default, Some(Ok(spec)) if spec.spec.wireguard_enabled == Some(true)),
        "{default:?}"
    );

    // The watch adds b, then 410 Gone: the re-list replaces the nodes in one step.
    let last = wait_for(&mut rx, |s| s.nodes.contains_key("c")).await;
    assert_eq!(
        last.nodes.keys().cloned().collect::<Vec<_>>(),
        vec!["a".to_string(), "c".to_string()]
    );
    assert_eq!(last.nodes["c"].ipv4_address.as_deref(), Some("192.0.2.3"));
    assert!(last.synced);
    assert!(last.felix_configurations.contains_key("default"));

    let seen = server.seen();
    let lists = seen
        .iter()
        .filter(|r| r.path == NODES && !r.is_watch())
        .count();
    assert_eq!(
        lists, 2,
        "one initial list and one re-list after 410: {seen:#?}"
    );
    let resumed = seen
        .iter()
        .filter(|r| r.path == NODES && r.is_watch())
        .any(|r| r.query.contains("resourceVersion=20"));
    assert!(
        resumed,
        "the watch resumes from the re-list's version: {seen:#?}"
    );
    // Before listing, `default` is created if missing (here it exists: 409), with an empty spec.
    let posts: Vec<&Seen> = seen.iter().filter(|r| r.method == "POST").collect();
    assert_eq!(posts.len(), 1, "{seen:#?}");
    assert_eq!(posts[0].path, FELIX);
    let created: Value = serde_json::from_slice(&posts[0].body).expect("JSON");
    assert_eq!(created["metadata"]["name"], "default");
    assert_eq!(created["kind"], "FelixConfiguration");
    assert_eq!(created["spec"], json!({}));
    assert!(
        seen.iter().all(|r| r.method == "GET" || r.method == "POST"),
        "{seen:#?}"
    );
    task.abort();
}

#[tokio::test]
async fn missing_felix_configuration_crd_is_a_clear_error() {
    let (client, _server) =
        MockApi::start(Box::new(|req| match (req.path.as_str(), req.is_watch()) {
            (NODES, false) => ok(&list("NodeList", "v1", "1", vec![])),
            (FELIX, false) => Response::builder()
                .status(StatusCode::NOT_FOUND)
                .header(http::header::CONTENT_TYPE, "text/plain")
                .body(Body::from(b"404 page not found\n".to_vec()))
                .ok(),
            _ => None,
        }));
    let datastore = KubeDatastore::from_client(client);
    let (tx, rx) = watch::channel(ClusterSnapshot::default());
    let result = tokio::time::timeout(Duration::from_secs(10), datastore.run(tx))
        .await
        .expect("run must fail, not hang, when the CRD is missing");
    let error = result.expect_err("a missing CRD is fatal");
    assert!(
        matches!(&error, DatastoreError::MissingCrd { crd } if crd == "felixconfigurations.projectcalico.org"),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .contains("felixconfigurations.projectcalico.org")
    );
    assert!(!error.is_transient());
    assert!(
        !rx.borrow().synced,
        "nothing is marked synced without every list"
    );
}

#[tokio::test]
async fn rbac_denial_names_verb_and_resource() {
    let (client, _server) = MockApi::start(Box::new(|req| {
        match (req.path.as_str(), req.is_watch()) {
            (NODES, false) => respond(
                StatusCode::FORBIDDEN,
                &status(
                    403,
                    "Forbidden",
                    "nodes is forbidden: User \"system:serviceaccount:wiremesh:wiremesh\" cannot list resource \"nodes\" in API group \"\" at the cluster scope",
                ),
            ),
            (FELIX, false) if req.method == "POST" => respond(
                StatusCode::CONFLICT,
                &status(
                    409,
                    "AlreadyExists",
                    "felixconfigurations \"default\" already exists",
                ),
            ),
            (FELIX, false) => ok(&list(
                "FelixConfigurationList",
                "projectcalico.org/v3",
                "1",
                vec![],
            )),
            _ => None,
        }
    }));
    let datastore = KubeDatastore::from_client(client);
    let (tx, _rx) = watch::channel(ClusterSnapshot::default());
    let error = tokio::time::timeout(Duration::from_secs(10), datastore.run(tx))
        .await
        .expect("run must fail, not hang, on 403")
        .expect_err("403 is fatal");
    assert!(
        matches!(&error, DatastoreError::Forbidden { verb, resource, .. } if verb == "list" && resource == "nodes"),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("not allowed to list nodes"),
        "{error}"
    );
}

fn parse_key(text: &str) -> WgKey {
    text.parse().expect("test key")
}

#[tokio::test]
async fn publish_sends_one_merge_patch_of_the_four_annotations() {
    let current = node(
        "n1",
        "7",
        "192.0.2.1",
        "10.244.1.0/24",
        json!({
            "other.example/keep": "yes",
            ANNOTATION_PUBLIC_KEY: KEY_B,
            ANNOTATION_PUBLIC_KEY_V6: KEY_B,
            ANNOTATION_INTERFACE_V6: "fd00::1"
        }),
    );
    let reply = current.clone();
    let (client, server) = MockApi::start(Box::new(move |req| match req.method.as_str() {
        "GET" if req.path == "/api/v1/nodes/n1" => ok(&current),
        "PATCH" if req.path == "/api/v1/nodes/n1" => ok(&reply),
        _ => respond(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", "unexpected"),
        ),
    }));
    let datastore = KubeDatastore::from_client(client);
    let published = PublishedWireguard {
        public_key_v4: Some(parse_key(KEY_A)),
        public_key_v6: None,
        interface_ipv4_address: Some("10.244.1.1".parse().expect("ip")),
        interface_ipv6_address: None,
    };
    datastore.publish("n1", &published).await.expect("publish");

    let seen = server.seen();
    let patches: Vec<&Seen> = seen.iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(patches.len(), 1, "{seen:#?}");
    let patch = patches[0];
    assert_eq!(patch.path, "/api/v1/nodes/n1");
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    let body: Value = serde_json::from_slice(&patch.body).expect("JSON body");
    assert_eq!(
        body,
        json!({ "metadata": { "annotations": {
            ANNOTATION_PUBLIC_KEY: KEY_A,
            ANNOTATION_PUBLIC_KEY_V6: null,
            ANNOTATION_INTERFACE_V4: "10.244.1.1",
            ANNOTATION_INTERFACE_V6: null
        } } })
    );
    assert!(
        seen.iter()
            .all(|r| r.method == "GET" || r.method == "PATCH"),
        "never a PUT: {seen:#?}"
    );
}

#[tokio::test]
async fn publish_skips_the_patch_when_already_current() {
    let current = node(
        "n1",
        "7",
        "192.0.2.1",
        "10.244.1.0/24",
        json!({ ANNOTATION_PUBLIC_KEY: KEY_A, ANNOTATION_INTERFACE_V4: "10.244.1.1" }),
    );
    let (client, server) = MockApi::start(Box::new(move |req| match req.method.as_str() {
        "GET" => ok(&current),
        _ => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            &status(500, "InternalError", "no writes expected"),
        ),
    }));
    let datastore = KubeDatastore::from_client(client);
    let published = PublishedWireguard {
        public_key_v4: Some(parse_key(KEY_A)),
        interface_ipv4_address: Some("10.244.1.1".parse().expect("ip")),
        ..PublishedWireguard::default()
    };
    datastore.publish("n1", &published).await.expect("publish");
    let seen = server.seen();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert_eq!(seen[0].method, "GET");
}

#[tokio::test]
async fn publish_on_a_missing_node_is_node_not_found() {
    let (client, _server) = MockApi::start(Box::new(|_| {
        respond(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", "nodes \"n9\" not found"),
        )
    }));
    let datastore = KubeDatastore::from_client(client);
    let error = datastore
        .publish("n9", &PublishedWireguard::default())
        .await
        .expect_err("missing node");
    assert!(
        matches!(error, DatastoreError::NodeNotFound { ref node } if node == "n9"),
        "{error:?}"
    );
}

#[tokio::test]
async fn publish_denied_names_the_verb() {
    let current = node("n1", "7", "192.0.2.1", "10.244.1.0/24", json!({}));
    let (client, _server) = MockApi::start(Box::new(move |req| match req.method.as_str() {
        "GET" => ok(&current),
        _ => respond(
            StatusCode::FORBIDDEN,
            &status(403, "Forbidden", "cannot patch resource \"nodes\""),
        ),
    }));
    let datastore = KubeDatastore::from_client(client);
    let published = PublishedWireguard {
        public_key_v4: Some(parse_key(KEY_A)),
        ..PublishedWireguard::default()
    };
    let error = datastore
        .publish("n1", &published)
        .await
        .expect_err("denied");
    assert!(
        matches!(&error, DatastoreError::Forbidden { verb, resource, .. } if verb == "patch" && resource == "nodes"),
        "{error:?}"
    );
}

#[tokio::test]
async fn problems_become_warning_events_on_the_object() {
    use wiremesh_datastore::{ObjectProblem, ProblemObject};
    let (client, server) = MockApi::start(Box::new(|req| {
        if req.method == "POST" {
            let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
            respond(StatusCode::CREATED, &body)
        } else {
            respond(
                StatusCode::NOT_FOUND,
                &status(404, "NotFound", "unexpected"),
            )
        }
    }));
    let datastore = KubeDatastore::from_client(client);
    datastore
        .report(&[ObjectProblem {
            object: ProblemObject::Node("n4".into()),
            reason: "MalformedWireguardKey".into(),
            message: "not peered for IPv4: malformed WireGuard public key".into(),
        }])
        .await;
    // report() returns at once; the Event is sent in the background.
    let mut posts = Vec::new();
    for _ in 0..100 {
        posts = server
            .seen()
            .into_iter()
            .filter(|r| r.method == "POST")
            .collect();
        if !posts.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(posts.len(), 1, "{:#?}", server.seen());
    assert_eq!(
        posts[0].path,
        "/apis/events.k8s.io/v1/namespaces/default/events"
    );
    let event: Value = serde_json::from_slice(&posts[0].body).expect("JSON");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "MalformedWireguardKey");
    assert_eq!(event["reportingController"], "wiremesh");
    assert_eq!(event["regarding"]["kind"], "Node");
    assert_eq!(event["regarding"]["name"], "n4");
    assert_eq!(event["regarding"]["uid"], "n4");
    assert!(
        event["note"]
            .as_str()
            .is_some_and(|n| n.contains("malformed WireGuard public key"))
    );
}

// ---------------------------------------------------------------------------------------------
// Policy kinds
// ---------------------------------------------------------------------------------------------

const CALICO: &str = "/apis/projectcalico.org/v3/";
const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const SERVICE_ACCOUNTS: &str = "/api/v1/serviceaccounts";
const K8S_NETWORK_POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";

/// Where a policy kind is listed and watched across all namespaces.
fn kind_path(kind: Kind) -> String {
    match kind {
        Kind::Pod => PODS.into(),
        Kind::Namespace => NAMESPACES.into(),
        Kind::ServiceAccount => SERVICE_ACCOUNTS.into(),
        Kind::KubernetesNetworkPolicy => K8S_NETWORK_POLICIES.into(),
        _ => format!("{CALICO}{}", kind.plural()),
    }
}

/// The policy kind a request path lists or watches (all namespaces), if any.
fn policy_kind(path: &str) -> Option<Kind> {
    Kind::KUBERNETES.into_iter().find(|k| kind_path(*k) == path)
}

/// A list of `kind` as the API server answers it.
fn kind_list(kind: Kind, rv: &str, items: Vec<Value>) -> Value {
    list(
        &format!("{}List", kind.kind_name()),
        kind.api_version(),
        rv,
        items,
    )
}

/// One object of every Calico policy kind, as its author wrote it (and as `calicoctl` stores
/// it in etcd).
fn authored() -> Vec<(Kind, &'static str, Value)> {
    let object = |kind: Kind, metadata: Value, spec: Value| {
        json!({ "apiVersion": kind.api_version(), "kind": kind.kind_name(),
                "metadata": metadata, "spec": spec })
    };
    vec![
        (
            Kind::GlobalNetworkPolicy,
            "deny-blocked",
            object(
                Kind::GlobalNetworkPolicy,
                json!({ "name": "deny-blocked" }),
                json!({ "tier": "security", "order": 10, "selector": "host-endpoint == 'true'",
                        "ingress": [{ "action": "Deny", "source": { "selector": "list == 'deny'" } },
                                    { "action": "Pass" }] }),
            ),
        ),
        (
            Kind::NetworkPolicy,
            "ns1/allow-dns",
            object(
                Kind::NetworkPolicy,
                json!({ "name": "allow-dns", "namespace": "ns1" }),
                json!({ "selector": "all()",
                        "egress": [{ "action": "Allow", "protocol": "UDP",
                                     "destination": { "ports": [53] } }] }),
            ),
        ),
        (
            Kind::Tier,
            "security",
            object(
                Kind::Tier,
                json!({ "name": "security" }),
                json!({ "order": 100, "defaultAction": "Pass" }),
            ),
        ),
        (
            Kind::HostEndpoint,
            "node1-eth0",
            object(
                Kind::HostEndpoint,
                json!({ "name": "node1-eth0", "labels": { "host-endpoint": "true" } }),
                json!({ "node": "node1", "interfaceName": "eth0", "expectedIPs": ["192.0.2.1"] }),
            ),
        ),
        (
            Kind::GlobalNetworkSet,
            "blocked",
            object(
                Kind::GlobalNetworkSet,
                json!({ "name": "blocked", "labels": { "list": "deny" } }),
                json!({ "nets": ["198.51.100.0/24"] }),
            ),
        ),
        (
            Kind::NetworkSet,
            "ns1/dns-servers",
            object(
                Kind::NetworkSet,
                json!({ "name": "dns-servers", "namespace": "ns1", "labels": { "role": "dns" } }),
                json!({ "nets": ["192.0.2.53/32"] }),
            ),
        ),
    ]
}

/// `object` as the API server serves it: with its bookkeeping added.
fn served(object: &Value, rv: &str) -> Value {
    let mut object = object.clone();
    let applied = object.to_string();
    if let Some(meta) = object["metadata"].as_object_mut() {
        meta.insert("uid".into(), json!("6f1c2a9e-0000-4000-8000-00000000beef"));
        meta.insert("resourceVersion".into(), json!(rv));
        meta.insert("generation".into(), json!(1));
        meta.insert("creationTimestamp".into(), json!("2025-01-01T00:00:00Z"));
        meta.insert(
            "managedFields".into(),
            json!([{ "manager": "kubectl-client-side-apply", "operation": "Update",
                     "apiVersion": "projectcalico.org/v3", "fieldsType": "FieldsV1",
                     "fieldsV1": { "f:spec": {} } }]),
        );
        let annotations = meta
            .entry("annotations")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .map(|a| {
                a.insert(
                    "kubectl.kubernetes.io/last-applied-configuration".into(),
                    json!(applied),
                )
            });
        assert!(annotations.is_some());
    }
    object
}

/// The answers every run needs: nodes, FelixConfigurations (default exists), empty lists of
/// policy kinds not otherwise scripted, and watches left open.
fn base_answer(req: &Seen) -> Option<Response<Body>> {
    match (req.path.as_str(), req.is_watch()) {
        (NODES, false) => ok(&list("NodeList", "v1", "1", vec![])),
        (FELIX, false) if req.method == "POST" => respond(
            StatusCode::CONFLICT,
            &status(
                409,
                "AlreadyExists",
                "felixconfigurations \"default\" already exists",
            ),
        ),
        (FELIX, false) => ok(&list(
            "FelixConfigurationList",
            "projectcalico.org/v3",
            "1",
            vec![felix_default(false)],
        )),
        (path, false) => ok(&kind_list(policy_kind(path)?, "1", vec![])),
        _ => None,
    }
}

#[tokio::test]
async fn policy_kinds_land_in_the_snapshot_as_the_etcd_adapter_keeps_them() {
    let objects = authored();
    let lists = objects.clone();
    let (client, server) = MockApi::start(Box::new(move |req| {
        match (req.path.as_str(), req.is_watch()) {
            (path, false) if policy_kind(path).is_some() => {
                let kind = policy_kind(path)?;
                let items = lists
                    .iter()
                    .filter(|(k, _, _)| *k == kind)
                    .map(|(_, _, object)| served(object, "7"))
                    .collect();
                ok(&kind_list(kind, "8", items))
            }
            _ => base_answer(req),
        }
    }));
    let datastore = KubeDatastore::from_client(client).with_policy(true);
    let (tx, mut rx) = watch::channel(ClusterSnapshot::default());
    let task = tokio::spawn(async move { datastore.run(tx).await });
    let kube = wait_for(&mut rx, |s| s.synced).await;
    task.abort();

    // Every kind listed, across all namespaces (no namespace in the path).
    let seen = server.seen();
    for kind in Kind::KUBERNETES {
        let path = kind_path(kind);
        assert!(
            seen.iter().any(|r| r.path == path && !r.is_watch()),
            "{kind} listed at {path}: {seen:#?}"
        );
    }
    // Exactly the authored objects, keyed as in Calico's etcd keys.
    let mut want = RawPolicyResources::default();
    for (kind, key, object) in &objects {
        want.insert(*kind, key.to_string(), object.clone());
    }
    assert_eq!(kube.policy, want);
    assert_eq!(
        kube.policy.objects[&Kind::NetworkPolicy]
            .keys()
            .collect::<Vec<_>>(),
        vec!["ns1/allow-dns"]
    );

    // The etcd adapter, given the same objects under Calico's keys, keeps the same.
    let etcd = TestEtcd::start().await;
    let mut writer = EtcdWriter::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("etcd writer");
    for (kind, key, object) in &objects {
        writer
            .put_raw(&policy_key(*kind, key), object.to_string())
            .await
            .expect("put");
    }
    let store = EtcdDatastore::connect(vec![etcd.endpoint.clone()])
        .await
        .expect("etcd datastore");
    let (tx, mut rx) = watch::channel(ClusterSnapshot::default());
    let task = tokio::spawn(async move { store.run(tx).await });
    let from_etcd = wait_for(&mut rx, |s| s.synced).await;
    task.abort();
    assert_eq!(kube.policy, from_etcd.policy);

    // Hence validation is identical too, and these objects are valid.
    let validated = PolicyResources::from_raw(&kube.policy);
    assert_eq!(validated.errors, vec![]);
    assert_eq!(validated, PolicyResources::from_raw(&from_etcd.policy));
    assert_eq!(validated.policies.len(), 2);
    assert_eq!(validated.host_endpoints.len(), 1);
    assert_eq!(validated.network_sets.len(), 2);
}

#[tokio::test]
async fn global_network_set_watch_events_update_the_snapshot() {
    let set = |name: &str, rv: &str, nets: &[&str]| {
        served(
            &json!({ "apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
                     "metadata": { "name": name, "labels": { "list": "deny" } },
                     "spec": { "nets": nets } }),
            rv,
        )
    };
    let gns = format!("{CALICO}globalnetworksets");
    let path = gns.clone();
    let mut watches = 0;
    let (client, server) = MockApi::start(Box::new(move |req| {
        if req.path != path {
            return base_answer(req);
        }
        if !req.is_watch() {
            return ok(&list(
                "GlobalNetworkSetList",
                "projectcalico.org/v3",
                "10",
                vec![
                    set("a", "9", &["10.0.0.0/8"]),
                    set("c", "9", &["192.0.2.0/24"]),
                ],
            ));
        }
        watches += 1;
        if watches > 1 {
            return None;
        }
        watch_events(&[
            json!({ "type": "MODIFIED", "object": set("a", "11", &["10.1.0.0/16", "10.2.0.0/16"]) }),
            json!({ "type": "DELETED", "object": set("c", "12", &["192.0.2.0/24"]) }),
        ])
    }));
    let datastore = KubeDatastore::from_client(client).with_policy(true);
    let (tx, mut rx) = watch::channel(ClusterSnapshot::default());
    let task = tokio::spawn(async move { datastore.run(tx).await });
    let want = json!({
        "apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
        "metadata": { "name": "a", "labels": { "list": "deny" } },
        "spec": { "nets": ["10.1.0.0/16", "10.2.0.0/16"] }
    });
    let last = wait_for(&mut rx, |s| {
        s.policy
            .objects
            .get(&Kind::GlobalNetworkSet)
            .is_some_and(|m| m.len() == 1 && m.get("a") == Some(&want))
    })
    .await;
    task.abort();
    assert!(last.synced);
    assert_eq!(
        last.policy.objects.keys().collect::<Vec<_>>(),
        vec![&Kind::GlobalNetworkSet]
    );
    let seen = server.seen();
    assert!(
        seen.iter()
            .any(|r| r.path == gns && r.is_watch() && r.query.contains("resourceVersion=10")),
        "the watch starts at the list's version: {seen:#?}"
    );
}

#[tokio::test]
async fn missing_policy_crd_is_a_clear_error_naming_it() {
    let (client, _server) = MockApi::start(Box::new(|req| {
        if req.path == format!("{CALICO}globalnetworksets") && !req.is_watch() {
            return Response::builder()
                .status(StatusCode::NOT_FOUND)
                .header(http::header::CONTENT_TYPE, "text/plain")
                .body(Body::from(b"404 page not found\n".to_vec()))
                .ok();
        }
        base_answer(req)
    }));
    let datastore = KubeDatastore::from_client(client).with_policy(true);
    let (tx, rx) = watch::channel(ClusterSnapshot::default());
    let error = tokio::time::timeout(Duration::from_secs(10), datastore.run(tx))
        .await
        .expect("run must fail, not hang, when a policy CRD is missing")
        .expect_err("a missing policy CRD is fatal");
    assert!(
        matches!(&error, DatastoreError::MissingCrd { crd } if crd == "globalnetworksets.projectcalico.org"),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "the CustomResourceDefinition globalnetworksets.projectcalico.org is not installed; apply the CRDs first (kubectl apply -f crds/)"
    );
    assert!(!error.is_transient());
    assert!(!rx.borrow().synced);
}

#[tokio::test]
async fn policy_rbac_denial_names_verb_and_resource() {
    let (client, _server) = MockApi::start(Box::new(|req| {
        if req.path == format!("{CALICO}hostendpoints") && !req.is_watch() {
            return respond(
                StatusCode::FORBIDDEN,
                &status(
                    403,
                    "Forbidden",
                    "hostendpoints.projectcalico.org is forbidden: User \"system:serviceaccount:wiremesh:wiremesh\" cannot list resource \"hostendpoints\"",
                ),
            );
        }
        base_answer(req)
    }));
    let datastore = KubeDatastore::from_client(client).with_policy(true);
    let (tx, _rx) = watch::channel(ClusterSnapshot::default());
    let error = tokio::time::timeout(Duration::from_secs(10), datastore.run(tx))
        .await
        .expect("run must fail, not hang, on 403")
        .expect_err("403 is fatal");
    assert!(
        matches!(&error, DatastoreError::Forbidden { verb, resource, .. }
            if verb == "list" && resource == "hostendpoints.projectcalico.org"),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .starts_with("not allowed to list hostendpoints.projectcalico.org ("),
        "{error}"
    );
}

#[tokio::test]
async fn without_host_policy_no_policy_kind_is_requested() {
    // Policy objects are there to be found: if they were asked for, the snapshot would show them.
    let objects = authored();
    let (client, server) = MockApi::start(Box::new(move |req| {
        match (policy_kind(&req.path), req.is_watch()) {
            (Some(kind), false) => {
                let items = objects
                    .iter()
                    .filter(|(k, _, _)| *k == kind)
                    .map(|(_, _, object)| served(object, "3"))
                    .collect();
                ok(&kind_list(kind, "4", items))
            }
            _ => base_answer(req),
        }
    }));
    let datastore = KubeDatastore::from_client(client).with_policy(false);
    let (tx, mut rx) = watch::channel(ClusterSnapshot::default());
    let task = tokio::spawn(async move { datastore.run(tx).await });
    let synced = wait_for(&mut rx, |s| s.synced).await;
    // Every stream has been polled by now (they start together); give stragglers a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    task.abort();
    assert_eq!(synced.policy, RawPolicyResources::default());
    let seen = server.seen();
    let paths: Vec<&str> = seen.iter().map(|r| r.path.as_str()).collect();
    assert!(paths.iter().all(|p| policy_kind(p).is_none()), "{paths:#?}");
    // The requests that were made: node and FelixConfiguration list/watch and the create.
    assert!(
        paths.iter().all(|p| *p == NODES || *p == FELIX),
        "{paths:#?}"
    );
    assert!(
        seen.iter().any(|r| r.path == NODES && r.is_watch()),
        "{seen:#?}"
    );
}

#[tokio::test]
async fn policy_problems_become_events_on_the_object_in_its_namespace() {
    use wiremesh_datastore::{ObjectProblem, ProblemObject};
    let objects = authored();
    let (client, server) = MockApi::start(Box::new(move |req| {
        if req.method == "POST" && req.path.starts_with("/apis/events.k8s.io/") {
            let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
            return respond(StatusCode::CREATED, &body);
        }
        match (policy_kind(&req.path), req.is_watch()) {
            (Some(Kind::NetworkPolicy), false) => {
                let items = objects
                    .iter()
                    .filter(|(k, _, _)| *k == Kind::NetworkPolicy)
                    .map(|(_, _, object)| served(object, "3"))
                    .collect();
                ok(&list(
                    "NetworkPolicyList",
                    "projectcalico.org/v3",
                    "4",
                    items,
                ))
            }
            _ => base_answer(req),
        }
    }));
    let datastore = Arc::new(KubeDatastore::from_client(client).with_policy(true));
    let (tx, mut rx) = watch::channel(ClusterSnapshot::default());
    let task = {
        let datastore = Arc::clone(&datastore);
        tokio::spawn(async move { datastore.run(tx).await })
    };
    wait_for(&mut rx, |s| s.synced).await;
    let problem = |name: &str| ObjectProblem {
        object: ProblemObject::Policy {
            kind: Kind::NetworkPolicy,
            namespace: Some("ns1".into()),
            name: name.into(),
        },
        reason: "InvalidNetworkPolicy".into(),
        message: format!("NetworkPolicy \"ns1/{name}\": spec.egress[0].action: unknown"),
    };
    // One watched object (its UID is known) and one the adapter never saw.
    datastore
        .report(&[problem("allow-dns"), problem("gone")])
        .await;
    let mut posts = Vec::new();
    for _ in 0..100 {
        posts = server
            .seen()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path.starts_with("/apis/events.k8s.io/"))
            .collect();
        if posts.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    assert_eq!(posts.len(), 2, "{:#?}", server.seen());
    let events: Vec<Value> = posts
        .iter()
        .map(|p| serde_json::from_slice(&p.body).expect("JSON"))
        .collect();
    assert_eq!(
        posts[0].path,
        "/apis/events.k8s.io/v1/namespaces/ns1/events"
    );
    assert_eq!(events[0]["type"], "Warning");
    assert_eq!(events[0]["reason"], "InvalidNetworkPolicy");
    assert_eq!(
        events[0]["regarding"],
        json!({ "apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
                "namespace": "ns1", "name": "allow-dns",
                "uid": "6f1c2a9e-0000-4000-8000-00000000beef" })
    );
    assert_eq!(
        events[1]["regarding"],
        json!({ "apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
                "namespace": "ns1", "name": "gone" })
    );
}

// ---------------------------------------------------------------------------------------------
// Pods, Namespaces, ServiceAccounts and Kubernetes NetworkPolicies
// ---------------------------------------------------------------------------------------------

/// A pod as the API server serves it (bookkeeping, images, statuses), in namespace `shop`.
fn pod(name: &str, rv: &str, node: &str, ip: Option<&str>, labels: Value) -> Value {
    let mut status = json!({
        "phase": "Running", "hostIP": "192.0.2.1",
        "conditions": [{ "type": "Ready", "status": "True" }],
        "containerStatuses": [{ "name": "main", "ready": true, "restartCount": 0,
                                "image": "nginx:1.27", "imageID": "", "state": { "running": {} } }]
    });
    if let (Some(ip), Some(map)) = (ip, status.as_object_mut()) {
        map.insert("podIP".into(), json!(ip));
        map.insert("podIPs".into(), json!([{ "ip": ip }]));
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "shop", "resourceVersion": rv,
            "uid": format!("00000000-0000-4000-8000-{:0>12}", name.len()),
            "labels": labels,
            "managedFields": [{ "manager": "kubelet", "operation": "Update" }]
        },
        "spec": {
            "nodeName": node, "serviceAccountName": "web",
            "containers": [{ "name": "main", "image": "nginx:1.27",
                             "env": [{ "name": "MODE", "value": "prod" }],
                             "ports": [{ "name": "http", "containerPort": 80, "protocol": "TCP" }] }]
        },
        "status": status
    })
}

fn namespace(name: &str, rv: &str, labels: Value) -> Value {
    json!({ "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": name, "resourceVersion": rv, "labels": labels },
            "spec": { "finalizers": ["kubernetes"] }, "status": { "phase": "Active" } })
}

fn service_account(name: &str, rv: &str, labels: Value) -> Value {
    json!({ "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": { "name": name, "namespace": "shop", "resourceVersion": rv,
                          "labels": labels },
            "secrets": [{ "name": format!("{name}-token-x1y2z") }] })
}

fn k8s_network_policy(name: &str, rv: &str, port: u16) -> Value {
    served(
        &json!({ "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                 "metadata": { "name": name, "namespace": "shop" },
                 "spec": { "podSelector": { "matchLabels": { "app": "web" } },
                           "policyTypes": ["Ingress"],
                           "ingress": [{ "ports": [{ "protocol": "TCP", "port": port }] }] } }),
        rv,
    )
}

/// Answers the list of each kind with `lists`, its first watch with `events` (then leaves the
/// watch open), and everything else with [`base_answer`].
fn kinds_script(lists: Vec<(Kind, Vec<Value>)>, events: Vec<(Kind, Vec<Value>)>) -> Script {
    let mut watched: Vec<Kind> = Vec::new();
    Box::new(move |req| {
        let Some(kind) = policy_kind(&req.path) else {
            return base_answer(req);
        };
        if !req.is_watch() {
            let items = lists
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, items)| items.clone())
                .unwrap_or_default();
            return ok(&kind_list(kind, "100", items));
        }
        if watched.contains(&kind) {
            return None;
        }
        watched.push(kind);
        let answer = events.iter().find(|(k, _)| *k == kind)?;
        watch_events(&answer.1)
    })
}

#[tokio::test]
async fn pods_namespaces_service_accounts_and_network_policies_arrive_change_and_go() {
    let web = json!({ "app": "web" });
    let mut host = pod("host-agent", "11", "node1", Some("192.0.2.1"), json!({}));
    host["spec"]["hostNetwork"] = json!(true);
    // Only the readiness condition changes: nothing policy reads.
    let mut web_unready = pod("web-0", "101", "node1", Some("10.244.1.5"), web.clone());
    web_unready["status"]["conditions"] = json!([{ "type": "Ready", "status": "False" }]);
    web_unready["status"]["containerStatuses"][0]["ready"] = json!(false);
    let script = kinds_script(
        vec![
            (
                Kind::Pod,
                vec![
                    pod("web-0", "10", "node1", Some("10.244.1.5"), web.clone()),
                    host,
                    pod("web-1", "12", "node1", None, web.clone()),
                    pod(
                        "db-0",
                        "13",
                        "node2",
                        Some("10.244.2.9"),
                        json!({ "app": "db" }),
                    ),
                ],
            ),
            (
                Kind::Namespace,
                vec![namespace("shop", "5", json!({ "team": "a" }))],
            ),
            (
                Kind::ServiceAccount,
                vec![
                    service_account("web", "6", json!({ "role": "frontend" })),
                    service_account("old", "7", json!({})),
                ],
            ),
            (
                Kind::KubernetesNetworkPolicy,
                vec![k8s_network_policy("web-ingress", "8", 80)],
            ),
        ],
        vec![
            (
                Kind::Pod,
                vec![
                    json!({ "type": "MODIFIED", "object": web_unready }),
                    json!({ "type": "MODIFIED",
                            "object": pod("web-1", "102", "node1", Some("10.244.1.6"), web.clone()) }),
                    json!({ "type": "DELETED",
                            "object": pod("db-0", "103", "node2", Some("10.244.2.9"), json!({ "app": "db" })) }),
                ],
            ),
            (
                Kind::Namespace,
                vec![
                    json!({ "type": "ADDED", "object": namespace("other", "104", json!({})) }),
                    json!({ "type": "MODIFIED",
                            "object": namespace("shop", "105", json!({ "team": "b" })) }),
                ],
            ),
            (
                Kind::ServiceAccount,
                vec![
                    json!({ "type": "DELETED", "object": service_account("old", "106", json!({})) }),
                ],
            ),
            (
                Kind::KubernetesNetworkPolicy,
                vec![
                    json!({ "type": "MODIFIED", "object": k8s_network_policy("web-ingress", "107", 8080) }),
                    json!({ "type": "ADDED", "object": k8s_network_policy("deny-all", "108", 1) }),
                ],
            ),
        ],
    );
    let (client, server) = MockApi::start(script);
    let datastore = KubeDatastore::from_client(client).with_policy(true);
    let (tx, mut rx) = watch::channel(ClusterSnapshot::default());
    let task = tokio::spawn(async move { datastore.run(tx).await });

    let keys = |s: &ClusterSnapshot, kind: Kind| -> Vec<String> {
        s.policy
            .objects
            .get(&kind)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    let first = wait_for(&mut rx, |s| s.synced).await;
    // The first snapshot may already hold some watch events; the lists are all in it.
    assert!(keys(&first, Kind::Pod).contains(&"shop/web-0".to_string()));
    assert!(keys(&first, Kind::Namespace).contains(&"shop".to_string()));
    assert!(keys(&first, Kind::ServiceAccount).contains(&"shop/web".to_string()));

    let last = wait_for(&mut rx, |s| {
        keys(s, Kind::KubernetesNetworkPolicy) == ["shop/deny-all", "shop/web-ingress"]
            && keys(s, Kind::Pod) == ["shop/host-agent", "shop/web-0", "shop/web-1"]
            && keys(s, Kind::Namespace) == ["other", "shop"]
            && keys(s, Kind::ServiceAccount) == ["shop/web"]
            && s.policy.objects[&Kind::Pod]["shop/web-1"]["status"]["podIP"] == "10.244.1.6"
            && s.policy.objects[&Kind::Namespace]["shop"]["metadata"]["labels"]["team"] == "b"
            && s.policy.objects[&Kind::KubernetesNetworkPolicy]["shop/web-ingress"]["spec"]
                ["ingress"][0]["ports"][0]["port"]
                == 8080
    })
    .await;
    task.abort();

    // Each kind listed and watched across all namespaces.
    let seen = server.seen();
    for path in [PODS, NAMESPACES, SERVICE_ACCOUNTS, K8S_NETWORK_POLICIES] {
        assert!(
            seen.iter().any(|r| r.path == path && !r.is_watch()),
            "{path} listed: {seen:#?}"
        );
        assert!(
            seen.iter()
                .any(|r| r.path == path && r.is_watch() && r.query.contains("resourceVersion=100")),
            "{path} watched from the list's version: {seen:#?}"
        );
    }
    // A pod is kept as policy reads it, nothing more.
    assert_eq!(
        last.policy.objects[&Kind::Pod]["shop/web-0"],
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "web-0", "namespace": "shop", "labels": { "app": "web" } },
            "spec": { "nodeName": "node1", "serviceAccountName": "web",
                      "containers": [{ "name": "main", "ports": [
                          { "name": "http", "containerPort": 80, "protocol": "TCP" }] }] },
            "status": { "phase": "Running", "podIP": "10.244.1.5",
                        "podIPs": [{ "ip": "10.244.1.5" }] }
        })
    );
    assert_eq!(
        last.policy.objects[&Kind::ServiceAccount]["shop/web"],
        json!({ "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": { "name": "web", "namespace": "shop", "labels": { "role": "frontend" } } })
    );

    // Through the existing decode: endpoints for the pods with an IP that are not on the host
    // network (the host-network pod and a pod without IP yield none), the namespace and
    // service-account profiles, and both NetworkPolicies.
    let validated = PolicyResources::from_raw(&last.policy);
    assert_eq!(validated.errors, vec![]);
    let endpoints: Vec<(&str, String)> = validated
        .workload_endpoints
        .iter()
        .map(|e| {
            (
                e.pod.as_str(),
                e.ips.iter().map(|ip| ip.to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(
        endpoints,
        [
            ("web-0", "10.244.1.5/32".to_string()),
            ("web-1", "10.244.1.6/32".to_string())
        ]
    );
    assert_eq!(
        validated.profiles.keys().collect::<Vec<_>>(),
        ["kns.other", "kns.shop", "ksa.shop.web"]
    );
    assert_eq!(
        validated.profiles["kns.shop"]
            .labels_to_apply
            .get("pcns.team"),
        Some(&"b".to_string())
    );
    assert_eq!(validated.policies.len(), 2);
}

/// A pod with no IP and a host-network pod are in the snapshot but are no endpoint; once the
/// pod gets its IP it becomes one.
#[tokio::test]
async fn pods_without_ip_or_on_the_host_network_are_no_endpoint() {
    let mut host = pod("host-agent", "11", "node1", Some("192.0.2.1"), json!({}));
    host["spec"]["hostNetwork"] = json!(true);
    let script = kinds_script(
        vec![(
            Kind::Pod,
            vec![
                host,
                pod("web-1", "12", "node1", None, json!({ "app": "web" })),
            ],
        )],
        vec![],
    );
    let (client, _server) = MockApi::start(script);
    let datastore = KubeDatastore::from_client(client).with_policy(true);
    let (tx, mut rx) = watch::channel(ClusterSnapshot::default());
    let task = tokio::spawn(async move { datastore.run(tx).await });
    let synced = wait_for(&mut rx, |s| s.synced).await;
    task.abort();
    assert_eq!(synced.policy.objects[&Kind::Pod].len(), 2);
    let validated = PolicyResources::from_raw(&synced.policy);
    assert_eq!(validated.errors, vec![]);
    assert_eq!(validated.workload_endpoints, vec![]);
}

/// A failed re-list (here its second page) never replaces a kind's cache: the last complete
/// list of pods stays in the snapshot, the failure shows in the sync health, and a later
/// complete list replaces the cache in one step.
#[tokio::test]
async fn a_failed_pod_relist_keeps_the_last_complete_list() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let recovered = Arc::new(AtomicBool::new(false));
    let recover = Arc::clone(&recovered);
    let mut pod_lists = 0;
    let mut pod_watches = 0;
    let (client, server) = MockApi::start(Box::new(move |req| {
        if req.path != PODS {
            return base_answer(req);
        }
        if req.is_watch() {
            pod_watches += 1;
            // The first watch ends with 410 Gone: the watcher re-lists.
            return if pod_watches == 1 {
                watch_events(&[
                    json!({ "type": "ERROR", "object": status(410, "Expired", "too old resource version") }),
                ])
            } else {
                None
            };
        }
        pod_lists += 1;
        let web =
            |name: &str, ip: &str| pod(name, "10", "node1", Some(ip), json!({ "app": "web" }));
        if pod_lists == 1 {
            return ok(&kind_list(
                Kind::Pod,
                "10",
                vec![web("web-0", "10.244.1.5"), web("web-1", "10.244.1.6")],
            ));
        }
        if recover.load(Ordering::SeqCst) {
            return ok(&kind_list(
                Kind::Pod,
                "30",
                vec![web("web-0", "10.244.1.5"), web("web-2", "10.244.1.7")],
            ));
        }
        // The first re-list fails on its second page, later ones at once.
        if pod_lists == 2 && !req.query.contains("continue=") {
            let mut page = kind_list(Kind::Pod, "20", vec![web("web-0", "10.244.1.5")]);
            page["metadata"]["continue"] = json!("page-2");
            return ok(&page);
        }
        respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            &status(500, "InternalError", "etcd leader changed"),
        )
    }));
    let datastore = Arc::new(KubeDatastore::from_client(client).with_policy(true));
    let health = datastore.sync_health();
    let (tx, mut rx) = watch::channel(ClusterSnapshot::default());
    let task = {
        let datastore = Arc::clone(&datastore);
        tokio::spawn(async move { datastore.run(tx).await })
    };
    let pods = |s: &ClusterSnapshot| -> Vec<String> {
        s.policy
            .objects
            .get(&Kind::Pod)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    let first = wait_for(&mut rx, |s| s.synced).await;
    assert_eq!(pods(&first), ["shop/web-0", "shop/web-1"]);

    // Wait until the failed page has been answered, then a failed re-list, and the watcher
    // has asked again after that (so both failures have gone through the adapter).
    let failed_then_retried = || {
        let seen = server.seen();
        let lists: Vec<&Seen> = seen
            .iter()
            .filter(|r| r.path == PODS && !r.is_watch())
            .collect();
        lists
            .iter()
            .position(|r| r.query.contains("continue="))
            .is_some_and(|at| lists.len() > at + 2)
    };
    for _ in 0..200 {
        if failed_then_retried() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failed_then_retried(), "{:#?}", server.seen());
    assert_eq!(
        pods(&rx.borrow()),
        ["shop/web-0", "shop/web-1"],
        "the last complete list stays in force"
    );
    assert!(rx.borrow().synced);
    let state = health.state();
    assert!(!state.current(), "{state:?}");
    assert!(
        state.error.as_deref().is_some_and(|e| !e.is_empty()),
        "{state:?}"
    );

    recovered.store(true, Ordering::SeqCst);
    let last = wait_for(&mut rx, |s| pods(s) == ["shop/web-0", "shop/web-2"]).await;
    task.abort();
    assert!(last.synced);
}

#[tokio::test]
async fn pod_rbac_denial_names_verb_and_resource() {
    let (client, _server) = MockApi::start(Box::new(|req| {
        if req.path == PODS && !req.is_watch() {
            return respond(
                StatusCode::FORBIDDEN,
                &status(
                    403,
                    "Forbidden",
                    "pods is forbidden: User \"system:serviceaccount:wiremesh:wiremesh\" cannot list resource \"pods\" in API group \"\" at the cluster scope",
                ),
            );
        }
        base_answer(req)
    }));
    let datastore = KubeDatastore::from_client(client).with_policy(true);
    let (tx, rx) = watch::channel(ClusterSnapshot::default());
    let error = tokio::time::timeout(Duration::from_secs(10), datastore.run(tx))
        .await
        .expect("run must fail, not hang, on 403")
        .expect_err("403 is fatal");
    assert!(
        matches!(&error, DatastoreError::Forbidden { verb, resource, .. }
            if verb == "list" && resource == "pods"),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .starts_with("not allowed to list pods (pods is forbidden: "),
        "{error}"
    );
    assert!(!error.is_transient());
    assert!(!rx.borrow().synced, "nothing applies without every list");
}

/// Denied the watch after a good list (RBAC with `list` but not `watch`): the adapter stops
/// naming the verb and resource, and the snapshot it sent stays as it was.
#[tokio::test]
async fn network_policy_watch_denial_names_verb_and_resource() {
    let (client, _server) = MockApi::start(Box::new(|req| {
        if req.path == K8S_NETWORK_POLICIES && req.is_watch() {
            return respond(
                StatusCode::FORBIDDEN,
                &status(
                    403,
                    "Forbidden",
                    "networkpolicies.networking.k8s.io is forbidden: User \"system:serviceaccount:wiremesh:wiremesh\" cannot watch resource \"networkpolicies\"",
                ),
            );
        }
        if req.path == K8S_NETWORK_POLICIES {
            return ok(&kind_list(
                Kind::KubernetesNetworkPolicy,
                "3",
                vec![k8s_network_policy("web-ingress", "2", 80)],
            ));
        }
        base_answer(req)
    }));
    let datastore = KubeDatastore::from_client(client).with_policy(true);
    let (tx, rx) = watch::channel(ClusterSnapshot::default());
    let error = tokio::time::timeout(Duration::from_secs(10), datastore.run(tx))
        .await
        .expect("run must fail, not hang, on 403")
        .expect_err("403 is fatal");
    assert!(
        matches!(&error, DatastoreError::Forbidden { verb, resource, .. }
            if verb == "watch" && resource == "networkpolicies.networking.k8s.io"),
        "{error:?}"
    );
    let snapshot = rx.borrow();
    assert!(
        !snapshot.synced || snapshot.policy.objects[&Kind::KubernetesNetworkPolicy].len() == 1,
        "{snapshot:?}"
    );
}

//! The Kubernetes adapter at the request level: kube's client over tower-test's mock transport,
//! with a scripted API server. Checks the exact requests sent (publish = one JSON merge patch of
//! the annotations) and how list/watch answers (410 Gone, 404 for a missing CRD, 403) are handled.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::watch;
use tower_test::mock::{Handle, SendResponse};

use wiremesh::datastore::kube::{
    ANNOTATION_INTERFACE_V4, ANNOTATION_INTERFACE_V6, ANNOTATION_PUBLIC_KEY,
    ANNOTATION_PUBLIC_KEY_V6, KubeDatastore,
};
use wiremesh::datastore::{Datastore, DatastoreError};
use wiremesh::model::{ClusterSnapshot, PublishedWireguard, WgKey};

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

/// What the scripted server answers: a response, or `None` to leave the request pending
/// (a watch that stays open).
type Script = Box<dyn FnMut(&Seen) -> Option<Response<Body>> + Send>;

struct Server {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    fn start(script: Script) -> (Client, Server) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let seen = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(serve(handle, script, Arc::clone(&seen)));
        (Client::new(service, "default"), Server { seen })
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
    let (client, server) = Server::start(Box::new(move |req| {
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
        matches!(default, Some(Ok(spec)) if spec.wireguard_enabled == Some(true)),
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
        Server::start(Box::new(|req| match (req.path.as_str(), req.is_watch()) {
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
    let (client, _server) = Server::start(Box::new(|req| {
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

fn key(text: &str) -> WgKey {
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
    let (client, server) = Server::start(Box::new(move |req| match req.method.as_str() {
        "GET" if req.path == "/api/v1/nodes/n1" => ok(&current),
        "PATCH" if req.path == "/api/v1/nodes/n1" => ok(&reply),
        _ => respond(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", "unexpected"),
        ),
    }));
    let datastore = KubeDatastore::from_client(client);
    let published = PublishedWireguard {
        public_key_v4: Some(key(KEY_A)),
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
    let (client, server) = Server::start(Box::new(move |req| match req.method.as_str() {
        "GET" => ok(&current),
        _ => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            &status(500, "InternalError", "no writes expected"),
        ),
    }));
    let datastore = KubeDatastore::from_client(client);
    let published = PublishedWireguard {
        public_key_v4: Some(key(KEY_A)),
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
    let (client, _server) = Server::start(Box::new(|_| {
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
    let (client, _server) = Server::start(Box::new(move |req| match req.method.as_str() {
        "GET" => ok(&current),
        _ => respond(
            StatusCode::FORBIDDEN,
            &status(403, "Forbidden", "cannot patch resource \"nodes\""),
        ),
    }));
    let datastore = KubeDatastore::from_client(client);
    let published = PublishedWireguard {
        public_key_v4: Some(key(KEY_A)),
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
    use wiremesh::datastore::{ObjectProblem, ProblemObject};
    let (client, server) = Server::start(Box::new(|req| {
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

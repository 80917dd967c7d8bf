//! An in-memory stand-in for the Kubernetes API server, on loopback, for running the agent and
//! the lab in Kubernetes mode where no cluster exists. It serves the REST semantics the agent
//! and `wiremesh lab` rely on, as the API documents them
//! (<https://kubernetes.io/docs/reference/using-api/api-concepts/>):
//! - list: the items and the collection's `resourceVersion`; `labelSelector` (equality and
//!   existence) and `fieldSelector` (`metadata.name`, `metadata.namespace`);
//! - watch (`?watch=true`): newline-delimited events after the given `resourceVersion`,
//!   synthetic `ADDED` events first when it is empty or `0`, `ERROR` 410 Expired when it is
//!   older than the retained history (see [`ApiServer::compact`]), `timeoutSeconds` honoured;
//! - create (409 AlreadyExists, `generateName`), get, delete (404 NotFound), JSON merge patch
//!   (RFC 7386) and strategic merge patch treated alike (the same for the maps patched here),
//!   the `status` subresource of Nodes and Pods (a patch of the main resource ignores
//!   `status`, the subresource ignores everything else), `metadata.resourceVersion`
//!   preconditions (409 Conflict), and
//!   no-op writes that change nothing and bump no version;
//! - a resource whose plural is unknown (an uninstalled CRD) is 404 on every verb;
//! - discovery (`/api`, `/apis`, `/api/v1`, `/apis/GROUP/VERSION`) of the kinds it serves and of
//!   the kinds `deploy/` holds, enough for `kubectl apply --dry-run=client`.
//!
//! It is not a cluster: no admission, RBAC, server-side apply, defaulting or validation.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, mpsc};

/// Kinds served, by plural.
const KINDS: &[(&str, &str)] = &[
    ("nodes", "Node"),
    ("namespaces", "Namespace"),
    ("pods", "Pod"),
    ("serviceaccounts", "ServiceAccount"),
    ("events", "Event"),
    ("felixconfigurations", "FelixConfiguration"),
    ("hostendpoints", "HostEndpoint"),
    ("globalnetworkpolicies", "GlobalNetworkPolicy"),
    ("networkpolicies", "NetworkPolicy"),
    ("tiers", "Tier"),
    ("globalnetworksets", "GlobalNetworkSet"),
    ("networksets", "NetworkSet"),
];

fn kind_of(plural: &str) -> Option<&'static str> {
    KINDS.iter().find(|(p, _)| *p == plural).map(|(_, k)| *k)
}

/// Discovery: (group/version, plural, kind, namespaced) of every kind served or in `deploy/`.
const DISCOVERY: &[(&str, &str, &str, bool)] = &[
    ("v1", "namespaces", "Namespace", false),
    ("v1", "nodes", "Node", false),
    ("v1", "pods", "Pod", true),
    ("v1", "serviceaccounts", "ServiceAccount", true),
    ("v1", "configmaps", "ConfigMap", true),
    ("v1", "events", "Event", true),
    ("apps/v1", "daemonsets", "DaemonSet", true),
    (
        "rbac.authorization.k8s.io/v1",
        "clusterroles",
        "ClusterRole",
        false,
    ),
    (
        "rbac.authorization.k8s.io/v1",
        "clusterrolebindings",
        "ClusterRoleBinding",
        false,
    ),
    (
        "apiextensions.k8s.io/v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        false,
    ),
    ("events.k8s.io/v1", "events", "Event", true),
    (
        "networking.k8s.io/v1",
        "networkpolicies",
        "NetworkPolicy",
        true,
    ),
    (
        "projectcalico.org/v3",
        "felixconfigurations",
        "FelixConfiguration",
        false,
    ),
    (
        "projectcalico.org/v3",
        "hostendpoints",
        "HostEndpoint",
        false,
    ),
    (
        "projectcalico.org/v3",
        "globalnetworkpolicies",
        "GlobalNetworkPolicy",
        false,
    ),
    (
        "projectcalico.org/v3",
        "networkpolicies",
        "NetworkPolicy",
        true,
    ),
    ("projectcalico.org/v3", "tiers", "Tier", false),
    (
        "projectcalico.org/v3",
        "globalnetworksets",
        "GlobalNetworkSet",
        false,
    ),
    ("projectcalico.org/v3", "networksets", "NetworkSet", true),
];

/// The discovery document at `path`, if it is one.
fn discovery(path: &str) -> Option<Value> {
    let resources = |group_version: &str| -> Vec<Value> {
        DISCOVERY
            .iter()
            .filter(|(gv, ..)| *gv == group_version)
            .map(|(_, plural, kind, namespaced)| {
                json!({
                    "name": plural, "singularName": kind.to_lowercase(), "namespaced": namespaced,
                    "kind": kind,
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]
                })
            })
            .collect()
    };
    let path = path.trim_end_matches('/');
    if path == "/api" {
        return Some(
            json!({ "kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [] }),
        );
    }
    if path == "/apis" {
        let mut groups: Vec<&str> = DISCOVERY
            .iter()
            .map(|(gv, ..)| *gv)
            .filter(|gv| gv.contains('/'))
            .collect();
        groups.dedup();
        let groups: Vec<Value> = groups
            .iter()
            .filter_map(|gv| gv.split_once('/'))
            .map(|(name, version)| {
                let entry =
                    json!({ "groupVersion": format!("{name}/{version}"), "version": version });
                json!({ "name": name, "versions": [entry.clone()], "preferredVersion": entry })
            })
            .collect();
        return Some(json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups }));
    }
    let group_version = path
        .strip_prefix("/api/")
        .or_else(|| path.strip_prefix("/apis/"))?;
    let listed = resources(group_version);
    (!listed.is_empty() && group_version.split('/').count() <= 2).then(|| {
        json!({ "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": listed })
    })
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Collection {
    /// `v1` or `group/version`.
    group_version: String,
    plural: String,
}

#[derive(Debug, Clone)]
struct Change {
    collection: Collection,
    namespace: String,
    kind: &'static str,
    object: Value,
    revision: u64,
}

#[derive(Default)]
struct Store {
    revision: u64,
    objects: BTreeMap<Collection, BTreeMap<(String, String), Value>>,
    history: Vec<Change>,
    /// Changes at or before this revision are no longer in `history`.
    compacted: u64,
    /// Plurals answered with 404, as if their CRD were not installed.
    missing: BTreeSet<String>,
    /// Every request, as `METHOD path?query`.
    requests: Vec<String>,
}

/// The running stand-in; it stops with the runtime it was started on.
#[derive(Clone)]
pub struct ApiServer {
    pub url: String,
    store: Arc<Mutex<Store>>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch (as an API server restart or a load balancer would).
    epoch: Arc<tokio::sync::watch::Sender<u64>>,
}

impl ApiServer {
    /// Listens on a free loopback port.
    pub async fn start() -> ApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let (changes, _) = broadcast::channel(4096);
        let server = ApiServer {
            url,
            store: Arc::default(),
            changes,
            epoch: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        let handler = server.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let server = handler.clone();
                async move { server.handle(method, uri, headers, body).await }
            },
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        server
    }

    /// A kubeconfig for this server (no credentials: it has no authentication).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\nusers:\n- name: stand-in\n  user: {{}}\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: stand-in\ncurrent-context: stand-in\n",
            self.url
        )
    }

    /// Forgets the change history: a watch resuming from an older version gets 410 Gone.
    pub fn compact(&self) {
        let mut store = self.lock();
        store.compacted = store.revision;
        store.history.clear();
    }

    /// Ends every open watch stream; clients resume from their last version.
    pub fn end_watches(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Answers 404 for `plural` from now on, as if its CRD were not installed.
    pub fn uninstall(&self, plural: &str) {
        self.lock().missing.insert(plural.to_string());
    }

    /// Every request so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// The stored object, if any (`namespace` empty for cluster-scoped kinds).
    pub fn object(
        &self,
        group_version: &str,
        plural: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let collection = Collection {
            group_version: group_version.into(),
            plural: plural.into(),
        };
        self.lock()
            .objects
            .get(&collection)
            .and_then(|o| o.get(&(namespace.to_string(), name.to_string())))
            .cloned()
    }

    /// Every stored object of a collection, in all namespaces.
    pub fn objects(&self, group_version: &str, plural: &str) -> Vec<Value> {
        let collection = Collection {
            group_version: group_version.into(),
            plural: plural.into(),
        };
        self.lock()
            .objects
            .get(&collection)
            .map(|o| o.values().cloned().collect())
            .unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn handle(&self, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
        let query: BTreeMap<String, String> = uri
            .query()
            .map(|q| {
                q.split('&')
                    .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                    .map(|(k, v)| (decode(k), decode(v)))
                    .collect()
            })
            .unwrap_or_default();
        self.lock().requests.push(match uri.query() {
            Some(q) => format!("{method} {}?{q}", uri.path()),
            None => format!("{method} {}", uri.path()),
        });
        if method == Method::GET
            && let Some(document) = discovery(uri.path())
        {
            return json_response(200, &document);
        }
        let Some(target) = Target::parse(uri.path()) else {
            return status(
                404,
                "NotFound",
                format!("the server could not find {}", uri.path()),
            );
        };
        if kind_of(&target.collection.plural).is_none()
            || self.lock().missing.contains(&target.collection.plural)
        {
            return status(
                404,
                "NotFound",
                format!(
                    "the server could not find the requested resource ({})",
                    target.collection.plural
                ),
            );
        }
        let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
        match (&method, &target.name) {
            (&Method::GET, None) if watch => self.watch(&target, &query),
            (&Method::GET, None) => self.list(&target, &query),
            (&Method::GET, Some(name)) => match self.get(&target, name) {
                Some(object) => json_response(200, &object),
                None => not_found(&target, name),
            },
            (&Method::POST, None) => self.create(&target, &body),
            (&Method::PATCH, Some(name)) => self.patch(&target, name, &headers, &body),
            (&Method::PUT, Some(name)) => self.replace(&target, name, &body),
            (&Method::DELETE, Some(name)) => self.delete(&target, name),
            _ => status(
                405,
                "MethodNotAllowed",
                format!("{method} is not supported here"),
            ),
        }
    }

    fn get(&self, target: &Target, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&target.collection)
            .and_then(|o| o.get(&(target.namespace.clone(), name.to_string())))
            .cloned()
    }

    fn list(&self, target: &Target, query: &BTreeMap<String, String>) -> Response {
        let filter = match Filter::parse(target, query) {
            Ok(f) => f,
            Err(message) => return status(400, "BadRequest", message),
        };
        let store = self.lock();
        let items: Vec<Value> = store
            .objects
            .get(&target.collection)
            .into_iter()
            .flat_map(|o| o.iter())
            .filter(|((ns, _), object)| filter.matches(ns, object))
            .map(|(_, object)| object.clone())
            .collect();
        let kind = kind_of(&target.collection.plural).unwrap_or("Unknown");
        json_response(
            200,
            &json!({
                "apiVersion": target.collection.group_version,
                "kind": format!("{kind}List"),
                "metadata": { "resourceVersion": store.revision.to_string() },
                "items": items,
            }),
        )
    }

    fn watch(&self, target: &Target, query: &BTreeMap<String, String>) -> Response {
        let filter = match Filter::parse(target, query) {
            Ok(f) => f,
            Err(message) => return status(400, "BadRequest", message),
        };
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(1800));
        // Subscribe before reading the store, so nothing falls between the two.
        let mut live = self.changes.subscribe();
        let (initial, mut sent_up_to) = {
            let store = self.lock();
            match query.get("resourceVersion").map(String::as_str) {
                None | Some("") | Some("0") => {
                    let added: Vec<Value> = store
                        .objects
                        .get(&target.collection)
                        .into_iter()
                        .flat_map(|o| o.iter())
                        .filter(|((ns, _), object)| filter.matches(ns, object))
                        .map(|(_, object)| json!({ "type": "ADDED", "object": object }))
                        .collect();
                    (added, store.revision)
                }
                Some(version) => {
                    let Ok(from) = version.parse::<u64>() else {
                        return status(
                            400,
                            "BadRequest",
                            format!("invalid resourceVersion {version:?}"),
                        );
                    };
                    if from < store.compacted {
                        let expired = json!({
                            "type": "ERROR",
                            "object": status_body(410, "Expired", format!("too old resource version: {from} ({})", store.compacted)),
                        });
                        (vec![expired], u64::MAX)
                    } else {
                        let replay = store
                            .history
                            .iter()
                            .filter(|c| c.revision > from && c.collection == target.collection)
                            .filter(|c| filter.matches(&c.namespace, &c.object))
                            .map(|c| json!({ "type": c.kind, "object": c.object }))
                            .collect();
                        (replay, store.revision)
                    }
                }
            }
        };
        let mut epoch = self.epoch.subscribe();
        epoch.mark_unchanged();
        let (lines, receiver) = mpsc::channel::<Bytes>(64);
        let collection = target.collection.clone();
        tokio::spawn(async move {
            for event in initial {
                if lines.send(line(&event)).await.is_err() {
                    return;
                }
            }
            if sent_up_to == u64::MAX {
                return; // expired: the stream ends after the error
            }
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let change = tokio::select! {
                    next = tokio::time::timeout_at(deadline, live.recv()) => match next {
                        Ok(Ok(change)) => change,
                        // Lagged, closed or timed out: end the stream; the client resumes.
                        _ => return,
                    },
                    _ = epoch.changed() => return,
                };
                if change.revision <= sent_up_to
                    || change.collection != collection
                    || !filter.matches(&change.namespace, &change.object)
                {
                    continue;
                }
                sent_up_to = change.revision;
                let event = json!({ "type": change.kind, "object": change.object });
                if lines.send(line(&event)).await.is_err() {
                    return;
                }
            }
        });
        let stream = futures::stream::unfold(receiver, |mut receiver| async move {
            receiver
                .recv()
                .await
                .map(|bytes| (Ok::<_, Infallible>(bytes), receiver))
        });
        Response::builder()
            .status(200)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(stream))
            .unwrap_or_else(|_| Response::new(Body::empty()))
    }

    fn create(&self, target: &Target, body: &Bytes) -> Response {
        let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
            return status(400, "BadRequest", "the body is not JSON".into());
        };
        let mut store = self.lock();
        let metadata = match object.get_mut("metadata").and_then(Value::as_object_mut) {
            Some(m) => m,
            None => return status(422, "Invalid", "metadata is required".into()),
        };
        if metadata
            .get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            match metadata.get("generateName").and_then(Value::as_str) {
                Some(prefix) => {
                    let name = format!("{prefix}{:05x}", store.revision + 1);
                    metadata.insert("name".into(), name.into());
                }
                None => return status(422, "Invalid", "metadata.name is required".into()),
            }
        }
        let name = metadata["name"].as_str().unwrap_or_default().to_string();
        if !target.namespace.is_empty() {
            metadata.insert("namespace".into(), target.namespace.clone().into());
        }
        let key = (target.namespace.clone(), name.clone());
        if store
            .objects
            .get(&target.collection)
            .is_some_and(|o| o.contains_key(&key))
        {
            return status(
                409,
                "AlreadyExists",
                format!("{} {name:?} already exists", target.collection.plural),
            );
        }
        store.revision += 1;
        let revision = store.revision;
        metadata.insert("resourceVersion".into(), revision.to_string().into());
        metadata.insert(
            "uid".into(),
            format!("00000000-0000-4000-8000-{revision:012x}").into(),
        );
        metadata.insert("creationTimestamp".into(), "2026-01-01T00:00:00Z".into());
        self.record(&mut store, target, key, "ADDED", object.clone());
        json_response(201, &object)
    }

    fn patch(&self, target: &Target, name: &str, headers: &HeaderMap, body: &Bytes) -> Response {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !matches!(
            content_type,
            "application/merge-patch+json" | "application/strategic-merge-patch+json"
        ) {
            return status(
                415,
                "UnsupportedMediaType",
                format!("patch type {content_type:?} is not supported by the stand-in"),
            );
        }
        let Ok(patch) = serde_json::from_slice::<Value>(body) else {
            return status(400, "BadRequest", "the patch is not JSON".into());
        };
        let Some(current) = self.get(target, name) else {
            return not_found(target, name);
        };
        // The status subresource changes only status; the main resource of a kind with a
        // status subresource ignores it.
        let patch = match target.subresource.as_deref() {
            Some("status") => {
                json!({ "status": patch.get("status").cloned().unwrap_or(Value::Null) })
            }
            Some(other) => return status(404, "NotFound", format!("no subresource {other}")),
            None if matches!(target.collection.plural.as_str(), "nodes" | "pods") => {
                let mut p = patch.clone();
                if let Some(map) = p.as_object_mut() {
                    map.remove("status");
                }
                p
            }
            None => patch.clone(),
        };
        if stale_version(&patch, &current) {
            return conflict(target, name);
        }
        let mut updated = current.clone();
        merge_patch(&mut updated, &patch);
        self.update(target, name, current, updated)
    }

    fn replace(&self, target: &Target, name: &str, body: &Bytes) -> Response {
        let Ok(object) = serde_json::from_slice::<Value>(body) else {
            return status(400, "BadRequest", "the body is not JSON".into());
        };
        let Some(current) = self.get(target, name) else {
            return not_found(target, name);
        };
        if stale_version(&object, &current) {
            return conflict(target, name);
        }
        self.update(target, name, current, object)
    }

    /// Stores `updated` unless it equals `current` apart from the version (a no-op write).
    fn update(&self, target: &Target, name: &str, current: Value, mut updated: Value) -> Response {
        for field in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "name",
            "namespace",
        ] {
            if let Some(value) = current.pointer(&format!("/metadata/{field}"))
                && let Some(metadata) = updated.get_mut("metadata").and_then(Value::as_object_mut)
            {
                metadata.insert(field.into(), value.clone());
            }
        }
        if updated == current {
            return json_response(200, &current);
        }
        let mut store = self.lock();
        store.revision += 1;
        let revision = store.revision.to_string();
        if let Some(metadata) = updated.get_mut("metadata").and_then(Value::as_object_mut) {
            metadata.insert("resourceVersion".into(), revision.into());
        }
        let key = (target.namespace.clone(), name.to_string());
        self.record(&mut store, target, key, "MODIFIED", updated.clone());
        json_response(200, &updated)
    }

    fn delete(&self, target: &Target, name: &str) -> Response {
        let mut store = self.lock();
        let key = (target.namespace.clone(), name.to_string());
        let Some(mut object) = store
            .objects
            .get_mut(&target.collection)
            .and_then(|o| o.remove(&key))
        else {
            drop(store);
            return not_found(target, name);
        };
        store.revision += 1;
        let revision = store.revision.to_string();
        if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            metadata.insert("resourceVersion".into(), revision.into());
        }
        self.record(&mut store, target, key, "DELETED", object.clone());
        json_response(200, &object)
    }

    fn record(
        &self,
        store: &mut Store,
        target: &Target,
        key: (String, String),
        kind: &'static str,
        object: Value,
    ) {
        let objects = store.objects.entry(target.collection.clone()).or_default();
        if kind == "DELETED" {
            objects.remove(&key);
        } else {
            objects.insert(key.clone(), object.clone());
        }
        let change = Change {
            collection: target.collection.clone(),
            namespace: key.0,
            kind,
            object,
            revision: store.revision,
        };
        store.history.push(change.clone());
        let _ = self.changes.send(change);
    }
}

/// A request's resource path: `/api/v1[/namespaces/NS]/PLURAL[/NAME[/SUB]]` or
/// `/apis/GROUP/VERSION[/namespaces/NS]/PLURAL[/NAME[/SUB]]`.
struct Target {
    collection: Collection,
    /// Empty for cluster-scoped requests and for lists across namespaces.
    namespace: String,
    name: Option<String>,
    subresource: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Target> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group_version, rest) = match parts.as_slice() {
            ["api", version, rest @ ..] => (version.to_string(), rest),
            ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, plural, rest @ ..] => {
                (ns.to_string(), [&[*plural][..], rest].concat())
            }
            other => (String::new(), other.to_vec()),
        };
        let (plural, name, subresource) = match rest.as_slice() {
            [plural] => (plural, None, None),
            [plural, name] => (plural, Some(name.to_string()), None),
            [plural, name, sub] => (plural, Some(name.to_string()), Some(sub.to_string())),
            _ => return None,
        };
        Some(Target {
            collection: Collection {
                group_version,
                plural: plural.to_string(),
            },
            namespace,
            name,
            subresource,
        })
    }
}

/// One `labelSelector` term: the label, `Some((equal, value))` for `=`/`!=`, else whether it
/// must be present.
type LabelTerm = (String, Option<(bool, String)>, bool);

/// `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma = and) and `fieldSelector`
/// (`metadata.name`, `metadata.namespace` with `=`, `==`, `!=`).
struct Filter {
    labels: Vec<LabelTerm>,
    fields: Vec<(String, bool, String)>,
}

impl Filter {
    fn parse(target: &Target, query: &BTreeMap<String, String>) -> Result<Filter, String> {
        let mut labels = Vec::new();
        for term in query
            .get("labelSelector")
            .map(|s| s.split(',').filter(|t| !t.is_empty()).collect::<Vec<_>>())
            .unwrap_or_default()
        {
            if let Some((k, v)) = term.split_once("!=") {
                labels.push((k.into(), Some((false, v.into())), true));
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                labels.push((k.into(), Some((true, v.into())), true));
            } else if let Some(k) = term.strip_prefix('!') {
                labels.push((k.into(), None, false));
            } else if term
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            {
                labels.push((term.into(), None, true));
            } else {
                return Err(format!("unsupported label selector term {term:?}"));
            }
        }
        let mut fields = Vec::new();
        for term in query
            .get("fieldSelector")
            .map(|s| s.split(',').filter(|t| !t.is_empty()).collect::<Vec<_>>())
            .unwrap_or_default()
        {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(format!("unsupported field selector term {term:?}"));
            };
            if !matches!(field, "metadata.name" | "metadata.namespace") {
                return Err(format!("field label not supported: {field}"));
            }
            fields.push((field.to_string(), equal, value.to_string()));
        }
        if !target.namespace.is_empty() {
            fields.push(("metadata.namespace".into(), true, target.namespace.clone()));
        }
        Ok(Filter { labels, fields })
    }

    fn matches(&self, namespace: &str, object: &Value) -> bool {
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|(k, value, present)| match value {
            Some((true, v)) => label(k) == Some(v.as_str()),
            Some((false, v)) => label(k) != Some(v.as_str()),
            None => label(k).is_some() == *present,
        });
        let fields_ok = self.fields.iter().all(|(field, equal, value)| {
            let have = match field.as_str() {
                "metadata.name" => object
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
                _ => namespace,
            };
            (have == value) == *equal
        });
        labels_ok && fields_ok
    }
}

/// A write that names a `metadata.resourceVersion` other than the stored one (a precondition
/// that fails: 409 Conflict). Without one the write is unconditional.
fn stale_version(write: &Value, current: &Value) -> bool {
    let version = |v: &Value| {
        v.pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    version(write).is_some_and(|wanted| Some(wanted) != version(current))
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(map) = target {
        for (key, value) in patch {
            if value.is_null() {
                map.remove(key);
            } else {
                merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn line(event: &Value) -> Bytes {
    let mut text = event.to_string();
    text.push('\n');
    Bytes::from(text)
}

fn json_response(code: u16, body: &Value) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

fn status_body(code: u16, reason: &str, message: String) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn status(code: u16, reason: &str, message: String) -> Response {
    json_response(code, &status_body(code, reason, message))
}

fn not_found(target: &Target, name: &str) -> Response {
    status(
        404,
        "NotFound",
        format!("{} {name:?} not found", target.collection.plural),
    )
}

fn conflict(target: &Target, name: &str) -> Response {
    status(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
            target.collection.plural
        ),
    )
}

//! The Kubernetes datastore (Calico's "KDD" layout).
//!
//! | what | where |
//! |---|---|
//! | node | core/v1 `Node`: pod CIDRs from `spec.podCIDRs` (else `spec.podCIDR`); underlay from the `projectcalico.org/IPv4Address` / `IPv6Address` annotation (prefix dropped), else the `InternalIP` of that family |
//! | WireGuard fields | `Node.metadata.annotations`: [`ANNOTATION_PUBLIC_KEY`], [`ANNOTATION_PUBLIC_KEY_V6`], [`ANNOTATION_INTERFACE_V4`], [`ANNOTATION_INTERFACE_V6`] |
//! | settings | `felixconfigurations.projectcalico.org/v3` (cluster-scoped; `default`, `node.<name>`) |
//! | policy (with [`KubeDatastore::with_policy`]) | the kinds of [`Kind::KUBERNETES`]: the six `projectcalico.org/v3` kinds, `networking.k8s.io/v1` NetworkPolicies, and `v1` Pods (of every node), Namespaces and ServiceAccounts, namespaced ones in every namespace |
//!
//! Every kind is list-watched with kube-runtime's `watcher`. Its `Init` / `InitApply` /
//! `InitDone` events are buffered, and the cache of that kind is replaced in one step at
//! `InitDone`, so a re-list (after a 410 Gone or any desync) never shows a partial cache. The
//! snapshot is sent only once every kind has been listed (`synced`), and only when it changed.
//! A failed list or watch leaves the kind's last complete cache in force while the watcher
//! retries; a 403 (or a missing CRD of ours) stops the adapter with an error naming it.
//!
//! Policy objects are kept as the raw JSON the etcd adapter keeps (see [`policy_entry`]), so the
//! reconciler validates and renders them identically on both datastores. Pods, Namespaces and
//! ServiceAccounts are cut down to what `policy::resources` reads of them, and an update that
//! leaves that unchanged (a pod's container status, say) is dropped here.
//!
//! FelixConfigurations are read as untyped objects: one object whose spec does not decode is kept
//! with its error (and reported) instead of failing the whole list.
//!
//! At start the adapter creates an empty FelixConfiguration `default` if none exists (as
//! calico-node does), so that `kubectl patch felixconfiguration default` works on a new cluster.
//!
//! Publishing is a JSON merge patch of `metadata.annotations` with only the four WireGuard keys
//! that differ (`null` deletes one), never a full update, so other writers' fields are untouched;
//! nothing is sent when the node already carries our values.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt as _;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Config, ResourceExt as _};
use serde_json::{Map, Value};
use tracing::{debug, info, warn};

use super::{
    Datastore, DatastoreError, ObjectProblem, ProblemObject, ReadScope, SnapshotSender, SyncHealth,
};
use wiremesh_core::model::{ClusterSnapshot, Family, NodeResource, PublishedWireguard};
use wiremesh_core::policy::workload::IP_ANNOTATIONS as POD_IP_ANNOTATIONS;
use wiremesh_core::wire::FelixConfigurationSpec;
use wiremesh_core::wire::felix::DecodedFelix;
use wiremesh_core::wire::{Kind, RawPolicyResources};

pub const ANNOTATION_PUBLIC_KEY: &str = "projectcalico.org/WireguardPublicKey";
pub const ANNOTATION_PUBLIC_KEY_V6: &str = "projectcalico.org/WireguardPublicKeyV6";
pub const ANNOTATION_INTERFACE_V4: &str = "projectcalico.org/IPv4WireguardInterfaceAddr";
pub const ANNOTATION_INTERFACE_V6: &str = "projectcalico.org/IPv6WireguardInterfaceAddr";
/// Calico's node address annotations (written by calico-node's autodetection, or by hand).
pub const ANNOTATION_IPV4_ADDRESS: &str = "projectcalico.org/IPv4Address";
pub const ANNOTATION_IPV6_ADDRESS: &str = "projectcalico.org/IPv6Address";

/// The CRD the agent needs besides core Nodes.
pub const FELIX_CONFIGURATION_CRD: &str = "felixconfigurations.projectcalico.org";

const CALICO_GROUP: &str = "projectcalico.org";
const CALICO_VERSION: &str = "v3";

/// The `projectcalico.org/v3` FelixConfiguration resource, for untyped access.
pub fn felix_configuration_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(CALICO_GROUP, CALICO_VERSION, "FelixConfiguration"),
        "felixconfigurations",
    )
}

/// A policy kind's `projectcalico.org/v3` resource, for untyped access (the same kind and plural
/// as the CRD generated from `wiremesh_core::wire`; a test checks they agree).
pub fn policy_resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::KubernetesNetworkPolicy => {
            return ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("networking.k8s.io", "v1", kind.kind_name()),
                "networkpolicies",
            );
        }
        Kind::Pod | Kind::Namespace | Kind::ServiceAccount => {
            return ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("", "v1", kind.kind_name()),
                kind.plural(),
            );
        }
        _ => {}
    }
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(CALICO_GROUP, CALICO_VERSION, kind.kind_name()),
        kind.plural(),
    )
}

/// The CRD behind a policy kind, e.g. `globalnetworksets.projectcalico.org`.
fn policy_crd(kind: Kind) -> String {
    format!("{}.{CALICO_GROUP}", kind.plural())
}

/// The CRD behind a watched kind, when it is one of ours; Kubernetes' own kinds have none, so
/// a 404 for them is retried like any other failure rather than reported as a missing CRD.
fn crd_of(kind: Kind) -> Option<String> {
    Kind::CALICO.contains(&kind).then(|| policy_crd(kind))
}

/// How errors and logs name a kind's resource, as RBAC rules do: `pods`, `namespaces`,
/// `serviceaccounts`, `networkpolicies.networking.k8s.io`, or the CRD of one of ours.
fn resource_name(kind: Kind) -> String {
    match kind {
        Kind::KubernetesNetworkPolicy => "networkpolicies.networking.k8s.io".into(),
        Kind::Pod | Kind::Namespace | Kind::ServiceAccount => kind.plural().into(),
        _ => policy_crd(kind),
    }
}

// ---------------------------------------------------------------------------------------------
// Pure decoding
// ---------------------------------------------------------------------------------------------

fn non_empty(value: Option<&String>) -> Option<String> {
    value
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// `10.0.0.1/24` -> `10.0.0.1`; anything that is not an address with a prefix is kept as written
/// (so a malformed value is reported by `mesh`, not lost).
fn drop_prefix(text: String) -> String {
    match text.parse::<IpNet>() {
        Ok(net) => net.addr().to_string(),
        Err(_) => text,
    }
}

/// Turns a Kubernetes Node into the raw node data the mesh reads. Never fails: fields are kept as
/// text and validated later.
pub fn decode_node(node: &Node) -> NodeResource {
    let annotations = node.annotations();
    let annotation = |key: &str| non_empty(annotations.get(key));
    let spec = node.spec.as_ref();
    let mut pod_cidrs: Vec<String> = spec
        .and_then(|s| s.pod_cidrs.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect();
    if pod_cidrs.is_empty()
        && let Some(cidr) = non_empty(spec.and_then(|s| s.pod_cidr.as_ref()))
    {
        pod_cidrs.push(cidr);
    }
    let internal_ip = |family: Family| -> Option<String> {
        node.status
            .as_ref()?
            .addresses
            .as_ref()?
            .iter()
            .filter(|a| a.type_ == "InternalIP")
            .map(|a| a.address.trim())
            .find(|a| {
                a.parse::<IpAddr>()
                    .is_ok_and(|ip| Family::of_addr(&ip) == family)
            })
            .map(str::to_string)
    };
    // spec.podCIDRs cannot change once set, so a Node claims them when it is created.
    let created = node
        .metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| u64::try_from(t.0.as_second()).ok());
    let pod_cidr_claimed_at = created
        .map(|at| pod_cidrs.iter().map(|c| (c.clone(), at)).collect())
        .unwrap_or_default();
    NodeResource {
        name: node.name_any(),
        pod_cidr_claimed_at,
        ipv4_address: annotation(ANNOTATION_IPV4_ADDRESS)
            .map(drop_prefix)
            .or_else(|| internal_ip(Family::V4)),
        ipv6_address: annotation(ANNOTATION_IPV6_ADDRESS)
            .map(drop_prefix)
            .or_else(|| internal_ip(Family::V6)),
        pod_cidrs,
        wireguard_public_key: annotation(ANNOTATION_PUBLIC_KEY),
        wireguard_public_key_v6: annotation(ANNOTATION_PUBLIC_KEY_V6),
        wireguard_interface_ipv4_address: annotation(ANNOTATION_INTERFACE_V4),
        wireguard_interface_ipv6_address: annotation(ANNOTATION_INTERFACE_V6),
        decode_error: None,
    }
}

/// Decodes an untyped FelixConfiguration's spec (unknown fields ignored; no spec = empty spec).
pub fn decode_felix_configuration(object: &DynamicObject) -> Result<DecodedFelix, String> {
    FelixConfigurationSpec::from_object(&object.data)
}

/// kubectl's copy of the applied manifest: server-side bookkeeping, not part of the object.
const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// A policy object as the snapshot keeps it: its key (`name`, or `namespace/name` for namespaced
/// kinds, as in Calico's etcd keys) and its JSON as written by its author, i.e. what the etcd
/// adapter reads from the key's value: `apiVersion`, `kind`, `metadata` with `name`,
/// `namespace`, `labels` and `annotations`, and `spec`. Server bookkeeping (`uid`,
/// `resourceVersion`, `generation`, `creationTimestamp`, `managedFields`, kubectl's last-applied
/// copy) is left out: validation ignores it, and it would make both datastores differ.
///
/// Pods, Namespaces and ServiceAccounts keep only what `policy::resources` reads of them
/// ([`pod_fields`]): the agent holds every pod of the cluster, and most pod updates (container
/// statuses, conditions) change nothing policy sees, so the cache compares equal and no pass runs.
fn policy_entry(kind: Kind, object: &DynamicObject) -> (String, Value) {
    let meta = &object.metadata;
    let name = meta.name.clone().unwrap_or_default();
    // Listed across all namespaces, a namespaced object always has one; `default` as kubectl.
    let namespace = kind
        .namespaced()
        .then(|| meta.namespace.clone().unwrap_or_else(|| "default".into()));
    let key = match &namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.clone(),
    };
    let mut metadata = Map::new();
    metadata.insert("name".into(), Value::String(name));
    if let Some(ns) = namespace {
        metadata.insert("namespace".into(), Value::String(ns));
    }
    if let Some(labels) = meta.labels.as_ref().filter(|l| !l.is_empty()) {
        metadata.insert("labels".into(), string_map(labels.iter()));
    }
    let kept_annotation = |key: &str| match kind {
        Kind::Pod => POD_IP_ANNOTATIONS.contains(&key),
        // Their profiles read only labels.
        Kind::Namespace | Kind::ServiceAccount => false,
        _ => key != LAST_APPLIED_ANNOTATION,
    };
    if let Some(annotations) = meta.annotations.as_ref() {
        let kept: Vec<_> = annotations
            .iter()
            .filter(|(k, _)| kept_annotation(k))
            .collect();
        if !kept.is_empty() {
            metadata.insert("annotations".into(), string_map(kept.into_iter()));
        }
    }
    // A terminating pod whose CNI emptied its IP annotation has released its address.
    if kind == Kind::Pod
        && let Some(at) = meta
            .deletion_timestamp
            .as_ref()
            .and_then(|t| serde_json::to_value(t).ok())
    {
        metadata.insert("deletionTimestamp".into(), at);
    }
    let mut value = Map::new();
    value.insert(
        "apiVersion".into(),
        Value::String(kind.api_version().into()),
    );
    value.insert("kind".into(), Value::String(kind.kind_name().into()));
    value.insert("metadata".into(), Value::Object(metadata));
    match kind {
        Kind::Pod => value.extend(pod_fields(&object.data)),
        Kind::Namespace | Kind::ServiceAccount => {}
        _ => {
            if let Some(spec) = object.data.get("spec") {
                value.insert("spec".into(), spec.clone());
            }
        }
    }
    (key, Value::Object(value))
}

/// The `spec` and `status` of a pod as `policy::workload::from_pod` reads them: where it runs,
/// whether on the host network, its service account, the ports of its (init) containers, its
/// phase and IPs. Everything else (images, env, volumes, probes, container statuses,
/// conditions) is dropped.
fn pod_fields(data: &Value) -> Map<String, Value> {
    let pick = |from: Option<&Value>, fields: &[&str]| -> Map<String, Value> {
        let from = from.and_then(Value::as_object);
        fields
            .iter()
            .filter_map(|f| Some((f.to_string(), from?.get(*f)?.clone())))
            .collect()
    };
    let spec = data.get("spec");
    let mut kept_spec = pick(spec, &["nodeName", "hostNetwork", "serviceAccountName"]);
    for list in ["containers", "initContainers"] {
        let containers: Vec<Value> = spec
            .and_then(|s| s.get(list))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|c| c.get("ports").is_some())
            .map(|c| Value::Object(pick(Some(c), &["name", "ports"])))
            .collect();
        if !containers.is_empty() {
            kept_spec.insert(list.into(), Value::Array(containers));
        }
    }
    let status = pick(data.get("status"), &["phase", "podIP", "podIPs"]);
    let mut out = Map::new();
    if !kept_spec.is_empty() {
        out.insert("spec".into(), Value::Object(kept_spec));
    }
    if !status.is_empty() {
        out.insert("status".into(), Value::Object(status));
    }
    out
}

/// A watched policy object: the raw JSON for the snapshot, and its UID so that Events about it
/// match it (`kubectl describe` selects Events by the object's UID).
#[derive(Debug, Clone, PartialEq)]
struct PolicyObject {
    value: Value,
    uid: Option<String>,
}

fn policy_cache_entry(kind: Kind, object: &DynamicObject) -> (String, PolicyObject) {
    let (key, value) = policy_entry(kind, object);
    let uid = object.metadata.uid.clone();
    (key, PolicyObject { value, uid })
}

fn string_map<'a>(entries: impl Iterator<Item = (&'a String, &'a String)>) -> Value {
    Value::Object(
        entries
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

/// The merge patch that makes `annotations` carry `published`: only the differing keys, a
/// `null` for each to remove. `None` when nothing differs.
fn annotation_patch(
    annotations: &BTreeMap<String, String>,
    published: &PublishedWireguard,
) -> Option<Value> {
    let wanted: [(&str, Option<String>); 4] = [
        (
            ANNOTATION_PUBLIC_KEY,
            published.public_key_v4.map(|k| k.to_string()),
        ),
        (
            ANNOTATION_PUBLIC_KEY_V6,
            published.public_key_v6.map(|k| k.to_string()),
        ),
        (
            ANNOTATION_INTERFACE_V4,
            published.interface_ipv4_address.map(|a| a.to_string()),
        ),
        (
            ANNOTATION_INTERFACE_V6,
            published.interface_ipv6_address.map(|a| a.to_string()),
        ),
    ];
    let mut changes = Map::new();
    for (key, want) in wanted {
        let have = annotations.get(key);
        match (&want, have) {
            (Some(w), Some(h)) if w == h => {}
            (None, None) => {}
            (Some(w), _) => {
                changes.insert(key.to_string(), Value::String(w.clone()));
            }
            (None, Some(_)) => {
                changes.insert(key.to_string(), Value::Null);
            }
        }
    }
    (!changes.is_empty()).then(|| serde_json::json!({ "metadata": { "annotations": changes } }))
}

// ---------------------------------------------------------------------------------------------
// The caches
// ---------------------------------------------------------------------------------------------

/// One kind's cache: `current` is `None` until the first complete list; `pending` collects a
/// (re-)list until `InitDone` swaps it in.
#[derive(Debug)]
struct Cache<V> {
    current: Option<BTreeMap<String, V>>,
    pending: Option<BTreeMap<String, V>>,
}

impl<V> Default for Cache<V> {
    fn default() -> Self {
        Cache {
            current: None,
            pending: None,
        }
    }
}

impl<V: PartialEq> Cache<V> {
    /// Applies one watcher event; true when `current` may have changed.
    fn apply<K>(&mut self, event: Event<K>, decode: impl Fn(&K) -> (String, V)) -> bool {
        match event {
            Event::Init => {
                self.pending = Some(BTreeMap::new());
                false
            }
            Event::InitApply(object) => {
                let (name, value) = decode(&object);
                self.pending.get_or_insert_default().insert(name, value);
                false
            }
            Event::InitDone => {
                let listed = self.pending.take().unwrap_or_default();
                let changed = self.current.as_ref() != Some(&listed);
                self.current = Some(listed);
                changed
            }
            Event::Apply(object) => {
                let (name, value) = decode(&object);
                let current = self.current.get_or_insert_default();
                if current.get(&name) == Some(&value) {
                    false
                } else {
                    current.insert(name, value);
                    true
                }
            }
            Event::Delete(object) => {
                let (name, _) = decode(&object);
                self.current
                    .as_mut()
                    .is_some_and(|current| current.remove(&name).is_some())
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    nodes: Cache<NodeResource>,
    felix: Cache<FelixObject>,
    /// One cache per watched policy kind; none when policy is not watched.
    policy: BTreeMap<Kind, Cache<PolicyObject>>,
}

impl State {
    fn new(policy_kinds: &[Kind]) -> State {
        State {
            policy: policy_kinds
                .iter()
                .map(|kind| (*kind, Cache::default()))
                .collect(),
            ..State::default()
        }
    }

    /// The snapshot, once every watched kind has been listed.
    fn snapshot(&self) -> Option<ClusterSnapshot> {
        let mut policy = RawPolicyResources::default();
        for (kind, cache) in &self.policy {
            // Kinds without objects are left out, as the etcd adapter's list leaves them.
            for (key, object) in cache.current.as_ref()? {
                policy.insert(*kind, key.clone(), object.value.clone());
            }
        }
        Some(ClusterSnapshot {
            nodes: self.nodes.current.clone()?,
            felix_configurations: self
                .felix
                .current
                .as_ref()?
                .iter()
                .map(|(name, object)| (name.clone(), object.spec.clone()))
                .collect(),
            policy,
            synced: true,
        })
    }

    /// The UID of every listed FelixConfiguration and policy object, so Events about them
    /// carry it (`kubectl describe` finds Events by UID).
    fn uids(&self) -> Uids {
        let felix = self
            .felix
            .current
            .iter()
            .flatten()
            .filter_map(|(name, object)| {
                Some((
                    ProblemObject::FelixConfiguration(name.clone()),
                    object.uid.clone()?,
                ))
            });
        let policy = self.policy.iter().flat_map(|(kind, cache)| {
            cache.current.iter().flatten().filter_map(|(key, object)| {
                let (namespace, name) = match key.split_once('/') {
                    Some((ns, name)) => (Some(ns.to_string()), name.to_string()),
                    None => (None, key.clone()),
                };
                let problem = ProblemObject::Policy {
                    kind: *kind,
                    namespace,
                    name,
                };
                Some((problem, object.uid.clone()?))
            })
        });
        felix.chain(policy).collect()
    }
}

type Uids = BTreeMap<ProblemObject, String>;

/// A FelixConfiguration as cached: its decoded spec (or why it does not decode) and its UID.
#[derive(Debug, Clone, PartialEq)]
struct FelixObject {
    spec: Result<DecodedFelix, String>,
    uid: Option<String>,
}

fn node_entry(node: &Node) -> (String, NodeResource) {
    let decoded = decode_node(node);
    (decoded.name.clone(), decoded)
}

fn felix_entry(object: &DynamicObject) -> (String, FelixObject) {
    let spec = decode_felix_configuration(object);
    if let Err(error) = &spec {
        warn!(felixconfiguration = %object.name_any(), %error, "FelixConfiguration does not decode");
    }
    let uid = object.metadata.uid.clone();
    (object.name_any(), FelixObject { spec, uid })
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

fn boxed(
    e: impl std::error::Error + Send + Sync + 'static,
) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

/// The API status behind a client error, if the server answered with one.
fn api_status(error: &kube::Error) -> Option<&kube::core::Status> {
    match error {
        kube::Error::Api(status) => Some(status),
        _ => None,
    }
}

/// 404, by reason or by code: kube's own `is_not_found` needs the reason, which a plain-text
/// answer (e.g. the API server's "404 page not found" for a CRD that is not installed) lacks.
fn not_found(status: &kube::core::Status) -> bool {
    status.code == 404 || status.reason == "NotFound"
}

fn forbidden(status: &kube::core::Status) -> bool {
    status.code == 403 || status.reason == "Forbidden"
}

/// Turns a client error of `verb` on `resource` into the datastore error: a 403 becomes
/// [`DatastoreError::Forbidden`], anything else `otherwise`.
fn classify(
    error: kube::Error,
    verb: &str,
    resource: &str,
    otherwise: impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> DatastoreError,
) -> DatastoreError {
    match api_status(&error) {
        Some(status) if forbidden(status) => DatastoreError::Forbidden {
            verb: verb.to_string(),
            resource: resource.to_string(),
            message: status.message.clone(),
        },
        _ => otherwise(boxed(error)),
    }
}

/// Whether a watcher error is fatal: a missing CRD (404 on the list) or an RBAC denial. Other
/// errors (410 Gone, disconnects, timeouts) are retried by the watcher, with back-off.
fn fatal_watch_error(
    error: &watcher::Error,
    resource: &str,
    crd: Option<&str>,
) -> Option<DatastoreError> {
    let (verb, status) = match error {
        watcher::Error::InitialListFailed(e) => ("list", api_status(e)?),
        watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            ("watch", api_status(e)?)
        }
        watcher::Error::WatchError(status) => ("watch", &**status),
        watcher::Error::NoResourceVersion => return None,
    };
    if forbidden(status) {
        return Some(DatastoreError::Forbidden {
            verb: verb.to_string(),
            resource: resource.to_string(),
            message: status.message.clone(),
        });
    }
    // A collection is 404 only when its type does not exist: the CRD is not installed, or was
    // deleted while we watched (the watch then restarts into 404s, never into a re-list).
    if not_found(status)
        && let Some(crd) = crd
    {
        return Some(DatastoreError::MissingCrd {
            crd: crd.to_string(),
        });
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The adapter
// ---------------------------------------------------------------------------------------------

/// The Kubernetes datastore adapter.
#[derive(Clone)]
pub struct KubeDatastore {
    client: Client,
    recorder: Recorder,
    /// Also list-watch the policy kinds (the agent's `--host-policy`).
    watch_policy: bool,
    /// Written by `run`, read by `report`.
    uids: Arc<Mutex<Uids>>,
    health: Arc<SyncHealth>,
}

/// The Events' reporting controller.
pub const EVENT_CONTROLLER: &str = "wiremesh";

/// Where an Event about `object` is attached. A Node's reference carries its name as UID, as the
/// kubelet's do, so that `kubectl describe node` lists our Events.
fn event_reference(object: &ProblemObject) -> ObjectReference {
    match object {
        ProblemObject::Node(name) => ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(name.clone()),
            uid: Some(name.clone()),
            ..ObjectReference::default()
        },
        ProblemObject::FelixConfiguration(name) => ObjectReference {
            api_version: Some(format!("{CALICO_GROUP}/{CALICO_VERSION}")),
            kind: Some("FelixConfiguration".into()),
            name: Some(name.clone()),
            ..ObjectReference::default()
        },
        ProblemObject::Policy {
            kind,
            namespace,
            name,
        } => ObjectReference {
            // A Kubernetes NetworkPolicy's is `networking.k8s.io/v1` `NetworkPolicy`.
            api_version: Some(kind.api_version().into()),
            kind: Some(kind.kind_name().into()),
            // The Event lands in the object's namespace (cluster-scoped: `default`).
            namespace: namespace.clone(),
            name: Some(name.clone()),
            ..ObjectReference::default()
        },
    }
}

/// The Event for a problem: a Warning whose reason names the problem.
fn problem_event(problem: &ObjectProblem) -> KubeEvent {
    KubeEvent {
        type_: EventType::Warning,
        reason: problem.reason.clone(),
        note: Some(problem.message.chars().take(1024).collect()),
        action: "Reconcile".into(),
        secondary: None,
    }
}

impl KubeDatastore {
    /// A client from `kubeconfig` (its current context, or `context`), or else inferred
    /// (in-cluster service account, then `KUBECONFIG` / `~/.kube/config`, with `context`).
    pub async fn connect(
        kubeconfig: Option<&Path>,
        context: Option<&str>,
    ) -> Result<Self, DatastoreError> {
        let endpoint = match (kubeconfig, context) {
            (Some(p), None) => format!("kubeconfig {}", p.display()),
            (Some(p), Some(c)) => format!("kubeconfig {} context {c}", p.display()),
            (None, None) => "in-cluster Kubernetes API".to_string(),
            (None, Some(c)) => format!("kubeconfig context {c}"),
        };
        let options = KubeConfigOptions {
            context: context.map(str::to_string),
            ..KubeConfigOptions::default()
        };
        let connect_error = |source| DatastoreError::Connect {
            endpoint: endpoint.clone(),
            source,
        };
        let config = match kubeconfig {
            Some(path) => {
                let file = Kubeconfig::read_from(path).map_err(|e| connect_error(boxed(e)))?;
                Config::from_custom_kubeconfig(file, &options)
                    .await
                    .map_err(|e| connect_error(boxed(e)))?
            }
            None if context.is_some() => Config::from_kubeconfig(&options)
                .await
                .map_err(|e| connect_error(boxed(e)))?,
            None => Config::infer().await.map_err(|e| connect_error(boxed(e)))?,
        };
        let client = Client::try_from(config).map_err(|e| connect_error(boxed(e)))?;
        Ok(Self::from_client(client))
    }

    /// An adapter over an existing client (tests use kube's mock transport). It watches Nodes
    /// and FelixConfigurations; see [`KubeDatastore::with_policy`] for the policy kinds.
    pub fn from_client(client: Client) -> Self {
        let recorder = Recorder::new(client.clone(), Reporter::from(EVENT_CONTROLLER));
        KubeDatastore {
            client,
            recorder,
            watch_policy: false,
            uids: Arc::default(),
            health: Arc::default(),
        }
    }

    /// Whether to list-watch the policy kinds too ([`Kind::KUBERNETES`]). Off, the agent needs
    /// neither their CRDs nor RBAC on them, and the snapshot's policy stays empty.
    pub fn with_policy(mut self, watch_policy: bool) -> Self {
        self.watch_policy = watch_policy;
        self
    }

    /// The policy kinds this adapter watches.
    fn policy_kinds(&self) -> &'static [Kind] {
        if self.watch_policy {
            &Kind::KUBERNETES
        } else {
            &[]
        }
    }

    /// [`event_reference`], with the UID of a watched FelixConfiguration or policy object when
    /// known (a Node's is its name, as the kubelet does).
    fn reference(&self, object: &ProblemObject) -> ObjectReference {
        let mut reference = event_reference(object);
        if !matches!(object, ProblemObject::Node(_))
            && let Ok(uids) = self.uids.lock()
        {
            reference.uid = uids.get(object).cloned();
        }
        reference
    }

    /// Every object of the policy kinds the agent watches, read once (no watch, no write),
    /// keyed and shaped as the watchers keep them, so the tools see what the agent sees.
    async fn list_policy(&self) -> Result<RawPolicyResources, DatastoreError> {
        let mut raw = RawPolicyResources::default();
        for kind in Kind::KUBERNETES {
            let resource = resource_name(kind);
            let api: Api<DynamicObject> =
                Api::all_with(self.client.clone(), &policy_resource(kind));
            let list = api
                .list(&kube::api::ListParams::default())
                .await
                .map_err(|e| match (api_status(&e), crd_of(kind)) {
                    (Some(status), Some(crd)) if not_found(status) => {
                        DatastoreError::MissingCrd { crd }
                    }
                    _ => classify(e, "list", &resource, |source| DatastoreError::List {
                        what: resource.clone(),
                        source,
                    }),
                })?;
            for object in &list.items {
                let (key, value) = policy_entry(kind, object);
                raw.insert(kind, key, value);
            }
        }
        Ok(raw)
    }

    /// Every FelixConfiguration, read once (no watch, no write).
    async fn list_felix_configurations(
        &self,
    ) -> Result<BTreeMap<String, Result<DecodedFelix, String>>, DatastoreError> {
        let api: Api<DynamicObject> =
            Api::all_with(self.client.clone(), &felix_configuration_resource());
        let list =
            api.list(&kube::api::ListParams::default())
                .await
                .map_err(|e| match api_status(&e) {
                    Some(status) if not_found(status) => DatastoreError::MissingCrd {
                        crd: FELIX_CONFIGURATION_CRD.into(),
                    },
                    _ => classify(e, "list", FELIX_CONFIGURATION_CRD, |source| {
                        DatastoreError::List {
                            what: FELIX_CONFIGURATION_CRD.into(),
                            source,
                        }
                    }),
                })?;
        Ok(list
            .items
            .iter()
            .map(|object| {
                let (name, entry) = felix_entry(object);
                (name, entry.spec)
            })
            .collect())
    }

    /// Every Node as this adapter decodes it, read once (no watch, no write).
    async fn list_nodes(&self) -> Result<BTreeMap<String, NodeResource>, DatastoreError> {
        let nodes = Api::<Node>::all(self.client.clone())
            .list(&kube::api::ListParams::default())
            .await
            .map_err(|e| {
                classify(e, "list", "nodes", |source| DatastoreError::List {
                    what: "nodes".into(),
                    source,
                })
            })?;
        Ok(nodes.items.iter().map(node_entry).collect())
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Creates an empty FelixConfiguration `default` unless one exists, as calico-node does, so
    /// that `kubectl patch felixconfiguration default ...` works on a fresh cluster. A missing
    /// CRD is fatal; being denied is only logged (an administrator can create it).
    async fn ensure_default_felix_configuration(&self) -> Result<(), DatastoreError> {
        let api: Api<DynamicObject> =
            Api::all_with(self.client.clone(), &felix_configuration_resource());
        let object: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "projectcalico.org/v3",
            "kind": "FelixConfiguration",
            "metadata": { "name": "default" },
            "spec": {}
        }))
        .map_err(|e| DatastoreError::Publish {
            node: "FelixConfiguration default".into(),
            source: boxed(e),
        })?;
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => {
                info!("created FelixConfiguration default (empty: Calico's defaults)");
                Ok(())
            }
            Err(error) => match api_status(&error) {
                Some(status) if status.code == 409 || status.reason == "AlreadyExists" => Ok(()),
                Some(status) if not_found(status) => Err(DatastoreError::MissingCrd {
                    crd: FELIX_CONFIGURATION_CRD.into(),
                }),
                _ => {
                    warn!(error = %error, "could not create FelixConfiguration default; create it to configure the cluster");
                    Ok(())
                }
            },
        }
    }
}

enum Item {
    Node(Box<Result<Event<Node>, watcher::Error>>),
    Felix(Box<Result<Event<DynamicObject>, watcher::Error>>),
    Policy(Kind, Box<Result<Event<DynamicObject>, watcher::Error>>),
}

impl Item {
    fn error(&self) -> Option<&watcher::Error> {
        match self {
            Item::Node(item) => item.as_ref().as_ref().err(),
            Item::Felix(item) => item.as_ref().as_ref().err(),
            Item::Policy(_, item) => item.as_ref().as_ref().err(),
        }
    }

    /// A watcher's `Init`: it announces a (re-)list before any request is made, so it says
    /// nothing about whether the API server answers.
    fn is_init(&self) -> bool {
        match self {
            Item::Node(item) => matches!(**item, Ok(Event::Init)),
            Item::Felix(item) | Item::Policy(_, item) => matches!(**item, Ok(Event::Init)),
        }
    }
}

#[async_trait]
impl Datastore for KubeDatastore {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn sync_health(&self) -> Arc<SyncHealth> {
        Arc::clone(&self.health)
    }

    async fn read_once(&self, scope: ReadScope) -> Result<ClusterSnapshot, DatastoreError> {
        let mut snapshot = ClusterSnapshot {
            synced: true,
            ..ClusterSnapshot::default()
        };
        if scope.nodes {
            snapshot.nodes = self.list_nodes().await?;
        }
        if scope.configuration {
            snapshot.felix_configurations = self.list_felix_configurations().await?;
        }
        if scope.policy {
            snapshot.policy = self.list_policy().await?;
        }
        Ok(snapshot)
    }

    async fn run(&self, cache: SnapshotSender) -> Result<(), DatastoreError> {
        self.ensure_default_felix_configuration().await?;
        let nodes = watcher::watcher(
            Api::<Node>::all(self.client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .map(|item| Item::Node(Box::new(item)))
        .boxed();
        let felix_api: Api<DynamicObject> =
            Api::all_with(self.client.clone(), &felix_configuration_resource());
        let felix = watcher::watcher(felix_api, watcher::Config::default())
            .default_backoff()
            .map(|item| Item::Felix(Box::new(item)))
            .boxed();
        let mut streams = vec![nodes, felix];
        // Namespaced kinds are watched across all namespaces.
        for &kind in self.policy_kinds() {
            let api: Api<DynamicObject> =
                Api::all_with(self.client.clone(), &policy_resource(kind));
            streams.push(
                watcher::watcher(api, watcher::Config::default())
                    .default_backoff()
                    .map(move |item| Item::Policy(kind, Box::new(item)))
                    .boxed(),
            );
        }
        let mut events = futures::stream::select_all(streams);
        let mut state = State::new(self.policy_kinds());
        while let Some(item) = events.next().await {
            match item.error() {
                None if item.is_init() => {}
                None => self.health.synced(),
                Some(error) => self.health.failed(&error.to_string()),
            }
            let changed = match item {
                Item::Node(item) => match *item {
                    Ok(event) => state.nodes.apply(event, node_entry),
                    Err(error) => {
                        if let Some(fatal) = fatal_watch_error(&error, "nodes", None) {
                            return Err(fatal);
                        }
                        warn!(error = %error, "watching nodes failed; the watcher re-lists or resumes");
                        false
                    }
                },
                Item::Felix(item) => match *item {
                    Ok(event) => state.felix.apply(event, felix_entry),
                    Err(error) => {
                        if let Some(fatal) = fatal_watch_error(
                            &error,
                            FELIX_CONFIGURATION_CRD,
                            Some(FELIX_CONFIGURATION_CRD),
                        ) {
                            return Err(fatal);
                        }
                        warn!(error = %error, "watching FelixConfigurations failed; the watcher re-lists or resumes");
                        false
                    }
                },
                Item::Policy(kind, item) => match *item {
                    Ok(event) => state
                        .policy
                        .get_mut(&kind)
                        .is_some_and(|c| c.apply(event, |o| policy_cache_entry(kind, o))),
                    Err(error) => {
                        let resource = resource_name(kind);
                        if let Some(fatal) =
                            fatal_watch_error(&error, &resource, crd_of(kind).as_deref())
                        {
                            return Err(fatal);
                        }
                        // The kind's last complete list stays in the snapshot meanwhile: a
                        // failure never empties a cache (fail closed).
                        warn!(error = %error, %kind, %resource, "watching a policy kind failed; its last complete list stays in force while the watcher re-lists or resumes");
                        false
                    }
                },
            };
            if !changed {
                continue;
            }
            let Some(snapshot) = state.snapshot() else {
                continue;
            };
            // Before the snapshot goes out, so problems found in it can name the UIDs.
            if let Ok(mut uids) = self.uids.lock() {
                *uids = state.uids();
            }
            let sent = cache.send_if_modified(|snap| {
                if *snap == snapshot {
                    false
                } else {
                    *snap = snapshot;
                    true
                }
            });
            if sent {
                debug!("snapshot updated");
            }
        }
        Err(DatastoreError::Watch {
            what: "the Kubernetes API".into(),
            source: "the watch streams ended".into(),
        })
    }

    async fn publish(
        &self,
        node: &str,
        published: &PublishedWireguard,
    ) -> Result<(), DatastoreError> {
        let api: Api<Node> = Api::all(self.client.clone());
        let publish_error = |source| DatastoreError::Publish {
            node: node.to_string(),
            source,
        };
        let current = api
            .get_opt(node)
            .await
            .map_err(|e| classify(e, "get", "nodes", publish_error))?
            .ok_or_else(|| DatastoreError::NodeNotFound {
                node: node.to_string(),
            })?;
        let Some(patch) = annotation_patch(current.annotations(), published) else {
            debug!(node, "published WireGuard annotations already current");
            return Ok(());
        };
        api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| match api_status(&e) {
                Some(status) if not_found(status) => DatastoreError::NodeNotFound {
                    node: node.to_string(),
                },
                _ => classify(e, "patch", "nodes", publish_error),
            })?;
        info!(node, "published WireGuard annotations");
        Ok(())
    }

    /// One Warning Event per problem, sent in the background; kube-runtime's `Recorder` folds
    /// repeats of the same event into a series (one patch) rather than new objects.
    async fn report(&self, problems: &[ObjectProblem]) {
        let recorder = self.recorder.clone();
        let events: Vec<(ObjectProblem, ObjectReference)> = problems
            .iter()
            .map(|problem| (problem.clone(), self.reference(&problem.object)))
            .collect();
        tokio::spawn(async move {
            for (problem, reference) in events {
                if let Err(error) = recorder.publish(&problem_event(&problem), &reference).await {
                    warn!(error = %error, object = ?problem.object, reason = %problem.reason, "could not record a Kubernetes Event");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
    use kube::api::ObjectMeta;

    fn k8s_node(name: &str, annotations: &[(&str, &str)], addresses: &[(&str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: Some("10.244.9.0/24".into()),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|(t, a)| NodeAddress {
                            type_: t.to_string(),
                            address: a.to_string(),
                        })
                        .collect(),
                ),
                ..NodeStatus::default()
            }),
        }
    }

    #[test]
    fn node_falls_back_to_internal_ips_by_family_and_pod_cidr() {
        let node = k8s_node(
            "n",
            &[
                (ANNOTATION_PUBLIC_KEY, " k "),
                (ANNOTATION_PUBLIC_KEY_V6, ""),
            ],
            &[
                ("ExternalIP", "203.0.113.1"),
                ("InternalIP", "fd00::5"),
                ("InternalIP", "192.0.2.5"),
            ],
        );
        let decoded = decode_node(&node);
        assert_eq!(decoded.name, "n");
        assert_eq!(decoded.ipv4_address.as_deref(), Some("192.0.2.5"));
        assert_eq!(decoded.ipv6_address.as_deref(), Some("fd00::5"));
        assert_eq!(decoded.pod_cidrs, vec!["10.244.9.0/24".to_string()]);
        assert_eq!(decoded.wireguard_public_key.as_deref(), Some("k"));
        assert_eq!(decoded.wireguard_public_key_v6, None);
    }

    #[test]
    fn node_prefers_calico_address_annotation_and_keeps_malformed_text() {
        let node = k8s_node(
            "n",
            &[
                (ANNOTATION_IPV4_ADDRESS, "198.51.100.7/24"),
                (ANNOTATION_IPV6_ADDRESS, "not-an-address"),
                (ANNOTATION_INTERFACE_V4, "10.244.9.1"),
            ],
            &[("InternalIP", "192.0.2.5"), ("InternalIP", "fd00::5")],
        );
        let decoded = decode_node(&node);
        assert_eq!(decoded.ipv4_address.as_deref(), Some("198.51.100.7"));
        assert_eq!(decoded.ipv6_address.as_deref(), Some("not-an-address"));
        assert_eq!(
            decoded.wireguard_interface_ipv4_address.as_deref(),
            Some("10.244.9.1")
        );
    }

    #[test]
    fn pod_cidrs_win_over_pod_cidr() {
        let mut node = k8s_node("n", &[], &[]);
        if let Some(spec) = node.spec.as_mut() {
            spec.pod_cidrs = Some(vec!["10.244.1.0/24".into(), "fd00:244:1::/64".into()]);
        }
        assert_eq!(
            decode_node(&node).pod_cidrs,
            vec!["10.244.1.0/24".to_string(), "fd00:244:1::/64".to_string()]
        );
    }

    #[test]
    fn felix_configuration_decoding_keeps_errors_per_object() {
        let ok: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration",
            "metadata": {"name": "default"},
            "spec": {"wireguardEnabled": true, "bpfEnabled": false}
        }))
        .expect("object");
        assert_eq!(
            decode_felix_configuration(&ok).map(|s| s.spec.wireguard_enabled),
            Ok(Some(true))
        );
        let bad: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration",
            "metadata": {"name": "node.x"},
            "spec": {"wireguardEnabled": "yes please"}
        }))
        .expect("object");
        // A bad field costs that field, not the object.
        let decoded = decode_felix_configuration(&bad).expect("the object decodes");
        assert_eq!(decoded.spec.wireguard_enabled, None);
        assert_eq!(decoded.invalid[0].field, "wireguardEnabled");
        assert_eq!(decoded.invalid[0].value, r#""yes please""#);
        let empty: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration",
            "metadata": {"name": "node.y"}
        }))
        .expect("object");
        assert_eq!(
            decode_felix_configuration(&empty),
            Ok(DecodedFelix::default())
        );
    }

    #[test]
    fn annotation_patch_touches_only_differing_keys() {
        let key: wiremesh_core::model::WgKey = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
            .parse()
            .expect("key");
        let published = PublishedWireguard {
            public_key_v4: Some(key),
            ..PublishedWireguard::default()
        };
        let mut annotations = BTreeMap::new();
        annotations.insert("other".to_string(), "x".to_string());
        annotations.insert(ANNOTATION_INTERFACE_V4.to_string(), "10.0.0.1".to_string());
        assert_eq!(
            annotation_patch(&annotations, &published),
            Some(serde_json::json!({"metadata": {"annotations": {
                ANNOTATION_PUBLIC_KEY: key.to_string(),
                ANNOTATION_INTERFACE_V4: null,
            }}}))
        );
        annotations.remove(ANNOTATION_INTERFACE_V4);
        annotations.insert(ANNOTATION_PUBLIC_KEY.to_string(), key.to_string());
        assert_eq!(annotation_patch(&annotations, &published), None);
    }

    fn names(state: &State) -> Option<Vec<String>> {
        state
            .snapshot()
            .map(|s| s.nodes.keys().cloned().collect::<Vec<_>>())
    }

    #[test]
    fn snapshot_only_after_every_list_and_relist_replaces_atomically() {
        let mut state = State::default();
        let node = |name: &str| k8s_node(name, &[], &[]);
        state.nodes.apply(Event::Init, node_entry);
        state.nodes.apply(Event::InitApply(node("a")), node_entry);
        state.nodes.apply(Event::InitApply(node("b")), node_entry);
        assert_eq!(names(&state), None, "nodes not listed completely yet");
        assert!(state.nodes.apply(Event::InitDone, node_entry));
        assert_eq!(names(&state), None, "FelixConfigurations not listed yet");
        state.felix.apply(Event::<DynamicObject>::Init, felix_entry);
        assert!(
            state
                .felix
                .apply(Event::<DynamicObject>::InitDone, felix_entry)
        );
        assert_eq!(names(&state), Some(vec!["a".into(), "b".into()]));

        // A re-list (after 410 Gone): until InitDone the old cache stays whole.
        state.nodes.apply(Event::Init, node_entry);
        state.nodes.apply(Event::InitApply(node("c")), node_entry);
        assert_eq!(names(&state), Some(vec!["a".into(), "b".into()]));
        assert!(state.nodes.apply(Event::InitDone, node_entry));
        assert_eq!(names(&state), Some(vec!["c".into()]));

        // Watch events after the list.
        assert!(state.nodes.apply(Event::Apply(node("d")), node_entry));
        assert!(!state.nodes.apply(Event::Apply(node("d")), node_entry));
        assert!(state.nodes.apply(Event::Delete(node("c")), node_entry));
        assert!(!state.nodes.apply(Event::Delete(node("c")), node_entry));
        assert_eq!(names(&state), Some(vec!["d".into()]));
    }

    #[test]
    fn policy_resources_match_the_generated_crds() {
        use kube::CustomResourceExt as _;
        use wiremesh_core::wire as api;
        for kind in Kind::CALICO {
            let (resource, crd) = match kind {
                Kind::GlobalNetworkPolicy => (
                    ApiResource::erase::<api::GlobalNetworkPolicy>(&()),
                    api::GlobalNetworkPolicy::crd(),
                ),
                Kind::NetworkPolicy => (
                    ApiResource::erase::<api::NetworkPolicy>(&()),
                    api::NetworkPolicy::crd(),
                ),
                Kind::Tier => (ApiResource::erase::<api::Tier>(&()), api::Tier::crd()),
                Kind::HostEndpoint => (
                    ApiResource::erase::<api::HostEndpoint>(&()),
                    api::HostEndpoint::crd(),
                ),
                Kind::GlobalNetworkSet => (
                    ApiResource::erase::<api::GlobalNetworkSet>(&()),
                    api::GlobalNetworkSet::crd(),
                ),
                Kind::NetworkSet => (
                    ApiResource::erase::<api::NetworkSet>(&()),
                    api::NetworkSet::crd(),
                ),
                Kind::KubernetesNetworkPolicy
                | Kind::WorkloadEndpoint
                | Kind::Profile
                | Kind::Pod
                | Kind::Namespace
                | Kind::ServiceAccount => unreachable!("not a CRD of ours"),
            };
            assert_eq!(policy_resource(kind), resource, "{kind}");
            assert_eq!(Some(policy_crd(kind)), crd.metadata.name, "{kind}");
            assert_eq!(
                kind.namespaced(),
                crd.spec.scope == "Namespaced",
                "{kind} scope"
            );
        }
        assert_eq!(
            policy_crd(Kind::GlobalNetworkSet),
            "globalnetworksets.projectcalico.org"
        );
    }

    fn dynamic(value: Value) -> DynamicObject {
        serde_json::from_value(value).expect("object")
    }

    #[test]
    fn policy_entry_keys_and_keeps_only_what_the_author_wrote() {
        // As the API server returns it: bookkeeping added to what was applied.
        let served = dynamic(serde_json::json!({
            "apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
            "metadata": {
                "name": "allow-dns", "namespace": "ns1",
                "uid": "0b6c1f8e-0000-4000-8000-000000000001",
                "resourceVersion": "4711", "generation": 3,
                "creationTimestamp": "2024-01-01T00:00:00Z",
                "labels": {"team": "net"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"big\":1}",
                    "owner": "ops"
                },
                "managedFields": [{"manager": "kubectl", "operation": "Update"}]
            },
            "spec": {"selector": "all()", "egress": [{"action": "Allow", "protocol": "UDP"}]}
        }));
        let (key, value) = policy_entry(Kind::NetworkPolicy, &served);
        assert_eq!(key, "ns1/allow-dns");
        assert_eq!(
            value,
            serde_json::json!({
                "apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
                "metadata": {
                    "name": "allow-dns", "namespace": "ns1",
                    "labels": {"team": "net"}, "annotations": {"owner": "ops"}
                },
                "spec": {"selector": "all()", "egress": [{"action": "Allow", "protocol": "UDP"}]}
            })
        );

        // Cluster-scoped: the key is the name, no namespace even if one were sent; no spec, none.
        let set = dynamic(serde_json::json!({
            "apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
            "metadata": {"name": "blocked", "resourceVersion": "9",
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}}
        }));
        assert_eq!(
            policy_entry(Kind::GlobalNetworkSet, &set),
            (
                "blocked".to_string(),
                serde_json::json!({
                    "apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
                    "metadata": {"name": "blocked"}
                })
            )
        );
    }

    #[test]
    fn policy_kinds_hold_the_snapshot_until_listed_and_relist_replaces() {
        let mut state = State::new(&[Kind::GlobalNetworkSet, Kind::NetworkSet]);
        let entry = |kind: Kind| move |o: &DynamicObject| policy_cache_entry(kind, o);
        let set = |name: &str, net: &str| {
            dynamic(serde_json::json!({
                "apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
                "metadata": {"name": name}, "spec": {"nets": [net]}
            }))
        };
        state.nodes.apply(Event::Init, node_entry);
        state.nodes.apply(Event::InitDone, node_entry);
        state.felix.apply(Event::Init, felix_entry);
        state.felix.apply(Event::InitDone, felix_entry);
        let gns = state
            .policy
            .get_mut(&Kind::GlobalNetworkSet)
            .expect("cache");
        gns.apply(Event::Init, entry(Kind::GlobalNetworkSet));
        gns.apply(
            Event::InitApply(set("a", "10.0.0.0/8")),
            entry(Kind::GlobalNetworkSet),
        );
        assert!(gns.apply(Event::InitDone, entry(Kind::GlobalNetworkSet)));
        assert_eq!(state.snapshot(), None, "NetworkSets not listed yet");
        let ns = state.policy.get_mut(&Kind::NetworkSet).expect("cache");
        ns.apply(Event::Init, entry(Kind::NetworkSet));
        ns.apply(Event::InitDone, entry(Kind::NetworkSet));
        let snapshot = state.snapshot().expect("every kind listed");
        let mut want = RawPolicyResources::default();
        want.insert(
            Kind::GlobalNetworkSet,
            "a".into(),
            policy_entry(Kind::GlobalNetworkSet, &set("a", "10.0.0.0/8")).1,
        );
        assert_eq!(snapshot.policy, want, "an empty kind is left out");

        // A re-list replaces the kind in one step.
        let gns = state
            .policy
            .get_mut(&Kind::GlobalNetworkSet)
            .expect("cache");
        gns.apply(Event::Init, entry(Kind::GlobalNetworkSet));
        gns.apply(
            Event::InitApply(set("b", "192.0.2.0/24")),
            entry(Kind::GlobalNetworkSet),
        );
        assert_eq!(state.snapshot().map(|s| s.policy), Some(want));
        let gns = state
            .policy
            .get_mut(&Kind::GlobalNetworkSet)
            .expect("cache");
        assert!(gns.apply(Event::InitDone, entry(Kind::GlobalNetworkSet)));
        let keys: Vec<String> = state
            .snapshot()
            .and_then(|s| s.policy.objects.get(&Kind::GlobalNetworkSet).cloned())
            .map(|m| m.into_keys().collect())
            .unwrap_or_default();
        assert_eq!(keys, vec!["b".to_string()]);
    }

    /// A pod as the API server serves it: what policy reads, and much it does not.
    fn served_pod(name: &str, rv: &str, ready: &str, extra: Value) -> DynamicObject {
        let mut pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "namespace": "shop", "uid": "0b6c1f8e-0000-4000-8000-000000000002",
                "resourceVersion": rv, "generation": 1,
                "creationTimestamp": "2024-01-01T00:00:00Z",
                "labels": {"app": "web"},
                "annotations": {
                    "cni.projectcalico.org/podIP": "10.244.1.5/32",
                    "kubectl.kubernetes.io/restartedAt": "2024-01-01T00:00:00Z"
                },
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                     "name": "web-1", "uid": "1"}],
                "managedFields": [{"manager": "kubelet", "operation": "Update"}]
            },
            "spec": {
                "nodeName": "node1", "serviceAccountName": "web",
                "containers": [
                    {"name": "web", "image": "nginx:1.27",
                     "env": [{"name": "A", "value": "1"}],
                     "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}],
                     "readinessProbe": {"httpGet": {"path": "/", "port": 80}}},
                    {"name": "sidecar", "image": "busybox"}
                ],
                "initContainers": [
                    {"name": "init", "image": "busybox",
                     "ports": [{"name": "metrics", "containerPort": 9090}]}
                ],
                "volumes": [{"name": "data", "emptyDir": {}}],
                "tolerations": [{"operator": "Exists"}]
            },
            "status": {
                "phase": "Running", "podIP": "10.244.1.5",
                "podIPs": [{"ip": "10.244.1.5"}],
                "hostIP": "192.0.2.1", "startTime": "2024-01-01T00:00:01Z",
                "conditions": [{"type": "Ready", "status": ready}],
                "containerStatuses": [{"name": "web", "ready": ready == "True",
                                       "restartCount": 0, "image": "nginx:1.27",
                                       "imageID": "", "state": {"running": {}}}]
            }
        });
        if let (Some(pod), Value::Object(extra)) = (pod.as_object_mut(), extra) {
            for (k, v) in extra {
                pod.insert(k, v);
            }
        }
        dynamic(pod)
    }

    #[test]
    fn pods_keep_only_what_policy_reads() {
        let (key, value) = policy_entry(Kind::Pod, &served_pod("web-0", "7", "True", Value::Null));
        assert_eq!(key, "shop/web-0");
        assert_eq!(
            value,
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": "web-0", "namespace": "shop", "labels": {"app": "web"},
                    "annotations": {"cni.projectcalico.org/podIP": "10.244.1.5/32"}
                },
                "spec": {
                    "nodeName": "node1", "serviceAccountName": "web",
                    "containers": [{"name": "web", "ports": [
                        {"name": "http", "containerPort": 80, "protocol": "TCP"}]}],
                    "initContainers": [{"name": "init", "ports": [
                        {"name": "metrics", "containerPort": 9090}]}]
                },
                "status": {"phase": "Running", "podIP": "10.244.1.5",
                           "podIPs": [{"ip": "10.244.1.5"}]}
            })
        );
        // The decode path of policy::resources turns the stripped pod into its endpoint.
        let mut raw = RawPolicyResources::default();
        raw.insert(Kind::Pod, key, value);
        let resources = wiremesh_core::policy::PolicyResources::from_raw(&raw);
        assert_eq!(resources.errors, vec![]);
        let [endpoint] = resources.workload_endpoints.as_slice() else {
            panic!("one endpoint: {resources:?}");
        };
        assert_eq!(endpoint.node, "node1");
        assert_eq!(
            endpoint.ips,
            vec!["10.244.1.5/32".parse::<IpNet>().expect("net")]
        );
        assert_eq!(endpoint.ports.len(), 2, "{:?}", endpoint.ports);
        assert_eq!(endpoint.profiles, ["kns.shop", "ksa.shop.web"]);
    }

    #[test]
    fn pod_updates_policy_does_not_see_change_nothing() {
        let mut cache = Cache::default();
        let entry = |o: &DynamicObject| policy_cache_entry(Kind::Pod, o);
        cache.apply(Event::Init, entry);
        cache.apply(
            Event::InitApply(served_pod("web-0", "7", "False", Value::Null)),
            entry,
        );
        assert!(cache.apply(Event::InitDone, entry));
        // Readiness, container status and version change: no reconcile.
        assert!(!cache.apply(
            Event::Apply(served_pod("web-0", "8", "True", Value::Null)),
            entry
        ));
        // A label does.
        let mut relabelled = served_pod("web-0", "9", "True", Value::Null);
        relabelled
            .metadata
            .labels
            .get_or_insert_default()
            .insert("tier".into(), "front".into());
        assert!(cache.apply(Event::Apply(relabelled), entry));
        // And so does the pod's phase.
        let done = served_pod(
            "web-0",
            "10",
            "False",
            serde_json::json!({"status": {"phase": "Succeeded", "podIP": "10.244.1.5"}}),
        );
        assert!(cache.apply(Event::Apply(done), entry));
    }

    #[test]
    fn every_ip_annotation_policy_reads_is_kept() {
        for annotation in POD_IP_ANNOTATIONS {
            let pod = dynamic(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "ns",
                             "annotations": {annotation: "10.244.2.7", "other": "x"}},
                "spec": {"nodeName": "node2", "containers": [{"name": "c"}]},
                "status": {"phase": "Pending"}
            }));
            let (key, value) = policy_entry(Kind::Pod, &pod);
            assert_eq!(
                value["metadata"]["annotations"],
                serde_json::json!({annotation: "10.244.2.7"})
            );
            let mut raw = RawPolicyResources::default();
            raw.insert(Kind::Pod, key, value);
            let resources = wiremesh_core::policy::PolicyResources::from_raw(&raw);
            assert_eq!(resources.workload_endpoints.len(), 1, "{annotation}");
        }
        // Terminating with the IP annotation emptied: released, no endpoint.
        let pod = dynamic(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns",
                         "deletionTimestamp": "2024-01-01T00:00:00Z",
                         "annotations": {"cni.projectcalico.org/podIP": ""}},
            "spec": {"nodeName": "node2"},
            "status": {"phase": "Running", "podIP": "10.244.2.7"}
        }));
        let (key, value) = policy_entry(Kind::Pod, &pod);
        assert_eq!(
            value["metadata"]["deletionTimestamp"],
            "2024-01-01T00:00:00Z"
        );
        let mut raw = RawPolicyResources::default();
        raw.insert(Kind::Pod, key, value);
        let resources = wiremesh_core::policy::PolicyResources::from_raw(&raw);
        assert_eq!(resources.workload_endpoints, vec![]);
        assert_eq!(resources.errors, vec![]);
    }

    #[test]
    fn namespaces_service_accounts_and_kubernetes_network_policies() {
        let ns = dynamic(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "uid": "u", "resourceVersion": "3",
                         "labels": {"kubernetes.io/metadata.name": "shop", "team": "a"},
                         "annotations": {"owner": "ops"},
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"}
        }));
        let (key, value) = policy_entry(Kind::Namespace, &ns);
        assert_eq!(key, "shop");
        assert_eq!(
            value,
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {
                "name": "shop", "labels": {"kubernetes.io/metadata.name": "shop", "team": "a"}}})
        );
        let sa = dynamic(serde_json::json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u",
                         "labels": {"role": "frontend"}},
            "secrets": [{"name": "web-token-abcde"}]
        }));
        let (sa_key, sa_value) = policy_entry(Kind::ServiceAccount, &sa);
        assert_eq!(sa_key, "shop/web");
        assert_eq!(
            sa_value,
            serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {
                "name": "web", "namespace": "shop", "labels": {"role": "frontend"}}})
        );
        let np = dynamic(serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny", "namespace": "shop", "uid": "u", "generation": 1,
                         "annotations": {LAST_APPLIED_ANNOTATION: "{}"}},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
        }));
        let (np_key, np_value) = policy_entry(Kind::KubernetesNetworkPolicy, &np);
        assert_eq!(np_key, "shop/deny");
        assert_eq!(
            np_value,
            serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "deny", "namespace": "shop"},
                "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}})
        );
        let mut raw = RawPolicyResources::default();
        raw.insert(Kind::Namespace, key, value);
        raw.insert(Kind::ServiceAccount, sa_key, sa_value);
        raw.insert(Kind::KubernetesNetworkPolicy, np_key, np_value);
        let resources = wiremesh_core::policy::PolicyResources::from_raw(&raw);
        assert_eq!(resources.errors, vec![]);
        assert_eq!(
            resources.profiles.keys().collect::<Vec<_>>(),
            ["kns.shop", "ksa.shop.web"]
        );
        assert_eq!(resources.policies.len(), 1);
    }

    #[test]
    fn the_kubernetes_kinds_are_every_kind_a_cluster_holds() {
        // WorkloadEndpoints and Profiles are derived from Pods, Namespaces and ServiceAccounts.
        let mut watched: Vec<Kind> = Kind::KUBERNETES.to_vec();
        watched.extend([Kind::WorkloadEndpoint, Kind::Profile]);
        watched.sort();
        let mut all = Kind::ALL.to_vec();
        all.sort();
        assert_eq!(watched, all);
        assert!(Kind::CALICO.iter().all(|k| Kind::KUBERNETES.contains(k)));
        assert_eq!(
            resource_name(Kind::KubernetesNetworkPolicy),
            "networkpolicies.networking.k8s.io"
        );
        assert_eq!(resource_name(Kind::Pod), "pods");
        assert_eq!(crd_of(Kind::Pod), None);
        assert_eq!(
            crd_of(Kind::Tier).as_deref(),
            Some("tiers.projectcalico.org")
        );
        let reference = event_reference(&ProblemObject::Policy {
            kind: Kind::KubernetesNetworkPolicy,
            namespace: Some("shop".into()),
            name: "deny".into(),
        });
        assert_eq!(
            reference.api_version.as_deref(),
            Some("networking.k8s.io/v1")
        );
        assert_eq!(reference.kind.as_deref(), Some("NetworkPolicy"));
    }
}

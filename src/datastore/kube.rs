//! The Kubernetes datastore (Calico's "KDD" layout).
//!
//! | what | where |
//! |---|---|
//! | node | core/v1 `Node`: pod CIDRs from `spec.podCIDRs` (else `spec.podCIDR`); underlay from the `projectcalico.org/IPv4Address` / `IPv6Address` annotation (prefix dropped), else the `InternalIP` of that family |
//! | WireGuard fields | `Node.metadata.annotations`: [`ANNOTATION_PUBLIC_KEY`], [`ANNOTATION_PUBLIC_KEY_V6`], [`ANNOTATION_INTERFACE_V4`], [`ANNOTATION_INTERFACE_V6`] |
//! | settings | `felixconfigurations.projectcalico.org/v3` (cluster-scoped; `default`, `node.<name>`) |
//!
//! Both kinds are list-watched with kube-runtime's `watcher`. Its `Init` / `InitApply` /
//! `InitDone` events are buffered, and the cache of that kind is replaced in one step at
//! `InitDone`, so a re-list (after a 410 Gone or any desync) never shows a partial cache. The
//! snapshot is sent only once both kinds have been listed (`synced`), and only when it changed.
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

use super::{Datastore, DatastoreError, ObjectProblem, ProblemObject, SnapshotSender};
use crate::config::FelixConfigurationSpec;
use crate::model::{ClusterSnapshot, Family, NodeResource, PublishedWireguard};

pub const ANNOTATION_PUBLIC_KEY: &str = "projectcalico.org/WireguardPublicKey";
pub const ANNOTATION_PUBLIC_KEY_V6: &str = "projectcalico.org/WireguardPublicKeyV6";
pub const ANNOTATION_INTERFACE_V4: &str = "projectcalico.org/IPv4WireguardInterfaceAddr";
pub const ANNOTATION_INTERFACE_V6: &str = "projectcalico.org/IPv6WireguardInterfaceAddr";
/// Calico's node address annotations (written by calico-node's autodetection, or by hand).
pub const ANNOTATION_IPV4_ADDRESS: &str = "projectcalico.org/IPv4Address";
pub const ANNOTATION_IPV6_ADDRESS: &str = "projectcalico.org/IPv6Address";

/// The CRD the agent needs besides core Nodes.
pub const FELIX_CONFIGURATION_CRD: &str = "felixconfigurations.projectcalico.org";

/// The `projectcalico.org/v3` FelixConfiguration resource, for untyped access.
pub fn felix_configuration_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("projectcalico.org", "v3", "FelixConfiguration"),
        "felixconfigurations",
    )
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
    NodeResource {
        name: node.name_any(),
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
pub fn decode_felix_configuration(
    object: &DynamicObject,
) -> Result<FelixConfigurationSpec, String> {
    match object.data.get("spec") {
        None | Some(Value::Null) => Ok(FelixConfigurationSpec::default()),
        Some(spec) => serde_json::from_value(spec.clone())
            .map_err(|e| format!("FelixConfiguration spec does not decode: {e}")),
    }
}

/// The merge patch that makes `annotations` carry `published`: only the differing keys, a
/// `null` for each to remove. `None` when nothing differs.
pub fn annotation_patch(
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
    felix: Cache<Result<FelixConfigurationSpec, String>>,
}

impl State {
    /// The snapshot, once both kinds have been listed.
    fn snapshot(&self) -> Option<ClusterSnapshot> {
        Some(ClusterSnapshot {
            nodes: self.nodes.current.clone()?,
            felix_configurations: self.felix.current.clone()?,
            // Policy resources are not watched on Kubernetes yet (etcd only).
            policy: Default::default(),
            synced: true,
        })
    }
}

fn node_entry(node: &Node) -> (String, NodeResource) {
    let decoded = decode_node(node);
    (decoded.name.clone(), decoded)
}

fn felix_entry(object: &DynamicObject) -> (String, Result<FelixConfigurationSpec, String>) {
    let spec = decode_felix_configuration(object);
    if let Err(error) = &spec {
        warn!(felixconfiguration = %object.name_any(), %error, "FelixConfiguration does not decode");
    }
    (object.name_any(), spec)
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
    if not_found(status)
        && verb == "list"
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
}

/// The Events' reporting controller.
pub const EVENT_CONTROLLER: &str = "wiremesh";

/// Where an Event about `object` is attached. A Node's reference carries its name as UID, as the
/// kubelet's do, so that `kubectl describe node` lists our Events.
pub fn event_reference(object: &ProblemObject) -> ObjectReference {
    match object {
        ProblemObject::Node(name) => ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(name.clone()),
            uid: Some(name.clone()),
            ..ObjectReference::default()
        },
        ProblemObject::FelixConfiguration(name) => ObjectReference {
            api_version: Some("projectcalico.org/v3".into()),
            kind: Some("FelixConfiguration".into()),
            name: Some(name.clone()),
            ..ObjectReference::default()
        },
    }
}

/// The Event for a problem: a Warning whose reason names the problem.
pub fn problem_event(problem: &ObjectProblem) -> KubeEvent {
    KubeEvent {
        type_: EventType::Warning,
        reason: problem.reason.clone(),
        note: Some(problem.message.chars().take(1024).collect()),
        action: "Reconcile".into(),
        secondary: None,
    }
}

impl KubeDatastore {
    /// A client from `kubeconfig`, or else inferred (in-cluster service account, then
    /// `KUBECONFIG` / `~/.kube/config`).
    pub async fn connect(kubeconfig: Option<&Path>) -> Result<Self, DatastoreError> {
        let endpoint = kubeconfig
            .map(|p| format!("kubeconfig {}", p.display()))
            .unwrap_or_else(|| "in-cluster Kubernetes API".to_string());
        let connect_error = |source| DatastoreError::Connect {
            endpoint: endpoint.clone(),
            source,
        };
        let config = match kubeconfig {
            Some(path) => {
                let file = Kubeconfig::read_from(path).map_err(|e| connect_error(boxed(e)))?;
                Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                    .await
                    .map_err(|e| connect_error(boxed(e)))?
            }
            None => Config::infer().await.map_err(|e| connect_error(boxed(e)))?,
        };
        let client = Client::try_from(config).map_err(|e| connect_error(boxed(e)))?;
        Ok(Self::from_client(client))
    }

    /// An adapter over an existing client (tests use kube's mock transport).
    pub fn from_client(client: Client) -> Self {
        let recorder = Recorder::new(client.clone(), Reporter::from(EVENT_CONTROLLER));
        KubeDatastore { client, recorder }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Creates an empty FelixConfiguration `default` unless one exists, as calico-node does, so
    /// that `kubectl patch felixconfiguration default ...` works on a fresh cluster. A missing
    /// CRD is fatal; being denied is only logged (an administrator can create it).
    pub async fn ensure_default_felix_configuration(&self) -> Result<(), DatastoreError> {
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
}

#[async_trait]
impl Datastore for KubeDatastore {
    fn kind(&self) -> &'static str {
        "kubernetes"
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
        let mut events = futures::stream::select(nodes, felix);
        let mut state = State::default();
        while let Some(item) = events.next().await {
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
            };
            if !changed {
                continue;
            }
            let Some(snapshot) = state.snapshot() else {
                continue;
            };
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
            what: "nodes and felixconfigurations.projectcalico.org".into(),
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
        let problems = problems.to_vec();
        tokio::spawn(async move {
            for problem in problems {
                let reference = event_reference(&problem.object);
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
            decode_felix_configuration(&ok).map(|s| s.wireguard_enabled),
            Ok(Some(true))
        );
        let bad: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration",
            "metadata": {"name": "node.x"},
            "spec": {"wireguardEnabled": "yes please"}
        }))
        .expect("object");
        assert!(decode_felix_configuration(&bad).is_err());
        let empty: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration",
            "metadata": {"name": "node.y"}
        }))
        .expect("object");
        assert_eq!(
            decode_felix_configuration(&empty),
            Ok(FelixConfigurationSpec::default())
        );
    }

    #[test]
    fn annotation_patch_touches_only_differing_keys() {
        let key: crate::model::WgKey = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
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
}

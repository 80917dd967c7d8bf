//! The lab against a Kubernetes API server (`wiremesh lab up --kubeconfig`).
//!
//! Lab nodes become `Node` objects (`spec.podCIDR(s)`, an `InternalIP`, and Calico's
//! `projectcalico.org/IPv4Address` annotation with the underlay address); settings go to the
//! FelixConfiguration objects; each agent runs with `--datastore kubernetes`.
//!
//! The agents run in their node's network namespace, from which the API server is not
//! reachable. Each node therefore gets a relay (`wiremesh lab relay`, a daemon in the host's
//! namespace): it binds 127.0.0.1 inside the node's namespace (from a thread that enters it) and
//! opens its outbound connections from the host's. `lab down` stops the relays by pid. The agent's kubeconfig is the given one with the server
//! rewritten to the relay (and `tls-server-name` set to the real host, so TLS still checks the
//! API server's certificate).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::thread;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::ResourceExt as _;
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::Kubeconfig;
use kube::{Api, Client};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use super::pods::LabPod;
use super::{IpFamily, LabError, NodeState};
use wiremesh_core::model::{Family, FelixConfigurations};
use wiremesh_datastore::kube::{
    ANNOTATION_IPV4_ADDRESS, ANNOTATION_IPV6_ADDRESS, KubeDatastore, decode_felix_configuration,
    felix_configuration_resource,
};

/// Where the relay listens inside each node's namespace.
pub const RELAY_LISTEN: &str = "127.0.0.1:16443";

fn kube_error(step: &str) -> impl FnOnce(kube::Error) -> LabError + '_ {
    move |e| LabError::Kube {
        step: step.to_string(),
        source: Box::new(e),
    }
}

pub async fn client(kubeconfig: &Path) -> Result<Client, LabError> {
    let datastore = KubeDatastore::connect(Some(kubeconfig), None)
        .await
        .map_err(|e| LabError::Kube {
            step: format!("connecting with {}", kubeconfig.display()),
            source: Box::new(e),
        })?;
    Ok(datastore.client().clone())
}

fn felix_api(client: &Client) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &felix_configuration_resource())
}

/// Merges `spec` into FelixConfiguration `name` (JSON merge patch: a null removes a field),
/// creating the object when it does not exist.
pub async fn merge_felix_configuration(
    client: &Client,
    name: &str,
    spec: Value,
) -> Result<(), LabError> {
    let api = felix_api(client);
    let step = format!("updating FelixConfiguration {name}");
    let existing = api.get_opt(name).await.map_err(kube_error(&step))?;
    if existing.is_some() {
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await
        .map_err(kube_error(&step))?;
    } else {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "projectcalico.org/v3",
            "kind": "FelixConfiguration",
            "metadata": { "name": name },
            "spec": strip_nulls(spec),
        }))
        .map_err(|e| LabError::Kube {
            step: step.clone(),
            source: Box::new(e),
        })?;
        api.create(&PostParams::default(), &object)
            .await
            .map_err(kube_error(&step))?;
    }
    Ok(())
}

/// Every FelixConfiguration, decoded as the agent decodes them.
pub async fn felix_configurations(client: &Client) -> Result<FelixConfigurations, LabError> {
    let list = felix_api(client)
        .list(&ListParams::default())
        .await
        .map_err(kube_error("listing FelixConfigurations"))?;
    Ok(list
        .items
        .iter()
        .map(|o| (o.name_any(), decode_felix_configuration(o)))
        .collect())
}

fn strip_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.into_iter().filter(|(_, v)| !v.is_null()).collect())
        }
        other => other,
    }
}

/// The Node object of a lab node, with the lab's families' addresses and pod CIDRs.
pub fn node_object(node: &NodeState, lab: &str, family: IpFamily) -> Value {
    let mut annotations = serde_json::Map::new();
    let mut addresses = Vec::new();
    if family.has(Family::V4) {
        annotations.insert(
            ANNOTATION_IPV4_ADDRESS.into(),
            format!("{}/24", node.underlay_ip).into(),
        );
        addresses.push(json!({ "type": "InternalIP", "address": node.underlay_ip.to_string() }));
    }
    if let Some(v6) = node.ipv6.as_ref().filter(|_| family.has(Family::V6)) {
        annotations.insert(
            ANNOTATION_IPV6_ADDRESS.into(),
            format!("{}/64", v6.underlay_ip).into(),
        );
        addresses.push(json!({ "type": "InternalIP", "address": v6.underlay_ip.to_string() }));
    }
    addresses.push(json!({ "type": "Hostname", "address": node.name }));
    let cidrs: Vec<String> = node
        .pod_cidrs(family)
        .iter()
        .map(ToString::to_string)
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "labels": super::node_labels(node, lab),
            "annotations": annotations,
        },
        "spec": {
            "podCIDR": cidrs.first(),
            "podCIDRs": cidrs,
            // Nothing is scheduled on a lab node.
            "unschedulable": true,
        },
        "status": { "addresses": addresses },
    })
}

/// The label that marks a Node object as created by lab `<value>`; `lab down` deletes exactly
/// the Nodes carrying it with the lab's name.
pub const LAB_LABEL: &str = "wiremesh.io/lab";

/// (Re)creates the Node object of `node`. A leftover of an earlier run of this lab is replaced;
/// a Node of the same name that this lab did not create is never touched: that is an error.
pub async fn register_node(
    client: &Client,
    node: &NodeState,
    lab: &str,
    family: IpFamily,
) -> Result<(), LabError> {
    let api: Api<Node> = Api::all(client.clone());
    let step = format!("registering Node {}", node.name);
    if let Some(existing) = api.get_opt(&node.name).await.map_err(kube_error(&step))? {
        if existing.labels().get(LAB_LABEL).map(String::as_str) != Some(lab) {
            return Err(LabError::Kube {
                step,
                source: format!(
                    "a Node named {} already exists and was not created by lab {lab} (no label {LAB_LABEL}={lab}); the lab does not touch it. Use a cluster without such a Node",
                    node.name
                )
                .into(),
            });
        }
        delete_node(client, &node.name).await?;
    }
    let object: Node =
        serde_json::from_value(node_object(node, lab, family)).map_err(|e| LabError::Kube {
            step: step.clone(),
            source: Box::new(e),
        })?;
    api.create(&PostParams::default(), &object)
        .await
        .map_err(kube_error(&step))?;
    // Some API servers drop status on create; set the addresses through the subresource too.
    let status = json!({ "status": node_object(node, lab, family)["status"] });
    api.patch_status(&node.name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .map_err(kube_error(&step))?;
    Ok(())
}

/// Deletes a Node object; a missing one is success.
pub async fn delete_node(client: &Client, name: &str) -> Result<(), LabError> {
    let api: Api<Node> = Api::all(client.clone());
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(kube_error(&format!("deleting Node {name}"))(e)),
    }
}

/// Deletes every Node object labelled as created by lab `lab`, and nothing else; returns the
/// names deleted.
async fn delete_lab_nodes(client: &Client, lab: &str) -> Result<Vec<String>, LabError> {
    let api: Api<Node> = Api::all(client.clone());
    let step = format!("listing the Node objects of lab {lab}");
    let params = ListParams::default().labels(&format!("{LAB_LABEL}={lab}"));
    let nodes = api.list(&params).await.map_err(kube_error(&step))?;
    let mut deleted = Vec::new();
    for node in nodes.items {
        let name = node.name_any();
        delete_node(client, &name).await?;
        deleted.push(name);
    }
    Ok(deleted)
}

/// What a lab pod's containers run as far as the API server is concerned: it requires an image,
/// and the lab runs none (its server stands in for the containers).
const PLACEHOLDER_IMAGE: &str = "registry.k8s.io/pause:3.9";
/// Lab pods are deleted at once: no kubelet confirms a graceful deletion.
fn delete_now() -> DeleteParams {
    DeleteParams::default().grace_period(0)
}

/// A JSON merge patch of `metadata.labels` from `current` to `wanted` (a merge patch merges
/// maps, so labels no longer wanted are removed with null).
fn labels_patch(current: &BTreeMap<String, String>, wanted: &BTreeMap<String, String>) -> Value {
    let mut labels = serde_json::Map::new();
    for key in current.keys().filter(|k| !wanted.contains_key(*k)) {
        labels.insert(key.clone(), Value::Null);
    }
    for (key, value) in wanted {
        labels.insert(key.clone(), value.clone().into());
    }
    json!({ "metadata": { "labels": labels } })
}

fn decode_error(step: &str) -> impl FnOnce(serde_json::Error) -> LabError + '_ {
    move |e| LabError::Kube {
        step: step.to_string(),
        source: Box::new(e),
    }
}

/// The labels of Namespace `name` as the API server has them; None when it does not exist.
pub async fn namespace_labels(
    client: &Client,
    name: &str,
) -> Result<Option<BTreeMap<String, String>>, LabError> {
    let api: Api<Namespace> = Api::all(client.clone());
    let step = format!("reading Namespace {name}");
    let found = api.get_opt(name).await.map_err(kube_error(&step))?;
    Ok(found.map(|ns| ns.labels().clone()))
}

/// Creates Namespace `name` with `labels`, or sets its labels to exactly `labels`; then creates
/// its `default` ServiceAccount when missing (no controller does on a bare API server, and pod
/// admission needs it). Returns what was written.
pub async fn publish_namespace(
    client: &Client,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Vec<String>, LabError> {
    let api: Api<Namespace> = Api::all(client.clone());
    let step = format!("publishing Namespace {name}");
    match api.get_opt(name).await.map_err(kube_error(&step))? {
        Some(current) => {
            api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(labels_patch(current.labels(), labels)),
            )
            .await
            .map_err(kube_error(&step))?;
        }
        None => {
            let object: Namespace = serde_json::from_value(json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": { "name": name, "labels": labels },
            }))
            .map_err(decode_error(&step))?;
            api.create(&PostParams::default(), &object)
                .await
                .map_err(kube_error(&step))?;
        }
    }
    let mut touched = vec![format!("Namespace {name}")];
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    let step = format!("creating ServiceAccount {name}/default");
    if accounts
        .get_opt("default")
        .await
        .map_err(kube_error(&step))?
        .is_none()
    {
        let account: ServiceAccount = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": { "name": "default", "namespace": name },
        }))
        .map_err(decode_error(&step))?;
        match accounts.create(&PostParams::default(), &account).await {
            Ok(_) => touched.push(format!("ServiceAccount {name}/default")),
            // Created meanwhile by someone else: as good.
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => return Err(kube_error(&step)(e)),
        }
    }
    Ok(touched)
}

/// The Pod object of a lab pod: the manifest's Pod (`manifest`), bound to the lab node it runs
/// on, without a mounted token (no token controller on a bare API server), containers without
/// an image given a placeholder, and no status (written separately).
pub fn pod_object(manifest: &Value, pod: &LabPod) -> Value {
    let mut object = manifest.clone();
    if let Some(map) = object.as_object_mut() {
        map.remove("status");
    }
    object["metadata"]["namespace"] = pod.namespace.clone().into();
    if let Some(meta) = object["metadata"].as_object_mut() {
        for server_owned in ["resourceVersion", "uid", "creationTimestamp"] {
            meta.remove(server_owned);
        }
    }
    object["spec"]["nodeName"] = pod.node_name.clone().into();
    object["spec"]["automountServiceAccountToken"] = false.into();
    for list in ["containers", "initContainers"] {
        if let Some(containers) = object["spec"][list].as_array_mut() {
            for container in containers {
                if container
                    .get("image")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    container["image"] = PLACEHOLDER_IMAGE.into();
                }
            }
        }
    }
    object
}

/// The status a kubelet would write for a running lab pod.
pub fn pod_status(pod: &LabPod) -> Value {
    let addresses: Vec<String> = pod.addresses().iter().map(ToString::to_string).collect();
    let pod_ips: Vec<Value> = addresses.iter().map(|a| json!({ "ip": a })).collect();
    json!({ "status": {
        "phase": "Running",
        "podIP": addresses.first(),
        "podIPs": pod_ips,
    } })
}

/// Creates the Pod object of `pod` (from its manifest), or updates its labels when it exists on
/// the same node (a Pod's spec cannot change; one left on another node is replaced), then
/// writes its status through the status subresource, as the kubelet would.
pub async fn publish_pod(
    client: &Client,
    manifest: &Value,
    pod: &LabPod,
) -> Result<String, LabError> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
    let step = format!("publishing Pod {}", pod.key());
    let wanted: Pod =
        serde_json::from_value(pod_object(manifest, pod)).map_err(decode_error(&step))?;
    let current = api.get_opt(&pod.name).await.map_err(kube_error(&step))?;
    let same_node = current.as_ref().is_some_and(|c| {
        c.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(pod.node_name.as_str())
    });
    match current {
        Some(current) if same_node => {
            api.patch(
                &pod.name,
                &PatchParams::default(),
                &Patch::Merge(labels_patch(current.labels(), &pod.labels)),
            )
            .await
            .map_err(kube_error(&step))?;
        }
        stale => {
            if stale.is_some() {
                delete_pod(client, &pod.namespace, &pod.name).await?;
            }
            api.create(&PostParams::default(), &wanted)
                .await
                .map_err(kube_error(&step))?;
        }
    }
    api.patch_status(
        &pod.name,
        &PatchParams::default(),
        &Patch::Merge(pod_status(pod)),
    )
    .await
    .map_err(kube_error(&step))?;
    Ok(format!("Pod {}", pod.key()))
}

/// Deletes a Pod object at once; a missing one is success.
pub async fn delete_pod(client: &Client, namespace: &str, name: &str) -> Result<(), LabError> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    match api.delete(name, &delete_now()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(kube_error(&format!("deleting Pod {namespace}/{name}"))(e)),
    }
}

/// Deletes Namespace `name`; a missing one is success. Without a namespace controller (a bare
/// API server) it stays `Terminating`, and a Namespace of that name cannot be created until
/// one finalizes it.
pub async fn delete_namespace(client: &Client, name: &str) -> Result<(), LabError> {
    let api: Api<Namespace> = Api::all(client.clone());
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(kube_error(&format!("deleting Namespace {name}"))(e)),
    }
}

/// [`delete_lab_nodes`] and the Pod objects `pods` (namespace, name) of the lab, pods first,
/// from synchronous code; returns the names deleted (`namespace/name` for pods).
pub fn delete_lab_objects_blocking(
    kubeconfig: &Path,
    lab: &str,
    pods: Vec<(String, String)>,
) -> Result<Vec<String>, LabError> {
    let (kubeconfig, lab) = (kubeconfig.to_path_buf(), lab.to_string());
    thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| LabError::Kube {
                step: "starting a runtime to delete the lab's objects".into(),
                source: Box::new(e),
            })?;
        runtime.block_on(async {
            let client = client(&kubeconfig).await?;
            let mut deleted = Vec::new();
            for (namespace, name) in pods {
                delete_pod(&client, &namespace, &name).await?;
                deleted.push(format!("Pod {namespace}/{name}"));
            }
            let nodes = delete_lab_nodes(&client, &lab).await?;
            deleted.extend(nodes.into_iter().map(|n| format!("Node {n}")));
            Ok(deleted)
        })
    })
    .join()
    .unwrap_or_else(|_| {
        Err(LabError::Kube {
            step: "deleting the lab's objects".into(),
            source: "the thread panicked".into(),
        })
    })
}

/// Creates or replaces (with `delete`, deletes) every object of `manifest` through the API
/// (`replace` carries the current `resourceVersion`, so a concurrent change is a conflict, not
/// lost); returns `Kind name` (`Kind namespace/name`) of each object touched. A missing object
/// on delete is success.
pub async fn apply_manifest(
    client: &Client,
    manifest: &wiremesh_core::manifest::Manifest,
    delete: bool,
) -> Result<Vec<String>, LabError> {
    let mut touched = Vec::new();
    for object in &manifest.objects {
        let (resource, kind_name) = match object.kind {
            Some(kind) => (
                wiremesh_datastore::kube::policy_resource(kind),
                kind.to_string(),
            ),
            None => (felix_configuration_resource(), "FelixConfiguration".into()),
        };
        let (namespace, name) = match object.key.split_once('/') {
            Some((ns, name)) => (Some(ns), name),
            None => (None, object.key.as_str()),
        };
        let api: Api<DynamicObject> = match namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        let step = format!("applying {kind_name} {}", object.key);
        if delete {
            match api.delete(name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(kube_error(&step)(e)),
            }
        } else {
            let mut wanted: DynamicObject =
                serde_json::from_value(object.value.clone()).map_err(|e| LabError::Kube {
                    step: step.clone(),
                    source: Box::new(e),
                })?;
            wanted.metadata.namespace = namespace.map(str::to_string);
            match api.get_opt(name).await.map_err(kube_error(&step))? {
                Some(current) => {
                    wanted.metadata.resource_version = current.metadata.resource_version;
                    api.replace(name, &PostParams::default(), &wanted)
                        .await
                        .map_err(kube_error(&step))?;
                }
                None => {
                    api.create(&PostParams::default(), &wanted)
                        .await
                        .map_err(kube_error(&step))?;
                }
            }
        }
        touched.push(format!("{kind_name} {}", object.key));
    }
    Ok(touched)
}

/// `host:port` of a server URL (`https://host[:port][/path]`).
fn server_address(server: &str) -> Option<(String, u16)> {
    let (default_port, rest) = if let Some(rest) = server.strip_prefix("https://") {
        (443, rest)
    } else if let Some(rest) = server.strip_prefix("http://") {
        (80, rest)
    } else {
        return None;
    };
    let authority = rest.split('/').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => default_port,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host.to_string(), port.parse().ok()?)),
        None => Some((authority.to_string(), default_port)),
    }
}

/// Writes the agents' kubeconfig to `dest`: the current context's cluster pointed at the relay.
/// Returns the real API server's `host:port`, for the relay.
pub fn agent_kubeconfig(original: &Path, dest: &Path) -> Result<String, LabError> {
    let invalid = |reason: String| LabError::InvalidArgument {
        what: format!("kubeconfig {}", original.display()),
        reason,
    };
    let mut config = Kubeconfig::read_from(original).map_err(|e| invalid(e.to_string()))?;
    let context_name = config
        .current_context
        .clone()
        .ok_or_else(|| invalid("no current-context".into()))?;
    let cluster_name = config
        .contexts
        .iter()
        .find(|c| c.name == context_name)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .ok_or_else(|| invalid(format!("context {context_name} not found")))?;
    let cluster = config
        .clusters
        .iter_mut()
        .find(|c| c.name == cluster_name)
        .and_then(|c| c.cluster.as_mut())
        .ok_or_else(|| invalid(format!("cluster {cluster_name} not found")))?;
    let server = cluster
        .server
        .clone()
        .ok_or_else(|| invalid(format!("cluster {cluster_name} has no server")))?;
    let (host, port) =
        server_address(&server).ok_or_else(|| invalid(format!("server {server:?}")))?;
    let scheme = if server.starts_with("http://") {
        "http"
    } else {
        "https"
    };
    cluster.server = Some(format!("{scheme}://{RELAY_LISTEN}"));
    if host.parse::<IpAddr>().is_err() && cluster.tls_server_name.is_none() {
        cluster.tls_server_name = Some(host.clone());
    }
    let yaml = serde_norway::to_string(&config).map_err(|e| invalid(e.to_string()))?;
    std::fs::write(dest, yaml).map_err(|source| LabError::Io {
        step: "writing the agent's kubeconfig".into(),
        path: dest.to_path_buf(),
        source,
    })?;
    let target = match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        _ => format!("{host}:{port}"),
    };
    Ok(target)
}

/// `wiremesh lab relay`: listens on `listen` inside the namespace `listen_netns` and connects
/// each connection to `connect` from this process's own namespace (the host's). Runs until
/// killed.
pub fn relay(listen: SocketAddr, listen_netns: &Path, connect: String) -> Result<(), LabError> {
    let handle = File::open(listen_netns).map_err(|source| LabError::Io {
        step: "opening the node's namespace".into(),
        path: listen_netns.to_path_buf(),
        source,
    })?;
    let ns_name = listen_netns.display().to_string();
    // Only this short-lived thread enters the node's namespace; the socket it binds stays there.
    let binder = thread::Builder::new()
        .name("relay-bind".into())
        .spawn(move || -> Result<TcpListener, LabError> {
            nix::sched::setns(&handle, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| {
                LabError::Netns {
                    step: "entering the node's namespace".into(),
                    ns: ns_name,
                    source,
                }
            })?;
            TcpListener::bind(listen).map_err(|source| LabError::Io {
                step: format!("relay listening on {listen}"),
                path: PathBuf::from(listen.to_string()),
                source,
            })
        })
        .map_err(|source| LabError::Spawn {
            step: "starting the relay".into(),
            object: listen.to_string(),
            source,
        })?;
    let listener = binder.join().map_err(|_| LabError::Kube {
        step: "relay".into(),
        source: "the binding thread panicked".into(),
    })??;
    info!(%listen, %connect, "relay listening");
    for inbound in listener.incoming() {
        let inbound = match inbound {
            Ok(stream) => stream,
            Err(e) => {
                debug!(error = %e, "relay accept failed");
                continue;
            }
        };
        match TcpStream::connect(&connect) {
            Ok(outbound) => pipe(inbound, outbound),
            Err(e) => {
                warn!(error = %e, %connect, "relay could not connect");
                let _ = inbound.shutdown(Shutdown::Both);
            }
        }
    }
    Ok(())
}

/// Copies both directions between two sockets, each on its own thread.
fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        move || {
            let mut buffer = [0u8; 16 * 1024];
            loop {
                match from.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buffer[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        }
    };
    let _ = thread::Builder::new().spawn(copy(a, b2));
    let _ = thread::Builder::new().spawn(copy(b, a2));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses_parse() {
        assert_eq!(
            server_address("https://127.0.0.1:38541"),
            Some(("127.0.0.1".into(), 38541))
        );
        assert_eq!(
            server_address("https://api.example:6443/prefix"),
            Some(("api.example".into(), 6443))
        );
        assert_eq!(
            server_address("https://[fd00::1]:6443"),
            Some(("fd00::1".into(), 6443))
        );
        assert_eq!(
            server_address("https://kubernetes.default.svc"),
            Some(("kubernetes.default.svc".into(), 443))
        );
        assert_eq!(server_address("ftp://x"), None);
    }

    #[test]
    fn agent_kubeconfig_points_at_the_relay_and_keeps_the_tls_name() {
        let dir = tempfile::tempdir().expect("tmp");
        let original = dir.path().join("config");
        std::fs::write(
            &original,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\ncontexts:\n- name: c\n  context:\n    cluster: k\n    user: u\nclusters:\n- name: k\n  cluster:\n    server: https://api.example:6443\n    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: abc\n",
        )
        .expect("write");
        let dest = dir.path().join("agent");
        let target = agent_kubeconfig(&original, &dest).expect("rewrite");
        assert_eq!(target, "api.example:6443");
        let written = Kubeconfig::read_from(&dest).expect("read back");
        let cluster = written.clusters[0].cluster.as_ref().expect("cluster");
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:16443"));
        assert_eq!(cluster.tls_server_name.as_deref(), Some("api.example"));
        assert!(
            written.auth_infos[0]
                .auth_info
                .as_ref()
                .and_then(|a| a.token.as_ref())
                .is_some(),
            "credentials are kept"
        );
    }

    #[test]
    fn a_lab_pod_is_published_bound_running_and_without_a_token() {
        let manifest = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "a", "labels": { "pod": "a" }, "resourceVersion": "7" },
            "spec": { "containers": [
                { "name": "c", "ports": [{ "containerPort": 80 }] },
                { "name": "d", "image": "nginx:1.27" },
            ] },
            "status": { "phase": "Pending" },
        });
        let pod = LabPod {
            namespace: "x".into(),
            name: "a".into(),
            node: 2,
            node_name: "node2".into(),
            netns: "wm-t-w1".into(),
            interface: "cali0123456789a".into(),
            slot: 10,
            ipv4: Some("10.244.2.10".parse().expect("ip")),
            ipv6: Some("fd00:10:244:2::a".parse().expect("ip")),
            labels: BTreeMap::from([("pod".to_string(), "a".to_string())]),
            service_account: "default".into(),
            ports: Vec::new(),
            endpoint_key: String::new(),
            server_pid: None,
        };
        let object = pod_object(&manifest, &pod);
        assert_eq!(object["metadata"]["namespace"], "x");
        assert!(object["metadata"].get("resourceVersion").is_none());
        assert!(
            object.get("status").is_none(),
            "status goes through the subresource"
        );
        assert_eq!(object["spec"]["nodeName"], "node2");
        assert_eq!(object["spec"]["automountServiceAccountToken"], false);
        assert_eq!(object["spec"]["containers"][0]["image"], PLACEHOLDER_IMAGE);
        assert_eq!(object["spec"]["containers"][1]["image"], "nginx:1.27");
        assert_eq!(
            pod_status(&pod),
            json!({ "status": { "phase": "Running", "podIP": "10.244.2.10",
                "podIPs": [{ "ip": "10.244.2.10" }, { "ip": "fd00:10:244:2::a" }] } })
        );
        let current = BTreeMap::from([
            ("gone".to_string(), "1".to_string()),
            ("pod".to_string(), "old".to_string()),
        ]);
        assert_eq!(
            labels_patch(&current, &pod.labels),
            json!({ "metadata": { "labels": { "gone": null, "pod": "a" } } })
        );
    }

    #[test]
    fn relay_forwards_both_ways() {
        let echo = TcpListener::bind("127.0.0.1:0").expect("bind");
        let echo_addr = echo.local_addr().expect("addr");
        thread::spawn(move || {
            if let Ok((mut s, _)) = echo.accept() {
                let mut buf = [0u8; 5];
                if s.read_exact(&mut buf).is_ok() {
                    let _ = s.write_all(&buf);
                }
            }
        });
        let free = TcpListener::bind("127.0.0.1:0").expect("bind");
        let listen = free.local_addr().expect("addr");
        drop(free);
        // Listening in our own namespace keeps the test free of namespaces of its own.
        let self_ns = Path::new("/proc/self/ns/net").to_path_buf();
        thread::spawn(move || relay(listen, &self_ns, echo_addr.to_string()));
        let mut client = None;
        for _ in 0..100 {
            if let Ok(c) = TcpStream::connect(listen) {
                client = Some(c);
                break;
            }
            thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut client = client.expect("relay listens");
        client.write_all(b"hello").expect("write");
        let mut back = [0u8; 5];
        client.read_exact(&mut back).expect("read");
        assert_eq!(&back, b"hello");
    }
}

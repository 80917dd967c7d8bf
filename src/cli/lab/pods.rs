//! Real pods in the lab (`lab apply -f` of `v1` Pods and Namespaces), wired and published the
//! way Calico's CNI plugin and kube-controllers do it on an etcd cluster:
//!
//! - each pod is a network namespace `wm-<lab>-w<n>` behind a veth whose node side is named as
//!   Calico's CNI names it (`cali` + 11 hex digits of SHA-1 of `<namespace>.<pod>`), with
//!   proxy ARP and a `/32` (`/128`) route on the node, gateway `169.254.1.1` (IPv6: the node
//!   side's link-local `fe80::ecee:eeff:feee:eeee`), and addresses `.10` upwards from its node's
//!   pod CIDRs;
//! - a small server (`wiremesh lab serve`) listens on its container ports: TCP accepts, UDP
//!   echoes;
//! - its WorkloadEndpoint, the `kns.<namespace>` profile (the Namespace's labels as `pcns.*`)
//!   and the `ksa.<namespace>.<account>` profile go to the lab's etcd;
//! - in a Kubernetes lab (`lab up --kubeconfig`) the Namespace, its `default` ServiceAccount and
//!   the Pod (bound to its lab node, status written as a kubelet would) go to the API server
//!   instead, and the agents derive the endpoint and profiles themselves.
//!
//! The lab's own `pod<i>` (one per node, on `veth-pod`) is separate and unchanged.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::sys::{self, ip, run};
use super::{Lab, LabError, NodeState, clear_netns, k8s};
use wiremesh_core::manifest::ManifestObject;
use wiremesh_core::model::Family;
use wiremesh_core::policy::workload::{
    self, DEFAULT_INTERFACE_PREFIX, endpoint_labels, endpoint_name, interface_name,
};
use wiremesh_core::wire::Kind;
use wiremesh_datastore::etcd::policy_key;

/// The address every pod routes through; the node side answers for it by proxy ARP.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Calico's fixed MAC of the node side, whose link-local address is the IPv6 gateway.
const HOST_MAC: &str = "ee:ee:ee:ee:ee:ee";
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);
/// Lab pods take host numbers from here on in their node's pod CIDRs (below: the gateway
/// and the node's own `pod<i>`).
const FIRST_SLOT: u16 = 10;
const LAST_SLOT: u16 = 254;
/// The label every Kubernetes API server puts on a Namespace.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// How long a pod's server may take to bind its ports.
const SERVER_READY_WITHIN: Duration = Duration::from_secs(5);

/// A container port's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PortProtocol {
    Tcp,
    Udp,
    Sctp,
}

impl PortProtocol {
    pub fn name(self) -> &'static str {
        match self {
            PortProtocol::Tcp => "TCP",
            PortProtocol::Udp => "UDP",
            PortProtocol::Sctp => "SCTP",
        }
    }

    pub fn parse(text: &str) -> Option<PortProtocol> {
        match text.to_ascii_uppercase().as_str() {
            "TCP" => Some(PortProtocol::Tcp),
            "UDP" => Some(PortProtocol::Udp),
            "SCTP" => Some(PortProtocol::Sctp),
            _ => None,
        }
    }
}

/// One container port of a lab pod.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodPort {
    pub port: u16,
    pub protocol: PortProtocol,
    /// Named ports become the WorkloadEndpoint's `ports`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// From an init container: published, not served.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub init: bool,
}

/// A pod the lab runs, as recorded in lab.json.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabPod {
    pub namespace: String,
    pub name: String,
    /// The index of the node it runs on.
    pub node: u32,
    pub node_name: String,
    pub netns: String,
    /// The node side of its veth (Calico's name).
    pub interface: String,
    /// Host number of its addresses in the node's pod CIDRs.
    pub slot: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Addr>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    #[serde(default)]
    pub ports: Vec<PodPort>,
    /// The etcd key of its WorkloadEndpoint.
    pub endpoint_key: String,
    #[serde(default)]
    pub server_pid: Option<i32>,
}

impl LabPod {
    /// `namespace/name`, as the lab's commands name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn address(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => self.ipv4.map(IpAddr::from),
            Family::V6 => self.ipv6.map(IpAddr::from),
        }
    }

    pub fn addresses(&self) -> Vec<IpAddr> {
        Family::ALL
            .into_iter()
            .filter_map(|f| self.address(f))
            .collect()
    }

    /// The ports its server listens on: container ports of `protocol`, deduplicated.
    pub fn served(&self, protocol: PortProtocol) -> Vec<u16> {
        let set: BTreeSet<u16> = self
            .ports
            .iter()
            .filter(|p| p.protocol == protocol && !p.init)
            .map(|p| p.port)
            .collect();
        set.into_iter().collect()
    }
}

/// A Pod manifest, checked: what the lab needs to run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRequest {
    pub namespace: String,
    pub name: String,
    /// `spec.nodeName`, already known to be a lab node's.
    pub node: Option<u32>,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub ports: Vec<PodPort>,
    /// The Pod as the manifest has it (a Kubernetes lab publishes it).
    pub object: Value,
}

impl PodRequest {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn invalid(object: &ManifestObject, reason: impl Into<String>) -> LabError {
    LabError::InvalidArgument {
        what: format!("{} {} ({})", kind_text(object), object.key, object.position),
        reason: reason.into(),
    }
}

fn kind_text(object: &ManifestObject) -> &'static str {
    object.kind.map_or("FelixConfiguration", Kind::kind_name)
}

/// A DNS-1123 label: what Kubernetes takes as a namespace name.
fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A DNS-1123 subdomain: what Kubernetes takes as a pod name.
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

/// Checks a `v1` Pod for the lab; `nodes` are the lab's nodes (index, name).
pub fn pod_request(
    object: &ManifestObject,
    nodes: &[(u32, String)],
) -> Result<PodRequest, LabError> {
    let pod: Pod =
        serde_json::from_value(object.value.clone()).map_err(|e| invalid(object, e.to_string()))?;
    let meta = &pod.metadata;
    let name = meta.name.clone().unwrap_or_default();
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    if !is_dns_subdomain(&name) {
        return Err(invalid(
            object,
            format!(
                "metadata.name {name:?} is not a DNS-1123 subdomain (lower-case letters, digits, '-', '.')"
            ),
        ));
    }
    if !is_dns_label(&namespace) {
        return Err(invalid(
            object,
            format!("metadata.namespace {namespace:?} is not a DNS-1123 label"),
        ));
    }
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.host_network == Some(true) {
        return Err(invalid(
            object,
            "spec.hostNetwork: the lab runs only pods with a network namespace of their own",
        ));
    }
    let node = match spec.node_name.as_deref().filter(|n| !n.is_empty()) {
        None => None,
        Some(wanted) => Some(
            nodes
                .iter()
                .find(|(_, n)| n == wanted)
                .map(|(i, _)| *i)
                .ok_or_else(|| {
                    let known: Vec<&str> = nodes.iter().map(|(_, n)| n.as_str()).collect();
                    invalid(
                        object,
                        format!(
                            "spec.nodeName {wanted:?} is not a node of this lab ({})",
                            known.join(", ")
                        ),
                    )
                })?,
        ),
    };
    let mut ports = Vec::new();
    let containers = spec
        .containers
        .iter()
        .map(|c| (c, false))
        .chain(spec.init_containers.iter().flatten().map(|c| (c, true)));
    for (container, init) in containers {
        for (i, p) in container.ports.iter().flatten().enumerate() {
            let field = format!("spec.containers[{}].ports[{i}]", container.name);
            let protocol = match p.protocol.as_deref() {
                None | Some("") => PortProtocol::Tcp,
                Some(text) => PortProtocol::parse(text)
                    .filter(|_| text == text.to_ascii_uppercase())
                    .ok_or_else(|| {
                        invalid(
                            object,
                            format!("{field}.protocol {text:?} is not TCP, UDP or SCTP"),
                        )
                    })?,
            };
            let port = u16::try_from(p.container_port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| {
                    invalid(
                        object,
                        format!(
                            "{field}.containerPort {} is not in 1-65535",
                            p.container_port
                        ),
                    )
                })?;
            let name = p.name.clone().filter(|n| !n.is_empty());
            if let Some(n) = &name
                && (n.len() > 15
                    || !n
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
            {
                return Err(invalid(
                    object,
                    format!(
                        "{field}.name {n:?} is not a port name (at most 15 lower-case letters, digits, '-')"
                    ),
                ));
            }
            let entry = PodPort {
                port,
                protocol,
                name,
                init,
            };
            if !ports.contains(&entry) {
                ports.push(entry);
            }
        }
    }
    Ok(PodRequest {
        namespace,
        name,
        node,
        labels: meta.labels.clone().unwrap_or_default(),
        service_account: spec
            .service_account_name
            .clone()
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.into()),
        ports,
        object: object.value.clone(),
    })
}

/// A `v1` Namespace: (name, labels as the API server keeps them, `kubernetes.io/metadata.name`
/// included).
pub fn namespace_request(
    object: &ManifestObject,
) -> Result<(String, BTreeMap<String, String>), LabError> {
    let ns: Namespace =
        serde_json::from_value(object.value.clone()).map_err(|e| invalid(object, e.to_string()))?;
    let name = ns.metadata.name.clone().unwrap_or_default();
    if !is_dns_label(&name) {
        return Err(invalid(
            object,
            format!("metadata.name {name:?} is not a DNS-1123 label"),
        ));
    }
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
    Ok((name, labels))
}

/// The labels of a namespace no manifest created (`default`, or one given only by a pod's
/// `metadata.namespace` when it already exists).
pub fn implicit_namespace_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), name.to_string())])
}

pub fn profile_key(name: &str) -> String {
    policy_key(Kind::Profile, name)
}

/// `kns.<namespace>` as kube-controllers writes it: allow all both ways, the namespace's
/// labels as `pcns.<key>` (plus `pcns.projectcalico.org/name`).
pub fn namespace_profile(name: &str, labels: &BTreeMap<String, String>) -> Value {
    let ns = Namespace {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    let profile = workload::namespace_profile(&ns);
    json!({
        "apiVersion": "projectcalico.org/v3",
        "kind": "Profile",
        "metadata": { "name": profile.name },
        "spec": {
            "ingress": [{ "action": "Allow" }],
            "egress": [{ "action": "Allow" }],
            "labelsToApply": profile.labels_to_apply,
        },
    })
}

pub fn service_account_profile_name(namespace: &str, account: &str) -> String {
    format!("ksa.{namespace}.{account}")
}

/// `ksa.<namespace>.<account>`: no rules, `pcsa.projectcalico.org/name` (the lab has no
/// ServiceAccount objects, so no other labels).
pub fn service_account_profile(namespace: &str, account: &str) -> Value {
    json!({
        "apiVersion": "projectcalico.org/v3",
        "kind": "Profile",
        "metadata": { "name": service_account_profile_name(namespace, account) },
        "spec": { "labelsToApply": { "pcsa.projectcalico.org/name": account } },
    })
}

/// The pod's WorkloadEndpoint as Calico's CNI plugin writes it.
pub fn workload_endpoint(pod: &LabPod) -> Value {
    let labels = endpoint_labels(
        &pod.labels,
        &pod.namespace,
        "k8s",
        Some(pod.service_account.as_str()),
    );
    let networks: Vec<String> = pod
        .addresses()
        .iter()
        .map(|a| format!("{a}/{}", Family::of_addr(a).host_prefix()))
        .collect();
    let ports: Vec<Value> = pod
        .ports
        .iter()
        .filter_map(|p| {
            let name = p.name.as_ref()?;
            Some(json!({ "name": name, "protocol": p.protocol.name(), "port": p.port }))
        })
        .collect();
    json!({
        "apiVersion": "projectcalico.org/v3",
        "kind": "WorkloadEndpoint",
        "metadata": {
            "name": endpoint_name(&pod.node_name, &pod.name, "eth0"),
            "namespace": pod.namespace,
            "labels": labels,
        },
        "spec": {
            "orchestrator": "k8s",
            "node": pod.node_name,
            "pod": pod.name,
            "endpoint": "eth0",
            "serviceAccountName": pod.service_account,
            "ipNetworks": networks,
            "profiles": [
                format!("kns.{}", pod.namespace),
                service_account_profile_name(&pod.namespace, &pod.service_account),
            ],
            "interfaceName": pod.interface,
            "ports": ports,
        },
    })
}

pub fn endpoint_key(namespace: &str, node: &str, pod: &str) -> String {
    policy_key(
        Kind::WorkloadEndpoint,
        &format!("{namespace}/{}", endpoint_name(node, pod, "eth0")),
    )
}

/// The node for a pod without `spec.nodeName`: the one with the fewest lab pods, the lowest
/// index on a tie.
pub fn place(nodes: &[u32], pods: &BTreeMap<String, LabPod>) -> Option<u32> {
    nodes
        .iter()
        .copied()
        .min_by_key(|i| (pods.values().filter(|p| p.node == *i).count(), *i))
}

/// The lowest free host number on `node`.
pub fn free_slot(node: u32, pods: &BTreeMap<String, LabPod>) -> Option<u16> {
    let used: BTreeSet<u16> = pods
        .values()
        .filter(|p| p.node == node)
        .map(|p| p.slot)
        .collect();
    (FIRST_SLOT..=LAST_SLOT).find(|s| !used.contains(s))
}

/// The lowest pod-namespace number no lab pod (and no leftover namespace) uses.
fn free_netns(lab: &str, pods: &BTreeMap<String, LabPod>) -> String {
    let used: BTreeSet<String> = pods.values().map(|p| p.netns.clone()).collect();
    (1u32..)
        .map(|n| super::workload_netns(lab, n))
        .find(|ns| !used.contains(ns) && !sys::netns_exists(ns))
        .unwrap_or_else(|| super::workload_netns(lab, u32::MAX))
}

fn sysctl(ns: &str, settings: &[String]) -> Result<(), LabError> {
    let mut args: Vec<String> = ["netns", "exec", ns, "sysctl", "-qw"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(settings.iter().cloned());
    run("setting sysctls", ns, "ip", &args)?;
    Ok(())
}

/// The pod's namespace, veth and routes, Calico-style.
fn wire(node: &NodeState, pod: &LabPod) -> Result<(), LabError> {
    let (host, ns, iface) = (&node.netns, &pod.netns, &pod.interface);
    ip("creating pod namespace", ns, &format!("netns add {ns}"))?;
    ip(
        "bringing up loopback",
        ns,
        &format!("-n {ns} link set lo up"),
    )?;
    ip(
        "creating pod veth",
        ns,
        &format!("link add {iface} netns {host} type veth peer name eth0 netns {ns}"),
    )?;
    ip(
        "setting the node side's MAC",
        iface,
        &format!("-n {host} link set {iface} address {HOST_MAC}"),
    )?;
    // Proxy ARP answers for the gateway at once (the default delay is up to 0.8 s); no DAD, so
    // the IPv6 gateway address is usable as soon as the link is up.
    sysctl(
        host,
        &[
            format!("net.ipv4.conf.{iface}.proxy_arp=1"),
            format!("net.ipv4.neigh.{iface}.proxy_delay=0"),
            format!("net.ipv4.conf.{iface}.rp_filter=0"),
            format!("net.ipv6.conf.{iface}.accept_dad=0"),
        ],
    )?;
    ip(
        "bringing up the pod veth",
        iface,
        &format!("-n {host} link set {iface} up"),
    )?;
    ip(
        "bringing up pod eth0",
        ns,
        &format!("-n {ns} link set eth0 up"),
    )?;
    if let Some(v4) = pod.ipv4 {
        // Proxy ARP answers only for addresses the node routes elsewhere.
        ip(
            "routing the pod gateway",
            host,
            &format!("-n {host} route replace {GATEWAY_V4}/32 dev eth0"),
        )?;
        ip(
            "routing to the pod",
            host,
            &format!("-n {host} route replace {v4}/32 dev {iface}"),
        )?;
        ip(
            "addressing the pod",
            ns,
            &format!("-n {ns} addr add {v4}/32 dev eth0"),
        )?;
        ip(
            "routing the pod",
            ns,
            &format!("-n {ns} route add {GATEWAY_V4} dev eth0 scope link"),
        )?;
        ip(
            "routing the pod",
            ns,
            &format!("-n {ns} route add default via {GATEWAY_V4} dev eth0"),
        )?;
    }
    if let Some(v6) = pod.ipv6 {
        ip(
            "routing to the pod",
            host,
            &format!("-n {host} -6 route replace {v6}/128 dev {iface}"),
        )?;
        ip(
            "addressing the pod",
            ns,
            &format!("-n {ns} -6 addr add {v6}/128 dev eth0 nodad"),
        )?;
        ip(
            "routing the pod",
            ns,
            &format!("-n {ns} -6 route add default via {GATEWAY_V6} dev eth0"),
        )?;
    }
    Ok(())
}

impl Lab {
    /// The lab's pods (`namespace/name`), in order.
    pub fn lab_pods(&self) -> impl Iterator<Item = &LabPod> {
        self.state.pods.values()
    }

    pub fn lab_pod(&self, key: &str) -> Option<&LabPod> {
        self.state.pods.get(key)
    }

    fn node_names(&self) -> Vec<(u32, String)> {
        self.state
            .nodes
            .values()
            .map(|n| (n.index, n.name.clone()))
            .collect()
    }

    /// Checks the Pods of a manifest against the lab; `namespaces` are those the same
    /// manifest creates.
    pub(super) fn check_pods(
        &self,
        pods: &[&ManifestObject],
        namespaces: &BTreeSet<String>,
    ) -> Result<Vec<PodRequest>, LabError> {
        let nodes = self.node_names();
        let mut out: Vec<PodRequest> = Vec::new();
        for object in pods {
            let request = pod_request(object, &nodes)?;
            let ns = &request.namespace;
            if ns != "default"
                && !namespaces.contains(ns)
                && !self.state.namespaces.contains_key(ns)
            {
                return Err(invalid(
                    object,
                    format!(
                        "namespace {ns:?} does not exist in the lab: apply a v1 Namespace {ns} first (or in the same file)"
                    ),
                ));
            }
            if let Some(existing) = self.state.pods.get(&request.key()) {
                let same_node = request.node.is_none_or(|n| n == existing.node);
                if !same_node
                    || request.ports != existing.ports
                    || request.service_account != existing.service_account
                {
                    return Err(invalid(
                        object,
                        "the pod exists with another node, ports or service account; only its labels can change (delete it first)",
                    ));
                }
            }
            if out.iter().any(|r| r.key() == request.key()) {
                return Err(invalid(object, "the pod is in the manifest twice"));
            }
            out.push(request);
        }
        Ok(out)
    }

    /// A client of a Kubernetes lab's API server; None for an etcd lab.
    pub(super) async fn kube_client(&self) -> Result<Option<kube::Client>, LabError> {
        match &self.state.kubeconfig {
            Some(kubeconfig) => Ok(Some(k8s::client(kubeconfig).await?)),
            None => Ok(None),
        }
    }

    /// Records a namespace and writes its `kns.` profile (a Kubernetes lab: the Namespace object
    /// and its `default` ServiceAccount); returns what was written.
    pub(super) async fn put_namespace(
        &mut self,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<String>, LabError> {
        if let Some(client) = self.kube_client().await? {
            let touched = k8s::publish_namespace(&client, name, &labels).await?;
            self.state.namespaces.insert(name.to_string(), labels);
            self.save()?;
            return Ok(touched);
        }
        let key = profile_key(&format!("kns.{name}"));
        let body = serde_json::to_vec(&namespace_profile(name, &labels)).unwrap_or_default();
        self.state.namespaces.insert(name.to_string(), labels);
        self.save()?;
        let k = key.clone();
        self.with_store(&format!("writing {key}"), move |mut w| async move {
            w.put_raw(&k, body).await
        })
        .await?;
        Ok(vec![key])
    }

    /// Deletes a namespace: its pods, its profiles, its record.
    pub(super) async fn delete_namespace(&mut self, name: &str) -> Result<Vec<String>, LabError> {
        let mut touched = Vec::new();
        let pods: Vec<String> = self
            .state
            .pods
            .values()
            .filter(|p| p.namespace == name)
            .map(LabPod::key)
            .collect();
        for pod in pods {
            touched.extend(self.delete_pod(&pod).await?);
        }
        if let Some(client) = self.kube_client().await? {
            k8s::delete_namespace(&client, name).await?;
            warn!(
                namespace = name,
                "Namespace deleted: without a namespace controller (a bare API server) it stays Terminating"
            );
            touched.push(format!(
                "Namespace {name} (deleted; it stays Terminating until a namespace controller finalizes it, which a bare API server has not)"
            ));
            self.state.namespaces.remove(name);
            self.save()?;
            return Ok(touched);
        }
        let key = profile_key(&format!("kns.{name}"));
        let k = key.clone();
        self.with_store(&format!("deleting {key}"), move |mut w| async move {
            w.delete_raw(&k).await
        })
        .await?;
        touched.push(key);
        self.state.namespaces.remove(name);
        self.save()?;
        Ok(touched)
    }

    /// Creates a pod (or, if it runs already, updates its labels); returns what was written.
    pub(super) async fn put_pod(&mut self, request: PodRequest) -> Result<Vec<String>, LabError> {
        if !self.state.namespaces.contains_key(&request.namespace) {
            // `default` exists in every cluster; record it with the label the API server gives it.
            let labels = implicit_namespace_labels(&request.namespace);
            let name = request.namespace.clone();
            self.put_namespace(&name, labels).await?;
        }
        let key = request.key();
        let manifest = request.object.clone();
        let pod = match self.state.pods.get(&key).cloned() {
            Some(mut existing) => {
                existing.labels = request.labels;
                self.state.pods.insert(key.clone(), existing.clone());
                self.save()?;
                existing
            }
            None => self.create_pod(request).await?,
        };
        let summary = format!(
            "pod {key} on {}: {} ({}, netns {})",
            pod.node_name,
            pod.addresses()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            pod.interface,
            pod.netns
        );
        if let Some(client) = self.kube_client().await? {
            // The agents derive the endpoint and profiles from the Pod and its Namespace.
            let published = k8s::publish_pod(&client, &manifest, &pod).await?;
            return Ok(vec![summary, published]);
        }
        let mut writes = vec![
            (
                profile_key(&service_account_profile_name(
                    &pod.namespace,
                    &pod.service_account,
                )),
                service_account_profile(&pod.namespace, &pod.service_account),
            ),
            (pod.endpoint_key.clone(), workload_endpoint(&pod)),
        ];
        let keys: Vec<String> = writes.iter().map(|(k, _)| k.clone()).collect();
        let items: Vec<(String, Vec<u8>)> = writes
            .drain(..)
            .map(|(k, v)| (k, serde_json::to_vec(&v).unwrap_or_default()))
            .collect();
        self.with_store(&format!("publishing pod {key}"), move |mut w| async move {
            for (k, body) in items {
                w.put_raw(&k, body).await?;
            }
            Ok(())
        })
        .await?;
        let mut out = vec![summary];
        out.extend(keys);
        Ok(out)
    }

    /// Places, wires and starts a new pod; on failure removes whatever of it was made.
    async fn create_pod(&mut self, request: PodRequest) -> Result<LabPod, LabError> {
        let indexes: Vec<u32> = self.state.nodes.keys().copied().collect();
        let node_index = match request.node {
            Some(n) => n,
            None => place(&indexes, &self.state.pods).ok_or_else(|| LabError::InvalidArgument {
                what: format!("pod {}", request.key()),
                reason: "the lab has no nodes".into(),
            })?,
        };
        let node = self.node(node_index)?.clone();
        let slot =
            free_slot(node_index, &self.state.pods).ok_or_else(|| LabError::InvalidArgument {
                what: format!("pod {}", request.key()),
                reason: format!("{} has no free pod address left", node.name),
            })?;
        let family = self.state.ip_family;
        let ipv4 = family.has(Family::V4).then(|| {
            let [a, b, c, _] = node.pod_cidr.network().octets();
            // Slots stop at 254, so this always fits an octet.
            Ipv4Addr::new(a, b, c, u8::try_from(slot).unwrap_or(u8::MAX))
        });
        let ipv6 = node
            .ipv6
            .as_ref()
            .filter(|_| family.has(Family::V6))
            .map(|v6| {
                let mut segments = v6.pod_cidr.network().segments();
                segments[7] = slot;
                Ipv6Addr::from(segments)
            });
        let pod = LabPod {
            interface: interface_name(DEFAULT_INTERFACE_PREFIX, &request.namespace, &request.name),
            netns: free_netns(&self.state.name, &self.state.pods),
            endpoint_key: endpoint_key(&request.namespace, &node.name, &request.name),
            namespace: request.namespace,
            name: request.name,
            node: node_index,
            node_name: node.name.clone(),
            slot,
            ipv4,
            ipv6,
            labels: request.labels,
            service_account: request.service_account,
            ports: request.ports,
            server_pid: None,
        };
        let key = pod.key();
        // Recorded first, so `lab down` finds it whatever happens next.
        self.state.pods.insert(key.clone(), pod.clone());
        self.save()?;
        let made = wire(&node, &pod).and_then(|()| self.start_server(&pod));
        match made {
            Ok(pid) => {
                let mut pod = pod;
                pod.server_pid = pid;
                self.state.pods.insert(key, pod.clone());
                self.save()?;
                info!(pod = %pod.key(), node = %pod.node_name, interface = %pod.interface, "pod created");
                Ok(pod)
            }
            Err(e) => {
                warn!(pod = %key, error = %e, "creating the pod failed; removing it");
                if let Err(clean) = clear_netns(std::slice::from_ref(&pod.netns)) {
                    warn!(pod = %key, error = %clean, "removing the failed pod");
                }
                self.state.pods.remove(&key);
                self.save()?;
                Err(e)
            }
        }
    }

    fn server_files(&self, pod: &LabPod) -> (PathBuf, PathBuf, PathBuf) {
        let base = format!("pod-{}", pod.netns);
        (
            self.state.dir.join("logs").join(format!("{base}.log")),
            self.state.dir.join("pids").join(format!("{base}.pid")),
            self.state.dir.join("pids").join(format!("{base}.ready")),
        )
    }

    /// Starts the pod's server (`wiremesh lab serve` in its namespace) and waits until it
    /// listens; None when the pod declares no TCP or UDP port.
    fn start_server(&self, pod: &LabPod) -> Result<Option<i32>, LabError> {
        let (tcp, udp) = (pod.served(PortProtocol::Tcp), pod.served(PortProtocol::Udp));
        if !pod.served(PortProtocol::Sctp).is_empty() {
            warn!(pod = %pod.key(), "SCTP ports are published but not served (the lab's server has no SCTP)");
        }
        if tcp.is_empty() && udp.is_empty() {
            return Ok(None);
        }
        let list = |ports: &[u16]| {
            ports
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let (log, pid_file, ready) = self.server_files(pod);
        let _ = fs::remove_file(&ready);
        let mut args = vec!["lab".to_string(), "serve".into()];
        if !tcp.is_empty() {
            args.extend(["--tcp".into(), list(&tcp)]);
        }
        if !udp.is_empty() {
            args.extend(["--udp".into(), list(&udp)]);
        }
        args.extend(["--ready-file".into(), ready.display().to_string()]);
        let pid = sys::spawn_daemon(&pod.netns, None, &self.state.binary, &args, &log, &pid_file)?;
        if !sys::wait_until(SERVER_READY_WITHIN, || {
            ready.exists() || !sys::is_alive(pid)
        }) || !ready.exists()
        {
            return Err(LabError::Timeout {
                step: "waiting for the pod's server to listen".into(),
                object: format!("{} (see {})", pod.key(), log.display()),
            });
        }
        Ok(Some(pid))
    }

    /// Removes a pod: its WorkloadEndpoint, its namespace (with its server and veth), its
    /// service account's profile when no other pod uses it. A pod the lab does not run is
    /// nothing to do.
    pub(super) async fn delete_pod(&mut self, key: &str) -> Result<Vec<String>, LabError> {
        let Some(pod) = self.state.pods.get(key).cloned() else {
            info!(pod = key, "no such pod in the lab");
            return Ok(Vec::new());
        };
        if let Some(client) = self.kube_client().await? {
            // The Pod object first, as a kubelet's teardown follows it: the agents drop its
            // chains.
            k8s::delete_pod(&client, &pod.namespace, &pod.name).await?;
            self.unplumb(&pod)?;
            return Ok(vec![format!("pod {key}"), format!("Pod {key}")]);
        }
        let account_used = self.state.pods.values().any(|p| {
            p.key() != pod.key()
                && p.namespace == pod.namespace
                && p.service_account == pod.service_account
        });
        let mut keys = vec![pod.endpoint_key.clone()];
        if !account_used {
            keys.push(profile_key(&service_account_profile_name(
                &pod.namespace,
                &pod.service_account,
            )));
        }
        let delete = keys.clone();
        // The endpoint first, as the CNI plugin's DEL: the agents drop its chains.
        self.with_store(&format!("deleting pod {key}"), move |mut w| async move {
            for k in delete {
                w.delete_raw(&k).await?;
            }
            Ok(())
        })
        .await?;
        self.unplumb(&pod)?;
        let mut out = vec![format!("pod {key}")];
        out.extend(keys);
        Ok(out)
    }

    /// Removes a pod's namespace (with its server and veth), its files and its record.
    fn unplumb(&mut self, pod: &LabPod) -> Result<(), LabError> {
        clear_netns(std::slice::from_ref(&pod.netns))?;
        let (log, pid_file, ready) = self.server_files(pod);
        for f in [log, pid_file, ready] {
            let _ = fs::remove_file(f);
        }
        self.state.pods.remove(&pod.key());
        self.save()?;
        info!(pod = %pod.key(), "pod deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wiremesh_core::manifest::Manifest;

    fn nodes() -> Vec<(u32, String)> {
        (1..=3).map(|i| (i, format!("node{i}"))).collect()
    }

    fn request(yaml: &str) -> Result<PodRequest, LabError> {
        let m = Manifest::parse("p.yaml", yaml);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        pod_request(&m.objects[0], &nodes())
    }

    const POD: &str = "
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec:
  containers:
    - name: c
      ports:
        - {containerPort: 80, name: serve-80-tcp}
        - {containerPort: 80, protocol: UDP, name: serve-80-udp}
        - {containerPort: 81}
";

    fn lab_pod(r: &PodRequest, node: u32, slot: u16) -> LabPod {
        LabPod {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            node,
            node_name: format!("node{node}"),
            netns: "wm-t-w1".into(),
            interface: interface_name("cali", &r.namespace, &r.name),
            slot,
            ipv4: Some(Ipv4Addr::new(10, 244, node as u8, slot as u8)),
            ipv6: Some(Ipv6Addr::new(
                0xfd00,
                0x10,
                0x244,
                node as u16,
                0,
                0,
                0,
                slot,
            )),
            labels: r.labels.clone(),
            service_account: r.service_account.clone(),
            ports: r.ports.clone(),
            endpoint_key: endpoint_key(&r.namespace, &format!("node{node}"), &r.name),
            server_pid: None,
        }
    }

    #[test]
    fn a_pod_manifest_becomes_a_request() {
        let r = request(POD).expect("valid");
        assert_eq!(r.key(), "x/a");
        assert_eq!(r.node, None);
        assert_eq!(r.service_account, "default");
        assert_eq!(r.ports.len(), 3);
        let lab_pod = lab_pod(&r, 1, 10);
        assert_eq!(lab_pod.served(PortProtocol::Tcp), [80, 81]);
        assert_eq!(lab_pod.served(PortProtocol::Udp), [80]);
    }

    #[test]
    fn bad_pods_are_refused_with_the_field() {
        let with_spec = |spec: &str| {
            request(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: a, namespace: x}}\nspec:\n{spec}"
            ))
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        let err = with_spec("  nodeName: node9\n  containers: []\n").expect_err("node9");
        assert!(
            err.contains("spec.nodeName \"node9\" is not a node of this lab (node1, node2, node3)"),
            "{err}"
        );
        let err = with_spec("  hostNetwork: true\n  containers: []\n").expect_err("host");
        assert!(err.contains("spec.hostNetwork"), "{err}");
        let err = with_spec("  containers: [{name: c, ports: [{containerPort: 70000}]}]\n")
            .expect_err("port");
        assert!(
            err.contains("containerPort 70000 is not in 1-65535"),
            "{err}"
        );
        let err =
            with_spec("  containers: [{name: c, ports: [{containerPort: 80, protocol: ICMP}]}]\n")
                .expect_err("protocol");
        assert!(err.contains("\"ICMP\" is not TCP, UDP or SCTP"), "{err}");
        assert!(with_spec("  nodeName: node2\n  containers: []\n").is_ok());
        let err =
            request("apiVersion: v1\nkind: Pod\nmetadata: {name: A_b}\nspec: {containers: []}\n")
                .expect_err("name");
        assert!(err.to_string().contains("DNS-1123"), "{err}");
    }

    #[test]
    fn placement_takes_the_emptiest_node_then_the_lowest_index() {
        let r = request(POD).expect("valid");
        let mut pods = BTreeMap::new();
        assert_eq!(place(&[1, 2, 3], &pods), Some(1));
        pods.insert("x/a".into(), lab_pod(&r, 1, 10));
        assert_eq!(place(&[1, 2, 3], &pods), Some(2));
        pods.insert("x/b".into(), lab_pod(&r, 2, 10));
        pods.insert("x/c".into(), lab_pod(&r, 3, 10));
        assert_eq!(place(&[1, 2, 3], &pods), Some(1));
        assert_eq!(free_slot(1, &pods), Some(11));
        assert_eq!(free_slot(2, &BTreeMap::new()), Some(FIRST_SLOT));
        assert_eq!(place(&[], &pods), None);
    }

    /// What the lab publishes decodes, as the agent reads it, into the endpoint Calico's
    /// Kubernetes conversion would give for the same pod.
    #[test]
    fn published_objects_are_what_the_agent_reads() {
        let r = request(POD).expect("valid");
        let pod = lab_pod(&r, 2, 10);
        let mut labels = BTreeMap::from([("ns".to_string(), "x".to_string())]);
        labels.insert(NAMESPACE_NAME_LABEL.into(), "x".into());
        let text = [
            workload_endpoint(&pod),
            namespace_profile("x", &labels),
            service_account_profile("x", "default"),
        ]
        .iter()
        .map(|v| serde_json::to_string(v).expect("json"))
        .collect::<Vec<_>>()
        .join("\n---\n");
        let (res, problems) = Manifest::parse("lab.yaml", &text).validate();
        assert!(problems.is_empty(), "{problems:?}");
        let [wep] = res.workload_endpoints.as_slice() else {
            panic!("one endpoint: {:?}", res.workload_endpoints);
        };
        assert_eq!(wep.node, "node2");
        assert_eq!(wep.interface_name, interface_name("cali", "x", "a"));
        assert!(!wep.interface_computed);
        assert_eq!(
            wep.ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["10.244.2.10/32", "fd00:10:244:2::a/128"]
        );
        assert_eq!(wep.profiles, ["kns.x", "ksa.x.default"]);
        assert_eq!(wep.labels.get("pod").map(String::as_str), Some("a"));
        assert_eq!(
            wep.labels
                .get("projectcalico.org/serviceaccount")
                .map(String::as_str),
            Some("default")
        );
        assert_eq!(wep.ports.len(), 2, "named ports only: {:?}", wep.ports);
        let kns = &res.profiles["kns.x"];
        assert!(kns.allow_ingress && kns.allow_egress);
        for (k, v) in [
            ("pcns.ns", "x"),
            ("pcns.projectcalico.org/name", "x"),
            ("pcns.kubernetes.io/metadata.name", "x"),
        ] {
            assert_eq!(
                kns.labels_to_apply.get(k).map(String::as_str),
                Some(v),
                "{k}"
            );
        }
        let ksa = &res.profiles["ksa.x.default"];
        assert!(!ksa.allow_ingress && !ksa.allow_egress);
        assert_eq!(
            ksa.labels_to_apply
                .get("pcsa.projectcalico.org/name")
                .map(String::as_str),
            Some("default")
        );
        assert_eq!(
            pod.endpoint_key,
            "/calico/resources/v3/projectcalico.org/workloadendpoints/x/node2-k8s-a-eth0"
        );
    }
}

//! Pods as Calico's workload endpoints, and the profiles Calico derives for Kubernetes
//! namespaces and service accounts (`libcalico-go` `k8s/conversion`): what pod policy selects,
//! and with which labels.
//!
//! - A pod is an endpoint when it runs on a node, is not host-networked and has an IP: finished
//!   pods (`Succeeded`, `Failed`) have none, so they are not endpoints either.
//! - Its labels are its own (minus any `pcns.`/`pcsa.` label: a pod cannot pose as another
//!   namespace) plus `projectcalico.org/namespace`, `projectcalico.org/orchestrator: k8s` and
//!   `projectcalico.org/serviceaccount`, which win over pod labels of the same name.
//! - Its profiles are `kns.<namespace>` (allows everything, so a pod no policy selects is open,
//!   and applies the namespace's labels as `pcns.<key>`) and `ksa.<namespace>.<account>` (no
//!   rules; the account's labels as `pcsa.<key>`).
//! - Its host-side interface is the name Calico's CNI gives it: a prefix (`cali`) and the first
//!   11 hex digits of SHA-1 of `<namespace>.<pod>`.
//! - Its named ports are the named container ports of `containers` and `initContainers` (TCP
//!   when unset, UDP or SCTP; other protocols are skipped).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, ServiceAccount};
use serde::Serialize;
use sha1::{Digest as _, Sha1};

use super::model::{EndpointPort, Policy, PolicyKind, Protocol};
use crate::selector::{Expr, Scope, Selector};

/// Calico's default interface prefix (Felix `interfacePrefix`).
pub const DEFAULT_INTERFACE_PREFIX: &str = "cali";
pub const LABEL_NAMESPACE: &str = "projectcalico.org/namespace";
pub const LABEL_ORCHESTRATOR: &str = "projectcalico.org/orchestrator";
pub const LABEL_SERVICE_ACCOUNT: &str = "projectcalico.org/serviceaccount";
/// Prefix of namespace labels as profiles apply them (`pcns.team`).
pub const NAMESPACE_LABEL_PREFIX: &str = "pcns.";
/// Prefix of service-account labels as profiles apply them (`pcsa.role`).
pub const SERVICE_ACCOUNT_LABEL_PREFIX: &str = "pcsa.";
/// The name label every namespace profile applies (`pcns.projectcalico.org/name`).
const PROFILE_NAME_LABEL: &str = "projectcalico.org/name";
/// Where other CNIs record pod IPs before (or instead of) `status.podIPs`.
pub const IP_ANNOTATIONS: [&str; 3] = [
    "cni.projectcalico.org/podIPs",
    "cni.projectcalico.org/podIP",
    "vpc.amazonaws.com/pod-ips",
];

/// A pod as policy sees it (Calico's WorkloadEndpoint).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkloadEndpoint {
    pub namespace: String,
    pub pod: String,
    pub node: String,
    /// The host side of the pod's interface.
    pub interface_name: String,
    /// The name was computed (a Pod, or a stored endpoint without one), not written by a CNI:
    /// the agent computes it again with the first configured `interfacePrefix`.
    pub interface_computed: bool,
    /// The pod's addresses, as /32 and /128 networks.
    pub ips: Vec<IpNet>,
    /// Own labels plus Calico's implicit ones (profiles' labels are applied on top, see
    /// [`effective_labels`]).
    pub labels: BTreeMap<String, String>,
    /// `kns.<namespace>`, then `ksa.<namespace>.<account>`.
    pub profiles: Vec<String>,
    pub ports: Vec<EndpointPort>,
    pub service_account: Option<String>,
}

/// A Calico profile: rules applied after every tier to the endpoints that name it, and labels
/// it gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Profile {
    pub name: String,
    pub labels_to_apply: BTreeMap<String, String>,
    /// Allow all in that direction (`kns.*`); otherwise no rules (`ksa.*`).
    pub allow_ingress: bool,
    pub allow_egress: bool,
}

/// Something about a pod that was left out (a malformed IP, an unknown port protocol).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Pod {namespace}/{pod}: {field}: {reason}")]
pub struct PodProblem {
    pub namespace: String,
    pub pod: String,
    pub field: String,
    pub reason: String,
}

/// The host-side interface name Calico's CNI gives the pod.
pub fn interface_name(prefix: &str, namespace: &str, pod: &str) -> String {
    let digest = Sha1::digest(format!("{namespace}.{pod}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{}", &hex[..11])
}

/// Calico's WorkloadEndpoint name: `<node>-k8s-<pod>-<endpoint>`, each `-` inside a part
/// doubled so the parts can be told apart.
pub fn endpoint_name(node: &str, pod: &str, endpoint: &str) -> String {
    [node, "k8s", pod, endpoint]
        .iter()
        .map(|part| part.replace('-', "--"))
        .collect::<Vec<_>>()
        .join("-")
}

/// The endpoint for `pod`, or None when the pod is not one (host network, not scheduled,
/// finished, no IP yet), with whatever of it was left out.
pub fn from_pod(pod: &Pod, prefix: &str) -> (Option<WorkloadEndpoint>, Vec<PodProblem>) {
    let meta = &pod.metadata;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let name = meta.name.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let status = pod.status.clone().unwrap_or_default();
    let mut problems = Vec::new();
    let mut problem = |field: &str, reason: String| {
        problems.push(PodProblem {
            namespace: namespace.clone(),
            pod: name.clone(),
            field: field.to_string(),
            reason,
        })
    };
    let node = spec.node_name.clone().unwrap_or_default();
    if spec.host_network == Some(true) || node.is_empty() || name.is_empty() {
        return (None, problems);
    }
    if matches!(
        status.phase.as_deref(),
        Some("Succeeded" | "Failed" | "Completed")
    ) {
        return (None, problems);
    }

    let annotations = meta.annotations.clone().unwrap_or_default();
    let texts: Vec<(String, String)> = match status.pod_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips
            .iter()
            .map(|p| ("status.podIPs".to_string(), p.ip.clone()))
            .collect(),
        _ => match &status.pod_ip {
            Some(ip) if !ip.is_empty() => vec![("status.podIP".into(), ip.clone())],
            _ => IP_ANNOTATIONS
                .iter()
                .find_map(|key| {
                    let value = annotations.get(*key).filter(|v| !v.trim().is_empty())?;
                    Some(
                        value
                            .split(',')
                            .map(|ip| (format!("metadata.annotations[{key}]"), ip.to_string()))
                            .collect(),
                    )
                })
                .unwrap_or_default(),
        },
    };
    // A terminating pod whose CNI emptied its IP annotation has given its IP back.
    let released = meta.deletion_timestamp.is_some()
        && IP_ANNOTATIONS[..2]
            .iter()
            .any(|key| annotations.get(*key).is_some_and(|v| v.trim().is_empty()));
    let mut ips = Vec::new();
    for (field, text) in texts.iter().filter(|_| !released) {
        match parse_ip(text) {
            Ok(net) if !ips.contains(&net) => ips.push(net),
            Ok(_) => {}
            Err(reason) => problem(field, reason),
        }
    }
    if ips.is_empty() {
        return (None, problems);
    }

    let account = spec.service_account_name.clone().filter(|a| !a.is_empty());
    let labels = endpoint_labels(
        &meta.labels.clone().unwrap_or_default(),
        &namespace,
        "k8s",
        account.as_deref(),
    );
    let mut profiles = vec![format!("kns.{namespace}")];
    if let Some(account) = &account {
        profiles.push(format!("ksa.{namespace}.{account}"));
    }

    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    let ports = named_ports(containers, &mut problem);
    let endpoint = WorkloadEndpoint {
        interface_name: interface_name(prefix, &namespace, &name),
        interface_computed: true,
        namespace,
        pod: name,
        node,
        ips,
        labels,
        profiles,
        ports,
        service_account: account,
    };
    (Some(endpoint), problems)
}

/// An endpoint's labels: its own, less any `pcns.`/`pcsa.` label (a pod cannot pose as
/// another namespace), plus the implicit namespace, orchestrator and service-account labels,
/// which win.
pub fn endpoint_labels(
    own: &BTreeMap<String, String>,
    namespace: &str,
    orchestrator: &str,
    account: Option<&str>,
) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = own
        .iter()
        .filter(|(k, _)| {
            !k.starts_with(NAMESPACE_LABEL_PREFIX) && !k.starts_with(SERVICE_ACCOUNT_LABEL_PREFIX)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(LABEL_NAMESPACE.into(), namespace.to_string());
    labels.insert(LABEL_ORCHESTRATOR.into(), orchestrator.to_string());
    if let Some(account) = account {
        labels.insert(LABEL_SERVICE_ACCOUNT.into(), account.to_string());
    }
    labels
}

fn parse_ip(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    // Calico's annotations carry CIDRs (`10.0.0.5/32`); status fields plain addresses.
    let addr = match text.parse::<IpNet>() {
        Ok(net) => net.addr(),
        Err(_) => text
            .parse::<IpAddr>()
            .map_err(|e| format!("{text:?} is not an IP address: {e}"))?,
    };
    Ok(IpNet::from(addr))
}

fn named_ports<'a>(
    containers: impl Iterator<Item = &'a Container>,
    problem: &mut impl FnMut(&str, String),
) -> Vec<EndpointPort> {
    let mut out = Vec::new();
    for (c, p) in containers.flat_map(|c| c.ports.iter().flatten().map(move |p| (c, p))) {
        let Some(name) = p.name.clone().filter(|n| !n.is_empty()) else {
            continue;
        };
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" | "" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            other => {
                problem(
                    &format!("spec.containers[{}].ports[{name}].protocol", c.name),
                    format!("{other:?} is not TCP, UDP or SCTP; the port is left out"),
                );
                continue;
            }
        };
        let Some(port) = u16::try_from(p.container_port).ok().filter(|p| *p > 0) else {
            problem(
                &format!("spec.containers[{}].ports[{name}].containerPort", c.name),
                format!(
                    "{} is not in 1-65535; the port is left out",
                    p.container_port
                ),
            );
            continue;
        };
        let port = EndpointPort {
            name,
            protocol,
            port,
        };
        if !out.contains(&port) {
            out.push(port);
        }
    }
    out
}

/// The profile Calico derives for a namespace: allow all, and the namespace's labels as
/// `pcns.<key>` (plus `pcns.projectcalico.org/name`).
pub fn namespace_profile(ns: &Namespace) -> Profile {
    let name = ns.metadata.name.clone().unwrap_or_default();
    Profile {
        name: format!("kns.{name}"),
        labels_to_apply: prefixed_labels(&ns.metadata, NAMESPACE_LABEL_PREFIX, &name),
        allow_ingress: true,
        allow_egress: true,
    }
}

/// The profile Calico derives for a service account: no rules, the account's labels as
/// `pcsa.<key>` (plus `pcsa.projectcalico.org/name`).
pub fn service_account_profile(sa: &ServiceAccount) -> Profile {
    let name = sa.metadata.name.clone().unwrap_or_default();
    let namespace = sa
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    Profile {
        name: format!("ksa.{namespace}.{name}"),
        labels_to_apply: prefixed_labels(&sa.metadata, SERVICE_ACCOUNT_LABEL_PREFIX, &name),
        allow_ingress: false,
        allow_egress: false,
    }
}

/// An object's labels with `prefix` on each key, and `<prefix>projectcalico.org/name: name`.
fn prefixed_labels(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    prefix: &str,
    name: &str,
) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = meta
        .labels
        .iter()
        .flatten()
        .map(|(k, v)| (format!("{prefix}{k}"), v.clone()))
        .collect();
    labels.insert(format!("{prefix}{PROFILE_NAME_LABEL}"), name.to_string());
    labels
}

/// The labels selectors see on `endpoint`: its own, then each profile's (in the endpoint's
/// order) where the name is not taken yet.
pub fn effective_labels(
    endpoint: &WorkloadEndpoint,
    profiles: &BTreeMap<String, Profile>,
) -> BTreeMap<String, String> {
    let mut labels = endpoint.labels.clone();
    for profile in endpoint.profiles.iter().filter_map(|p| profiles.get(p)) {
        for (k, v) in &profile.labels_to_apply {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    labels
}

/// Whether `policy` applies to `endpoint`, whose labels (with its profiles') are `labels`, as
/// Felix decides it: a NetworkPolicy to the endpoints of its namespace its selector matches; a
/// GlobalNetworkPolicy to those its selector matches whose namespace labels match its
/// `namespaceSelector` and whose account labels match its `serviceAccountSelector`
/// (evaluated as `pcns.`/`pcsa.` labels, `all()` meaning any namespace).
pub fn selects(
    policy: &Policy,
    endpoint: &WorkloadEndpoint,
    labels: &BTreeMap<String, String>,
) -> bool {
    let matches = |s: &Selector| s.matches_in(labels, Scope::Namespaced);
    match policy.kind {
        PolicyKind::Namespaced => {
            policy.namespace.as_deref() == Some(endpoint.namespace.as_str())
                && matches(&policy.selector)
        }
        PolicyKind::Global => {
            let any = Expr::Has(LABEL_NAMESPACE.to_string());
            let scoped = |s: &Option<Selector>, prefix: &str| {
                s.as_ref()
                    .is_none_or(|s| matches(&s.clone().with_label_prefix(prefix).replace_all(&any)))
            };
            matches(&policy.selector)
                && scoped(&policy.namespace_selector, NAMESPACE_LABEL_PREFIX)
                && scoped(
                    &policy.service_account_selector,
                    SERVICE_ACCOUNT_LABEL_PREFIX,
                )
        }
    }
}

//! Calico's WorkloadEndpoint and Profile (`projectcalico.org/v3`), as the etcd datastore holds
//! them: the Calico CNI plugin writes a WorkloadEndpoint per pod, calico-kube-controllers the
//! `kns.`/`ksa.` profiles (keys `/calico/resources/v3/projectcalico.org/workloadendpoints/<ns>/
//! <name>` and `.../profiles/<name>`). On Kubernetes both are derived from Pods, Namespaces and
//! ServiceAccounts instead (`policy::workload`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{NumOrString, Rule};

/// A workload endpoint's port (`name` may be empty: only named ones are named ports).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEndpointPort {
    #[serde(default)]
    pub name: String,
    /// TCP, UDP or SCTP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<NumOrString>,
    pub port: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_port: Option<i32>,
    #[serde(rename = "hostIP", skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
}

/// An IP mapping of a workload (`ipNATs[]`): accepted, not used by policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IpNat {
    #[serde(rename = "internalIP", default)]
    pub internal_ip: String,
    #[serde(rename = "externalIP", default)]
    pub external_ip: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEndpointSpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub orchestrator: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workload: String,
    pub node: String,
    #[serde(
        rename = "containerID",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub container_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account_name: String,
    /// The pod's addresses (`10.244.1.5/32`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_networks: Vec<String>,
    #[serde(rename = "ipNATs", default, skip_serializing_if = "Vec::is_empty")]
    pub ip_nats: Vec<IpNat>,
    #[serde(
        rename = "ipv4Gateway",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub ipv4_gateway: String,
    #[serde(
        rename = "ipv6Gateway",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub ipv6_gateway: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<String>,
    /// The host-side interface.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub interface_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<WorkloadEndpointPort>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_spoofed_source_prefixes: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProfileSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Rule>,
    /// Labels the profile gives every endpoint that names it.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels_to_apply: std::collections::BTreeMap<String, String>,
}

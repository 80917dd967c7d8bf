//! HostEndpoint, GlobalNetworkSet and NetworkSet (namespaced).

use kube_derive::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::NumOrString;

/// `"*"` or a Linux interface name.
const HOST_INTERFACE_PATTERN: &str = r"^(\*|[a-zA-Z0-9_.-]{1,15})$";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPort {
    pub name: String,
    /// TCP, UDP or SCTP.
    pub protocol: NumOrString,
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    crates(kube_core = "::kube_core"),
    group = "projectcalico.org",
    version = "v3",
    kind = "HostEndpoint",
    plural = "hostendpoints",
    doc = "A host interface (or all of them) that host policy applies to",
    printcolumn = r#"{"name": "Node", "type": "string", "jsonPath": ".spec.node"}"#,
    printcolumn = r#"{"name": "Interface", "type": "string", "jsonPath": ".spec.interfaceName"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct HostEndpointSpec {
    /// The node this endpoint belongs to.
    pub node: String,
    /// `"*"` for all of the node's interfaces, or one interface name.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = HOST_INTERFACE_PATTERN))]
    pub interface_name: Option<String>,
    /// Addresses other endpoints' selectors see for this endpoint.
    #[serde(rename = "expectedIPs", default, skip_serializing_if = "Vec::is_empty")]
    pub expected_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<EndpointPort>,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    crates(kube_core = "::kube_core"),
    group = "projectcalico.org",
    version = "v3",
    kind = "GlobalNetworkSet",
    plural = "globalnetworksets",
    doc = "Named CIDRs that rules select by label"
)]
#[serde(rename_all = "camelCase")]
pub struct GlobalNetworkSetSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<String>,
    /// Domain names for egress rules (Calico Enterprise; accepted, not enforced).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_egress_domains: Vec<String>,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    crates(kube_core = "::kube_core"),
    group = "projectcalico.org",
    version = "v3",
    kind = "NetworkSet",
    plural = "networksets",
    namespaced,
    doc = "Named CIDRs of one namespace that rules select by label"
)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSetSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<String>,
    /// Domain names for egress rules (Calico Enterprise; accepted, not enforced).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_egress_domains: Vec<String>,
}

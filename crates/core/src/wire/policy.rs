//! GlobalNetworkPolicy, NetworkPolicy (namespaced) and Tier.

use kube_derive::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{PolicyType, Rule};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    crates(kube_core = "::kube_core"),
    group = "projectcalico.org",
    version = "v3",
    kind = "GlobalNetworkPolicy",
    plural = "globalnetworkpolicies",
    doc = "A policy for endpoints in every namespace and host endpoints",
    printcolumn = r#"{"name": "Tier", "type": "string", "jsonPath": ".spec.tier"}"#,
    printcolumn = r#"{"name": "Order", "type": "number", "jsonPath": ".spec.order"}"#,
    printcolumn = r#"{"name": "Selector", "type": "string", "jsonPath": ".spec.selector", "priority": 1}"#
)]
#[serde(rename_all = "camelCase")]
pub struct GlobalNetworkPolicySpec {
    /// Default `default`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// Lower is earlier; unset sorts last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order: Option<f64>,
    /// Which endpoints the policy applies to; empty means all().
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2))]
    pub types: Vec<PolicyType>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub ingress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub egress: Vec<Rule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account_selector: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub do_not_track: Option<bool>,
    #[serde(rename = "preDNAT", skip_serializing_if = "Option::is_none")]
    pub pre_dnat: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apply_on_forward: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub performance_hints: Vec<String>,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    crates(kube_core = "::kube_core"),
    group = "projectcalico.org",
    version = "v3",
    kind = "NetworkPolicy",
    plural = "networkpolicies",
    namespaced,
    doc = "A policy for the endpoints of one namespace",
    printcolumn = r#"{"name": "Tier", "type": "string", "jsonPath": ".spec.tier"}"#,
    printcolumn = r#"{"name": "Order", "type": "number", "jsonPath": ".spec.order"}"#,
    printcolumn = r#"{"name": "Selector", "type": "string", "jsonPath": ".spec.selector", "priority": 1}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2))]
    pub types: Vec<PolicyType>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub ingress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub egress: Vec<Rule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub performance_hints: Vec<String>,
}

impl From<NetworkPolicySpec> for GlobalNetworkPolicySpec {
    /// A NetworkPolicy's fields are a subset of a GlobalNetworkPolicy's, so it is validated as
    /// the GlobalNetworkPolicy it would be (its namespace comes from its metadata).
    fn from(np: NetworkPolicySpec) -> Self {
        GlobalNetworkPolicySpec {
            tier: np.tier,
            order: np.order,
            selector: np.selector,
            types: np.types,
            ingress: np.ingress,
            egress: np.egress,
            service_account_selector: np.service_account_selector,
            performance_hints: np.performance_hints,
            ..GlobalNetworkPolicySpec::default()
        }
    }
}

/// What a tier does with traffic no policy in it decided.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TierDefaultAction {
    Deny,
    Pass,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    crates(kube_core = "::kube_core"),
    group = "projectcalico.org",
    version = "v3",
    kind = "Tier",
    plural = "tiers",
    doc = "An ordered group of policies",
    printcolumn = r#"{"name": "Order", "type": "number", "jsonPath": ".spec.order"}"#,
    printcolumn = r#"{"name": "DefaultAction", "type": "string", "jsonPath": ".spec.defaultAction"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TierSpec {
    /// Lower is earlier; unset sorts last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order: Option<f64>,
    /// Default `Deny`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_action: Option<TierDefaultAction>,
}

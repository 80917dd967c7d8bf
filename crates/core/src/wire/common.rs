//! Types shared by the policy resources.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Calico's `numorstring` values (protocols, ports): a number or a string, kept as written.
/// In the schema: `x-kubernetes-int-or-string`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum NumOrString {
    Num(i64),
    Str(String),
}

impl std::fmt::Display for NumOrString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NumOrString::Num(n) => write!(f, "{n}"),
            NumOrString::Str(s) => write!(f, "{s:?}"),
        }
    }
}

impl JsonSchema for NumOrString {
    fn schema_name() -> Cow<'static, str> {
        "NumOrString".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // The structural-schema rewriter drops the types of an `anyOf` anyway; the marker alone
        // tells the API server "integer or string".
        json_schema!({ "x-kubernetes-int-or-string": true })
    }
}

/// Free-form object (kept as written; `x-kubernetes-preserve-unknown-fields`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(transparent)]
pub struct Opaque(pub serde_json::Map<String, serde_json::Value>);

impl JsonSchema for Opaque {
    fn schema_name() -> Cow<'static, str> {
        "Opaque".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true
        })
    }
}

// Also the domain's action type: there is nothing in it to validate.
/// What a rule does with a matching packet: Allow, Deny, Log (and go on) or Pass (to the next
/// tier).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Action {
    Allow,
    Deny,
    Log,
    Pass,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum PolicyType {
    Ingress,
    Egress,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IcmpFields {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 254))]
    pub type_: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 255))]
    pub code: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Selector over service-account labels (kept as text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A rule's `source` or `destination`. Selectors are kept as text (parsed by `selector`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntityRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub nets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub not_nets: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_selector: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub ports: Vec<NumOrString>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub not_ports: Vec<NumOrString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_accounts: Option<ServiceAccountMatch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub services: Option<ServiceMatch>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleMetadata {
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// One policy rule (Calico's `Rule`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    pub action: Action,
    /// A protocol name (`TCP`, `UDP`, `ICMP`, `ICMPv6`, `SCTP`, `UDPLite`) or number 1-255.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<NumOrString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_protocol: Option<NumOrString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 4, max = 6))]
    pub ip_version: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp: Option<IcmpFields>,
    #[serde(rename = "notICMP", skip_serializing_if = "Option::is_none")]
    pub not_icmp: Option<IcmpFields>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<EntityRule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<EntityRule>,
    /// HTTP match (accepted; not enforced by a kernel dataplane).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<Opaque>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<RuleMetadata>,
}

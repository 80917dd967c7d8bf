//! Calico's `projectcalico.org/v3` resources on the wire: exactly one serde type per kind
//! (`*Spec`, with Calico's field names), which is also where the CRDs come from ([`crd`]), and
//! the one decoder every datastore adapter and tool uses ([`decode`]): errors carry the field's
//! path (`spec.ingress[0].action`), and fields no type knows are collected in one place for
//! the caller to judge. Validated domain types come from these by `TryFrom` (in `policy` and
//! `config`); nothing here judges values.

pub mod common;
pub mod crd;
pub mod felix;
pub mod knp;
pub mod network;
pub mod policy;
pub mod workload;

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crd::{ApiError, crds, file_name, render, rendered, write_all};
pub use felix::{FelixConfiguration, FelixConfigurationSpec};
pub use network::{
    GlobalNetworkSet, GlobalNetworkSetSpec, HostEndpoint, HostEndpointSpec, NetworkSet,
    NetworkSetSpec,
};
pub use policy::{
    GlobalNetworkPolicy, GlobalNetworkPolicySpec, NetworkPolicy, NetworkPolicySpec, Tier, TierSpec,
};

/// The policy kinds wiremesh reads (FelixConfiguration is read apart: it is configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    GlobalNetworkPolicy,
    NetworkPolicy,
    Tier,
    HostEndpoint,
    GlobalNetworkSet,
    NetworkSet,
    /// Kubernetes' own `networking.k8s.io/v1` NetworkPolicy, enforced as the Calico
    /// NetworkPolicy it converts to ([`knp`]).
    KubernetesNetworkPolicy,
    /// Calico's pods and their profiles, as the etcd datastore holds them ([`workload`]).
    WorkloadEndpoint,
    Profile,
    /// Kubernetes `v1` objects policy reads about pods (`policy::workload`): in manifests for
    /// the policy tools; not stored in etcd under these kinds.
    Pod,
    Namespace,
    ServiceAccount,
}

impl Kind {
    /// The `projectcalico.org/v3` kinds: those with a CRD of ours.
    pub const CALICO: [Kind; 6] = [
        Kind::GlobalNetworkPolicy,
        Kind::NetworkPolicy,
        Kind::Tier,
        Kind::HostEndpoint,
        Kind::GlobalNetworkSet,
        Kind::NetworkSet,
    ];

    /// The kinds a datastore stores as policy objects (the etcd keys of [`Kind::plural`]).
    pub const STORED: [Kind; 9] = {
        let c = Kind::CALICO;
        [
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            c[5],
            Kind::KubernetesNetworkPolicy,
            Kind::WorkloadEndpoint,
            Kind::Profile,
        ]
    };

    /// The kinds the Kubernetes datastore list-watches: Calico's CRDs, Kubernetes'
    /// NetworkPolicy, and the `v1` objects pods' endpoints and profiles are derived from (on
    /// Kubernetes, as in Calico's KDD, WorkloadEndpoints and Profiles are never stored).
    pub const KUBERNETES: [Kind; 10] = {
        let c = Kind::CALICO;
        [
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            c[5],
            Kind::KubernetesNetworkPolicy,
            Kind::Pod,
            Kind::Namespace,
            Kind::ServiceAccount,
        ]
    };

    pub const ALL: [Kind; 12] = {
        let s = Kind::STORED;
        [
            s[0],
            s[1],
            s[2],
            s[3],
            s[4],
            s[5],
            s[6],
            s[7],
            s[8],
            Kind::Pod,
            Kind::Namespace,
            Kind::ServiceAccount,
        ]
    };

    pub fn namespaced(self) -> bool {
        matches!(
            self,
            Kind::NetworkPolicy
                | Kind::NetworkSet
                | Kind::KubernetesNetworkPolicy
                | Kind::WorkloadEndpoint
                | Kind::Pod
                | Kind::ServiceAccount
        )
    }

    /// The `apiVersion` of the kind's objects.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::KubernetesNetworkPolicy => "networking.k8s.io/v1",
            Kind::Pod | Kind::Namespace | Kind::ServiceAccount => "v1",
            _ => "projectcalico.org/v3",
        }
    }

    /// The `kind` of the kind's objects (a Kubernetes NetworkPolicy says `NetworkPolicy`).
    pub fn kind_name(self) -> &'static str {
        match self {
            Kind::KubernetesNetworkPolicy => "NetworkPolicy",
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::ServiceAccount => "ServiceAccount",
            other => other.calico_name(),
        }
    }

    fn calico_name(self) -> &'static str {
        match self {
            Kind::GlobalNetworkPolicy => "GlobalNetworkPolicy",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Tier => "Tier",
            Kind::HostEndpoint => "HostEndpoint",
            Kind::GlobalNetworkSet => "GlobalNetworkSet",
            Kind::NetworkSet => "NetworkSet",
            Kind::KubernetesNetworkPolicy => "KubernetesNetworkPolicy",
            Kind::WorkloadEndpoint => "WorkloadEndpoint",
            Kind::Profile => "Profile",
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::ServiceAccount => "ServiceAccount",
        }
    }

    /// The kind of an object with this `apiVersion` and `kind`.
    pub fn from_api(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.kind_name() == kind)
    }

    /// The plural, lower-case name used in Calico's etcd keys and the CRDs.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::GlobalNetworkPolicy => "globalnetworkpolicies",
            Kind::NetworkPolicy => "networkpolicies",
            Kind::Tier => "tiers",
            Kind::HostEndpoint => "hostendpoints",
            Kind::GlobalNetworkSet => "globalnetworksets",
            Kind::NetworkSet => "networksets",
            // Our own etcd key (Calico keeps these in the Kubernetes API only).
            Kind::KubernetesNetworkPolicy => "kubernetesnetworkpolicies",
            Kind::WorkloadEndpoint => "workloadendpoints",
            Kind::Profile => "profiles",
            Kind::Pod => "pods",
            Kind::Namespace => "namespaces",
            Kind::ServiceAccount => "serviceaccounts",
        }
    }

    /// Whether a datastore stores objects of this kind (see [`Kind::STORED`]).
    pub fn stored(self) -> bool {
        Kind::STORED.contains(&self)
    }

    /// A `projectcalico.org/v3` kind by its `kind` name.
    pub fn from_kind_name(name: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == "projectcalico.org/v3" && k.calico_name() == name)
    }

    pub fn from_plural(name: &str) -> Option<Kind> {
        Kind::STORED.into_iter().find(|k| k.plural() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Policy resources as a datastore holds them: the JSON object per kind, keyed by `name`
/// (cluster-scoped kinds) or `namespace/name`. Both adapters fill it the same way; decoding
/// and validation happen once, in `policy::resources`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawPolicyResources {
    pub objects: BTreeMap<Kind, BTreeMap<String, serde_json::Value>>,
}

impl RawPolicyResources {
    pub fn insert(&mut self, kind: Kind, key: String, value: serde_json::Value) {
        self.objects.entry(kind).or_default().insert(key, value);
    }

    pub fn is_empty(&self) -> bool {
        self.objects.values().all(BTreeMap::is_empty)
    }
}

/// The part of an object's `metadata` wiremesh reads; server bookkeeping (uid,
/// resourceVersion, managedFields, ...) is ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// One stored object of a kind whose spec is `S` (`apiVersion` and `kind` are the caller's to
/// know). A missing `spec` is an empty one, as Calico treats it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct Object<S> {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: S,
}

/// A value that does not decode: where (`spec.ingress[0].action`; `object` for the whole
/// value) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DecodeError {
    pub path: String,
    pub message: String,
}

/// A decoded value and the paths of the fields its type does not have.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded<T> {
    pub value: T,
    /// e.g. `spec.ingress[0].destinaton` (in the order of the object's keys).
    pub unknown_fields: Vec<String>,
}

/// Decodes `value` as `T`: the one place JSON becomes a wire type. A field of the wrong type
/// or shape fails with its path (a missing required field names the field itself); fields `T`
/// does not have are returned, not dropped silently, so each caller decides what they mean
/// (an error for policy, a warning for FelixConfiguration, nothing for `metadata`).
pub fn decode<T: DeserializeOwned>(value: &serde_json::Value) -> Result<Decoded<T>, DecodeError> {
    let mut unknown_fields = Vec::new();
    let mut collect = |path: serde_ignored::Path<'_>| unknown_fields.push(ignored_path(&path));
    let ignored = serde_ignored::Deserializer::new(value, &mut collect);
    match serde_path_to_error::deserialize(ignored) {
        Ok(value) => Ok(Decoded {
            value,
            unknown_fields,
        }),
        Err(e) => {
            let mut path = e.path().to_string();
            let message = e.into_inner().to_string();
            // serde reports a missing field at its parent; name the field itself.
            if let Some(field) = message
                .strip_prefix("missing field `")
                .and_then(|rest| rest.strip_suffix('`'))
            {
                path = if path == "." {
                    field.to_string()
                } else {
                    format!("{path}.{field}")
                };
            }
            if path == "." {
                path = "object".into();
            }
            Err(DecodeError { path, message })
        }
    }
}

/// `spec.ingress[0].destinaton` for a path serde_ignored reports.
fn ignored_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", ignored_path(parent)),
        Path::Map { parent, key } => match ignored_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent),
    }
}

/// What kind of JSON value `value` is, for messages ("is not an object but a string").
pub fn json_kind(value: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The field names `T`'s schema declares at the top level (for did-you-mean hints).
pub fn field_names<T: schemars::JsonSchema>() -> Vec<String> {
    let schema = schemars::SchemaGenerator::default().into_root_schema_for::<T>();
    schema
        .get("properties")
        .and_then(serde_json::Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

/// The known name closest to `unknown`, when it is a likely typo (at most two edits, or a
/// case-only difference).
pub fn did_you_mean<'a>(unknown: &str, known: &'a [String]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(&unknown.to_lowercase(), &k.to_lowercase()), k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.as_str())
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn errors_name_the_field_path() {
        let e = decode::<Object<GlobalNetworkPolicySpec>>(
            &json!({"spec": {"ingress": [{"action": "Accept"}]}}),
        )
        .expect_err("bad action");
        assert_eq!(e.path, "spec.ingress[0].action");
        assert!(e.message.contains("unknown variant `Accept`"), "{e}");
        let e = decode::<Object<HostEndpointSpec>>(&json!({"spec": {"interfaceName": "eth0"}}))
            .expect_err("no node");
        assert_eq!(e.path, "spec.node");
        let e = decode::<Object<TierSpec>>(&json!("text")).expect_err("not an object");
        assert_eq!(e.path, "object");
    }

    #[test]
    fn unknown_fields_are_reported_with_their_path() {
        let d = decode::<Object<GlobalNetworkPolicySpec>>(&json!({
            "metadata": {"name": "a", "uid": "1"},
            "spec": {"ingresss": [], "egress": [{"action": "Allow", "destinaton": {}}]}
        }))
        .expect("decodes");
        assert_eq!(
            d.unknown_fields,
            ["metadata.uid", "spec.egress[0].destinaton", "spec.ingresss"]
        );
    }

    #[test]
    fn typos_get_a_suggestion() {
        let known = field_names::<FelixConfigurationSpec>();
        assert_eq!(
            did_you_mean("wireguardEnabeld", &known),
            Some("wireguardEnabled")
        );
        assert_eq!(did_you_mean("wireguardmtu", &known), Some("wireguardMTU"));
        assert_eq!(did_you_mean("bpfEnabled", &known), None);
    }
}

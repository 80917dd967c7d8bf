//! Policy resources validated into the domain types of [`super::model`]: each projectcalico.org/v3
//! kind's wire type (`crate::wire`) becomes its domain type by `TryFrom`, and this is the only
//! place policy is validated. An object that fails yields a [`ValidationError`] naming the
//! object and the field; the caller skips it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::model::{
    Action, EndpointPort, Entity, HostEndpoint, IcmpMatch, NetworkSet, Policy, PolicyKind,
    PortRange, Protocol, Rule, Tier, TierDefault,
};
use super::workload::{self, DEFAULT_INTERFACE_PREFIX, Profile, WorkloadEndpoint};
use crate::model::Family;
use crate::selector::{Expr, Selector};
use crate::wire::common::{EntityRule, IcmpFields, NumOrString, PolicyType};
use crate::wire::network::EndpointPort as WireEndpointPort;
use crate::wire::policy::TierDefaultAction;
use crate::wire::workload::{ProfileSpec, WorkloadEndpointSpec};
use crate::wire::{
    self, GlobalNetworkPolicySpec, GlobalNetworkSetSpec, HostEndpointSpec, Kind, NetworkPolicySpec,
    NetworkSetSpec, Object, ObjectMeta, RawPolicyResources, TierSpec,
};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy as KubernetesNetworkPolicy;

/// A validation failure: which object, which field, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{kind} {name:?}: {field}: {message}")]
pub struct ValidationError {
    pub kind: Kind,
    /// `name`, or `namespace/name` for namespaced kinds.
    pub name: String,
    /// A path such as `spec.ingress[0].protocol`; `object` for the whole object.
    pub field: String,
    pub message: String,
    /// Valid Calico, but a feature wiremesh does not enforce (HTTP matches, service accounts,
    /// services): the object is skipped all the same, as enforcing it partly would be wrong.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unsupported: bool,
}

/// Validated resources; what failed is in `errors`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyResources {
    pub tiers: BTreeMap<String, Tier>,
    pub policies: Vec<Policy>,
    pub host_endpoints: Vec<HostEndpoint>,
    pub network_sets: Vec<NetworkSet>,
    /// Pods (from `v1` Pod objects; the policy tools only, so far).
    pub workload_endpoints: Vec<WorkloadEndpoint>,
    /// `kns.*` and `ksa.*`, from `v1` Namespace and ServiceAccount objects.
    pub profiles: BTreeMap<String, Profile>,
    pub errors: Vec<ValidationError>,
    /// Fields of valid objects that have no effect in wiremesh ([`IGNORED_FIELDS`]); the
    /// object applies without them.
    pub warnings: Vec<ValidationError>,
}

/// Valid Calico spec fields that wiremesh accepts but that have no effect here, per kind, and
/// why. Any other unknown field makes the object invalid.
pub const IGNORED_FIELDS: [(Kind, &str, &str); 4] = [
    (
        Kind::GlobalNetworkSet,
        "allowedEgressDomains",
        "domain names (Calico Enterprise) are not members in wiremesh: rules that refer to this set match its nets only, so a Deny rule also lets traffic to those domains through",
    ),
    (
        Kind::NetworkSet,
        "allowedEgressDomains",
        "domain names (Calico Enterprise) are not members in wiremesh: rules that refer to this set match its nets only, so a Deny rule also lets traffic to those domains through",
    ),
    (
        Kind::GlobalNetworkPolicy,
        "performanceHints",
        "a hint to Calico's dataplane; no effect in wiremesh",
    ),
    (
        Kind::NetworkPolicy,
        "performanceHints",
        "a hint to Calico's dataplane; no effect in wiremesh",
    ),
];

/// `value` without the [`IGNORED_FIELDS`] of `kind` it has, and the fields removed with why;
/// `None` when it has none.
fn without_ignored_fields(
    kind: Kind,
    value: &serde_json::Value,
) -> Option<(serde_json::Value, Vec<(&'static str, &'static str)>)> {
    let spec = value.get("spec")?.as_object()?;
    let found: Vec<(&'static str, &'static str)> = IGNORED_FIELDS
        .iter()
        .filter(|(k, field, _)| *k == kind && spec.contains_key(*field))
        .map(|(_, field, why)| (*field, *why))
        .collect();
    if found.is_empty() {
        return None;
    }
    let mut stripped = value.clone();
    if let Some(spec) = stripped.get_mut("spec").and_then(|s| s.as_object_mut()) {
        for (field, _) in &found {
            spec.remove(*field);
        }
    }
    Some((stripped, found))
}

impl PolicyResources {
    /// Validates every raw object; invalid ones are left out and reported in `errors`.
    pub fn from_raw(raw: &RawPolicyResources) -> PolicyResources {
        let mut out = PolicyResources::default();
        for (kind, objects) in &raw.objects {
            for (key, value) in objects {
                if let Err(e) = out.add_value(*kind, key, value) {
                    out.errors.push(e);
                }
            }
        }
        out.finish();
        out
    }

    /// Like [`PolicyResources::from_raw`], but an object that fails validation is replaced by
    /// its last valid version from `last_good` (if any), so a bad edit never weakens or
    /// tightens enforcement; the error is still reported. `last_good` is updated: valid objects
    /// are remembered, deleted ones forgotten.
    pub fn from_raw_keeping_last_good(
        raw: &RawPolicyResources,
        last_good: &mut RawPolicyResources,
    ) -> PolicyResources {
        let mut out = PolicyResources::default();
        let mut good = RawPolicyResources::default();
        for (kind, objects) in &raw.objects {
            for (key, value) in objects {
                match out.add_value(*kind, key, value) {
                    Ok(()) => good.insert(*kind, key.clone(), value.clone()),
                    Err(mut e) => {
                        let previous = last_good.objects.get(kind).and_then(|o| o.get(key));
                        if let Some(prev) = previous
                            && out.add_value(*kind, key, prev).is_ok()
                        {
                            e.message
                                .push_str(" (the last valid version stays in force)");
                            good.insert(*kind, key.clone(), prev.clone());
                        }
                        out.errors.push(e);
                    }
                }
            }
        }
        *last_good = good;
        out.finish();
        out
    }

    /// Validates one object and adds it. `key` names it in errors if it has no name. Fields
    /// with no effect in wiremesh are left out and reported in `warnings`.
    pub fn add_value(
        &mut self,
        kind: Kind,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<(), ValidationError> {
        let stripped;
        let value = match without_ignored_fields(kind, value) {
            None => value,
            Some((without, fields)) => {
                for (field, why) in fields {
                    self.warnings.push(ValidationError {
                        kind,
                        name: stored_name(kind, key, value),
                        field: format!("spec.{field}"),
                        message: format!("has no effect: {why}"),
                        unsupported: false,
                    });
                }
                stripped = without;
                &stripped
            }
        };
        match kind {
            Kind::GlobalNetworkPolicy => {
                let stored = Stored::<GlobalNetworkPolicySpec>::decode(kind, key, value)?;
                self.policies.push(Policy::try_from(stored)?);
            }
            Kind::NetworkPolicy => {
                let stored = Stored::<NetworkPolicySpec>::decode(kind, key, value)?;
                self.policies.push(Policy::try_from(stored)?);
            }
            Kind::Tier => {
                let tier = Tier::try_from(Stored::<TierSpec>::decode(kind, key, value)?)?;
                self.tiers.insert(tier.name.clone(), tier);
            }
            Kind::HostEndpoint => {
                let stored = Stored::<HostEndpointSpec>::decode(kind, key, value)?;
                self.host_endpoints.push(HostEndpoint::try_from(stored)?);
            }
            Kind::GlobalNetworkSet => {
                let stored = Stored::<GlobalNetworkSetSpec>::decode(kind, key, value)?;
                self.network_sets.push(NetworkSet::try_from(stored)?);
            }
            Kind::NetworkSet => {
                let stored = Stored::<NetworkSetSpec>::decode(kind, key, value)?;
                self.network_sets.push(NetworkSet::try_from(stored)?);
            }
            Kind::KubernetesNetworkPolicy => {
                self.policies.push(kubernetes_network_policy(key, value)?);
            }
            Kind::WorkloadEndpoint => {
                let stored = Stored::<WorkloadEndpointSpec>::decode(kind, key, value)?;
                // An endpoint without addresses is invisible to policy, as in Felix.
                self.workload_endpoints
                    .extend(Option::<WorkloadEndpoint>::try_from(stored)?);
            }
            Kind::Profile => {
                let profile = Profile::try_from(Stored::<ProfileSpec>::decode(kind, key, value)?)?;
                self.profiles.insert(profile.name.clone(), profile);
            }
            Kind::Pod => {
                let pod: Pod = decode_kubernetes(kind, key, value)?;
                let (endpoint, problems) = workload::from_pod(&pod, DEFAULT_INTERFACE_PREFIX);
                // What was left out of a pod is reported; the rest of it still counts.
                self.errors
                    .extend(problems.into_iter().map(|p| ValidationError {
                        kind,
                        name: stored_name(kind, key, value),
                        field: p.field,
                        message: p.reason,
                        unsupported: false,
                    }));
                self.workload_endpoints.extend(endpoint);
            }
            Kind::Namespace => {
                let ns: Namespace = decode_kubernetes(kind, key, value)?;
                let profile = workload::namespace_profile(&ns);
                self.profiles.insert(profile.name.clone(), profile);
            }
            Kind::ServiceAccount => {
                let sa: ServiceAccount = decode_kubernetes(kind, key, value)?;
                let profile = workload::service_account_profile(&sa);
                self.profiles.insert(profile.name.clone(), profile);
            }
        }
        Ok(())
    }

    /// Adds Calico's built-in tiers where absent and sorts for determinism.
    pub fn finish(&mut self) {
        for tier in Tier::builtin() {
            self.tiers.entry(tier.name.clone()).or_insert(tier);
        }
        self.policies.sort_by_key(Policy::sort_key);
        self.host_endpoints.sort_by(|a, b| a.name.cmp(&b.name));
        self.network_sets
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        self.workload_endpoints
            .sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// A decoded object of one kind, with the key it was stored under (its name when the stored
/// object has none).
#[derive(Debug, Clone)]
pub struct Stored<'a, S> {
    pub kind: Kind,
    pub key: &'a str,
    pub object: Object<S>,
}

impl<'a, S: DeserializeOwned + JsonSchema + Default> Stored<'a, S> {
    /// Decodes `value`: a field of the wrong type, or one the kind's spec does not have (a typo
    /// such as `ingresss`, which Kubernetes would otherwise prune silently), is an error.
    pub fn decode(
        kind: Kind,
        key: &'a str,
        value: &serde_json::Value,
    ) -> Result<Self, ValidationError> {
        let err = |field: String, message: String| ValidationError {
            kind,
            name: stored_name(kind, key, value),
            field,
            message,
            unsupported: false,
        };
        if !value.is_object() {
            let what = value
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            return Err(err(
                "object".into(),
                format!("is not a JSON object: {what}"),
            ));
        }
        let decoded = wire::decode::<Object<S>>(value).map_err(|e| err(e.path, e.message))?;
        // Server bookkeeping in `metadata` and `status` is not ours to judge; the spec is.
        if let Some(path) = decoded
            .unknown_fields
            .iter()
            .find(|p| p.starts_with("spec."))
        {
            return Err(err(path.clone(), unknown_field_message::<S>(kind, path)));
        }
        Ok(Stored {
            kind,
            key,
            object: decoded.value,
        })
    }

    fn ctx(&self) -> Ctx {
        let meta = &self.object.metadata;
        let name = if meta.name.is_empty() {
            // The key is authoritative when the stored object lacks a name.
            self.key.to_string()
        } else {
            display_name(meta, self.key)
        };
        Ctx {
            kind: self.kind,
            name,
        }
    }
}

/// A Kubernetes object (`metadata.name`, `namespace` from the key where missing); a field of
/// the wrong type is an error.
fn decode_kubernetes<T>(
    kind: Kind,
    key: &str,
    value: &serde_json::Value,
) -> Result<T, ValidationError>
where
    T: DeserializeOwned
        + k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
{
    let mut object = wire::decode::<T>(value)
        .map_err(|e| ValidationError {
            kind,
            name: stored_name(kind, key, value),
            field: e.path,
            message: e.message,
            unsupported: false,
        })?
        .value;
    let (key_namespace, key_name) = match key.split_once('/') {
        Some((ns, name)) if kind.namespaced() => (Some(ns), name),
        _ => (None, key),
    };
    let meta = object.metadata_mut();
    meta.name.get_or_insert_with(|| key_name.to_string());
    if let Some(ns) = key_namespace {
        meta.namespace.get_or_insert_with(|| ns.to_string());
    }
    Ok(object)
}

/// A Kubernetes NetworkPolicy: decoded (a field of the wrong type, or one its spec does not
/// have, is an error), converted as Calico converts it (`wire::knp`; a rule the conversion has
/// to drop makes the object invalid, so its last valid version stays in force), then validated
/// as that Calico NetworkPolicy. Errors name the Kubernetes object.
fn kubernetes_network_policy(
    key: &str,
    value: &serde_json::Value,
) -> Result<Policy, ValidationError> {
    let kind = Kind::KubernetesNetworkPolicy;
    let name = stored_name(kind, key, value);
    let err = |field: String, message: String| ValidationError {
        kind,
        name: name.clone(),
        field,
        message,
        unsupported: false,
    };
    if !value.is_object() {
        return Err(err(
            "object".into(),
            format!("is not a JSON object: {value}"),
        ));
    }
    let decoded =
        wire::decode::<KubernetesNetworkPolicy>(value).map_err(|e| err(e.path, e.message))?;
    if let Some(path) = decoded
        .unknown_fields
        .iter()
        .find(|p| p.starts_with("spec."))
    {
        return Err(err(path.clone(), "unknown field".into()));
    }
    let mut np = decoded.value;
    let (key_namespace, key_name) = key.split_once('/').unwrap_or(("default", key));
    let meta = &mut np.metadata;
    meta.name.get_or_insert_with(|| key_name.to_string());
    meta.namespace
        .get_or_insert_with(|| key_namespace.to_string());
    let converted = wire::knp::convert(&np);
    if let Some(first) = converted.problems.first() {
        let mut message = first.reason.clone();
        for more in &converted.problems[1..] {
            message.push_str(&format!("; {more}"));
        }
        return Err(err(first.field.clone(), message));
    }
    let calico_key = format!("{}/{}", converted.namespace, converted.name);
    let stored = Stored {
        kind: Kind::NetworkPolicy,
        key: &calico_key,
        object: Object {
            metadata: ObjectMeta {
                name: converted.name.clone(),
                namespace: Some(converted.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: converted.spec,
        },
    };
    Policy::try_from(stored).map_err(|e| {
        err(
            e.field,
            format!(
                "{} (in the Calico policy {calico_key} it converts to)",
                e.message
            ),
        )
    })
}

/// How errors name an object: `namespace/name` or `name` from its metadata, else its key.
fn stored_name(kind: Kind, key: &str, value: &serde_json::Value) -> String {
    let field = |f: &str| value.pointer(f).and_then(serde_json::Value::as_str);
    match (field("/metadata/name"), field("/metadata/namespace")) {
        (Some(name), Some(ns)) if kind.namespaced() && !name.is_empty() => format!("{ns}/{name}"),
        (Some(name), _) if !name.is_empty() => name.to_string(),
        _ => key.to_string(),
    }
}

/// "unknown field", with the likely intended field for a typo of a top-level spec field.
fn unknown_field_message<S: JsonSchema>(kind: Kind, path: &str) -> String {
    let field = path.trim_start_matches("spec.");
    let global_only = [
        "doNotTrack",
        "preDNAT",
        "applyOnForward",
        "namespaceSelector",
    ];
    if kind == Kind::NetworkPolicy && global_only.contains(&field) {
        return format!(
            "unknown field: {} are GlobalNetworkPolicy fields",
            global_only.join(", ")
        );
    }
    let known = wire::field_names::<S>();
    match wire::did_you_mean(field, &known) {
        Some(intended) if !field.contains(['.', '[']) => {
            format!("unknown field (did you mean {intended}?)")
        }
        _ => "unknown field".to_string(),
    }
}

fn display_name(meta: &ObjectMeta, key: &str) -> String {
    match (&meta.namespace, meta.name.is_empty()) {
        (_, true) => key.to_string(),
        (Some(ns), false) => format!("{ns}/{}", meta.name),
        (None, false) => meta.name.clone(),
    }
}

/// `TryFrom<Stored<Spec>>` for a domain type, by its validation function
/// `(ctx, metadata, key, spec) -> Result<Domain, ValidationError>`.
macro_rules! validated_by {
    ($spec:ty => $domain:ty, $validate:expr) => {
        impl TryFrom<Stored<'_, $spec>> for $domain {
            type Error = ValidationError;

            fn try_from(stored: Stored<'_, $spec>) -> Result<Self, Self::Error> {
                let ctx = stored.ctx();
                let Object { metadata, spec } = stored.object;
                ($validate)(&ctx, &metadata, stored.key, spec)
            }
        }
    };
}

validated_by!(GlobalNetworkPolicySpec => Policy, validate_policy);
validated_by!(NetworkPolicySpec => Policy, |ctx, meta, key, spec: NetworkPolicySpec| {
    validate_policy(ctx, meta, key, GlobalNetworkPolicySpec::from(spec))
});
validated_by!(TierSpec => Tier, validate_tier);
validated_by!(WorkloadEndpointSpec => Option<WorkloadEndpoint>, validate_wep);
validated_by!(ProfileSpec => Profile, validate_profile);
validated_by!(HostEndpointSpec => HostEndpoint, validate_hep);
validated_by!(GlobalNetworkSetSpec => NetworkSet, |ctx, meta, key, spec: GlobalNetworkSetSpec| {
    validate_netset(ctx, meta, key, &spec.nets)
});
validated_by!(NetworkSetSpec => NetworkSet, |ctx, meta, key, spec: NetworkSetSpec| {
    validate_netset(ctx, meta, key, &spec.nets)
});

// ---------------------------------------------------------------------------------------------
// Validation

struct Ctx {
    kind: Kind,
    name: String,
}

impl Ctx {
    fn err(&self, field: impl Into<String>, message: impl fmt::Display) -> ValidationError {
        ValidationError {
            kind: self.kind,
            name: self.name.clone(),
            field: field.into(),
            message: message.to_string(),
            unsupported: false,
        }
    }

    /// A valid field naming a feature wiremesh does not enforce.
    fn unsupported(&self, field: impl Into<String>, message: impl fmt::Display) -> ValidationError {
        ValidationError {
            unsupported: true,
            ..self.err(field, message)
        }
    }

    fn selector(
        &self,
        field: &str,
        text: Option<&str>,
    ) -> Result<Option<Selector>, ValidationError> {
        match text {
            None => Ok(None),
            Some(t) => Selector::parse(t)
                .map(Some)
                .map_err(|e| self.err(field, format!("invalid selector {t:?}: {e}"))),
        }
    }
}

/// DNS-1123 label: lower-case alphanumerics and '-', starting and ending alphanumeric.
fn is_dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn validate_name(
    ctx: &Ctx,
    meta: &ObjectMeta,
    key: &str,
    dots: usize,
) -> Result<String, ValidationError> {
    let name = if meta.name.is_empty() {
        key.rsplit('/').next().unwrap_or(key).to_string()
    } else {
        meta.name.clone()
    };
    let mut check = name.as_str();
    if ctx.kind == Kind::NetworkPolicy {
        for prefix in ["knp.default.", "ossg.default."] {
            if let Some(rest) = check.strip_prefix(prefix) {
                check = rest;
            }
        }
    }
    let parts: Vec<&str> = check.split('.').collect();
    if name.len() > 253 || parts.len() > dots + 1 || !parts.iter().all(|p| is_dns_label(p, 63)) {
        return Err(ctx.err(
            "metadata.name",
            format!(
                "{name:?} is not a valid name (lower-case DNS labels, {})",
                if dots == 0 {
                    "no dots".to_string()
                } else {
                    format!("at most {dots} dot")
                }
            ),
        ));
    }
    Ok(name)
}

fn validate_policy(
    ctx: &Ctx,
    meta: &ObjectMeta,
    key: &str,
    spec: GlobalNetworkPolicySpec,
) -> Result<Policy, ValidationError> {
    let kind = if ctx.kind == Kind::NetworkPolicy {
        PolicyKind::Namespaced
    } else {
        PolicyKind::Global
    };
    let name = validate_name(ctx, meta, key, 1)?;
    let namespace = match kind {
        PolicyKind::Global => None,
        PolicyKind::Namespaced => {
            let ns = meta
                .namespace
                .clone()
                .or_else(|| key.split_once('/').map(|(ns, _)| ns.to_string()))
                .filter(|ns| !ns.is_empty())
                .ok_or_else(|| {
                    ctx.err("metadata.namespace", "a NetworkPolicy needs a namespace")
                })?;
            Some(ns)
        }
    };
    let tier = spec
        .tier
        .clone()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "default".into());
    if !is_dns_label(&tier, 63) {
        return Err(ctx.err("spec.tier", format!("{tier:?} is not a valid tier name")));
    }
    if let Some(order) = spec.order
        && !order.is_finite()
    {
        return Err(ctx.err("spec.order", "must be a finite number"));
    }
    let do_not_track = spec.do_not_track.unwrap_or(false);
    let pre_dnat = spec.pre_dnat.unwrap_or(false);
    let apply_on_forward = spec.apply_on_forward.unwrap_or(false);
    let selector = ctx
        .selector("spec.selector", spec.selector.as_deref())?
        .unwrap_or_default();
    if selector.uses_global() {
        return Err(ctx.err(
            "spec.selector",
            "global() is not allowed in a policy selector",
        ));
    }
    let ns_sel = ctx.selector("spec.namespaceSelector", spec.namespace_selector.as_deref())?;
    let sa_sel = ctx.selector(
        "spec.serviceAccountSelector",
        spec.service_account_selector.as_deref(),
    )?;
    for (field, s) in [
        ("spec.namespaceSelector", &ns_sel),
        ("spec.serviceAccountSelector", &sa_sel),
    ] {
        if s.as_ref().is_some_and(Selector::uses_global) {
            return Err(ctx.err(field, "global() is not allowed here"));
        }
    }
    // Types: API defaulting (§2.2, 32).
    let (ingress_on, egress_on) = if spec.types.is_empty() {
        (
            spec.egress.is_empty() || !spec.ingress.is_empty(),
            !spec.egress.is_empty(),
        )
    } else {
        let mut seen = BTreeSet::new();
        for (i, t) in spec.types.iter().enumerate() {
            if !seen.insert(*t) {
                return Err(ctx.err(format!("spec.types[{i}]"), format!("duplicate type {t:?}")));
            }
        }
        (
            seen.contains(&PolicyType::Ingress),
            seen.contains(&PolicyType::Egress),
        )
    };
    if do_not_track && pre_dnat {
        return Err(ctx.err("spec", "doNotTrack and preDNAT cannot both be set"));
    }
    if pre_dnat && (egress_on || !spec.egress.is_empty()) {
        return Err(ctx.err(
            "spec.egress",
            "a preDNAT policy cannot have egress rules or the Egress type",
        ));
    }
    if (do_not_track || pre_dnat) && !apply_on_forward {
        return Err(ctx.err(
            "spec.applyOnForward",
            "must be true when doNotTrack or preDNAT is set",
        ));
    }
    for (i, h) in spec.performance_hints.iter().enumerate() {
        if h != "AssumeNeededOnEveryNode" {
            return Err(ctx.err(
                format!("spec.performanceHints[{i}]"),
                format!("unknown hint {h:?}"),
            ));
        }
    }
    for (dir, rules) in [("ingress", &spec.ingress), ("egress", &spec.egress)] {
        if rules.len() > 1024 {
            return Err(ctx.err(format!("spec.{dir}"), "at most 1024 rules"));
        }
    }
    let rules = |dir: &str, raw: &[wire::common::Rule]| -> Result<Vec<Rule>, ValidationError> {
        raw.iter()
            .enumerate()
            .map(|(i, r)| {
                validate_rule(
                    ctx,
                    &format!("spec.{dir}[{i}]"),
                    dir == "ingress",
                    namespace.as_deref(),
                    r,
                )
            })
            .collect()
    };
    let ingress = rules("ingress", &spec.ingress)?;
    let egress = rules("egress", &spec.egress)?;
    // A GNP with a namespace or service-account selector, and every NetworkPolicy, can only
    // select pods: it never selects a host endpoint (§1.3, 17–18).
    let selects_host_endpoints = kind == PolicyKind::Global && ns_sel.is_none() && sa_sel.is_none();
    Ok(Policy {
        kind,
        namespace,
        name,
        tier,
        order: spec.order,
        selector,
        namespace_selector: ns_sel,
        service_account_selector: sa_sel,
        selects_host_endpoints,
        ingress: ingress_on.then_some(ingress),
        egress: egress_on.then_some(egress),
        do_not_track,
        pre_dnat,
        apply_on_forward,
    })
}

fn parse_protocol(ctx: &Ctx, field: &str, p: &NumOrString) -> Result<Protocol, ValidationError> {
    let num = |n: i64| -> Result<Protocol, ValidationError> {
        u8::try_from(n)
            .ok()
            .filter(|n| *n >= 1)
            .map(Protocol::from_number)
            .ok_or_else(|| ctx.err(field, format!("protocol number {n} is not in 1..255")))
    };
    match p {
        NumOrString::Num(n) => num(*n),
        NumOrString::Str(s) => match s.as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "ICMP" => Ok(Protocol::Icmp),
            "ICMPv6" => Ok(Protocol::IcmpV6),
            "SCTP" => Ok(Protocol::Sctp),
            "UDPLite" => Ok(Protocol::UdpLite),
            other => match other.parse::<i64>() {
                Ok(n) => num(n),
                Err(_) => Err(ctx.err(
                    field,
                    format!("{other:?} is not a protocol (TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or 1..255; case-sensitive)"),
                )),
            },
        },
    }
}

/// One entry of `ports`/`notPorts`.
enum PortItem {
    Numeric(PortRange),
    Named(String),
}

/// Calico's port-name pattern, `[a-zA-Z0-9_.-]{1,128}` (rule ports and HostEndpoint ports).
fn is_port_name(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn parse_port(ctx: &Ctx, field: &str, p: &NumOrString) -> Result<PortItem, ValidationError> {
    let bad = |why: &str| ctx.err(field, format!("port {p}: {why}"));
    let one = |n: i64| u16::try_from(n).ok().filter(|n| *n >= 1);
    match p {
        NumOrString::Num(n) => one(*n)
            .map(|n| PortItem::Numeric(PortRange { lo: n, hi: n }))
            .ok_or_else(|| bad("not in 1..65535")),
        NumOrString::Str(s) => {
            if let Some((lo, hi)) = s.split_once(':') {
                let lo = lo.trim().parse::<i64>().ok().and_then(one);
                let hi = hi.trim().parse::<i64>().ok().and_then(one);
                match (lo, hi) {
                    (Some(lo), Some(hi)) if lo <= hi => Ok(PortItem::Numeric(PortRange { lo, hi })),
                    _ => Err(bad("a range is \"lo:hi\" with 1 <= lo <= hi <= 65535")),
                }
            } else if let Ok(n) = s.trim().parse::<i64>() {
                one(n)
                    .map(|n| PortItem::Numeric(PortRange { lo: n, hi: n }))
                    .ok_or_else(|| bad("not in 1..65535"))
            } else if is_port_name(s) {
                Ok(PortItem::Named(s.clone()))
            } else {
                Err(bad(
                    "not a port number, a range \"lo:hi\" or a port name ([a-zA-Z0-9_.-]{1,128})",
                ))
            }
        }
    }
}

/// Splits a `ports`/`notPorts` list into numeric ranges and names (deduplicated, in order).
fn parse_ports(
    ctx: &Ctx,
    field: &str,
    list: &[NumOrString],
) -> Result<(Vec<PortRange>, Vec<String>), ValidationError> {
    let mut numeric = Vec::new();
    let mut named: Vec<String> = Vec::new();
    for (i, p) in list.iter().enumerate() {
        match parse_port(ctx, &format!("{field}[{i}]"), p)? {
            PortItem::Numeric(r) => numeric.push(r),
            PortItem::Named(n) if !named.contains(&n) => named.push(n),
            PortItem::Named(_) => {}
        }
    }
    Ok((numeric, named))
}

fn parse_net(ctx: &Ctx, field: &str, s: &str) -> Result<IpNet, ValidationError> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| ctx.err(field, format!("{s:?} is not a CIDR or IP address")))
}

fn validate_rule(
    ctx: &Ctx,
    field: &str,
    ingress: bool,
    namespace: Option<&str>,
    r: &wire::common::Rule,
) -> Result<Rule, ValidationError> {
    let f = |sub: &str| format!("{field}.{sub}");
    let action: Action = r.action;
    if r.http.is_some() {
        return Err(ctx.unsupported(
            f("http"),
            "HTTP match criteria are not enforced by a kernel dataplane; wiremesh rejects them",
        ));
    }
    let _ = ingress;
    let protocol = r
        .protocol
        .as_ref()
        .map(|p| parse_protocol(ctx, &f("protocol"), p))
        .transpose()?;
    let not_protocol = r
        .not_protocol
        .as_ref()
        .map(|p| parse_protocol(ctx, &f("notProtocol"), p))
        .transpose()?;
    let mut ip_version = match r.ip_version {
        None => None,
        Some(4) => Some(Family::V4),
        Some(6) => Some(Family::V6),
        Some(v) => return Err(ctx.err(f("ipVersion"), format!("{v} is not 4 or 6"))),
    };
    for (name, p) in [("protocol", protocol), ("notProtocol", not_protocol)] {
        match (p, ip_version) {
            (Some(Protocol::Icmp), Some(Family::V6)) => {
                return Err(ctx.err(f(name), "ICMP needs ipVersion 4 or unset"));
            }
            (Some(Protocol::IcmpV6), Some(Family::V4)) => {
                return Err(ctx.err(f(name), "ICMPv6 needs ipVersion 6 or unset"));
            }
            _ => {}
        }
    }
    // Protocol ICMP/ICMPv6 by name pins the family (§2.1, 23).
    if ip_version.is_none() {
        ip_version = match protocol {
            Some(Protocol::Icmp) => Some(Family::V4),
            Some(Protocol::IcmpV6) => Some(Family::V6),
            _ => None,
        };
    }
    let icmp = |name: &str,
                raw: &Option<IcmpFields>|
     -> Result<Option<IcmpMatch>, ValidationError> {
        let Some(raw) = raw else { return Ok(None) };
        let icmp_proto = matches!(protocol.map(Protocol::number), Some(1) | Some(58));
        if !icmp_proto {
            return Err(ctx.err(f(name), "needs protocol ICMP, ICMPv6, 1 or 58"));
        }
        let type_ = match raw.type_ {
            None if raw.code.is_some() => return Err(ctx.err(f(name), "code requires type")),
            None => return Ok(None),
            Some(t) => u8::try_from(t)
                .ok()
                .filter(|t| *t <= 254)
                .ok_or_else(|| ctx.err(f(name), format!("type {t} is not in 0..254")))?,
        };
        let code = raw
            .code
            .map(|c| {
                u8::try_from(c).map_err(|_| ctx.err(f(name), format!("code {c} is not in 0..255")))
            })
            .transpose()?;
        Ok(Some(IcmpMatch { type_, code }))
    };
    let icmp_m = icmp("icmp", &r.icmp)?;
    let not_icmp = icmp("notICMP", &r.not_icmp)?;
    let empty = EntityRule::default();
    let source = validate_entity(
        ctx,
        &f("source"),
        namespace,
        r.source.as_ref().unwrap_or(&empty),
        protocol,
    )?;
    let destination = validate_entity(
        ctx,
        &f("destination"),
        namespace,
        r.destination.as_ref().unwrap_or(&empty),
        protocol,
    )?;
    // Family consistency of nets.
    let mut fams = BTreeSet::new();
    for e in [&source, &destination] {
        for n in e.nets.iter().chain(&e.not_nets) {
            fams.insert(Family::of_net(n));
        }
    }
    if fams.len() > 1 {
        return Err(ctx.err(field, "mixes IPv4 and IPv6 nets in one rule"));
    }
    if let (Some(v), Some(fam)) = (ip_version, fams.first())
        && v != *fam
    {
        return Err(ctx.err(
            f("ipVersion"),
            format!("is {v} but the rule's nets are {fam}"),
        ));
    }
    Ok(Rule {
        action,
        ip_version,
        protocol,
        not_protocol,
        icmp: icmp_m,
        not_icmp,
        source,
        destination,
    })
}

fn validate_entity(
    ctx: &Ctx,
    field: &str,
    namespace: Option<&str>,
    e: &EntityRule,
    protocol: Option<Protocol>,
) -> Result<Entity, ValidationError> {
    let f = |sub: &str| format!("{field}.{sub}");
    if e.services.is_some() {
        return Err(ctx.unsupported(
            f("services"),
            "Kubernetes service matches are not supported by wiremesh",
        ));
    }
    if e.service_accounts.is_some() {
        return Err(ctx.unsupported(
            f("serviceAccounts"),
            "service-account matches select only pods, which wiremesh does not know; not supported",
        ));
    }
    for (name, list) in [("nets", &e.nets), ("notNets", &e.not_nets)] {
        if list.len() > 256 {
            return Err(ctx.err(f(name), "at most 256 entries"));
        }
    }
    let nets = e
        .nets
        .iter()
        .enumerate()
        .map(|(i, n)| parse_net(ctx, &f(&format!("nets[{i}]")), n))
        .collect::<Result<Vec<_>, _>>()?;
    let not_nets = e
        .not_nets
        .iter()
        .enumerate()
        .map(|(i, n)| parse_net(ctx, &f(&format!("notNets[{i}]")), n))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(i) = not_nets.iter().position(|n| n.prefix_len() == 0) {
        return Err(ctx.err(
            f(&format!("notNets[{i}]")),
            "0.0.0.0/0 and ::/0 are not allowed in notNets",
        ));
    }
    for (name, list) in [("ports", &e.ports), ("notPorts", &e.not_ports)] {
        if list.len() > 50 {
            return Err(ctx.err(f(name), "at most 50 entries"));
        }
    }
    let (ports, named_ports) = parse_ports(ctx, &f("ports"), &e.ports)?;
    let (not_ports, not_named_ports) = parse_ports(ctx, &f("notPorts"), &e.not_ports)?;
    // Only numeric ports need a port-bearing protocol; a rule whose ports are all named needs
    // none (the named port carries its protocol).
    if (!ports.is_empty() || !not_ports.is_empty())
        && !matches!(
            protocol.map(Protocol::number),
            Some(6) | Some(17) | Some(132)
        )
    {
        return Err(ctx.err(
            f(if ports.is_empty() {
                "notPorts"
            } else {
                "ports"
            }),
            "numeric ports need protocol TCP, UDP or SCTP",
        ));
    }
    let sel = ctx.selector(&f("selector"), e.selector.as_deref())?;
    let not_sel = ctx.selector(&f("notSelector"), e.not_selector.as_deref())?;
    let ns_sel = ctx.selector(&f("namespaceSelector"), e.namespace_selector.as_deref())?;
    if sel.as_ref().is_some_and(Selector::uses_global) {
        return Err(ctx.err(f("selector"), "global() is not allowed in a rule selector"));
    }
    if let Some(ns) = &ns_sel
        && ns.uses_global()
        && *ns.expr() != Expr::Global
    {
        return Err(ctx.err(
            f("namespaceSelector"),
            "global() must be the whole expression",
        ));
    }
    // Effective positive selector (§1.3, 19). notSelector stays verbatim.
    let ns_label = "projectcalico.org/namespace".to_string();
    let ns_part: Option<Expr> = match (&ns_sel, namespace) {
        (Some(ns), _) => Some(
            ns.clone()
                .with_label_prefix("pcns.")
                .replace_all(&Expr::Has(ns_label.clone()))
                .replace_global(&Expr::Has(ns_label.clone()).negated())
                .into_expr(),
        ),
        (None, Some(ns)) if sel.is_some() || not_sel.is_some() => {
            Some(Expr::Eq(ns_label.clone(), ns.to_string()))
        }
        _ => None,
    };
    let selector = match (sel, ns_part) {
        (None, None) => None,
        (Some(s), None) => Some(s),
        (None, Some(ns)) => Some(Selector::from_expr(ns)),
        (Some(s), Some(ns)) => Some(Selector::from_expr(and(s.into_expr(), ns))),
    };
    Ok(Entity {
        nets,
        not_nets,
        selector,
        not_selector: not_sel,
        ports,
        not_ports,
        named_ports,
        not_named_ports,
    })
}

fn and(a: Expr, b: Expr) -> Expr {
    let mut parts = Vec::new();
    for e in [a, b] {
        match e {
            Expr::And(xs) => parts.extend(xs),
            Expr::All => {}
            other => parts.push(other),
        }
    }
    match parts.len() {
        0 => Expr::All,
        1 => parts.pop().unwrap_or(Expr::All),
        _ => Expr::And(parts),
    }
}

fn validate_tier(
    ctx: &Ctx,
    meta: &ObjectMeta,
    key: &str,
    spec: TierSpec,
) -> Result<Tier, ValidationError> {
    let name = validate_name(ctx, meta, key, 0)?;
    if let Some(o) = spec.order
        && !o.is_finite()
    {
        return Err(ctx.err("spec.order", "must be a finite number"));
    }
    let default_action = match spec.default_action {
        None | Some(TierDefaultAction::Deny) => TierDefault::Deny,
        Some(TierDefaultAction::Pass) => TierDefault::Pass,
    };
    for builtin in Tier::builtin() {
        if builtin.name == name
            && (builtin.order != spec.order || builtin.default_action != default_action)
        {
            return Err(ctx.err(
                "spec",
                format!(
                    "built-in tier {name:?} must have order {:?} and defaultAction {:?}",
                    builtin.order, builtin.default_action
                ),
            ));
        }
    }
    Ok(Tier {
        name,
        order: spec.order,
        default_action,
    })
}

fn validate_hep(
    ctx: &Ctx,
    meta: &ObjectMeta,
    key: &str,
    spec: HostEndpointSpec,
) -> Result<HostEndpoint, ValidationError> {
    let name = validate_name(ctx, meta, key, usize::MAX / 2)?;
    if spec.node.is_empty() {
        return Err(ctx.err("spec.node", "is required"));
    }
    let interface_name = spec.interface_name.filter(|i| !i.is_empty());
    if let Some(i) = &interface_name
        && i != "*"
        && !is_interface_name(i)
    {
        return Err(ctx.err(
            "spec.interfaceName",
            format!("{i:?} is not \"*\" or an interface name ([a-zA-Z0-9_.-]{{1,15}})"),
        ));
    }
    if interface_name.is_none() && spec.expected_ips.is_empty() {
        return Err(ctx.err("spec", "needs interfaceName or expectedIPs"));
    }
    let expected_ips = spec
        .expected_ips
        .iter()
        .enumerate()
        .map(|(i, a)| {
            a.parse::<IpAddr>().map_err(|_| {
                ctx.err(
                    format!("spec.expectedIPs[{i}]"),
                    format!("{a:?} is not an IP address"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ports = spec
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| validate_endpoint_port(ctx, &format!("spec.ports[{i}]"), p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HostEndpoint {
        name,
        node: spec.node,
        interface_name,
        expected_ips,
        profiles: spec.profiles,
        labels: meta.labels.clone(),
        ports,
    })
}

/// A Calico WorkloadEndpoint as etcd holds it: the same endpoint a Pod gives on Kubernetes
/// (`workload::from_pod`), from the fields the CNI plugin wrote. None when it has no address.
fn validate_wep(
    ctx: &Ctx,
    meta: &ObjectMeta,
    key: &str,
    spec: WorkloadEndpointSpec,
) -> Result<Option<WorkloadEndpoint>, ValidationError> {
    let namespace = meta
        .namespace
        .clone()
        .or_else(|| key.split_once('/').map(|(ns, _)| ns.to_string()))
        .filter(|ns| !ns.is_empty())
        .ok_or_else(|| ctx.err("metadata.namespace", "a WorkloadEndpoint needs a namespace"))?;
    if spec.node.is_empty() {
        return Err(ctx.err("spec.node", "is required"));
    }
    let pod = if spec.pod.is_empty() {
        spec.workload.clone()
    } else {
        spec.pod.clone()
    };
    if pod.is_empty() {
        return Err(ctx.err("spec.pod", "is required (or spec.workload)"));
    }
    let mut ips = Vec::new();
    for (i, text) in spec.ip_networks.iter().enumerate() {
        let net: IpNet = text.trim().parse().map_err(|e| {
            ctx.err(
                format!("spec.ipNetworks[{i}]"),
                format!("{text:?} is not a CIDR: {e}"),
            )
        })?;
        if net.prefix_len() != net.max_prefix_len() {
            return Err(ctx.err(
                format!("spec.ipNetworks[{i}]"),
                format!("{text:?} is not a single address (/32 or /128)"),
            ));
        }
        if !ips.contains(&net) {
            ips.push(net);
        }
    }
    if ips.is_empty() {
        return Ok(None);
    }
    let interface_computed = spec.interface_name.is_empty();
    let interface_name = if interface_computed {
        workload::interface_name(DEFAULT_INTERFACE_PREFIX, &namespace, &pod)
    } else if is_interface_name(&spec.interface_name) {
        spec.interface_name.clone()
    } else {
        return Err(ctx.err(
            "spec.interfaceName",
            format!(
                "{:?} is not an interface name ([a-zA-Z0-9_.-]{{1,15}})",
                spec.interface_name
            ),
        ));
    };
    let mut ports = Vec::new();
    for (i, p) in spec
        .ports
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.name.is_empty())
    {
        let raw = WireEndpointPort {
            name: p.name.clone(),
            protocol: p
                .protocol
                .clone()
                .unwrap_or_else(|| NumOrString::Str("TCP".into())),
            port: p.port,
        };
        let port = validate_endpoint_port(ctx, &format!("spec.ports[{i}]"), &raw)?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    let account = Some(spec.service_account_name.clone()).filter(|a| !a.is_empty());
    let orchestrator = Some(spec.orchestrator.clone())
        .filter(|o| !o.is_empty())
        .unwrap_or_else(|| "k8s".into());
    let labels =
        workload::endpoint_labels(&meta.labels, &namespace, &orchestrator, account.as_deref());
    Ok(Some(WorkloadEndpoint {
        namespace,
        pod,
        node: spec.node,
        interface_name,
        interface_computed,
        ips,
        labels,
        profiles: spec.profiles,
        ports,
        service_account: account,
    }))
}

/// A Calico Profile. wiremesh applies profiles the way Kubernetes uses them: labels to apply,
/// and rules that allow everything (`kns.*`) or nothing (`ksa.*`); other rules are not
/// supported yet (reported; the profile is skipped, so its endpoints get no profile allow).
fn validate_profile(
    ctx: &Ctx,
    meta: &ObjectMeta,
    key: &str,
    spec: ProfileSpec,
) -> Result<Profile, ValidationError> {
    let name = validate_name(ctx, meta, key, usize::MAX / 2)?;
    let allow_all = |dir: &str, rules: &[wire::common::Rule]| -> Result<bool, ValidationError> {
        match rules {
            [] => Ok(false),
            [only] if *only == allow_everything() => Ok(true),
            _ => Err(ctx.unsupported(
                format!("spec.{dir}"),
                "profile rules other than a single `action: Allow` are not supported yet",
            )),
        }
    };
    Ok(Profile {
        allow_ingress: allow_all("ingress", &spec.ingress)?,
        allow_egress: allow_all("egress", &spec.egress)?,
        labels_to_apply: spec.labels_to_apply,
        name,
    })
}

/// The rule `{action: Allow}` and nothing else.
fn allow_everything() -> wire::common::Rule {
    wire::common::Rule {
        action: Action::Allow,
        protocol: None,
        not_protocol: None,
        ip_version: None,
        icmp: None,
        not_icmp: None,
        source: None,
        destination: None,
        http: None,
        metadata: None,
    }
}

/// An interface name as Calico's endpoints take it: `[a-zA-Z0-9_.-]{1,15}`.
fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// A HostEndpoint named port, `{name, protocol, port}` (Calico's EndpointPort). Several entries
/// may share a name (e.g. `dns` on UDP and TCP 53), as Calico allows.
fn validate_endpoint_port(
    ctx: &Ctx,
    field: &str,
    raw: &WireEndpointPort,
) -> Result<EndpointPort, ValidationError> {
    let f = |sub: &str| format!("{field}.{sub}");
    if !is_port_name(&raw.name) {
        return Err(ctx.err(
            f("name"),
            format!(
                "{:?} is not a port name ([a-zA-Z0-9_.-]{{1,128}})",
                raw.name
            ),
        ));
    }
    let protocol = parse_protocol(ctx, &f("protocol"), &raw.protocol)?;
    let protocol = match protocol.number() {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        132 => Protocol::Sctp,
        _ => return Err(ctx.err(f("protocol"), "must be TCP, UDP or SCTP")),
    };
    let port = u16::try_from(raw.port)
        .ok()
        .filter(|p| *p >= 1)
        .ok_or_else(|| ctx.err(f("port"), format!("{} is not in 1..65535", raw.port)))?;
    Ok(EndpointPort {
        name: raw.name.clone(),
        protocol,
        port,
    })
}

fn validate_netset(
    ctx: &Ctx,
    meta: &ObjectMeta,
    key: &str,
    spec_nets: &[String],
) -> Result<NetworkSet, ValidationError> {
    let name = validate_name(ctx, meta, key, usize::MAX / 2)?;
    let namespace = if ctx.kind == Kind::NetworkSet {
        Some(
            meta.namespace
                .clone()
                .or_else(|| key.split_once('/').map(|(ns, _)| ns.to_string()))
                .filter(|ns| !ns.is_empty())
                .ok_or_else(|| ctx.err("metadata.namespace", "a NetworkSet needs a namespace"))?,
        )
    } else {
        None
    };
    let mut nets = Vec::new();
    for (i, n) in spec_nets.iter().enumerate() {
        let net = parse_net(ctx, &format!("spec.nets[{i}]"), n)?;
        // Kernel interval sets cannot hold /0: store it as two /1s.
        if net.prefix_len() == 0 {
            nets.extend(net.subnets(1).into_iter().flatten());
        } else {
            nets.push(net);
        }
    }
    let mut labels = meta.labels.clone();
    if let Some(ns) = &namespace {
        labels.insert("projectcalico.org/namespace".into(), ns.clone());
    }
    Ok(NetworkSet {
        namespace,
        name,
        labels,
        nets,
    })
}

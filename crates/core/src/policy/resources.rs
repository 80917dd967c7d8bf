//! projectcalico.org/v3 policy resources as stored (Calico's field names), and their validation
//! into the domain types of [`super::model`]. An object that fails validation yields a
//! [`ValidationError`] naming the object and the field; the caller skips it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::model::{
    Action, EndpointPort, Entity, HostEndpoint, IcmpMatch, NetworkSet, Policy, PolicyKind,
    PortRange, Protocol, Rule, Tier, TierDefault,
};
use crate::model::Family;
use crate::selector::{Expr, Selector};

/// The kinds of policy resources we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    GlobalNetworkPolicy,
    NetworkPolicy,
    Tier,
    HostEndpoint,
    GlobalNetworkSet,
    NetworkSet,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::GlobalNetworkPolicy,
        Kind::NetworkPolicy,
        Kind::Tier,
        Kind::HostEndpoint,
        Kind::GlobalNetworkSet,
        Kind::NetworkSet,
    ];

    pub fn namespaced(self) -> bool {
        matches!(self, Kind::NetworkPolicy | Kind::NetworkSet)
    }

    /// The plural, lower-case name used in Calico's etcd keys.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::GlobalNetworkPolicy => "globalnetworkpolicies",
            Kind::NetworkPolicy => "networkpolicies",
            Kind::Tier => "tiers",
            Kind::HostEndpoint => "hostendpoints",
            Kind::GlobalNetworkSet => "globalnetworksets",
            Kind::NetworkSet => "networksets",
        }
    }

    pub fn from_kind_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.to_string() == name)
    }

    pub fn from_plural(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.plural() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

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
}

/// Raw policy resources as read from a datastore: the JSON object per kind, keyed by
/// `name` (cluster-scoped kinds) or `namespace/name`.
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

/// Validated resources; what failed is in `errors`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyResources {
    pub tiers: BTreeMap<String, Tier>,
    pub policies: Vec<Policy>,
    pub host_endpoints: Vec<HostEndpoint>,
    pub network_sets: Vec<NetworkSet>,
    pub errors: Vec<ValidationError>,
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

    /// Validates one object and adds it. `key` names it in errors if it has no name.
    pub fn add_value(
        &mut self,
        kind: Kind,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<(), ValidationError> {
        let err = |field: &str, message: String| ValidationError {
            kind,
            name: key.to_string(),
            field: field.into(),
            message,
        };
        if !value.is_object() {
            let what = value
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            return Err(err("object", format!("is not a JSON object: {what}")));
        }
        let meta: Metadata = match value.get("metadata") {
            Some(m) => {
                serde_json::from_value(m.clone()).map_err(|e| err("metadata", e.to_string()))?
            }
            None => Metadata::default(),
        };
        let mut ctx = Ctx {
            kind,
            name: meta.display_name(key),
        };
        if meta.name.is_empty() && !key.is_empty() {
            // The key is authoritative when the stored object lacks a name.
            ctx.name = key.to_string();
        }
        let spec = value
            .get("spec")
            .cloned()
            .unwrap_or(serde_json::Value::Object(Default::default()));
        match kind {
            Kind::GlobalNetworkPolicy | Kind::NetworkPolicy => {
                let spec: PolicySpec = ctx.decode(spec)?;
                let policy = validate_policy(&ctx, &meta, key, spec)?;
                self.policies.push(policy);
            }
            Kind::Tier => {
                let spec: TierSpec = ctx.decode(spec)?;
                let tier = validate_tier(&ctx, &meta, key, spec)?;
                self.tiers.insert(tier.name.clone(), tier);
            }
            Kind::HostEndpoint => {
                let spec: HostEndpointSpec = ctx.decode(spec)?;
                self.host_endpoints
                    .push(validate_hep(&ctx, &meta, key, spec)?);
            }
            Kind::GlobalNetworkSet | Kind::NetworkSet => {
                let spec: NetworkSetSpec = ctx.decode(spec)?;
                self.network_sets
                    .push(validate_netset(&ctx, &meta, key, spec)?);
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
    }
}

// ---------------------------------------------------------------------------------------------
// Raw serde types (Calico field names)

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Metadata {
    pub name: String,
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl Metadata {
    fn display_name(&self, key: &str) -> String {
        match (&self.namespace, self.name.is_empty()) {
            (_, true) => key.to_string(),
            (Some(ns), false) => format!("{ns}/{}", self.name),
            (None, false) => self.name.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct PolicySpec {
    pub tier: Option<String>,
    pub order: Option<f64>,
    pub selector: Option<String>,
    pub types: Option<Vec<String>>,
    pub ingress: Vec<RawRule>,
    pub egress: Vec<RawRule>,
    pub namespace_selector: Option<String>,
    pub service_account_selector: Option<String>,
    pub do_not_track: bool,
    #[serde(rename = "preDNAT")]
    pub pre_dnat: bool,
    pub apply_on_forward: bool,
    pub performance_hints: Vec<String>,
}

/// A number or a string (Calico's `numorstring`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum NumOrString {
    Num(i64),
    Str(String),
}

impl fmt::Display for NumOrString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NumOrString::Num(n) => write!(f, "{n}"),
            NumOrString::Str(s) => write!(f, "{s:?}"),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct RawRule {
    pub action: String,
    pub protocol: Option<NumOrString>,
    pub not_protocol: Option<NumOrString>,
    pub icmp: Option<RawIcmp>,
    #[serde(rename = "notICMP")]
    pub not_icmp: Option<RawIcmp>,
    pub ip_version: Option<u8>,
    pub source: RawEntity,
    pub destination: RawEntity,
    pub http: Option<serde_json::Value>,
    pub metadata: Option<RuleMetadata>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RuleMetadata {
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawIcmp {
    #[serde(rename = "type")]
    pub type_: Option<i64>,
    pub code: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct RawEntity {
    pub nets: Vec<String>,
    pub not_nets: Vec<String>,
    pub selector: Option<String>,
    pub not_selector: Option<String>,
    pub namespace_selector: Option<String>,
    pub ports: Vec<NumOrString>,
    pub not_ports: Vec<NumOrString>,
    pub service_accounts: Option<serde_json::Value>,
    pub services: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct TierSpec {
    pub order: Option<f64>,
    pub default_action: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct HostEndpointSpec {
    pub node: String,
    pub interface_name: Option<String>,
    #[serde(rename = "expectedIPs")]
    pub expected_ips: Vec<String>,
    pub profiles: Vec<String>,
    pub ports: Vec<serde_json::Value>,
}

/// A HostEndpoint `spec.ports[]` entry.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawEndpointPort {
    pub name: String,
    pub protocol: Option<NumOrString>,
    pub port: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct NetworkSetSpec {
    pub nets: Vec<String>,
    #[serde(rename = "allowedEgressDomains")]
    pub allowed_egress_domains: Vec<String>,
}

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
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        spec: serde_json::Value,
    ) -> Result<T, ValidationError> {
        serde_json::from_value(spec).map_err(|e| self.err("spec", e))
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
    meta: &Metadata,
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
    meta: &Metadata,
    key: &str,
    spec: PolicySpec,
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
    if kind == PolicyKind::Namespaced
        && (spec.do_not_track
            || spec.pre_dnat
            || spec.apply_on_forward
            || spec.namespace_selector.is_some())
    {
        return Err(ctx.err(
            "spec",
            "doNotTrack, preDNAT, applyOnForward and namespaceSelector are GlobalNetworkPolicy fields",
        ));
    }
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
    let (ingress_on, egress_on) = match &spec.types {
        None => (
            spec.egress.is_empty() || !spec.ingress.is_empty(),
            !spec.egress.is_empty(),
        ),
        Some(types) if types.is_empty() => (
            spec.egress.is_empty() || !spec.ingress.is_empty(),
            !spec.egress.is_empty(),
        ),
        Some(types) => {
            let mut seen = BTreeSet::new();
            for (i, t) in types.iter().enumerate() {
                if t != "Ingress" && t != "Egress" {
                    return Err(ctx.err(
                        format!("spec.types[{i}]"),
                        format!("{t:?} is not Ingress or Egress"),
                    ));
                }
                if !seen.insert(t.as_str()) {
                    return Err(
                        ctx.err(format!("spec.types[{i}]"), format!("duplicate type {t:?}"))
                    );
                }
            }
            (seen.contains("Ingress"), seen.contains("Egress"))
        }
    };
    if spec.do_not_track && spec.pre_dnat {
        return Err(ctx.err("spec", "doNotTrack and preDNAT cannot both be set"));
    }
    if spec.pre_dnat && (egress_on || !spec.egress.is_empty()) {
        return Err(ctx.err(
            "spec.egress",
            "a preDNAT policy cannot have egress rules or the Egress type",
        ));
    }
    if (spec.do_not_track || spec.pre_dnat) && !spec.apply_on_forward {
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
    let rules = |dir: &str, raw: &[RawRule]| -> Result<Vec<Rule>, ValidationError> {
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
        selects_host_endpoints,
        ingress: ingress_on.then_some(ingress),
        egress: egress_on.then_some(egress),
        do_not_track: spec.do_not_track,
        pre_dnat: spec.pre_dnat,
        apply_on_forward: spec.apply_on_forward,
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
    r: &RawRule,
) -> Result<Rule, ValidationError> {
    let f = |sub: &str| format!("{field}.{sub}");
    let action = match r.action.as_str() {
        "Allow" => Action::Allow,
        "Deny" => Action::Deny,
        "Log" => Action::Log,
        "Pass" => Action::Pass,
        other => {
            return Err(ctx.err(
                f("action"),
                format!("{other:?} is not Allow, Deny, Log or Pass"),
            ));
        }
    };
    if r.http.is_some() {
        return Err(ctx.err(
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
    let icmp = |name: &str, raw: &Option<RawIcmp>| -> Result<Option<IcmpMatch>, ValidationError> {
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
    let source = validate_entity(ctx, &f("source"), namespace, &r.source, protocol)?;
    let destination = validate_entity(ctx, &f("destination"), namespace, &r.destination, protocol)?;
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
    e: &RawEntity,
    protocol: Option<Protocol>,
) -> Result<Entity, ValidationError> {
    let f = |sub: &str| format!("{field}.{sub}");
    if e.services.is_some() {
        return Err(ctx.err(
            f("services"),
            "Kubernetes service matches are not supported by wiremesh",
        ));
    }
    if e.service_accounts.is_some() {
        return Err(ctx.err(
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
    meta: &Metadata,
    key: &str,
    spec: TierSpec,
) -> Result<Tier, ValidationError> {
    let name = validate_name(ctx, meta, key, 0)?;
    if let Some(o) = spec.order
        && !o.is_finite()
    {
        return Err(ctx.err("spec.order", "must be a finite number"));
    }
    let default_action = match spec.default_action.as_deref() {
        None | Some("Deny") => TierDefault::Deny,
        Some("Pass") => TierDefault::Pass,
        Some(other) => {
            return Err(ctx.err(
                "spec.defaultAction",
                format!("{other:?} is not Deny or Pass"),
            ));
        }
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
    meta: &Metadata,
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
        && !(i.len() <= 15
            && i.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)))
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

/// A HostEndpoint named port, `{name, protocol, port}` (Calico's EndpointPort). Several entries
/// may share a name (e.g. `dns` on UDP and TCP 53), as Calico allows.
fn validate_endpoint_port(
    ctx: &Ctx,
    field: &str,
    value: &serde_json::Value,
) -> Result<EndpointPort, ValidationError> {
    let raw: RawEndpointPort =
        serde_json::from_value(value.clone()).map_err(|e| ctx.err(field, e))?;
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
    let protocol = match &raw.protocol {
        None => return Err(ctx.err(f("protocol"), "is required (TCP, UDP or SCTP)")),
        Some(p) => parse_protocol(ctx, &f("protocol"), p)?,
    };
    let protocol = match protocol.number() {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        132 => Protocol::Sctp,
        _ => return Err(ctx.err(f("protocol"), "must be TCP, UDP or SCTP")),
    };
    let port = raw
        .port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p >= 1)
        .ok_or_else(|| match raw.port {
            None => ctx.err(f("port"), "is required (1..65535)"),
            Some(p) => ctx.err(f("port"), format!("{p} is not in 1..65535")),
        })?;
    Ok(EndpointPort {
        name: raw.name,
        protocol,
        port,
    })
}

fn validate_netset(
    ctx: &Ctx,
    meta: &Metadata,
    key: &str,
    spec: NetworkSetSpec,
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
    for (i, n) in spec.nets.iter().enumerate() {
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

//! The effective configuration: every setting the agent reads from FelixConfiguration, built
//! once from `default` then `node.<nodename>` over Calico's defaults, each field validated here.
//! A bad field is reported and keeps its last valid value ([`LastValid`]); where there never
//! was one, the layer below applies.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::model::{Family, FelixConfigurations};
use crate::policy::program::{EndpointToHostAction, FailsafePort, PolicySettings};
use crate::wire::felix::{DecodedFelix, ProtoPort, shown_at, top_level};
use crate::wire::{FelixConfigurationSpec, did_you_mean, field_names};

pub const DEFAULT_INTERFACE_V4: &str = "wireguard.cali";
pub const DEFAULT_INTERFACE_V6: &str = "wg-v6.cali";
pub const DEFAULT_PORT_V4: u16 = 51820;
pub const DEFAULT_PORT_V6: u16 = 51821;
pub const DEFAULT_RULE_PRIORITY: u32 = 99;
/// Felix's WireGuard mark bit with the default mark mask `0xffff0000` (see docs/marks.md).
pub const DEFAULT_FWMARK: u32 = 0x0020_0000;
/// Felix takes the first index of `RouteTableRanges` (1-250): table 1.
pub const DEFAULT_ROUTING_TABLE: u32 = 1;
/// Protocol number stamped on every route we program, so we only ever delete our own
/// (Calico uses 3 "boot"; we pick an otherwise unused value to be able to tell ours apart).
pub const ROUTE_PROTOCOL: u8 = 87;
/// Overhead of WireGuard over IPv4 / IPv6 underlays (Felix: host MTU - 60 / - 80).
pub const MTU_OVERHEAD_V4: u32 = 60;
pub const MTU_OVERHEAD_V6: u32 = 80;
/// Felix's fallback host MTU when no interface matches its pattern.
pub const FALLBACK_HOST_MTU: u32 = 1460;

/// A FelixConfiguration field that failed validation, or a likely misspelt one. It is reported
/// and does not take effect; what applies instead is in [`Fallback`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("FelixConfiguration {object}: field {field}{}: {reason}; {fallback}", value_text(.value))]
pub struct ConfigFieldError {
    pub object: String,
    /// The field's path in the spec, e.g. `wireguardMTU` or `failsafeInboundHostPorts[1].port`
    /// (`spec` when the whole object does not decode).
    pub field: String,
    /// The value as written, as JSON text cut to a readable length (none for a whole object).
    pub value: Option<String>,
    pub reason: String,
    pub fallback: Fallback,
}

impl ConfigFieldError {
    /// What is wrong, without what applies instead (for tools that check a file).
    pub fn problem(&self) -> String {
        format!(
            "FelixConfiguration {}: field {}{}: {}",
            self.object,
            self.field,
            value_text(&self.value),
            self.reason
        )
    }
}

fn value_text(value: &Option<String>) -> String {
    value
        .as_ref()
        .map(|v| format!(" = {v}"))
        .unwrap_or_default()
}

/// What applies in place of a field that does not take effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The field's last valid value in this object stays in force.
    LastValid,
    /// There never was a valid one: `default`'s value (for a node object) or Calico's default.
    LayerBelow,
    /// The field is not one wiremesh reads (a misspelling of one it does).
    Ignored,
}

impl std::fmt::Display for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Fallback::LastValid => "its last valid value stays in force",
            Fallback::LayerBelow => "no valid value was seen before, so the layer below applies",
            Fallback::Ignored => "the field is ignored",
        })
    }
}

/// The fields that switch protection on. Once one is `true` in an object it stays on until
/// that object says `false`: removing the field, or deleting the object (a `kubectl delete` of
/// an old manifest, an etcd restored from an empty backup), keeps it on and is reported.
pub const PROTECTION_SWITCHES: [&str; 4] = [
    "wireguardEnabled",
    "wireguardEnabledV6",
    "wireguardHostEncryptionEnabled",
    "wiremeshStrictEncryption",
];

/// The last valid value of every field of the FelixConfiguration objects a node reads, so that
/// an invalid field (or an object that no longer decodes) keeps what was in force instead of
/// falling back to a default: input can never turn encryption off, only a valid
/// `wireguardEnabled: false` can. Removing another field is valid and is forgotten; a removed
/// [protection switch](PROTECTION_SWITCHES) that was on stays on.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct LastValid {
    objects: BTreeMap<String, Map<String, Value>>,
}

/// Everything the agent reads from FelixConfiguration, for one node.
#[derive(Debug, Clone, PartialEq)]
pub struct EffectiveConfig {
    pub wireguard: WireguardSettings,
    /// Host-endpoint policy's failsafe ports.
    pub failsafe_inbound: Vec<FailsafePort>,
    pub failsafe_outbound: Vec<FailsafePort>,
    /// Prefix of `Log` rules' kernel log lines.
    pub log_prefix: String,
    /// Prefixes of pods' host-side interfaces (`interfacePrefix`).
    pub interface_prefixes: Vec<String>,
    /// `defaultEndpointToHostAction`.
    pub endpoint_to_host: EndpointToHostAction,
    /// The fields that do not take effect as written, and why.
    pub errors: Vec<ConfigFieldError>,
    /// Fields that are not Felix fields at all (see [`unknown_fields`]).
    pub unknown_fields: Vec<UnknownField>,
}

/// A field that no Felix has, in a FelixConfiguration object: ignored, worth a warning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "FelixConfiguration {object}: field {field} is not a FelixConfiguration field; it is ignored"
)]
pub struct UnknownField {
    pub object: String,
    pub field: String,
}

impl Default for EffectiveConfig {
    fn default() -> Self {
        let policy = PolicySettings::default();
        EffectiveConfig {
            wireguard: WireguardSettings::default(),
            failsafe_inbound: policy.failsafe_inbound,
            failsafe_outbound: policy.failsafe_outbound,
            log_prefix: policy.log_prefix,
            interface_prefixes: policy.workload_prefixes,
            endpoint_to_host: policy.endpoint_to_host,
            errors: Vec::new(),
            unknown_fields: Vec::new(),
        }
    }
}

impl EffectiveConfig {
    /// The configuration of node `node_name`: defaults, then `default`, then
    /// `node.<node_name>`, with no memory of earlier values (tools that look from outside).
    pub fn for_node(node_name: &str, configs: &FelixConfigurations) -> EffectiveConfig {
        EffectiveConfig::for_node_remembering(node_name, configs, &mut LastValid::default())
    }

    /// As [`EffectiveConfig::for_node`], for the agent: an invalid field, or an object that
    /// does not decode, keeps its last valid value from `last`, which is updated.
    pub fn for_node_remembering(
        node_name: &str,
        configs: &FelixConfigurations,
        last: &mut LastValid,
    ) -> EffectiveConfig {
        let node_object = format!("node.{node_name}");
        let mut specs = Vec::new();
        let mut errors = Vec::new();
        let mut unknown = Vec::new();
        for name in ["default", node_object.as_str()] {
            let Some(stored) = configs.get(name) else {
                let mut kept = Map::new();
                errors.extend(keep_switches_on(
                    name,
                    last.objects.get(name),
                    &mut kept,
                    "the object was deleted",
                ));
                if kept.is_empty() {
                    last.objects.remove(name);
                } else {
                    specs.push((name, spec_of(&kept)));
                    last.objects.insert(name.to_string(), kept);
                }
                continue;
            };
            let (spec, mut found) = last.resolve(name, stored);
            errors.append(&mut found);
            if let Ok(decoded) = stored {
                unknown.extend(
                    unknown_fields(decoded)
                        .into_iter()
                        .map(|field| UnknownField {
                            object: name.to_string(),
                            field,
                        }),
                );
            }
            specs.push((name, spec));
        }
        last.objects
            .retain(|name, _| name == "default" || *name == node_object);
        let layers: Vec<(&str, &FelixConfigurationSpec)> =
            specs.iter().map(|(name, spec)| (*name, spec)).collect();
        let mut config = EffectiveConfig::merge(&layers);
        errors.append(&mut config.errors);
        config.errors = errors;
        config.unknown_fields = unknown;
        config
    }

    /// Each layer's valid fields override the layer below; each invalid one is reported and
    /// ignored.
    pub fn merge(layers: &[(&str, &FelixConfigurationSpec)]) -> EffectiveConfig {
        let mut out = EffectiveConfig::default();
        for (object, spec) in layers {
            let mut errors = Vec::new();
            let mut err = |field: &str, reason: String| errors.push((field.to_string(), reason));
            out.wireguard.apply(spec, &mut err);
            for (field, value, target) in [
                (
                    "failsafeInboundHostPorts",
                    &spec.failsafe_inbound_host_ports,
                    &mut out.failsafe_inbound,
                ),
                (
                    "failsafeOutboundHostPorts",
                    &spec.failsafe_outbound_host_ports,
                    &mut out.failsafe_outbound,
                ),
            ] {
                if let Some(list) = value {
                    match failsafe_ports(list) {
                        Ok(ports) => *target = ports,
                        Err((at, reason)) => err(&format!("{field}{at}"), reason),
                    }
                }
            }
            if let Some(prefix) = spec.log_prefix.as_ref().filter(|p| !p.is_empty()) {
                out.log_prefix = prefix.clone();
            }
            if let Some(list) = spec.interface_prefix.as_ref().filter(|p| !p.is_empty()) {
                match interface_prefixes(list) {
                    Ok(prefixes) => out.interface_prefixes = prefixes,
                    Err(reason) => err("interfacePrefix", reason),
                }
            }
            if let Some(action) = spec
                .default_endpoint_to_host_action
                .as_ref()
                .filter(|a| !a.is_empty())
            {
                match EndpointToHostAction::parse(action) {
                    Some(a) => out.endpoint_to_host = a,
                    None => err(
                        "defaultEndpointToHostAction",
                        format!("{action:?} is not Drop, Return or Accept"),
                    ),
                }
            }
            out.errors
                .extend(errors.into_iter().map(|(field, reason)| ConfigFieldError {
                    object: (*object).to_string(),
                    value: field_value(spec, &field),
                    field,
                    reason,
                    fallback: Fallback::LayerBelow,
                }));
        }
        out
    }

    /// The policy settings these give (the agent adds the WireGuard ports it listens on).
    pub fn policy_settings(&self, wireguard_ports: Vec<u16>) -> PolicySettings {
        PolicySettings {
            failsafe_inbound: self.failsafe_inbound.clone(),
            failsafe_outbound: self.failsafe_outbound.clone(),
            wireguard_ports,
            log_prefix: self.log_prefix.clone(),
            workload_prefixes: self.interface_prefixes.clone(),
            endpoint_to_host: self.endpoint_to_host,
            pods: true,
        }
    }
}

impl LastValid {
    /// The spec object `name` takes effect with, and what is wrong with it: its valid fields
    /// as stored, and for each invalid one the last valid value when there was one.
    fn resolve(
        &mut self,
        name: &str,
        stored: &Result<DecodedFelix, String>,
    ) -> (FelixConfigurationSpec, Vec<ConfigFieldError>) {
        let remembered = self.objects.get(name);
        let fallback =
            |field: &str| match remembered.is_some_and(|r| r.contains_key(top_level(field))) {
                true => Fallback::LastValid,
                false => Fallback::LayerBelow,
            };
        let decoded = match stored {
            Ok(decoded) => decoded,
            Err(reason) => {
                // Nothing of it can be trusted: the whole object as it last was stays.
                let error = ConfigFieldError {
                    object: name.to_string(),
                    field: "spec".into(),
                    value: None,
                    reason: reason.clone(),
                    fallback: match remembered {
                        Some(_) => Fallback::LastValid,
                        None => Fallback::LayerBelow,
                    },
                };
                let spec = remembered.map(spec_of).unwrap_or_default();
                return (spec, vec![error]);
            }
        };
        let mut errors: Vec<ConfigFieldError> = decoded
            .invalid
            .iter()
            .map(|invalid| ConfigFieldError {
                object: name.to_string(),
                field: invalid.field.clone(),
                value: Some(invalid.value.clone()),
                reason: invalid.reason.clone(),
                fallback: fallback(&invalid.field),
            })
            .collect();
        for mut error in EffectiveConfig::merge(&[(name, &decoded.spec)]).errors {
            error.fallback = fallback(&error.field);
            errors.push(error);
        }
        errors.extend(unknown_field_errors(name, decoded));
        let invalid: BTreeSet<&str> = errors
            .iter()
            .filter(|e| e.fallback != Fallback::Ignored)
            .map(|e| top_level(&e.field))
            .collect();
        let mut fields = fields_of(&decoded.spec);
        for field in &invalid {
            fields.remove(*field);
            if let Some(value) = remembered.and_then(|r| r.get(*field)) {
                fields.insert((*field).to_string(), value.clone());
            }
        }
        errors.extend(keep_switches_on(
            name,
            remembered,
            &mut fields,
            "the field was removed",
        ));
        let spec = spec_of(&fields);
        self.objects.insert(name.to_string(), fields);
        (spec, errors)
    }
}

/// Puts back into `fields` every [protection switch](PROTECTION_SWITCHES) that was `true` in
/// `remembered` and is absent now (`why`), and reports each.
fn keep_switches_on(
    object: &str,
    remembered: Option<&Map<String, Value>>,
    fields: &mut Map<String, Value>,
    why: &str,
) -> Vec<ConfigFieldError> {
    let mut errors = Vec::new();
    for switch in PROTECTION_SWITCHES {
        let was_on = remembered.and_then(|r| r.get(switch)) == Some(&Value::Bool(true));
        if was_on && !fields.contains_key(switch) {
            fields.insert(switch.to_string(), Value::Bool(true));
            errors.push(ConfigFieldError {
                object: object.to_string(),
                field: switch.to_string(),
                value: None,
                reason: format!("{why} while it was true; only `{switch}: false` switches it off"),
                fallback: Fallback::LastValid,
            });
        }
    }
    errors
}

/// The fields of `decoded` that no Felix has and that look like a misspelling of one wiremesh
/// reads (`wireguardEnabeld`): the author meant something that does not take effect. Other
/// unknown fields go to [`unknown_fields`].
fn unknown_field_errors(name: &str, decoded: &DecodedFelix) -> Vec<ConfigFieldError> {
    let ours = field_names::<FelixConfigurationSpec>();
    decoded
        .unknown_fields
        .iter()
        .filter(|field| !is_felix_field(field))
        .filter_map(|field| {
            let meant = did_you_mean(field, &ours)?;
            Some(ConfigFieldError {
                object: name.to_string(),
                field: field.clone(),
                value: None,
                reason: format!("unknown field (did you mean {meant}?)"),
                fallback: Fallback::Ignored,
            })
        })
        .collect()
}

/// Fields of `decoded` that are neither read by wiremesh nor a Felix field at all (a newer
/// Calico's, or a typo of a field wiremesh does not read): worth a warning, not a degraded
/// status. Felix fields wiremesh does not read are not listed.
pub fn unknown_fields(decoded: &DecodedFelix) -> Vec<String> {
    let ours = field_names::<FelixConfigurationSpec>();
    decoded
        .unknown_fields
        .iter()
        .filter(|field| !is_felix_field(field) && did_you_mean(field, &ours).is_none())
        .cloned()
        .collect()
}

/// Every top-level field of Calico's `FelixConfigurationSpec` (projectcalico/calico,
/// api/pkg/apis/projectcalico/v3/felixconfig.go), one per line.
const FELIX_FIELDS: &str = include_str!("wire/felix_fields.txt");

fn is_felix_field(field: &str) -> bool {
    FELIX_FIELDS.lines().any(|known| known == field)
}

/// The fields a spec sets, by their JSON names.
fn fields_of(spec: &FelixConfigurationSpec) -> Map<String, Value> {
    match serde_json::to_value(spec) {
        Ok(Value::Object(fields)) => fields,
        _ => Map::new(),
    }
}

/// A spec from fields that were all valid once (so they decode again).
fn spec_of(fields: &Map<String, Value>) -> FelixConfigurationSpec {
    serde_json::from_value(Value::Object(fields.clone())).unwrap_or_default()
}

/// The value a spec holds at a field path, shown as in reports.
fn field_value(spec: &FelixConfigurationSpec, path: &str) -> Option<String> {
    shown_at(&fields_of(spec), path)
}

/// Every problem with one stored FelixConfiguration on its own, as the agent would report it
/// the first time it sees it (for the policy tools and `lab set`).
pub fn check_object(name: &str, stored: &Result<DecodedFelix, String>) -> Vec<ConfigFieldError> {
    LastValid::default().resolve(name, stored).1
}

/// A whole failsafe list, or the first bad entry (`[i].field`, why): a list is taken or left as
/// a whole, never half.
fn failsafe_ports(list: &[ProtoPort]) -> Result<Vec<FailsafePort>, (String, String)> {
    list.iter()
        .enumerate()
        .map(|(i, entry)| {
            FailsafePort::try_from(entry).map_err(|(field, why)| (format!("[{i}].{field}"), why))
        })
        .collect()
}

/// Effective settings for one family's device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilySettings {
    pub enabled: bool,
    pub interface_name: String,
    pub listening_port: u16,
    /// 0 = auto (host MTU minus the family's overhead).
    pub mtu: u32,
}

/// Effective WireGuard settings for this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireguardSettings {
    pub v4: FamilySettings,
    pub v6: FamilySettings,
    pub routing_rule_priority: u32,
    pub keepalive: Duration,
    pub host_encryption: bool,
    /// Drop, instead of sending in clear, pod traffic to encrypting nodes that would leave
    /// outside the WireGuard device (`wiremeshStrictEncryption`).
    pub strict: bool,
    /// Rotate each key once it is this old (`wiremeshKeyRotationInterval`); `None` = never.
    pub key_rotation: Option<Duration>,
}

impl Default for WireguardSettings {
    fn default() -> Self {
        WireguardSettings {
            v4: FamilySettings {
                enabled: false,
                interface_name: DEFAULT_INTERFACE_V4.into(),
                listening_port: DEFAULT_PORT_V4,
                mtu: 0,
            },
            v6: FamilySettings {
                enabled: false,
                interface_name: DEFAULT_INTERFACE_V6.into(),
                listening_port: DEFAULT_PORT_V6,
                mtu: 0,
            },
            routing_rule_priority: DEFAULT_RULE_PRIORITY,
            keepalive: Duration::ZERO,
            host_encryption: false,
            strict: false,
            key_rotation: None,
        }
    }
}

impl WireguardSettings {
    /// The families WireGuard is on for, IPv4 first.
    pub fn enabled_families(&self) -> impl Iterator<Item = Family> + '_ {
        Family::ALL.into_iter().filter(|f| self.family(*f).enabled)
    }

    pub fn family(&self, family: Family) -> &FamilySettings {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }

    /// Overrides each field `spec` sets validly; reports each invalid one to `err`.
    fn apply(&mut self, spec: &FelixConfigurationSpec, err: &mut impl FnMut(&str, String)) {
        if let Some(v) = spec.wireguard_enabled {
            self.v4.enabled = v;
        }
        if let Some(v) = spec.wireguard_enabled_v6 {
            self.v6.enabled = v;
        }
        if let Some(name) = &spec.wireguard_interface_name {
            match validate_interface_name(name) {
                Ok(()) => self.v4.interface_name = name.clone(),
                Err(reason) => err("wireguardInterfaceName", reason),
            }
        }
        if let Some(name) = &spec.wireguard_interface_name_v6 {
            match validate_interface_name(name) {
                Ok(()) => self.v6.interface_name = name.clone(),
                Err(reason) => err("wireguardInterfaceNameV6", reason),
            }
        }
        if let Some(port) = spec.wireguard_listening_port {
            match u16::try_from(port).ok().filter(|p| *p >= 1) {
                Some(p) => self.v4.listening_port = p,
                None => err(
                    "wireguardListeningPort",
                    format!("{port} is not in 1-65535"),
                ),
            }
        }
        if let Some(port) = spec.wireguard_listening_port_v6 {
            match u16::try_from(port).ok().filter(|p| *p >= 1) {
                Some(p) => self.v6.listening_port = p,
                None => err(
                    "wireguardListeningPortV6",
                    format!("{port} is not in 1-65535"),
                ),
            }
        }
        if let Some(mtu) = spec.wireguard_mtu {
            match validate_mtu(mtu) {
                Ok(m) => self.v4.mtu = m,
                Err(reason) => err("wireguardMTU", reason),
            }
        }
        if let Some(mtu) = spec.wireguard_mtu_v6 {
            match validate_mtu(mtu) {
                Ok(m) => self.v6.mtu = m,
                Err(reason) => err("wireguardMTUV6", reason),
            }
        }
        if let Some(prio) = spec.wireguard_routing_rule_priority {
            match u32::try_from(prio).ok().filter(|p| (1..=32765).contains(p)) {
                Some(p) => self.routing_rule_priority = p,
                None => err(
                    "wireguardRoutingRulePriority",
                    format!("{prio} is not in 1-32765"),
                ),
            }
        }
        if let Some(text) = &spec.wireguard_keep_alive {
            match parse_go_duration(text) {
                Ok(d) => self.keepalive = d,
                Err(reason) => err("wireguardKeepAlive", reason),
            }
        }
        if let Some(v) = spec.wireguard_host_encryption_enabled {
            self.host_encryption = v;
        }
        if let Some(v) = spec.wiremesh_strict_encryption {
            self.strict = v;
        }
        if let Some(text) = &spec.wiremesh_key_rotation_interval {
            match parse_go_duration(text) {
                Ok(d) if d.is_zero() => self.key_rotation = None,
                Ok(d) if d < MIN_KEY_ROTATION => err(
                    "wiremeshKeyRotationInterval",
                    format!("{text:?} is shorter than {}s", MIN_KEY_ROTATION.as_secs()),
                ),
                Ok(d) => self.key_rotation = Some(d),
                Err(reason) => err("wiremeshKeyRotationInterval", reason),
            }
        }
    }
}

/// The shortest scheduled key rotation: every rotation costs each peer a moment of loss.
const MIN_KEY_ROTATION: Duration = Duration::from_secs(3600);

/// Calico's interface-name rule: `^[a-zA-Z0-9:._+-]{1,15}$`.
/// `interfacePrefix`: comma-separated, each 1-15 of letters, digits, `_` and `-`.
fn interface_prefixes(list: &str) -> Result<Vec<String>, String> {
    let prefixes: Vec<String> = list.split(',').map(str::to_string).collect();
    let ok = |p: &String| {
        (1..=15).contains(&p.len())
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
    };
    match prefixes.iter().find(|p| !ok(p)) {
        Some(bad) => Err(format!(
            "{bad:?} is not an interface prefix (1-15 of letters, digits, _ and -; prefixes are separated by commas)"
        )),
        None => Ok(prefixes),
    }
}

fn validate_interface_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '.' | '_' | '+' | '-'));
    if name.is_empty() || name.len() > 15 || !ok_chars {
        return Err(format!(
            "{name:?} is not a valid interface name (1-15 of letters, digits and :._+-)"
        ));
    }
    Ok(())
}

fn validate_mtu(mtu: i32) -> Result<u32, String> {
    // 0 means auto; otherwise the IPv4 minimum (68) up to the largest jumbo frame.
    match u32::try_from(mtu) {
        Ok(0) => Ok(0),
        Ok(m) if (68..=65535).contains(&m) => Ok(m),
        _ => Err(format!("{mtu} is not 0 (auto) or in 68-65535")),
    }
}

/// Parses a Go `time.Duration` string as Calico writes them: `0`, `25s`, `1m30s`, `500ms`, `1.5h`.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() || text.starts_with('-') {
        return Err(format!(
            "{text:?} is not a non-negative duration such as 25s"
        ));
    }
    let mut rest = text.trim_start_matches('+');
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{text:?}: number without a unit (s, m, h, ms)"))?;
        let (number, after) = rest.split_at(number_len);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{text:?}: {number:?} is not a number"))?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, tail) = after.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => {
                return Err(format!(
                    "{text:?}: unknown unit {unit:?} (use ns, us, ms, s, m, h)"
                ));
            }
        };
        total += value * scale;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_calico() {
        let EffectiveConfig {
            wireguard: s,
            errors,
            ..
        } = EffectiveConfig::merge(&[]);
        assert!(errors.is_empty());
        assert!(!s.v4.enabled && !s.v6.enabled);
        assert_eq!(s.v4.interface_name, "wireguard.cali");
        assert_eq!(s.v6.interface_name, "wg-v6.cali");
        assert_eq!((s.v4.listening_port, s.v6.listening_port), (51820, 51821));
        assert_eq!(s.routing_rule_priority, 99);
        assert_eq!(s.keepalive, Duration::ZERO);
        assert_eq!((s.v4.mtu, s.v6.mtu), (0, 0));
    }

    #[test]
    fn node_layer_overrides_default_layer() {
        let default = FelixConfigurationSpec {
            wireguard_enabled: Some(true),
            wireguard_listening_port: Some(5000),
            wireguard_keep_alive: Some("25s".into()),
            ..Default::default()
        };
        let node = FelixConfigurationSpec {
            wireguard_enabled: Some(false),
            ..Default::default()
        };
        let EffectiveConfig {
            wireguard: s,
            errors,
            ..
        } = EffectiveConfig::merge(&[("default", &default), ("node.n1", &node)]);
        assert!(errors.is_empty());
        assert!(!s.v4.enabled);
        assert_eq!(s.v4.listening_port, 5000);
        assert_eq!(s.keepalive, Duration::from_secs(25));
    }

    #[test]
    fn invalid_fields_are_reported_and_ignored() {
        let default = FelixConfigurationSpec {
            wireguard_listening_port: Some(4000),
            ..Default::default()
        };
        let node = FelixConfigurationSpec {
            wireguard_listening_port: Some(70000),
            wireguard_interface_name: Some("this-name-is-far-too-long".into()),
            wireguard_routing_rule_priority: Some(0),
            wireguard_keep_alive: Some("ten seconds".into()),
            wireguard_mtu: Some(20),
            ..Default::default()
        };
        let EffectiveConfig {
            wireguard: s,
            errors,
            ..
        } = EffectiveConfig::merge(&[("default", &default), ("node.n1", &node)]);
        assert_eq!(
            s.v4.listening_port, 4000,
            "the valid lower layer still applies"
        );
        assert_eq!(s.v4.interface_name, "wireguard.cali");
        assert_eq!(s.routing_rule_priority, 99);
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "wireguardInterfaceName",
                "wireguardListeningPort",
                "wireguardMTU",
                "wireguardRoutingRulePriority",
                "wireguardKeepAlive"
            ]
        );
        assert!(errors.iter().all(|e| e.object == "node.n1"));
    }

    #[test]
    fn calico_field_names_decode() {
        let json = r#"{"wireguardEnabled":true,"wireguardEnabledV6":false,"wireguardMTU":1400,
            "wireguardMTUV6":1380,"wireguardInterfaceNameV6":"wg1","wireguardListeningPortV6":28151,
            "wireguardKeepAlive":"1m30s","wireguardHostEncryptionEnabled":true,
            "logSeverityScreen":"Info","bpfEnabled":false}"#;
        let spec: FelixConfigurationSpec = serde_json::from_str(json).expect("decodes");
        let EffectiveConfig {
            wireguard: s,
            errors,
            ..
        } = EffectiveConfig::merge(&[("default", &spec)]);
        assert!(errors.is_empty());
        assert!(s.v4.enabled && s.host_encryption);
        assert_eq!((s.v4.mtu, s.v6.mtu), (1400, 1380));
        assert_eq!(s.v6.interface_name, "wg1");
        assert_eq!(s.v6.listening_port, 28151);
        assert_eq!(s.keepalive, Duration::from_secs(90));
    }

    fn stored(spec: serde_json::Value) -> Result<DecodedFelix, String> {
        FelixConfigurationSpec::from_object(&serde_json::json!({ "spec": spec }))
    }

    fn configs(default: serde_json::Value) -> FelixConfigurations {
        [("default".to_string(), stored(default))].into()
    }

    #[test]
    fn an_invalid_field_keeps_its_last_valid_value_and_costs_nothing_else() {
        let mut last = LastValid::default();
        let on = configs(serde_json::json!({"wireguardEnabled": true, "wireguardMTU": 1380}));
        let config = EffectiveConfig::for_node_remembering("n1", &on, &mut last);
        assert!(config.errors.is_empty() && config.wireguard.v4.enabled);

        // A wrongly typed MTU and a non-boolean switch: both keep what was in force.
        let bad = configs(serde_json::json!({
            "wireguardEnabled": "maybe", "wireguardMTU": "1400", "wireguardKeepAlive": "25s"
        }));
        let config = EffectiveConfig::for_node_remembering("n1", &bad, &mut last);
        assert!(config.wireguard.v4.enabled, "encryption stays on");
        assert_eq!(config.wireguard.v4.mtu, 1380);
        assert_eq!(
            config.wireguard.keepalive,
            Duration::from_secs(25),
            "valid fields apply"
        );
        let shown: Vec<String> = config.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "FelixConfiguration default: field wireguardEnabled = \"maybe\": invalid type: string \"maybe\", expected a boolean; its last valid value stays in force",
                "FelixConfiguration default: field wireguardMTU = \"1400\": invalid type: string \"1400\", expected i32; its last valid value stays in force",
            ]
        );

        // A restart with the remembered values (serialised) keeps them too.
        let json = serde_json::to_string(&last).expect("serialises");
        let mut restarted: LastValid = serde_json::from_str(&json).expect("reads back");
        let config = EffectiveConfig::for_node_remembering("n1", &bad, &mut restarted);
        assert!(config.wireguard.v4.enabled);

        // Out of range is as invalid as a wrong type.
        let huge = configs(serde_json::json!({"wireguardEnabled": true, "wireguardMTU": 1e20}));
        let config = EffectiveConfig::for_node_remembering("n1", &huge, &mut last);
        assert_eq!(config.wireguard.v4.mtu, 1380);
        assert_eq!(config.errors[0].value.as_deref(), Some("1e+20"));

        // Removing the switch keeps it on (reported); other removed fields are forgotten.
        let removed = configs(serde_json::json!({}));
        let config = EffectiveConfig::for_node_remembering("n1", &removed, &mut last);
        assert!(config.wireguard.v4.enabled, "a removed switch stays on");
        assert_eq!(config.wireguard.v4.mtu, 0, "the removed MTU is forgotten");
        assert_eq!(
            config.errors[0].to_string(),
            "FelixConfiguration default: field wireguardEnabled: the field was removed while it was true; only `wireguardEnabled: false` switches it off; its last valid value stays in force"
        );

        // Only a valid false turns it off; then removing the field is quiet.
        let off = configs(serde_json::json!({"wireguardEnabled": false}));
        let config = EffectiveConfig::for_node_remembering("n1", &off, &mut last);
        assert!(!config.wireguard.v4.enabled && config.errors.is_empty());
        let config = EffectiveConfig::for_node_remembering("n1", &removed, &mut last);
        assert!(!config.wireguard.v4.enabled && config.errors.is_empty());
    }

    #[test]
    fn deleting_an_object_keeps_its_protection_switches_on() {
        let mut last = LastValid::default();
        let on = configs(serde_json::json!({
            "wireguardEnabled": true, "wiremeshStrictEncryption": true,
            "wireguardEnabledV6": false, "wireguardMTU": 1380
        }));
        EffectiveConfig::for_node_remembering("n1", &on, &mut last);
        let config = EffectiveConfig::for_node_remembering("n1", &BTreeMap::new(), &mut last);
        assert!(config.wireguard.v4.enabled && config.wireguard.strict);
        assert_eq!(config.wireguard.v4.mtu, 0, "the rest is forgotten");
        let fields: Vec<&str> = config.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["wireguardEnabled", "wiremeshStrictEncryption"]);
        assert!(
            config.errors[0]
                .reason
                .starts_with("the object was deleted")
        );
        // Still so after a restart, and once the object is back with false, off it goes.
        let json = serde_json::to_string(&last).expect("serialises");
        let mut restarted: LastValid = serde_json::from_str(&json).expect("reads back");
        let config = EffectiveConfig::for_node_remembering("n1", &BTreeMap::new(), &mut restarted);
        assert!(config.wireguard.v4.enabled);
        let off = configs(serde_json::json!({
            "wireguardEnabled": false, "wiremeshStrictEncryption": false
        }));
        let config = EffectiveConfig::for_node_remembering("n1", &off, &mut restarted);
        assert!(!config.wireguard.v4.enabled && !config.wireguard.strict);
        assert!(config.errors.is_empty());
        // A node object that opted out (false) is simply forgotten when deleted.
        let mut node_off = configs(serde_json::json!({"wireguardEnabled": true}));
        node_off.insert(
            "node.n1".into(),
            stored(serde_json::json!({"wireguardEnabled": false})),
        );
        let config = EffectiveConfig::for_node_remembering("n1", &node_off, &mut restarted);
        assert!(!config.wireguard.v4.enabled);
        node_off.remove("node.n1");
        let config = EffectiveConfig::for_node_remembering("n1", &node_off, &mut restarted);
        assert!(config.wireguard.v4.enabled && config.errors.is_empty());
    }

    #[test]
    fn without_a_valid_value_before_the_layer_below_applies() {
        let mut last = LastValid::default();
        let mut both = configs(serde_json::json!({"wireguardEnabled": true}));
        both.insert(
            "node.n1".into(),
            stored(serde_json::json!({"wireguardEnabled": "no"})),
        );
        let config = EffectiveConfig::for_node_remembering("n1", &both, &mut last);
        assert!(config.wireguard.v4.enabled, "default's value applies");
        assert_eq!(config.errors.len(), 1);
        assert_eq!(config.errors[0].object, "node.n1");
        assert_eq!(config.errors[0].fallback, Fallback::LayerBelow);
    }

    #[test]
    fn an_undecodable_object_keeps_its_last_valid_version() {
        let mut last = LastValid::default();
        let on = configs(serde_json::json!({"wireguardEnabled": true}));
        EffectiveConfig::for_node_remembering("n1", &on, &mut last);
        let garbage: FelixConfigurations =
            [("default".to_string(), Err("is not valid JSON".to_string()))].into();
        let config = EffectiveConfig::for_node_remembering("n1", &garbage, &mut last);
        assert!(config.wireguard.v4.enabled);
        assert_eq!(config.errors[0].field, "spec");
        assert_eq!(config.errors[0].fallback, Fallback::LastValid);
        // Deleting the object keeps the switch that was on, and only that.
        let config = EffectiveConfig::for_node_remembering("n1", &BTreeMap::new(), &mut last);
        assert!(config.wireguard.v4.enabled);
        assert_eq!(config.errors.len(), 1);
        assert_eq!(config.errors[0].field, "wireguardEnabled");
    }

    #[test]
    fn a_bad_failsafe_entry_keeps_the_whole_last_valid_list() {
        let mut last = LastValid::default();
        let good = configs(serde_json::json!({"failsafeInboundHostPorts": [{"port": 22}]}));
        EffectiveConfig::for_node_remembering("n1", &good, &mut last);
        let bad = configs(serde_json::json!({
            "failsafeInboundHostPorts": [{"port": 22}, {"port": 70000}]
        }));
        let config = EffectiveConfig::for_node_remembering("n1", &bad, &mut last);
        assert_eq!(config.failsafe_inbound.len(), 1);
        assert_eq!(config.errors[0].field, "failsafeInboundHostPorts[1].port");
        assert_eq!(config.errors[0].value.as_deref(), Some("70000"));
    }

    #[test]
    fn unknown_fields_are_sorted_by_what_they_likely_are() {
        let config = EffectiveConfig::for_node(
            "n1",
            &configs(serde_json::json!({
                "wireguardEnabeld": false, "bpfEnabled": false, "madeUpSetting": 1
            })),
        );
        let errors: Vec<String> = config.errors.iter().map(|e| e.problem()).collect();
        assert_eq!(
            errors,
            [
                "FelixConfiguration default: field wireguardEnabeld: unknown field (did you mean wireguardEnabled?)"
            ]
        );
        assert_eq!(config.errors[0].fallback, Fallback::Ignored);
        let unknown: Vec<&str> = config
            .unknown_fields
            .iter()
            .map(|u| u.field.as_str())
            .collect();
        assert_eq!(
            unknown,
            ["madeUpSetting"],
            "Felix's own bpfEnabled is not reported"
        );
    }

    #[test]
    fn a_long_bad_value_is_shown_cut() {
        let long = "x".repeat(500);
        let config = EffectiveConfig::for_node(
            "n1",
            &configs(serde_json::json!({"wireguardEnabled": long})),
        );
        let value = config.errors[0].value.clone().expect("a value");
        assert_eq!(value.chars().count(), 65, "64 characters and an ellipsis");
        assert!(value.ends_with('…'));
    }

    #[test]
    fn wiremesh_own_settings() {
        let config = EffectiveConfig::for_node(
            "n1",
            &configs(serde_json::json!({
                "wiremeshStrictEncryption": true, "wiremeshKeyRotationInterval": "720h"
            })),
        );
        assert!(config.errors.is_empty(), "{:?}", config.errors);
        assert!(config.wireguard.strict);
        assert_eq!(
            config.wireguard.key_rotation,
            Some(Duration::from_secs(720 * 3600))
        );
        let config = EffectiveConfig::for_node(
            "n1",
            &configs(serde_json::json!({"wiremeshKeyRotationInterval": "5m"})),
        );
        assert_eq!(config.wireguard.key_rotation, None);
        assert_eq!(config.errors[0].field, "wiremeshKeyRotationInterval");
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("1h2m3s"), Ok(Duration::from_secs(3723)));
        assert_eq!(parse_go_duration("1.5m"), Ok(Duration::from_secs(90)));
        for bad in ["", "25", "-5s", "5 s", "5x", "s"] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn interface_names() {
        assert!(validate_interface_name("wireguard.cali").is_ok());
        assert!(validate_interface_name("wg0").is_ok());
        assert!(validate_interface_name("").is_err());
        assert!(validate_interface_name("a/b").is_err());
        assert!(validate_interface_name("0123456789abcdef").is_err());
    }
}

//! The effective configuration: every setting the agent reads from FelixConfiguration, built
//! once from `default` then `node.<nodename>` over Calico's defaults, each field validated here
//! (a bad one is reported and the layer below applies).

use std::time::Duration;

use crate::model::{Family, FelixConfigurations};
use crate::policy::program::{FailsafePort, PolicySettings};
use crate::wire::FelixConfigurationSpec;
use crate::wire::felix::ProtoPort;

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

/// A FelixConfiguration field that failed validation; it is ignored (the lower layer's value or
/// the default applies) and reported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("FelixConfiguration {object}: field {field}: {reason}")]
pub struct ConfigFieldError {
    pub object: String,
    /// The field's path in the spec, e.g. `wireguardMTU` or `failsafeInboundHostPorts[1].port`
    /// (`spec` when the whole object does not decode).
    pub field: String,
    pub reason: String,
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
    /// The fields that were ignored, and why.
    pub errors: Vec<ConfigFieldError>,
}

impl Default for EffectiveConfig {
    fn default() -> Self {
        let policy = PolicySettings::default();
        EffectiveConfig {
            wireguard: WireguardSettings::default(),
            failsafe_inbound: policy.failsafe_inbound,
            failsafe_outbound: policy.failsafe_outbound,
            log_prefix: policy.log_prefix,
            errors: Vec::new(),
        }
    }
}

impl EffectiveConfig {
    /// The configuration of node `node_name`: defaults, then `default`, then
    /// `node.<node_name>`. An object that does not decode is reported and its layer skipped.
    pub fn for_node(node_name: &str, configs: &FelixConfigurations) -> EffectiveConfig {
        let node_object = format!("node.{node_name}");
        let mut layers = Vec::new();
        let mut errors = Vec::new();
        for name in ["default", node_object.as_str()] {
            match configs.get(name) {
                Some(Ok(spec)) => layers.push((name, spec)),
                Some(Err(reason)) => errors.push(ConfigFieldError {
                    object: name.to_string(),
                    field: "spec".into(),
                    reason: reason.clone(),
                }),
                None => {}
            }
        }
        let mut config = EffectiveConfig::merge(&layers);
        errors.append(&mut config.errors);
        config.errors = errors;
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
            out.errors
                .extend(errors.into_iter().map(|(field, reason)| ConfigFieldError {
                    object: (*object).to_string(),
                    field,
                    reason,
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
            ..PolicySettings::default()
        }
    }
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
        }
    }
}

impl WireguardSettings {
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
    }
}

/// Calico's interface-name rule: `^[a-zA-Z0-9:._+-]{1,15}$`.
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

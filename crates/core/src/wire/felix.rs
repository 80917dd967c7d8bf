//! `FelixConfiguration` (cluster-scoped; `default` for the cluster, `node.<name>` per node).
//!
//! Every field wiremesh reads is typed with Calico's name, type and range; every other Felix
//! field is accepted as is (`x-kubernetes-preserve-unknown-fields`), so Calico's own manifests
//! apply unchanged. `config::EffectiveConfig` validates and layers them (`default`, then
//! `node.<name>`); a bad field is reported, not fatal.

use kube_derive::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Linux interface names as Felix validates them.
const INTERFACE_NAME_PATTERN: &str = r"^[a-zA-Z0-9:._+-]{1,15}$";
/// `interfacePrefix`: comma-separated prefixes, as Felix validates them.
const INTERFACE_PREFIX_PATTERN: &str = r"^[a-zA-Z0-9_-]{1,15}(,[a-zA-Z0-9_-]{1,15})*$";
/// `defaultEndpointToHostAction`, in any case (Calico's CRD says `^(?i)(Drop|Accept|Return)?$`;
/// spelt out here because JSON Schema's regex dialect has no `(?i)`).
const ENDPOINT_TO_HOST_PATTERN: &str =
    r"^([Dd][Rr][Oo][Pp]|[Aa][Cc][Cc][Ee][Pp][Tt]|[Rr][Ee][Tt][Uu][Rr][Nn])?$";
/// Go durations as Calico's CRD accepts them (`25s`, `1m30s`, `0`).
const DURATION_PATTERN: &str = r"^(0|([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+)$";

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    crates(kube_core = "::kube_core"),
    group = "projectcalico.org",
    version = "v3",
    kind = "FelixConfiguration",
    plural = "felixconfigurations",
    doc = "Felix settings: `default` for the cluster, `node.<nodename>` for one node",
    printcolumn = r#"{"name": "WireGuard", "type": "boolean", "jsonPath": ".spec.wireguardEnabled", "description": "IPv4 WireGuard encryption on"}"#,
    printcolumn = r#"{"name": "WireGuardV6", "type": "boolean", "jsonPath": ".spec.wireguardEnabledV6", "description": "IPv6 WireGuard encryption on"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct FelixConfigurationSpec {
    /// Turns on IPv4 WireGuard (default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wireguard_enabled: Option<bool>,
    /// Turns on IPv6 WireGuard (default false).
    #[serde(rename = "wireguardEnabledV6", skip_serializing_if = "Option::is_none")]
    pub wireguard_enabled_v6: Option<bool>,
    /// UDP port of the IPv4 device and of every IPv4 peer (default 51820).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub wireguard_listening_port: Option<i32>,
    /// UDP port of the IPv6 device and of every IPv6 peer (default 51821).
    #[serde(
        rename = "wireguardListeningPortV6",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 65535))]
    pub wireguard_listening_port_v6: Option<i32>,
    /// Priority of the WireGuard routing rule, for both families (default 99).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 32765))]
    pub wireguard_routing_rule_priority: Option<i32>,
    /// Name of the IPv4 device (default wireguard.cali).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = INTERFACE_NAME_PATTERN))]
    pub wireguard_interface_name: Option<String>,
    /// Name of the IPv6 device (default wg-v6.cali).
    #[serde(
        rename = "wireguardInterfaceNameV6",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(regex(pattern = INTERFACE_NAME_PATTERN))]
    pub wireguard_interface_name_v6: Option<String>,
    /// MTU of the IPv4 device; 0 = auto (host MTU - 60).
    #[serde(rename = "wireguardMTU", skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub wireguard_mtu: Option<i32>,
    /// MTU of the IPv6 device; 0 = auto (host MTU - 80).
    #[serde(rename = "wireguardMTUV6", skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub wireguard_mtu_v6: Option<i32>,
    /// Also encrypt host-to-host traffic (default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wireguard_host_encryption_enabled: Option<bool>,
    /// PersistentKeepalive of every peer as a Go duration; 0 = off.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub wireguard_keep_alive: Option<String>,
    /// Threaded NAPI on the device (accepted; not used by wiremesh).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wireguard_threading_enabled: Option<bool>,
    /// Inbound host ports always allowed, whatever host policy says (Felix's defaults: SSH,
    /// DHCP, BGP, etcd, the Kubernetes API); `[]` allows none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failsafe_inbound_host_ports: Option<Vec<ProtoPort>>,
    /// Outbound host ports always allowed (Felix's defaults: DNS, DHCP, BGP, etcd, the
    /// Kubernetes API); `[]` allows none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failsafe_outbound_host_ports: Option<Vec<ProtoPort>>,
    /// Prefix of the kernel log lines of `Log` rules (default `calico-packet`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_prefix: Option<String>,
    /// Prefixes of pods' host-side interfaces, comma-separated (default `cali`; `eni` beside
    /// the Amazon VPC CNI, ...). A pod's interface is the first prefix and 11 hex digits of
    /// SHA-1 of `<namespace>.<pod>`, as Calico's CNI names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = INTERFACE_PREFIX_PATTERN))]
    pub interface_prefix: Option<String>,
    /// What happens to a pod's traffic to its own host once the pod's egress policy allowed
    /// it: `Drop`, `Return` (on to the host's rules) or `Accept` (wiremesh's default, as every
    /// Calico manifest sets it).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = ENDPOINT_TO_HOST_PATTERN))]
    pub default_endpoint_to_host_action: Option<String>,
    /// wiremesh's own (not a Felix field): drop pod traffic to nodes that encrypt when it would
    /// leave outside the WireGuard device (start-up, restart, a daemon that died), instead of
    /// sending it in clear (default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wiremesh_strict_encryption: Option<bool>,
    /// wiremesh's own: rotate each node's WireGuard key once it is this old, as a Go duration
    /// (at least 1h; `0` or absent = never; `wiremesh rotate-key` rotates on demand).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub wiremesh_key_rotation_interval: Option<String>,
}

/// A failsafe port: protocol (TCP or UDP, any case; default TCP), port, and optionally the
/// network it is limited to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtoPort {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = FAILSAFE_PROTOCOL_PATTERN))]
    pub protocol: Option<String>,
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// A CIDR or address; empty or absent for any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net: Option<String>,
}

/// TCP or UDP in any case, as Felix accepts them.
const FAILSAFE_PROTOCOL_PATTERN: &str = r"^([tT][cC][pP]|[uU][dD][pP])$";

/// A stored FelixConfiguration decoded field by field: one bad field costs that field, not
/// the object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DecodedFelix {
    /// Every field that decodes.
    pub spec: FelixConfigurationSpec,
    /// The fields that do not, with what they hold and why.
    pub invalid: Vec<InvalidField>,
    /// Top-level fields no wiremesh type has (Felix has many wiremesh does not read; a typo of
    /// one it does is among them).
    pub unknown_fields: Vec<String>,
}

impl From<FelixConfigurationSpec> for DecodedFelix {
    fn from(spec: FelixConfigurationSpec) -> Self {
        DecodedFelix {
            spec,
            ..DecodedFelix::default()
        }
    }
}

/// A field that does not decode: its path in the spec (`wireguardMTU`,
/// `failsafeInboundHostPorts[1].port`), its value as written (shortened) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidField {
    pub field: String,
    pub value: String,
    pub reason: String,
}

/// How much of a bad value a report shows.
const SHOWN_VALUE: usize = 64;

/// `value` as JSON text, cut to [`SHOWN_VALUE`] characters.
pub fn shown(value: &serde_json::Value) -> String {
    let text = value.to_string();
    if text.chars().count() <= SHOWN_VALUE {
        return text;
    }
    let cut: String = text.chars().take(SHOWN_VALUE).collect();
    format!("{cut}…")
}

impl FelixConfigurationSpec {
    /// The spec of a stored FelixConfiguration (its JSON object, as etcd or the API server
    /// holds it): the one decoder both datastores use, field by field. No spec is an empty
    /// spec; a field that does not decode is left out and listed; unknown fields are listed.
    /// Only a value that is not an object at all fails as a whole.
    pub fn from_object(object: &serde_json::Value) -> Result<DecodedFelix, String> {
        use serde_json::Value;
        let kind = super::json_kind;
        let Value::Object(fields) = object else {
            return Err(format!("is not a JSON object but {}", kind(object)));
        };
        let mut spec = match fields.get("spec") {
            None | Some(Value::Null) => return Ok(DecodedFelix::default()),
            Some(Value::Object(spec)) => spec.clone(),
            Some(other) => return Err(format!("spec is not an object but {}", kind(other))),
        };
        let mut invalid = Vec::new();
        // Each failed decode names one field; take it out and decode the rest again.
        loop {
            match super::decode::<FelixConfigurationSpec>(&Value::Object(spec.clone())) {
                Ok(decoded) => {
                    let unknown_fields = decoded
                        .unknown_fields
                        .iter()
                        .filter(|f| !f.contains(['.', '[']))
                        .cloned()
                        .collect();
                    return Ok(DecodedFelix {
                        spec: decoded.value,
                        invalid,
                        unknown_fields,
                    });
                }
                Err(e) => {
                    let value = shown_at(&spec, &e.path);
                    if spec.remove(top_level(&e.path)).is_none() {
                        return Err(format!("does not decode: {e}"));
                    }
                    invalid.push(InvalidField {
                        field: e.path.clone(),
                        value: value.unwrap_or_default(),
                        reason: e.message,
                    });
                }
            }
        }
    }
}

/// The field of the spec a path is in (`failsafeInboundHostPorts[1].port` ->
/// `failsafeInboundHostPorts`).
pub fn top_level(path: &str) -> &str {
    path.split(['.', '[']).next().unwrap_or(path)
}

/// The value at the spec path `path` (`failsafeInboundHostPorts[1].port`) among the spec's
/// `fields`, as reports show it; the whole top-level field when the path goes nowhere.
pub fn shown_at(fields: &serde_json::Map<String, serde_json::Value>, path: &str) -> Option<String> {
    let top = top_level(path);
    let value = fields.get(top)?;
    let pointer = path
        .strip_prefix(top)
        .unwrap_or_default()
        .replace('[', "/")
        .replace(']', "")
        .replace('.', "/");
    Some(shown(value.pointer(&pointer).unwrap_or(value)))
}

//! `FelixConfiguration` (cluster-scoped; `default` for the cluster, `node.<name>` per node).
//!
//! The WireGuard fields are typed with Calico's names, types and ranges; every other Felix
//! field is accepted as is (`x-kubernetes-preserve-unknown-fields`), so Calico's own manifests
//! apply unchanged. The agent itself reads these objects untyped and decodes the WireGuard part
//! with [`crate::config::FelixConfigurationSpec`] (a bad field is reported, not fatal).

use kube_derive::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Linux interface names as Felix validates them.
pub const INTERFACE_NAME_PATTERN: &str = r"^[a-zA-Z0-9:._+-]{1,15}$";
/// Go durations as Calico's CRD accepts them (`25s`, `1m30s`, `0`).
pub const DURATION_PATTERN: &str = r"^(0|([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+)$";

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
}

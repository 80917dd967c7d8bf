//! Kubernetes- and netlink-free domain types shared by every layer.
//!
//! Raw datastore objects (`NodeResource`) are turned into validated values (`WgKey`, `IpNet`)
//! by [`crate::mesh`]; nothing here does I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::wire::RawPolicyResources;
use crate::wire::felix::DecodedFelix;

/// A WireGuard public key (Curve25519 point), 32 bytes, shown as standard base64.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WgKey(pub [u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    #[error("not valid base64: {0}")]
    Base64(String),
    #[error("decodes to {0} bytes, a WireGuard key has 32")]
    Length(usize),
    #[error("is the all-zero key")]
    Zero,
}

impl WgKey {
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses the 64-character lowercase hex form used by the UAPI and netlink.
    pub fn from_hex(text: &str) -> Result<Self, KeyParseError> {
        if text.len() != 64 {
            return Err(KeyParseError::Length(text.len() / 2));
        }
        let mut out = [0u8; 32];
        for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
            let pair =
                std::str::from_utf8(chunk).map_err(|e| KeyParseError::Base64(e.to_string()))?;
            out[i] =
                u8::from_str_radix(pair, 16).map_err(|e| KeyParseError::Base64(e.to_string()))?;
        }
        Ok(WgKey(out))
    }
}

impl FromStr for WgKey {
    type Err = KeyParseError;

    /// Strict parse of a published key: standard base64 of exactly 32 bytes, not all zero
    /// (Felix treats the zero key as "no key").
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bytes = BASE64
            .decode(text.trim())
            .map_err(|e| KeyParseError::Base64(e.to_string()))?;
        let array: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyParseError::Length(bytes.len()))?;
        if array == [0u8; 32] {
            return Err(KeyParseError::Zero);
        }
        Ok(WgKey(array))
    }
}

impl fmt::Display for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgKey({})", self.to_base64())
    }
}

impl Serialize for WgKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for WgKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// IP family of a WireGuard device; each family has its own device, port and key publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of_addr(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub fn of_net(net: &IpNet) -> Family {
        Family::of_addr(&net.addr())
    }

    /// The host prefix length (/32 or /128).
    pub fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// What the datastore holds about one node, before validation. Every field is kept as the raw
/// text the datastore had so that a malformed value can be reported, not lost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeResource {
    pub name: String,
    /// Underlay addresses (Calico `spec.bgp.ipv4Address`/`ipv6Address`, or the Node's InternalIP),
    /// possibly with a prefix length, which is dropped.
    pub ipv4_address: Option<String>,
    pub ipv6_address: Option<String>,
    /// Pod CIDRs (block affinities in etcd, `spec.podCIDRs` in Kubernetes).
    pub pod_cidrs: Vec<String>,
    /// When each pod CIDR (as written in `pod_cidrs`) was claimed, in the datastore's own order:
    /// the affinity key's create revision in etcd, the Node's creation time (Unix seconds) in
    /// Kubernetes. Of two nodes claiming overlapping CIDRs the older claim wins; a CIDR
    /// without an entry counts as the newest.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_cidr_claimed_at: BTreeMap<String, u64>,
    pub wireguard_public_key: Option<String>,
    pub wireguard_public_key_v6: Option<String>,
    pub wireguard_interface_ipv4_address: Option<String>,
    pub wireguard_interface_ipv6_address: Option<String>,
    /// A problem the datastore adapter found while decoding this node (for example unparseable
    /// JSON); the node is then skipped and this is reported.
    pub decode_error: Option<String>,
}

impl NodeResource {
    pub fn public_key(&self, family: Family) -> Option<&str> {
        match family {
            Family::V4 => self.wireguard_public_key.as_deref(),
            Family::V6 => self.wireguard_public_key_v6.as_deref(),
        }
        .filter(|k| !k.trim().is_empty())
    }

    pub fn underlay_address(&self, family: Family) -> Option<&str> {
        match family {
            Family::V4 => self.ipv4_address.as_deref(),
            Family::V6 => self.ipv6_address.as_deref(),
        }
        .filter(|a| !a.trim().is_empty())
    }

    pub fn interface_address(&self, family: Family) -> Option<&str> {
        match family {
            Family::V4 => self.wireguard_interface_ipv4_address.as_deref(),
            Family::V6 => self.wireguard_interface_ipv6_address.as_deref(),
        }
        .filter(|a| !a.trim().is_empty())
    }
}

/// What this agent publishes on its own node object, per family. `None` clears the field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedWireguard {
    pub public_key_v4: Option<WgKey>,
    pub public_key_v6: Option<WgKey>,
    pub interface_ipv4_address: Option<IpAddr>,
    pub interface_ipv6_address: Option<IpAddr>,
}

impl PublishedWireguard {
    /// Whether the node object already carries exactly these values.
    pub fn matches(&self, node: &NodeResource) -> bool {
        fn same<T: ToString>(want: &Option<T>, have: Option<&str>) -> bool {
            match (want, have) {
                (None, None) => true,
                (Some(w), Some(h)) => w.to_string() == h.trim(),
                _ => false,
            }
        }
        same(&self.public_key_v4, node.public_key(Family::V4))
            && same(&self.public_key_v6, node.public_key(Family::V6))
            && same(
                &self.interface_ipv4_address,
                node.interface_address(Family::V4),
            )
            && same(
                &self.interface_ipv6_address,
                node.interface_address(Family::V6),
            )
    }
}

/// A consistent view of everything the datastore holds that the agent needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterSnapshot {
    pub nodes: BTreeMap<String, NodeResource>,
    /// FelixConfiguration specs by name (`default`, `node.<name>`).
    pub felix_configurations: FelixConfigurations,
    /// True once every initial list has completed; nothing is pruned before that.
    pub synced: bool,
    /// Host-endpoint policy resources, raw JSON per kind (validated by `policy`).
    pub policy: RawPolicyResources,
}

/// FelixConfigurations by name as a datastore holds them: the decoded spec, or why it does not
/// decode (`config::EffectiveConfig` layers and validates them).
pub type FelixConfigurations = BTreeMap<String, Result<DecodedFelix, String>>;

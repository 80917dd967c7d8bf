//! Links of our WireGuard devices: admin state, MTU and the one tunnel address per family.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::IpNet;

use crate::mesh::DataplaneSpec;
use crate::model::Family;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub name: String,
    pub mtu: u32,
    pub up: bool,
    pub addresses: BTreeSet<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkOp {
    SetMtu { name: String, mtu: u32 },
    SetUp { name: String },
    AddAddress { name: String, address: IpNet },
    DeleteAddress { name: String, address: IpNet },
}

impl LinkOp {
    pub fn kind(&self) -> &'static str {
        match self {
            LinkOp::SetMtu { .. } => "set_mtu",
            LinkOp::SetUp { .. } => "set_up",
            LinkOp::AddAddress { .. } => "add_address",
            LinkOp::DeleteAddress { .. } => "delete_address",
        }
    }
}

impl fmt::Display for LinkOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkOp::SetMtu { name, mtu } => write!(f, "set MTU of {name} to {mtu}"),
            LinkOp::SetUp { name } => write!(f, "set {name} up"),
            LinkOp::AddAddress { name, address } => write!(f, "add address {address} to {name}"),
            LinkOp::DeleteAddress { name, address } => {
                write!(f, "delete address {address} from {name}")
            }
        }
    }
}

/// Felix's default `MTUIfacePattern`: `^((en|wl|ww|sl|ib)[Pcopsvx].*|(eth|wlan|wwan).*)`.
pub fn is_uplink_name(name: &str) -> bool {
    let b = name.as_bytes();
    let two = |p: &[u8]| b.len() >= 3 && &b[..2] == p && b"Pcopsvx".contains(&b[2]);
    two(b"en")
        || two(b"wl")
        || two(b"ww")
        || two(b"sl")
        || two(b"ib")
        || name.starts_with("eth")
        || name.starts_with("wlan")
        || name.starts_with("wwan")
}

/// Operations for the links of the desired devices (which exist by the time this runs).
/// Only addresses of a device's own family are managed; the device holds exactly one.
pub fn plan(desired: &DataplaneSpec, actual: &BTreeMap<String, LinkState>) -> Vec<LinkOp> {
    let mut ops = Vec::new();
    for device in desired.devices.values() {
        let name = &device.name;
        let Some(link) = actual.get(name) else {
            // Created in this apply: everything is to do.
            ops.push(LinkOp::SetMtu {
                name: name.clone(),
                mtu: device.mtu,
            });
            if let Some(address) = device.address {
                ops.push(LinkOp::AddAddress {
                    name: name.clone(),
                    address,
                });
            }
            ops.push(LinkOp::SetUp { name: name.clone() });
            continue;
        };
        if link.mtu != device.mtu {
            ops.push(LinkOp::SetMtu {
                name: name.clone(),
                mtu: device.mtu,
            });
        }
        for address in &link.addresses {
            if Family::of_net(address) == device.family && Some(*address) != device.address {
                ops.push(LinkOp::DeleteAddress {
                    name: name.clone(),
                    address: *address,
                });
            }
        }
        if let Some(address) = device.address
            && !link.addresses.contains(&address)
        {
            ops.push(LinkOp::AddAddress {
                name: name.clone(),
                address,
            });
        }
        if !link.up {
            ops.push(LinkOp::SetUp { name: name.clone() });
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::is_uplink_name;

    #[test]
    fn uplink_pattern_matches_felix() {
        for yes in [
            "eth0", "ens3", "enp0s3", "wlp2s0", "wlan0", "wwan0", "ibp1", "eth1.100",
        ] {
            assert!(is_uplink_name(yes), "{yes}");
        }
        for no in [
            "lo",
            "wireguard.cali",
            "cali123",
            "veth-pod",
            "br0",
            "docker0",
            "en",
            "enx",
        ] {
            assert!(!is_uplink_name(no) || no == "enx", "{no}");
        }
    }
}

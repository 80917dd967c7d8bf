//! Links of our WireGuard devices over rtnetlink: MTU, admin state, the tunnel address, and the
//! host MTU (the smallest MTU among the up uplinks).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use async_trait::async_trait;
use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::{LinkFlags, State};
use rtnetlink::{Handle, LinkUnspec};
use wiremesh_core::dataplane::link::{LinkOp, LinkState, is_uplink_name};

use crate::DataplaneError;
use crate::netlink::{
    NetlinkError, get_link, ignore_errno, link_addresses, link_index, link_mtu, link_name,
    link_oper_state,
};

#[async_trait]
pub trait LinkDataplane: Send {
    /// The links among `names` that exist.
    async fn observe(
        &mut self,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, LinkState>, DataplaneError>;
    /// Smallest MTU among the oper-up uplinks (Felix's `MTUIfacePattern`), if any.
    async fn host_mtu(&mut self) -> Result<Option<u32>, DataplaneError>;
    async fn apply(&mut self, ops: &[LinkOp]) -> Result<(), DataplaneError>;
}

pub struct NetlinkLinks {
    handle: Handle,
}

impl NetlinkLinks {
    pub fn new(handle: Handle) -> Self {
        NetlinkLinks { handle }
    }

    /// The underlying rtnetlink handle (e.g. for a WireGuard backend).
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    async fn apply_one(&self, op: &LinkOp) -> Result<(), NetlinkError> {
        let name = match op {
            LinkOp::SetMtu { name, .. }
            | LinkOp::SetUp { name }
            | LinkOp::AddAddress { name, .. }
            | LinkOp::DeleteAddress { name, .. } => name,
        };
        let Some(index) = link_index(&self.handle, name).await? else {
            return Err(NetlinkError {
                errno: Some(libc::ENODEV),
                source: format!("no link {name}").into(),
            });
        };
        match op {
            LinkOp::SetMtu { mtu, .. } => {
                self.handle
                    .link()
                    .set(LinkUnspec::new_with_index(index).mtu(*mtu).build())
                    .execute()
                    .await?;
            }
            LinkOp::SetUp { .. } => {
                self.handle
                    .link()
                    .set(LinkUnspec::new_with_index(index).up().build())
                    .execute()
                    .await?;
            }
            LinkOp::AddAddress { address, .. } => {
                if let Err(e) = self
                    .handle
                    .address()
                    .add(index, address.addr(), address.prefix_len())
                    .execute()
                    .await
                {
                    ignore_errno(e, &[libc::EEXIST])?;
                }
            }
            LinkOp::DeleteAddress { address, .. } => {
                if let Err(e) = self
                    .handle
                    .address()
                    .del(address_message(index, address))
                    .execute()
                    .await
                {
                    ignore_errno(e, &[libc::EADDRNOTAVAIL, libc::ENOENT, libc::ENODEV])?;
                }
            }
        }
        Ok(())
    }
}

/// The same message `ip addr add` would send, so deletes match what adds created.
fn address_message(index: u32, address: &IpNet) -> AddressMessage {
    match address.addr() {
        IpAddr::V4(a) => rtnetlink::AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(a, address.prefix_len())
            .build(),
        IpAddr::V6(a) => rtnetlink::AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(a, address.prefix_len())
            .build(),
    }
}

#[async_trait]
impl LinkDataplane for NetlinkLinks {
    async fn observe(
        &mut self,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, LinkState>, DataplaneError> {
        let mut out = BTreeMap::new();
        for name in names {
            let what = || format!("link {name}");
            let Some(link) = get_link(&self.handle, name)
                .await
                .map_err(|e| DataplaneError::observe(what(), e))?
            else {
                continue;
            };
            let addresses = link_addresses(&self.handle, link.header.index)
                .await
                .map_err(|e| DataplaneError::observe(what(), e))?;
            out.insert(
                name.clone(),
                LinkState {
                    name: name.clone(),
                    mtu: link_mtu(&link),
                    up: link.header.flags.contains(LinkFlags::Up),
                    addresses,
                },
            );
        }
        Ok(out)
    }

    async fn host_mtu(&mut self) -> Result<Option<u32>, DataplaneError> {
        let what = "links for the host MTU";
        let mut stream = self.handle.link().get().execute();
        let mut min: Option<u32> = None;
        while let Some(link) = stream
            .try_next()
            .await
            .map_err(|e| DataplaneError::observe(what, NetlinkError::from(e)))?
        {
            let Some(name) = link_name(&link) else {
                continue;
            };
            let up = match link_oper_state(&link) {
                Some(State::Up) => true,
                // Some drivers never report an operstate; fall back to the admin flag.
                Some(State::Unknown) | None => link.header.flags.contains(LinkFlags::Up),
                Some(_) => false,
            };
            if up && is_uplink_name(name) {
                let mtu = link_mtu(&link);
                min = Some(min.map_or(mtu, |m| m.min(mtu)));
            }
        }
        Ok(min)
    }

    async fn apply(&mut self, ops: &[LinkOp]) -> Result<(), DataplaneError> {
        for op in ops {
            self.apply_one(op)
                .await
                .map_err(|e| DataplaneError::apply(op, e))?;
        }
        Ok(())
    }
}

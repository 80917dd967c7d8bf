//! Real kernel subsystems: links and routing over rtnetlink, WireGuard over the kernel module
//! (through `defguard_wireguard_rs`) or wireguard-go ([`super::uapi`]), chosen at start-up.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use async_trait::async_trait;
use defguard_wireguard_rs::{
    InterfaceConfiguration, Kernel, WGApi, WireguardInterfaceApi, host::Host, key::Key,
    net::IpAddrMask, peer::Peer,
};
use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage, State};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use rtnetlink::{Handle, IpVersion, LinkUnspec, RouteMessageBuilder};

use super::link::{LinkDataplane, LinkOp, LinkState, is_uplink_name};
use super::route::{RouteOp, RoutingDataplane, RoutingState};
use super::uapi::{UserspaceConfig, UserspaceWireguard};
use super::wg::{DeviceState, PeerState, WgOp, WireguardDataplane, WireguardStats};
use super::{Backend, DataplaneError};
use crate::config::ROUTE_PROTOCOL;
use crate::mesh::{RouteKind, RouteSpec, RuleSpec};
use crate::model::{Family, WgKey};

/// A failed netlink request, with the kernel's errno when there is one.
#[derive(Debug, thiserror::Error)]
#[error("netlink request failed{}", errno_text(*.errno))]
pub struct NetlinkError {
    /// Positive errno (e.g. `libc::EEXIST`), `None` for non-kernel failures.
    pub errno: Option<i32>,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

fn errno_text(errno: Option<i32>) -> String {
    errno
        .map(|e| format!(": errno {e} ({})", std::io::Error::from_raw_os_error(e)))
        .unwrap_or_default()
}

impl From<rtnetlink::Error> for NetlinkError {
    fn from(e: rtnetlink::Error) -> Self {
        let errno = match &e {
            rtnetlink::Error::NetlinkError(msg) if msg.raw_code() != 0 => {
                Some(msg.raw_code().abs())
            }
            _ => None,
        };
        NetlinkError {
            errno,
            source: Box::new(e),
        }
    }
}

/// `Ok` when the request failed with one of `ok` (e.g. EEXIST on add, ENOENT on delete).
pub(crate) fn ignore_errno(e: rtnetlink::Error, ok: &[i32]) -> Result<(), NetlinkError> {
    let e = NetlinkError::from(e);
    match e.errno {
        Some(errno) if ok.contains(&errno) => Ok(()),
        _ => Err(e),
    }
}

/// Opens an rtnetlink socket in the calling thread's network namespace and spawns its
/// connection task on the current tokio runtime.
pub fn netlink_handle() -> Result<Handle, DataplaneError> {
    let (connection, handle, _) = rtnetlink::new_connection()
        .map_err(|e| DataplaneError::observe("opening an rtnetlink socket", e))?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Links and routing over one rtnetlink connection.
pub async fn connect_netlink() -> Result<(NetlinkLinks, NetlinkRouting), DataplaneError> {
    let handle = netlink_handle()?;
    Ok((
        NetlinkLinks::new(handle.clone()),
        NetlinkRouting::new(handle),
    ))
}

/// The link called `name`, `None` when there is none.
pub(crate) async fn get_link(
    handle: &Handle,
    name: &str,
) -> Result<Option<LinkMessage>, NetlinkError> {
    match handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) => ignore_errno(e, &[libc::ENODEV]).map(|()| None),
    }
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_mtu(link: &LinkMessage) -> u32 {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(0)
}

fn link_oper_state(link: &LinkMessage) -> Option<&State> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::OperState(s) => Some(s),
        _ => None,
    })
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, NetlinkError> {
    Ok(get_link(handle, name).await?.map(|l| l.header.index))
}

fn ip_net(addr: IpAddr, len: u8) -> Option<IpNet> {
    IpNet::new(addr, len).ok()
}

// ---------------------------------------------------------------------------------------------
// Links

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

    async fn addresses(&self, index: u32) -> Result<BTreeSet<IpNet>, NetlinkError> {
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut out = BTreeSet::new();
        while let Some(msg) = stream.try_next().await? {
            if msg.header.index != index {
                continue;
            }
            // On point-to-point links IFA_ADDRESS is the peer; IFA_LOCAL is ours.
            let local = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let address = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(net) = local
                .or(address)
                .and_then(|ip| ip_net(ip, msg.header.prefix_len))
            {
                out.insert(net);
            }
        }
        Ok(out)
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
            let addresses = self
                .addresses(link.header.index)
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

// ---------------------------------------------------------------------------------------------
// Routes and rules

pub struct NetlinkRouting {
    handle: Handle,
}

impl NetlinkRouting {
    pub fn new(handle: Handle) -> Self {
        NetlinkRouting { handle }
    }

    async fn link_names(&self) -> Result<HashMap<u32, String>, NetlinkError> {
        let mut stream = self.handle.link().get().execute();
        let mut out = HashMap::new();
        while let Some(link) = stream.try_next().await? {
            if let Some(name) = link_name(&link) {
                out.insert(link.header.index, name.to_string());
            }
        }
        Ok(out)
    }

    async fn routes(&self, table: u32) -> Result<BTreeSet<RouteSpec>, NetlinkError> {
        let mut ours = Vec::new();
        for query in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut stream = self.handle.route().get(query).execute();
            while let Some(msg) = stream.try_next().await? {
                if route_table(&msg) == table && u8::from(msg.header.protocol) == ROUTE_PROTOCOL {
                    ours.push(msg);
                }
            }
        }
        let names = if ours.iter().any(|m| m.header.kind == RouteType::Unicast) {
            self.link_names().await?
        } else {
            HashMap::new()
        };
        let mut out = BTreeSet::new();
        for msg in &ours {
            match route_spec(msg, table, &names) {
                Some(spec) => {
                    out.insert(spec);
                }
                None => {
                    tracing::warn!(route = ?msg, "route with our protocol in our table has a shape we do not manage")
                }
            }
        }
        Ok(out)
    }

    async fn rules(&self, table: u32) -> Result<BTreeSet<RuleSpec>, NetlinkError> {
        let mut out = BTreeSet::new();
        for (version, family) in [(IpVersion::V4, Family::V4), (IpVersion::V6, Family::V6)] {
            let mut stream = self.handle.rule().get(version).execute();
            while let Some(msg) = stream.try_next().await? {
                if rule_table(&msg) == table {
                    out.insert(rule_spec(&msg, family));
                }
            }
        }
        Ok(out)
    }

    /// The message for a route; `indexes` holds the interface indexes resolved for this apply.
    fn route_message(
        spec: &RouteSpec,
        delete: bool,
        indexes: &HashMap<String, Option<u32>>,
    ) -> Result<Option<RouteMessage>, NetlinkError> {
        let builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(spec.dest.addr(), spec.dest.prefix_len())
            .map_err(|e| NetlinkError {
                errno: None,
                source: Box::new(e),
            })?;
        let v4 = spec.family() == Family::V4;
        let mut builder = builder
            .table_id(spec.table)
            .protocol(RouteProtocol::from(ROUTE_PROTOCOL));
        builder = match &spec.kind {
            RouteKind::Device { interface } => {
                let Some(index) = indexes.get(interface).copied().flatten() else {
                    // The kernel removed the device's routes with it.
                    return if delete {
                        Ok(None)
                    } else {
                        Err(NetlinkError {
                            errno: Some(libc::ENODEV),
                            source: format!("no link {interface}").into(),
                        })
                    };
                };
                builder
                    .kind(RouteType::Unicast)
                    .output_interface(index)
                    .scope(if v4 {
                        RouteScope::Link
                    } else {
                        RouteScope::Universe
                    })
            }
            RouteKind::Throw => builder.kind(RouteType::Throw).scope(RouteScope::Universe),
        };
        if delete {
            // NOWHERE matches any scope; protocol and type still restrict the delete to our route.
            builder = builder.scope(RouteScope::NoWhere);
        }
        let mut msg = builder.build();
        if spec.table > 255 {
            // The header field is 8 bits; RT_TABLE_UNSPEC there defers to the attribute.
            msg.header.table = 0;
        }
        Ok(Some(msg))
    }

    async fn apply_one(
        &self,
        op: &RouteOp,
        indexes: &HashMap<String, Option<u32>>,
    ) -> Result<(), NetlinkError> {
        match op {
            RouteOp::AddRoute(spec) => {
                if let Some(msg) = Self::route_message(spec, false, indexes)?
                    && let Err(e) = self.handle.route().add(msg).execute().await
                {
                    ignore_errno(e, &[libc::EEXIST])?;
                }
            }
            RouteOp::DeleteRoute(spec) => {
                if let Some(msg) = Self::route_message(spec, true, indexes)?
                    && let Err(e) = self.handle.route().del(msg).execute().await
                {
                    ignore_errno(e, &[libc::ESRCH, libc::ENOENT])?;
                }
            }
            RouteOp::AddRule(spec) => {
                let mut req = self.handle.rule().add();
                *req.message_mut() = rule_message(spec);
                if let Err(e) = req.execute().await {
                    ignore_errno(e, &[libc::EEXIST])?;
                }
            }
            RouteOp::DeleteRule(spec) => {
                if let Err(e) = self.handle.rule().del(rule_message(spec)).execute().await {
                    ignore_errno(e, &[libc::ENOENT, libc::ESRCH])?;
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn route_spec(msg: &RouteMessage, table: u32, names: &HashMap<u32, String>) -> Option<RouteSpec> {
    let dest_addr = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    });
    let dest_addr = match (dest_addr, msg.header.address_family) {
        (Some(a), _) => a,
        (None, AddressFamily::Inet) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (None, AddressFamily::Inet6) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        (None, _) => return None,
    };
    let dest = ip_net(dest_addr, msg.header.destination_prefix_length)?;
    let kind = match msg.header.kind {
        RouteType::Throw => RouteKind::Throw,
        RouteType::Unicast => {
            let oif = msg.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })?;
            RouteKind::Device {
                interface: names.get(&oif)?.clone(),
            }
        }
        _ => return None,
    };
    Some(RouteSpec { table, dest, kind })
}

pub(crate) fn rule_table(msg: &RuleMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn rule_spec(msg: &RuleMessage, family: Family) -> RuleSpec {
    let mut spec = RuleSpec {
        family,
        priority: 0,
        table: rule_table(msg),
        fwmark: 0,
        mask: 0,
        invert: msg.header.flags.contains(RuleFlags::Invert),
    };
    let mut mask = None;
    for attr in &msg.attributes {
        match attr {
            RuleAttribute::Priority(p) => spec.priority = *p,
            RuleAttribute::FwMark(m) => spec.fwmark = *m,
            RuleAttribute::FwMask(m) => mask = Some(*m),
            _ => {}
        }
    }
    // A mark without a mask matches all bits (`fwmark 0x1` is `0x1/0xffffffff`).
    spec.mask = mask.unwrap_or(if spec.fwmark != 0 { u32::MAX } else { 0 });
    spec
}

/// `[not] fwmark M/mask lookup T pref P`, the same for add and delete.
fn rule_message(spec: &RuleSpec) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = match spec.family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    };
    msg.header.action = RuleAction::ToTable;
    if spec.invert {
        msg.header.flags = RuleFlags::Invert;
    }
    if spec.table > 255 {
        msg.attributes.push(RuleAttribute::Table(spec.table));
    } else {
        msg.header.table = spec.table as u8;
    }
    msg.attributes.push(RuleAttribute::Priority(spec.priority));
    if spec.fwmark != 0 || spec.mask != 0 {
        msg.attributes.push(RuleAttribute::FwMark(spec.fwmark));
        msg.attributes.push(RuleAttribute::FwMask(spec.mask));
    }
    msg
}

#[async_trait]
impl RoutingDataplane for NetlinkRouting {
    async fn observe(&mut self, table: u32) -> Result<RoutingState, DataplaneError> {
        let routes = self
            .routes(table)
            .await
            .map_err(|e| DataplaneError::observe(format!("routes in table {table}"), e))?;
        let rules = self
            .rules(table)
            .await
            .map_err(|e| DataplaneError::observe(format!("rules for table {table}"), e))?;
        Ok(RoutingState { routes, rules })
    }

    /// Resolves each interface once, then sends the ops of one kind concurrently (up to
    /// [`ROUTE_CONCURRENCY`] requests in flight on the one socket); kinds stay in order, so rules
    /// are still deleted first and added last. Thousands of routes then cost about as many
    /// kernel round trips as one dump instead of two sequential round trips each.
    async fn apply(&mut self, ops: &[RouteOp]) -> Result<(), DataplaneError> {
        let mut indexes: HashMap<String, Option<u32>> = HashMap::new();
        for op in ops {
            let (RouteOp::AddRoute(spec) | RouteOp::DeleteRoute(spec)) = op else {
                continue;
            };
            let RouteKind::Device { interface } = &spec.kind else {
                continue;
            };
            if !indexes.contains_key(interface) {
                let index = link_index(&self.handle, interface)
                    .await
                    .map_err(|e| DataplaneError::apply(op, e))?;
                indexes.insert(interface.clone(), index);
            }
        }
        let (this, indexes) = (&*self, &indexes);
        for group in ops.chunk_by(|a, b| a.kind() == b.kind()) {
            futures::stream::iter(group.iter().map(Ok))
                .try_for_each_concurrent(ROUTE_CONCURRENCY, |op| async move {
                    this.apply_one(op, indexes)
                        .await
                        .map_err(|e| DataplaneError::apply(op, e))
                })
                .await?;
        }
        Ok(())
    }
}

/// Route and rule requests in flight at once.
const ROUTE_CONCURRENCY: usize = 64;

// ---------------------------------------------------------------------------------------------
// Kernel WireGuard

/// The kernel module over generic netlink (via defguard, whose calls are blocking and therefore
/// run on the blocking pool).
///
/// `ConfigureDevice` uses defguard's `configure_interface`, the only device-level setter it
/// exposes. That call flushes the link's addresses and replaces all peers, so we hand it the
/// current addresses and peers back: peers and addresses survive, but sessions restart (new
/// handshakes). The plan only emits it on creation or when the key, port or fwmark changed,
/// where a key change forces new handshakes anyway.
pub struct KernelWireguard {
    handle: Handle,
}

impl KernelWireguard {
    pub fn new(handle: Handle) -> Self {
        KernelWireguard { handle }
    }

    async fn blocking<T: Send + 'static>(
        what: String,
        f: impl FnOnce() -> Result<T, defguard_wireguard_rs::error::WireguardInterfaceError>
        + Send
        + 'static,
    ) -> Result<T, DataplaneError> {
        match tokio::task::spawn_blocking(f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(DataplaneError::apply(what, e)),
            Err(e) => Err(DataplaneError::apply(what, e)),
        }
    }

    async fn apply_one(&self, op: &WgOp) -> Result<(), DataplaneError> {
        let what = op.to_string();
        match op {
            WgOp::CreateDevice { name } => {
                match super::uapi::link_kind(&self.handle, name)
                    .await
                    .map_err(|e| DataplaneError::apply(&what, e))?
                {
                    Some(kind) if kind == "wireguard" => return Ok(()),
                    Some(kind) => {
                        return Err(DataplaneError::NotWireguard {
                            interface: name.clone(),
                            kind,
                        });
                    }
                    None => {}
                }
                let name = name.clone();
                Self::blocking(what, move || WGApi::<Kernel>::new(name)?.create_interface()).await
            }
            WgOp::DeleteDevice { name } => super::uapi::delete_link(&self.handle, name)
                .await
                .map_err(|e| DataplaneError::apply(&what, e)),
            WgOp::ConfigureDevice {
                name,
                private_key,
                listen_port,
                fwmark,
            } => {
                let index = link_index(&self.handle, name)
                    .await
                    .map_err(|e| DataplaneError::apply(&what, e))?;
                let links = NetlinkLinks::new(self.handle.clone());
                let addresses = match index {
                    Some(index) => links
                        .addresses(index)
                        .await
                        .map_err(|e| DataplaneError::apply(&what, e))?,
                    None => BTreeSet::new(),
                };
                let api_name = name.clone();
                let current = Self::blocking(what.clone(), move || {
                    WGApi::<Kernel>::new(api_name)?.read_interface_data()
                })
                .await?;
                let config = InterfaceConfiguration {
                    name: name.clone(),
                    prvkey: private_key.to_hex().to_string(),
                    addresses: addresses
                        .iter()
                        .map(|n| IpAddrMask::new(n.addr(), n.prefix_len()))
                        .collect(),
                    port: *listen_port,
                    peers: current.peers.into_values().collect(),
                    mtu: None,
                    fwmark: Some(*fwmark),
                };
                let name = name.clone();
                Self::blocking(what, move || {
                    WGApi::<Kernel>::new(name)?.configure_interface(&config)
                })
                .await
            }
            WgOp::SetPeer {
                name,
                public_key,
                peer,
            } => {
                let mut p = Peer::new(Key::new(public_key.0));
                p.endpoint = Some(peer.endpoint);
                p.persistent_keepalive_interval = Some(peer.keepalive);
                p.allowed_ips = peer
                    .allowed_ips
                    .iter()
                    .map(|n| IpAddrMask::new(n.addr(), n.prefix_len()))
                    .collect();
                let name = name.clone();
                Self::blocking(what, move || WGApi::<Kernel>::new(name)?.configure_peer(&p)).await
            }
            WgOp::RemovePeer { name, public_key } => {
                let key = Key::new(public_key.0);
                let name = name.clone();
                Self::blocking(what, move || WGApi::<Kernel>::new(name)?.remove_peer(&key)).await
            }
        }
    }
}

fn device_state(name: &str, host: Host) -> DeviceState {
    let public_key = host
        .private_key
        .filter(|k| k.as_array() != [0u8; 32])
        .map(|k| crate::keys::PrivateKey::from_bytes(k.as_array()).public_key());
    let peers = host
        .peers
        .into_values()
        .map(|p| {
            let state = PeerState {
                endpoint: p.endpoint,
                allowed_ips: p
                    .allowed_ips
                    .iter()
                    .filter_map(|m| ip_net(m.address, m.cidr))
                    .collect(),
                keepalive: p.persistent_keepalive_interval.unwrap_or(0),
                last_handshake: p
                    .last_handshake
                    .filter(|t| *t != std::time::SystemTime::UNIX_EPOCH),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
            };
            (WgKey(p.public_key.as_array()), state)
        })
        .collect();
    DeviceState {
        name: name.to_string(),
        public_key,
        listen_port: host.listen_port,
        fwmark: host.fwmark.unwrap_or(0),
        peers,
    }
}

#[async_trait]
impl WireguardDataplane for KernelWireguard {
    fn backend(&self) -> Backend {
        Backend::Kernel
    }

    async fn observe(
        &mut self,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, DeviceState>, DataplaneError> {
        self.read_devices(names).await
    }

    async fn apply(&mut self, ops: &[WgOp]) -> Result<(), DataplaneError> {
        for op in ops {
            self.apply_one(op).await?;
        }
        Ok(())
    }

    fn stats_reader(&self) -> Option<std::sync::Arc<dyn WireguardStats>> {
        Some(std::sync::Arc::new(KernelWireguard::new(
            self.handle.clone(),
        )))
    }
}

#[async_trait]
impl WireguardStats for KernelWireguard {
    async fn read_devices(
        &self,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, DeviceState>, DataplaneError> {
        let mut out = BTreeMap::new();
        for name in names {
            let kind = super::uapi::link_kind(&self.handle, name)
                .await
                .map_err(|e| DataplaneError::observe(format!("link {name}"), e))?;
            if kind.as_deref() != Some("wireguard") {
                continue; // Absent, or not ours: CreateDevice reports the latter.
            }
            let api_name = name.clone();
            let host = match tokio::task::spawn_blocking(move || {
                WGApi::<Kernel>::new(api_name)?.read_interface_data()
            })
            .await
            {
                Ok(Ok(host)) => host,
                Ok(Err(e)) => {
                    return Err(DataplaneError::observe(
                        format!("WireGuard device {name}"),
                        e,
                    ));
                }
                Err(e) => {
                    return Err(DataplaneError::observe(
                        format!("WireGuard device {name}"),
                        e,
                    ));
                }
            };
            out.insert(name.clone(), device_state(name, host));
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Backend selection

/// Whether the WireGuard kernel module is loaded (after a best-effort `modprobe wireguard`).
pub fn kernel_wireguard_available() -> bool {
    if Path::new("/sys/module/wireguard").exists() {
        return true;
    }
    let _ = std::process::Command::new("modprobe")
        .arg("wireguard")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    Path::new("/sys/module/wireguard").exists()
}

/// Whether `binary` is runnable: an existing path, or a bare name found in `PATH`.
pub fn find_binary(binary: &Path) -> Option<std::path::PathBuf> {
    if binary.components().count() > 1 {
        return binary.is_file().then(|| binary.to_path_buf());
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The kernel module when present, else wireguard-go.
    #[default]
    Auto,
    Kernel,
    Userspace,
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Kernel => "kernel",
            BackendChoice::Userspace => "userspace",
        })
    }
}

/// Either WireGuard backend behind one type.
pub enum AnyWireguard {
    Kernel(KernelWireguard),
    Userspace(UserspaceWireguard),
}

/// Picks the backend. `Auto`: the kernel module if loadable, else wireguard-go if found.
pub fn select_backend(
    choice: BackendChoice,
    handle: Handle,
    userspace: UserspaceConfig,
) -> Result<AnyWireguard, DataplaneError> {
    let kernel = || kernel_wireguard_available();
    let userspace_ok = || find_binary(&userspace.binary).is_some();
    let missing_go = || {
        format!(
            "{} not found; install wireguard-go (Debian/Ubuntu: apt-get install wireguard-go) or set its path",
            userspace.binary.display()
        )
    };
    match choice {
        BackendChoice::Kernel if kernel() => Ok(AnyWireguard::Kernel(KernelWireguard::new(handle))),
        BackendChoice::Kernel => Err(DataplaneError::NoBackend(
            "the wireguard kernel module is not available (modprobe wireguard failed; kernel 5.6+ has it built in)".into(),
        )),
        BackendChoice::Userspace if userspace_ok() => Ok(AnyWireguard::Userspace(UserspaceWireguard::with_config(handle, userspace))),
        BackendChoice::Userspace => Err(DataplaneError::NoBackend(missing_go())),
        BackendChoice::Auto if kernel() => Ok(AnyWireguard::Kernel(KernelWireguard::new(handle))),
        BackendChoice::Auto if userspace_ok() => Ok(AnyWireguard::Userspace(UserspaceWireguard::with_config(handle, userspace))),
        BackendChoice::Auto => Err(DataplaneError::NoBackend(format!(
            "no wireguard kernel module and {}",
            missing_go()
        ))),
    }
}

#[async_trait]
impl WireguardDataplane for AnyWireguard {
    fn backend(&self) -> Backend {
        match self {
            AnyWireguard::Kernel(k) => k.backend(),
            AnyWireguard::Userspace(u) => u.backend(),
        }
    }

    async fn observe(
        &mut self,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, DeviceState>, DataplaneError> {
        match self {
            AnyWireguard::Kernel(k) => k.observe(names).await,
            AnyWireguard::Userspace(u) => u.observe(names).await,
        }
    }

    async fn apply(&mut self, ops: &[WgOp]) -> Result<(), DataplaneError> {
        match self {
            AnyWireguard::Kernel(k) => k.apply(ops).await,
            AnyWireguard::Userspace(u) => u.apply(ops).await,
        }
    }

    fn stats_reader(&self) -> Option<std::sync::Arc<dyn WireguardStats>> {
        match self {
            AnyWireguard::Kernel(k) => k.stats_reader(),
            AnyWireguard::Userspace(u) => u.stats_reader(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_roundtrip() {
        let spec = RuleSpec {
            family: Family::V6,
            priority: 99,
            table: 1000,
            fwmark: 0x200000,
            mask: 0x200000,
            invert: true,
        };
        let msg = rule_message(&spec);
        assert_eq!(msg.header.table, 0);
        assert_eq!(rule_spec(&msg, Family::V6), spec);
    }

    #[test]
    fn errno_is_kept() {
        let e = NetlinkError {
            errno: Some(libc::EEXIST),
            source: "x".into(),
        };
        assert!(e.to_string().contains("errno 17"), "{e}");
    }
}

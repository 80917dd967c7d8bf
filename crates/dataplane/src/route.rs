//! Routes in our table and the policy rule, over rtnetlink. Only routes carrying our protocol
//! number in our table, and rules pointing at our table, are observed (and so ever deleted).

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use async_trait::async_trait;
use futures::TryStreamExt as _;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};
use wiremesh_core::config::ROUTE_PROTOCOL;
use wiremesh_core::dataplane::routing::{RouteOp, RoutingState};
use wiremesh_core::mesh::{RouteKind, RouteSpec, RuleSpec};
use wiremesh_core::model::Family;

use crate::DataplaneError;
use crate::netlink::{NetlinkError, ignore_errno, ip_net, link_index, link_name};

#[async_trait]
pub trait RoutingDataplane: Send {
    async fn observe(&mut self, table: u32) -> Result<RoutingState, DataplaneError>;
    async fn apply(&mut self, ops: &[RouteOp]) -> Result<(), DataplaneError>;
}

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

pub fn route_table(msg: &RouteMessage) -> u32 {
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

pub fn rule_table(msg: &RuleMessage) -> u32 {
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
}

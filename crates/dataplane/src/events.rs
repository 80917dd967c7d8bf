//! Kernel change events: an rtnetlink multicast subscription that wakes the reconcile loop when
//! a link, an address, a route or a rule of ours changes behind the agent's back (someone runs
//! `ip link del wireguard.cali`), and an nfnetlink one for changes to our nftables table
//! (`nft flush table inet wiremesh`), so drift is repaired at once instead of at the next
//! resync.

use futures::StreamExt as _;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{AsyncSocket as _, AsyncSocketExt as _, SocketAddr, TokioSocket};
use rtnetlink::MulticastGroup;
use rtnetlink::packet_core::NetlinkPayload;
use tokio::sync::mpsc;
use tracing::debug;

use crate::DataplaneError;
use crate::route::{route_table, rule_table};

/// Whether a kernel notification can concern our dataplane. Routes and rules of other tables
/// are ignored so a busy host's route churn does not wake the loop.
fn concerns_us(message: &RouteNetlinkMessage, table: u32) -> bool {
    match message {
        RouteNetlinkMessage::NewLink(_)
        | RouteNetlinkMessage::DelLink(_)
        | RouteNetlinkMessage::NewAddress(_)
        | RouteNetlinkMessage::DelAddress(_) => true,
        RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
            route_table(r) == table
        }
        RouteNetlinkMessage::NewRule(r) | RouteNetlinkMessage::DelRule(r) => rule_table(r) == table,
        _ => false,
    }
}

/// Subscribes to link, address, route and rule notifications of both families and sends `()`
/// on `dirty` (capacity 1: bursts coalesce) for each one that concerns `table` or a link.
pub fn watch_kernel(table: u32, dirty: mpsc::Sender<()>) -> Result<(), DataplaneError> {
    let groups = [
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
        MulticastGroup::Ipv4Rule,
        MulticastGroup::Ipv6Rule,
    ];
    let (connection, _handle, mut messages) = rtnetlink::new_multicast_connection(&groups)
        .map_err(|e| DataplaneError::observe("subscribing to rtnetlink notifications", e))?;
    tokio::spawn(connection);
    tokio::spawn(async move {
        while let Some((message, _)) = messages.next().await {
            if let NetlinkPayload::InnerMessage(inner) = &message.payload
                && concerns_us(inner, table)
            {
                debug!("kernel change notification");
                // Full means a wake-up is already pending; that one covers this change too.
                if let Err(mpsc::error::TrySendError::Closed(())) = dirty.try_send(()) {
                    break;
                }
            }
        }
        debug!("kernel notification stream ended");
    });
    Ok(())
}

/// nfnetlink's nftables subsystem and its notification group (linux/netfilter/nfnetlink.h).
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNLGRP_NFTABLES: u32 = 7;
/// Every nftables object message (table, chain, rule, set, element, object, flowtable) names
/// its table in attribute 1.
const NFTA_TABLE_ATTRIBUTE: u16 = 1;
const NLA_TYPE_MASK: u16 = 0x3fff;
/// nlmsghdr, then nfgenmsg.
const NLMSG_HEADER: usize = 16;
const NFGENMSG: usize = 4;

/// Whether a buffer of nfnetlink notifications has one about nftables table `table`: a
/// table, chain, rule, set or element of it was added or deleted.
pub fn nft_batch_concerns(buffer: &[u8], table: &str) -> bool {
    let mut rest = buffer;
    while rest.len() >= NLMSG_HEADER {
        let length = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if length < NLMSG_HEADER || length > rest.len() {
            break;
        }
        let message_type = u16::from_ne_bytes([rest[4], rest[5]]);
        if message_type >> 8 == NFNL_SUBSYS_NFTABLES
            && rest
                .get(NLMSG_HEADER + NFGENMSG..length)
                .is_some_and(|attributes| names_table(attributes, table))
        {
            return true;
        }
        rest = &rest[align(length).min(rest.len())..];
    }
    false
}

/// Whether netlink attributes carry the table name `table`.
fn names_table(mut attributes: &[u8], table: &str) -> bool {
    while attributes.len() >= 4 {
        let length = u16::from_ne_bytes([attributes[0], attributes[1]]) as usize;
        let kind = u16::from_ne_bytes([attributes[2], attributes[3]]) & NLA_TYPE_MASK;
        if length < 4 || length > attributes.len() {
            return false;
        }
        if kind == NFTA_TABLE_ATTRIBUTE {
            let name = &attributes[4..length];
            return name.strip_suffix(&[0]).unwrap_or(name) == table.as_bytes();
        }
        attributes = &attributes[align(length).min(attributes.len())..];
    }
    false
}

fn align(length: usize) -> usize {
    (length + 3) & !3
}

/// Subscribes to nftables notifications and sends `()` on `dirty` (bursts coalesce) for each
/// batch that touches table `table`: our own applies wake the loop once more, which then finds
/// nothing to do; anyone else's change is repaired at once.
pub fn watch_nftables(table: &'static str, dirty: mpsc::Sender<()>) -> Result<(), DataplaneError> {
    let subscribe = || -> std::io::Result<TokioSocket> {
        let mut socket = TokioSocket::new(netlink_sys::protocols::NETLINK_NETFILTER)?;
        socket.socket_mut().bind(&SocketAddr::new(0, 0))?;
        socket.socket_mut().add_membership(NFNLGRP_NFTABLES)?;
        Ok(socket)
    };
    let socket = subscribe()
        .map_err(|e| DataplaneError::observe("subscribing to nftables notifications", e))?;
    tokio::spawn(async move {
        loop {
            let wake = match socket.recv_from_full().await {
                Ok((buffer, _)) => nft_batch_concerns(&buffer, table),
                // ENOBUFS: notifications were lost; one of them may have been ours.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => true,
                Err(e) => {
                    debug!(error = %e, "nftables notification stream ended");
                    break;
                }
            };
            if wake {
                debug!(table, "nftables change notification");
                if let Err(mpsc::error::TrySendError::Closed(())) = dirty.try_send(()) {
                    break;
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One nfnetlink message: header, nfgenmsg, then the attributes given.
    fn message(subsystem: u16, kind: u16, attributes: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![1u8, 0, 0, 0]; // nfgenmsg: family inet, version 0, res_id 0
        for (attribute, payload) in attributes {
            let length = 4 + payload.len();
            body.extend((length as u16).to_ne_bytes());
            body.extend(attribute.to_ne_bytes());
            body.extend(*payload);
            body.resize(align(body.len()), 0);
        }
        let mut out = Vec::new();
        out.extend(((NLMSG_HEADER + body.len()) as u32).to_ne_bytes());
        out.extend(((subsystem << 8) | kind).to_ne_bytes());
        out.extend([0u8; 10]); // flags, sequence, port
        out.extend(body);
        out
    }

    #[test]
    fn only_messages_about_our_table_wake_the_loop() {
        const DELRULE: u16 = 8;
        const NEWGEN: u16 = 15;
        let ours = message(
            NFNL_SUBSYS_NFTABLES,
            DELRULE,
            &[(1, b"wiremesh\0"), (2, b"input\0")],
        );
        let theirs = message(NFNL_SUBSYS_NFTABLES, DELRULE, &[(1, b"filter\0")]);
        let generation = message(NFNL_SUBSYS_NFTABLES, NEWGEN, &[(1, &[0, 0, 0, 7])]);
        let other_subsystem = message(1, 0, &[(1, b"wiremesh\0")]);
        assert!(nft_batch_concerns(&ours, "wiremesh"));
        assert!(!nft_batch_concerns(&theirs, "wiremesh"));
        assert!(!nft_batch_concerns(&generation, "wiremesh"));
        assert!(!nft_batch_concerns(&other_subsystem, "wiremesh"));
        assert!(!nft_batch_concerns(&ours, "wiremesh2"));
        let batch = [theirs.clone(), generation, ours].concat();
        assert!(nft_batch_concerns(&batch, "wiremesh"), "found after others");
        // Truncated or garbage input is not ours and does not panic.
        assert!(!nft_batch_concerns(&batch[..7], "wiremesh"));
        assert!(!nft_batch_concerns(&[0xff; 40], "wiremesh"));
        assert!(!nft_batch_concerns(&theirs[..theirs.len() - 3], "wiremesh"));
    }
}

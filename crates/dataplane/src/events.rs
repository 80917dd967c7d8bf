//! Kernel change events: an rtnetlink multicast subscription that wakes the reconcile loop when
//! a link, an address, a route or a rule of ours changes behind the agent's back (someone runs
//! `ip link del wireguard.cali`), so drift is repaired at once instead of at the next resync.

use futures::StreamExt as _;
use netlink_packet_route::RouteNetlinkMessage;
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

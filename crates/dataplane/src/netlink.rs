//! rtnetlink helpers every subsystem shares: the socket, errno-preserving errors, and link
//! lookups by name.

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::link::{LinkAttribute, LinkInfo, LinkMessage, State};
use rtnetlink::Handle;
use std::collections::BTreeSet;
use std::net::IpAddr;

use netlink_packet_route::address::AddressAttribute;

use crate::DataplaneError;

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
pub fn ignore_errno(e: rtnetlink::Error, ok: &[i32]) -> Result<(), NetlinkError> {
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

/// The link called `name`, `None` when there is none.
pub async fn get_link(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
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

pub fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

pub fn link_mtu(link: &LinkMessage) -> u32 {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(0)
}

pub fn link_oper_state(link: &LinkMessage) -> Option<&State> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::OperState(s) => Some(s),
        _ => None,
    })
}

pub async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, NetlinkError> {
    Ok(get_link(handle, name).await?.map(|l| l.header.index))
}

pub fn ip_net(addr: IpAddr, len: u8) -> Option<IpNet> {
    IpNet::new(addr, len).ok()
}

/// The link kind (`IFLA_INFO_KIND`, "tun" for wireguard-go) of `name`, `None` when absent.
pub async fn link_kind(
    handle: &rtnetlink::Handle,
    name: &str,
) -> Result<Option<String>, NetlinkError> {
    let Some(link) = get_link(handle, name).await? else {
        return Ok(None);
    };
    let kind = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::Kind(kind) => Some(kind.to_string()),
                _ => None,
            }),
            _ => None,
        })
        .unwrap_or_else(|| "unknown".to_string());
    Ok(Some(kind))
}

/// Deletes link `name`; a missing link is success.
pub async fn delete_link(handle: &rtnetlink::Handle, name: &str) -> Result<(), NetlinkError> {
    let Some(link) = get_link(handle, name).await? else {
        return Ok(());
    };
    match handle.link().del(link.header.index).execute().await {
        Ok(()) => Ok(()),
        Err(e) => ignore_errno(e, &[libc::ENODEV]),
    }
}

/// The addresses on the link with `index` (on point-to-point links, our side).
pub async fn link_addresses(handle: &Handle, index: u32) -> Result<BTreeSet<IpNet>, NetlinkError> {
    let mut stream = handle
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_kept() {
        let e = NetlinkError {
            errno: Some(libc::EEXIST),
            source: "x".into(),
        };
        assert!(e.to_string().contains("errno 17"), "{e}");
    }
}

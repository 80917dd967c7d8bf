//! The WireGuard kernel module over generic netlink (through `defguard_wireguard_rs`).

use std::collections::BTreeSet;

use async_trait::async_trait;
use defguard_wireguard_rs::{
    InterfaceConfiguration, Kernel, WGApi, WireguardInterfaceApi, host::Host, key::Key,
    net::IpAddrMask, peer::Peer,
};
use rtnetlink::Handle;
use wiremesh_core::dataplane::wireguard::{DeviceState, PeerState, WgOp};
use wiremesh_core::keys::PrivateKey;
use wiremesh_core::model::WgKey;

use super::{WireguardDataplane, WireguardStats};
use crate::netlink::{delete_link, ip_net, link_addresses, link_index, link_kind};
use crate::{Backend, DataplaneError};

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
                match link_kind(&self.handle, name)
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
            WgOp::DeleteDevice { name } => delete_link(&self.handle, name)
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
                let addresses = match index {
                    Some(index) => link_addresses(&self.handle, index)
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
        .map(|k| PrivateKey::from_bytes(k.as_array()).public_key());
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
    async fn read_device(&self, name: &str) -> Result<Option<DeviceState>, DataplaneError> {
        let kind = link_kind(&self.handle, name)
            .await
            .map_err(|e| DataplaneError::observe(format!("link {name}"), e))?;
        if kind.as_deref() != Some("wireguard") {
            return Ok(None); // Absent, or not ours: CreateDevice reports the latter.
        }
        let api_name = name.to_string();
        let what = || format!("WireGuard device {name}");
        let host = tokio::task::spawn_blocking(move || {
            WGApi::<Kernel>::new(api_name)?.read_interface_data()
        })
        .await
        .map_err(|e| DataplaneError::observe(what(), e))?
        .map_err(|e| DataplaneError::observe(what(), e))?;
        Ok(Some(device_state(name, host)))
    }
}

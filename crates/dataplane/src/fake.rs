//! In-memory kernel: one shared state behind the three subsystem traits. It keeps the state the
//! way the kernel would (deleting a device removes its link and its routes) and records every
//! operation, so tests can assert on exactly what the agent did.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use wiremesh_core::dataplane::link::{LinkOp, LinkState};
use wiremesh_core::dataplane::routing::{RouteOp, RoutingState};
use wiremesh_core::dataplane::wireguard::{DeviceState, PeerState, WgOp};
use wiremesh_core::mesh::{RouteKind, RouteSpec, RuleSpec};

use crate::link::LinkDataplane;
use crate::route::RoutingDataplane;
use crate::wireguard::{WireguardDataplane, WireguardStats};
use crate::{Backend, DataplaneError};

#[derive(Debug, Default, Clone)]
pub struct FakeState {
    pub devices: BTreeMap<String, DeviceState>,
    pub links: BTreeMap<String, LinkState>,
    /// Uplinks and their MTU, for host-MTU detection.
    pub uplinks: BTreeMap<String, u32>,
    pub routes: BTreeSet<RouteSpec>,
    pub rules: BTreeSet<RuleSpec>,
    /// Routes and rules someone else owns; the agent must never see or touch them.
    pub foreign_routes: BTreeSet<RouteSpec>,
    pub foreign_rules: BTreeSet<RuleSpec>,
    /// Every applied operation, as `kind: description`.
    pub log: Vec<String>,
    /// Make the next `apply` of any subsystem fail with this message.
    pub fail_next_apply: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct FakeKernel {
    state: Arc<Mutex<FakeState>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Injected(String);

impl FakeKernel {
    pub fn new() -> Self {
        let kernel = FakeKernel::default();
        kernel.state().uplinks.insert("eth0".into(), 1500);
        kernel
    }

    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        // A poisoned lock only means another test thread panicked; the data is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes and clears the operation log.
    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut self.state().log)
    }

    pub fn wireguard(&self) -> FakeWireguard {
        FakeWireguard(self.clone())
    }

    pub fn links(&self) -> FakeLinks {
        FakeLinks(self.clone())
    }

    pub fn routing(&self) -> FakeRouting {
        FakeRouting(self.clone())
    }

    fn check_fail(state: &mut FakeState) -> Result<(), DataplaneError> {
        match state.fail_next_apply.take() {
            Some(msg) => Err(DataplaneError::apply("injected failure", Injected(msg))),
            None => Ok(()),
        }
    }
}

pub struct FakeWireguard(FakeKernel);

#[async_trait]
impl WireguardStats for FakeWireguard {
    async fn read_device(&self, name: &str) -> Result<Option<DeviceState>, DataplaneError> {
        Ok(self.0.state().devices.get(name).cloned())
    }
}
pub struct FakeLinks(FakeKernel);
pub struct FakeRouting(FakeKernel);

#[async_trait]
impl WireguardDataplane for FakeWireguard {
    fn backend(&self) -> Backend {
        Backend::Userspace
    }

    fn stats_reader(&self) -> Option<Arc<dyn WireguardStats>> {
        Some(Arc::new(FakeWireguard(self.0.clone())))
    }

    async fn apply(&mut self, ops: &[WgOp]) -> Result<(), DataplaneError> {
        let mut state = self.0.state();
        FakeKernel::check_fail(&mut state)?;
        for op in ops {
            state.log.push(format!("{}: {op}", op.kind()));
            match op {
                WgOp::CreateDevice { name } => {
                    state.devices.insert(
                        name.clone(),
                        DeviceState {
                            name: name.clone(),
                            public_key: None,
                            listen_port: 0,
                            fwmark: 0,
                            peers: BTreeMap::new(),
                        },
                    );
                    state.links.insert(
                        name.clone(),
                        LinkState {
                            name: name.clone(),
                            mtu: 1420,
                            up: false,
                            addresses: BTreeSet::new(),
                        },
                    );
                }
                WgOp::DeleteDevice { name } => {
                    state.devices.remove(name);
                    state.links.remove(name);
                    state.routes.retain(|r| {
                        r.kind
                            != RouteKind::Device {
                                interface: name.clone(),
                            }
                    });
                }
                WgOp::ConfigureDevice {
                    name,
                    private_key,
                    listen_port,
                    fwmark,
                } => {
                    let device = state.devices.get_mut(name).ok_or_else(|| missing(op))?;
                    device.public_key = Some(private_key.public_key());
                    device.listen_port = *listen_port;
                    device.fwmark = *fwmark;
                }
                WgOp::SetPeer {
                    name,
                    public_key,
                    peer,
                } => {
                    let device = state.devices.get_mut(name).ok_or_else(|| missing(op))?;
                    // Like the kernel: an allowed IP moves to the peer that claims it last.
                    for other in device.peers.values_mut() {
                        other
                            .allowed_ips
                            .retain(|ip| !peer.allowed_ips.contains(ip));
                    }
                    let entry = device.peers.entry(*public_key).or_insert(PeerState {
                        endpoint: None,
                        allowed_ips: BTreeSet::new(),
                        keepalive: 0,
                        last_handshake: None,
                        rx_bytes: 0,
                        tx_bytes: 0,
                    });
                    entry.endpoint = Some(peer.endpoint);
                    entry.allowed_ips = peer.allowed_ips.clone();
                    entry.keepalive = peer.keepalive;
                }
                WgOp::RemovePeer { name, public_key } => {
                    let device = state.devices.get_mut(name).ok_or_else(|| missing(op))?;
                    device.peers.remove(public_key);
                }
            }
        }
        Ok(())
    }
}

fn missing(op: &impl std::fmt::Display) -> DataplaneError {
    DataplaneError::apply(op, Injected("no such device".into()))
}

#[async_trait]
impl LinkDataplane for FakeLinks {
    async fn observe(
        &mut self,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, LinkState>, DataplaneError> {
        let state = self.0.state();
        Ok(state
            .links
            .iter()
            .filter(|(n, _)| names.contains(*n))
            .map(|(n, l)| (n.clone(), l.clone()))
            .collect())
    }

    async fn host_mtu(&mut self) -> Result<Option<u32>, DataplaneError> {
        Ok(self.0.state().uplinks.values().copied().min())
    }

    async fn apply(&mut self, ops: &[LinkOp]) -> Result<(), DataplaneError> {
        let mut state = self.0.state();
        FakeKernel::check_fail(&mut state)?;
        for op in ops {
            state.log.push(format!("{}: {op}", op.kind()));
            let name = match op {
                LinkOp::SetMtu { name, .. }
                | LinkOp::SetUp { name }
                | LinkOp::AddAddress { name, .. }
                | LinkOp::DeleteAddress { name, .. } => name,
            };
            let link = state.links.get_mut(name).ok_or_else(|| missing(op))?;
            match op {
                LinkOp::SetMtu { mtu, .. } => link.mtu = *mtu,
                LinkOp::SetUp { .. } => link.up = true,
                LinkOp::AddAddress { address, .. } => {
                    link.addresses.insert(*address);
                }
                LinkOp::DeleteAddress { address, .. } => {
                    link.addresses.remove(address);
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl RoutingDataplane for FakeRouting {
    async fn observe(&mut self, table: u32) -> Result<RoutingState, DataplaneError> {
        let state = self.0.state();
        Ok(RoutingState {
            routes: state
                .routes
                .iter()
                .filter(|r| r.table == table)
                .cloned()
                .collect(),
            rules: state
                .rules
                .iter()
                .filter(|r| r.table == table)
                .copied()
                .collect(),
        })
    }

    async fn apply(&mut self, ops: &[RouteOp]) -> Result<(), DataplaneError> {
        let mut state = self.0.state();
        FakeKernel::check_fail(&mut state)?;
        for op in ops {
            state.log.push(format!("{}: {op}", op.kind()));
            match op {
                RouteOp::AddRoute(r) => {
                    if let RouteKind::Device { interface } = &r.kind
                        && !state.links.contains_key(interface)
                    {
                        return Err(missing(op));
                    }
                    state.routes.insert(r.clone());
                }
                RouteOp::DeleteRoute(r) => {
                    state.routes.remove(r);
                }
                RouteOp::AddRule(r) => {
                    state.rules.insert(*r);
                }
                RouteOp::DeleteRule(r) => {
                    state.rules.remove(r);
                }
            }
        }
        Ok(())
    }
}

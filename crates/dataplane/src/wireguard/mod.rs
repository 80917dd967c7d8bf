//! The WireGuard subsystem's adapters: the kernel module ([`kernel`]), wireguard-go over its
//! UAPI socket ([`userspace`]) and the choice between them ([`backend`]). The model and the
//! pure plan are `wiremesh_core::dataplane::wireguard`.

pub mod backend;
pub mod kernel;
pub mod userspace;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_trait::async_trait;
use wiremesh_core::dataplane::wireguard::{DeviceState, WgOp};

use crate::{Backend, DataplaneError};

/// Reads the devices (keys, peers, counters, handshakes); never changes anything. Every
/// backend's reader is also a cheap, separate handle (its own UAPI connection or netlink
/// request), so the metrics scrape never waits for the reconcile loop.
#[async_trait]
pub trait WireguardStats: Send + Sync {
    /// Device `name`, `None` when there is no such WireGuard device.
    async fn read_device(&self, name: &str) -> Result<Option<DeviceState>, DataplaneError>;

    /// The devices among `names` that exist.
    async fn read_devices(
        &self,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, DeviceState>, DataplaneError> {
        let mut out = BTreeMap::new();
        for name in names {
            if let Some(state) = self.read_device(name).await? {
                out.insert(name.clone(), state);
            }
        }
        Ok(out)
    }
}

/// One WireGuard backend: observing is reading the devices; applying changes them.
#[async_trait]
pub trait WireguardDataplane: WireguardStats {
    fn backend(&self) -> Backend;

    async fn apply(&mut self, ops: &[WgOp]) -> Result<(), DataplaneError>;

    /// A separate, read-only handle on the devices for the metrics scrape, which runs outside
    /// the reconcile loop. `None`: no statistics.
    fn stats_reader(&self) -> Option<Arc<dyn WireguardStats>>;

    /// The devices among `names` that exist.
    async fn observe(
        &mut self,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, DeviceState>, DataplaneError> {
        self.read_devices(names).await
    }
}

//! The mesh's three kernel subsystems (WireGuard, links, routes and rules) as the loop drives
//! them: `desired()` from the snapshot and this node's keys, then observe -> plan -> apply in
//! the one order that never steers traffic into something not ready (routing deletes, devices
//! and peers, links, routing adds).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use tracing::{info, warn};
use wiremesh_core::config::{FALLBACK_HOST_MTU, WireguardSettings};
use wiremesh_core::dataplane::{link, routing, wireguard};
use wiremesh_core::keys::PrivateKey;
use wiremesh_core::mesh::{self, DataplaneSpec, Inputs, LocalFacts};
use wiremesh_core::model::{Family, NodeResource, WgKey};
use wiremesh_dataplane::Backend;
use wiremesh_dataplane::link::LinkDataplane;
use wiremesh_dataplane::route::RoutingDataplane;
use wiremesh_dataplane::wireguard::{WireguardDataplane, WireguardStats};

use crate::keystore::KeyStore;
use crate::outcome::{Outcome, ReconcileError, Stopwatch};
use crate::settings::AgentSettings;
use crate::status_file::unix_now;

/// Where the names of the devices we created are kept, so a rename or a restart still knows
/// them.
const INTERFACES_FILE: &str = "interfaces.json";

pub struct MeshSubsystems<W, L, R> {
    wg: W,
    links: L,
    routing: R,
    keys: KeyStore,
    loaded_keys: BTreeMap<Family, PrivateKey>,
    state_dir: PathBuf,
    /// Names of the devices we programmed (persisted).
    created_interfaces: BTreeSet<String>,
    /// When each peer key was last set by this agent (Unix seconds).
    programmed_at: BTreeMap<WgKey, u64>,
    /// Each peer's datastore endpoint as of the last successful WireGuard apply, so a roamed
    /// peer keeps its learned endpoint until the datastore moves it.
    programmed_endpoints: BTreeMap<(String, WgKey), SocketAddr>,
    /// Host encryption: the settings of the last `desired` when it was on, the confirmed peers
    /// it used, and those the latest observation of the devices shows (a difference is a reason
    /// for a pass: a handshake just completed, or our key changed).
    host_encryption: Option<WireguardSettings>,
    confirmed_used: BTreeMap<Family, BTreeSet<WgKey>>,
    confirmed_seen: BTreeMap<Family, BTreeSet<WgKey>>,
}

impl<W: WireguardDataplane, L: LinkDataplane, R: RoutingDataplane> MeshSubsystems<W, L, R> {
    pub fn new(wg: W, links: L, routing: R, state_dir: PathBuf) -> Self {
        let created_interfaces = std::fs::read(state_dir.join(INTERFACES_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        MeshSubsystems {
            wg,
            links,
            routing,
            keys: KeyStore::new(&state_dir),
            loaded_keys: BTreeMap::new(),
            state_dir,
            created_interfaces,
            programmed_at: BTreeMap::new(),
            programmed_endpoints: BTreeMap::new(),
            host_encryption: None,
            confirmed_used: BTreeMap::new(),
            confirmed_seen: BTreeMap::new(),
        }
    }

    pub fn backend(&self) -> Backend {
        self.wg.backend()
    }

    /// The read-only handle the metrics scrape uses.
    pub fn stats_reader(&self) -> Option<Arc<dyn WireguardStats>> {
        self.wg.stats_reader()
    }

    /// When this agent last set the peer with `key` (Unix seconds).
    pub fn programmed_at(&self, key: &WgKey) -> Option<u64> {
        self.programmed_at.get(key).copied()
    }

    /// The smallest MTU of the host's uplinks (Felix's fallback when there is none).
    pub async fn host_mtu(&mut self) -> Result<u32, ReconcileError> {
        Ok(self.links.host_mtu().await?.unwrap_or(FALLBACK_HOST_MTU))
    }

    /// Whether a key rotation waits (`wiremesh rotate-key`, or the schedule).
    pub fn rotation_pending(&self) -> bool {
        Family::ALL.iter().any(|f| self.keys.rotation_pending(*f))
    }

    /// Requests a rotation of every key older than `interval` (the schedule).
    fn rotate_when_due(
        &mut self,
        interval: Option<std::time::Duration>,
    ) -> Result<(), ReconcileError> {
        let Some(interval) = interval.filter(|i| !i.is_zero()) else {
            return Ok(());
        };
        for family in self.loaded_keys.keys().copied().collect::<Vec<_>>() {
            let due = self
                .keys
                .written_at(family)
                .and_then(|at| at.elapsed().ok())
                .is_some_and(|age| age >= interval);
            if due && !self.keys.rotation_pending(family) {
                info!(%family, interval = ?interval, "the WireGuard key is due for rotation");
                self.keys
                    .request_rotation(family)
                    .map_err(|source| ReconcileError::Keys { family, source })?;
            }
        }
        Ok(())
    }

    fn key(&mut self, family: Family) -> Result<PrivateKey, ReconcileError> {
        let rotated = self
            .keys
            .take_rotation(family)
            .map_err(|source| ReconcileError::Keys { family, source })?;
        if let Some(new) = rotated {
            info!(
                %family,
                old_public_key = ?self.loaded_keys.get(&family).map(|k| k.public_key().to_string()),
                new_public_key = %new.public_key(),
                "rotating the WireGuard key: the device and the published key switch in this pass"
            );
            self.loaded_keys.insert(family, new.clone());
            return Ok(new);
        }
        if let Some(k) = self.loaded_keys.get(&family) {
            return Ok(k.clone());
        }
        let (key, created) = self
            .keys
            .load_or_generate(family)
            .map_err(|source| ReconcileError::Keys { family, source })?;
        if created {
            info!(%family, public_key = %key.public_key(), "generated new private/public key pair");
        } else {
            info!(%family, public_key = %key.public_key(), "loaded private key from state directory");
        }
        self.loaded_keys.insert(family, key.clone());
        Ok(key)
    }

    /// The desired mesh: this node's keys for the enabled families (generated once), with host
    /// encryption the peers confirmed by a handshake (the devices are read for that), then the
    /// pure `mesh::desired`.
    pub async fn desired(
        &mut self,
        agent: &AgentSettings,
        settings: WireguardSettings,
        nodes: &BTreeMap<String, NodeResource>,
        host_mtu: u32,
    ) -> Result<DataplaneSpec, ReconcileError> {
        self.rotate_when_due(settings.key_rotation)?;
        let mut private_keys = BTreeMap::new();
        for family in Family::ALL {
            if settings.family(family).enabled {
                private_keys.insert(family, self.key(family)?);
            }
        }
        let confirmed_peers = if settings.host_encryption {
            self.host_encryption = Some(settings.clone());
            let names = settings
                .enabled_families()
                .map(|f| settings.family(f).interface_name.clone())
                .collect();
            let devices = self.wg.observe(&names).await?;
            self.confirmed_seen = self.confirmed_peers(&devices);
            self.confirmed_seen.clone()
        } else {
            self.host_encryption = None;
            BTreeMap::new()
        };
        self.confirmed_used = confirmed_peers.clone();
        Ok(mesh::desired(&Inputs {
            local: LocalFacts {
                node_name: agent.node_name.clone(),
                private_keys,
                fwmark: agent.fwmark,
                routing_table: agent.routing_table,
                host_mtu,
                previous_interfaces: self.created_interfaces.clone(),
                confirmed_peers,
            },
            settings,
            nodes: nodes.clone(),
        }))
    }

    /// Observe, plan and apply every subsystem, in order: rules and routes go first when
    /// removed and last when added, so traffic is never steered into a table or device that
    /// is not ready.
    pub async fn converge(
        &mut self,
        spec: &DataplaneSpec,
        outcome: &mut Outcome,
        stopwatch: &mut Stopwatch,
    ) -> Result<(), ReconcileError> {
        let routing_actual = self.routing.observe(spec.routing_table).await?;
        let (route_deletes, route_adds): (Vec<_>, Vec<_>) = routing::plan(spec, &routing_actual)
            .into_iter()
            .partition(|op| op.is_delete());
        self.routing.apply(&route_deletes).await?;
        outcome.applied("routing", &route_deletes, |op| op.kind());
        stopwatch.lap(outcome, "routing");

        let wg_ops = self.wireguard_plan(spec).await?;
        self.wg.apply(&wg_ops).await?;
        self.programmed(spec, &wg_ops);
        outcome.applied("wireguard", &wg_ops, |op| op.kind());
        stopwatch.lap(outcome, "wireguard");

        let device_names = device_names(spec);
        let link_actual = self.links.observe(&device_names).await?;
        let link_ops = link::plan(spec, &link_actual);
        self.links.apply(&link_ops).await?;
        outcome.applied("link", &link_ops, |op| op.kind());
        stopwatch.lap(outcome, "link");

        self.routing.apply(&route_adds).await?;
        outcome.applied("routing", &route_adds, |op| op.kind());
        stopwatch.lap(outcome, "routing");
        Ok(())
    }

    /// How many WireGuard operations would bring the devices back to `spec` (the last applied
    /// one): the cheap check between full passes for changes made with `wg set`.
    pub async fn wireguard_drift(&mut self, spec: &DataplaneSpec) -> Result<usize, ReconcileError> {
        Ok(self.wireguard_plan(spec).await?.len())
    }

    /// Host encryption: whether the devices now show other confirmed peers than the last
    /// `desired` used (seen by the last observation, e.g. the device check).
    pub fn confirmations_changed(&self) -> bool {
        self.host_encryption.is_some() && self.confirmed_seen != self.confirmed_used
    }

    /// Per enabled family, the peers proven to hold our current key (`wireguard::confirmed_peers`).
    fn confirmed_peers(
        &self,
        devices: &BTreeMap<String, wireguard::DeviceState>,
    ) -> BTreeMap<Family, BTreeSet<WgKey>> {
        let Some(settings) = &self.host_encryption else {
            return BTreeMap::new();
        };
        let mut out = BTreeMap::new();
        for family in settings.enabled_families() {
            let (Some(device), Some(key)) = (
                devices.get(&settings.family(family).interface_name),
                self.loaded_keys.get(&family),
            ) else {
                continue;
            };
            let written = self
                .keys
                .written_at(family)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let keys =
                wireguard::confirmed_peers(device, &key.public_key(), written, SystemTime::now());
            out.insert(family, keys);
        }
        out
    }

    /// Observe the devices and plan what brings them to `spec` (keeping learned endpoints).
    async fn wireguard_plan(
        &mut self,
        spec: &DataplaneSpec,
    ) -> Result<Vec<wireguard::WgOp>, ReconcileError> {
        let actual = self.wg.observe(&spec.owned_interfaces).await?;
        if self.host_encryption.is_some() {
            self.confirmed_seen = self.confirmed_peers(&actual);
        }
        Ok(wireguard::plan_with(
            spec,
            &actual,
            Some(wireguard::Learned {
                now: SystemTime::now(),
                programmed: &self.programmed_endpoints,
            }),
        ))
    }

    /// Remembers what the WireGuard apply just did: each peer's datastore endpoint, when each
    /// peer was set, and the devices that exist (persisted).
    fn programmed(&mut self, spec: &DataplaneSpec, ops: &[wireguard::WgOp]) {
        self.programmed_endpoints = spec
            .devices
            .values()
            .flat_map(|d| {
                d.peers
                    .iter()
                    .map(|(key, peer)| ((d.name.clone(), *key), peer.endpoint))
            })
            .collect();
        let now = unix_now();
        for op in ops {
            match op {
                wireguard::WgOp::SetPeer { public_key, .. } => {
                    self.programmed_at.insert(*public_key, now);
                }
                wireguard::WgOp::RemovePeer { public_key, .. } => {
                    self.programmed_at.remove(public_key);
                }
                _ => {}
            }
        }
        let names = device_names(spec);
        if names != self.created_interfaces {
            self.created_interfaces = names;
            let path = self.state_dir.join(INTERFACES_FILE);
            let result = serde_json::to_vec(&self.created_interfaces)
                .map_err(std::io::Error::other)
                .and_then(|body| std::fs::write(&path, body));
            if let Err(e) = result {
                warn!(error = %e, path = %path.display(), "could not record our interface names");
            }
        }
    }
}

/// The names of the devices `spec` wants.
pub fn device_names(spec: &DataplaneSpec) -> BTreeSet<String> {
    spec.devices.values().map(|d| d.name.clone()).collect()
}

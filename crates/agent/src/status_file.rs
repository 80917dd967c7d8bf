//! `<state-dir>/status.json`: what the agent last did and saw, for `wiremesh status` and tests.
//! Written atomically after every run of the loop.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use wiremesh_core::mesh::{DataplaneSpec, PeerSpec, SkippedNode};
use wiremesh_core::model::{Family, WgKey};
use wiremesh_dataplane::Backend;
use wiremesh_datastore::SyncState;

/// The file's name in the state directory.
pub const FILE_NAME: &str = "status.json";

/// What the agent last did and saw, written to `<state-dir>/status.json` for `wiremesh status`
/// and tests.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AgentStatus {
    pub node: String,
    pub backend: Option<Backend>,
    pub enabled: BTreeMap<Family, bool>,
    pub devices: Vec<DeviceStatus>,
    pub skipped: Vec<SkippedNode>,
    pub config_errors: Vec<String>,
    /// Nodes whose object does not decode, peered as their last good version was.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stale_nodes: Vec<String>,
    /// Host-endpoint policy objects that failed validation (skipped, or kept at their last
    /// valid version).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policy_errors: Vec<String>,
    pub last_error: Option<String>,
    pub reconciles: u64,
    /// Unix time (seconds) this file was written.
    pub updated_at: u64,
    /// Unix time of the last successful run.
    pub last_success_at: Option<u64>,
    /// Synced with the datastore and applied successfully at least once.
    pub ready: bool,
    /// The agent's resync period in seconds (how stale `updatedAt` may normally get).
    pub resync_seconds: u64,
    /// How current the agent's view of the datastore is (written within a second of a change).
    pub datastore: Option<SyncState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    pub family: Family,
    pub interface: String,
    pub public_key: WgKey,
    pub listen_port: u16,
    pub mtu: u32,
    /// The peers the agent wants, derived from what each node published.
    pub peers: Vec<PeerStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    pub public_key: WgKey,
    #[serde(flatten)]
    pub spec: PeerSpec,
    /// Unix time this agent last set the peer (`None`: before this agent started).
    pub programmed_at: Option<u64>,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AgentStatus {
    /// Records the mesh `spec` asks for: the enabled families, each device with its peers (and
    /// when this agent last set each, from `programmed_at`), and the nodes skipped.
    pub fn record_mesh(
        &mut self,
        spec: &DataplaneSpec,
        programmed_at: impl Fn(&WgKey) -> Option<u64>,
    ) {
        self.enabled = Family::ALL
            .iter()
            .map(|f| (*f, spec.devices.contains_key(f)))
            .collect();
        self.devices = spec
            .devices
            .values()
            .map(|d| DeviceStatus {
                family: d.family,
                interface: d.name.clone(),
                public_key: d.private_key.public_key(),
                listen_port: d.listen_port,
                mtu: d.mtu,
                peers: d
                    .peers
                    .iter()
                    .map(|(key, peer)| PeerStatus {
                        public_key: *key,
                        spec: peer.clone(),
                        programmed_at: programmed_at(key),
                    })
                    .collect(),
            })
            .collect();
        self.skipped = spec.skipped.iter().cloned().collect();
    }

    /// Reads `<state_dir>/status.json`; `Ok(None)` when there is none.
    pub fn read(state_dir: &Path) -> Result<Option<AgentStatus>, StatusFileError> {
        let path = state_dir.join(FILE_NAME);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StatusFileError::Read { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StatusFileError::Decode { path, source })
    }

    /// Writes `<state_dir>/status.json` atomically (a temporary file, then a rename).
    pub fn write(&self, state_dir: &Path) -> std::io::Result<()> {
        let path = state_dir.join(FILE_NAME);
        let tmp = state_dir.join(format!("{FILE_NAME}.tmp"));
        let body = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, &path)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusFileError {
    #[error("reading {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("decoding {path}")]
    Decode {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

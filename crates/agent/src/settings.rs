//! The agent's own settings: what comes from its flags, not from FelixConfiguration.

use std::path::PathBuf;
use std::time::Duration;

/// Agent settings that come from flags, not from FelixConfiguration.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub node_name: String,
    pub state_dir: PathBuf,
    pub fwmark: u32,
    pub routing_table: u32,
    /// Full resync even without datastore changes (Felix's RouteRefreshInterval: 90 s).
    pub resync_interval: Duration,
    /// Least time between two runs; changes arriving meanwhile are coalesced.
    pub min_interval: Duration,
    /// How often the WireGuard devices are compared with what was last applied, so a change
    /// made with `wg set` (which sends no notification) is repaired within this time instead
    /// of at the next resync.
    pub device_check_interval: Duration,
    /// After a deliberate stop, pod traffic to encrypting nodes that would leave in clear is
    /// dropped for this long (`guard::hold_script`); zero: not at all.
    pub shutdown_hold: Duration,
}

impl AgentSettings {
    pub fn new(node_name: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        AgentSettings {
            node_name: node_name.into(),
            state_dir: state_dir.into(),
            fwmark: wiremesh_core::config::DEFAULT_FWMARK,
            routing_table: wiremesh_core::config::DEFAULT_ROUTING_TABLE,
            resync_interval: Duration::from_secs(90),
            min_interval: Duration::from_millis(50),
            device_check_interval: Duration::from_secs(1),
            shutdown_hold: Duration::from_secs(60),
        }
    }

    /// How long the loop may go without an iteration before `/healthz` fails: twice the resync
    /// interval (the loop wakes at least that often) plus a margin.
    pub fn stale_after(&self) -> Duration {
        stale_after(self.resync_interval)
    }
}

/// See [`AgentSettings::stale_after`].
pub fn stale_after(resync_interval: Duration) -> Duration {
    resync_interval * 2 + Duration::from_secs(30)
}

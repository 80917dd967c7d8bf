//! Host-endpoint policy as a subsystem of the loop, like the mesh's: validate the policy
//! objects (a bad edit keeps the object's last valid version), the pure desired table
//! (`policy::desired_filter`), then observe -> plan -> apply on our nftables table.

use std::sync::Arc;

use wiremesh_core::dataplane::filter;
use wiremesh_core::guard::{EncryptionGuard, add_guard};
use wiremesh_core::policy::render::FilterSpec;
use wiremesh_core::policy::{PolicyInputs, PolicyResources, PolicySettings, desired_filter};
use wiremesh_core::wire::RawPolicyResources;
use wiremesh_dataplane::nft::{CounterReader, FilterDataplane};

use crate::outcome::{Outcome, ReconcileError};

pub struct PolicySubsystem {
    filter: Box<dyn FilterDataplane>,
    /// Last valid version of every policy object, so a bad edit keeps the previous one.
    last_good: RawPolicyResources,
    /// Enforce policy on this node's pods (`--pod-policy`).
    pub pods: bool,
}

impl PolicySubsystem {
    pub fn new(filter: Box<dyn FilterDataplane>) -> Self {
        PolicySubsystem {
            filter,
            last_good: RawPolicyResources::default(),
            pods: true,
        }
    }

    /// Our table changed behind our back: observe it afresh on the next pass.
    pub fn forget_observation(&mut self) {
        self.filter.forget_observation();
    }

    /// The read-only handle the metrics scrape uses for the table's counters.
    pub fn counter_reader(&self) -> Option<Arc<dyn CounterReader>> {
        self.filter.counter_reader()
    }

    /// Runs `nft -f` text against our table outside the plan (the shutdown hold).
    pub async fn apply_script(&mut self, text: &str) -> Result<(), ReconcileError> {
        Ok(self.filter.apply_script(text).await?)
    }

    /// The objects validated; one that fails keeps its last valid version (both are in
    /// `errors`, which the loop reports).
    pub fn validate(&mut self, raw: &RawPolicyResources) -> PolicyResources {
        PolicyResources::from_raw_keeping_last_good(raw, &mut self.last_good)
    }

    /// Builds node `node`'s table from `resources` and makes the kernel's match it. Returns
    /// the table applied (its counters are named for the metrics).
    pub async fn converge(
        &mut self,
        node: &str,
        resources: &PolicyResources,
        settings: PolicySettings,
        guard: &EncryptionGuard,
        outcome: &mut Outcome,
    ) -> Result<FilterSpec, ReconcileError> {
        // Host endpoints identified by expectedIPs only need this host's interface addresses.
        let local_interfaces = if resources
            .host_endpoints
            .iter()
            .any(|h| h.node == node && h.interface_name.is_none())
        {
            self.filter.local_interfaces().await?
        } else {
            Default::default()
        };
        let mut desired = desired_filter(&PolicyInputs {
            node,
            resources: Some(resources),
            local_interfaces,
            settings: PolicySettings {
                pods: self.pods,
                ..settings
            },
        });
        add_guard(&mut desired, guard);
        let actual = self.filter.observe().await?;
        let ops = filter::plan(&desired, &actual);
        self.filter.apply(&ops).await?;
        outcome.applied("nftables", &ops, |op| op.kind());
        Ok(desired)
    }
}

//! What one pass of the loop did (operations by subsystem, time per step) or why it failed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tracing::info;
use wiremesh_core::model::Family;
use wiremesh_dataplane::DataplaneError;
use wiremesh_datastore::DatastoreError;

use crate::keystore::KeyError;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("loading the {family} private key")]
    Keys {
        family: Family,
        #[source]
        source: KeyError,
    },
    #[error("programming the dataplane")]
    Dataplane(#[from] DataplaneError),
    #[error("publishing this node's WireGuard fields")]
    Publish(#[from] DatastoreError),
}

impl ReconcileError {
    /// A short, stable label for metrics (`wiremesh_reconcile_failures_total{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            ReconcileError::Keys { .. } => "keys",
            ReconcileError::Dataplane(e) => match e.kind() {
                "observe" => "dataplane_observe",
                "apply" => "dataplane_apply",
                "not_wireguard" => "dataplane_not_wireguard",
                "no_backend" => "dataplane_no_backend",
                _ => "dataplane_timeout",
            },
            ReconcileError::Publish(_) => "publish",
        }
    }

    pub fn is_transient(&self) -> bool {
        match self {
            ReconcileError::Keys { .. } => false,
            ReconcileError::Dataplane(e) => e.is_transient(),
            ReconcileError::Publish(e) => e.is_transient(),
        }
    }
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Operation counts by subsystem and kind, e.g. `("wireguard", "set_peer") -> 2`.
    pub ops: BTreeMap<(&'static str, &'static str), usize>,
    pub published: bool,
    /// Time spent per step of the run: `desired`, `routing` (observe, deletes and adds),
    /// `wireguard` (observe and apply), `link`, `publish`, `policy`.
    pub durations: BTreeMap<&'static str, Duration>,
}

impl Outcome {
    pub fn total_ops(&self) -> usize {
        self.ops.values().sum()
    }

    /// Counts applied ops and logs each change once at info (a summary when there are many).
    /// Called after a successful apply, so a failing change that is retried is not logged
    /// again as done (the failure is logged with the error).
    pub fn applied<T: std::fmt::Display>(
        &mut self,
        subsystem: &'static str,
        ops: &[T],
        kind: impl Fn(&T) -> &'static str,
    ) {
        const DETAIL_LIMIT: usize = 16;
        for (i, op) in ops.iter().enumerate() {
            *self.ops.entry((subsystem, kind(op))).or_default() += 1;
            if i < DETAIL_LIMIT {
                info!(subsystem, "{op}");
            }
        }
        if ops.len() > DETAIL_LIMIT {
            info!(
                subsystem,
                more = ops.len() - DETAIL_LIMIT,
                "further dataplane changes not shown"
            );
        }
    }
}

/// Adds the time since the last lap to a step of [`Outcome::durations`].
pub struct Stopwatch(Instant);

impl Stopwatch {
    pub fn start() -> Stopwatch {
        Stopwatch(Instant::now())
    }

    pub fn lap(&mut self, outcome: &mut Outcome, step: &'static str) {
        let now = Instant::now();
        *outcome.durations.entry(step).or_default() += now - self.0;
        self.0 = now;
    }
}

//! Problems with datastore objects (an invalid FelixConfiguration field, a node that cannot be
//! peered, an invalid policy object): logged once when they appear and turned into
//! [`ObjectProblem`]s, which the datastore reports where the object's owner looks (a Kubernetes
//! Event on it).

use std::collections::BTreeSet;

use tracing::{info, warn};
use wiremesh_core::config::{ConfigFieldError, UnknownField};
use wiremesh_core::mesh::{SkipReason, SkippedNode, StaleNode};
use wiremesh_core::policy::ValidationError;
use wiremesh_datastore::{ObjectProblem, ProblemObject};

/// What was reported last, so each problem is reported once, when it appears.
#[derive(Debug, Default)]
pub struct Reports {
    config_errors: Vec<String>,
    unknown_fields: Vec<UnknownField>,
    stale_nodes: Vec<StaleNode>,
    skipped: BTreeSet<SkippedNode>,
    policy_errors: Vec<String>,
    pending: Vec<ObjectProblem>,
}

impl Reports {
    /// Invalid FelixConfiguration fields; returns them as text for the status file.
    pub fn config(&mut self, errors: &[ConfigFieldError]) -> Vec<String> {
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        for (error, message) in errors.iter().zip(&text) {
            if !self.config_errors.contains(message) {
                warn!(error = %message, "FelixConfiguration field does not take effect");
                self.pending.push(ObjectProblem {
                    object: ProblemObject::FelixConfiguration(error.object.clone()),
                    reason: "InvalidFelixConfiguration".to_string(),
                    message: message.clone(),
                });
            }
        }
        self.config_errors = text.clone();
        text
    }

    /// Fields no Felix has: a warning (and an Event) when one appears.
    pub fn unknown_fields(&mut self, unknown: &[UnknownField]) {
        for field in unknown.iter().filter(|f| !self.unknown_fields.contains(f)) {
            warn!(object = %field.object, field = %field.field, "FelixConfiguration has a field no Felix has; it is ignored");
            self.pending.push(ObjectProblem {
                object: ProblemObject::FelixConfiguration(field.object.clone()),
                reason: "UnknownFelixConfigurationField".to_string(),
                message: field.to_string(),
            });
        }
        self.unknown_fields = unknown.to_vec();
    }

    /// Nodes whose object does not decode and whose last good version stays in use; returns
    /// them as text for the status file.
    pub fn stale_nodes(&mut self, stale: &[StaleNode]) -> Vec<String> {
        for node in stale.iter().filter(|n| !self.stale_nodes.contains(n)) {
            warn!(node = %node.node, error = %node.error, "node object does not decode; its last good version stays in use");
            self.pending.push(ObjectProblem {
                object: ProblemObject::Node(node.node.clone()),
                reason: "UndecodableNode".to_string(),
                message: node.to_string(),
            });
        }
        self.stale_nodes = stale.to_vec();
        stale.iter().map(ToString::to_string).collect()
    }

    /// Nodes not peered, and nodes peered again.
    pub fn skipped(&mut self, skipped: &BTreeSet<SkippedNode>) {
        if *skipped == self.skipped {
            return;
        }
        for s in skipped.difference(&self.skipped) {
            warn!(node = %s.node, family = %s.family, reason = %s.reason, "not peering with node");
            if let Some(problem) = skipped_problem(s) {
                self.pending.push(problem);
            }
        }
        for s in self.skipped.difference(skipped) {
            if !skipped
                .iter()
                .any(|n| n.node == s.node && n.family == s.family)
            {
                info!(node = %s.node, family = %s.family, "node no longer skipped");
            }
        }
        self.skipped = skipped.clone();
    }

    /// Invalid policy objects; returns them as text for the status file.
    pub fn policy(&mut self, errors: &[ValidationError]) -> Vec<String> {
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        for (error, message) in errors.iter().zip(&text) {
            if !self.policy_errors.contains(message) {
                warn!(error = %message, "invalid policy object");
                self.pending.push(policy_problem(error));
            }
        }
        self.policy_errors = text.clone();
        text
    }

    /// The problems seen since the last call, for `Datastore::report`.
    pub fn take(&mut self) -> Vec<ObjectProblem> {
        std::mem::take(&mut self.pending)
    }
}

/// The problem to report for a skipped node, if it is one (a node without a key is normal:
/// WireGuard is off there or not started yet).
fn skipped_problem(skipped: &SkippedNode) -> Option<ObjectProblem> {
    let reason = match &skipped.reason {
        SkipReason::NoKey | SkipReason::NoUnderlayAddress => return None,
        SkipReason::MalformedKey { .. } => "MalformedWireguardKey",
        SkipReason::KeyCollision { .. } => "WireguardKeyCollision",
        SkipReason::MalformedUnderlayAddress { .. } => "MalformedNodeAddress",
        SkipReason::MalformedPodCidr { .. } => "MalformedPodCIDR",
        SkipReason::MalformedInterfaceAddress { .. } => "MalformedWireguardInterfaceAddress",
        SkipReason::Undecodable { .. } => "UndecodableNode",
        SkipReason::PodCidrConflict { .. } => "PodCIDRConflict",
    };
    Some(ObjectProblem {
        object: ProblemObject::Node(skipped.node.clone()),
        reason: reason.to_string(),
        message: format!("not peered for {}: {}", skipped.family, skipped.reason),
    })
}

/// The problem to report for a policy object that failed validation: `Invalid<Kind>` on it.
fn policy_problem(error: &ValidationError) -> ObjectProblem {
    // Validation names namespaced objects `namespace/name`.
    let (namespace, name) = match error.name.split_once('/') {
        Some((ns, name)) if error.kind.namespaced() => (Some(ns.to_string()), name.to_string()),
        _ => (None, error.name.clone()),
    };
    ObjectProblem {
        object: ProblemObject::Policy {
            kind: error.kind,
            namespace,
            name,
        },
        reason: format!("Invalid{}", error.kind),
        message: error.to_string(),
    }
}

//! Routes in our routing table and the policy rule that sends unmarked traffic to it.
//! We only ever delete routes carrying our protocol number, and rules pointing at our table.

use std::collections::BTreeSet;
use std::fmt;

use crate::mesh::{DataplaneSpec, RouteSpec, RuleSpec};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingState {
    /// Routes in our table that carry our protocol.
    pub routes: BTreeSet<RouteSpec>,
    /// Rules (both families) whose table is ours.
    pub rules: BTreeSet<RuleSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteOp {
    // The order of the variants is the order of application.
    DeleteRule(RuleSpec),
    DeleteRoute(RouteSpec),
    AddRoute(RouteSpec),
    AddRule(RuleSpec),
}

impl RouteOp {
    pub fn kind(&self) -> &'static str {
        match self {
            RouteOp::DeleteRule(_) => "delete_rule",
            RouteOp::DeleteRoute(_) => "delete_route",
            RouteOp::AddRoute(_) => "add_route",
            RouteOp::AddRule(_) => "add_rule",
        }
    }

    pub fn is_delete(&self) -> bool {
        matches!(self, RouteOp::DeleteRule(_) | RouteOp::DeleteRoute(_))
    }
}

impl fmt::Display for RouteOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rule = |r: &RuleSpec| {
            format!(
                "{}rule pref {} {}fwmark {:#x}/{:#x} lookup {}",
                if r.family == crate::model::Family::V6 {
                    "-6 "
                } else {
                    ""
                },
                r.priority,
                if r.invert { "not " } else { "" },
                r.fwmark,
                r.mask,
                r.table
            )
        };
        let route = |r: &RouteSpec| match &r.kind {
            crate::mesh::RouteKind::Device { interface } => {
                format!("route {} dev {interface} table {}", r.dest, r.table)
            }
            crate::mesh::RouteKind::Throw => format!("route throw {} table {}", r.dest, r.table),
        };
        match self {
            RouteOp::DeleteRule(r) => write!(f, "delete {}", rule(r)),
            RouteOp::AddRule(r) => write!(f, "add {}", rule(r)),
            RouteOp::DeleteRoute(r) => write!(f, "delete {}", route(r)),
            RouteOp::AddRoute(r) => write!(f, "add {}", route(r)),
        }
    }
}

/// Deletes before adds; within them rules are removed first and added last, so traffic is
/// never steered into the table before its routes exist.
pub fn plan(desired: &DataplaneSpec, actual: &RoutingState) -> Vec<RouteOp> {
    let mut ops: Vec<RouteOp> = Vec::new();
    ops.extend(
        actual
            .rules
            .difference(&desired.rules)
            .copied()
            .map(RouteOp::DeleteRule),
    );
    ops.extend(
        actual
            .routes
            .difference(&desired.routes)
            .cloned()
            .map(RouteOp::DeleteRoute),
    );
    ops.extend(
        desired
            .routes
            .difference(&actual.routes)
            .cloned()
            .map(RouteOp::AddRoute),
    );
    ops.extend(
        desired
            .rules
            .difference(&actual.rules)
            .copied()
            .map(RouteOp::AddRule),
    );
    ops.sort();
    ops
}

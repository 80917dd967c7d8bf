//! Calico host-endpoint policy: validation of the wire types into the domain ([`resources`]),
//! the validated model ([`model`]), pods as workload endpoints and their profiles
//! ([`workload`]), the per-node evaluation program ([`program`]), a pure packet evaluator
//! ([`explain`]), the nftables rendering ([`render`]), and the findings of `wiremesh policy
//! unused` ([`analysis`]). The filter subsystem's desired state is [`desired_filter`]. See
//! docs/policy.md.

pub mod analysis;
pub mod explain;
pub mod model;
pub mod program;
pub mod render;
pub mod resources;
#[cfg(test)]
mod tests;
pub mod workload;

pub use explain::{Outcome, Packet, PacketPath, Reason, Verdict, explain};
pub use model::{Action, Direction, Policy, Protocol};
pub use program::{FailsafePort, Hook, Iface, PolicyInputs, PolicySettings, Program, compile};

/// The desired state of the filter subsystem: our nftables table for `inputs` (compiled for
/// the node, then rendered). Pure; no table at all when no host endpoint applies.
pub fn desired_filter(inputs: &PolicyInputs<'_>) -> render::FilterSpec {
    render::render(&compile(inputs))
}
pub use resources::{PolicyResources, ValidationError};

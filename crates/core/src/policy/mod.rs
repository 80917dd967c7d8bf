//! Calico host-endpoint policy: resources and validation ([`resources`]), the validated model
//! ([`model`]), the per-node evaluation program ([`program`]), a pure packet evaluator
//! ([`explain`]) and the nftables rendering ([`render`]). See docs/policy.md.

pub mod analysis;
pub mod explain;
pub mod manifest;
pub mod model;
pub mod program;
pub mod render;
pub mod resources;
#[cfg(test)]
mod tests;

pub use explain::{Outcome, Packet, PacketPath, Reason, Verdict, explain};
pub use model::{Action, Direction, Policy, Protocol};
pub use program::{FailsafePort, Hook, Iface, PolicyInputs, PolicySettings, Program, compile};
pub use resources::{Kind, PolicyResources, RawPolicyResources, ValidationError};

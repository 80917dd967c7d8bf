//! wiremesh's pure core: everything the agent decides, with no I/O.
//!
//! - [`wire`]: Calico's `projectcalico.org/v3` resources, one serde type per kind (also the
//!   source of the CRDs), and the one decoder every datastore and tool uses;
//! - [`model`], [`keys`]: the validated domain (keys, families, nodes, the cluster snapshot);
//! - [`config`]: the effective configuration built once from FelixConfiguration;
//! - [`selector`], [`policy`]: Calico's selector language and policy model, compiled per node,
//!   explained per packet and rendered to nftables;
//! - [`mesh`]: `desired()`, the WireGuard dataplane as a pure function of the snapshot;
//! - [`manifest`]: YAML/JSON manifests with positions, validated as the agent validates;
//! - [`dataplane`]: per kernel subsystem, what the kernel holds, the operations and the pure
//!   `plan()` from desired to actual.
//!
//! The dependency rules (this crate depends on nothing of ours, and on no async runtime,
//! datastore client or netlink crate) are stated in docs/architecture.md and checked by
//! tests/layers.rs.

pub mod config;
pub mod dataplane;
pub mod guard;
pub mod keys;
pub mod manifest;
pub mod mesh;
pub mod model;
pub mod policy;
pub mod selector;
pub mod wire;

/// `error: cause: cause` on one line, for logs, status and the command line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

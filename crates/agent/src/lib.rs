//! The wiremesh node agent: one level-triggered reconcile loop ([`reconcile`]) joining the
//! datastore (`wiremesh_datastore`) and the kernel subsystems (`wiremesh_dataplane`) through
//! the pure core (`wiremesh_core`). Each subsystem has its module ([`mesh`]: WireGuard, links,
//! routes and rules; [`policy`]: our nftables table); [`report`] turns bad input into reports,
//! [`outcome`] records what a pass did. Around the loop: metrics and health ([`metrics`],
//! [`admin`]), the status file for `wiremesh status` ([`status_file`]), the keys in the state
//! directory ([`keystore`]), flags-level settings ([`settings`]) and start-up wiring ([`run`]).

pub mod admin;
pub mod keystore;
pub mod mesh;
pub mod metrics;
pub mod outcome;
pub mod policy;
pub mod reconcile;
pub mod report;
pub mod run;
pub mod settings;
pub mod status_file;

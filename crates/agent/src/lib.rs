//! The wiremesh node agent: one level-triggered reconcile loop ([`reconcile`]) joining the
//! datastore (`wiremesh_datastore`) and the kernel subsystems (`wiremesh_dataplane`) through
//! the pure core (`wiremesh_core`); its metrics and health ([`metrics`], [`admin`]), the status
//! file it writes for `wiremesh status` ([`status_file`]), the keys in its state directory
//! ([`keystore`]) and its start-up wiring ([`run`]).

pub mod admin;
pub mod keystore;
pub mod metrics;
pub mod reconcile;
pub mod run;
pub mod status_file;

//! wiremesh: a node agent that turns a cluster into a WireGuard-encrypted mesh, configured with
//! Calico's resources. See docs/architecture.md for the shape of the code.

pub mod agent;
pub mod api;
pub mod config;
pub mod dataplane;
pub mod datastore;
pub mod keys;
pub mod lab;
pub mod mesh;
pub mod model;
pub mod reconcile;

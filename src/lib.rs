//! wiremesh: a node agent that turns a cluster into a WireGuard-encrypted mesh, configured with
//! Calico's resources. See docs/architecture.md for the shape of the code.

pub mod admin;
pub mod agent;
pub mod api;
pub mod bench;
pub mod config;
pub mod dataplane;
pub mod datastore;
pub mod graph;
pub mod keys;
pub mod lab;
pub mod mesh;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod policy;
pub mod reconcile;
pub mod selector;
pub mod status;

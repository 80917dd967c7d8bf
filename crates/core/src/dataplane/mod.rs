//! The dataplane's model, one module per kernel subsystem: what the kernel holds (`*State`), the
//! operations that change it (`*Op`) and a pure, minimal `plan(desired, actual)`. The adapters
//! that observe and apply live in `wiremesh_dataplane`.

pub mod filter;
pub mod link;
pub mod routing;
pub mod wireguard;

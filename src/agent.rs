//! Wiring of the agent: datastore adapter, dataplane backends and the reconcile loop.

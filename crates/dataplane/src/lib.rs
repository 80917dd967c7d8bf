//! The kernel side of each subsystem, behind one narrow trait per subsystem (observe, apply):
//! WireGuard devices and peers ([`wireguard`]: kernel module, wireguard-go, the choice),
//! links, addresses and MTU ([`link`]), routes and policy rules ([`route`]), our nftables
//! table ([`nft`]); kernel change notifications ([`events`]); shared rtnetlink helpers
//! ([`netlink`]). The states, operations and pure plans are in `wiremesh_core::dataplane`.
//! `fake` (feature `fake`) holds in-memory kernels for tests of the reconcile loop.

pub mod events;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod link;
pub mod netlink;
pub mod nft;
pub mod route;
pub mod wireguard;

use std::fmt;

/// Which WireGuard implementation drives the devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The kernel module, configured over generic netlink.
    Kernel,
    /// wireguard-go, one process per device, configured over its UAPI socket.
    Userspace,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Kernel => "kernel",
            Backend::Userspace => "userspace",
        })
    }
}

/// A failed dataplane step, with the object it concerns.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("observing {what}")]
    Observe {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{op}")]
    Apply {
        op: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("interface {interface} exists but is not a WireGuard device ({kind})")]
    NotWireguard { interface: String, kind: String },
    #[error("no WireGuard backend: {0}")]
    NoBackend(String),
    #[error("timed out after {seconds}s: {what}")]
    Timeout { what: String, seconds: u64 },
}

impl DataplaneError {
    pub fn observe(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        DataplaneError::Observe {
            what: what.into(),
            source: source.into(),
        }
    }

    pub fn apply(
        op: impl fmt::Display,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        DataplaneError::Apply {
            op: op.to_string(),
            source: source.into(),
        }
    }

    /// Everything but a misconfiguration is worth retrying.
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            DataplaneError::NotWireguard { .. } | DataplaneError::NoBackend(_)
        )
    }

    /// A short, stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DataplaneError::Observe { .. } => "observe",
            DataplaneError::Apply { .. } => "apply",
            DataplaneError::NotWireguard { .. } => "not_wireguard",
            DataplaneError::NoBackend(_) => "no_backend",
            DataplaneError::Timeout { .. } => "timeout",
        }
    }
}

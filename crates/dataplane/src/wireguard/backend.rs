//! Which WireGuard implementation drives the devices: the kernel module when present, else
//! wireguard-go; and read-only access to either for `wiremesh status`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use rtnetlink::Handle;
use wiremesh_core::dataplane::wireguard::{DeviceState, WgOp};

use super::kernel::KernelWireguard;
use super::userspace::{UserspaceConfig, UserspaceWireguard};
use super::{WireguardDataplane, WireguardStats};
use crate::netlink::{NetlinkError, delete_link};
use crate::{Backend, DataplaneError};

/// Name of the throw-away link that asks the kernel for WireGuard.
const PROBE_LINK: &str = "wm-probe0";

/// Whether the kernel can create WireGuard links, and why not. Creating one over rtnetlink
/// makes the kernel load the module on demand (its own `modprobe`, run in the host's root, so
/// an image without `modprobe` still gets the module); the probe link is deleted at once.
async fn kernel_wireguard(handle: &Handle) -> Result<(), String> {
    if Path::new("/sys/module/wireguard").exists() {
        return Ok(());
    }
    let created = handle
        .link()
        .add(rtnetlink::LinkWireguard::new(PROBE_LINK).build())
        .execute()
        .await;
    match created {
        Ok(()) => {
            if let Err(e) = delete_link(handle, PROBE_LINK).await {
                tracing::warn!(link = PROBE_LINK, error = %e, "could not delete the WireGuard probe link");
            }
            Ok(())
        }
        // A leftover probe from a crash: the kind exists.
        Err(e) if NetlinkError::from(e.clone()).errno == Some(libc::EEXIST) => {
            let _ = delete_link(handle, PROBE_LINK).await;
            Ok(())
        }
        Err(e) => Err(format!(
            "the kernel cannot create WireGuard links ({e}; the module is not built in and could not be loaded)"
        )),
    }
}

/// Whether `binary` is runnable: an existing path, or a bare name found in `PATH`.
pub fn find_binary(binary: &Path) -> Option<std::path::PathBuf> {
    if binary.components().count() > 1 {
        return binary.is_file().then(|| binary.to_path_buf());
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The kernel module when present, else wireguard-go.
    #[default]
    Auto,
    Kernel,
    Userspace,
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Kernel => "kernel",
            BackendChoice::Userspace => "userspace",
        })
    }
}

impl BackendChoice {
    /// Every choice as it is written on the command line.
    pub const NAMES: [&'static str; 3] = ["auto", "kernel", "userspace"];
}

impl std::str::FromStr for BackendChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(BackendChoice::Auto),
            "kernel" => Ok(BackendChoice::Kernel),
            "userspace" => Ok(BackendChoice::Userspace),
            other => Err(format!("{other:?} is not auto, kernel or userspace")),
        }
    }
}

/// Either WireGuard backend behind one type.
pub enum AnyWireguard {
    Kernel(KernelWireguard),
    Userspace(UserspaceWireguard),
}

/// Picks the backend, and says why. `Auto`: the kernel module if the kernel can create a
/// WireGuard link (loading the module on demand), else wireguard-go if found.
pub async fn select_backend(
    choice: BackendChoice,
    handle: Handle,
    userspace: UserspaceConfig,
) -> Result<(AnyWireguard, String), DataplaneError> {
    let userspace_ok = find_binary(&userspace.binary).is_some();
    let missing_go = format!(
        "{} not found; install wireguard-go (Debian/Ubuntu: apt-get install wireguard-go) or set its path",
        userspace.binary.display()
    );
    let kernel_backend = |why: &str| {
        Ok((
            AnyWireguard::Kernel(KernelWireguard::new(handle.clone())),
            why.to_string(),
        ))
    };
    let userspace_backend = |why: String| {
        Ok((
            AnyWireguard::Userspace(UserspaceWireguard::with_config(
                handle.clone(),
                userspace.clone(),
            )),
            why,
        ))
    };
    match choice {
        BackendChoice::Userspace if userspace_ok => {
            userspace_backend("--wireguard-backend userspace".into())
        }
        BackendChoice::Userspace => Err(DataplaneError::NoBackend(missing_go)),
        BackendChoice::Kernel => match kernel_wireguard(&handle).await {
            Ok(()) => kernel_backend("--wireguard-backend kernel"),
            Err(why) => Err(DataplaneError::NoBackend(why)),
        },
        BackendChoice::Auto => match kernel_wireguard(&handle).await {
            Ok(()) => kernel_backend("the kernel has WireGuard"),
            Err(why) if userspace_ok => userspace_backend(format!("{why}; using wireguard-go")),
            Err(why) => Err(DataplaneError::NoBackend(format!(
                "{why}, and {missing_go}"
            ))),
        },
    }
}

#[async_trait]
impl WireguardStats for AnyWireguard {
    async fn read_device(&self, name: &str) -> Result<Option<DeviceState>, DataplaneError> {
        match self {
            AnyWireguard::Kernel(k) => k.read_device(name).await,
            AnyWireguard::Userspace(u) => u.read_device(name).await,
        }
    }
}

#[async_trait]
impl WireguardDataplane for AnyWireguard {
    fn backend(&self) -> Backend {
        match self {
            AnyWireguard::Kernel(k) => k.backend(),
            AnyWireguard::Userspace(u) => u.backend(),
        }
    }

    async fn apply(&mut self, ops: &[WgOp]) -> Result<(), DataplaneError> {
        match self {
            AnyWireguard::Kernel(k) => k.apply(ops).await,
            AnyWireguard::Userspace(u) => u.apply(ops).await,
        }
    }

    fn stats_reader(&self) -> Option<Arc<dyn WireguardStats>> {
        match self {
            AnyWireguard::Kernel(k) => k.stats_reader(),
            AnyWireguard::Userspace(u) => u.stats_reader(),
        }
    }
}

/// The devices among `names` as they are now, read-only, through `backend` (both backends
/// when it is unknown). For `wiremesh status`, which must not
/// create or change anything.
pub async fn read_devices_once(
    backend: Option<Backend>,
    names: &BTreeSet<String>,
) -> Result<BTreeMap<String, DeviceState>, DataplaneError> {
    let handle = crate::netlink::netlink_handle()?;
    let mut out = BTreeMap::new();
    if backend != Some(Backend::Kernel) {
        out.extend(
            UserspaceWireguard::new(handle.clone())
                .read_devices(names)
                .await?,
        );
    }
    if backend != Some(Backend::Userspace) {
        for (name, state) in KernelWireguard::new(handle).read_devices(names).await? {
            out.entry(name).or_insert(state);
        }
    }
    Ok(out)
}

//! Throw-away network namespaces for tests and the benchmark.
//!
//! A [`Netns`] is a uniquely named namespace (`ip netns add`) with `lo` up and a private
//! directory that code entering it sees as `/run/wireguard`: wireguard-go hard-codes its socket
//! path there and network namespaces do not separate the filesystem, so two namespaces running a
//! device of the same name would otherwise collide. [`Netns::enter`] runs a closure on a thread
//! that joined the namespace, unshared its mount namespace, made `/` a slave (nothing propagates
//! back to the host) and bind-mounted the private directory; processes it starts (wireguard-go,
//! `wg`) inherit all of that. Dropping the value kills every process left in the namespace by
//! PID and deletes it.
//!
//! Needs root (`CAP_SYS_ADMIN`, `CAP_NET_ADMIN`) and `ip` from iproute2.

use std::future::Future;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, setns, unshare};

/// Where wireguard-go (and `wg`) look for device sockets.
const WIREGUARD_RUN_DIR: &str = "/run/wireguard";

/// How long `Drop` waits for killed processes to leave the namespace.
const KILL_WAIT: Duration = Duration::from_secs(5);

static COUNTER: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("running {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}{stdout}")]
    Failed {
        command: String,
        status: String,
        stdout: String,
        stderr: String,
    },
    #[error("creating {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("entering network namespace {name}: {step}")]
    Enter {
        name: String,
        step: &'static str,
        #[source]
        source: BoxError,
    },
}

/// A network namespace with a private `/run/wireguard`, removed (with every process in it) on
/// drop.
pub struct Netns {
    name: String,
    run_dir: tempfile::TempDir,
}

impl Netns {
    /// Creates `<prefix>-<pid>-<n>` and brings its `lo` up.
    pub fn new(prefix: &str) -> Result<Self, NetnsError> {
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let run_dir = tempfile::Builder::new()
            .prefix(&format!("{name}-run-"))
            .tempdir()
            .map_err(|source| NetnsError::Io {
                what: "a private run directory".into(),
                source,
            })?;
        // The mount point must exist on the host for the bind mount.
        std::fs::create_dir_all(WIREGUARD_RUN_DIR).map_err(|source| NetnsError::Io {
            what: WIREGUARD_RUN_DIR.into(),
            source,
        })?;
        run_checked("ip", &["netns", "add", &name])?;
        // From here on, Drop deletes the namespace.
        let ns = Netns { name, run_dir };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The directory that is `/run/wireguard` inside [`Netns::enter`] and [`Netns::exec_wg`]
    /// (device sockets appear here).
    pub fn run_dir(&self) -> &Path {
        self.run_dir.path()
    }

    /// `ip -n <ns> args...`; its standard output.
    pub fn ip(&self, args: &[&str]) -> Result<String, NetnsError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_checked("ip", &full)
    }

    /// `ip -j -n <ns> args...`, parsed.
    pub fn ip_json(&self, args: &[&str]) -> Result<serde_json::Value, NetnsError> {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let text = self.ip(&full)?;
        serde_json::from_str(&text).map_err(|e| NetnsError::Failed {
            command: format!("ip {}", full.join(" ")),
            status: "output is not JSON".into(),
            stdout: String::new(),
            stderr: e.to_string(),
        })
    }

    /// A command inside the namespace (`ip netns exec`); its standard output.
    pub fn exec(&self, args: &[&str]) -> Result<String, NetnsError> {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        run_checked("ip", &full)
    }

    /// A command inside the namespace that also sees the private `/run/wireguard` (`wg`, or
    /// anything talking to a userspace device); its standard output.
    pub fn exec_wg(&self, args: &[&str]) -> Result<String, NetnsError> {
        let dir = self.run_dir().display().to_string();
        // `ip netns exec` already runs in a fresh mount namespace with `/` a slave.
        let mut full = vec![
            "netns",
            "exec",
            self.name.as_str(),
            "sh",
            "-c",
            "mount --bind \"$0\" /run/wireguard && exec \"$@\"",
            dir.as_str(),
        ];
        full.extend_from_slice(args);
        run_checked("ip", &full)
    }

    /// PIDs of the processes in the namespace.
    pub fn pids(&self) -> Result<Vec<i32>, NetnsError> {
        Ok(run_checked("ip", &["netns", "pids", &self.name])?
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    /// Runs `f` on a thread inside this namespace (with the private `/run/wireguard`) on its own
    /// current-thread tokio runtime, and waits for it. A panic in `f` is resumed in the caller.
    pub fn enter<T, Fut, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        Fut: Future<Output = T>,
        F: FnOnce() -> Fut + Send + 'static,
    {
        let ns_path = PathBuf::from(format!("/run/netns/{}", self.name));
        let run_dir = self.run_dir().to_path_buf();
        let name = self.name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || -> Result<T, NetnsError> {
                let rt = join_namespace(&ns_path, &run_dir)
                    .map_err(|(step, source)| NetnsError::Enter { name, step, source })?;
                Ok(rt.block_on(f()))
            })
            .map_err(|source| NetnsError::Io {
                what: "a thread".into(),
                source,
            })?;
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill by PID whatever runs in the namespace (our wireguard-go daemons), then delete it.
        let pids = || self.pids().unwrap_or_default();
        for pid in pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let deadline = Instant::now() + KILL_WAIT;
        while !pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Err(e) = run_checked("ip", &["netns", "del", &self.name]) {
            eprintln!("warning: {e}");
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// On the calling thread: join the network namespace, get a private mount namespace with the
/// run directory over `/run/wireguard`, and build a current-thread runtime.
fn join_namespace(
    ns_path: &Path,
    run_dir: &Path,
) -> Result<tokio::runtime::Runtime, (&'static str, BoxError)> {
    let ns = std::fs::File::open(ns_path).map_err(|e| ("open", e.into()))?;
    setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| ("setns", e.into()))?;
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| ("unshare the mount namespace", e.into()))?;
    // Keep our bind mount from propagating to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| ("make / rslave", e.into()))?;
    mount(
        Some(run_dir),
        WIREGUARD_RUN_DIR,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| ("bind-mount /run/wireguard", e.into()))?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ("start a tokio runtime", e.into()))
}

fn run(cmd: &str, args: &[&str]) -> Result<Output, NetnsError> {
    Command::new(cmd)
        .args(args)
        .output()
        .map_err(|source| NetnsError::Spawn {
            command: format!("{cmd} {}", args.join(" ")),
            source,
        })
}

/// Runs a command; its standard output, or `Failed` with both outputs.
fn run_checked(cmd: &str, args: &[&str]) -> Result<String, NetnsError> {
    let out = run(cmd, args)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    Err(NetnsError::Failed {
        command: format!("{cmd} {}", args.join(" ")),
        status: out.status.to_string(),
        stdout: if stdout.trim().is_empty() {
            String::new()
        } else {
            format!(" (stdout: {})", stdout.trim())
        },
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

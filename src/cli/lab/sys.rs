//! Small wrappers over the host tools (`ip`, `sysctl`) and over /proc, for the lab.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{debug, warn};

use super::LabError;

/// Where `ip netns add` keeps its namespace handles.
pub const NETNS_DIR: &str = "/run/netns";

/// Runs a command to completion; a non-zero exit is an error naming `step` and `object`.
pub fn run<S: AsRef<OsStr>>(
    step: &str,
    object: &str,
    program: &str,
    args: &[S],
) -> Result<Output, LabError> {
    let output = output(step, object, program, args)?;
    if !output.status.success() {
        return Err(LabError::Command {
            step: step.to_string(),
            object: object.to_string(),
            command: render(program, args),
            detail: format!(
                "{} ({})",
                String::from_utf8_lossy(&output.stderr).trim(),
                output.status
            ),
        });
    }
    Ok(output)
}

/// Runs a command to completion and returns its output whatever its exit status.
pub fn output<S: AsRef<OsStr>>(
    step: &str,
    object: &str,
    program: &str,
    args: &[S],
) -> Result<Output, LabError> {
    debug!(command = %render(program, args), "running");
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn {
            step: step.to_string(),
            object: object.to_string(),
            source,
        })
}

pub fn render<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut out = program.to_string();
    for a in args {
        out.push(' ');
        out.push_str(&a.as_ref().to_string_lossy());
    }
    out
}

/// `ip` with arguments given as one whitespace-separated string (none of ours contain spaces).
pub fn ip(step: &str, object: &str, args: &str) -> Result<Output, LabError> {
    let args: Vec<&str> = args.split_whitespace().collect();
    run(step, object, "ip", &args)
}

pub fn netns_exists(ns: &str) -> bool {
    Path::new(NETNS_DIR).join(ns).exists()
}

/// Every namespace `ip netns list` knows, by name.
pub fn list_netns() -> Vec<String> {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    out.sort();
    out
}

/// (device, inode) of a network namespace handle, to compare with /proc/<pid>/ns/net.
fn netns_id(path: &Path) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Live (non-zombie) processes inside namespace `ns`, as `ip netns pids` finds them; never this
/// process itself.
pub fn netns_pids(ns: &str) -> Vec<i32> {
    let Some(target) = netns_id(&Path::new(NETNS_DIR).join(ns)) else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| *pid != me)
        .filter(|pid| netns_id(&PathBuf::from(format!("/proc/{pid}/ns/net"))) == Some(target))
        .filter(|pid| is_alive(*pid))
        .collect()
}

/// Whether `pid` runs inside namespace `ns` (guards against a recorded pid that was reused).
pub fn pid_in_netns(pid: i32, ns: &str) -> bool {
    let target = netns_id(&Path::new(NETNS_DIR).join(ns));
    target.is_some() && netns_id(&PathBuf::from(format!("/proc/{pid}/ns/net"))) == target
}

/// True if the process exists and is not a zombie.
pub fn is_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold ')'.
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn signal(pid: i32, sig: Signal) {
    if let Err(e) = kill(Pid::from_raw(pid), sig) {
        debug!(pid, ?sig, error = %e, "signal not delivered");
    }
}

/// SIGTERM, then SIGKILL for whatever is still alive after `grace`. `alive` lists what is left.
pub fn terminate(pids: &[i32], grace: Duration, alive: impl Fn() -> Vec<i32>) -> Vec<i32> {
    for pid in pids {
        signal(*pid, Signal::SIGTERM);
    }
    if wait_until(grace, || alive().is_empty()) {
        return Vec::new();
    }
    let left = alive();
    warn!(pids = ?left, "still running after SIGTERM; sending SIGKILL");
    for pid in &left {
        signal(*pid, Signal::SIGKILL);
    }
    wait_until(Duration::from_secs(3), || alive().is_empty());
    alive()
}

/// Polls `done` every 50 ms until it holds or `limit` passes; returns whether it held.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if done() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `program args` inside `ns` (`""` = this process's namespace) as a daemon of its own
/// (new session, re-parented away from us so it outlives this process and leaves no zombie here). When `run_dir` is given, the
/// process also gets it bind-mounted over /run/wireguard in its private mount namespace.
/// Returns the daemon's pid, read from `pid_file`.
pub fn spawn_daemon(
    ns: &str,
    run_dir: Option<&Path>,
    program: &Path,
    args: &[String],
    log: &Path,
    pid_file: &Path,
) -> Result<i32, LabError> {
    let object = format!("{} in {ns}", program.display());
    let io = |step: &str, path: &Path| {
        let (step, path) = (step.to_string(), path.to_path_buf());
        move |source| LabError::Io { step, path, source }
    };
    let _ = fs::remove_file(pid_file);
    let log_file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io("opening log", log))?;
    let log_err = log_file.try_clone().map_err(io("opening log", log))?;
    // `$$` is the shell's pid, which `exec` hands on to the program.
    let script = if run_dir.is_some() {
        r#"mkdir -p /run/wireguard && mount --bind "$WM_RUN_DIR" /run/wireguard && echo $$ > "$WM_PID_FILE" && exec "$@""#
    } else {
        r#"echo $$ > "$WM_PID_FILE" && exec "$@""#
    };
    let mut command = Command::new("setsid");
    command.arg("--fork");
    if !ns.is_empty() {
        command.args(["ip", "netns", "exec", ns]);
    }
    command
        .args(["sh", "-c", script, "sh"])
        .arg(program)
        .args(args)
        .env("WM_PID_FILE", pid_file)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    if let Some(dir) = run_dir {
        command.env("WM_RUN_DIR", dir);
    }
    debug!(ns, program = %program.display(), ?args, "starting daemon");
    let status = command.status().map_err(|source| LabError::Spawn {
        step: "starting daemon".into(),
        object: object.clone(),
        source,
    })?;
    if !status.success() {
        return Err(LabError::Command {
            step: "starting daemon".into(),
            object,
            command: format!("setsid --fork ip netns exec {ns} ... {}", program.display()),
            detail: status.to_string(),
        });
    }
    let mut pid = None;
    wait_until(Duration::from_secs(5), || {
        pid = fs::read_to_string(pid_file)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok());
        pid.is_some()
    });
    pid.ok_or_else(|| LabError::Timeout {
        step: "waiting for the daemon's pid file".into(),
        object: format!("{object} (see {})", log.display()),
    })
}

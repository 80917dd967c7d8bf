//! wireguard-go, one daemon per device, driven over its UAPI socket
//! (`<run_dir>/<name>.sock`, cross-platform userspace protocol).
//!
//! The text protocol is written and parsed here rather than through
//! `defguard_wireguard_rs::{Host, Peer}`: `Host::parse_uapi` reads to EOF (wireguard-go keeps the
//! connection open, so it would hang), swallows malformed lines, and `Peer::as_uapi_update` omits
//! a zero keepalive (so it could never be switched off). The protocol is a few `key=value` lines,
//! and writing it directly lets one `set=1` transaction carry thousands of peers without
//! intermediate allocations per peer.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use ipnet::IpNet;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;
use zeroize::Zeroizing;

use wiremesh_core::dataplane::wireguard::{DeviceState, PeerState, WgOp};
use wiremesh_core::keys::PrivateKey;
use wiremesh_core::model::WgKey;

use super::{WireguardDataplane, WireguardStats};
use crate::netlink::{delete_link, link_kind};
use crate::{Backend, DataplaneError};

/// Where every userspace WireGuard implementation puts its sockets (hard-coded in wireguard-go).
const DEFAULT_RUN_DIR: &str = "/run/wireguard";

#[derive(Debug, Clone)]
pub struct UserspaceConfig {
    /// The wireguard-go binary; a bare name is looked up in `PATH`.
    pub binary: PathBuf,
    /// Directory holding `<name>.sock`. wireguard-go cannot be told another one; change this
    /// only together with a bind mount over `/run/wireguard`.
    pub run_dir: PathBuf,
    /// Bound on every socket call and on daemon start-up.
    pub timeout: Duration,
    /// Kill a daemon that does not answer a `get` within `timeout` (hung, or stopped), so the
    /// next apply starts a new one. Only the agent's own handle does this, never a reader.
    pub restart_unresponsive: bool,
}

impl Default for UserspaceConfig {
    fn default() -> Self {
        UserspaceConfig {
            binary: PathBuf::from("wireguard-go"),
            run_dir: PathBuf::from(DEFAULT_RUN_DIR),
            timeout: Duration::from_secs(5),
            restart_unresponsive: false,
        }
    }
}

/// UAPI-level failures, used as the `source` of [`DataplaneError`].
#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    #[error("socket {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("device answered errno={0}")]
    Errno(i64),
    #[error("malformed UAPI line {line:?}: {reason}")]
    Parse { line: String, reason: String },
    #[error("connection closed before the end of the response")]
    Truncated,
    #[error("{binary} {name} failed ({status}): {stderr}")]
    Spawn {
        binary: String,
        name: String,
        status: String,
        stderr: String,
    },
    #[error("device {0} still answers on its socket after its link was deleted")]
    StillRunning(String),
}

/// The userspace backend. Holds an rtnetlink handle for deleting links.
pub struct UserspaceWireguard {
    handle: rtnetlink::Handle,
    config: UserspaceConfig,
}

impl UserspaceWireguard {
    pub fn new(handle: rtnetlink::Handle) -> Self {
        Self::with_config(handle, UserspaceConfig::default())
    }

    pub fn with_config(handle: rtnetlink::Handle, config: UserspaceConfig) -> Self {
        UserspaceWireguard { handle, config }
    }

    pub fn config(&self) -> &UserspaceConfig {
        &self.config
    }

    fn socket_path(&self, name: &str) -> PathBuf {
        self.config.run_dir.join(format!("{name}.sock"))
    }

    fn timeout_secs(&self) -> u64 {
        self.config.timeout.as_secs().max(1)
    }

    /// Connects to a device's socket. `Ok(None)`: no such device (no socket, or a stale one whose
    /// daemon is gone; the stale file is removed).
    async fn connect(&self, name: &str) -> Result<Option<UnixStream>, DataplaneError> {
        let path = self.socket_path(name);
        let what = format!("connecting to {}", path.display());
        match tokio::time::timeout(self.config.timeout, UnixStream::connect(&path)).await {
            Err(_) => Err(DataplaneError::Timeout {
                what,
                seconds: self.timeout_secs(),
            }),
            Ok(Ok(stream)) => Ok(Some(stream)),
            Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %path.display(), "removing stale WireGuard socket");
                remove_file_if_exists(&path).map_err(|source| {
                    DataplaneError::observe(what, UapiError::Io { path, source })
                })?;
                Ok(None)
            }
            Ok(Err(source)) => Err(DataplaneError::observe(
                what,
                UapiError::Io { path, source },
            )),
        }
    }

    /// Sends one request and reads the response up to (and including) the blank line after
    /// `errno=`. Returns the lines before `errno=` and the errno.
    async fn transact(
        &self,
        stream: UnixStream,
        name: &str,
        request: &[u8],
    ) -> Result<(Vec<String>, i64), TransactError> {
        let path = self.socket_path(name);
        let io_err = |source| {
            TransactError::Uapi(UapiError::Io {
                path: path.clone(),
                source,
            })
        };
        let fut = async {
            let (read, mut write) = stream.into_split();
            write.write_all(request).await.map_err(io_err)?;
            write.flush().await.map_err(io_err)?;
            let mut reader = BufReader::new(read);
            let mut lines = Vec::new();
            let mut line = String::new();
            let mut errno = None;
            loop {
                line.clear();
                if reader.read_line(&mut line).await.map_err(io_err)? == 0 {
                    return Err(TransactError::Uapi(UapiError::Truncated));
                }
                let text = line.trim_end_matches('\n');
                if text.is_empty() {
                    match errno {
                        Some(errno) => return Ok((lines, errno)),
                        None => continue,
                    }
                }
                if let Some(value) = text.strip_prefix("errno=") {
                    errno = Some(value.parse::<i64>().map_err(|e| {
                        TransactError::Uapi(UapiError::Parse {
                            line: text.to_string(),
                            reason: e.to_string(),
                        })
                    })?);
                } else {
                    lines.push(text.to_string());
                }
            }
        };
        match tokio::time::timeout(self.io_timeout(request.len()), fut).await {
            Ok(result) => result,
            Err(_) => Err(TransactError::Timeout),
        }
    }

    /// Large batches (thousands of peers) get a second per ~1 MB on top of the base timeout.
    fn io_timeout(&self, request_len: usize) -> Duration {
        self.config.timeout + Duration::from_secs((request_len / 1_000_000) as u64)
    }

    async fn get(&self, name: &str) -> Result<Option<DeviceState>, DataplaneError> {
        let what = format!("WireGuard device {name}");
        let mut attempt = 0;
        let (lines, errno) = loop {
            let Some(stream) = self.connect(name).await? else {
                return Ok(None);
            };
            match self.transact(stream, name, b"get=1\n\n").await {
                Ok(response) => break response,
                // A dying daemon resets connections its listener had queued: look again, the
                // next connect is usually refused (stale socket = absent device).
                Err(TransactError::Uapi(e)) if e.is_reset() && attempt < 3 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(TransactError::Timeout) if self.config.restart_unresponsive => {
                    tracing::warn!(
                        device = name,
                        seconds = self.timeout_secs(),
                        "wireguard-go does not answer on its socket; killing it so that a new one takes over"
                    );
                    signal_daemon(&self.config.binary, name, nix::sys::signal::Signal::SIGKILL);
                    self.wait_until_gone(name).await?;
                    return Ok(None);
                }
                Err(e) => return Err(e.into_dataplane(&what, self.timeout_secs())),
            }
        };
        if errno != 0 {
            return Err(DataplaneError::observe(what, UapiError::Errno(errno)));
        }
        parse_get(name, &lines)
            .map(Some)
            .map_err(|e| DataplaneError::observe(what, e))
    }

    async fn set(
        &self,
        name: &str,
        body: &str,
        ops: usize,
        first: &WgOp,
    ) -> Result<(), DataplaneError> {
        let what = if ops == 1 {
            first.to_string()
        } else {
            format!("{ops} operations on {name}, starting with: {first}")
        };
        let stream = self.connect(name).await?.ok_or_else(|| {
            DataplaneError::apply(
                &what,
                UapiError::Io {
                    path: self.socket_path(name),
                    source: io::ErrorKind::NotFound.into(),
                },
            )
        })?;
        let (_, errno) = self
            .transact(stream, name, body.as_bytes())
            .await
            .map_err(|e| e.into_apply(&what, self.timeout_secs()))?;
        if errno != 0 {
            return Err(DataplaneError::apply(what, UapiError::Errno(errno)));
        }
        Ok(())
    }

    async fn create(&self, name: &str) -> Result<(), DataplaneError> {
        let op = format!("create WireGuard device {name}");
        if self.connect(name).await?.is_some() {
            return Ok(()); // Already running (e.g. the agent restarted): adopt it.
        }
        // Make sure the name is not taken by another kind of link; wireguard-go would reuse a TUN.
        if let Some(kind) = link_kind(&self.handle, name)
            .await
            .map_err(|e| DataplaneError::apply(&op, e))?
            && kind != "tun"
        {
            return Err(DataplaneError::NotWireguard {
                interface: name.to_string(),
                kind,
            });
        }
        // Without WG_PROCESS_FOREGROUND wireguard-go creates the TUN and the socket, re-executes
        // itself as a daemon and exits: the device outlives the agent. Without LOG_LEVEL the
        // daemon's stdio is /dev/null, so it never holds our pipe open.
        let mut command = tokio::process::Command::new(&self.config.binary);
        command
            .arg(name)
            .env_remove("WG_PROCESS_FOREGROUND")
            .env_remove("LOG_LEVEL")
            .env_remove("WG_TUN_FD")
            .env_remove("WG_UAPI_FD")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let child = command.spawn().map_err(|source| {
            DataplaneError::apply(
                &op,
                UapiError::Io {
                    path: self.config.binary.clone(),
                    source,
                },
            )
        })?;
        let output = match tokio::time::timeout(self.config.timeout, child.wait_with_output()).await
        {
            Err(_) => {
                return Err(DataplaneError::Timeout {
                    what: op,
                    seconds: self.timeout_secs(),
                });
            }
            Ok(Err(source)) => {
                return Err(DataplaneError::apply(
                    &op,
                    UapiError::Io {
                        path: self.config.binary.clone(),
                        source,
                    },
                ));
            }
            Ok(Ok(output)) => output,
        };
        if !output.status.success() {
            return Err(DataplaneError::apply(
                &op,
                UapiError::Spawn {
                    binary: self.config.binary.display().to_string(),
                    name: name.to_string(),
                    status: output.status.to_string(),
                    stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
                },
            ));
        }
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        loop {
            if self.connect(name).await?.is_some() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DataplaneError::Timeout {
                    what: format!("{op}: waiting for its socket"),
                    seconds: self.timeout_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for a killed daemon's socket to stop answering (a stale socket is removed).
    async fn wait_until_gone(&self, name: &str) -> Result<(), DataplaneError> {
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        while self.connect(name).await?.is_some() {
            if tokio::time::Instant::now() >= deadline {
                return Err(DataplaneError::Timeout {
                    what: format!("waiting for the killed wireguard-go of {name} to exit"),
                    seconds: self.timeout_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    async fn delete(&self, name: &str) -> Result<(), DataplaneError> {
        let op = format!("delete WireGuard device {name}");
        delete_link(&self.handle, name)
            .await
            .map_err(|e| DataplaneError::apply(&op, e))?;
        // wireguard-go exits (and removes its socket) once its TUN is gone.
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        let mut killed = false;
        while self.connect(name).await?.is_some() {
            if tokio::time::Instant::now() >= deadline {
                return Err(DataplaneError::apply(
                    &op,
                    UapiError::StillRunning(name.to_string()),
                ));
            }
            if !killed && tokio::time::Instant::now() + self.config.timeout / 2 >= deadline {
                tracing::warn!(
                    device = name,
                    "wireguard-go outlived its link; sending SIGTERM"
                );
                killed =
                    signal_daemon(&self.config.binary, name, nix::sys::signal::Signal::SIGTERM);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let path = self.socket_path(name);
        remove_file_if_exists(&path)
            .map_err(|source| DataplaneError::apply(&op, UapiError::Io { path, source }))
    }
}

impl UapiError {
    fn is_reset(&self) -> bool {
        match self {
            UapiError::Truncated => true,
            UapiError::Io { source, .. } => {
                matches!(
                    source.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::UnexpectedEof
                )
            }
            _ => false,
        }
    }
}

enum TransactError {
    Uapi(UapiError),
    Timeout,
}

impl TransactError {
    fn into_dataplane(self, what: &str, seconds: u64) -> DataplaneError {
        match self {
            TransactError::Uapi(e) => DataplaneError::observe(what, e),
            TransactError::Timeout => DataplaneError::Timeout {
                what: what.to_string(),
                seconds,
            },
        }
    }

    fn into_apply(self, what: &str, seconds: u64) -> DataplaneError {
        match self {
            TransactError::Uapi(e) => DataplaneError::apply(what, e),
            TransactError::Timeout => DataplaneError::Timeout {
                what: what.to_string(),
                seconds,
            },
        }
    }
}

fn remove_file_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Sends `signal` to the process running `<binary> <name>` in our network namespace (found
/// through /proc): SIGTERM when a daemon outlives its TUN, SIGKILL when it stopped answering.
/// Returns whether one was signalled.
fn signal_daemon(binary: &Path, name: &str, signal: nix::sys::signal::Signal) -> bool {
    let Ok(own_ns) = std::fs::read_link("/proc/thread-self/ns/net") else {
        return false;
    };
    let Some(base) = binary.file_name() else {
        return false;
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    let mut found = false;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .collect();
        let [arg0, arg1] = args.as_slice() else {
            continue;
        };
        let matches_binary = Path::new(std::ffi::OsStr::new(
            std::str::from_utf8(arg0).unwrap_or_default(),
        ))
        .file_name()
        .is_some_and(|b| b == base);
        if !matches_binary || *arg1 != name.as_bytes() {
            continue;
        }
        if std::fs::read_link(entry.path().join("ns/net"))
            .ok()
            .as_ref()
            != Some(&own_ns)
        {
            continue;
        }
        tracing::debug!(pid, device = name, %signal, "signalling wireguard-go");
        found |= nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).is_ok();
    }
    found
}

/// One `set=1` body for consecutive operations on one device.
fn render_set(ops: &[&WgOp]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(64 + ops.len() * 200));
    out.push_str("set=1\n");
    for op in ops {
        // Writing into a String cannot fail.
        let _ = match op {
            WgOp::ConfigureDevice { private_key, listen_port, fwmark, .. } => {
                out.push_str("private_key=");
                out.push_str(&private_key.to_hex());
                write!(out, "\nlisten_port={listen_port}\nfwmark={fwmark}\n")
            }
            WgOp::SetPeer { public_key, peer, .. } => {
                write!(
                    out,
                    "public_key={}\nendpoint={}\npersistent_keepalive_interval={}\nreplace_allowed_ips=true\n",
                    public_key.to_hex(),
                    peer.endpoint,
                    peer.keepalive
                )
                .and_then(|()| peer.allowed_ips.iter().try_for_each(|ip| writeln!(out, "allowed_ip={ip}")))
            }
            WgOp::RemovePeer { public_key, .. } => write!(out, "public_key={}\nremove=true\n", public_key.to_hex()),
            WgOp::CreateDevice { .. } | WgOp::DeleteDevice { .. } => Ok(()),
        };
    }
    out.push('\n');
    out
}

fn parse_err(line: &str, reason: impl ToString) -> UapiError {
    UapiError::Parse {
        line: line.to_string(),
        reason: reason.to_string(),
    }
}

/// Parses a `get=1` response (the lines before `errno=`).
fn parse_get(name: &str, lines: &[String]) -> Result<DeviceState, UapiError> {
    let mut state = DeviceState {
        name: name.to_string(),
        public_key: None,
        listen_port: 0,
        fwmark: 0,
        peers: BTreeMap::new(),
    };
    let mut current: Option<(WgKey, PeerState)> = None;
    let mut handshake_secs = 0u64;
    let mut handshake_nsecs = 0u32;
    let finish =
        |current: Option<(WgKey, PeerState)>, secs: u64, nsecs: u32, state: &mut DeviceState| {
            if let Some((key, mut peer)) = current {
                if secs != 0 || nsecs != 0 {
                    peer.last_handshake = Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nsecs));
                }
                state.peers.insert(key, peer);
            }
        };
    for line in lines {
        let Some((key, value)) = line.split_once('=') else {
            return Err(parse_err(line, "no '='"));
        };
        // Never put a private key into an error message.
        let shown = if key == "private_key" {
            "private_key=<redacted>"
        } else {
            line.as_str()
        };
        let num = |v: &str| v.parse::<u64>().map_err(|e| parse_err(shown, e));
        match (key, current.as_mut()) {
            ("public_key", _) => {
                finish(current.take(), handshake_secs, handshake_nsecs, &mut state);
                (handshake_secs, handshake_nsecs) = (0, 0);
                let key = WgKey::from_hex(value).map_err(|e| parse_err(shown, e))?;
                current = Some((
                    key,
                    PeerState {
                        endpoint: None,
                        allowed_ips: BTreeSet::new(),
                        keepalive: 0,
                        last_handshake: None,
                        rx_bytes: 0,
                        tx_bytes: 0,
                    },
                ));
            }
            ("private_key", None) => {
                let secret =
                    Zeroizing::new(WgKey::from_hex(value).map_err(|e| parse_err(shown, e))?.0);
                if secret.iter().any(|b| *b != 0) {
                    state.public_key = Some(PrivateKey::from_bytes(*secret).public_key());
                }
            }
            ("listen_port", None) => {
                state.listen_port = value.parse().map_err(|e| parse_err(shown, e))?
            }
            ("fwmark", None) => state.fwmark = value.parse().map_err(|e| parse_err(shown, e))?,
            ("endpoint", Some((_, peer))) => {
                peer.endpoint = Some(
                    value
                        .parse::<SocketAddr>()
                        .map_err(|e| parse_err(shown, e))?,
                );
            }
            ("allowed_ip", Some((_, peer))) => {
                peer.allowed_ips
                    .insert(value.parse::<IpNet>().map_err(|e| parse_err(shown, e))?);
            }
            ("persistent_keepalive_interval", Some((_, peer))) => {
                peer.keepalive = value.parse().map_err(|e| parse_err(shown, e))?;
            }
            ("last_handshake_time_sec", Some(_)) => handshake_secs = num(value)?,
            ("last_handshake_time_nsec", Some(_)) => {
                handshake_nsecs = u32::try_from(num(value)?).map_err(|e| parse_err(shown, e))?;
            }
            ("rx_bytes", Some((_, peer))) => peer.rx_bytes = num(value)?,
            ("tx_bytes", Some((_, peer))) => peer.tx_bytes = num(value)?,
            // protocol_version, preshared_key and anything newer: not part of our model.
            _ => {}
        }
    }
    finish(current, handshake_secs, handshake_nsecs, &mut state);
    Ok(state)
}

fn op_device(op: &WgOp) -> &str {
    match op {
        WgOp::CreateDevice { name }
        | WgOp::DeleteDevice { name }
        | WgOp::ConfigureDevice { name, .. }
        | WgOp::SetPeer { name, .. }
        | WgOp::RemovePeer { name, .. } => name,
    }
}

#[async_trait]
impl WireguardDataplane for UserspaceWireguard {
    fn backend(&self) -> Backend {
        Backend::Userspace
    }

    fn stats_reader(&self) -> Option<std::sync::Arc<dyn WireguardStats>> {
        Some(std::sync::Arc::new(UserspaceWireguard::with_config(
            self.handle.clone(),
            UserspaceConfig {
                restart_unresponsive: false,
                ..self.config.clone()
            },
        )))
    }

    async fn apply(&mut self, ops: &[WgOp]) -> Result<(), DataplaneError> {
        let mut i = 0;
        while i < ops.len() {
            match &ops[i] {
                WgOp::CreateDevice { name } => {
                    self.create(name).await?;
                    i += 1;
                }
                WgOp::DeleteDevice { name } => {
                    self.delete(name).await?;
                    i += 1;
                }
                first => {
                    // Batch every following configuration op of the same device.
                    let name = op_device(first);
                    let batch: Vec<&WgOp> = ops[i..]
                        .iter()
                        .take_while(|op| {
                            op_device(op) == name
                                && !matches!(
                                    op,
                                    WgOp::CreateDevice { .. } | WgOp::DeleteDevice { .. }
                                )
                        })
                        .collect();
                    let body = render_set(&batch);
                    self.set(name, &body, batch.len(), first).await?;
                    i += batch.len();
                }
            }
        }
        Ok(())
    }
}

/// Every read is its own UAPI connection with `get=1`, so a scrape never waits for (or
/// interleaves with) the reconcile loop's `set=1` transactions.
#[async_trait]
impl WireguardStats for UserspaceWireguard {
    async fn read_device(&self, name: &str) -> Result<Option<DeviceState>, DataplaneError> {
        self.get(name).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wiremesh_core::mesh::PeerSpec;

    #[test]
    fn renders_one_transaction_without_replace_peers() {
        let pk = PrivateKey::from_bytes([7; 32]);
        let peer = PeerSpec {
            node: "n2".into(),
            endpoint: "[fd00::2]:51820".parse().expect("addr"),
            allowed_ips: [
                "10.0.2.0/24".parse().expect("net"),
                "fd00:2::/64".parse().expect("net"),
            ]
            .into(),
            keepalive: 0,
        };
        let ops = [
            WgOp::ConfigureDevice {
                name: "wg0".into(),
                private_key: pk.clone(),
                listen_port: 51820,
                fwmark: 0x200000,
            },
            WgOp::SetPeer {
                name: "wg0".into(),
                public_key: WgKey([2; 32]),
                peer,
            },
            WgOp::RemovePeer {
                name: "wg0".into(),
                public_key: WgKey([3; 32]),
            },
        ];
        let refs: Vec<&WgOp> = ops.iter().collect();
        let body = render_set(&refs);
        let expected = format!(
            "set=1\nprivate_key={}\nlisten_port=51820\nfwmark=2097152\npublic_key={}\nendpoint=[fd00::2]:51820\n\
             persistent_keepalive_interval=0\nreplace_allowed_ips=true\nallowed_ip=10.0.2.0/24\nallowed_ip=fd00:2::/64\n\
             public_key={}\nremove=true\n\n",
            pk.to_hex().as_str(),
            WgKey([2; 32]).to_hex(),
            WgKey([3; 32]).to_hex()
        );
        assert_eq!(body.as_str(), expected);
        assert!(!body.contains("replace_peers"));
    }

    #[test]
    fn parses_get_response() {
        let pk = PrivateKey::from_bytes([9; 32]);
        let text = format!(
            "private_key={}\nlisten_port=51820\nfwmark=2097152\npublic_key={}\nprotocol_version=1\nendpoint=10.99.0.2:51820\n\
             last_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=5\nrx_bytes=6\npersistent_keepalive_interval=25\n\
             allowed_ip=10.0.2.0/24\npublic_key={}\nlast_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\n\
             tx_bytes=0\nrx_bytes=0\npersistent_keepalive_interval=0",
            pk.to_hex().as_str(),
            WgKey([2; 32]).to_hex(),
            WgKey([3; 32]).to_hex()
        );
        let lines: Vec<String> = text.lines().map(String::from).collect();
        let state = parse_get("wg0", &lines).expect("parse");
        assert_eq!(state.public_key, Some(pk.public_key()));
        assert_eq!((state.listen_port, state.fwmark), (51820, 0x200000));
        let p2 = &state.peers[&WgKey([2; 32])];
        assert_eq!(p2.endpoint, Some("10.99.0.2:51820".parse().expect("addr")));
        assert_eq!(
            (p2.keepalive, p2.rx_bytes, p2.tx_bytes, p2.last_handshake),
            (25, 6, 5, None)
        );
        assert_eq!(p2.allowed_ips.len(), 1);
        let p3 = &state.peers[&WgKey([3; 32])];
        assert_eq!(
            p3.last_handshake,
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5))
        );
        assert_eq!(p3.endpoint, None);
    }

    #[test]
    fn parse_errors_never_show_private_key() {
        let lines = vec!["private_key=zz".to_string()];
        let err = parse_get("wg0", &lines).expect_err("bad key").to_string();
        assert!(!err.contains("zz"), "{err}");
    }
}

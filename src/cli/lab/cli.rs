//! The `wiremesh lab` subcommands.

use std::path::PathBuf;
use std::process::Stdio;

use serde_json::Value;

use super::pods::PortProtocol;
use super::{IpFamily, Lab, LabError, LabStatus, UpOptions, VerifyExpect, probe, verify};
use crate::cli::output::{self, OutputArgs};

#[derive(Debug, Clone, clap::Args)]
pub struct LabArgs {
    /// Name of the lab; namespaces are called wm-<name>-hub, wm-<name>-n<i>, wm-<name>-p<i>.
    #[arg(long, default_value = super::DEFAULT_NAME, env = "WIREMESH_LAB_NAME")]
    pub name: String,
    /// State directory (default /run/wiremesh-lab/<name>).
    #[arg(long, env = "WIREMESH_LAB_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

impl LabArgs {
    fn load(&self) -> Result<Lab, LabError> {
        super::validate_name(&self.name)?;
        match &self.state_dir {
            Some(dir) => Lab::load_from(&self.name, dir),
            None => Lab::load(&self.name),
        }
    }
}

/// What `lab probe --protocols` takes (SCTP: not yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeProtocol {
    Tcp,
    Udp,
}

impl From<ProbeProtocol> for PortProtocol {
    fn from(p: ProbeProtocol) -> Self {
        match p {
            ProbeProtocol::Tcp => PortProtocol::Tcp,
            ProbeProtocol::Udp => PortProtocol::Udp,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum LabCommand {
    /// Create the namespaces, start etcd, write the datastore and start one agent per node.
    Up {
        #[command(flatten)]
        lab: LabArgs,
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// Initial FelixConfiguration default wireguardEnabled (and wireguardEnabledV6 with IPv6).
        #[arg(long, value_enum, default_value = "on")]
        encryption: OnOff,
        /// Initial wireguardKeepAlive ("" leaves it unset).
        #[arg(long, default_value = "10s")]
        keepalive: String,
        /// Build topology and datastore only.
        #[arg(long)]
        no_agents: bool,
        /// The wiremesh binary the agents run (default: this executable).
        #[arg(long, env = "WIREMESH_LAB_BINARY")]
        binary: Option<PathBuf>,
        #[arg(long, default_value = "userspace")]
        wireguard_backend: String,
        /// Use this cluster as the datastore instead of a local etcd: lab nodes become Node
        /// objects and the agents run with --datastore kubernetes (see docs/kubernetes.md).
        #[arg(long, env = "WIREMESH_LAB_KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Address families of the pods and the mesh: ipv4, ipv6 (pods and WireGuard IPv6 only;
        /// etcd stays on IPv4) or dual (both devices, wireguard.cali and wg-v6.cali).
        #[arg(long, value_enum, default_value = "ipv4")]
        ip_family: IpFamily,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// (internal) Relay TCP from a node's namespace to the API server (Kubernetes labs).
    #[command(hide = true)]
    Relay {
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The namespace to listen in, e.g. /run/netns/wm-lab-n1.
        #[arg(long)]
        listen_netns: PathBuf,
        #[arg(long)]
        connect: String,
    },
    /// Remove every namespace, process and file of the lab (also after a crash).
    Down {
        #[command(flatten)]
        lab: LabArgs,
    },
    /// Ping every ordered pair of pods while capturing the underlay; exit 0 only if all hold.
    Verify {
        #[command(flatten)]
        lab: LabArgs,
        #[arg(long, value_enum, default_value = "auto")]
        expect: VerifyExpect,
        /// Pings per pair.
        #[arg(long, default_value_t = 3)]
        count: u32,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Run a command in a node (with its /run/wireguard) or a pod: `lab exec node1 -- wg show`.
    Exec {
        #[command(flatten)]
        lab: LabArgs,
        /// node<i>, pod<i> or <i>.
        node: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Change FelixConfiguration: `lab set wireguardEnabled=false`; `KEY=` removes the field.
    Set {
        #[command(flatten)]
        lab: LabArgs,
        /// KEY=VALUE; VALUE is JSON when it parses as JSON, else a string.
        assignment: String,
        /// Change `node.<name>` instead of `default`.
        #[arg(long)]
        node: Option<String>,
    },
    /// Load manifests into the lab: projectcalico.org/v3 policy kinds, FelixConfiguration and
    /// NetworkPolicies into its datastore; v1 Namespaces and Pods become real lab pods (their
    /// namespace, veth, addresses, port servers, WorkloadEndpoint and profiles; etcd labs only).
    /// Validated first, nothing is written if any object is invalid.
    #[command(
        after_help = "Examples:\n  wiremesh lab apply -f pods.yaml\n  wiremesh lab apply --delete -f pods.yaml"
    )]
    Apply {
        #[command(flatten)]
        lab: LabArgs,
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        /// Delete the objects instead.
        #[arg(long)]
        delete: bool,
    },
    /// Probe every lab pod from every lab pod (pod addresses: the lab has no Services) and print
    /// one reachability table per protocol and port: rows = from, columns = to, `.` reachable,
    /// `X` blocked, `-` self (not probed). TCP: a connection or a refusal answers; UDP: the
    /// pod's echo. Exit 1 when --expect is given and a cell differs.
    #[command(
        after_help = "Examples:\n  wiremesh lab probe --ports 80,81 --protocols tcp,udp\n  wiremesh lab probe --expect expected.txt"
    )]
    Probe {
        #[command(flatten)]
        lab: LabArgs,
        /// Ports to probe (default 80, or the tables of --expect).
        #[arg(long, value_delimiter = ',')]
        ports: Vec<u16>,
        /// tcp, udp (default tcp, or the tables of --expect).
        #[arg(long, value_delimiter = ',', value_enum)]
        protocols: Vec<ProbeProtocol>,
        /// Compare with the tables in this file (the format `lab probe` prints); print only the
        /// differing cells.
        #[arg(long)]
        expect: Option<PathBuf>,
        /// How long each probe waits for an answer, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// (internal) Serve a lab pod's ports: TCP accepts, UDP echoes (run in the pod's namespace).
    #[command(hide = true)]
    Serve {
        #[arg(long, value_delimiter = ',')]
        tcp: Vec<u16>,
        #[arg(long, value_delimiter = ',')]
        udp: Vec<u16>,
        /// Written once every port is bound.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Show nodes, namespaces and whether the processes are alive.
    Status {
        #[command(flatten)]
        lab: LabArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Draw the mesh (Graphviz DOT from `wiremesh status` in every node); `--svg` renders it.
    #[command(
        after_help = "Examples:\n  wiremesh lab graph > mesh.dot\n  wiremesh lab graph --svg mesh.svg   (needs Graphviz: apt-get install graphviz)"
    )]
    Graph {
        #[command(flatten)]
        lab: LabArgs,
        /// Render to this SVG file with `dot` instead of printing DOT.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
}

/// `KEY=VALUE` → (key, JSON value); an empty value means "remove".
fn parse_assignment(text: &str) -> Result<(String, Value), LabError> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| LabError::InvalidArgument {
            what: "assignment".into(),
            reason: format!("{text:?} is not KEY=VALUE"),
        })?;
    let key = key.trim();
    if key.is_empty() {
        return Err(LabError::InvalidArgument {
            what: "assignment".into(),
            reason: "empty key".into(),
        });
    }
    let value = if value.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()))
    };
    Ok((key.to_string(), value))
}

/// Runs one lab subcommand; returns the process exit code.
pub async fn run(cmd: LabCommand) -> Result<i32, LabError> {
    super::require_root()?;
    match cmd {
        LabCommand::Up {
            lab,
            nodes,
            encryption,
            keepalive,
            no_agents,
            binary,
            wireguard_backend,
            kubeconfig,
            ip_family,
            output,
        } => {
            let options = UpOptions {
                name: lab.name,
                state_dir: lab.state_dir,
                nodes,
                encryption: encryption == OnOff::On,
                keepalive: Some(keepalive).filter(|k| !k.is_empty()),
                agents: !no_agents,
                binary,
                wireguard_backend,
                kubeconfig,
                ip_family,
            };
            let lab = Lab::up(options).await?;
            output::print(&lab.status_report(), output.format, LabStatus::text)?;
            Ok(0)
        }
        LabCommand::Relay {
            listen,
            listen_netns,
            connect,
        } => {
            tokio::task::spawn_blocking(move || super::k8s::relay(listen, &listen_netns, connect))
                .await
                .map_err(|e| LabError::Kube {
                    step: "relay".into(),
                    source: Box::new(e),
                })??;
            Ok(0)
        }
        LabCommand::Down { lab } => {
            super::down(&lab.name, lab.state_dir.as_deref())?;
            crate::outln!("lab {} is down", lab.name);
            Ok(0)
        }
        LabCommand::Verify {
            lab,
            expect,
            count,
            output,
        } => {
            let lab = lab.load()?;
            let report =
                verify::VerifyReport::new(verify::verify(&lab, expect, count.max(1)).await?);
            output::print(&report, output.format, verify::VerifyReport::text)?;
            Ok(if report.ok { 0 } else { 1 })
        }
        LabCommand::Exec { lab, node, cmd } => {
            let lab = lab.load()?;
            let args = lab.exec_args(&node, &cmd)?;
            let status = std::process::Command::new("ip")
                .args(&args)
                .stdin(Stdio::inherit())
                .status()
                .map_err(|source| LabError::Spawn {
                    step: "running a command".into(),
                    object: node,
                    source,
                })?;
            // A signal death has no code; report it as the shell would.
            Ok(status.code().unwrap_or(128))
        }
        LabCommand::Set {
            lab,
            assignment,
            node,
        } => {
            let lab = lab.load()?;
            let (key, value) = parse_assignment(&assignment)?;
            lab.set(&key, value.clone(), node.as_deref()).await?;
            let object = node.map_or_else(|| "default".to_string(), |n| format!("node.{n}"));
            crate::outln!("FelixConfiguration {object}: {key} = {value}");
            Ok(0)
        }
        LabCommand::Apply { lab, files, delete } => {
            let mut lab = lab.load()?;
            let manifest = super::policy::read_manifests(&files)?;
            for key in lab.apply(&manifest, delete).await? {
                crate::outln!("{} {key}", if delete { "deleted" } else { "applied" });
            }
            Ok(0)
        }
        LabCommand::Probe {
            lab,
            ports,
            protocols,
            expect,
            timeout_ms,
            output,
        } => {
            let lab = lab.load()?;
            let expected = match &expect {
                None => None,
                Some(path) => {
                    let text = std::fs::read_to_string(path).map_err(|source| LabError::Io {
                        step: "reading the expected tables".into(),
                        path: path.clone(),
                        source,
                    })?;
                    let file = path.display().to_string();
                    Some(probe::parse_tables(&file, &text).map_err(|e| {
                        LabError::InvalidArgument {
                            what: "--expect".into(),
                            reason: e.to_string(),
                        }
                    })?)
                }
            };
            let keys = match (&expected, ports.is_empty() && protocols.is_empty()) {
                (Some(tables), true) => probe::keys_of(tables, &lab.state.ip_family.families()),
                _ => {
                    let ports = if ports.is_empty() { vec![80] } else { ports };
                    let protocols: Vec<PortProtocol> = if protocols.is_empty() {
                        vec![PortProtocol::Tcp]
                    } else {
                        protocols.into_iter().map(PortProtocol::from).collect()
                    };
                    lab.probe_keys(&protocols, &ports)
                }
            };
            if lab.probe_pods().is_empty() {
                return Err(LabError::InvalidArgument {
                    what: "lab probe".into(),
                    reason: "the lab has no pods: `lab apply -f` v1 Pod manifests first".into(),
                });
            }
            let tables = lab
                .probe(keys, std::time::Duration::from_millis(timeout_ms.max(1)))
                .await?;
            let differences = expected.as_ref().map(|e| probe::compare(&tables, e));
            let report = probe::ProbeReport {
                ok: differences.as_ref().is_none_or(Vec::is_empty),
                tables,
                expect: expect.map(|p| p.display().to_string()),
                differences,
            };
            output::print(&report, output.format, probe::ProbeReport::text)?;
            Ok(if report.ok { 0 } else { 1 })
        }
        LabCommand::Serve {
            tcp,
            udp,
            ready_file,
        } => {
            tokio::task::spawn_blocking(move || {
                super::serve::serve(&tcp, &udp, ready_file.as_deref())
            })
            .await
            .map_err(|e| LabError::Timeout {
                step: format!("serving ({e})"),
                object: "lab serve".into(),
            })??;
            Ok(0)
        }
        LabCommand::Status { lab, output } => {
            let lab = lab.load()?;
            output::print(&lab.status_report(), output.format, LabStatus::text)?;
            Ok(0)
        }
        LabCommand::Graph { lab, svg } => {
            let lab = lab.load()?;
            let dot = crate::cli::graph::render(&lab.status_reports()?);
            match svg {
                None => {
                    crate::out!("{dot}");
                    Ok(0)
                }
                Some(path) => {
                    render_svg(&dot, &path)?;
                    crate::outln!("wrote {}", path.display());
                    Ok(0)
                }
            }
        }
    }
}

/// Runs `dot -Tsvg -o path` on `dot`.
fn render_svg(dot: &str, path: &std::path::Path) -> Result<(), LabError> {
    use std::io::Write as _;
    let spawn_error = |source| LabError::Spawn {
        step: "rendering the graph (is Graphviz installed? apt-get install graphviz)".into(),
        object: path.display().to_string(),
        source,
    };
    let mut child = std::process::Command::new("dot")
        .arg("-Tsvg")
        .arg("-o")
        .arg(path)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(dot.as_bytes()).map_err(spawn_error)?;
    }
    let out = child.wait_with_output().map_err(spawn_error)?;
    if !out.status.success() {
        return Err(LabError::Command {
            step: "rendering the graph".into(),
            object: path.display().to_string(),
            command: format!("dot -Tsvg -o {}", path.display()),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_values_are_json_when_they_parse() {
        let parse = |t| parse_assignment(t).ok();
        assert_eq!(
            parse("wireguardEnabled=false"),
            Some(("wireguardEnabled".into(), Value::Bool(false)))
        );
        assert_eq!(
            parse("wireguardKeepAlive=25s"),
            Some(("wireguardKeepAlive".into(), Value::String("25s".into())))
        );
        assert_eq!(
            parse("wireguardListeningPort=51830"),
            Some(("wireguardListeningPort".into(), 51830.into()))
        );
        assert_eq!(
            parse("wireguardMTU="),
            Some(("wireguardMTU".into(), Value::Null))
        );
        assert!(parse("novalue").is_none());
        assert!(parse("=1").is_none());
    }
}

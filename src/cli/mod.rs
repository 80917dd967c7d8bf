//! The `wiremesh` command line: one clap definition ([`Cli`]), one way to pick a datastore
//! ([`DatastoreArgs`]), one way to print ([`output`]), and one place that reports a failed
//! command ([`main`]).

pub mod agent;
pub mod bench;
pub mod bench_policy;
pub mod crds;
pub mod datastore;
pub mod graph;
pub mod lab;
pub mod output;
pub mod policy;
pub mod rotate_key;
pub mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wiremesh_core::error_chain;

#[derive(Debug, Parser)]
#[command(
    name = "wiremesh",
    version,
    about = "WireGuard mesh agent for Kubernetes and bare metal, Calico-compatible",
    after_help = "Examples:
  wiremesh agent --node-name node1 --etcd-endpoints http://10.0.0.1:2379
  wiremesh status                      is this node's mesh healthy? (exit 0 OK, 1 DEGRADED, 2 DOWN)
  wiremesh status -o json              the same for scripts (docs/status.md)
  wiremesh lab up && wiremesh lab verify
  wiremesh completions bash > /etc/bash_completion.d/wiremesh
  wiremesh man --dir /usr/local/share/man/man1

Developer commands, not listed above: bench, bench-policy (docs/testing.md).
Exit codes are listed in docs/cli.md."
)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "WIREMESH_LOG_FORMAT",
        value_enum,
        default_value = "human"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent.
    Agent(agent::AgentArgs),
    /// This node's mesh: verdict, device, peers, agreement with what peers publish.
    Status(status::StatusArgs),
    /// The mesh as a Graphviz DOT graph, from `wiremesh status -o json` reports.
    Graph(graph::GraphArgs),
    /// Policy tools (host endpoints and pods): check, which-endpoints, unused, explain.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// A multi-node lab on this machine, out of network namespaces.
    #[command(
        subcommand,
        after_help = "Examples:\n  wiremesh lab up --nodes 3\n  wiremesh lab verify\n  wiremesh lab exec node1 -- wiremesh status\n  wiremesh lab graph --svg mesh.svg\n  wiremesh lab down"
    )]
    Lab(lab::cli::LabCommand),
    /// Switch this node to a new WireGuard key (the agent programs and publishes it).
    RotateKey(rotate_key::RotateKeyArgs),
    /// Print the CRDs generated from the Rust types (or write one YAML per CRD with --dir).
    Crds(crds::CrdsArgs),
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  wiremesh completions bash > /etc/bash_completion.d/wiremesh\n  wiremesh completions zsh > \"${fpath[1]}/_wiremesh\""
    )]
    Completions { shell: clap_complete::Shell },
    /// Write man pages (wiremesh.1 and one per subcommand), or print wiremesh.1.
    #[command(
        after_help = "Examples:\n  wiremesh man | man -l -\n  wiremesh man --dir /usr/local/share/man/man1"
    )]
    Man {
        /// Write every page into this directory instead of printing wiremesh.1.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// (developers) Benchmark: program 1,000 and 5,000 synthetic peers next to `wg setconf` (root).
    #[command(hide = true)]
    Bench(bench::BenchArgs),
    /// (developers) Benchmark host-endpoint policy: 1,000 policies / 10,000 rules vs `nft -f`,
    /// and a set change (root).
    #[command(hide = true)]
    BenchPolicy(bench_policy::PolicyBenchArgs),
}

fn init_logging(format: LogFormat, default_level: &str) {
    // Level from WIREMESH_LOG (or RUST_LOG), e.g. `info`, `wiremesh=debug`.
    let filter = EnvFilter::try_from_env("WIREMESH_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A failed command: what to print (once) and the exit code.
struct Failure {
    command: &'static str,
    message: String,
    code: u8,
}

impl Failure {
    fn new(command: &'static str, error: &dyn std::error::Error, code: u8) -> Failure {
        Failure {
            command,
            message: error_chain(error),
            code,
        }
    }
}

/// The binary's entry point: parse, set up logging, run the command, and report a failure on
/// one line of stderr (the only place an error is printed).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Generated from the CLI definition; no runtime or logging needed.
    match &cli.command {
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "wiremesh", &mut script);
            output::write_stdout(&String::from_utf8_lossy(&script));
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => {
            return match man(dir.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => report(Failure::new("man", &e, 1)),
            };
        }
        _ => {}
    }
    // Reports print their own output: only warnings by default.
    let default_level = match cli.command {
        Command::Status(_) | Command::Graph(_) | Command::Policy(_) | Command::Crds(_) => "warn",
        _ => "info",
    };
    init_logging(cli.log_format, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return report(Failure::new("runtime", &e, 1)),
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => report(failure),
    }
}

fn report(failure: Failure) -> ExitCode {
    eprintln!("wiremesh {}: {}", failure.command, failure.message);
    ExitCode::from(failure.code)
}

fn man(dir: Option<&std::path::Path>) -> std::io::Result<()> {
    let cmd = Cli::command();
    match dir {
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut page)?;
            output::write_stdout(&String::from_utf8_lossy(&page));
            Ok(())
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            clap_mangen::generate_to(cmd, dir)
        }
    }
}

/// Exit code of a report-like command from its own code (0 OK, 1 degraded or problems found,
/// 2 down).
fn code(value: i32) -> u8 {
    u8::try_from(value).unwrap_or(2)
}

async fn run(command: Command) -> Result<u8, Failure> {
    match command {
        Command::Agent(args) => wiremesh_agent::run::run(args.config())
            .await
            .map(|()| 0)
            .map_err(|e| Failure::new("agent", &e, 1)),
        Command::RotateKey(args) => rotate_key::run(&args)
            .map(|()| 0)
            .map_err(|e| Failure::new("rotate-key", &e, 1)),
        Command::Crds(args) => crds::run(&args)
            .map(|()| 0)
            .map_err(|e| Failure::new("crds", &e, 1)),
        // Exit code 2: the status could not be read (as DOWN).
        Command::Status(args) => status::run(args)
            .await
            .map(code)
            .map_err(|e| Failure::new("status", &e, 2)),
        Command::Graph(args) => graph::run(args)
            .map(code)
            .map_err(|e| Failure::new("graph", &e, 2)),
        // Exit code 2 = the lab could not do what was asked (1 = verify failed).
        Command::Lab(cmd) => lab::cli::run(cmd)
            .await
            .map(code)
            .map_err(|e| Failure::new("lab", &e, 2)),
        Command::Policy(cmd) => policy::run(cmd)
            .await
            .map(code)
            .map_err(|e| Failure::new("policy", &e, 2)),
        Command::Bench(args) => bench::run(args)
            .await
            .map(|()| 0)
            .map_err(|e| Failure::new("bench", &e, 1)),
        Command::BenchPolicy(args) => bench_policy::run(args)
            .await
            .map(|()| 0)
            .map_err(|e| Failure::new("bench-policy", &e, 1)),
        Command::Completions { .. } | Command::Man { .. } => Ok(0),
    }
}

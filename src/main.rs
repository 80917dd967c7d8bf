//! The `wiremesh` binary: parse arguments, set up logging, run a subcommand.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "wiremesh",
    version,
    about = "WireGuard mesh agent for Kubernetes and bare metal, Calico-compatible",
    after_help = "Examples:
  wiremesh agent --node-name node1 --etcd-endpoints http://10.0.0.1:2379
  wiremesh status                      is this node's mesh healthy? (exit 0 OK, 1 DEGRADED, 2 DOWN)
  wiremesh status --output json        the same for scripts (docs/status.md)
  wiremesh lab up && wiremesh lab verify
  wiremesh completions bash > /etc/bash_completion.d/wiremesh
  wiremesh man --dir /usr/local/share/man/man1

Exit codes are listed in docs/cli.md."
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "WIREMESH_LOG_FORMAT",
        value_enum,
        default_value = "human"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent.
    Agent(wiremesh::agent::AgentArgs),
    /// Print the CRDs generated from the Rust types (or write one YAML per CRD with --dir).
    Crds {
        /// Write `<plural>.projectcalico.org.yaml` files into this directory.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// This node's mesh: verdict, device, peers, agreement with what peers publish.
    Status(wiremesh::status::StatusArgs),
    /// The mesh as a Graphviz DOT graph, from `wiremesh status --output json` reports.
    Graph(wiremesh::graph::GraphArgs),
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
        dir: Option<std::path::PathBuf>,
    },
    /// A multi-node lab on this machine, out of network namespaces.
    #[command(
        subcommand,
        after_help = "Examples:\n  wiremesh lab up --nodes 3\n  wiremesh lab verify\n  wiremesh lab exec node1 -- wiremesh status\n  wiremesh lab graph --svg mesh.svg\n  wiremesh lab down"
    )]
    Lab(wiremesh::lab::cli::LabCommand),
    /// Host-endpoint policy tools: check, which-endpoints, unused, explain.
    #[command(subcommand)]
    Policy(wiremesh::policy::cli::PolicyCommand),
    /// Benchmark host-endpoint policy: 1,000 policies / 10,000 rules vs `nft -f`, and a set change (root).
    BenchPolicy(wiremesh::policy::bench::PolicyBenchArgs),
    /// Benchmark: program 1,000 and 5,000 synthetic peers next to `wg setconf` (root).
    Bench(wiremesh::bench::BenchArgs),
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Generated from the CLI definition; no runtime or logging needed.
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "wiremesh",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => {
            return match man(dir.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("wiremesh man: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    // Reports (status, graph) print their own output: only warnings by default.
    let default_level = match cli.command {
        Command::Status(_) | Command::Graph(_) => "warn",
        _ => "info",
    };
    init_logging(cli.log_format, default_level);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wiremesh: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn man(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    let cmd = Cli::command();
    match dir {
        None => clap_mangen::Man::new(cmd)
            .render(&mut std::io::stdout())
            .context("writing the man page"),
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("writing man pages to {}", dir.display()))
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        match command {
            Command::Agent(args) => {
                wiremesh::agent::run(args).await.context("agent")?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Crds { dir } => {
                match dir {
                    Some(dir) => {
                        for path in wiremesh::api::write_all(&dir).context("writing CRDs")? {
                            println!("wrote {}", path.display());
                        }
                    }
                    None => {
                        let docs = wiremesh::api::rendered().context("rendering CRDs")?;
                        let yaml: Vec<String> = docs.into_iter().map(|(_, y)| y).collect();
                        print!("{}", yaml.join("---\n"));
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Status(args) => match wiremesh::status::run(args).await {
                Ok(code) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(2))),
                Err(e) => {
                    eprintln!("wiremesh status: {}", wiremesh::reconcile::error_chain(&e));
                    Ok(ExitCode::from(2))
                }
            },
            Command::Graph(args) => match wiremesh::graph::run(args) {
                Ok(code) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(2))),
                Err(e) => {
                    eprintln!("wiremesh graph: {}", wiremesh::reconcile::error_chain(&e));
                    Ok(ExitCode::from(2))
                }
            },
            Command::Completions { .. } | Command::Man { .. } => Ok(ExitCode::SUCCESS),
            Command::Lab(cmd) => match wiremesh::lab::cli::run(cmd).await {
                Ok(code) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(1))),
                Err(e) => {
                    // Exit code 2 = the lab could not do what was asked (1 = verify failed).
                    eprintln!("wiremesh lab: {}", wiremesh::reconcile::error_chain(&e));
                    Ok(ExitCode::from(2))
                }
            },
            Command::Policy(cmd) => {
                let code = wiremesh::policy::cli::run(cmd).await.context("policy")?;
                Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
            }
            Command::BenchPolicy(args) => {
                wiremesh::policy::bench::run(args)
                    .await
                    .context("bench-policy")?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Bench(args) => {
                wiremesh::bench::run(args).await.context("bench")?;
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

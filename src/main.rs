//! The `wiremesh` binary: parse arguments, set up logging, run a subcommand.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "wiremesh",
    version,
    about = "WireGuard mesh agent for Kubernetes and bare metal, Calico-compatible"
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
    /// A multi-node lab on this machine, out of network namespaces.
    #[command(subcommand)]
    Lab(wiremesh::lab::cli::LabCommand),
    /// Host-endpoint policy tools: check, which-endpoints, unused, explain.
    #[command(subcommand)]
    Policy(wiremesh::policy::cli::PolicyCommand),
    /// Benchmark host-endpoint policy: 1,000 policies / 10,000 rules vs `nft -f`, and a set change (root).
    BenchPolicy(wiremesh::policy::bench::PolicyBenchArgs),
    /// Benchmark: program 1,000 and 5,000 synthetic peers next to `wg setconf` (root).
    Bench(wiremesh::bench::BenchArgs),
}

fn init_logging(format: LogFormat) {
    // Level from WIREMESH_LOG (or RUST_LOG), e.g. `info`, `wiremesh=debug`.
    let filter = EnvFilter::try_from_env("WIREMESH_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
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
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wiremesh: {e:#}");
            ExitCode::FAILURE
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

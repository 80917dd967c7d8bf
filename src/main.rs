//! The wiremesh binary. (Minimal: only `lab` is wired here for now; the lead owns this file.)
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(name = "wiremesh", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// A multi-node lab on this machine, out of network namespaces.
    #[command(subcommand)]
    Lab(wiremesh::lab::cli::LabCommand),
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Lab(cmd) => match wiremesh::lab::cli::run(cmd).await {
            Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            Err(e) => {
                eprintln!("error: {}", wiremesh::reconcile::error_chain(&e));
                ExitCode::from(2)
            }
        },
    }
}

//! The `wiremesh` binary; everything it does is in `wiremesh::cli`.

fn main() -> std::process::ExitCode {
    wiremesh::cli::main()
}

//! The `wiremesh` command line: every tool under [`cli`] (the binary's `main.rs` only calls
//! [`cli::main`]), and [`netns`], the throw-away network namespaces the benches and the
//! real-kernel tests use.

pub mod cli;
pub mod netns;

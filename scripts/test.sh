#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, then every tier (unit and property
# tests, the reconcile loop against fakes, real-kernel tests in network namespaces, and the
# lab end to end). Needs root for the kernel and lab tiers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo fmt --all --check
cargo clippy --locked --workspace --all-targets -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --no-fail-fast
  # nextest does not run documentation examples; they are tests too.
  cargo test --locked --workspace --doc
else
  cargo test --locked --workspace --no-fail-fast
fi

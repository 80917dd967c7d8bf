#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, then every tier (unit and property
# tests, the reconcile loop against fakes, real-kernel tests in network namespaces, and the
# lab end to end). Needs root for the kernel and lab tiers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo fmt --all --check
cargo clippy --locked --workspace --all-targets -- -D warnings
# The Kubernetes end-to-end suite (tests/kube_e2e.rs) runs against a real kube-apiserver v1.20.2
# and etcd (.ci/kube-apiserver: built once from Debian's source package, 5-12 min, then cached
# in /var/cache/wiremesh-kube-apiserver). Root only, as the build installs packages; a
# WIREMESH_E2E_KUBECONFIG given by the caller wins, WIREMESH_SKIP_KUBE_APISERVER=1 skips it.
if [ -z "${WIREMESH_E2E_KUBECONFIG:-}" ] && [ "$(id -u)" = 0 ] \
  && [ "${WIREMESH_SKIP_KUBE_APISERVER:-0}" != 1 ]; then
  # Ports no test or lab uses (the etcd the tests start listens on 2379).
  export KUBE_APISERVER_PORT=${KUBE_APISERVER_PORT:-17443}
  export KUBE_APISERVER_ETCD_PORT=${KUBE_APISERVER_ETCD_PORT:-17379}
  bash .ci/kube-apiserver/setup.sh
  bash .ci/kube-apiserver/start.sh --fresh
  trap 'bash .ci/kube-apiserver/stop.sh' EXIT
  export WIREMESH_E2E_KUBECONFIG=${KUBE_APISERVER_HOME:-/var/cache/wiremesh-kube-apiserver}/kubeconfig
fi
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --no-fail-fast
  # nextest does not run documentation examples; they are tests too.
  cargo test --locked --workspace --doc
else
  cargo test --locked --workspace --no-fail-fast
fi

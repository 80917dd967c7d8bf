#!/usr/bin/env bash
# The main job on a fresh Debian machine: install what is needed, build wiremesh, bring up a
# 3-node lab (network namespaces, etcd, one agent per node, userspace WireGuard) with encryption
# on, and verify it: every pod reaches every other pod and the underlay carries no clear pod
# traffic. The lab is left up to explore; `target/lab/wiremesh lab down` removes it.
#
# The build uses the `lab` profile (optimised, no LTO): a fraction of the release build's time
# on a 2-core machine, and plenty fast for a lab.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }
started=$SECONDS

step "1/4 Checking the Rust toolchain and installing Debian packages (scripts/deps.sh)"
scripts/deps.sh

step "2/4 Building wiremesh (cargo build --profile lab; a first build takes a few minutes)"
cargo build --profile lab --locked --bin wiremesh
wiremesh=target/lab/wiremesh

step "3/4 Bringing up a ${NODES:-3}-node lab (namespaces, etcd, agents)"
"$wiremesh" lab down >/dev/null 2>&1 || true   # a previous lab of the same name, if any
"$wiremesh" lab up --nodes "${NODES:-3}"

step "4/4 Verifying: every pod pair reaches the other, and only WireGuard crosses the underlay"
# verify waits for the agents to apply the configuration and for the handshakes first.
"$wiremesh" lab verify

cat <<MSG

The lab is up ($((SECONDS - started)) s). Try:
  $wiremesh lab exec node1 -- wg show                 # peers, handshakes, transfer
  $wiremesh lab exec node1 -- wiremesh status         # the node's verdict and peers
  $wiremesh lab exec node1 -- ip route show table 1   # routes through the tunnel
  $wiremesh lab set wireguardEnabled=false && $wiremesh lab verify   # clear text again
  $wiremesh lab down                                  # remove everything
MSG

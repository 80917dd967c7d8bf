#!/usr/bin/env bash
# The main job on a fresh Debian machine: install what is needed, build wiremesh, bring up a
# 3-node lab (network namespaces, etcd, one agent per node, userspace WireGuard) with encryption
# on, and verify it: every pod reaches every other pod and the underlay carries no clear pod
# traffic. The lab is left up to explore; `target/release/wiremesh lab down` removes it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --locked
wiremesh=target/release/wiremesh
"$wiremesh" lab down >/dev/null 2>&1 || true   # a previous lab of the same name, if any
"$wiremesh" lab up --nodes "${NODES:-3}"
echo "waiting for the mesh to come up..."
for _ in $(seq 1 30); do
  if "$wiremesh" lab verify --count 1 >/dev/null 2>&1; then break; fi
  sleep 1
done
"$wiremesh" lab verify
cat <<MSG

The lab is up. Try:
  $wiremesh lab exec node1 -- wg show                 # peers, handshakes, transfer
  $wiremesh lab exec node1 -- ip route show table 1   # routes through the tunnel
  $wiremesh lab set wireguardEnabled=false && $wiremesh lab verify   # clear text again
  $wiremesh lab down                                  # remove everything
MSG

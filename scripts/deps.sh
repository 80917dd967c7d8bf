#!/usr/bin/env bash
# Installs the Debian packages wiremesh's lab and tests need (idempotent; needs root).
set -euo pipefail
packages=(
  wireguard-tools wireguard-go   # wg(8) and the userspace WireGuard used when the kernel has no module
  nftables iproute2 kmod procps  # nft, ip, modprobe, pgrep/ps
  iputils-ping tcpdump           # traffic and capture in the lab and its tests
  curl                           # the lab tests scrape /metrics, /healthz, /readyz inside node namespaces
  etcd-server etcd-client        # the lab's datastore and the etcd adapter's tests
  protobuf-compiler libprotobuf-dev  # etcd-client's build script compiles etcd's protos
)
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/deps.sh: run as root (it installs Debian packages)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Never kubernetes-client: it conflicts with the kubectl package already on these machines.
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

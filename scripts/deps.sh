#!/usr/bin/env bash
# Installs the Debian packages wiremesh's lab and tests need, when missing (needs root).
set -euo pipefail
packages=(
  wireguard-tools wireguard-go   # wg(8) and the userspace WireGuard used when the kernel has no module
  nftables iproute2 kmod procps  # nft, ip, modprobe, pgrep/ps
  iputils-ping tcpdump           # traffic and capture in the lab and its tests
  curl                           # the lab tests scrape /metrics, /healthz, /readyz inside node namespaces
  etcd-server etcd-client        # the lab's datastore and the etcd adapter's tests
  protobuf-compiler libprotobuf-dev  # etcd-client's build script compiles etcd's protos
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/deps.sh: missing ${missing[*]}; run as root to install them" >&2
  exit 1
fi
echo "scripts/deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Never kubernetes-client: it conflicts with the kubectl package already on these machines.
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

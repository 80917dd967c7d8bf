#!/usr/bin/env bash
# The one prerequisite check: a Rust toolchain at least as new as the workspace's
# `rust-version` (edition 2024 alone needs 1.85; the workspace states the version it is built
# and tested with), then the Debian packages wiremesh's lab and tests need, installed when
# missing (that part needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

required=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
rust_help() {
  cat >&2 <<MSG
scripts/deps.sh: $1
wiremesh needs Rust $required or newer (Debian 12's own cargo is 1.63: too old). Install it with
rustup, then open a new shell:
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  . "\$HOME/.cargo/env"
or, where rustup is already installed:  rustup update stable
MSG
  exit 1
}
command -v cargo >/dev/null 2>&1 || rust_help "cargo is not installed"
have=$(cargo --version | awk '{print $2}')
# sort -V orders versions; the required one must come first (or be equal).
if [ "$(printf '%s\n%s\n' "$required" "$have" | sort -V | head -n 1)" != "$required" ]; then
  rust_help "cargo $have is older than $required"
fi

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

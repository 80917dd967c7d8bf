# syntax=docker/dockerfile:1
# The wiremesh node agent image (deploy/daemonset.yaml, deploy/helm/wiremesh).
#   docker build -t wiremesh:0.1.0 .
# Build and runtime share one Debian release, so the binary's glibc matches.

FROM rust:1.95-slim-trixie AS build
WORKDIR /src
# etcd-client's build script compiles etcd's protos.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked --bin wiremesh \
 && install -m 0755 target/release/wiremesh /usr/local/bin/wiremesh

FROM debian:trixie-slim
# wireguard-tools: `wg show` in the container; wireguard-go: the userspace backend when the
# kernel has no WireGuard module; nftables: the filter engine; iproute2: `ip` for debugging.
# tini: the agent starts wireguard-go, which daemonizes; an init as PID 1 reaps the daemon when
# it exits (the agent itself does not reap processes it did not wait for) and forwards signals.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wireguard-tools wireguard-go nftables iproute2 ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/wiremesh /usr/local/bin/wiremesh
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/wiremesh"]
CMD ["agent"]

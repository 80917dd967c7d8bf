//! Builders shared by the pure and fake-backed tests.
#![allow(dead_code)]

pub mod apiserver;
pub mod etcd;
pub mod lab;

use std::collections::BTreeMap;

use wiremesh_core::keys::PrivateKey;
use wiremesh_core::mesh::{Inputs, LocalFacts};
use wiremesh_core::model::{ClusterSnapshot, Family, NodeResource};
use wiremesh_core::wire::FelixConfigurationSpec;

/// True when the test may run: as root, or false (with a printed notice) when not root and
/// `WIREMESH_SKIP_ROOT_TESTS=1`; otherwise it fails loudly rather than skip silently.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("WIREMESH_SKIP_ROOT_TESTS").as_deref() == Ok("1") {
        eprintln!("{test}: SKIPPED (not root and WIREMESH_SKIP_ROOT_TESTS=1)");
        return false;
    }
    panic!(
        "{test}: needs root (network namespaces, nftables, TUN); WIREMESH_SKIP_ROOT_TESTS=1 skips the root tests"
    );
}

/// True if a TCP connection attempt gets an answer (accept or RST) within 2 s, false if it is
/// dropped. Needs no listener: "connection refused" proves the SYN got through.
pub fn tcp_answers(from: &wiremesh::netns::Netns, to: &str, port: u16) -> bool {
    let started = std::time::Instant::now();
    let status = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            from.name(),
            "timeout",
            "2",
            "bash",
            "-c",
            &format!("echo > /dev/tcp/{to}/{port}"),
        ])
        .output()
        .expect("bash");
    status.status.code() != Some(124) && started.elapsed() < std::time::Duration::from_secs(2)
}

/// A deterministic private key for node `i` (tests only).
pub fn key(i: u8) -> PrivateKey {
    let mut bytes = [i; 32];
    bytes[0] = 0x40 | i;
    PrivateKey::from_bytes(bytes)
}

/// Node `node<i>` at 172.30.0.i with pod CIDR 10.244.i.0/24, publishing key(i).
pub fn node(i: u8) -> NodeResource {
    NodeResource {
        name: format!("node{i}"),
        ipv4_address: Some(format!("172.30.0.{i}/24")),
        pod_cidrs: vec![format!("10.244.{i}.0/24")],
        wireguard_public_key: Some(key(i).public_key().to_string()),
        wireguard_interface_ipv4_address: Some(format!("10.244.{i}.1")),
        ..Default::default()
    }
}

/// Like `node` but dual-stack.
pub fn node_dual(i: u8) -> NodeResource {
    NodeResource {
        ipv6_address: Some(format!("fd00:30::{i}")),
        pod_cidrs: vec![format!("10.244.{i}.0/24"), format!("fd00:244:{i}::/64")],
        wireguard_public_key_v6: Some(key(100 + i).public_key().to_string()),
        ..node(i)
    }
}

pub fn felix(enabled: bool) -> FelixConfigurationSpec {
    FelixConfigurationSpec {
        wireguard_enabled: Some(enabled),
        ..Default::default()
    }
}

pub fn snapshot(nodes: impl IntoIterator<Item = NodeResource>, enabled: bool) -> ClusterSnapshot {
    ClusterSnapshot {
        nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
        felix_configurations: [("default".to_string(), Ok(felix(enabled).into()))]
            .into_iter()
            .collect(),
        synced: true,
        ..Default::default()
    }
}

/// Inputs for `node<local>` with IPv4 WireGuard on.
pub fn inputs(local: u8, nodes: impl IntoIterator<Item = NodeResource>) -> Inputs {
    let config = wiremesh_core::config::EffectiveConfig::merge(&[("default", &felix(true))]);
    assert!(config.errors.is_empty());
    let settings = config.wireguard;
    Inputs {
        local: LocalFacts {
            node_name: format!("node{local}"),
            private_keys: BTreeMap::from([
                (Family::V4, key(local)),
                (Family::V6, key(100 + local)),
            ]),
            fwmark: 0x200000,
            routing_table: 1,
            host_mtu: 1500,
            previous_interfaces: Default::default(),
            confirmed_peers: Default::default(),
        },
        settings,
        nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
    }
}

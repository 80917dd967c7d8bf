//! End-to-end tests of `wiremesh lab` in network namespaces (root only). Every test uses a lab
//! name of its own and a guard that runs `down` even when the test fails. Traffic stays on the
//! lab's own addresses inside the lab's namespaces.

mod support;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::root_or_skip;

use wiremesh::cli::lab::{self, Expectation, Lab, UpOptions, VerifyExpect, verify};

fn unique(short: &str) -> String {
    format!("t{short}{}", std::process::id())
}

/// Runs `down` on drop, so a failing test leaves nothing behind.
struct Guard {
    name: String,
    dir: Option<PathBuf>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = lab::down(&self.name, self.dir.as_deref()) {
            eprintln!("cleanup of lab {} failed: {e}", self.name);
        }
    }
}

fn options(name: &str, nodes: u32) -> UpOptions {
    let mut o = UpOptions::new(name, nodes);
    o.agents = false;
    o.encryption = false;
    o
}

fn lab_namespaces(name: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| lab::is_lab_netns(name, ns))
        .map(str::to_string)
        .collect()
}

fn assert_gone(name: &str, dir: &Path, etcd_pid: Option<i32>) {
    assert!(
        lab_namespaces(name).is_empty(),
        "namespaces left: {:?}",
        lab_namespaces(name)
    );
    assert!(!dir.exists(), "state dir {} left", dir.display());
    if let Some(pid) = etcd_pid {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "etcd pid {pid} still exists"
        );
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(
        !mounts.contains(&dir.display().to_string()),
        "a mount of {} is left",
        dir.display()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn topology_pings_verify_clear_and_down() {
    if !root_or_skip("topology_pings_verify_clear_and_down") {
        return;
    }
    let name = unique("topo");
    let _guard = Guard {
        name: name.clone(),
        dir: None,
    };
    let lab = Lab::up(options(&name, 3)).await.expect("lab up");
    let dir = lab.state.dir.clone();

    let mut expected = vec![lab.hub_netns().to_string()];
    for i in 1..=3 {
        expected.push(lab.node_netns(i));
        expected.push(lab.pod_netns(i));
    }
    let mut present = lab_namespaces(&name);
    present.sort();
    expected.sort();
    assert_eq!(present, expected);

    // Clear-text matrix: every pod reaches every other pod through both nodes' forwarding path.
    for i in 1..=3 {
        for j in (1..=3).filter(|j| *j != i) {
            let r = lab
                .ping(&format!("pod{i}"), &format!("pod{j}"), 1)
                .expect("ping");
            assert!(r.reachable(), "pod{i} -> pod{j} unreachable");
        }
    }
    let out = lab
        .exec_in_node("node1", &["ip", "-4", "route", "show", "10.244.2.0/24"])
        .expect("exec");
    assert!(String::from_utf8_lossy(&out.stdout).contains("via 172.30.0.2 dev eth0"));

    // Datastore content and `set`.
    let node = lab
        .read_raw("/calico/resources/v3/projectcalico.org/nodes/node2")
        .await
        .expect("read node");
    assert!(node.is_some_and(|n| n.contains("172.30.0.2/24")));
    let affinity = lab
        .read_raw("/calico/ipam/v2/host/node3/ipv4/block/10.244.3.0-24")
        .await
        .expect("read");
    assert_eq!(affinity.as_deref(), Some(r#"{"state":"confirmed"}"#));

    for expect in [VerifyExpect::Clear, VerifyExpect::Auto] {
        let results = verify::verify(&lab, expect, 2).await.expect("verify");
        assert_eq!(results.len(), 6, "{results:?}");
        for r in &results {
            assert!(r.ok, "{r}");
            assert_eq!(r.expected, Expectation::Clear);
            assert!(r.clear_packets > 0, "{r}");
            assert_eq!(r.wireguard_packets, 0, "{r}");
        }
        assert!(verify::summary(&results).1);
    }
    // The capture really sees clear traffic: expecting encryption must fail every pair.
    let results = verify::verify(&lab, VerifyExpect::Encrypted, 1)
        .await
        .expect("verify");
    assert!(
        results.iter().all(|r| !r.ok && r.clear_packets > 0),
        "{results:?}"
    );
    assert!(!verify::summary(&results).1);

    lab.set("wireguardEnabled", serde_json::Value::Bool(true), None)
        .await
        .expect("set");
    lab.set(
        "wireguardEnabled",
        serde_json::Value::Bool(false),
        Some("node2"),
    )
    .await
    .expect("set");
    let default = lab
        .read_raw("/calico/resources/v3/projectcalico.org/felixconfigurations/default")
        .await
        .expect("read")
        .unwrap_or_default();
    assert!(default.contains(r#""wireguardEnabled":true"#), "{default}");
    // With node2 off, auto expects encryption only between node1 and node3.
    let results = verify::verify(&lab, VerifyExpect::Auto, 1)
        .await
        .expect("verify");
    for r in &results {
        let encrypted = !(r.from == "node2" || r.to == "node2");
        assert_eq!(r.expected == Expectation::Encrypted, encrypted, "{r}");
    }

    let etcd_pid = lab.state.etcd_pid;
    lab::down(&name, None).expect("down");
    assert_gone(&name, &dir, etcd_pid);
    lab::down(&name, None).expect("down is idempotent");
}

#[tokio::test(flavor = "multi_thread")]
async fn down_after_crash_without_state_file() {
    if !root_or_skip("down_after_crash_without_state_file") {
        return;
    }
    let name = unique("crash");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("state");
    let _guard = Guard {
        name: name.clone(),
        dir: Some(dir.clone()),
    };
    let mut o = options(&name, 2);
    o.state_dir = Some(dir.clone());
    let lab = Lab::up(o).await.expect("lab up");
    let etcd_pid = lab.state.etcd_pid;
    assert!(etcd_pid.is_some());
    // A stray process in a node, as a crashed run might leave.
    let out = Command::new("setsid")
        .args([
            "--fork",
            "ip",
            "netns",
            "exec",
            &lab.node_netns(1),
            "sleep",
            "600",
        ])
        .status()
        .expect("spawn");
    assert!(out.success());
    // `setsid --fork` returns before the child has entered the namespace; wait until it has.
    let in_node = || {
        Command::new("ip")
            .args(["netns", "pids", &lab.node_netns(1)])
            .output()
            .is_ok_and(|o| !o.stdout.is_empty())
    };
    for _ in 0..100 {
        if in_node() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        in_node(),
        "the stray process never entered the node namespace"
    );
    std::fs::remove_file(dir.join("lab.json")).expect("simulate crash");
    drop(lab);

    lab::down(&name, Some(&dir)).expect("down");
    assert_gone(&name, &dir, etcd_pid);
}

#[tokio::test(flavor = "multi_thread")]
async fn node_joins_and_leaves() {
    if !root_or_skip("node_joins_and_leaves") {
        return;
    }
    let name = unique("join");
    let _guard = Guard {
        name: name.clone(),
        dir: None,
    };
    let mut lab = Lab::up(options(&name, 2)).await.expect("lab up");

    lab.add_node(3).await.expect("add node3");
    for (a, b) in [("pod1", "pod3"), ("pod3", "pod2"), ("pod2", "pod1")] {
        assert!(lab.ping(a, b, 1).expect("ping").reachable(), "{a} -> {b}");
    }
    let key = "/calico/resources/v3/projectcalico.org/nodes/node3";
    assert!(lab.read_raw(key).await.expect("read").is_some());
    assert_eq!(Lab::load(&name).expect("load").state.nodes.len(), 3);

    lab.remove_node(3).await.expect("remove node3");
    assert!(lab.read_raw(key).await.expect("read").is_none());
    let affinity = "/calico/ipam/v2/host/node3/ipv4/block/10.244.3.0-24";
    assert!(lab.read_raw(affinity).await.expect("read").is_none());
    assert!(!lab_namespaces(&name).contains(&lab.node_netns(3)));
    assert!(!lab_namespaces(&name).contains(&lab.pod_netns(3)));
    let routes = lab.exec_in_node("node1", &["ip", "route"]).expect("exec");
    assert!(!String::from_utf8_lossy(&routes.stdout).contains("10.244.3.0/24"));
    assert!(lab.ping("pod1", "pod2", 1).expect("ping").reachable());
    assert!(lab.target("node3").is_err());
}

/// A stand-in agent: wireguard-go plus `wg set` for every node it can see, in the node's
/// namespace and private /run/wireguard. It proves the agent plumbing (detached start, mount,
/// stop/restart, `down` killing daemonized children) and verify's encrypted path, without
/// depending on the real agent.
const STUB_AGENT: &str = r#"#!/bin/sh
# args: agent --node-name nodeI ... --state-dir D ...
node=$3; i=${node#node}
while [ $# -gt 0 ]; do [ "$1" = "--state-dir" ] && dir=$2; shift; done
lab=$(dirname "$(dirname "$(dirname "$dir")")")
key() { printf '%032d' "$1" | base64; }
echo "$$" > /run/wireguard/stub-agent.pid
if [ ! -S /run/wireguard/wireguard.cali.sock ]; then
  wireguard-go wireguard.cali || exit 1
fi
key "$i" > "$dir/private.key"
wg set wireguard.cali listen-port 51820 private-key "$dir/private.key"
ip link set wireguard.cali mtu 1420 up
while true; do
  for d in "$lab"/nodes/node*; do
    j=${d##*/node}; [ "$j" = "$i" ] && continue
    wg set wireguard.cali peer "$(key "$j" | wg pubkey)" endpoint "172.30.0.$j:51820" \
      allowed-ips "10.244.$j.0/24" persistent-keepalive 5
    ip route replace "10.244.$j.0/24" dev wireguard.cali src "10.244.$i.1"
  done
  sleep 0.5
done
"#;

#[tokio::test(flavor = "multi_thread")]
async fn stub_agents_encrypt_and_restart() {
    if !root_or_skip("stub_agents_encrypt_and_restart") {
        return;
    }
    let name = unique("stub");
    let _guard = Guard {
        name: name.clone(),
        dir: None,
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let stub = tmp.path().join("stub-agent");
    std::fs::write(&stub, STUB_AGENT).expect("write stub");
    Command::new("chmod")
        .arg("755")
        .arg(&stub)
        .status()
        .expect("chmod");

    let mut o = UpOptions::new(&name, 3);
    o.binary = Some(stub);
    let mut lab = Lab::up(o).await.expect("lab up");
    let dir = lab.state.dir.clone();
    for node in lab.state.nodes.values() {
        assert!(node.agent_pid.is_some());
        // The agent saw its own run dir as /run/wireguard.
        let mut ok = false;
        for _ in 0..100 {
            ok = node.run_dir.join("wireguard.cali.sock").exists();
            if ok {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "no UAPI socket in {}", node.run_dir.display());
    }
    let out = lab
        .exec_in_node("node1", &["wg", "show", "wireguard.cali", "peers"])
        .expect("wg show");
    let mut peers = String::from_utf8_lossy(&out.stdout).lines().count();
    for _ in 0..50 {
        if peers == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let out = lab
            .exec_in_node("node1", &["wg", "show", "wireguard.cali", "peers"])
            .expect("wg show");
        peers = String::from_utf8_lossy(&out.stdout).lines().count();
    }
    assert_eq!(peers, 2, "wg show through `exec` sees node1's device");

    // Warm up handshakes, then every pair must be encrypted on the wire.
    for (a, b) in [("pod1", "pod2"), ("pod1", "pod3"), ("pod2", "pod3")] {
        let _ = lab.ping(a, b, 3);
    }
    let results = verify::verify(&lab, VerifyExpect::Auto, 3)
        .await
        .expect("verify");
    for r in &results {
        assert_eq!(r.expected, Expectation::Encrypted, "{r}");
        assert!(r.ok, "{r}");
        assert_eq!(r.clear_packets, 0, "{r}");
    }

    let old = lab.state.nodes[&2].agent_pid.expect("pid");
    let new = lab.restart_agent("node2").expect("restart");
    assert_ne!(old, new);
    assert!(
        !Path::new(&format!("/proc/{old}/ns")).exists(),
        "old agent still runs"
    );
    assert_eq!(
        Lab::load(&name).expect("load").state.nodes[&2].agent_pid,
        Some(new)
    );
    lab.stop_agent("node3").expect("stop");
    assert_eq!(lab.state.nodes[&3].agent_pid, None);
    lab.start_agent("node3").expect("start");

    let etcd_pid = lab.state.etcd_pid;
    lab::down(&name, None).expect("down");
    assert_gone(&name, &dir, etcd_pid);
}

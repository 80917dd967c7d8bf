//! Tier 4: operability in the lab: `wiremesh status` on every node of a healthy mesh and after
//! one node's published key is corrupted, `/metrics` (Felix's WireGuard series and the
//! convergence histogram), `/healthz` and `/readyz` scraped inside a node's namespace. Root
//! only; the lab is removed even when the test fails. Traffic stays inside the lab's namespaces.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::lab::{Guard, metric_value, start_lab, wait_within as wait_for};
use support::root_or_skip;
use wiremesh::cli::lab::{Lab, UpOptions};

mod support;

/// `wiremesh status --output json` in `node`: (exit code, report).
fn status_json(lab: &Lab, node: &str, extra: &[&str]) -> (i32, Value) {
    let index: u32 = node.trim_start_matches("node").parse().expect("node index");
    let state_dir = lab
        .node(index)
        .expect("node")
        .state_dir
        .display()
        .to_string();
    let mut cmd = vec![
        env!("CARGO_BIN_EXE_wiremesh"),
        "status",
        "--output",
        "json",
        "--state-dir",
        &state_dir,
    ];
    cmd.extend_from_slice(extra);
    let out = lab.exec_in_node(node, &cmd).expect("exec status");
    let text = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "status output of {node} is not JSON ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

/// HTTP GET inside `node` with curl: (status code, body).
fn http_get(lab: &Lab, node: &str, url: &str) -> (u16, String) {
    let out = lab
        .exec_in_node(
            node,
            &[
                "curl",
                "-s",
                "-m",
                "5",
                "-o",
                "/dev/stdout",
                "-w",
                "\n%{http_code}",
                url,
            ],
        )
        .expect("exec curl (scripts/deps.sh installs curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn peers(report: &Value) -> Vec<Value> {
    report["devices"][0]["peers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

async fn published_key(lab: &Lab, node: &str) -> (Value, String) {
    let raw = lab
        .read_raw(&format!(
            "/calico/resources/v3/projectcalico.org/nodes/{node}"
        ))
        .await
        .expect("read node")
        .expect("node exists");
    let json: Value = serde_json::from_str(&raw).expect("node JSON");
    let key = json["status"]["wireguardPublicKey"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (json, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_metrics_and_health_in_the_lab() {
    if !root_or_skip("lab_ops") {
        return;
    }
    let name = format!("ops{}", std::process::id() % 100_000);
    let _guard = Guard(name.clone());
    let mut options = UpOptions::new(&name, 3);
    options.encryption = true;
    options.binary = Some(PathBuf::from(env!("CARGO_BIN_EXE_wiremesh")));
    let mut lab = Lab::up(options).await.expect("lab up");
    let nodes = ["node1", "node2", "node3"];

    // 1. A healthy mesh: every node says OK, two peers, all agree, fresh handshakes.
    let started = Instant::now();
    wait_for(
        Duration::from_secs(45),
        "every node to report OK",
        async || {
            for i in 1..=3 {
                // Traffic makes the handshakes happen.
                let _ = lab.ping(&format!("pod{i}"), &format!("pod{}", i % 3 + 1), 1);
            }
            nodes.iter().all(|n| {
                let (code, r) = status_json(&lab, n, &[]);
                code == 0
                    && r["verdict"]["level"] == "ok"
                    && peers(&r).len() == 2
                    && peers(&r)
                        .iter()
                        .all(|p| p["agrees"] == true && p["handshake"] == "fresh")
            })
        },
    )
    .await;
    eprintln!("mesh OK on every node after {:?}", started.elapsed());
    let (_, r1) = status_json(&lab, "node1", &[]);
    assert_eq!(r1["schemaVersion"], 1);
    assert_eq!(r1["backend"], "userspace");
    assert_eq!(r1["devices"][0]["interface"], "wireguard.cali");
    assert!(
        r1["verdict"]["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("2/2 peers agree, handshakes fresh")),
        "{r1}"
    );
    let etcd = lab.state.etcd_endpoint.clone();
    let (code, cluster) = status_json(&lab, "node1", &["--cluster", "--etcd-endpoints", &etcd]);
    assert_eq!(code, 0, "{cluster}");
    assert_eq!(
        cluster["nodes"].as_array().map(Vec::len),
        Some(3),
        "{cluster}"
    );

    // 2. /metrics, /healthz, /readyz inside node1.
    let (_, key2) = published_key(&lab, "node2").await;
    wait_for(
        Duration::from_secs(20),
        "Felix's series for node2 in node1's /metrics",
        async || {
            let (code, body) = http_get(&lab, "node1", "http://127.0.0.1:9091/metrics");
            code == 200
                && body.contains("wireguard_meta{")
                && [
                    "wireguard_bytes_rcvd{",
                    "wireguard_bytes_sent{",
                    "wireguard_latest_handshake_seconds{",
                ]
                .iter()
                .all(|s| {
                    body.lines()
                        .any(|l| l.starts_with(s) && l.contains(&format!("peer_key=\"{key2}\"")))
                })
        },
    )
    .await;
    let (_, body) = http_get(&lab, "node1", "http://127.0.0.1:9091/metrics");
    let convergence_count: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("wiremesh_convergence_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        convergence_count > 0,
        "empty convergence histogram:\n{body}"
    );
    assert!(body.contains("wiremesh_peers{family=\"v4\"} 2"), "{body}");
    assert!(
        body.contains("wiremesh_backend_info{backend=\"userspace\"} 1"),
        "{body}"
    );
    assert!(body.contains("wiremesh_ready 1"), "{body}");
    assert_eq!(
        http_get(&lab, "node1", "http://127.0.0.1:9099/healthz").0,
        200
    );
    assert_eq!(
        http_get(&lab, "node1", "http://127.0.0.1:9099/readyz").0,
        200
    );

    // 3. Not ready before the first successful apply: node3 restarts with a corrupt key file
    // (the agent refuses to invent a key), so it stays live but unready until the file is fixed.
    lab.stop_agent("node3").expect("stop node3");
    let key_file = lab.node(3).expect("node3").state_dir.join("wireguard.key");
    let good_key = std::fs::read(&key_file).expect("key file");
    std::fs::write(&key_file, b"garbage\n").expect("corrupt key file");
    lab.start_agent("node3").expect("start node3");
    wait_for(Duration::from_secs(20), "node3's admin port", async || {
        http_get(&lab, "node3", "http://127.0.0.1:9099/healthz").0 == 200
    })
    .await;
    wait_for(
        Duration::from_secs(20),
        "node3 to count a keys failure",
        async || {
            http_get(&lab, "node3", "http://127.0.0.1:9091/metrics")
                .1
                .contains("wiremesh_reconcile_failures_total{kind=\"keys\"}")
        },
    )
    .await;
    let (code, body) = http_get(&lab, "node3", "http://127.0.0.1:9099/readyz");
    assert_eq!(code, 503, "{body}");
    assert_eq!(
        http_get(&lab, "node3", "http://127.0.0.1:9099/healthz").0,
        200
    );
    let (code, r3) = status_json(&lab, "node3", &[]);
    assert_eq!(code, 1, "{r3}");
    assert_eq!(r3["verdict"]["level"], "degraded", "{r3}");
    std::fs::write(&key_file, &good_key).expect("restore key file");
    wait_for(
        Duration::from_secs(40),
        "node3 to become ready",
        async || http_get(&lab, "node3", "http://127.0.0.1:9099/readyz").0 == 200,
    )
    .await;

    // 4. node3's published key replaced by another valid key while its agent is stopped (it
    // would heal it): node1 and node2 follow the datastore, get no handshake with that key,
    // and report node3 as disagreeing, with the reason.
    lab.stop_agent("node3").expect("stop node3");
    let (mut node3, real_key) = published_key(&lab, "node3").await;
    let other = wiremesh_core::keys::PrivateKey::generate()
        .public_key()
        .to_string();
    assert_ne!(other, real_key);
    node3["status"]["wireguardPublicKey"] = Value::String(other.clone());
    lab.write_raw(
        "/calico/resources/v3/projectcalico.org/nodes/node3",
        &node3.to_string(),
    )
    .await
    .expect("write node3");
    wait_for(
        Duration::from_secs(60),
        "node1 and node2 to report node3 as disagreeing",
        async || {
            let _ = lab.ping("pod1", "pod3", 1);
            let _ = lab.ping("pod2", "pod3", 1);
            ["node1", "node2"].iter().all(|n| {
                let (code, r) = status_json(&lab, n, &[]);
                let p3 = peers(&r).into_iter().find(|p| p["node"] == "node3");
                code == 1
                    && p3.is_some_and(|p| {
                        p["agrees"] == false
                            && p["publicKey"] == other.as_str()
                            && p["problems"][0]
                                .as_str()
                                .is_some_and(|s| s.contains("no handshake"))
                    })
            })
        },
    )
    .await;
    let (_, r1) = status_json(&lab, "node1", &[]);
    let summary = r1["verdict"]["summary"].as_str().unwrap_or_default();
    assert!(
        summary.starts_with("1/2 peers agree; disagreeing: node3 (no handshake"),
        "{r1}"
    );
    let p2 = peers(&r1).into_iter().find(|p| p["node"] == "node2");
    assert!(p2.is_some_and(|p| p["agrees"] == true), "{r1}");
    // Reading the datastore too gives the same answer (node1 follows it: keys agree, the
    // handshake does not).
    let (code, r1) = status_json(&lab, "node1", &["--etcd-endpoints", &etcd]);
    assert_eq!(code, 1, "{r1}");
    let p3 = peers(&r1).into_iter().find(|p| p["node"] == "node3");
    assert!(
        p3.is_some_and(
            |p| p["agrees"] == false && p["problems"].as_array().map(Vec::len) == Some(1)
        ),
        "{r1}"
    );

    // 5. The graph (what `wiremesh lab graph` prints) draws node1 -- node3 in red.
    let reports = lab.status_reports().expect("status reports");
    assert_eq!(reports.len(), 3);
    let dot = wiremesh::cli::graph::render(&reports);
    let edge = dot
        .lines()
        .find(|l| l.contains("\"node1\" -- \"node3\""))
        .unwrap_or_default();
    assert!(edge.contains("color=red"), "{dot}");
    let healthy = dot
        .lines()
        .find(|l| l.contains("\"node1\" -- \"node2\""))
        .unwrap_or_default();
    assert!(healthy.contains("color=darkgreen"), "{dot}");
}

/// Issue 10, finding 5: a datastore outage was invisible outside the log (status OK, `/readyz`
/// 200, no metric). etcd is frozen (SIGSTOP: connections stay open, nothing answers, the
/// hardest case to notice): every agent says so within its keepalive, the mesh keeps working on
/// the last synced state, and all of it clears when etcd answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datastore_outage_is_visible_and_changes_nothing() {
    if !root_or_skip("datastore outage") {
        return;
    }
    let (lab, _guard) = start_lab("dso", true).await;
    let metric = |node: &str, series: &str| {
        let (_, body) = http_get(&lab, node, "http://127.0.0.1:9091/metrics");
        metric_value(&body, series)
    };
    wait_for(Duration::from_secs(45), "node1 to report OK", async || {
        let _ = lab.ping("pod1", "pod2", 1);
        status_json(&lab, "node1", &[]).1["verdict"]["level"] == "ok"
    })
    .await;
    wait_for(
        Duration::from_secs(5),
        "wiremesh_datastore_up 1",
        async || metric("node1", "wiremesh_datastore_up") == Some(1.0),
    )
    .await;
    let etcd = nix::unistd::Pid::from_raw(lab.state.etcd_pid.expect("etcd runs"));

    /// Lets etcd run again even when the test fails, so the lab can be removed cleanly.
    struct Thaw(nix::unistd::Pid);
    impl Drop for Thaw {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
        }
    }
    let thaw = Thaw(etcd);
    nix::sys::signal::kill(etcd, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP etcd");
    let frozen = Instant::now();
    let unreachable = |i: u32| {
        let path = lab.node(i).expect("node").state_dir.join("status.json");
        let status: Value =
            serde_json::from_slice(&std::fs::read(path).unwrap_or_default()).unwrap_or_default();
        status["datastore"]["unreachableSince"].is_u64()
    };
    wait_for(
        Duration::from_secs(40),
        "every agent to notice the outage",
        async || (1..=3).all(unreachable),
    )
    .await;
    // The etcd client's keepalive (a ping every 10 s, 5 s to answer) bounds this.
    eprintln!("outage noticed by every agent after {:?}", frozen.elapsed());
    for node in ["node1", "node2", "node3"] {
        let (code, r) = status_json(&lab, node, &[]);
        assert_eq!(code, 1, "{r}");
        let summary = r["verdict"]["summary"].as_str().unwrap_or_default();
        assert!(
            summary.contains("the datastore has been unreachable")
                && summary.contains("could not read the datastore"),
            "{summary}"
        );
    }
    let (code, body) = http_get(&lab, "node1", "http://127.0.0.1:9099/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("unreachable"), "{body}");
    assert_eq!(metric("node1", "wiremesh_datastore_up"), Some(0.0));
    let last_sync = metric("node1", "wiremesh_datastore_last_sync_timestamp_seconds");
    assert!(last_sync.is_some_and(|t| t > 0.0), "{last_sync:?}");
    let (_, report) = status_json(&lab, "node1", &[]);
    assert_eq!(peers(&report).len(), 2, "the mesh stays: {report}");
    assert!(lab.ping("pod1", "pod3", 3).expect("ping").reachable());

    drop(thaw);
    let thawed = Instant::now();
    wait_for(
        Duration::from_secs(40),
        "every agent to recover",
        async || !(1..=3).any(unreachable),
    )
    .await;
    eprintln!(
        "recovery noticed by every agent after {:?}",
        thawed.elapsed()
    );
    wait_for(
        Duration::from_secs(20),
        "every node to report OK",
        async || {
            let _ = lab.ping("pod1", "pod2", 1);
            ["node1", "node2", "node3"]
                .iter()
                .all(|n| status_json(&lab, n, &[]).1["verdict"]["level"] == "ok")
        },
    )
    .await;
    assert_eq!(
        http_get(&lab, "node1", "http://127.0.0.1:9099/readyz").0,
        200
    );
    assert_eq!(metric("node1", "wiremesh_datastore_up"), Some(1.0));
}

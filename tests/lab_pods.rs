//! Lab pods end to end: `v1` Namespaces and Pods applied to a real 3-node lab (real etcd,
//! agents, userspace WireGuard) become pod namespaces behind Calico-named veths with their
//! WorkloadEndpoints and profiles; `lab probe` shows who reaches whom, TCP and UDP, as the
//! Kubernetes network-policy e2e suite does; a Kubernetes NetworkPolicy changes the table.
//! Root only; the lab (pods included) is removed even when the test fails. Traffic stays on
//! the lab's addresses inside its namespaces.

use std::process::Command;
use std::time::Duration;

use support::lab::start_lab;
use support::root_or_skip;
use wiremesh::cli::lab::pods::PortProtocol;
use wiremesh::cli::lab::probe::{TableKey, TruthTable, compare};
use wiremesh::cli::lab::{self, Lab};
use wiremesh_core::manifest::Manifest;
use wiremesh_core::model::Family;

mod support;

const CONVERGE: Duration = Duration::from_secs(30);
const PODS: [&str; 4] = ["x/a", "x/b", "y/a", "y/b"];

fn manifest(yaml: &str) -> Manifest {
    let m = Manifest::parse("test.yaml", yaml);
    let (_, problems) = m.validate();
    assert!(problems.is_empty(), "{problems:?}");
    m
}

async fn apply(lab: &mut Lab, yaml: &str, delete: bool) -> Vec<String> {
    lab.apply(&manifest(yaml), delete).await.expect("apply")
}

fn pod_yaml(ns: &str, name: &str) -> String {
    let mut ports = String::new();
    for port in [80, 81] {
        for proto in ["TCP", "UDP"] {
            let lower = proto.to_lowercase();
            ports.push_str(&format!(
                "        - {{containerPort: {port}, protocol: {proto}, name: serve-{port}-{lower}}}\n"
            ));
        }
    }
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{pod: {name}}}}}
spec:
  containers:
    - name: agnhost
      image: registry.k8s.io/e2e-test-images/agnhost:2.53
      ports:
{ports}---
"
    )
}

fn namespaces_and_pods() -> String {
    let mut text = String::new();
    for ns in ["x", "y"] {
        text.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n---\n"
        ));
    }
    for pod in PODS {
        let (ns, name) = pod.split_once('/').expect("ns/name");
        text.push_str(&pod_yaml(ns, name));
    }
    text
}

const DEFAULT_DENY_INGRESS: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
";

const ALLOW_FROM_Y_ON_80: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-y-on-80, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
    - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
      ports: [{port: 80, protocol: TCP}, {port: 80, protocol: UDP}]
";

fn keys() -> Vec<TableKey> {
    let mut out = Vec::new();
    for protocol in [PortProtocol::Tcp, PortProtocol::Udp] {
        for port in [80, 81] {
            out.push(TableKey {
                protocol,
                port,
                family: Some(Family::V4),
            });
        }
    }
    out
}

/// The tables `reachable(key, from, to)` describes.
fn expected(reachable: impl Fn(&TableKey, &str, &str) -> bool) -> Vec<TruthTable> {
    let names: Vec<String> = PODS.iter().map(|p| p.to_string()).collect();
    keys()
        .into_iter()
        .map(|key| TruthTable {
            key,
            from: names.clone(),
            to: names.clone(),
            reachable: PODS
                .iter()
                .map(|from| {
                    PODS.iter()
                        .map(|to| (from != to).then(|| reachable(&key, from, to)))
                        .collect()
                })
                .collect(),
        })
        .collect()
}

/// Probes until the tables are `want` (policy takes a moment to reach every node).
async fn wait_for_tables(lab: &Lab, what: &str, want: &[TruthTable]) {
    let mut last = Vec::new();
    let converged = tokio::time::timeout(CONVERGE, async {
        loop {
            let tables = lab
                .probe(keys(), Duration::from_secs(1))
                .await
                .expect("probe");
            last = compare(&tables, want);
            if last.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    let diffs: Vec<String> = last.iter().map(ToString::to_string).collect();
    assert!(
        converged.is_ok(),
        "{what}: still different:\n{}",
        diffs.join("\n")
    );
}

fn wiremesh(lab: &Lab, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wiremesh"))
        .arg("lab")
        .arg(args[0])
        .args(["--name", lab.name()])
        .args(&args[1..])
        .output()
        .expect("wiremesh");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "wiremesh lab {}:\n{text}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn namespace_of(pod: &str) -> &str {
    pod.split_once('/').map_or("", |(ns, _)| ns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_probed_and_policed_end_to_end() {
    if !root_or_skip("lab pods") {
        return;
    }
    let (mut lab, _guard) = start_lab("w", true).await;

    let touched = apply(&mut lab, &namespaces_and_pods(), false).await;
    eprintln!("applied:\n{}", touched.join("\n"));
    // Placement: the emptiest node, the lowest index on a tie.
    let placed: Vec<(String, String)> = lab
        .lab_pods()
        .map(|p| (p.key(), p.node_name.clone()))
        .collect();
    let want: Vec<(String, String)> = [
        ("x/a", "node1"),
        ("x/b", "node2"),
        ("y/a", "node3"),
        ("y/b", "node1"),
    ]
    .iter()
    .map(|(p, n)| (p.to_string(), n.to_string()))
    .collect();
    assert_eq!(placed, want);
    let yb = lab.lab_pod("y/b").expect("y/b").clone();
    assert!(lab::is_lab_netns(lab.name(), &yb.netns));
    let wep = lab
        .read_raw(&yb.endpoint_key)
        .await
        .expect("etcd")
        .expect("y/b's WorkloadEndpoint");
    assert!(wep.contains(&yb.interface), "{wep}");
    assert!(
        lab.read_raw("/calico/resources/v3/projectcalico.org/profiles/kns.x")
            .await
            .expect("etcd")
            .is_some_and(|p| p.contains("pcns.ns")),
        "kns.x carries the namespace's labels"
    );
    let link = lab
        .exec_in_node("node1", &["ip", "-o", "link", "show", &yb.interface])
        .expect("ip link");
    assert!(link.status.success(), "y/b's veth on node1");

    // Everything open.
    wait_for_tables(&lab, "all reachable", &expected(|_, _, _| true)).await;
    let (code, text) = wiremesh(
        &lab,
        &["probe", "--ports", "80,81", "--protocols", "tcp,udp"],
    );
    assert_eq!(code, 0);
    assert_eq!(text.matches("rows = from").count(), 4, "four tables");
    assert!(
        text.lines()
            .filter(|l| !l.contains("rows = from"))
            .all(|l| !l.contains('X')),
        "nothing blocked yet:\n{text}"
    );

    // Default deny ingress in x: x's pods are reachable from nobody.
    apply(&mut lab, DEFAULT_DENY_INGRESS, false).await;
    let denied = expected(|_, _, to| namespace_of(to) != "x");
    wait_for_tables(&lab, "default-deny-ingress in x", &denied).await;
    // The CLI compares with an expectation file and prints only what differs.
    let dir = lab.state.dir.clone();
    let denied_file = dir.join("denied.txt");
    let all_file = dir.join("all.txt");
    let write = |path: &std::path::Path, tables: &[TruthTable]| {
        let text: Vec<String> = tables.iter().map(TruthTable::text).collect();
        std::fs::write(path, text.join("\n")).expect("write expectation");
    };
    write(&denied_file, &denied);
    write(&all_file, &expected(|_, _, _| true));
    let (code, text) = wiremesh(
        &lab,
        &["probe", "--expect", &denied_file.display().to_string()],
    );
    assert_eq!(code, 0, "{text}");
    assert!(text.starts_with("as expected"), "{text}");
    let (code, text) = wiremesh(
        &lab,
        &["probe", "--expect", &all_file.display().to_string()],
    );
    assert_eq!(code, 1, "{text}");
    // Per table, 3 sources into each of x's 2 pods are blocked: 6 cells, 4 tables.
    assert!(text.starts_with("24 differences"), "{text}");
    assert!(
        text.contains("TCP/80 IPv4  y/a -> x/a: expected ., got X"),
        "{text}"
    );

    // Then ingress from y on port 80 (TCP and UDP) only.
    apply(&mut lab, ALLOW_FROM_Y_ON_80, false).await;
    wait_for_tables(
        &lab,
        "ingress from y on port 80",
        &expected(|key, from, to| {
            namespace_of(to) != "x" || (namespace_of(from) == "y" && key.port == 80)
        }),
    )
    .await;

    // Deleting a pod removes its namespace, veth, server and WorkloadEndpoint.
    apply(&mut lab, &pod_yaml("y", "b"), true).await;
    assert!(lab.lab_pod("y/b").is_none());
    assert!(
        !std::path::Path::new("/run/netns").join(&yb.netns).exists(),
        "y/b's namespace is gone"
    );
    assert_eq!(
        lab.read_raw(&yb.endpoint_key).await.expect("etcd"),
        None,
        "y/b's WorkloadEndpoint is gone"
    );
    let link = lab
        .exec_in_node("node1", &["ip", "-o", "link", "show", &yb.interface])
        .expect("ip link");
    assert!(!link.status.success(), "y/b's veth is gone");
    let saved = Lab::load_from(lab.name(), &lab.state.dir).expect("lab.json");
    assert!(saved.lab_pod("y/b").is_none() && saved.lab_pod("y/a").is_some());
    // The remaining pods still answer as before.
    let tables = lab
        .probe(keys(), Duration::from_secs(1))
        .await
        .expect("probe");
    assert_eq!(tables[0].from, ["x/a", "x/b", "y/a"]);

    // A Pod in a namespace the lab does not know, or on a node it does not have, is refused.
    let err = lab
        .apply(&manifest(&pod_yaml("z", "a")), false)
        .await
        .expect_err("no namespace z");
    assert!(
        err.to_string().contains("namespace \"z\" does not exist"),
        "{err}"
    );
}

//! docs/tutorial-pod-policy.md, run: the manifests and the expected `lab probe` tables are read
//! from the page itself, applied to a real 3-node lab (etcd, agents, userspace WireGuard, pods)
//! step by step, and after each step the probed tables must equal the page's. The metadata
//! address of step 4 is served in the lab's own hub namespace, so no traffic leaves the
//! namespaces the test created. Root only; the lab is removed even when the test fails.

use std::net::Ipv4Addr;

use support::lab::{
    doc_block, doc_file, manifest, serve_beside_the_pods, start_lab, tables, wait_for_reach,
    wait_for_tables,
};
use support::root_or_skip;

mod support;

const TUTORIAL: &str = include_str!("../docs/tutorial-pod-policy.md");
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Each step's manifest and the tables it must lead to, in the page's order.
const STEPS: [(&str, &str); 4] = [
    ("deny-all.yaml", "step1.txt"),
    ("allow-dns.yaml", "step2.txt"),
    ("app-flows.yaml", "step3.txt"),
    ("web-egress.yaml", "step4.txt"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_policy_tutorial_runs_as_written() {
    if !root_or_skip("pod policy tutorial") {
        return;
    }
    let (mut lab, _guard) = start_lab("tut", true).await;
    let pods = manifest("pods.yaml", &doc_file(TUTORIAL, "pods.yaml"));
    lab.apply(&pods, false).await.expect("apply pods.yaml");
    // The page tells where the pods land; the tables mix same-node and tunnelled pairs.
    let placed: Vec<(String, String)> = lab
        .lab_pods()
        .map(|p| (p.key(), p.node_name.clone()))
        .collect();
    let want: Vec<(String, String)> = [
        ("backend/api", "node2"),
        ("db/postgres", "node3"),
        ("kube-system/dns", "node1"),
        ("web/frontend", "node1"),
    ]
    .iter()
    .map(|(p, n)| (p.to_string(), n.to_string()))
    .collect();
    assert_eq!(placed, want);

    let (mut metadata_server, metadata) = serve_beside_the_pods(&lab, METADATA, &[80]);
    let metadata_tables = |marker: &str| tables(marker, &doc_block(TUTORIAL, marker));

    let step0 = tables("step0.txt", &doc_file(TUTORIAL, "step0.txt"));
    wait_for_tables(&lab, "step 0 (no policy)", &step0).await;
    wait_for_reach(
        &lab,
        "step 0: the metadata address",
        &metadata,
        &metadata_tables("metadata: step0"),
    )
    .await;

    for (file, expected) in STEPS {
        let policy = manifest(file, &doc_file(TUTORIAL, file));
        let touched = lab.apply(&policy, false).await.expect("apply");
        eprintln!("{file}:\n{}", touched.join("\n"));
        let want = tables(expected, &doc_file(TUTORIAL, expected));
        wait_for_tables(&lab, &format!("after {file}"), &want).await;
    }
    wait_for_reach(
        &lab,
        "step 4: the metadata address",
        &metadata,
        &metadata_tables("metadata: step4"),
    )
    .await;
    // The counter the page names exists on node1 (web/frontend's node) and counted the drops.
    let counter = lab
        .exec_in_node(
            "node1",
            &[
                "nft",
                "list",
                "counter",
                "inet",
                "wiremesh",
                "np/web/egress-except-metadata/out0",
            ],
        )
        .expect("nft");
    let text = String::from_utf8_lossy(&counter.stdout);
    assert!(counter.status.success(), "{text}");
    assert!(!text.contains("packets 0 "), "no drop counted:\n{text}");

    // The Kubernetes-only variant: back to step 3 without the Calico policy (so the next
    // match cannot be the old policy still in force), then step 4 again with `ipBlock`.
    let calico = manifest("web-egress.yaml", &doc_file(TUTORIAL, "web-egress.yaml"));
    lab.apply(&calico, true)
        .await
        .expect("delete web-egress.yaml");
    let step3 = tables("step3.txt", &doc_file(TUTORIAL, "step3.txt"));
    wait_for_tables(&lab, "Calico policy deleted", &step3).await;
    let ip_block = manifest(
        "web-egress-ipblock.yaml",
        &doc_file(TUTORIAL, "web-egress-ipblock.yaml"),
    );
    lab.apply(&ip_block, false).await.expect("apply ipBlock");
    let step4 = tables("step4.txt", &doc_file(TUTORIAL, "step4.txt"));
    wait_for_tables(&lab, "ipBlock with except", &step4).await;
    wait_for_reach(
        &lab,
        "ipBlock with except: the metadata address",
        &metadata,
        &metadata_tables("metadata: step4"),
    )
    .await;

    let _ = metadata_server.kill();
    let _ = metadata_server.wait();
}

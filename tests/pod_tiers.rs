//! docs/tiers-with-pods.md, run: tiers `security`, `platform` and `application` with Calico
//! GlobalNetworkPolicies and NetworkPolicies, and Kubernetes NetworkPolicies in tier `default`,
//! applied from the page to a real 3-node lab with the pod policy tutorial's pods; the probed
//! tables must equal the page's, before and after a pod is quarantined (and after it is
//! released). Root only; the lab is removed even when the test fails.

use support::lab::{doc_file, manifest, start_lab, tables, wait_for_tables};
use support::root_or_skip;

mod support;

const TUTORIAL: &str = include_str!("../docs/tutorial-pod-policy.md");
const TIERS: &str = include_str!("../docs/tiers-with-pods.md");

/// What the page's `lab apply -f` line applies, in its order.
const POLICY_FILES: [&str; 5] = [
    "tiers.yaml",
    "security.yaml",
    "platform.yaml",
    "application.yaml",
    "ports.yaml",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiers_pass_deny_and_profiles_decide_as_the_page_explains() {
    if !root_or_skip("tiers with pods") {
        return;
    }
    let (mut lab, _guard) = start_lab("tiers", true).await;
    let pods = manifest("pods.yaml", &doc_file(TUTORIAL, "pods.yaml"));
    lab.apply(&pods, false).await.expect("apply pods.yaml");

    let mut policy = String::new();
    for file in POLICY_FILES {
        policy.push_str(&doc_file(TIERS, file));
        policy.push_str("\n---\n");
    }
    let touched = lab
        .apply(&manifest("policies", &policy), false)
        .await
        .expect("apply the tiers and policies");
    eprintln!("applied:\n{}", touched.join("\n"));
    let layered = tables("tiers-expected.txt", &doc_file(TIERS, "tiers-expected.txt"));
    wait_for_tables(&lab, "tiers", &layered).await;

    let quarantine = manifest(
        "quarantine-api.yaml",
        &doc_file(TIERS, "quarantine-api.yaml"),
    );
    lab.apply(&quarantine, false).await.expect("quarantine");
    let quarantined = tables("quarantined.txt", &doc_file(TIERS, "quarantined.txt"));
    wait_for_tables(&lab, "backend/api quarantined", &quarantined).await;

    // Released: pods.yaml again, without the label.
    lab.apply(&pods, false)
        .await
        .expect("apply pods.yaml again");
    wait_for_tables(&lab, "backend/api released", &layered).await;
}

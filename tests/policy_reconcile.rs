//! The reconcile loop's host-endpoint policy subsystem against the fake nftables and kernel.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::{node, snapshot};
use tokio::sync::watch;
use wiremesh_agent::reconcile::Reconciler;
use wiremesh_agent::settings::AgentSettings;
use wiremesh_core::model::ClusterSnapshot;
use wiremesh_core::wire::Kind;
use wiremesh_dataplane::fake::FakeKernel;
use wiremesh_dataplane::nft::FakeNft;
use wiremesh_datastore::fake::FakeDatastore;

fn cluster(deny: &[&str], hep_node: &str) -> ClusterSnapshot {
    let mut s = snapshot([node(1), node(2), node(3)], true);
    s.policy.insert(
        Kind::HostEndpoint,
        "tunnel".into(),
        json!({"metadata": {"name": "tunnel", "labels": {"host-endpoint": "true"}},
               "spec": {"node": hep_node, "interfaceName": "wireguard.cali"}}),
    );
    s.policy.insert(
        Kind::GlobalNetworkSet,
        "deny".into(),
        json!({"metadata": {"name": "deny", "labels": {"list": "deny"}}, "spec": {"nets": deny}}),
    );
    s.policy.insert(
        Kind::GlobalNetworkPolicy,
        "deny-list".into(),
        json!({"metadata": {"name": "deny-list"},
               "spec": {"selector": "host-endpoint == 'true'",
                        "ingress": [{"action": "Deny", "source": {"selector": "list == 'deny'"}}, {"action": "Allow"}],
                        "egress": [{"action": "Allow"}]}}),
    );
    s
}

struct H {
    kernel: FakeKernel,
    nft: FakeNft,
    store: Arc<FakeDatastore>,
    tx: watch::Sender<ClusterSnapshot>,
    dir: tempfile::TempDir,
}

impl H {
    fn new(initial: ClusterSnapshot) -> Self {
        let (tx, _rx) = watch::channel(initial);
        H {
            kernel: FakeKernel::new(),
            nft: FakeNft::default(),
            store: Arc::new(FakeDatastore::new(tx.clone())),
            tx,
            dir: tempfile::tempdir().expect("tmp"),
        }
    }

    fn reconciler(
        &self,
    ) -> Reconciler<
        wiremesh_dataplane::fake::FakeWireguard,
        wiremesh_dataplane::fake::FakeLinks,
        wiremesh_dataplane::fake::FakeRouting,
    > {
        let mut settings = AgentSettings::new("node1", self.dir.path());
        settings.min_interval = Duration::from_millis(10);
        Reconciler::new(
            Arc::new(settings),
            self.kernel.wireguard(),
            self.kernel.links(),
            self.kernel.routing(),
            self.store.clone(),
        )
        .with_filter(Box::new(self.nft.clone()))
    }
}

#[tokio::test]
async fn policy_is_programmed_updated_by_elements_and_removed() {
    let h = H::new(cluster(&["10.244.3.0/24"], "node1"));
    let mut r = h.reconciler();
    let out = r
        .reconcile_once(&cluster(&["10.244.3.0/24"], "node1"))
        .await
        .expect("reconcile");
    assert_eq!(out.ops.get(&("nftables", "replace_table")), Some(&1));
    let spec = h.nft.lock().spec.clone().expect("table");
    let text = spec.to_nft();
    assert!(
        text.contains("udp dport 51820 fib daddr type local accept"),
        "{text}"
    );
    assert!(
        text.contains("iifname \"wireguard.cali\" goto filter-fh-wireguard.cali"),
        "{text}"
    );
    h.nft.take_log();

    // Idempotent.
    let out = r
        .reconcile_once(&cluster(&["10.244.3.0/24"], "node1"))
        .await
        .expect("reconcile");
    assert_eq!(out.ops.keys().filter(|(s, _)| *s == "nftables").count(), 0);

    // A network-set change: element ops only.
    r.reconcile_once(&cluster(&["10.244.2.0/24"], "node1"))
        .await
        .expect("reconcile");
    let log = h.nft.take_log();
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(
        log.iter()
            .all(|l| l.starts_with("delete_elements") || l.starts_with("add_elements")),
        "{log:?}"
    );

    // An invalid edit is reported and the last valid version stays in force.
    let mut bad = cluster(&["10.244.2.0/24"], "node1");
    bad.policy.insert(
        Kind::GlobalNetworkPolicy,
        "deny-list".into(),
        json!({"metadata": {"name": "deny-list"}, "spec": {"ingress": [{"action": "Reject"}]}}),
    );
    r.reconcile_once(&bad).await.expect("reconcile");
    assert!(h.nft.take_log().is_empty());
    let errors = &r.status().policy_errors;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("deny-list") && errors[0].contains("spec.ingress[0].action"),
        "{errors:?}"
    );
    assert!(errors[0].contains("last valid version"), "{errors:?}");

    // No host endpoint on this node any more: only the encryption guard (its chain, its set
    // and its shutdown hold set) stays in the table, by one update that deletes the rest.
    r.reconcile_once(&cluster(&["10.244.2.0/24"], "node2"))
        .await
        .expect("reconcile");
    let log = h.nft.take_log();
    assert_eq!(log.len(), 1, "{log:?}");
    assert!(
        log[0].starts_with("update_rules: ") && log[0].contains("chains +0 -18 written []"),
        "{log:?}"
    );
    let nft = h.nft.lock();
    assert!(nft.table.present);
    let left = nft.spec.as_ref().expect("table");
    assert_eq!((left.chains.len(), left.sets.len()), (1, 2), "{left:?}");
}

#[tokio::test]
async fn invalid_policy_objects_are_reported_once_on_the_object() {
    use wiremesh_datastore::{ObjectProblem, ProblemObject};
    let mut bad = cluster(&["10.244.3.0/24"], "node1");
    bad.policy.insert(
        Kind::NetworkPolicy,
        "ns1/allow-dns".into(),
        json!({"metadata": {"name": "allow-dns", "namespace": "ns1"},
               "spec": {"egress": [{"action": "Reject"}]}}),
    );
    bad.policy.insert(
        Kind::GlobalNetworkSet,
        "bad-set".into(),
        json!({"metadata": {"name": "bad-set"}, "spec": {"nets": ["not-a-cidr"]}}),
    );
    let h = H::new(bad.clone());
    let mut r = h.reconciler();
    r.reconcile_once(&bad).await.expect("reconcile");
    let reported = h.store.reported();
    let objects: Vec<(&ProblemObject, &str)> = reported
        .iter()
        .map(|p| (&p.object, p.reason.as_str()))
        .collect();
    assert_eq!(
        objects,
        vec![
            (
                &ProblemObject::Policy {
                    kind: Kind::NetworkPolicy,
                    namespace: Some("ns1".into()),
                    name: "allow-dns".into(),
                },
                "InvalidNetworkPolicy"
            ),
            (
                &ProblemObject::Policy {
                    kind: Kind::GlobalNetworkSet,
                    namespace: None,
                    name: "bad-set".into(),
                },
                "InvalidGlobalNetworkSet"
            ),
        ],
        "{reported:#?}"
    );
    let message = |p: &ObjectProblem| p.message.clone();
    assert!(
        message(&reported[0])
            .starts_with("NetworkPolicy \"ns1/allow-dns\": spec.egress[0].action: "),
        "{reported:#?}"
    );
    // Unchanged problems are not reported again.
    r.reconcile_once(&bad).await.expect("reconcile");
    assert_eq!(h.store.reported().len(), 2);
}

#[test]
fn etcd_policy_keys() {
    use wiremesh_datastore::etcd::{decode_policy_key, policy_key};
    let k = policy_key(Kind::NetworkSet, "ns1/blocked");
    assert_eq!(
        k,
        "/calico/resources/v3/projectcalico.org/networksets/ns1/blocked"
    );
    assert_eq!(
        decode_policy_key(&k),
        Some((Kind::NetworkSet, "ns1/blocked".into()))
    );
    assert_eq!(
        decode_policy_key("/calico/resources/v3/projectcalico.org/globalnetworkpolicies/deny"),
        Some((Kind::GlobalNetworkPolicy, "deny".into()))
    );
    assert_eq!(
        decode_policy_key("/calico/resources/v3/projectcalico.org/globalnetworkpolicies/a/b"),
        None
    );
    assert_eq!(
        decode_policy_key("/calico/resources/v3/projectcalico.org/networkpolicies/only-ns"),
        None
    );
    assert_eq!(
        decode_policy_key("/calico/resources/v3/projectcalico.org/nodes/n1"),
        None
    );
}

/// The loop names the counters of the table it applied; the scrape reads their values through
/// the dataplane's counter reader (the fake serves configured values) and labels them.
#[tokio::test(start_paused = true)]
async fn the_loop_exports_the_policy_rule_counters_at_scrape_time() {
    use wiremesh_core::dataplane::filter::CounterValue;
    let h = H::new(cluster(&["10.244.3.0/24"], "node1"));
    let metrics = Arc::new(wiremesh_agent::metrics::Metrics::new(Duration::from_secs(
        300,
    )));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let rx = h.tx.subscribe();
    let task = tokio::spawn(h.reconciler().with_metrics(Arc::clone(&metrics)).run(
        rx,
        async move {
            let _ = stop_rx.await;
        },
    ));
    h.tx.send_replace(cluster(&["10.244.3.0/24"], "node1"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(h.nft.lock().spec.is_some(), "the table is applied");
    h.nft.lock().counters.insert(
        "gnp/deny-list/in0".into(),
        CounterValue {
            packets: 7,
            bytes: 420,
        },
    );
    metrics.refresh().await;
    let text = metrics.encode().expect("encode");
    for line in [
        "wiremesh_policy_rule_packets_total{tier=\"default\",policy=\"gnp/deny-list\",direction=\"ingress\",rule=\"0\",action=\"deny\"} 7\n",
        "wiremesh_policy_rule_bytes_total{tier=\"default\",policy=\"gnp/deny-list\",direction=\"ingress\",rule=\"0\",action=\"deny\"} 420\n",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    let _ = stop_tx.send(());
    task.await.expect("loop");
}

//! The etcd adapter lists and watches Calico's policy keys (a private etcd on loopback).

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::etcd::TestEtcd;
use tokio::sync::watch;
use wiremesh_core::model::ClusterSnapshot;
use wiremesh_core::wire::Kind;
use wiremesh_datastore::Datastore;
use wiremesh_datastore::etcd::{EtcdDatastore, EtcdWriter, policy_key};

async fn wait_for(
    rx: &mut watch::Receiver<ClusterSnapshot>,
    what: &str,
    pred: impl Fn(&ClusterSnapshot) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if pred(&rx.borrow_and_update()) {
            return;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            _ => panic!("timed out waiting for {what}: {:#?}", rx.borrow().policy),
        }
    }
}

#[tokio::test]
async fn policy_objects_are_listed_and_watched() {
    let etcd = TestEtcd::start().await;
    let mut w = EtcdWriter::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("writer");
    let gnp = json!({"kind": "GlobalNetworkPolicy", "metadata": {"name": "deny"}, "spec": {"ingress": [{"action": "Deny"}]}});
    w.put_raw(
        &policy_key(Kind::GlobalNetworkPolicy, "deny"),
        gnp.to_string(),
    )
    .await
    .expect("put");
    let ds = Arc::new(
        EtcdDatastore::connect(vec![etcd.endpoint.clone()])
            .await
            .expect("connect"),
    );
    let (tx, mut rx) = watch::channel(ClusterSnapshot::default());
    let runner = {
        let ds = Arc::clone(&ds);
        tokio::spawn(async move { ds.run(tx).await })
    };
    wait_for(&mut rx, "listed GNP", |s| {
        s.synced
            && s.policy
                .objects
                .get(&Kind::GlobalNetworkPolicy)
                .is_some_and(|m| m.get("deny") == Some(&gnp))
    })
    .await;
    // Watched: a namespaced NetworkSet appears, then the GNP goes.
    let set = json!({"kind": "NetworkSet", "metadata": {"name": "s", "namespace": "ns1"}, "spec": {"nets": ["10.0.0.0/8"]}});
    w.put_raw(&policy_key(Kind::NetworkSet, "ns1/s"), set.to_string())
        .await
        .expect("put");
    wait_for(&mut rx, "watched NetworkSet", |s| {
        s.policy
            .objects
            .get(&Kind::NetworkSet)
            .is_some_and(|m| m.get("ns1/s") == Some(&set))
    })
    .await;
    w.delete_raw(&policy_key(Kind::GlobalNetworkPolicy, "deny"))
        .await
        .expect("delete");
    wait_for(&mut rx, "deleted GNP", |s| {
        s.policy
            .objects
            .get(&Kind::GlobalNetworkPolicy)
            .is_none_or(|m| m.is_empty())
    })
    .await;
    // Undecodable JSON is kept (as a string) so that validation reports it.
    w.put_raw(&policy_key(Kind::Tier, "broken"), "{not json")
        .await
        .expect("put");
    wait_for(&mut rx, "broken tier", |s| {
        s.policy
            .objects
            .get(&Kind::Tier)
            .is_some_and(|m| m.get("broken").is_some_and(|v| v.is_string()))
    })
    .await;
    runner.abort();
}

//! The etcd adapter against a real etcd (one private etcd per test, on loopback).

mod support;

use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::json;
use support::etcd::TestEtcd;
use tokio::sync::watch;
use wiremesh_core::model::{ClusterSnapshot, PublishedWireguard, WgKey};
use wiremesh_datastore::etcd::{
    EtcdDatastore, EtcdWriter, NodeRegistration, affinity_key, node_key,
};
use wiremesh_datastore::{Datastore, DatastoreError};

const WAIT: Duration = Duration::from_secs(20);

fn net(s: &str) -> IpNet {
    s.parse().expect("test CIDR")
}

fn registration(name: &str, v4: &str) -> NodeRegistration {
    NodeRegistration {
        name: name.into(),
        ipv4_address: Some(v4.into()),
        ..Default::default()
    }
}

struct Running {
    store: Arc<EtcdDatastore>,
    rx: watch::Receiver<ClusterSnapshot>,
    task: tokio::task::JoinHandle<Result<(), DatastoreError>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run_adapter(etcd: &TestEtcd) -> Running {
    // Logs show with `--nocapture`, filtered by RUST_LOG (default: info for the adapter).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("wiremesh=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
    let store = Arc::new(
        EtcdDatastore::connect(vec![etcd.endpoint.clone()])
            .await
            .expect("connect"),
    );
    let (tx, rx) = watch::channel(ClusterSnapshot::default());
    let runner = store.clone();
    let task = tokio::spawn(async move { runner.run(tx).await });
    Running { store, rx, task }
}

async fn writer(etcd: &TestEtcd) -> EtcdWriter {
    EtcdWriter::connect(std::slice::from_ref(&etcd.endpoint))
        .await
        .expect("writer connects")
}

/// Waits (bounded) until the snapshot satisfies `pred`; every snapshot seen on the way must
/// satisfy `invariant`.
async fn wait_for_checked(
    rx: &mut watch::Receiver<ClusterSnapshot>,
    what: &str,
    invariant: impl Fn(&ClusterSnapshot) -> bool,
    pred: impl Fn(&ClusterSnapshot) -> bool,
) -> ClusterSnapshot {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        {
            let snap = rx.borrow_and_update();
            assert!(
                invariant(&snap),
                "invariant broken while waiting for {what}: {snap:#?}"
            );
            if pred(&snap) {
                return snap.clone();
            }
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("snapshot sender dropped while waiting for {what}"),
            Err(_) => panic!(
                "timed out waiting for {what}; last snapshot: {:#?}",
                *rx.borrow()
            ),
        }
    }
}

async fn wait_for(
    rx: &mut watch::Receiver<ClusterSnapshot>,
    what: &str,
    pred: impl Fn(&ClusterSnapshot) -> bool,
) -> ClusterSnapshot {
    wait_for_checked(rx, what, |_| true, pred).await
}

#[tokio::test]
async fn initial_list_builds_a_synced_snapshot() {
    let etcd = TestEtcd::start().await;
    let mut w = writer(&etcd).await;
    w.put_node(&NodeRegistration {
        name: "n1".into(),
        ipv4_address: Some("172.30.0.1/24".into()),
        ipv6_address: Some("fd00:30::1/64".into()),
        ..Default::default()
    })
    .await
    .expect("put n1");
    w.put_raw(
        &node_key("n2"),
        json!({"kind":"Node","apiVersion":"projectcalico.org/v3","metadata":{"name":"n2"},
               "spec":{"addresses":[{"address":"172.30.0.2","type":"InternalIP"}],
                       "wireguard":{"interfaceIPv4Address":"10.244.2.1"}},
               "status":{"wireguardPublicKey": WgKey([2; 32]).to_string()}})
        .to_string(),
    )
    .await
    .expect("put n2");
    w.put_raw(&node_key("broken"), "{not json")
        .await
        .expect("put broken");
    w.put_block_affinity("n1", &net("10.244.1.0/26"))
        .await
        .expect("aff");
    w.put_block_affinity("n1", &net("fd00:244:1::/122"))
        .await
        .expect("aff v6");
    w.put_raw(
        &affinity_key("n1", &net("10.244.9.0/26")),
        r#"{"state":"pending"}"#,
    )
    .await
    .expect("pending");
    w.put_block_affinity("n2", &net("10.244.2.0/26"))
        .await
        .expect("aff n2");
    w.put_raw("/calico/ipam/v2/host/n2/ipv4/block/not-a-cidr", "{}")
        .await
        .expect("bad affinity");
    w.put_felix_configuration(
        "default",
        &json!({"wireguardEnabled": true, "logSeverityScreen": "Info"}),
    )
    .await
    .expect("felix default");
    w.put_raw(
        "/calico/resources/v3/projectcalico.org/felixconfigurations/node.n2",
        r#"{"spec":{"wireguardEnabled":"yes"}}"#,
    )
    .await
    .expect("felix bad");

    let mut run = run_adapter(&etcd).await;
    let snap = wait_for(&mut run.rx, "synced", |s| s.synced).await;

    assert_eq!(
        snap.nodes.keys().collect::<Vec<_>>(),
        ["broken", "n1", "n2"]
    );
    let n1 = &snap.nodes["n1"];
    assert_eq!(n1.ipv4_address.as_deref(), Some("172.30.0.1/24"));
    assert_eq!(n1.ipv6_address.as_deref(), Some("fd00:30::1/64"));
    assert_eq!(n1.pod_cidrs, ["10.244.1.0/26", "fd00:244:1::/122"]);
    assert_eq!(n1.decode_error, None);
    let n2 = &snap.nodes["n2"];
    assert_eq!(n2.ipv4_address.as_deref(), Some("172.30.0.2"));
    assert_eq!(n2.pod_cidrs, ["10.244.2.0/26"]);
    assert_eq!(n2.wireguard_public_key, Some(WgKey([2; 32]).to_string()));
    assert_eq!(
        n2.wireguard_interface_ipv4_address.as_deref(),
        Some("10.244.2.1")
    );
    assert!(snap.nodes["broken"].decode_error.is_some());

    let default = snap.felix_configurations["default"]
        .as_ref()
        .expect("default decodes");
    assert_eq!(default.spec.wireguard_enabled, Some(true));
    // A bad field costs that field, not the object.
    let n2 = snap.felix_configurations["node.n2"]
        .as_ref()
        .expect("node.n2 decodes");
    assert_eq!(n2.invalid[0].field, "wireguardEnabled");
    assert_eq!(run.store.kind(), "etcd");
}

#[tokio::test]
async fn watch_applies_changes() {
    let etcd = TestEtcd::start().await;
    let mut w = writer(&etcd).await;
    w.put_node(&registration("n1", "172.30.0.1/24"))
        .await
        .expect("n1");
    let mut run = run_adapter(&etcd).await;
    wait_for(&mut run.rx, "synced with n1", |s| {
        s.synced && s.nodes.contains_key("n1")
    })
    .await;

    w.put_node(&registration("n2", "172.30.0.2/24"))
        .await
        .expect("n2");
    wait_for(&mut run.rx, "n2 added", |s| {
        s.nodes.get("n2").and_then(|n| n.ipv4_address.as_deref()) == Some("172.30.0.2/24")
    })
    .await;

    let mut value = w
        .get_json(&node_key("n2"))
        .await
        .expect("get")
        .expect("n2 exists");
    value["status"]["wireguardPublicKey"] = json!(WgKey([7; 32]).to_string());
    w.put_raw(&node_key("n2"), value.to_string())
        .await
        .expect("key change");
    wait_for(&mut run.rx, "n2 key", |s| {
        s.nodes["n2"].wireguard_public_key == Some(WgKey([7; 32]).to_string())
    })
    .await;

    w.put_block_affinity("n2", &net("10.244.2.0/26"))
        .await
        .expect("aff");
    w.put_block_affinity("n2", &net("10.244.3.0/26"))
        .await
        .expect("aff");
    wait_for(&mut run.rx, "n2 CIDRs", |s| {
        s.nodes["n2"].pod_cidrs == ["10.244.2.0/26", "10.244.3.0/26"]
    })
    .await;
    w.delete_block_affinity("n2", &net("10.244.2.0/26"))
        .await
        .expect("del aff");
    wait_for(&mut run.rx, "n2 CIDR removed", |s| {
        s.nodes["n2"].pod_cidrs == ["10.244.3.0/26"]
    })
    .await;
    // An affinity that turns pending stops counting.
    w.put_raw(
        &affinity_key("n2", &net("10.244.3.0/26")),
        r#"{"state":"pendingDeletion"}"#,
    )
    .await
    .expect("pending");
    wait_for(&mut run.rx, "n2 CIDR pending", |s| {
        s.nodes["n2"].pod_cidrs.is_empty()
    })
    .await;

    w.patch_felix_configuration("default", "wireguardEnabled", json!(true))
        .await
        .expect("patch");
    wait_for(&mut run.rx, "felix on", |s| {
        matches!(s.felix_configurations.get("default"), Some(Ok(spec)) if spec.spec.wireguard_enabled == Some(true))
    })
    .await;
    w.patch_felix_configuration("default", "wireguardEnabled", json!(false))
        .await
        .expect("patch");
    w.patch_felix_configuration("default", "logSeverityScreen", json!("Debug"))
        .await
        .expect("patch");
    wait_for(&mut run.rx, "felix off", |s| {
        matches!(s.felix_configurations.get("default"), Some(Ok(spec)) if spec.spec.wireguard_enabled == Some(false))
    })
    .await;
    let stored = w
        .get_json("/calico/resources/v3/projectcalico.org/felixconfigurations/default")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(
        stored["spec"],
        json!({"wireguardEnabled": false, "logSeverityScreen": "Debug"})
    );
    assert_eq!(stored["kind"], "FelixConfiguration");

    // Malformed node arriving by watch: kept with an error, the others unaffected.
    w.put_raw(&node_key("n3"), "[1,2").await.expect("bad n3");
    let snap = wait_for(&mut run.rx, "n3 broken", |s| {
        s.nodes.get("n3").is_some_and(|n| n.decode_error.is_some())
    })
    .await;
    assert!(snap.nodes["n1"].decode_error.is_none());

    w.delete_node("n2").await.expect("delete n2");
    w.delete_node("n3").await.expect("delete n3");
    let snap = wait_for(&mut run.rx, "n2, n3 deleted", |s| {
        !s.nodes.contains_key("n2") && !s.nodes.contains_key("n3")
    })
    .await;
    assert!(snap.synced);
    assert!(snap.nodes.contains_key("n1"));
}

#[tokio::test]
async fn publish_writes_only_our_fields() {
    let etcd = TestEtcd::start().await;
    let mut w = writer(&etcd).await;
    let original = json!({
        "kind": "Node", "apiVersion": "projectcalico.org/v3",
        "metadata": {"name": "n1", "labels": {"x": "y"}, "creationTimestamp": null},
        "spec": {"bgp": {"ipv4Address": "172.30.0.1/24", "ipv4IPIPTunnelAddr": "10.0.0.1"},
                 "orchRefs": [{"nodeName": "n1", "orchestrator": "k8s"}],
                 "futureField": {"a": 1}},
        "status": {"podCIDRs": ["10.244.1.0/24"], "wireguardPublicKeyV6": "stale"},
        "extra": true,
    });
    w.put_raw(&node_key("n1"), original.to_string())
        .await
        .expect("put");
    let mut run = run_adapter(&etcd).await;
    wait_for(&mut run.rx, "synced", |s| s.synced).await;

    let published = PublishedWireguard {
        public_key_v4: Some(WgKey([1; 32])),
        public_key_v6: None,
        interface_ipv4_address: Some("10.244.1.1".parse().expect("ip")),
        interface_ipv6_address: Some("fd00::1".parse().expect("ip")),
    };
    run.store.publish("n1", &published).await.expect("publish");
    let stored = w
        .get_json(&node_key("n1"))
        .await
        .expect("get")
        .expect("exists");
    let mut expected = original.clone();
    expected["status"] =
        json!({"podCIDRs": ["10.244.1.0/24"], "wireguardPublicKey": WgKey([1; 32]).to_string()});
    expected["spec"]["wireguard"] =
        json!({"interfaceIPv4Address": "10.244.1.1", "interfaceIPv6Address": "fd00::1"});
    assert_eq!(stored, expected);
    let snap = wait_for(&mut run.rx, "published fields in snapshot", |s| {
        published.matches(&s.nodes["n1"])
    })
    .await;
    assert_eq!(snap.nodes["n1"].wireguard_public_key_v6, None);

    // Publishing the same again writes nothing (the revision stays).
    let rev = |resp: etcd_client::GetResponse| resp.kvs().first().map(|kv| kv.mod_revision());
    let before = rev(w.client().get(node_key("n1"), None).await.expect("get"));
    run.store
        .publish("n1", &published)
        .await
        .expect("publish again");
    assert_eq!(
        rev(w.client().get(node_key("n1"), None).await.expect("get")),
        before
    );

    // Clearing removes exactly our fields and the emptied wireguard object.
    run.store
        .publish("n1", &PublishedWireguard::default())
        .await
        .expect("clear");
    let stored = w
        .get_json(&node_key("n1"))
        .await
        .expect("get")
        .expect("exists");
    let mut expected = original.clone();
    expected["status"] = json!({"podCIDRs": ["10.244.1.0/24"]});
    assert_eq!(stored, expected);
    wait_for(&mut run.rx, "cleared in snapshot", |s| {
        PublishedWireguard::default().matches(&s.nodes["n1"])
    })
    .await;

    match run.store.publish("ghost", &published).await {
        Err(DatastoreError::NodeNotFound { node }) => assert_eq!(node, "ghost"),
        other => panic!("expected NodeNotFound, got {other:?}"),
    }
    // A stored node that is not JSON is a Publish error, and is left untouched.
    w.put_raw(&node_key("junk"), "junk")
        .await
        .expect("put junk");
    assert!(matches!(
        run.store.publish("junk", &published).await,
        Err(DatastoreError::Publish { .. })
    ));
    assert_eq!(
        w.get_raw(&node_key("junk")).await.expect("get").as_deref(),
        Some(&b"junk"[..])
    );
}

#[tokio::test]
async fn resumes_after_etcd_restart() {
    let mut etcd = TestEtcd::start().await;
    let mut w = writer(&etcd).await;
    w.put_node(&registration("stable", "172.30.0.1/24"))
        .await
        .expect("stable");
    let mut run = run_adapter(&etcd).await;
    wait_for(&mut run.rx, "synced", |s| {
        s.synced && s.nodes.contains_key("stable")
    })
    .await;
    let never_partial = |s: &ClusterSnapshot| s.synced && s.nodes.contains_key("stable");

    // Restart with no change, then change after the restart.
    etcd.restart().await;
    let mut w = writer(&etcd).await;
    w.put_node(&registration("after", "172.30.0.2/24"))
        .await
        .expect("after");
    wait_for_checked(
        &mut run.rx,
        "node added after restart",
        never_partial,
        |s| s.nodes.contains_key("after"),
    )
    .await;

    // Changes made while the adapter cannot reach etcd arrive once it can (resume by revision).
    let side = etcd.restart_elsewhere().await;
    let mut side_writer = EtcdWriter::connect(&[side]).await.expect("side writer");
    side_writer
        .put_node(&registration("while-away", "172.30.0.3/24"))
        .await
        .expect("while-away");
    side_writer
        .delete_node("after")
        .await
        .expect("delete after");
    drop(side_writer);
    etcd.restart().await;
    let snap = wait_for_checked(&mut run.rx, "missed changes", never_partial, |s| {
        s.nodes.contains_key("while-away") && !s.nodes.contains_key("after")
    })
    .await;
    assert_eq!(snap.nodes.len(), 2);

    // Publishing works again on the same adapter after the restarts.
    run.store
        .publish(
            "stable",
            &PublishedWireguard {
                public_key_v4: Some(WgKey([3; 32])),
                ..Default::default()
            },
        )
        .await
        .expect("publish after restart");
    wait_for_checked(&mut run.rx, "published after restart", never_partial, |s| {
        s.nodes["stable"].wireguard_public_key == Some(WgKey([3; 32]).to_string())
    })
    .await;
}

#[tokio::test]
async fn relists_when_the_resume_revision_was_compacted() {
    let mut etcd = TestEtcd::start().await;
    let mut w = writer(&etcd).await;
    w.put_node(&registration("stable", "172.30.0.1/24"))
        .await
        .expect("stable");
    w.put_node(&registration("doomed", "172.30.0.2/24"))
        .await
        .expect("doomed");
    w.put_felix_configuration("default", &json!({"wireguardEnabled": false}))
        .await
        .expect("felix");
    let mut run = run_adapter(&etcd).await;
    wait_for(&mut run.rx, "synced", |s| s.synced && s.nodes.len() == 2).await;
    let never_partial = |s: &ClusterSnapshot| s.synced && s.nodes.contains_key("stable");

    // While the adapter is cut off: change things, then compact the history away.
    let side = etcd.restart_elsewhere().await;
    let mut side_writer = EtcdWriter::connect(&[side]).await.expect("side writer");
    side_writer.delete_node("doomed").await.expect("delete");
    side_writer
        .put_node(&registration("newcomer", "172.30.0.3/24"))
        .await
        .expect("newcomer");
    side_writer
        .put_block_affinity("stable", &net("10.244.1.0/26"))
        .await
        .expect("aff");
    side_writer
        .patch_felix_configuration("default", "wireguardEnabled", json!(true))
        .await
        .expect("felix");
    let revision = side_writer
        .client()
        .get("/", None)
        .await
        .expect("get")
        .header()
        .map(|h| h.revision())
        .expect("header");
    side_writer
        .client()
        .compact(
            revision,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
        .expect("compact");
    drop(side_writer);
    etcd.restart().await;

    let snap = wait_for_checked(&mut run.rx, "re-listed state", never_partial, |s| {
        !s.nodes.contains_key("doomed")
            && s.nodes.contains_key("newcomer")
            && s.nodes["stable"].pod_cidrs == ["10.244.1.0/26"]
            && matches!(s.felix_configurations.get("default"), Some(Ok(spec)) if spec.spec.wireguard_enabled == Some(true))
    })
    .await;
    assert_eq!(snap.nodes.len(), 2);

    // And the watch continues after the re-list.
    let mut w = writer(&etcd).await;
    w.delete_node("newcomer").await.expect("delete newcomer");
    wait_for_checked(&mut run.rx, "watch after re-list", never_partial, |s| {
        !s.nodes.contains_key("newcomer")
    })
    .await;
}

#[tokio::test]
async fn writer_shapes_and_effective_settings() {
    let etcd = TestEtcd::start().await;
    let mut w = writer(&etcd).await;

    // A new node: labels, spec.bgp and nothing else.
    let mut node = registration("n1", "172.30.0.1/24");
    node.labels = [("kubernetes.io/hostname", "n1"), ("wiremesh.io/lab", "l")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    w.put_node(&node).await.expect("put n1");
    let expected = json!({
        "kind": "Node", "apiVersion": "projectcalico.org/v3",
        "metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1", "wiremesh.io/lab": "l"}},
        "spec": {"bgp": {"ipv4Address": "172.30.0.1/24"}},
    });
    let stored = w.get_json(&node_key("n1")).await.expect("get").expect("n1");
    assert_eq!(stored, expected);
    // Registering again with other labels adds them and keeps the rest.
    w.put_raw(
        &node_key("n1"),
        json!({"metadata": {"name": "n1", "labels": {"x": "y"}}, "status": {"wireguardPublicKey": "k"}})
            .to_string(),
    )
    .await
    .expect("overwrite");
    w.put_node(&node).await.expect("put n1 again");
    let stored = w.get_json(&node_key("n1")).await.expect("get").expect("n1");
    assert_eq!(
        stored["metadata"]["labels"],
        json!({"kubernetes.io/hostname": "n1", "wiremesh.io/lab": "l", "x": "y"})
    );
    assert_eq!(stored["status"]["wireguardPublicKey"], "k");
    assert_eq!(stored["spec"]["bgp"]["ipv4Address"], "172.30.0.1/24");

    w.put_block_affinity("n1", &net("10.244.1.0/24"))
        .await
        .expect("affinity");
    assert_eq!(
        w.get_raw("/calico/ipam/v2/host/n1/ipv4/block/10.244.1.0-24")
            .await
            .expect("get"),
        Some(br#"{"state":"confirmed"}"#.to_vec())
    );

    // Effective settings: defaults, `default`, then `node.<name>`; a broken object is left out.
    let n1 = w.effective_config("n1").await.expect("effective");
    assert!(!n1.wireguard.v4.enabled && n1.errors.is_empty());
    assert_eq!(
        w.get_felix_configuration("default").await.expect("get"),
        None
    );
    w.put_felix_configuration(
        "default",
        &json!({"wireguardEnabled": true, "wireguardListeningPort": 51830}),
    )
    .await
    .expect("default");
    w.patch_felix_configuration("node.n2", "wireguardEnabled", json!(false))
        .await
        .expect("node.n2");
    w.put_raw(
        "/calico/resources/v3/projectcalico.org/felixconfigurations/node.n3",
        "{broken",
    )
    .await
    .expect("node.n3");
    let default = w
        .get_felix_configuration("default")
        .await
        .expect("get")
        .expect("exists")
        .expect("decodes");
    assert_eq!(default.spec.wireguard_listening_port, Some(51830));
    let n1 = w.effective_config("n1").await.expect("n1");
    assert!(n1.wireguard.v4.enabled && n1.errors.is_empty());
    assert_eq!(n1.wireguard.v4.listening_port, 51830);
    let n2 = w.effective_config("n2").await.expect("n2").wireguard;
    assert!(!n2.v4.enabled);
    assert_eq!(n2.v4.listening_port, 51830);
    let n3 = w.effective_config("n3").await.expect("n3");
    assert!(n3.wireguard.v4.enabled);
    assert_eq!(n3.errors.len(), 1, "{:?}", n3.errors);
    assert_eq!(n3.errors[0].object, "node.n3");
}

//! Tier 2: the reconcile loop against the in-memory kernel and datastore.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{felix, node, snapshot};
use tokio::sync::watch;
use wiremesh_agent::keystore::KeyStore;
use wiremesh_agent::reconcile::Reconciler;
use wiremesh_agent::settings::AgentSettings;
use wiremesh_core::model::{ClusterSnapshot, Family, NodeResource};
use wiremesh_core::wire::FelixConfigurationSpec;
use wiremesh_dataplane::fake::FakeKernel;
use wiremesh_datastore::fake::FakeDatastore;

struct Harness {
    kernel: FakeKernel,
    store: Arc<FakeDatastore>,
    tx: watch::Sender<ClusterSnapshot>,
    dir: tempfile::TempDir,
}

type FakeReconciler = Reconciler<
    wiremesh_dataplane::fake::FakeWireguard,
    wiremesh_dataplane::fake::FakeLinks,
    wiremesh_dataplane::fake::FakeRouting,
>;

impl Harness {
    fn new(initial: ClusterSnapshot) -> Self {
        let (tx, _rx) = watch::channel(initial);
        Harness {
            kernel: FakeKernel::new(),
            store: Arc::new(FakeDatastore::new(tx.clone())),
            tx,
            dir: tempfile::tempdir().expect("tmp"),
        }
    }

    /// Agent for node1 (unpublished keys: nodes 2.. publish their test keys).
    fn reconciler(&self) -> FakeReconciler {
        let mut settings = AgentSettings::new("node1", self.dir.path());
        settings.min_interval = Duration::from_millis(10);
        Reconciler::new(
            Arc::new(settings),
            self.kernel.wireguard(),
            self.kernel.links(),
            self.kernel.routing(),
            self.store.clone(),
        )
    }

    fn snap(&self) -> ClusterSnapshot {
        self.tx.borrow().clone()
    }

    fn local_node(&self) -> NodeResource {
        self.snap().nodes["node1"].clone()
    }
}

/// node1 without a published key (the agent publishes it), node2 and node3 with theirs.
fn cluster(enabled: bool) -> ClusterSnapshot {
    let mut n1 = node(1);
    n1.wireguard_public_key = None;
    n1.wireguard_interface_ipv4_address = None;
    snapshot([n1, node(2), node(3)], enabled)
}

#[tokio::test]
async fn first_run_programs_everything_and_publishes_the_key() {
    let h = Harness::new(cluster(true));
    let mut r = h.reconciler();
    let outcome = r.reconcile_once(&h.snap()).await.expect("reconcile");
    assert!(outcome.published);
    let key = KeyStore::new(h.dir.path())
        .load_or_generate(Family::V4)
        .expect("key")
        .0;
    let local = h.local_node();
    assert_eq!(
        local.wireguard_public_key,
        Some(key.public_key().to_string())
    );
    assert_eq!(
        local.wireguard_interface_ipv4_address.as_deref(),
        Some("10.244.1.1")
    );
    let state = h.kernel.state();
    let device = &state.devices["wireguard.cali"];
    assert_eq!(device.peers.len(), 2);
    assert_eq!(device.public_key, Some(key.public_key()));
    assert_eq!(state.routes.len(), 3);
    assert_eq!(state.rules.len(), 1);
    assert!(state.links["wireguard.cali"].up);
}

#[tokio::test]
async fn restart_reuses_the_key_and_changes_nothing() {
    let h = Harness::new(cluster(true));
    h.reconciler()
        .reconcile_once(&h.snap())
        .await
        .expect("first");
    let key_before = h.local_node().wireguard_public_key;
    h.kernel.take_log();
    let published_before = h.store.publish_count();
    // A new agent process: same state dir, same kernel.
    let outcome = h
        .reconciler()
        .reconcile_once(&h.snap())
        .await
        .expect("after restart");
    assert_eq!(outcome.total_ops(), 0, "{:?}", h.kernel.take_log());
    assert!(!outcome.published);
    assert_eq!(h.store.publish_count(), published_before);
    assert_eq!(h.local_node().wireguard_public_key, key_before);
}

#[tokio::test]
async fn an_overwritten_published_key_is_healed() {
    let h = Harness::new(cluster(true));
    let mut r = h.reconciler();
    r.reconcile_once(&h.snap()).await.expect("first");
    let good = h.local_node().wireguard_public_key;
    h.store.edit(|s| {
        if let Some(n) = s.nodes.get_mut("node1") {
            n.wireguard_public_key = node(9).wireguard_public_key;
        }
    });
    let outcome = r.reconcile_once(&h.snap()).await.expect("heal");
    assert!(outcome.published);
    assert_eq!(h.local_node().wireguard_public_key, good);
    assert_eq!(outcome.total_ops(), 0, "the dataplane was right all along");
}

#[tokio::test]
async fn disabling_cluster_wide_removes_every_trace_and_clears_the_key() {
    let h = Harness::new(cluster(true));
    let mut r = h.reconciler();
    r.reconcile_once(&h.snap()).await.expect("on");
    h.store.edit(|s| {
        s.felix_configurations
            .insert("default".into(), Ok(felix(false).into()));
    });
    let outcome = r.reconcile_once(&h.snap()).await.expect("off");
    assert!(outcome.published);
    {
        let state = h.kernel.state();
        assert!(
            state.devices.is_empty()
                && state.links.is_empty()
                && state.routes.is_empty()
                && state.rules.is_empty()
        );
    }
    let local = h.local_node();
    assert_eq!(
        (
            local.wireguard_public_key,
            local.wireguard_interface_ipv4_address
        ),
        (None, None)
    );
    // And back on: the same key comes back (it survives in the state directory).
    h.store.edit(|s| {
        s.felix_configurations
            .insert("default".into(), Ok(felix(true).into()));
    });
    r.reconcile_once(&h.snap()).await.expect("on again");
    let key = KeyStore::new(h.dir.path())
        .load_or_generate(Family::V4)
        .expect("key")
        .0;
    assert_eq!(
        h.local_node().wireguard_public_key,
        Some(key.public_key().to_string())
    );
}

#[tokio::test]
async fn per_node_configuration_turns_only_this_node_off() {
    let h = Harness::new(cluster(true));
    let mut r = h.reconciler();
    r.reconcile_once(&h.snap()).await.expect("on");
    h.store.edit(|s| {
        s.felix_configurations
            .insert("node.node1".into(), Ok(felix(false).into()));
        s.felix_configurations
            .insert("node.node2".into(), Ok(felix(false).into()));
    });
    r.reconcile_once(&h.snap()).await.expect("node1 off");
    assert!(h.kernel.state().devices.is_empty());
}

#[tokio::test]
async fn renaming_the_interface_removes_the_old_device_even_after_a_restart() {
    let h = Harness::new(cluster(true));
    h.reconciler().reconcile_once(&h.snap()).await.expect("on");
    h.store.edit(|s| {
        let mut spec = felix(true);
        spec.wireguard_interface_name = Some("wg0".into());
        s.felix_configurations
            .insert("default".into(), Ok(spec.into()));
    });
    // A fresh agent (restart) must still know it created wireguard.cali.
    h.reconciler()
        .reconcile_once(&h.snap())
        .await
        .expect("renamed");
    let names: Vec<String> = h.kernel.state().devices.keys().cloned().collect();
    assert_eq!(names, ["wg0"]);
}

#[tokio::test]
async fn a_corrupt_key_file_is_an_error_and_tears_nothing_down() {
    let h = Harness::new(cluster(true));
    let mut r = h.reconciler();
    r.reconcile_once(&h.snap()).await.expect("on");
    std::fs::write(KeyStore::new(h.dir.path()).path(Family::V4), "garbage").expect("write");
    let mut fresh = h.reconciler();
    let err = fresh
        .reconcile_once(&h.snap())
        .await
        .expect_err("corrupt key");
    assert!(!err.is_transient());
    assert!(
        wiremesh_core::error_chain(&err).contains("corrupt"),
        "{err}"
    );
    assert_eq!(
        h.kernel.state().devices["wireguard.cali"].peers.len(),
        2,
        "the last good dataplane stays"
    );
}

#[tokio::test]
async fn invalid_felix_configuration_fields_are_ignored_and_reported() {
    let h = Harness::new(cluster(true));
    h.store.edit(|s| {
        let mut spec = felix(true);
        spec.wireguard_listening_port = Some(99999);
        s.felix_configurations
            .insert("default".into(), Ok(spec.into()));
        s.felix_configurations.insert(
            "node.node1".into(),
            Err("spec: invalid type: string, expected a boolean".into()),
        );
    });
    let mut r = h.reconciler();
    r.reconcile_once(&h.snap())
        .await
        .expect("runs with defaults");
    assert_eq!(
        h.kernel.state().devices["wireguard.cali"].listen_port,
        51820
    );
    let errors = &r.status().config_errors;
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("wireguardListeningPort")));
}

/// Issue 10, finding 1: a wrongly typed field in `default` once dropped the whole object and
/// switched encryption off on every node while status said OK.
#[tokio::test]
async fn a_bad_field_never_switches_encryption_off_even_across_a_restart() {
    let h = Harness::new(cluster(true));
    h.reconciler().reconcile_once(&h.snap()).await.expect("on");
    let bad = |field: &str, value: serde_json::Value| {
        let object = serde_json::json!({"spec": {"wireguardEnabled": true, field: value}});
        FelixConfigurationSpec::from_object(&object).expect("an object")
    };
    for (field, value) in [
        ("wireguardMTU", serde_json::json!("1400")),
        ("wireguardListeningPort", serde_json::json!(1e20)),
    ] {
        h.store.edit(|s| {
            s.felix_configurations
                .insert("default".into(), Ok(bad(field, value.clone())));
        });
        let mut r = h.reconciler();
        r.reconcile_once(&h.snap()).await.expect("runs");
        assert_eq!(h.kernel.state().devices["wireguard.cali"].peers.len(), 2);
        assert!(
            r.status().config_errors[0].contains(&format!("field {field} = ")),
            "{:?}",
            r.status().config_errors
        );
    }
    // `wireguardEnabled: maybe` keeps the last valid true, in a fresh agent too (restart).
    h.store.edit(|s| {
        let object = serde_json::json!({"spec": {"wireguardEnabled": "maybe"}});
        s.felix_configurations.insert(
            "default".into(),
            FelixConfigurationSpec::from_object(&object),
        );
    });
    let mut restarted = h.reconciler();
    restarted.reconcile_once(&h.snap()).await.expect("runs");
    assert!(h.kernel.state().devices.contains_key("wireguard.cali"));
    assert!(
        restarted.status().config_errors[0].ends_with("its last valid value stays in force"),
        "{:?}",
        restarted.status().config_errors
    );
    // Only a valid false turns it off.
    h.store.edit(|s| {
        s.felix_configurations
            .insert("default".into(), Ok(felix(false).into()));
    });
    restarted.reconcile_once(&h.snap()).await.expect("off");
    assert!(h.kernel.state().devices.is_empty());
    assert!(restarted.status().config_errors.is_empty());
}

/// `wg set` sends no notification: the loop's device check finds a removed peer and a changed
/// port within its interval and runs a pass; the resync (90 s) is far away.
#[tokio::test(start_paused = true)]
async fn the_device_check_repairs_wg_set_changes_between_resyncs() {
    let h = Harness::new(cluster(true));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let loop_task = tokio::spawn(h.reconciler().run(h.tx.subscribe(), async move {
        let _ = stop_rx.await;
    }));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.kernel.state().devices["wireguard.cali"].peers.len(), 2);
    h.kernel.take_log();
    {
        let mut kernel = h.kernel.state();
        let device = kernel.devices.get_mut("wireguard.cali").expect("device");
        device.peers.pop_first();
        device.listen_port = 51999;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let device = h.kernel.state().devices["wireguard.cali"].clone();
    assert_eq!(device.peers.len(), 2, "{:?}", h.kernel.take_log());
    assert_eq!(device.listen_port, 51820);
    let _ = stop_tx.send(());
    loop_task.await.expect("loop ends");
}

/// Host encryption: node2's address is routed into the tunnel only once the device shows a
/// handshake with node2 made with our current key (found by the 1 s device check), and goes
/// back to the main table when the handshakes stop (node2 lost our key) or our key rotates.
#[tokio::test]
async fn host_traffic_follows_handshakes_made_with_our_current_key() {
    use std::time::SystemTime;
    use wiremesh_core::mesh::{RouteKind, RouteSpec};

    let mut initial = cluster(true);
    let mut spec = felix(true);
    spec.wireguard_host_encryption_enabled = Some(true);
    initial
        .felix_configurations
        .insert("default".into(), Ok(spec.into()));
    let h = Harness::new(initial);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let loop_task = tokio::spawn(h.reconciler().run(h.tx.subscribe(), async move {
        let _ = stop_rx.await;
    }));
    let node2_route = |kernel: &FakeKernel| {
        kernel
            .state()
            .routes
            .iter()
            .find(|r: &&RouteSpec| r.dest.to_string() == "172.30.0.2/32")
            .map(|r| r.kind.clone())
    };
    let node2_key = support::key(2).public_key();
    let set_handshake = |at: SystemTime| {
        let mut kernel = h.kernel.state();
        let device = kernel.devices.get_mut("wireguard.cali").expect("device");
        device
            .peers
            .get_mut(&node2_key)
            .expect("peer")
            .last_handshake = Some(at);
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        node2_route(&h.kernel),
        Some(RouteKind::Throw),
        "no handshake yet"
    );
    let peer = h.kernel.state().devices["wireguard.cali"].peers[&node2_key].clone();
    assert!(
        peer.allowed_ips
            .iter()
            .any(|n| n.to_string() == "172.30.0.2/32")
    );
    assert_eq!(
        peer.keepalive,
        wiremesh_core::mesh::HOST_ENCRYPTION_KEEPALIVE
    );

    set_handshake(SystemTime::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tunnel = RouteKind::Device {
        interface: "wireguard.cali".into(),
    };
    assert_eq!(node2_route(&h.kernel), Some(tunnel.clone()), "confirmed");

    set_handshake(SystemTime::now() - Duration::from_secs(200));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        node2_route(&h.kernel),
        Some(RouteKind::Throw),
        "no handshake for a session lifetime"
    );

    set_handshake(SystemTime::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(node2_route(&h.kernel), Some(tunnel));
    KeyStore::new(h.dir.path())
        .request_rotation(Family::V4)
        .expect("rotation requested");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        node2_route(&h.kernel),
        Some(RouteKind::Throw),
        "a handshake made with our old key proves nothing about the new one"
    );
    let _ = stop_tx.send(());
    loop_task.await.expect("loop ends");
}

#[tokio::test(start_paused = true)]
async fn the_loop_waits_for_sync_then_follows_changes_and_retries_failures() {
    let h = Harness::new(cluster(true));
    // An existing dataplane from a previous run must survive an empty, unsynced cache.
    h.reconciler()
        .reconcile_once(&h.snap())
        .await
        .expect("previous run");
    h.kernel.take_log();
    let published = h.snap();
    h.tx.send_replace(ClusterSnapshot::default());

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let loop_task = tokio::spawn(h.reconciler().run(h.tx.subscribe(), async move {
        let _ = stop_rx.await;
    }));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        h.kernel.take_log().is_empty(),
        "nothing applied before the initial sync"
    );
    assert_eq!(h.kernel.state().devices["wireguard.cali"].peers.len(), 2);

    // Initial sync arrives; the dataplane already matches.
    h.tx.send_replace(published);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(h.kernel.take_log().is_empty());

    // A node joins while the kernel refuses the next apply: the loop retries with backoff.
    h.kernel.state().fail_next_apply = Some("EBUSY".into());
    h.store.edit(|s| {
        s.nodes.insert("node4".into(), node(4));
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = h.kernel.take_log();
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(
        log.iter()
            .any(|l| l.starts_with("set_peer") && l.contains("node4"))
    );
    assert!(
        log.iter()
            .any(|l| l.starts_with("add_route") && l.contains("10.244.4.0/24"))
    );

    let _ = stop_tx.send(());
    loop_task.await.expect("loop ends");
    assert_eq!(
        h.kernel.state().devices["wireguard.cali"].peers.len(),
        3,
        "shutdown tears nothing down"
    );
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.dir.path().join("status.json")).expect("status"))
            .expect("json");
    assert_eq!(
        status["devices"][0]["peers"].as_array().map(Vec::len),
        Some(3)
    );
}

#[tokio::test]
async fn key_collision_and_malformed_nodes_are_in_the_status() {
    let mut snap = cluster(true);
    snap.nodes
        .get_mut("node3")
        .expect("node3")
        .wireguard_public_key = node(2).wireguard_public_key;
    let mut bad = node(4);
    bad.wireguard_public_key = Some("not a key".into());
    snap.nodes.insert("node4".into(), bad);
    let h = Harness::new(snap);
    let mut r = h.reconciler();
    r.reconcile_once(&h.snap()).await.expect("reconcile");
    let skipped: Vec<_> = r.status().skipped.iter().map(|s| s.node.as_str()).collect();
    assert_eq!(skipped, ["node2", "node3", "node4"]);
    assert!(h.kernel.state().devices["wireguard.cali"].peers.is_empty());
    let json = serde_json::to_value(r.status()).expect("json");
    assert_eq!(json["skipped"][0]["reason"], "keyCollision");
    assert_eq!(json["skipped"][2]["reason"], "malformedKey");
}

/// Issue 10: a node whose object turns to garbage keeps being peered as its last good version
/// (cutting it off would black-hole it while it keeps sending); deleting it removes it.
#[tokio::test]
async fn an_undecodable_node_keeps_its_last_good_version() {
    let h = Harness::new(cluster(true));
    let mut r = h.reconciler();
    r.reconcile_once(&h.snap()).await.expect("on");
    h.store.edit(|s| {
        s.nodes.insert(
            "node2".into(),
            NodeResource {
                name: "node2".into(),
                decode_error: Some("expected value at line 1 column 1".into()),
                ..Default::default()
            },
        );
    });
    r.reconcile_once(&h.snap()).await.expect("runs");
    assert_eq!(h.kernel.state().devices["wireguard.cali"].peers.len(), 2);
    assert_eq!(
        r.status().stale_nodes,
        [
            "node node2 cannot be decoded (expected value at line 1 column 1); its last good version stays in use"
        ]
    );
    assert!(r.status().skipped.is_empty());
    h.store.edit(|s| {
        s.nodes.remove("node2");
    });
    r.reconcile_once(&h.snap()).await.expect("runs");
    assert_eq!(h.kernel.state().devices["wireguard.cali"].peers.len(), 1);
    assert!(r.status().stale_nodes.is_empty());
}

/// The loop records metrics and readiness: not ready before the initial sync, ready after the
/// first apply; a datastore change that costs operations lands in the convergence histogram; a
/// failure is counted by kind.
#[tokio::test(start_paused = true)]
async fn the_loop_records_metrics_readiness_and_convergence() {
    let h = Harness::new(ClusterSnapshot::default());
    let metrics = Arc::new(wiremesh_agent::metrics::Metrics::new(Duration::from_secs(
        300,
    )));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let loop_task = tokio::spawn(h.reconciler().with_metrics(Arc::clone(&metrics)).run(
        h.tx.subscribe(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let sample = |name: &str| -> f64 {
        let text = metrics.encode().expect("encode");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!metrics.health.ready(), "ready before the initial sync");
    assert!(metrics.health.live().is_ok());

    h.tx.send_replace(cluster(true));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(metrics.health.ready(), "ready after the first apply");
    assert_eq!(sample("wiremesh_ready"), 1.0);
    assert_eq!(sample("wiremesh_convergence_seconds_count"), 1.0);
    assert!(sample("wiremesh_reconcile_runs_total") >= 1.0);
    let text = metrics.encode().expect("encode");
    assert!(
        text.contains(
            "wiremesh_dataplane_operations_total{subsystem=\"wireguard\",kind=\"set_peer\"} 2"
        ),
        "{text}"
    );
    assert!(text.contains("wiremesh_peers{family=\"v4\"} 2"), "{text}");
    // The WireGuard series are read at scrape time, through the source the loop installed.
    assert!(!text.contains("wireguard_meta{"), "{text}");
    metrics.refresh().await;
    let text = metrics.encode().expect("encode");
    assert!(text.contains("wireguard_meta{"), "{text}");

    // A failing apply is counted by kind; the retry converges and is observed once.
    h.kernel.state().fail_next_apply = Some("EBUSY".into());
    h.store.edit(|s| {
        s.nodes.insert("node4".into(), node(4));
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = metrics.encode().expect("encode");
    assert!(
        text.contains("wiremesh_reconcile_failures_total{kind=\"dataplane_apply\"} 1"),
        "{text}"
    );
    assert_eq!(sample("wiremesh_convergence_seconds_count"), 2.0);
    assert!(text.contains("wiremesh_peers{family=\"v4\"} 3"), "{text}");

    // A resync with nothing to do is not a convergence.
    tokio::time::sleep(Duration::from_secs(200)).await;
    assert_eq!(sample("wiremesh_convergence_seconds_count"), 2.0);
    assert!(
        metrics.health.live().is_ok(),
        "the stats tick keeps the loop live"
    );
    let _ = stop_tx.send(());
    loop_task.await.expect("loop ends");
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.dir.path().join("status.json")).expect("status"))
            .expect("json");
    assert_eq!(status["ready"], true);
    assert!(
        status["devices"][0]["peers"][0]["programmedAt"].is_u64(),
        "{status}"
    );
}

#[tokio::test(start_paused = true)]
async fn object_problems_are_reported_through_the_datastore_once() {
    use wiremesh_datastore::ProblemObject;
    let mut snap = cluster(true);
    snap.nodes
        .get_mut("node3")
        .expect("node3")
        .wireguard_public_key = node(2).wireguard_public_key;
    let mut bad = node(4);
    bad.wireguard_public_key = Some("not a key".into());
    snap.nodes.insert("node4".into(), bad);
    snap.felix_configurations.insert(
        "node.node1".into(),
        Err("spec: invalid type: string, expected a boolean".into()),
    );
    let h = Harness::new(snap);
    let mut r = h.reconciler();
    r.reconcile_once(&h.snap()).await.expect("reconcile");
    let mut reported: Vec<(ProblemObject, String)> = h
        .store
        .reported()
        .into_iter()
        .map(|p| (p.object, p.reason))
        .collect();
    reported.sort();
    assert_eq!(
        reported,
        vec![
            (
                ProblemObject::Node("node2".into()),
                "WireguardKeyCollision".into()
            ),
            (
                ProblemObject::Node("node3".into()),
                "WireguardKeyCollision".into()
            ),
            (
                ProblemObject::Node("node4".into()),
                "MalformedWireguardKey".into()
            ),
            (
                ProblemObject::FelixConfiguration("node.node1".into()),
                "InvalidFelixConfiguration".into()
            ),
        ]
    );
    // Nothing new: nothing reported again.
    r.reconcile_once(&h.snap()).await.expect("reconcile");
    assert_eq!(h.store.reported().len(), 4);
}

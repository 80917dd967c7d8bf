//! Real-kernel tests of the dataplane, each in fresh network namespaces that are always removed.
//!
//! Each test body runs on a dedicated thread that joins the test's netns (`setns`), unshares its
//! mount namespace and bind-mounts a private directory over `/run/wireguard` (wireguard-go
//! hard-codes its socket path there, and netns do not separate it). wireguard-go inherits both.
//! Must run as root; set `WIREMESH_SKIP_ROOT_TESTS=1` to skip (loudly) elsewhere.
//! Only addresses inside our namespaces are used (10.99/16, 172.31.0/24, fd00:99::/32).

mod support;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::root_or_skip;

use ipnet::IpNet;
use wiremesh::netns::Netns;
use wiremesh_core::config::{DEFAULT_FWMARK, ROUTE_PROTOCOL};
use wiremesh_core::dataplane::link::LinkOp;
use wiremesh_core::dataplane::routing::RouteOp;
use wiremesh_core::dataplane::wireguard::{self as wg, WgOp};
use wiremesh_core::keys::PrivateKey;
use wiremesh_core::mesh::{DataplaneSpec, DeviceSpec, PeerSpec, RouteKind, RouteSpec, RuleSpec};
use wiremesh_core::model::{Family, PublishedWireguard, WgKey};
use wiremesh_dataplane::link::LinkDataplane;
use wiremesh_dataplane::link::NetlinkLinks;
use wiremesh_dataplane::netlink::netlink_handle;
use wiremesh_dataplane::route::NetlinkRouting;
use wiremesh_dataplane::route::RoutingDataplane;
use wiremesh_dataplane::wireguard::WireguardDataplane;
use wiremesh_dataplane::wireguard::backend::{BackendChoice, select_backend};
use wiremesh_dataplane::wireguard::userspace::{UserspaceConfig, UserspaceWireguard};

// ---------------------------------------------------------------------------------------------
// Harness

fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A [`Netns`] named `wmt-<tag>-...` whose helpers panic on failure.
struct Ns(Netns);

impl Ns {
    fn new(tag: &str) -> Self {
        Ns(Netns::new(&format!("wmt-{tag}")).expect("create netns"))
    }

    fn name(&self) -> &str {
        self.0.name()
    }

    fn run_dir(&self) -> &Path {
        self.0.run_dir()
    }

    fn ip(&self, args: &[&str]) -> String {
        self.0.ip(args).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ip_json(&self, args: &[&str]) -> serde_json::Value {
        self.0.ip_json(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A command inside the netns; its output, or the failure with both outputs.
    fn exec(&self, args: &[&str]) -> Result<String, wiremesh::netns::NetnsError> {
        self.0.exec(args)
    }

    /// A command inside the netns that also sees the private `/run/wireguard` (like `wg`).
    fn exec_wg(&self, args: &[&str]) -> String {
        self.0.exec_wg(args).unwrap_or_else(|e| panic!("{e}"))
    }

    fn pids(&self) -> Vec<i32> {
        self.0.pids().expect("ip netns pids")
    }

    /// Runs `f` on a thread inside this netns; panics propagate to the caller.
    fn enter<T, Fut, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        Fut: Future<Output = T>,
        F: FnOnce() -> Fut + Send + 'static,
    {
        self.0.enter(f).expect("enter netns")
    }
}

fn net(s: &str) -> IpNet {
    s.parse().expect("net")
}

fn peer(node: &str, endpoint: &str, ips: &[&str], keepalive: u16) -> PeerSpec {
    PeerSpec {
        node: node.into(),
        endpoint: endpoint.parse().expect("endpoint"),
        allowed_ips: ips.iter().map(|s| net(s)).collect(),
        keepalive,
    }
}

async fn wait_for<F: AsyncFnMut() -> bool>(what: &str, mut cond: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Userspace WireGuard

#[test]
fn userspace_device_lifecycle() {
    if !root_or_skip("userspace_device_lifecycle") {
        return;
    }
    let ns = Ns::new("wg");
    let key = PrivateKey::generate();
    let (k2, k3) = (
        PrivateKey::generate().public_key(),
        PrivateKey::generate().public_key(),
    );
    let p2 = peer("n2", "172.31.0.2:51820", &["10.99.2.0/24"], 25);
    let p3 = peer(
        "n3",
        "[fd00:99::3]:51820",
        &["10.99.3.0/24", "fd00:99:3::/64"],
        0,
    );
    let names: BTreeSet<String> = ["wg0".to_string()].into();

    // Create, configure, add two peers; the daemon stays after the spawning process exited.
    let state = {
        let (key, p2, p3, names) = (key.clone(), p2.clone(), p3.clone(), names.clone());
        let run_dir = ns.run_dir().to_path_buf();
        ns.enter(move || async move {
            let mut wg = UserspaceWireguard::new(netlink_handle().expect("netlink"));
            assert!(wg.observe(&names).await.expect("observe").is_empty());
            wg.apply(&[WgOp::CreateDevice { name: "wg0".into() }])
                .await
                .expect("create");
            assert!(
                run_dir.join("wg0.sock").exists(),
                "socket in the private run dir"
            );
            let fresh = wg.observe(&names).await.expect("observe");
            assert_eq!(fresh["wg0"].public_key, None);
            wg.apply(&[
                WgOp::ConfigureDevice {
                    name: "wg0".into(),
                    private_key: key.clone(),
                    listen_port: 51820,
                    fwmark: DEFAULT_FWMARK,
                },
                WgOp::SetPeer {
                    name: "wg0".into(),
                    public_key: k2,
                    peer: p2,
                },
                WgOp::SetPeer {
                    name: "wg0".into(),
                    public_key: k3,
                    peer: p3,
                },
            ])
            .await
            .expect("configure");
            // CreateDevice on a running device adopts it (agent restart).
            wg.apply(&[WgOp::CreateDevice { name: "wg0".into() }])
                .await
                .expect("re-create is a no-op");
            wg.observe(&names).await.expect("observe")
        })
    };
    let dev = &state["wg0"];
    assert_eq!(dev.public_key, Some(key.public_key()));
    assert_eq!((dev.listen_port, dev.fwmark), (51820, DEFAULT_FWMARK));
    assert_eq!(dev.peers.keys().copied().collect::<Vec<_>>(), {
        let mut v = vec![k2, k3];
        v.sort();
        v
    });
    for (k, want) in [(k2, &p2), (k3, &p3)] {
        let have = &dev.peers[&k];
        assert_eq!(have.endpoint, Some(want.endpoint));
        assert_eq!(have.allowed_ips, want.allowed_ips);
        assert_eq!(have.keepalive, want.keepalive);
        assert_eq!(have.last_handshake, None);
    }
    let daemons = ns.pids();
    assert_eq!(
        daemons.len(),
        1,
        "exactly one wireguard-go daemon in the netns: {daemons:?}"
    );
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", daemons[0])).expect("cmdline");
    assert_eq!(cmdline, b"wireguard-go\0wg0\0");
    // Cross-check with wg(8), which reads the same socket.
    let dump = ns.exec_wg(&["wg", "show", "wg0", "dump"]);
    assert!(dump.contains(&key.public_key().to_base64()), "{dump}");
    assert!(dump.contains("51820\t0x200000"), "{dump}");
    assert!(
        dump.contains(&k3.to_base64()) && dump.contains("10.99.3.0/24,fd00:99:3::/64"),
        "{dump}"
    );
    assert!(!dump.contains(key.to_hex().as_str()));

    // Update one peer in place; then plan(desired, observed) is empty.
    let p2b = peer(
        "n2",
        "172.31.0.2:51820",
        &["10.99.2.0/24", "10.99.22.0/24"],
        25,
    );
    let device = DeviceSpec {
        family: Family::V4,
        name: "wg0".into(),
        private_key: key.clone(),
        listen_port: 51820,
        fwmark: DEFAULT_FWMARK,
        mtu: 1420,
        address: None,
        peers: [(k2, p2b.clone()), (k3, p3.clone())].into(),
    };
    let spec = wireguard_only(device, &names);
    let (planned, after) = {
        let (names, spec) = (names.clone(), spec.clone());
        ns.enter(move || async move {
            let mut wg = UserspaceWireguard::new(netlink_handle().expect("netlink"));
            let before = wg.observe(&names).await.expect("observe");
            let ops = wg::plan(&spec, &before);
            assert_eq!(ops.len(), 1, "only the changed peer: {ops:?}");
            assert!(matches!(&ops[0], WgOp::SetPeer { public_key, .. } if *public_key == k2));
            wg.apply(&ops).await.expect("update");
            let after = wg.observe(&names).await.expect("observe");
            (wg::plan(&spec, &after), after)
        })
    };
    assert!(
        planned.is_empty(),
        "plan against the observed state: {planned:?}"
    );
    assert_eq!(after["wg0"].peers[&k2].allowed_ips, p2b.allowed_ips);
    assert_eq!(after["wg0"].peers.len(), 2);

    // Remove a peer, then the device: link, socket and daemon are gone.
    let daemon = daemons[0];
    let run_dir = ns.run_dir().to_path_buf();
    let names2 = names.clone();
    ns.enter(move || async move {
        let mut wg = UserspaceWireguard::new(netlink_handle().expect("netlink"));
        wg.apply(&[WgOp::RemovePeer {
            name: "wg0".into(),
            public_key: k3,
        }])
        .await
        .expect("remove peer");
        let state = wg.observe(&names2).await.expect("observe");
        assert_eq!(
            state["wg0"].peers.keys().copied().collect::<Vec<_>>(),
            vec![k2]
        );
        wg.apply(&[WgOp::DeleteDevice { name: "wg0".into() }])
            .await
            .expect("delete");
        assert!(wg.observe(&names2).await.expect("observe").is_empty());
        assert!(!run_dir.join("wg0.sock").exists(), "socket removed");
        // Deleting again is success.
        wg.apply(&[WgOp::DeleteDevice { name: "wg0".into() }])
            .await
            .expect("delete again");
        wait_for("wireguard-go to exit", async || {
            !Path::new(&format!("/proc/{daemon}/ns/net")).exists()
        })
        .await;
    });
    assert!(
        ns.ip_json(&["link", "show"])
            .as_array()
            .expect("links")
            .iter()
            .all(|l| l["ifname"] != "wg0"),
        "link gone"
    );
    assert!(ns.pids().is_empty(), "no process left in the netns");
}

#[test]
fn userspace_stale_socket_is_absent_device() {
    if !root_or_skip("userspace_stale_socket_is_absent_device") {
        return;
    }
    let ns = Ns::new("stale");
    let names: BTreeSet<String> = ["wgs".to_string()].into();
    let names2 = names.clone();
    ns.enter(move || async move {
        let mut wg = UserspaceWireguard::new(netlink_handle().expect("netlink"));
        wg.apply(&[WgOp::CreateDevice { name: "wgs".into() }])
            .await
            .expect("create");
        assert_eq!(wg.observe(&names2).await.expect("observe").len(), 1);
    });
    // A daemon killed hard leaves its socket file behind.
    for pid in ns.pids() {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ns.pids().is_empty() {
        assert!(Instant::now() < deadline, "daemon did not die");
        std::thread::sleep(Duration::from_millis(20));
    }
    let sock = ns.run_dir().join("wgs.sock");
    assert!(sock.exists(), "stale socket left behind by SIGKILL");
    ns.enter(move || async move {
        let mut wg = UserspaceWireguard::new(netlink_handle().expect("netlink"));
        assert!(
            wg.observe(&names).await.expect("observe").is_empty(),
            "stale socket = absent device"
        );
        // And the device can be created again.
        wg.apply(&[WgOp::CreateDevice { name: "wgs".into() }])
            .await
            .expect("re-create");
        assert_eq!(wg.observe(&names).await.expect("observe").len(), 1);
    });
}

/// The backend is chosen by asking the kernel for a WireGuard link, which loads the module on
/// demand (the image needs no `modprobe`); the probe link leaves nothing behind, and the
/// choice comes with its reason. Without the module, `auto` falls back to wireguard-go and
/// says why, and `kernel` is refused with that reason.
#[test]
fn backend_choice_asks_the_kernel_and_says_why() {
    if !root_or_skip("backend_choice_asks_the_kernel_and_says_why") {
        return;
    }
    let ns = Ns::new("backend");
    let (auto, kernel) = ns.enter(|| async {
        let handle = netlink_handle().expect("netlink");
        let auto = select_backend(
            BackendChoice::Auto,
            handle.clone(),
            UserspaceConfig::default(),
        )
        .await
        .map(|(wg, why)| (wg.backend(), why))
        .expect("a backend");
        let kernel = select_backend(BackendChoice::Kernel, handle, UserspaceConfig::default())
            .await
            .map(|(wg, why)| (wg.backend(), why))
            .map_err(|e| e.to_string());
        (auto, kernel)
    });
    if Path::new("/sys/module/wireguard").exists() {
        assert_eq!(auto.0, wiremesh_dataplane::Backend::Kernel, "{}", auto.1);
        assert!(kernel.is_ok(), "{kernel:?}");
    } else {
        assert_eq!(auto.0, wiremesh_dataplane::Backend::Userspace);
        assert!(
            auto.1.contains("the kernel cannot create WireGuard links")
                && auto.1.ends_with("using wireguard-go"),
            "{}",
            auto.1
        );
        let refused = kernel.expect_err("no kernel WireGuard here");
        assert!(
            refused.contains("cannot create WireGuard links"),
            "{refused}"
        );
    }
    assert!(
        !ns.ip(&["link"]).contains("wm-probe0"),
        "the probe link is gone"
    );
}

// ---------------------------------------------------------------------------------------------
// Routes and rules

/// A spec with one v4 device and nothing else (the WireGuard subsystem's view).
fn wireguard_only(device: DeviceSpec, names: &BTreeSet<String>) -> DataplaneSpec {
    DataplaneSpec {
        devices: [(Family::V4, device)].into(),
        owned_interfaces: names.clone(),
        routing_table: 1,
        routes: BTreeSet::new(),
        rules: BTreeSet::new(),
        publish: PublishedWireguard::default(),
        skipped: BTreeSet::new(),
    }
}

fn dev_route(table: u32, dest: &str, dev: &str) -> RouteSpec {
    RouteSpec {
        table,
        dest: net(dest),
        kind: RouteKind::Device {
            interface: dev.into(),
        },
    }
}

fn throw_route(table: u32, dest: &str) -> RouteSpec {
    RouteSpec {
        table,
        dest: net(dest),
        kind: RouteKind::Throw,
    }
}

#[test]
fn routes_in_our_table_only() {
    if !root_or_skip("routes_in_our_table_only") {
        return;
    }
    let ns = Ns::new("rt");
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v0p"]);
    ns.ip(&["link", "set", "v0", "up"]);
    ns.ip(&["link", "set", "v0p", "up"]);
    // Routes we did not create: another protocol in our table, and ours-looking ones in main.
    ns.ip(&[
        "route",
        "add",
        "10.99.3.0/24",
        "dev",
        "v0",
        "table",
        "1",
        "proto",
        "static",
    ]);
    ns.ip(&[
        "-6",
        "route",
        "add",
        "fd00:99:3::/64",
        "dev",
        "v0",
        "table",
        "1",
        "proto",
        "boot",
    ]);
    ns.ip(&[
        "route",
        "add",
        "10.99.1.0/24",
        "dev",
        "v0",
        "proto",
        "static",
    ]);
    ns.ip(&[
        "route",
        "add",
        "10.99.4.0/24",
        "dev",
        "v0",
        "proto",
        &ROUTE_PROTOCOL.to_string(),
    ]);

    let ours: BTreeSet<RouteSpec> = [
        dev_route(1, "10.99.1.0/24", "v0"),
        dev_route(1, "10.99.1.7/32", "v0"),
        throw_route(1, "10.99.2.0/24"),
        dev_route(1, "fd00:99:1::/64", "v0"),
        throw_route(1, "fd00:99:2::/64"),
    ]
    .into();
    let big = dev_route(1000, "10.99.5.0/24", "v0");
    let (ours2, big2) = (ours.clone(), big.clone());
    ns.enter(move || async move {
        let mut routing = NetlinkRouting::new(netlink_handle().expect("netlink"));
        assert!(routing.observe(1).await.expect("observe").routes.is_empty());
        let mut add: Vec<RouteOp> = ours2.iter().cloned().map(RouteOp::AddRoute).collect();
        add.push(RouteOp::AddRoute(big2.clone()));
        routing.apply(&add).await.expect("add");
        routing
            .apply(&add)
            .await
            .expect("adding what exists is success");
        assert_eq!(routing.observe(1).await.expect("observe").routes, ours2);
        assert_eq!(
            routing.observe(1000).await.expect("observe").routes,
            [big2.clone()].into()
        );
        assert!(
            routing
                .observe(254)
                .await
                .expect("observe")
                .routes
                .contains(&dev_route(254, "10.99.4.0/24", "v0"))
        );

        // Deletes never touch foreign routes, even with the same prefix or table.
        routing
            .apply(&[
                RouteOp::DeleteRoute(throw_route(1, "10.99.3.0/24")),
                RouteOp::DeleteRoute(dev_route(1, "10.99.3.0/24", "v0")),
                RouteOp::DeleteRoute(dev_route(1, "fd00:99:3::/64", "v0")),
            ])
            .await
            .expect("deleting what is not ours is a no-op");
        let mut del: Vec<RouteOp> = ours2.iter().cloned().map(RouteOp::DeleteRoute).collect();
        del.push(RouteOp::DeleteRoute(big2));
        routing.apply(&del).await.expect("delete");
        routing
            .apply(&del)
            .await
            .expect("deleting what is gone is success");
        assert!(routing.observe(1).await.expect("observe").routes.is_empty());
        assert!(
            routing
                .observe(1000)
                .await
                .expect("observe")
                .routes
                .is_empty()
        );
    });
    let show = |args: &[&str]| -> Vec<String> {
        ns.ip_json(args)
            .as_array()
            .expect("routes")
            .iter()
            .map(|r| r["dst"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(show(&["route", "show", "table", "1"]), vec!["10.99.3.0/24"]);
    assert_eq!(
        show(&["-6", "route", "show", "table", "1"]),
        vec!["fd00:99:3::/64"]
    );
    let main = show(&["route", "show", "table", "main"]);
    assert!(
        main.contains(&"10.99.1.0/24".to_string()) && main.contains(&"10.99.4.0/24".to_string()),
        "{main:?}"
    );
}

#[test]
fn route_shapes_match_iproute2() {
    if !root_or_skip("route_shapes_match_iproute2") {
        return;
    }
    let ns = Ns::new("rts");
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v0p"]);
    ns.ip(&["link", "set", "v0", "up"]);
    ns.enter(|| async {
        let mut routing = NetlinkRouting::new(netlink_handle().expect("netlink"));
        routing
            .apply(&[
                RouteOp::AddRoute(dev_route(1, "10.99.1.0/24", "v0")),
                RouteOp::AddRoute(throw_route(1, "fd00:99:2::/64")),
            ])
            .await
            .expect("add");
    });
    let v4 = ns.ip_json(&["route", "show", "table", "1"]);
    let r = &v4[0];
    assert_eq!(
        (r["dst"].as_str(), r["dev"].as_str(), r["scope"].as_str()),
        (Some("10.99.1.0/24"), Some("v0"), Some("link"))
    );
    assert_eq!(
        r["protocol"].as_str(),
        Some(ROUTE_PROTOCOL.to_string().as_str())
    );
    let v6 = ns.ip_json(&["-6", "route", "show", "table", "1"]);
    assert_eq!(
        (v6[0]["type"].as_str(), v6[0]["dev"].as_str()),
        (Some("throw"), Some("lo")),
        "{v6}"
    );
}

#[test]
fn rules_for_our_table() {
    if !root_or_skip("rules_for_our_table") {
        return;
    }
    let ns = Ns::new("rule");
    // Foreign rules: one for another table, one for ours (which the rule manager owns).
    ns.ip(&["rule", "add", "fwmark", "0x1", "lookup", "2", "pref", "98"]);
    let ours: BTreeSet<RuleSpec> = Family::ALL
        .into_iter()
        .map(|family| RuleSpec {
            family,
            priority: 99,
            table: 1,
            fwmark: DEFAULT_FWMARK,
            mask: DEFAULT_FWMARK,
            invert: true,
        })
        .collect();
    let ours2 = ours.clone();
    ns.enter(move || async move {
        let mut routing = NetlinkRouting::new(netlink_handle().expect("netlink"));
        assert!(routing.observe(1).await.expect("observe").rules.is_empty());
        let add: Vec<RouteOp> = ours2.iter().copied().map(RouteOp::AddRule).collect();
        routing.apply(&add).await.expect("add");
        routing
            .apply(&add)
            .await
            .expect("adding what exists is success");
        assert_eq!(routing.observe(1).await.expect("observe").rules, ours2);
    });
    for v in [&[][..], &["-6"][..]] {
        let text = ns.ip(&[v, &["rule", "show"]].concat());
        assert_eq!(
            text.matches("99:\tnot from all fwmark 0x200000/0x200000 lookup 1")
                .count(),
            1,
            "{text}"
        );
    }
    // A rule someone else pointed at our table is seen (and would be replaced by the plan).
    ns.ip(&["rule", "add", "fwmark", "0x5", "lookup", "1", "pref", "97"]);
    let ours3 = ours.clone();
    ns.enter(move || async move {
        let mut routing = NetlinkRouting::new(netlink_handle().expect("netlink"));
        let seen = routing.observe(1).await.expect("observe").rules;
        let foreign = RuleSpec {
            family: Family::V4,
            priority: 97,
            table: 1,
            fwmark: 5,
            mask: u32::MAX,
            invert: false,
        };
        assert_eq!(seen, ours3.iter().copied().chain([foreign]).collect());
        let del: Vec<RouteOp> = seen.iter().copied().map(RouteOp::DeleteRule).collect();
        routing.apply(&del).await.expect("delete");
        routing
            .apply(&del)
            .await
            .expect("deleting what is gone is success");
        assert!(routing.observe(1).await.expect("observe").rules.is_empty());
    });
    let text = ns.ip(&["rule", "show"]);
    assert!(
        !text.contains("lookup 1 ") && !text.ends_with("lookup 1\n"),
        "{text}"
    );
    assert!(
        text.contains("98:\tfrom all fwmark 0x1 lookup 2"),
        "foreign rule survives: {text}"
    );
    assert!(!ns.ip(&["-6", "rule", "show"]).contains("lookup 1\n"));
}

// ---------------------------------------------------------------------------------------------
// Links

#[test]
fn link_ops_and_host_mtu() {
    if !root_or_skip("link_ops_and_host_mtu") {
        return;
    }
    let ns = Ns::new("link");
    // Uplinks: eth0 (1400, up), ens9 (1300, down: ignored); vx0 is no uplink (1000, up).
    for (name, peer, mtu, up) in [
        ("eth0", "eth0p", "1400", true),
        ("ens9", "ens9p", "1300", false),
        ("vx0", "vx0p", "1000", true),
    ] {
        ns.ip(&[
            "link", "add", name, "mtu", mtu, "type", "veth", "peer", "name", peer, "mtu", mtu,
        ]);
        if up {
            ns.ip(&["link", "set", name, "up"]);
            ns.ip(&["link", "set", peer, "up"]);
        }
    }
    ns.ip(&[
        "link", "add", "wmt0", "type", "veth", "peer", "name", "wmt0p",
    ]);
    let a4 = net("10.99.5.1/32");
    let a6 = net("fd00:99:5::1/128");
    ns.enter(move || async move {
        let mut links = NetlinkLinks::new(netlink_handle().expect("netlink"));
        assert_eq!(links.host_mtu().await.expect("host mtu"), Some(1400));
        let names: BTreeSet<String> = ["wmt0".to_string(), "absent0".to_string()].into();
        let before = links.observe(&names).await.expect("observe");
        assert_eq!(before.keys().collect::<Vec<_>>(), vec!["wmt0"]);
        assert!(!before["wmt0"].up);
        let ops = [
            LinkOp::SetMtu {
                name: "wmt0".into(),
                mtu: 1380,
            },
            LinkOp::AddAddress {
                name: "wmt0".into(),
                address: a4,
            },
            LinkOp::AddAddress {
                name: "wmt0".into(),
                address: a6,
            },
            LinkOp::SetUp {
                name: "wmt0".into(),
            },
        ];
        links.apply(&ops).await.expect("apply");
        links.apply(&ops).await.expect("re-applying is success");
        links
            .apply(&[LinkOp::DeleteAddress {
                name: "wmt0".into(),
                address: net("10.99.6.1/32"),
            }])
            .await
            .expect("deleting a missing address is success");
        let after = links.observe(&names).await.expect("observe");
        let link = &after["wmt0"];
        assert_eq!((link.mtu, link.up), (1380, true));
        assert_eq!(link.addresses, [a4, a6].into());
        assert!(
            links
                .apply(&[LinkOp::SetUp {
                    name: "absent0".into()
                }])
                .await
                .is_err(),
            "missing link is an error"
        );
    });
    let link = ns.ip_json(&["link", "show", "dev", "wmt0"]);
    assert_eq!(link[0]["mtu"].as_u64(), Some(1380));
    assert!(
        link[0]["flags"]
            .as_array()
            .expect("flags")
            .iter()
            .any(|f| f == "UP")
    );
    let addrs: BTreeSet<String> = ns.ip_json(&["addr", "show", "dev", "wmt0"])[0]["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .filter(|a| a["scope"] == "global")
        .map(|a| {
            format!(
                "{}/{}",
                a["local"].as_str().unwrap_or_default(),
                a["prefixlen"]
            )
        })
        .collect();
    assert_eq!(
        addrs,
        ["10.99.5.1/32".to_string(), "fd00:99:5::1/128".to_string()].into()
    );
    ns.enter(move || async move {
        let mut links = NetlinkLinks::new(netlink_handle().expect("netlink"));
        links
            .apply(&[LinkOp::DeleteAddress {
                name: "wmt0".into(),
                address: a4,
            }])
            .await
            .expect("delete");
        let names: BTreeSet<String> = ["wmt0".to_string()].into();
        assert_eq!(
            links.observe(&names).await.expect("observe")["wmt0"].addresses,
            [a6].into()
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Two nodes

struct Node {
    ns: Ns,
    key: PrivateKey,
    underlay: &'static str,
    tunnel: &'static str,
}

/// Programs one node's device, link, route and rule through our code only.
fn program(node: &Node, peer_key: WgKey, peer_underlay: &str, peer_tunnel: &str) {
    let key = node.key.clone();
    let tunnel = net(&format!("{}/32", node.tunnel));
    let endpoint = format!("{peer_underlay}:51820");
    let peer_net = format!("{peer_tunnel}/32");
    node.ns.enter(move || async move {
        let handle = netlink_handle().expect("netlink");
        let (mut links, mut routing) = (
            NetlinkLinks::new(handle.clone()),
            NetlinkRouting::new(handle),
        );
        let mut wg = UserspaceWireguard::new(links.handle());
        wg.apply(&[
            WgOp::CreateDevice { name: "wg0".into() },
            WgOp::ConfigureDevice {
                name: "wg0".into(),
                private_key: key,
                listen_port: 51820,
                fwmark: DEFAULT_FWMARK,
            },
            WgOp::SetPeer {
                name: "wg0".into(),
                public_key: peer_key,
                peer: peer("other", &endpoint, &[&peer_net], 0),
            },
        ])
        .await
        .expect("wireguard");
        links
            .apply(&[
                LinkOp::SetMtu {
                    name: "wg0".into(),
                    mtu: 1420,
                },
                LinkOp::AddAddress {
                    name: "wg0".into(),
                    address: tunnel,
                },
                LinkOp::SetUp { name: "wg0".into() },
            ])
            .await
            .expect("link");
        let rule = RuleSpec {
            family: Family::V4,
            priority: 99,
            table: 1,
            fwmark: DEFAULT_FWMARK,
            mask: DEFAULT_FWMARK,
            invert: true,
        };
        routing
            .apply(&[
                RouteOp::AddRoute(dev_route(1, &peer_net, "wg0")),
                RouteOp::AddRule(rule),
            ])
            .await
            .expect("routing");
    });
}

/// Two namespaces joined by one veth (`eth0`, 172.31.0.1 and .2/24), each with a `wg0`
/// (10.99.0.1 and .2) peered with the other through our code.
fn two_nodes(a_name: &str, b_name: &str) -> (Node, Node) {
    let a = Node {
        ns: Ns::new(a_name),
        key: PrivateKey::generate(),
        underlay: "172.31.0.1",
        tunnel: "10.99.0.1",
    };
    let b = Node {
        ns: Ns::new(b_name),
        key: PrivateKey::generate(),
        underlay: "172.31.0.2",
        tunnel: "10.99.0.2",
    };
    run_ok(
        "ip",
        &[
            "link",
            "add",
            "eth0",
            "netns",
            a.ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            b.ns.name(),
        ],
    );
    for n in [&a, &b] {
        n.ns.ip(&["addr", "add", &format!("{}/24", n.underlay), "dev", "eth0"]);
        n.ns.ip(&["link", "set", "eth0", "up"]);
    }
    program(&a, b.key.public_key(), b.underlay, b.tunnel);
    program(&b, a.key.public_key(), a.underlay, a.tunnel);
    (a, b)
}

#[test]
fn two_nodes_ping_through_tunnel() {
    if !root_or_skip("two_nodes_ping_through_tunnel") {
        return;
    }
    let (a, b) = two_nodes("na", "nb");

    if let Err(e) = a.ns.exec(&["ping", "-c", "2", "-W", "2", b.tunnel]) {
        panic!("ping a -> b over wg0: {e}");
    }
    if let Err(e) = b.ns.exec(&["ping", "-c", "1", "-W", "2", a.tunnel]) {
        panic!("ping b -> a over wg0: {e}");
    }

    let b_key = b.key.public_key();
    let state = a.ns.enter(move || async move {
        let mut wg = UserspaceWireguard::new(netlink_handle().expect("netlink"));
        let names: BTreeSet<String> = ["wg0".to_string()].into();
        wg.observe(&names).await.expect("observe")
    });
    let p: &BTreeMap<_, _> = &state["wg0"].peers;
    let pb = &p[&b_key];
    assert!(pb.last_handshake.is_some(), "handshake recorded");
    assert!(pb.rx_bytes > 0 && pb.tx_bytes > 0, "{pb:?}");
}

/// A peer that answers from another address roams (WireGuard learns the new endpoint); the
/// plan keeps that live endpoint instead of resetting it to the datastore's, and a stale
/// session gets the datastore's endpoint back.
#[test]
fn roamed_peer_keeps_its_learned_endpoint() {
    if !root_or_skip("roamed_peer_keeps_its_learned_endpoint") {
        return;
    }
    let (a, b) = two_nodes("ra", "rb");
    // B now sends from a second address: to A it has moved, as behind a NAT rebinding.
    b.ns.ip(&["addr", "add", "172.31.0.3/24", "dev", "eth0"]);
    b.ns.ip(&[
        "route",
        "replace",
        "172.31.0.0/24",
        "dev",
        "eth0",
        "src",
        "172.31.0.3",
    ]);
    if let Err(e) = b.ns.exec(&["ping", "-c", "2", "-W", "2", a.tunnel]) {
        panic!("ping b -> a over wg0: {e}");
    }

    let b_key = b.key.public_key();
    let a_key = a.key.clone();
    let (kept, stale) = a.ns.enter(move || async move {
        let mut wg = UserspaceWireguard::new(netlink_handle().expect("netlink"));
        let names: BTreeSet<String> = ["wg0".to_string()].into();
        let actual = wg.observe(&names).await.expect("observe");
        let have = &actual["wg0"].peers[&b_key];
        assert_eq!(
            have.endpoint,
            Some("172.31.0.3:51820".parse().expect("addr")),
            "wireguard-go learned B's new address: {have:?}"
        );
        let datastore: std::net::SocketAddr = "172.31.0.2:51820".parse().expect("addr");
        let device = DeviceSpec {
            family: Family::V4,
            name: "wg0".into(),
            private_key: a_key,
            listen_port: 51820,
            fwmark: DEFAULT_FWMARK,
            mtu: 1420,
            address: None,
            peers: [(b_key, peer("b", "172.31.0.2:51820", &["10.99.0.2/32"], 0))].into(),
        };
        let spec = wireguard_only(device, &names);
        let programmed: BTreeMap<(String, WgKey), std::net::SocketAddr> =
            [(("wg0".to_string(), b_key), datastore)].into();
        let now = std::time::SystemTime::now();
        let kept = wg::plan_with(
            &spec,
            &actual,
            Some(wg::Learned {
                now,
                programmed: &programmed,
            }),
        );
        let later = now + wg::LIVE_SESSION + std::time::Duration::from_secs(1);
        let stale = wg::plan_with(
            &spec,
            &actual,
            Some(wg::Learned {
                now: later,
                programmed: &programmed,
            }),
        );
        (kept, stale)
    });
    assert!(kept.is_empty(), "a live learned endpoint is kept: {kept:?}");
    assert!(
        matches!(&stale[..], [WgOp::SetPeer { peer, .. }]
            if peer.endpoint == "172.31.0.2:51820".parse().expect("addr")),
        "a stale session gets the datastore endpoint back: {stale:?}"
    );
}

//! Real-kernel tests of the nftables subsystem, each in fresh network namespaces that are always
//! removed. A foreign table is present in every test and must come out untouched.
//! Must run as root; set `WIREMESH_SKIP_ROOT_TESTS=1` to skip (loudly) elsewhere.
//! Only addresses inside our namespaces are used (10.98.0.0/24).

mod support;
use std::time::Duration;
use support::{root_or_skip, tcp_answers};

use serde_json::{Value, json};
use wiremesh::netns::Netns;
use wiremesh_core::dataplane::filter::{NftOp, plan};
use wiremesh_core::policy::render::{FilterSpec, render};
use wiremesh_core::policy::{PolicyInputs, PolicyResources, compile};
use wiremesh_core::wire::{Kind, RawPolicyResources};
use wiremesh_dataplane::nft::{FilterDataplane, KernelNft};

const FOREIGN: &str = "table ip foreign {\n\tset keep { type ipv4_addr; elements = { 10.98.0.77 } }\n\tchain input {\n\t\ttype filter hook input priority 10; policy accept;\n\t\tip saddr @keep counter\n\t}\n}\n";

fn nft(ns: &Netns, args: &[&str]) -> String {
    let mut full = vec!["nft"];
    full.extend_from_slice(args);
    ns.exec(&full).unwrap_or_else(|e| panic!("{e}"))
}

fn foreign(ns: &Netns) -> String {
    nft(ns, &["list", "table", "ip", "foreign"])
}

fn resources(objects: &[(Kind, Value)]) -> PolicyResources {
    let mut raw = RawPolicyResources::default();
    for (kind, v) in objects {
        let name = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        raw.insert(*kind, name, v.clone());
    }
    let res = PolicyResources::from_raw(&raw);
    assert!(res.errors.is_empty(), "{:?}", res.errors);
    res
}

fn base_objects(deny: &[&str]) -> Vec<(Kind, Value)> {
    vec![
        (
            Kind::HostEndpoint,
            json!({"metadata": {"name": "a-veth", "labels": {"host-endpoint": "true"}},
            "spec": {"node": "a", "interfaceName": "veth-a", "expectedIPs": ["10.98.0.1"]}}),
        ),
        (
            Kind::GlobalNetworkSet,
            json!({"metadata": {"name": "deny", "labels": {"list": "deny"}},
            "spec": {"nets": deny}}),
        ),
        (
            Kind::GlobalNetworkPolicy,
            json!({"metadata": {"name": "deny-list"},
            "spec": {"order": 1, "selector": "host-endpoint == 'true'",
                     "ingress": [{"action": "Deny", "source": {"selector": "list == 'deny'"}},
                                 {"action": "Allow", "protocol": "ICMP"}],
                     "egress": [{"action": "Allow"}]}}),
        ),
    ]
}

fn spec_for(objects: &[(Kind, Value)]) -> FilterSpec {
    let res = resources(objects);
    render(&compile(&PolicyInputs {
        node: "a",
        resources: Some(&res),
        ..Default::default()
    }))
}

async fn converge(nft: &mut KernelNft, spec: &FilterSpec) -> Vec<NftOp> {
    let before = nft.observe().await.expect("observe");
    let ops = plan(spec, &before);
    nft.apply(&ops).await.expect("apply");
    let after = nft.observe().await.expect("observe");
    assert!(
        plan(spec, &after).is_empty(),
        "not converged: {:?}",
        plan(spec, &after)
    );
    ops
}

/// Two namespaces joined by a veth: `a` (10.98.0.1, the host with the endpoint) and `b`
/// (10.98.0.2, a client).
fn pair() -> (Netns, Netns) {
    let a = Netns::new("wmt-nfta").expect("netns");
    let b = Netns::new("wmt-nftb").expect("netns");
    a.ip(&[
        "link",
        "add",
        "veth-a",
        "type",
        "veth",
        "peer",
        "name",
        "veth-b",
        "netns",
        b.name(),
    ])
    .expect("veth");
    a.ip(&["addr", "add", "10.98.0.1/24", "dev", "veth-a"])
        .expect("addr");
    b.ip(&["addr", "add", "10.98.0.2/24", "dev", "veth-b"])
        .expect("addr");
    a.ip(&["link", "set", "veth-a", "up"]).expect("up");
    b.ip(&["link", "set", "veth-b", "up"]).expect("up");
    (a, b)
}

fn ping(from: &Netns, to: &str) -> bool {
    from.exec(&["ping", "-c", "1", "-W", "1", to]).is_ok()
}

#[tokio::test]
async fn table_lifecycle_and_set_only_updates() {
    if !root_or_skip("table_lifecycle_and_set_only_updates") {
        return;
    }
    let (a, _b) = pair();
    let file = tempfile::NamedTempFile::new().expect("tempfile");
    std::fs::write(file.path(), FOREIGN).expect("write");
    nft(&a, &["-f", &file.path().display().to_string()]);
    let foreign_before = foreign(&a);
    let mut k = KernelNft::in_netns(a.name());

    let spec = spec_for(&base_objects(&["10.98.0.50"]));
    let ops = converge(&mut k, &spec).await;
    assert!(
        matches!(ops.as_slice(), [NftOp::ReplaceTable(_)]),
        "{ops:?}"
    );
    let ruleset1 = nft(&a, &["list", "table", "inet", "wiremesh"]);

    // A network-set change is element operations only, and rewrites no rule.
    let spec2 = spec_for(&base_objects(&["10.98.0.2", "10.98.0.60/31"]));
    let ops = converge(&mut k, &spec2).await;
    assert!(
        ops.iter()
            .all(|o| matches!(o, NftOp::AddElements { .. } | NftOp::DeleteElements { .. })),
        "{ops:?}"
    );
    assert_eq!(ops.len(), 2, "{ops:?}");
    let ruleset2 = nft(&a, &["list", "table", "inet", "wiremesh"]);
    // Set elements and counter values may differ (a stray packet in the namespace, such as an
    // IPv6 neighbour solicitation, counts); rules, sets and counters themselves may not.
    let strip = |t: &str| {
        t.lines()
            .filter(|l| {
                !l.contains("elements =")
                    && !l.starts_with("\t\t\t     ")
                    && !l.trim_start().starts_with("packets ")
            })
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        strip(&ruleset1),
        strip(&ruleset2),
        "only set elements may change"
    );
    assert_ne!(ruleset1, ruleset2);

    // A rule change rewrites only the policy's chain (and the marker), in one transaction with
    // the element changes; the kernel then holds what a whole-table write would give.
    let mut objs = base_objects(&["10.98.0.2"]);
    objs[2].1["spec"]["ingress"][1]["action"] = json!("Deny");
    let ops = converge(&mut k, &spec_for(&objs)).await;
    let NftOp::UpdateRules(update) = &ops[0] else {
        panic!("expected a rule update first: {ops:?}");
    };
    let written: Vec<&str> = update
        .write_chains
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(written, ["pi-gnp/deny-list"], "{update}");
    assert!(
        update.add_chains.is_empty() && update.delete_chains.is_empty(),
        "{update}"
    );
    assert!(
        ops[1..]
            .iter()
            .all(|o| matches!(o, NftOp::DeleteElements { .. })),
        "{ops:?}"
    );
    let incremental = nft(&a, &["list", "table", "inet", "wiremesh"]);
    k.apply(&[NftOp::ReplaceTable(Box::new(spec_for(&objs)))])
        .await
        .expect("replace");
    // The kernel lists objects in the order they were created: compare them as a set.
    let objects = |t: &str| {
        let lines: Vec<String> = strip(t).into_iter().filter(|l| l != "}").collect();
        let mut blocks: Vec<String> = lines.join("\n").split("\n\n").map(str::to_string).collect();
        blocks.sort();
        blocks
    };
    assert_eq!(
        objects(&incremental),
        objects(&nft(&a, &["list", "table", "inet", "wiremesh"])),
        "the updated table differs from the same table written whole"
    );

    // Drift: a chain of ours flushed behind our back is repaired by the next full observe.
    nft(&a, &["flush", "chain", "inet", "wiremesh", "filter-input"]);
    let mut fresh = KernelNft::in_netns(a.name());
    let ops = converge(&mut fresh, &spec_for(&objs)).await;
    assert!(
        matches!(ops.as_slice(), [NftOp::ReplaceTable(_)]),
        "{ops:?}"
    );
    assert!(
        nft(&a, &["list", "chain", "inet", "wiremesh", "filter-input"])
            .contains("jump filter-from-hep")
    );

    // Cleanup removes only our table.
    let ops = converge(&mut k, &FilterSpec::default()).await;
    assert_eq!(ops, [NftOp::DeleteTable]);
    assert!(
        a.exec(&["nft", "list", "table", "inet", "wiremesh"])
            .is_err()
    );
    assert_eq!(foreign(&a), foreign_before, "the foreign table was touched");
}

#[tokio::test]
async fn default_deny_keeps_failsafe_and_set_denies_traffic() {
    if !root_or_skip("default_deny_keeps_failsafe_and_set_denies_traffic") {
        return;
    }
    let (a, b) = pair();
    let mut k = KernelNft::in_netns(a.name());
    assert!(ping(&b, "10.98.0.1"), "no connectivity before policy");

    // A host endpoint with no policy: default deny, failsafe ports still answer.
    let hep_only = vec![base_objects(&[])[0].clone()];
    converge(&mut k, &spec_for(&hep_only)).await;
    assert!(
        !ping(&b, "10.98.0.1"),
        "ICMP should be dropped by the default deny"
    );
    assert!(
        tcp_answers(&b, "10.98.0.1", 22),
        "failsafe tcp:22 must stay reachable"
    );
    assert!(
        !tcp_answers(&b, "10.98.0.1", 80),
        "tcp:80 should be dropped"
    );

    // Policy allows ICMP; then the deny list gains b's address: only a set element changes.
    converge(&mut k, &spec_for(&base_objects(&["10.98.0.50"]))).await;
    assert!(ping(&b, "10.98.0.1"), "ICMP allowed by policy");
    let ops = converge(&mut k, &spec_for(&base_objects(&["10.98.0.2"]))).await;
    assert!(
        ops.iter().all(|o| !matches!(o, NftOp::ReplaceTable(_))),
        "{ops:?}"
    );
    assert!(!ping(&b, "10.98.0.1"), "b is on the deny list");
    assert!(
        tcp_answers(&b, "10.98.0.1", 22),
        "failsafe comes before policy"
    );
    converge(&mut k, &FilterSpec::default()).await;
    assert!(ping(&b, "10.98.0.1"), "cleanup restores connectivity");
}

/// The named counter's (packets, bytes) as the agent reads them.
async fn counter(k: &KernelNft, name: &str) -> (u64, u64) {
    let reader = k
        .counter_reader()
        .expect("the kernel dataplane has counters");
    let all = reader.read_counters().await.expect("read counters");
    let v = all
        .get(name)
        .unwrap_or_else(|| panic!("no counter {name} in {all:?}"));
    (v.packets, v.bytes)
}

/// Pings that match the policy's ICMP Allow rule (ingress rule 1 of `gnp/deny-list`) raise its
/// counter by exactly their number; the deny rule's counter counts the pings it drops; a
/// set-element change keeps the counts (no table replacement).
#[tokio::test]
async fn rule_counters_count_the_packets_a_rule_matched() {
    if !root_or_skip("rule_counters_count_the_packets_a_rule_matched") {
        return;
    }
    let (a, b) = pair();
    let mut k = KernelNft::in_netns(a.name());
    let spec = spec_for(&base_objects(&["10.98.0.50"]));
    let allow = "gnp/deny-list/in1";
    let deny = "gnp/deny-list/in0";
    assert_eq!(spec.counters[allow].action, "allow");
    assert_eq!(spec.counters[deny].action, "deny");
    converge(&mut k, &spec).await;
    let (p0, b0) = counter(&k, allow).await;
    // One ping per process: each echo request is a new flow (a new ICMP id), so none is
    // accepted by the conntrack rule before the policy.
    const SENT: u64 = 3;
    for _ in 0..SENT {
        assert!(ping(&b, "10.98.0.1"), "ICMP allowed by policy");
    }
    let (p1, b1) = counter(&k, allow).await;
    assert_eq!(p1 - p0, SENT, "echo requests counted by the Allow rule");
    assert_eq!(b1 - b0, SENT * 84, "84-byte IPv4 echo requests");
    assert_eq!(counter(&k, deny).await, (0, 0));

    // b joins the deny list: element operations only; the counts carry on.
    let ops = converge(&mut k, &spec_for(&base_objects(&["10.98.0.2"]))).await;
    assert!(
        ops.iter().all(|o| !matches!(o, NftOp::ReplaceTable(_))),
        "{ops:?}"
    );
    assert_eq!(
        counter(&k, allow).await,
        (p1, b1),
        "counts survive a set change"
    );
    assert!(!ping(&b, "10.98.0.1"), "b is on the deny list");
    assert_eq!(counter(&k, deny).await.0, 1, "the dropped ping");
    // Traffic and element changes are not drift: the full listing matches the baseline.
    let full = k.observe_full().await.expect("full observe");
    assert!(!full.edited, "counter values or elements taken for an edit");
    assert!(plan(&spec_for(&base_objects(&["10.98.0.2"])), &full).is_empty());
    converge(&mut k, &FilterSpec::default()).await;
    assert!(
        k.counter_reader()
            .expect("reader")
            .read_counters()
            .await
            .expect("no table is no counters")
            .is_empty()
    );
}

/// A rule edited in place (`nft replace rule`: same handle, same rule count, same hash chain)
/// is noticed by the next full observe, which plans a table replacement.
#[tokio::test]
async fn a_rule_replaced_in_place_is_detected_and_repaired() {
    if !root_or_skip("a_rule_replaced_in_place_is_detected_and_repaired") {
        return;
    }
    let (a, b) = pair();
    let mut k = KernelNft::in_netns(a.name());
    let spec = spec_for(&base_objects(&["10.98.0.50"]));
    converge(&mut k, &spec).await;
    assert!(
        k.settle().await.is_some(),
        "a baseline after the replacement"
    );
    assert!(ping(&b, "10.98.0.1"));

    // Someone turns the ICMP Allow into a drop, in place.
    let listing = nft(
        &a,
        &[
            "-a",
            "list",
            "chain",
            "inet",
            "wiremesh",
            "pi-gnp/deny-list",
        ],
    );
    let handle = listing
        .lines()
        .find(|l| l.contains("gnp/deny-list/in1"))
        .and_then(|l| l.rsplit("# handle ").next())
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|| panic!("no ICMP rule in\n{listing}"));
    nft(
        &a,
        &[
            "replace",
            "rule",
            "inet",
            "wiremesh",
            "pi-gnp/deny-list",
            "handle",
            &handle,
            "meta",
            "l4proto",
            "icmp",
            "drop",
        ],
    );
    assert!(!ping(&b, "10.98.0.1"), "the edit is in force");
    let chains = |ns: &Netns| {
        nft(ns, &["list", "chains", "inet"])
            .lines()
            .filter(|l| l.contains("chain "))
            .count()
    };
    let before = chains(&a);

    // The quick observe (hash chain only) cannot see it; a full one can.
    let quick = k.observe().await.expect("observe");
    assert!(plan(&spec, &quick).is_empty(), "cached: nothing to do yet");
    let full = k.observe_full().await.expect("full observe");
    assert!(full.edited, "the in-place edit is drift");
    assert_eq!(chains(&a), before);
    let ops = plan(&spec, &full);
    assert!(
        matches!(ops.as_slice(), [NftOp::ReplaceTable(_)]),
        "{ops:?}"
    );
    k.apply(&ops).await.expect("apply");
    assert!(ping(&b, "10.98.0.1"), "repaired");
    let again = k.observe_full().await.expect("full observe");
    assert!(!again.edited);
    assert!(plan(&spec, &again).is_empty());
    // Without a baseline (a restarted agent) the first full listing is adopted as it is.
    let mut fresh = KernelNft::in_netns(a.name());
    let first = fresh.observe().await.expect("observe");
    assert!(!first.edited);
}

/// The shutdown hold (issue 10, rolling updates): held pod CIDRs are dropped instead of leaving
/// outside the WireGuard device, the hold runs out by itself (element timeouts: an uninstall),
/// and the next agent lifts it with element deletes only (its counters survive).
#[tokio::test]
async fn a_shutdown_hold_drops_then_expires_or_is_lifted() {
    use wiremesh_core::guard::{EncryptionGuard, GuardedFamily, add_guard, hold_script};
    use wiremesh_core::model::Family;

    if !root_or_skip("shutdown hold") {
        return;
    }
    let (a, _b) = pair();
    let mut k = KernelNft::in_netns(a.name());
    // b's address stands for a peer's pod CIDR; there is no WireGuard device here, so traffic
    // to it "leaves in clear" through veth-a.
    let guard = EncryptionGuard {
        strict: false,
        families: [(
            Family::V4,
            GuardedFamily {
                interface: "wg-none".into(),
                cidrs: ["10.98.0.2/32".parse().expect("net")].into(),
            },
        )]
        .into(),
    };
    let mut spec = FilterSpec::default();
    add_guard(&mut spec, &guard);
    converge(&mut k, &spec).await;
    assert!(ping(&a, "10.98.0.2"), "not strict: counted, not dropped");

    let held = hold_script(&guard, Duration::from_secs(2)).expect("a hold");
    k.apply_script(&held).await.expect("hold");
    assert!(!ping(&a, "10.98.0.2"), "held: dropped");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(ping(&a, "10.98.0.2"), "the hold ran out");

    let held = hold_script(&guard, Duration::from_secs(600)).expect("a hold");
    k.apply_script(&held).await.expect("hold");
    assert!(!ping(&a, "10.98.0.2"));
    let (blocked, _) = counter(&k, "plaintext-blocked").await;
    assert!(blocked > 0, "held packets are counted as blocked");
    let mut next_agent = KernelNft::in_netns(a.name());
    let ops = converge(&mut next_agent, &spec).await;
    assert_eq!(ops.len(), 1, "{ops:?}");
    assert!(matches!(&ops[0], NftOp::DeleteElements { set, .. } if set == "shutdown-hold4"));
    assert!(ping(&a, "10.98.0.2"), "lifted by the next agent");
    assert_eq!(
        counter(&k, "plaintext-blocked").await.0,
        blocked,
        "counters survive"
    );
}

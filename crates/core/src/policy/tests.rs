//! Unit tests: validation, defaults, ordering, explain verdicts, rendered nft snapshots.

use std::net::IpAddr;

use serde_json::{Value, json};

use super::explain::{Outcome, Packet, PacketPath, Reason, explain};
use super::model::{Direction, Protocol};
use super::program::{Hook, Iface, PolicyInputs, PolicySettings, compile};
use super::render::render;
use super::resources::PolicyResources;
use crate::wire::{Kind, RawPolicyResources};

fn raw(objects: &[(Kind, Value)]) -> RawPolicyResources {
    let mut r = RawPolicyResources::default();
    for (kind, v) in objects {
        let name = v["metadata"]["name"].as_str().unwrap_or("").to_string();
        let key = match v["metadata"]["namespace"].as_str() {
            Some(ns) => format!("{ns}/{name}"),
            None => name,
        };
        r.insert(*kind, key, v.clone());
    }
    r
}

fn gnp(name: &str, spec: Value) -> (Kind, Value) {
    (
        Kind::GlobalNetworkPolicy,
        json!({"metadata": {"name": name}, "spec": spec}),
    )
}

fn hep(name: &str, node: &str, iface: &str, labels: Value, ips: Value) -> (Kind, Value) {
    (
        Kind::HostEndpoint,
        json!({"metadata": {"name": name, "labels": labels},
               "spec": {"node": node, "interfaceName": iface, "expectedIPs": ips}}),
    )
}

fn one_error(objects: &[(Kind, Value)]) -> String {
    let res = PolicyResources::from_raw(&raw(objects));
    assert_eq!(res.errors.len(), 1, "{:?}", res.errors);
    res.errors[0].to_string()
}

#[test]
fn validation_errors_name_object_and_field() {
    let cases: Vec<((Kind, Value), &str)> = vec![
        (
            gnp("a", json!({"ingress": [{"action": "allow"}]})),
            "spec.ingress[0].action",
        ),
        (
            gnp(
                "a",
                json!({"ingress": [{"action": "Allow", "protocol": "tcp"}]}),
            ),
            "spec.ingress[0].protocol",
        ),
        (
            gnp(
                "a",
                json!({"ingress": [{"action": "Allow", "protocol": 0}]}),
            ),
            "spec.ingress[0].protocol",
        ),
        (
            gnp(
                "a",
                json!({"ingress": [{"action": "Allow", "destination": {"ports": [22]}}]}),
            ),
            "spec.ingress[0].destination.ports",
        ),
        (
            gnp(
                "a",
                json!({"ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": ["9:1"]}}]}),
            ),
            "spec.ingress[0].destination.ports[0]",
        ),
        (
            gnp(
                "a",
                json!({"ingress": [{"action": "Allow", "source": {"nets": ["10.0.0.0/8", "fd00::/8"]}}]}),
            ),
            "spec.ingress[0]",
        ),
        (
            gnp(
                "a",
                json!({"ingress": [{"action": "Allow", "ipVersion": 6, "source": {"nets": ["10.0.0.0/8"]}}]}),
            ),
            "spec.ingress[0].ipVersion",
        ),
        (
            gnp(
                "a",
                json!({"ingress": [{"action": "Allow", "source": {"notNets": ["0.0.0.0/0"]}}]}),
            ),
            "spec.ingress[0].source.notNets[0]",
        ),
        (
            gnp(
                "a",
                json!({"ingress": [{"action": "Allow", "source": {"selector": "a = 'b'"}}]}),
            ),
            "spec.ingress[0].source.selector",
        ),
        (
            gnp(
                "a",
                json!({"ingress": [{"action": "Allow", "icmp": {"type": 8}}]}),
            ),
            "spec.ingress[0].icmp",
        ),
        (
            gnp(
                "a",
                json!({"ingress": [{"action": "Allow", "protocol": "ICMP", "ipVersion": 6}]}),
            ),
            "spec.ingress[0].protocol",
        ),
        (gnp("a", json!({"selector": "global()"})), "spec.selector"),
        (
            gnp("a", json!({"doNotTrack": true, "ingress": []})),
            "spec.applyOnForward",
        ),
        (
            gnp(
                "a",
                json!({"preDNAT": true, "applyOnForward": true, "egress": [{"action": "Allow"}]}),
            ),
            "spec.egress",
        ),
        (
            gnp("a", json!({"types": ["Ingress", "Ingress"]})),
            "spec.types[1]",
        ),
        (gnp("a", json!({"ingresss": []})), "spec.ingresss"),
        (gnp("Bad_Name", json!({})), "metadata.name"),
        (
            (
                Kind::Tier,
                json!({"metadata": {"name": "default"}, "spec": {"order": 5}}),
            ),
            "spec",
        ),
        (
            (
                Kind::Tier,
                json!({"metadata": {"name": "t"}, "spec": {"defaultAction": "Drop"}}),
            ),
            "spec.defaultAction",
        ),
        (
            (
                Kind::HostEndpoint,
                json!({"metadata": {"name": "h"}, "spec": {"node": "n"}}),
            ),
            "spec",
        ),
        (
            (
                Kind::HostEndpoint,
                json!({"metadata": {"name": "h"}, "spec": {"interfaceName": "eth0"}}),
            ),
            "spec.node",
        ),
        (
            (
                Kind::HostEndpoint,
                json!({"metadata": {"name": "h"}, "spec": {"node": "n", "interfaceName": "a-very-long-interface"}}),
            ),
            "spec.interfaceName",
        ),
        (
            (
                Kind::GlobalNetworkSet,
                json!({"metadata": {"name": "s"}, "spec": {"nets": ["10.0.0.300/8"]}}),
            ),
            "spec.nets[0]",
        ),
    ];
    for ((kind, v), field) in cases {
        let msg = one_error(&[(kind, v.clone())]);
        assert!(
            msg.contains(&format!(": {field}: ")),
            "{v}: expected field {field} in {msg}"
        );
        assert!(msg.starts_with(&kind.to_string()), "{msg}");
    }
}

#[test]
fn unknown_fields_name_the_intended_field() {
    let typo = one_error(&[gnp("a", json!({"ingres": []}))]);
    assert!(
        typo.contains("spec.ingres: unknown field (did you mean ingress?)"),
        "{typo}"
    );
    let np = one_error(&[(
        Kind::NetworkPolicy,
        json!({"metadata": {"name": "a", "namespace": "ns"}, "spec": {"doNotTrack": true}}),
    )]);
    assert!(
        np.starts_with(
            "NetworkPolicy \"ns/a\": spec.doNotTrack: unknown field: doNotTrack, preDNAT"
        ),
        "{np}"
    );
    let unsupported = PolicyResources::from_raw(&raw(&[gnp(
        "a",
        json!({"ingress": [{"action": "Allow", "http": {"methods": ["GET"]}}]}),
    )]));
    assert!(
        unsupported.errors[0].unsupported,
        "{:?}",
        unsupported.errors
    );
}

#[test]
fn invalid_objects_are_skipped_others_kept() {
    let res = PolicyResources::from_raw(&raw(&[
        gnp("good", json!({"ingress": [{"action": "Allow"}]})),
        gnp("bad", json!({"ingress": [{"action": "Nope"}]})),
    ]));
    assert_eq!(res.policies.len(), 1);
    assert_eq!(res.policies[0].name, "good");
    assert_eq!(res.errors.len(), 1);
    assert_eq!(res.errors[0].name, "bad");
}

#[test]
fn types_default_from_rules() {
    let res = PolicyResources::from_raw(&raw(&[
        gnp("none", json!({})),
        gnp("ing", json!({"ingress": [{"action": "Allow"}]})),
        gnp("eg", json!({"egress": [{"action": "Allow"}]})),
        gnp(
            "both",
            json!({"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]}),
        ),
        gnp(
            "explicit",
            json!({"types": ["Egress"], "ingress": [{"action": "Allow"}]}),
        ),
    ]));
    let dirs = |n: &str| {
        let p = res.policies.iter().find(|p| p.name == n).expect("policy");
        (p.ingress.is_some(), p.egress.is_some())
    };
    assert_eq!(dirs("none"), (true, false));
    assert_eq!(dirs("ing"), (true, false));
    assert_eq!(dirs("eg"), (false, true));
    assert_eq!(dirs("both"), (true, true));
    assert_eq!(dirs("explicit"), (false, true));
    let p = &res.policies[0];
    assert_eq!(p.tier, "default");
}

#[test]
fn policy_order_is_calicos() {
    let res = PolicyResources::from_raw(&raw(&[
        gnp("allow", json!({"order": 10})),
        gnp("allow-ssh", json!({"order": 10})),
        gnp("allow.ssh", json!({"order": 10})),
        gnp("allow2", json!({"order": 10})),
        gnp("first", json!({"order": 1.5})),
        gnp("last", json!({})),
    ]));
    let names: Vec<&str> = res.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        ["first", "allow-ssh", "allow.ssh", "allow", "allow2", "last"]
    );
}

#[test]
fn namespaced_rule_selectors_are_scoped() {
    let res = PolicyResources::from_raw(&raw(&[(
        Kind::NetworkPolicy,
        json!({"metadata": {"name": "p", "namespace": "ns1"},
               "spec": {"ingress": [{"action": "Allow", "source": {"selector": "app == 'x'", "notSelector": "b == 'c'"}}]}}),
    )]));
    assert!(res.errors.is_empty(), "{:?}", res.errors);
    let r = &res.policies[0].ingress.as_ref().expect("ingress")[0];
    assert_eq!(
        r.source.selector.as_ref().map(|s| s.canonical()).as_deref(),
        Some(r#"(app == "x" && projectcalico.org/namespace == "ns1")"#)
    );
    assert_eq!(
        r.source
            .not_selector
            .as_ref()
            .map(|s| s.canonical())
            .as_deref(),
        Some(r#"b == "c""#)
    );
    assert!(!res.policies[0].selects_host_endpoints);
}

/// A representative cluster: node-1 with eth0 and the tunnel interface as host endpoints.
pub(crate) fn fixture() -> RawPolicyResources {
    raw(&[
        (
            Kind::Tier,
            json!({"metadata": {"name": "security"}, "spec": {"order": 100}}),
        ),
        (
            Kind::Tier,
            json!({"metadata": {"name": "platform"}, "spec": {"order": 200, "defaultAction": "Pass"}}),
        ),
        hep(
            "node-1-eth0",
            "node-1",
            "eth0",
            json!({"host-endpoint": "true", "iface": "eth0"}),
            json!(["10.0.0.1"]),
        ),
        hep(
            "node-1-wg",
            "node-1",
            "wireguard.cali",
            json!({"host-endpoint": "true", "iface": "wg"}),
            json!(["10.244.1.0"]),
        ),
        hep(
            "node-2-eth0",
            "node-2",
            "eth0",
            json!({"host-endpoint": "true", "iface": "eth0"}),
            json!(["10.0.0.2"]),
        ),
        (
            Kind::GlobalNetworkSet,
            json!({"metadata": {"name": "blocklist", "labels": {"list": "deny"}},
                                        "spec": {"nets": ["192.0.2.0/24", "198.51.100.7"]}}),
        ),
        gnp(
            "deny-blocklist",
            json!({"tier": "security", "order": 10, "selector": "host-endpoint == 'true'",
            "ingress": [{"action": "Log", "source": {"selector": "list == 'deny'"}},
                        {"action": "Deny", "source": {"selector": "list == 'deny'"}},
                        {"action": "Pass"}]}),
        ),
        gnp(
            "drop-node3-pods",
            json!({"tier": "platform", "order": 1, "selector": "iface == 'wg'",
            "ingress": [{"action": "Log", "source": {"nets": ["10.244.3.0/24"]}},
                        {"action": "Deny", "source": {"nets": ["10.244.3.0/24"]}}]}),
        ),
        gnp(
            "allow-ssh-web",
            json!({"order": 100, "selector": "host-endpoint == 'true'",
            "ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": [22, "8000:8080"]}},
                        {"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8}},
                        {"action": "Allow", "source": {"selector": "host-endpoint == 'true'"}}],
            "egress": [{"action": "Allow"}]}),
        ),
        gnp(
            "untracked-allow",
            json!({"order": 1, "selector": "iface == 'eth0'", "doNotTrack": true,
            "applyOnForward": true, "ingress": [{"action": "Allow", "protocol": "UDP", "destination": {"ports": [4789]}}],
            "egress": [{"action": "Allow", "protocol": "UDP", "source": {"ports": [4789]}}]}),
        ),
        gnp(
            "prednat-deny",
            json!({"order": 1, "selector": "iface == 'eth0'", "preDNAT": true,
            "applyOnForward": true, "ingress": [{"action": "Deny", "protocol": "TCP", "destination": {"ports": [30080]}}]}),
        ),
        gnp(
            "fwd",
            json!({"order": 50, "selector": "iface == 'wg'", "applyOnForward": true,
            "types": ["Ingress"], "ingress": [{"action": "Deny", "protocol": "TCP", "destination": {"ports": [9999]}}]}),
        ),
    ])
}

fn fixture_program() -> super::Program {
    let res = PolicyResources::from_raw(&fixture());
    assert!(res.errors.is_empty(), "{:?}", res.errors);
    compile(&PolicyInputs {
        node: "node-1",
        resources: Some(&res),
        settings: PolicySettings::default(),
        ..Default::default()
    })
}

#[test]
fn program_orders_tiers_and_filters_by_selector() {
    let prog = fixture_program();
    let ifaces: Vec<&Iface> = prog.endpoints.iter().map(|e| &e.iface).collect();
    assert_eq!(
        ifaces,
        [
            &Iface::Named("eth0".into()),
            &Iface::Named("wireguard.cali".into())
        ]
    );
    let wg = &prog.endpoints[1];
    let tiers: Vec<(&str, Vec<&str>)> = wg
        .tiers(Hook::Normal, Direction::Ingress)
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                t.policies.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        tiers,
        [
            ("security", vec!["gnp/deny-blocklist"]),
            ("platform", vec!["gnp/drop-node3-pods"]),
            ("default", vec!["gnp/fwd", "gnp/allow-ssh-web"]),
        ]
    );
    assert_eq!(wg.tiers(Hook::Forward, Direction::Ingress).len(), 1);
    assert!(wg.tiers(Hook::Untracked, Direction::Ingress).is_empty());
    let eth0 = &prog.endpoints[0];
    assert_eq!(eth0.tiers(Hook::Untracked, Direction::Ingress).len(), 1);
    assert_eq!(eth0.tiers(Hook::PreDnat, Direction::Ingress).len(), 1);
    // The selector set of the blocklist holds the network set's nets.
    let set = prog
        .sets
        .values()
        .find(|s| s.selector == r#"list == "deny""#)
        .expect("set");
    assert_eq!(set.v4.len(), 2);
    // HEP set: expectedIPs of every node's HEPs.
    let heps = prog
        .sets
        .values()
        .find(|s| s.selector == r#"host-endpoint == "true""#)
        .expect("set");
    assert_eq!(heps.v4.len(), 3);
}

fn pkt(
    path: PacketPath,
    iface: &str,
    src: &str,
    dst: &str,
    proto: Protocol,
    dport: Option<u16>,
) -> Packet {
    Packet {
        path,
        iface: iface.into(),
        out_iface: None,
        src: src.parse::<IpAddr>().expect("addr"),
        dst: dst.parse::<IpAddr>().expect("addr"),
        protocol: proto,
        sport: Some(40000),
        dport,
        icmp_type: None,
        icmp_code: None,
    }
}

#[test]
fn explain_table() {
    use PacketPath::*;
    use Protocol::*;
    let prog = fixture_program();
    // (packet, outcome, reason, policy, rule)
    type Case<'a> = (Packet, Outcome, Reason, Option<&'a str>, Option<usize>);
    let cases: Vec<Case> = vec![
        (
            pkt(Input, "eth0", "10.9.0.1", "10.0.0.1", Tcp, Some(22)),
            Outcome::Accept,
            Reason::Failsafe,
            None,
            None,
        ),
        (
            pkt(Input, "eth0", "10.9.0.1", "10.0.0.1", Tcp, Some(8080)),
            Outcome::Accept,
            Reason::Rule,
            Some("gnp/allow-ssh-web"),
            Some(0),
        ),
        (
            pkt(Input, "eth0", "10.9.0.1", "10.0.0.1", Tcp, Some(8081)),
            Outcome::Drop,
            Reason::EndOfTier,
            None,
            None,
        ),
        (
            pkt(Input, "eth0", "192.0.2.9", "10.0.0.1", Tcp, Some(8080)),
            Outcome::Drop,
            Reason::Rule,
            Some("gnp/deny-blocklist"),
            Some(1),
        ),
        (
            pkt(Input, "eth0", "10.0.0.2", "10.0.0.1", Tcp, Some(1234)),
            Outcome::Accept,
            Reason::Rule,
            Some("gnp/allow-ssh-web"),
            Some(2),
        ),
        (
            pkt(Input, "eth0", "10.9.0.1", "10.0.0.1", Udp, Some(51820)),
            Outcome::Accept,
            Reason::WireguardPort,
            None,
            None,
        ),
        (
            pkt(Input, "eth0", "10.9.0.1", "10.0.0.1", Udp, Some(4789)),
            Outcome::Accept,
            Reason::Rule,
            Some("gnp/untracked-allow"),
            Some(0),
        ),
        (
            pkt(Input, "eth0", "10.9.0.1", "10.0.0.1", Tcp, Some(30080)),
            Outcome::Drop,
            Reason::Rule,
            Some("gnp/prednat-deny"),
            Some(0),
        ),
        (
            pkt(
                Input,
                "wireguard.cali",
                "10.244.3.5",
                "10.0.0.1",
                Tcp,
                Some(8080),
            ),
            Outcome::Drop,
            Reason::Rule,
            Some("gnp/drop-node3-pods"),
            Some(1),
        ),
        (
            pkt(
                Input,
                "wireguard.cali",
                "10.244.2.5",
                "10.0.0.1",
                Tcp,
                Some(8080),
            ),
            Outcome::Accept,
            Reason::Rule,
            Some("gnp/allow-ssh-web"),
            Some(0),
        ),
        (
            pkt(Input, "eth1", "10.9.0.1", "10.0.0.1", Tcp, Some(8081)),
            Outcome::Accept,
            Reason::NotPoliced,
            None,
            None,
        ),
        (
            pkt(Input, "cali123", "10.244.1.5", "10.0.0.1", Tcp, Some(8081)),
            Outcome::Accept,
            Reason::NotPoliced,
            None,
            None,
        ),
        (
            pkt(Output, "eth0", "10.0.0.1", "10.9.0.1", Tcp, Some(443)),
            Outcome::Accept,
            Reason::Rule,
            Some("gnp/allow-ssh-web"),
            Some(0),
        ),
        (
            pkt(
                Forward,
                "wireguard.cali",
                "10.244.3.5",
                "10.244.1.5",
                Tcp,
                Some(9999),
            ),
            Outcome::Drop,
            Reason::Rule,
            Some("gnp/fwd"),
            Some(0),
        ),
        (
            pkt(
                Forward,
                "wireguard.cali",
                "10.244.3.5",
                "10.244.1.5",
                Tcp,
                Some(80),
            ),
            Outcome::Drop,
            Reason::EndOfTier,
            None,
            None,
        ),
        (
            pkt(Forward, "eth0", "10.9.0.1", "10.244.1.5", Tcp, Some(80)),
            Outcome::Accept,
            Reason::ForwardDefaultAllow,
            None,
            None,
        ),
    ];
    for (p, outcome, reason, policy, rule) in cases {
        let v = explain(&prog, &p);
        assert_eq!((v.outcome, &v.reason), (outcome, &reason), "{p:?}: {v}");
        if policy.is_some() {
            assert_eq!(v.policy.as_deref(), policy, "{p:?}: {v}");
            assert_eq!(v.rule, rule, "{p:?}: {v}");
        }
    }
    // The Log rule of the blocklist policy fires, then the Deny decides.
    let v = explain(
        &prog,
        &pkt(Input, "eth0", "192.0.2.9", "10.0.0.1", Tcp, Some(8080)),
    );
    assert_eq!(v.logged, ["security/gnp/deny-blocklist/ingress[0]"]);
    let v = explain(
        &prog,
        &pkt(
            Input,
            "wireguard.cali",
            "10.244.3.5",
            "10.0.0.1",
            Tcp,
            Some(1),
        ),
    );
    assert_eq!(v.logged, ["platform/gnp/drop-node3-pods/ingress[0]"]);
}

#[test]
fn default_deny_without_policy_and_failsafe_holds() {
    let res = PolicyResources::from_raw(&raw(&[hep("h", "n1", "eth0", json!({}), json!([]))]));
    let prog = compile(&PolicyInputs {
        node: "n1",
        resources: Some(&res),
        ..Default::default()
    });
    let v = explain(
        &prog,
        &pkt(
            PacketPath::Input,
            "eth0",
            "10.9.0.1",
            "10.0.0.1",
            Protocol::Tcp,
            Some(80),
        ),
    );
    assert_eq!(
        (v.outcome, v.reason),
        (Outcome::Drop, Reason::EndpointDefaultDeny)
    );
    let v = explain(
        &prog,
        &pkt(
            PacketPath::Input,
            "eth0",
            "10.9.0.1",
            "10.0.0.1",
            Protocol::Tcp,
            Some(22),
        ),
    );
    assert_eq!((v.outcome, v.reason), (Outcome::Accept, Reason::Failsafe));
    // Another node's program is empty: the table is removed.
    let other = compile(&PolicyInputs {
        node: "n2",
        resources: Some(&res),
        ..Default::default()
    });
    assert!(other.is_empty());
    assert_eq!(render(&other).chains.len(), 0);
}

#[test]
fn wildcard_endpoint_is_fallback_and_lowest_name_wins() {
    let res = PolicyResources::from_raw(&raw(&[
        hep("b-star", "n1", "*", json!({}), json!([])),
        hep("a-star", "n1", "*", json!({}), json!([])),
        hep("z-eth0", "n1", "eth0", json!({}), json!([])),
        hep("y-eth0", "n1", "eth0", json!({}), json!([])),
    ]));
    let prog = compile(&PolicyInputs {
        node: "n1",
        resources: Some(&res),
        ..Default::default()
    });
    let names: Vec<(String, &str)> = prog
        .endpoints
        .iter()
        .map(|e| (e.iface.to_string(), e.hep.as_str()))
        .collect();
    assert_eq!(
        names,
        [("eth0".to_string(), "y-eth0"), ("*".to_string(), "a-star")]
    );
    assert_eq!(
        prog.endpoint_for("wireguard.cali").map(|e| e.hep.as_str()),
        Some("a-star")
    );
}

fn check_snapshot(name: &str, text: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/snapshots")
        .join(name);
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, text).expect("write snapshot");
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_SNAPSHOTS=1 to create)",
            path.display()
        )
    });
    assert_eq!(text, want, "rendered text differs from {}", path.display());
}

#[test]
fn snapshot_fixture() {
    let spec = render(&fixture_program());
    check_snapshot("policy_fixture.nft", &spec.to_nft());
}

#[test]
fn snapshot_default_deny_star() {
    let res = PolicyResources::from_raw(&raw(&[
        hep(
            "all-interfaces",
            "n1",
            "*",
            json!({"host-endpoint": "true"}),
            json!(["10.0.0.1", "fd00::1"]),
        ),
        gnp(
            "v6-and-v4",
            json!({"selector": "has(host-endpoint)",
            "ingress": [{"action": "Allow", "source": {"selector": "has(host-endpoint)", "notNets": ["10.1.0.0/16"]}},
                        {"action": "Allow", "protocol": "ICMPv6", "notICMP": {"type": 128, "code": 0}},
                        {"action": "Deny", "notProtocol": "UDP"}],
            "types": ["Ingress"]}),
        ),
    ]));
    assert!(res.errors.is_empty(), "{:?}", res.errors);
    let settings = PolicySettings {
        failsafe_inbound: [
            crate::wire::felix::ProtoPort {
                protocol: Some("TCP".into()),
                port: 22,
                net: Some("10.0.0.0/8".into()),
            },
            crate::wire::felix::ProtoPort {
                port: 6443,
                ..Default::default()
            },
        ]
        .iter()
        .map(|p| super::program::FailsafePort::try_from(p).expect("failsafe"))
        .collect(),
        ..PolicySettings::default()
    };
    let prog = compile(&PolicyInputs {
        node: "n1",
        resources: Some(&res),
        settings,
        ..Default::default()
    });
    check_snapshot("policy_default_deny_star.nft", &render(&prog).to_nft());
}

#[test]
fn set_change_touches_no_rule() {
    let mut r1 = fixture();
    let before = render(&compile(&PolicyInputs {
        node: "node-1",
        resources: Some(&PolicyResources::from_raw(&r1)),
        ..Default::default()
    }));
    r1.insert(
        Kind::GlobalNetworkSet,
        "blocklist".into(),
        json!({"metadata": {"name": "blocklist", "labels": {"list": "deny"}}, "spec": {"nets": ["192.0.2.0/24", "203.0.113.9"]}}),
    );
    let after = render(&compile(&PolicyInputs {
        node: "node-1",
        resources: Some(&PolicyResources::from_raw(&r1)),
        ..Default::default()
    }));
    assert_eq!(before.chains, after.chains);
    assert_eq!(before.rules_hash(), after.rules_hash());
    assert_ne!(before.sets, after.sets);
    // The counters are declared in the rule part: unchanged, so the table is not replaced
    // and the kernel's counters keep counting.
    assert_eq!(before.counters, after.counters);
    assert!(!before.counters.is_empty());
}

#[test]
fn every_policy_rule_and_default_drop_has_one_counter() {
    use super::render::{CounterLabels, counter_name, rule_counter, tier_counter};
    let spec = render(&fixture_program());
    let rules: Vec<&String> = spec.chains.iter().flat_map(|c| &c.rules).collect();
    // Every declared counter is used by a rule, and every rule in a policy chain, every
    // end-of-tier drop and every endpoint default deny counts into one.
    for name in spec.counters.keys() {
        let used = format!("counter name \"{name}\"");
        assert!(
            rules.iter().any(|r| r.contains(&used)),
            "{name} declared but unused"
        );
    }
    for c in spec.chains.iter() {
        for r in &c.rules {
            let counted = r.contains("counter name \"");
            if c.name.starts_with("pi-") || c.name.starts_with("po-") {
                assert!(counted, "uncounted policy rule in {}: {r}", c.name);
            }
            if r.contains("end of tier") || r.contains("default deny of host endpoint") {
                assert!(counted, "uncounted default drop in {}: {r}", c.name);
            }
        }
    }
    let ssh = rule_counter("gnp/allow-ssh-web", Direction::Ingress, 0);
    assert_eq!(ssh, "gnp/allow-ssh-web/in0");
    assert_eq!(
        spec.counters.get(&ssh),
        Some(&CounterLabels {
            tier: "default".into(),
            policy: "gnp/allow-ssh-web".into(),
            direction: "ingress",
            rule: "0".into(),
            action: "allow",
        })
    );
    // One counter per tier and direction, shared by every endpoint chain with that tier.
    let tier = tier_counter("default", Direction::Ingress);
    assert_eq!(tier, "tier/default/in");
    assert_eq!(spec.counters[&tier].rule, "end-of-tier");
    let uses = rules
        .iter()
        .filter(|r| r.contains(&format!("counter name \"{tier}\"")))
        .count();
    assert!(
        uses >= 2,
        "the tier default is in several endpoint chains: {uses}"
    );
    assert_eq!(
        spec.counters["endpoint-default/in"].rule,
        "endpoint-default"
    );
    // A rule rendered once per family counts into one counter.
    let both: Vec<&&String> = rules
        .iter()
        .filter(|r| r.contains("meta nfproto ipv6") && r.contains("counter name \""))
        .collect();
    for r in both {
        let name = r
            .split("counter name \"")
            .nth(1)
            .and_then(|x| x.split('"').next());
        assert!(
            rules
                .iter()
                .filter(|o| o.contains("meta nfproto ipv4"))
                .any(|o| name.is_some_and(|n| o.contains(n))),
            "{r}"
        );
    }
    // Names are valid nft identifiers and stable.
    assert_eq!(
        counter_name("np/ns-1/my.policy/out3"),
        "np/ns-1/my.policy/out3"
    );
    assert_eq!(counter_name("tier/9lives in"), "tier/9lives_in");
    assert_eq!(counter_name("0abc"), "c-0abc");
    let long = format!("gnp/{}/in0", "a".repeat(300));
    let cut = counter_name(&long);
    assert_eq!(cut.len(), 200);
    assert_eq!(cut, counter_name(&long), "stable");
    assert_ne!(cut, counter_name(&format!("gnp/{}/in1", "a".repeat(300))));
    assert!(
        cut.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_.-".contains(c))
    );
    // The rules hash covers the counter declarations.
    let mut other = spec.clone();
    other
        .counters
        .insert("gnp/x/in0".into(), spec.counters[&ssh].clone());
    assert_ne!(other.rules_hash(), spec.rules_hash());
}

#[test]
fn ipv6_parity() {
    let res = PolicyResources::from_raw(&raw(&[
        hep(
            "h",
            "n1",
            "eth0",
            json!({"role": "peer"}),
            json!(["10.0.0.1", "fd00::1"]),
        ),
        gnp(
            "peers",
            json!({"selector": "all()", "types": ["Ingress"],
            "ingress": [{"action": "Allow", "source": {"selector": "role == 'peer'"}},
                        {"action": "Allow", "protocol": "ICMPv6"},
                        {"action": "Deny", "source": {"nets": ["10.9.0.0/16"]}}]}),
        ),
    ]));
    assert!(res.errors.is_empty(), "{:?}", res.errors);
    let prog = compile(&PolicyInputs {
        node: "n1",
        resources: Some(&res),
        ..Default::default()
    });
    let v = |src: &str, dst: &str, proto| {
        explain(
            &prog,
            &pkt(PacketPath::Input, "eth0", src, dst, proto, Some(80)),
        )
    };
    assert_eq!(v("fd00::1", "fd00::2", Protocol::Tcp).rule, Some(0));
    assert_eq!(v("10.0.0.1", "10.0.0.2", Protocol::Tcp).rule, Some(0));
    assert_eq!(v("fd00::9", "fd00::2", Protocol::IcmpV6).rule, Some(1));
    // The v4-only deny does not apply to IPv6: default deny at the end of the tier instead.
    let d = v("fd00::9", "fd00::2", Protocol::Tcp);
    assert_eq!((d.outcome, d.reason), (Outcome::Drop, Reason::EndOfTier));
    let d = v("10.9.0.1", "10.0.0.2", Protocol::Tcp);
    assert_eq!(
        (d.outcome, d.reason, d.rule),
        (Outcome::Drop, Reason::Rule, Some(2))
    );
    let text = render(&prog).to_nft();
    assert!(
        text.contains("meta nfproto ipv6 ip6 saddr @sel6-"),
        "{text}"
    );
    assert!(text.contains("meta nfproto ipv4 ip saddr @sel4-"), "{text}");
    assert!(text.contains("elements = { fd00::1 }"), "{text}");
}

#[test]
fn shadowed_policies_are_found() {
    let res = PolicyResources::from_raw(&raw(&[
        hep("h", "n1", "eth0", json!({"a": "b"}), json!([])),
        gnp(
            "allow-all",
            json!({"order": 1, "ingress": [{"action": "Log"}, {"action": "Allow"}]}),
        ),
        gnp(
            "later",
            json!({"order": 2, "ingress": [{"action": "Deny", "protocol": "TCP"}]}),
        ),
        gnp(
            "egress-only",
            json!({"order": 3, "egress": [{"action": "Deny"}]}),
        ),
    ]));
    let found = super::analysis::shadowed(&res);
    let ids: Vec<&str> = found.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["gnp/later"]);
    assert!(found[0].1.contains("gnp/allow-all"), "{found:?}");
}

#[test]
fn expected_ip_endpoints_resolve_through_local_addresses() {
    let res = PolicyResources::from_raw(&raw(&[
        (
            Kind::HostEndpoint,
            json!({"metadata": {"name": "a-by-ip"}, "spec": {"node": "n1", "expectedIPs": ["10.0.0.1"]}}),
        ),
        hep("z-by-name", "n1", "eth1", json!({}), json!([])),
    ]));
    assert!(res.errors.is_empty(), "{:?}", res.errors);
    let local = std::collections::BTreeMap::from([
        (
            "eth1".to_string(),
            std::collections::BTreeSet::from(["10.0.0.1".parse::<IpAddr>().expect("ip")]),
        ),
        ("eth2".to_string(), std::collections::BTreeSet::new()),
    ]);
    let prog = compile(&PolicyInputs {
        node: "n1",
        resources: Some(&res),
        local_interfaces: local,
        ..Default::default()
    });
    let owners: Vec<(String, &str)> = prog
        .endpoints
        .iter()
        .map(|e| (e.iface.to_string(), e.hep.as_str()))
        .collect();
    // The smallest name wins; a name match does not beat an IP match.
    assert_eq!(owners, [("eth1".to_string(), "a-by-ip")]);
    let none = compile(&PolicyInputs {
        node: "n1",
        resources: Some(&res),
        ..Default::default()
    });
    assert_eq!(none.endpoints.len(), 1);
    assert_eq!(none.endpoints[0].hep, "z-by-name");
}

// ---------------------------------------------------------------------------------------------
// Named ports

fn hep_ports(
    name: &str,
    node: &str,
    iface: &str,
    labels: Value,
    ips: Value,
    ports: Value,
) -> (Kind, Value) {
    (
        Kind::HostEndpoint,
        json!({"metadata": {"name": name, "labels": labels},
               "spec": {"node": node, "interfaceName": iface, "expectedIPs": ips, "ports": ports}}),
    )
}

#[test]
fn named_port_validation() {
    let port_rule = |ports: Value, proto: Option<&str>| {
        let mut rule = json!({"action": "Allow", "destination": {"ports": ports}});
        if let Some(p) = proto {
            rule["protocol"] = json!(p);
        }
        gnp("a", json!({"ingress": [rule]}))
    };
    // Accepted: names alone need no protocol; names mixed with numbers need one for the numbers.
    let good = [
        port_rule(json!(["http"]), None),
        port_rule(json!(["http", "metrics.v2", "a_b-c"]), None),
        port_rule(json!(["http", 22, "8000:8080"]), Some("TCP")),
        port_rule(json!(["dns"]), Some("UDP")),
        gnp(
            "b",
            json!({"egress": [{"action": "Deny", "source": {"notPorts": ["x"]}}]}),
        ),
        hep_ports(
            "h",
            "n",
            "eth0",
            json!({}),
            json!(["10.0.0.1"]),
            json!([{"name": "http", "protocol": "TCP", "port": 80},
                   {"name": "dns", "protocol": "UDP", "port": 53},
                   {"name": "dns", "protocol": "TCP", "port": 53},
                   {"name": "s", "protocol": "SCTP", "port": 9}, {"name": "n6", "protocol": 6, "port": 1}]),
        ),
    ];
    for obj in &good {
        let res = PolicyResources::from_raw(&raw(std::slice::from_ref(obj)));
        assert!(res.errors.is_empty(), "{}: {:?}", obj.1, res.errors);
    }
    let res = PolicyResources::from_raw(&raw(std::slice::from_ref(&good[2])));
    let d = &res.policies[0].ingress.as_ref().expect("ingress")[0].destination;
    assert_eq!(d.named_ports, ["http"]);
    assert_eq!(d.ports.len(), 2);
    let res = PolicyResources::from_raw(&raw(std::slice::from_ref(&good[5])));
    assert_eq!(res.host_endpoints[0].ports.len(), 5);
    assert_eq!(res.host_endpoints[0].ports[4].protocol, Protocol::Tcp);

    let too_long = "p".repeat(129);
    let bad: Vec<((Kind, Value), &str)> = vec![
        (
            port_rule(json!(["http", 22]), None),
            "spec.ingress[0].destination.ports",
        ),
        (
            port_rule(json!(["ht tp"]), None),
            "spec.ingress[0].destination.ports[0]",
        ),
        (
            port_rule(json!([too_long]), None),
            "spec.ingress[0].destination.ports[0]",
        ),
        (
            port_rule(json!(["ok", "70000"]), Some("TCP")),
            "spec.ingress[0].destination.ports[1]",
        ),
        (
            hep_ports(
                "h",
                "n",
                "eth0",
                json!({}),
                json!([]),
                json!([{"name": "http", "protocol": "ICMP", "port": 80}]),
            ),
            "spec.ports[0].protocol",
        ),
        (
            hep_ports(
                "h",
                "n",
                "eth0",
                json!({}),
                json!([]),
                json!([{"name": "http", "protocol": "tcp", "port": 80}]),
            ),
            "spec.ports[0].protocol",
        ),
        (
            hep_ports(
                "h",
                "n",
                "eth0",
                json!({}),
                json!([]),
                json!([{"name": "http", "port": 80}]),
            ),
            "spec.ports[0].protocol",
        ),
        (
            hep_ports(
                "h",
                "n",
                "eth0",
                json!({}),
                json!([]),
                json!([{"name": "ok", "protocol": "TCP", "port": 1}, {"name": "http", "protocol": "TCP", "port": 0}]),
            ),
            "spec.ports[1].port",
        ),
        (
            hep_ports(
                "h",
                "n",
                "eth0",
                json!({}),
                json!([]),
                json!([{"name": "http", "protocol": "TCP", "port": 65536}]),
            ),
            "spec.ports[0].port",
        ),
        (
            hep_ports(
                "h",
                "n",
                "eth0",
                json!({}),
                json!([]),
                json!([{"name": "", "protocol": "TCP", "port": 80}]),
            ),
            "spec.ports[0].name",
        ),
        (
            hep_ports(
                "h",
                "n",
                "eth0",
                json!({}),
                json!([]),
                json!([{"name": "a/b", "protocol": "TCP", "port": 80}]),
            ),
            "spec.ports[0].name",
        ),
        (
            hep_ports(
                "h",
                "n",
                "eth0",
                json!({}),
                json!([]),
                json!([{"name": "a", "protocol": "TCP", "port": 80, "hostPort": 1}]),
            ),
            "spec.ports[0].hostPort",
        ),
    ];
    for ((kind, v), field) in bad {
        let msg = one_error(&[(kind, v.clone())]);
        assert!(
            msg.contains(&format!(": {field}: ")),
            "{v}: expected field {field} in {msg}"
        );
    }
}

/// node-1 serves `http` (TCP 8080) and `dns` (UDP and TCP 53) on eth0; node-2 serves `http` on
/// TCP 80. One policy allows the named ports of web servers, one denies a named source port.
fn named_port_fixture() -> RawPolicyResources {
    raw(&[
        hep_ports(
            "node-1-eth0",
            "node-1",
            "eth0",
            json!({"role": "web"}),
            json!(["10.0.0.1", "fd00::1"]),
            json!([{"name": "http", "protocol": "TCP", "port": 8080},
                   {"name": "dns", "protocol": "UDP", "port": 53},
                   {"name": "dns", "protocol": "TCP", "port": 53}]),
        ),
        hep_ports(
            "node-2-eth0",
            "node-2",
            "eth0",
            json!({"role": "db"}),
            json!(["10.0.0.2"]),
            json!([{"name": "http", "protocol": "TCP", "port": 80},
                   {"name": "metrics", "protocol": "TCP", "port": 9100}]),
        ),
        gnp(
            "named",
            json!({"order": 10, "selector": "all()", "types": ["Ingress"],
            "ingress": [
                {"action": "Deny", "source": {"selector": "role == 'db'", "ports": ["metrics"]}},
                {"action": "Log", "protocol": "TCP", "destination": {"ports": ["http", 443]}},
                {"action": "Allow", "protocol": "TCP", "destination": {"selector": "role == 'web'", "ports": ["http", 443]}},
                {"action": "Allow", "destination": {"ports": ["dns"], "notPorts": [53]}, "protocol": "UDP"},
                {"action": "Allow", "destination": {"ports": ["dns"]}},
                {"action": "Allow", "protocol": "UDP", "destination": {"notPorts": ["dns", "http"], "nets": ["10.0.0.0/24"]}}
            ]}),
        ),
    ])
}

fn named_port_program() -> super::Program {
    let res = PolicyResources::from_raw(&named_port_fixture());
    assert!(res.errors.is_empty(), "{:?}", res.errors);
    compile(&PolicyInputs {
        node: "node-1",
        resources: Some(&res),
        ..Default::default()
    })
}

#[test]
fn named_port_sets_hold_matching_endpoint_ports() {
    let prog = named_port_program();
    // (selector, protocol, names, v4 elements, v6 elements)
    type Summary<'a> = (&'a str, Option<u8>, Vec<&'a str>, usize, usize);
    let sets: Vec<Summary> = prog
        .named_port_sets
        .values()
        .map(|s| {
            (
                s.selector.as_str(),
                s.protocol,
                s.names.iter().map(String::as_str).collect(),
                s.v4.len(),
                s.v6.len(),
            )
        })
        .collect();
    let has = |sel: &str, proto: Option<u8>, names: &[&str], v4: usize, v6: usize| {
        assert!(
            sets.contains(&(sel, proto, names.to_vec(), v4, v6)),
            "{sel} {proto:?} {names:?} {v4} {v6} not in {sets:?}"
        );
    };
    // Source `metrics` of db endpoints, any protocol.
    has(r#"role == "db""#, None, &["metrics"], 1, 0);
    // No selector: every endpoint's `http` on TCP (node-2's included).
    has("all()", Some(6), &["http"], 2, 1);
    has(r#"role == "web""#, Some(6), &["http"], 1, 1);
    // `dns` with UDP: UDP 53 only; without a protocol: both.
    has("all()", Some(17), &["dns"], 1, 1);
    has("all()", None, &["dns"], 2, 2);
    has("all()", Some(17), &["dns", "http"], 1, 1);
    assert_eq!(sets.len(), 6);
}

#[test]
fn explain_named_ports() {
    use PacketPath::Input;
    use Protocol::{Icmp, Tcp, Udp};
    let prog = named_port_program();
    // (src, dst, protocol, sport, dport) -> (outcome, rule, logged)
    type Case<'a> = (
        &'a str,
        &'a str,
        Protocol,
        u16,
        Option<u16>,
        Outcome,
        Option<usize>,
        usize,
    );
    let cases: Vec<Case> = vec![
        // The db's metrics port as source: denied.
        (
            "10.0.0.2",
            "10.0.0.1",
            Tcp,
            9100,
            Some(5000),
            Outcome::Drop,
            Some(0),
            0,
        ),
        // ... but only from the db endpoint's address.
        (
            "10.0.0.9",
            "10.0.0.1",
            Tcp,
            9100,
            Some(5000),
            Outcome::Drop,
            None,
            0,
        ),
        // `http` on the web endpoint (TCP 8080): logged once, then allowed by rule 2.
        (
            "10.9.0.1",
            "10.0.0.1",
            Tcp,
            40000,
            Some(8080),
            Outcome::Accept,
            Some(2),
            1,
        ),
        // A named port's protocol counts even when the rule has none: metrics is TCP.
        (
            "10.0.0.2",
            "10.0.0.1",
            Udp,
            9100,
            Some(5000),
            Outcome::Accept,
            Some(5),
            0,
        ),
        (
            "fd00::9",
            "fd00::1",
            Tcp,
            40000,
            Some(8080),
            Outcome::Accept,
            Some(2),
            1,
        ),
        // Numeric 443 OR-ed with the name.
        (
            "10.9.0.1",
            "10.0.0.1",
            Tcp,
            40000,
            Some(443),
            Outcome::Accept,
            Some(2),
            1,
        ),
        // Port 80 is `http` only on node-2's address, which rule 2's selector excludes.
        (
            "10.9.0.1",
            "10.0.0.1",
            Tcp,
            40000,
            Some(80),
            Outcome::Drop,
            None,
            0,
        ),
        (
            "10.9.0.1",
            "10.0.0.2",
            Tcp,
            40000,
            Some(80),
            Outcome::Drop,
            None,
            1,
        ),
        // UDP `dns` but notPorts 53: rule 3 excluded; rule 4 (any protocol) allows.
        (
            "10.9.0.1",
            "10.0.0.1",
            Udp,
            40000,
            Some(53),
            Outcome::Accept,
            Some(4),
            0,
        ),
        // TCP 53 is `dns` too when the rule has no protocol.
        (
            "10.9.0.1",
            "10.0.0.1",
            Tcp,
            40000,
            Some(53),
            Outcome::Accept,
            Some(4),
            0,
        ),
        // UDP 8080 is not `http` (a TCP port): rule 5 (notPorts dns/http on UDP) allows.
        (
            "10.9.0.1",
            "10.0.0.1",
            Udp,
            40000,
            Some(8080),
            Outcome::Accept,
            Some(5),
            0,
        ),
        // ICMP has no port: no named port matches.
        (
            "10.9.0.1",
            "10.0.0.1",
            Icmp,
            0,
            None,
            Outcome::Drop,
            None,
            0,
        ),
    ];
    for (src, dst, proto, sport, dport, outcome, rule, logged) in cases {
        let mut p = pkt(Input, "eth0", src, dst, proto, dport);
        p.sport = (proto != Icmp).then_some(sport);
        let v = explain(&prog, &p);
        assert_eq!(
            (v.outcome, v.rule, v.logged.len()),
            (outcome, rule, logged),
            "{src} -> {dst} {proto:?} {sport} {dport:?}: {v}"
        );
    }
}

#[test]
fn snapshot_named_ports() {
    let text = render(&named_port_program()).to_nft();
    check_snapshot("policy_named_ports.nft", &text);
    // Numeric OR named, as two disjoint copies of the rule.
    assert!(
        text.contains("th dport 443 counter name \"gnp/named/in2\" meta mark"),
        "{text}"
    );
    assert!(
        text.contains("th dport != 443 ip daddr . meta l4proto . th dport @np4-"),
        "{text}"
    );
    assert!(
        text.contains("type ipv4_addr . inet_proto . inet_service"),
        "{text}"
    );
    assert!(text.contains("10.0.0.1 . tcp . 8080"), "{text}");
    assert!(
        text.contains("ip daddr . meta l4proto . th dport != @np4-"),
        "{text}"
    );
    assert!(
        text.contains("ip6 saddr . meta l4proto . th sport @np6-"),
        "{text}"
    );
}

#[test]
fn endpoint_port_change_touches_no_rule() {
    let render_with = |http: u16, ips: Value| {
        let mut r = named_port_fixture();
        r.insert(
            Kind::HostEndpoint,
            "node-2-eth0".into(),
            json!({"metadata": {"name": "node-2-eth0", "labels": {"role": "db"}},
                   "spec": {"node": "node-2", "interfaceName": "eth0", "expectedIPs": ips,
                            "ports": [{"name": "http", "protocol": "TCP", "port": http}]}}),
        );
        let res = PolicyResources::from_raw(&r);
        assert!(res.errors.is_empty(), "{:?}", res.errors);
        render(&compile(&PolicyInputs {
            node: "node-1",
            resources: Some(&res),
            ..Default::default()
        }))
    };
    let before = render_with(80, json!(["10.0.0.2"]));
    for after in [
        render_with(81, json!(["10.0.0.2"])),
        render_with(80, json!(["10.0.0.2", "10.0.0.3", "fd00::2"])),
    ] {
        assert_eq!(before.chains, after.chains);
        assert_eq!(before.rules_hash(), after.rules_hash());
        assert_ne!(before.sets, after.sets);
    }
}

// ---------------------------------------------------------------------------------------------
// `policy unused`: unreachable tiers

fn tier(name: &str, order: f64, default_action: &str) -> (Kind, Value) {
    (
        Kind::Tier,
        json!({"metadata": {"name": name}, "spec": {"order": order, "defaultAction": default_action}}),
    )
}

#[test]
fn unreachable_tiers_are_found() {
    let base = |first_rules: Value, first_selector: &str, first_default: &str| {
        raw(&[
            hep("h1", "n1", "eth0", json!({"a": "1"}), json!([])),
            hep("h2", "n1", "eth1", json!({"a": "2"}), json!([])),
            tier("first", 10.0, first_default),
            tier("second", 20.0, "Deny"),
            gnp(
                "gate",
                json!({"tier": "first", "selector": first_selector, "types": ["Ingress"], "ingress": first_rules}),
            ),
            gnp(
                "later",
                json!({"tier": "second", "selector": "a == '1'", "types": ["Ingress"],
                       "ingress": [{"action": "Allow", "protocol": "TCP"}]}),
            ),
            gnp(
                "later-egress",
                json!({"tier": "second", "selector": "a == '1'", "types": ["Egress"],
                       "egress": [{"action": "Allow"}]}),
            ),
            gnp(
                "later-both",
                json!({"tier": "second", "selector": "has(a)", "types": ["Ingress"],
                       "ingress": [{"action": "Allow"}]}),
            ),
        ])
    };
    let ids = |r: &RawPolicyResources| -> Vec<String> {
        let res = PolicyResources::from_raw(r);
        assert!(res.errors.is_empty(), "{:?}", res.errors);
        super::analysis::unreachable_tiers(&res)
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    };
    let allow_tcp = json!([{"action": "Log"}, {"action": "Allow", "protocol": "TCP"}]);
    // `first` decides every ingress packet of h1: `later` is unreachable. `later-egress` is
    // another direction; `later-both` is still reached through h2.
    let found = ids(&base(allow_tcp.clone(), "a == '1'", "Deny"));
    assert_eq!(found, ["gnp/later"]);
    let res = PolicyResources::from_raw(&base(allow_tcp.clone(), "a == '1'", "Deny"));
    let why = &super::analysis::unreachable_tiers(&res)[0].1;
    assert!(why.contains("\"first\"") && why.contains("h1"), "{why}");
    // Selecting both endpoints makes `later-both` unreachable too.
    assert_eq!(
        ids(&base(allow_tcp.clone(), "has(a)", "Deny")),
        ["gnp/later", "gnp/later-both"]
    );
    // A Pass rule, however narrow, keeps the later tier reachable.
    let with_pass = json!([{"action": "Pass", "protocol": "UDP", "destination": {"ports": [53]}},
                           {"action": "Allow", "protocol": "TCP"}]);
    assert!(ids(&base(with_pass, "has(a)", "Deny")).is_empty());
    // So does a tier whose default action is Pass.
    assert!(ids(&base(allow_tcp.clone(), "has(a)", "Pass")).is_empty());
    // A policy with no rules is a deny for its tier: still ends it.
    assert_eq!(ids(&base(json!([]), "a == '1'", "Deny")), ["gnp/later"]);
}

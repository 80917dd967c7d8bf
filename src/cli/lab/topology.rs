//! Namespaces, links and routes of the lab: a hub with the underlay bridge, nodes on it, one
//! pod behind each node.

use wiremesh_core::model::Family;

use super::sys::{ip, run};
use super::{HUB_ADDRESS, HUB_ADDRESS_V6, IpFamily, LabError, NodeState};

const BRIDGE: &str = "br0";

fn sysctl(ns: &str, settings: &[&str]) -> Result<(), LabError> {
    let mut args = vec!["netns", "exec", ns, "sysctl", "-qw"];
    args.extend_from_slice(settings);
    run("setting sysctls", ns, "ip", &args)?;
    Ok(())
}

fn add_netns(ns: &str) -> Result<(), LabError> {
    ip("creating namespace", ns, &format!("netns add {ns}"))?;
    ip(
        "bringing up loopback",
        ns,
        &format!("-n {ns} link set lo up"),
    )?;
    Ok(())
}

/// `addr add` for an IPv6 address without duplicate address detection: the lab's addresses are
/// unique by construction, and DAD would leave them unusable ("tentative") for a second or two.
fn add_address6(step: &str, ns: &str, address: &str, dev: &str) -> Result<(), LabError> {
    ip(
        step,
        ns,
        &format!("-n {ns} -6 addr add {address} dev {dev} nodad"),
    )?;
    Ok(())
}

/// The hub: a namespace holding the underlay bridge (and, later, etcd).
pub fn create_hub(hub: &str, family: IpFamily) -> Result<(), LabError> {
    add_netns(hub)?;
    ip(
        "creating bridge",
        hub,
        &format!("-n {hub} link add {BRIDGE} type bridge"),
    )?;
    ip(
        "addressing bridge",
        hub,
        &format!("-n {hub} addr add {HUB_ADDRESS}/24 dev {BRIDGE}"),
    )?;
    if family.has(Family::V6) {
        add_address6(
            "addressing bridge",
            hub,
            &format!("{HUB_ADDRESS_V6}/64"),
            BRIDGE,
        )?;
    }
    ip(
        "bringing up bridge",
        hub,
        &format!("-n {hub} link set {BRIDGE} up"),
    )?;
    Ok(())
}

/// Node namespace with `eth0` on the bridge, and its pod namespace behind `veth-pod`, routed
/// by the node as a CNI plugin would (so pod traffic is forwarded, not local, on the node).
/// The underlay always has IPv4 (etcd is reached over it); pods get the lab's families.
pub fn create_node(hub: &str, node: &NodeState, family: IpFamily) -> Result<(), LabError> {
    let (ns, pod, i) = (node.netns.as_str(), node.pod_netns.as_str(), node.index);
    add_netns(ns)?;
    // Loose reverse-path checks: replies to pods come back over wireguard.cali while the main
    // table points at eth0; new links inherit `default`.
    sysctl(
        ns,
        &[
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv6.conf.all.forwarding=1",
        ],
    )?;
    let uplink = format!("vn{i}");
    ip(
        "creating underlay veth",
        ns,
        &format!(
            "link add eth0 mtu 1500 netns {ns} type veth peer name {uplink} mtu 1500 netns {hub}"
        ),
    )?;
    ip(
        "attaching to bridge",
        &uplink,
        &format!("-n {hub} link set {uplink} master {BRIDGE} up"),
    )?;
    ip(
        "addressing eth0",
        ns,
        &format!("-n {ns} addr add {}/24 dev eth0", node.underlay_ip),
    )?;
    if let Some(v6) = &node.ipv6 {
        add_address6(
            "addressing eth0",
            ns,
            &format!("{}/64", v6.underlay_ip),
            "eth0",
        )?;
    }
    ip("bringing up eth0", ns, &format!("-n {ns} link set eth0 up"))?;

    add_netns(pod)?;
    ip(
        "creating pod veth",
        pod,
        &format!("link add veth-pod netns {ns} type veth peer name eth0 netns {pod}"),
    )?;
    sysctl(
        ns,
        &[
            "net.ipv4.conf.eth0.rp_filter=0",
            "net.ipv4.conf.veth-pod.rp_filter=0",
        ],
    )?;
    if family.has(Family::V4) {
        let gateway = node.gateway_ip;
        let prefix = node.pod_cidr.prefix_len();
        ip(
            "addressing veth-pod",
            ns,
            &format!("-n {ns} addr add {gateway}/{prefix} dev veth-pod"),
        )?;
        ip(
            "addressing pod",
            pod,
            &format!("-n {pod} addr add {}/{prefix} dev eth0", node.pod_ip),
        )?;
    }
    if let Some(v6) = node.ipv6.as_ref().filter(|_| family.has(Family::V6)) {
        let prefix = v6.pod_cidr.prefix_len();
        add_address6(
            "addressing veth-pod",
            ns,
            &format!("{}/{prefix}", v6.gateway_ip),
            "veth-pod",
        )?;
        add_address6(
            "addressing pod",
            pod,
            &format!("{}/{prefix}", v6.pod_ip),
            "eth0",
        )?;
    }
    ip(
        "bringing up veth-pod",
        ns,
        &format!("-n {ns} link set veth-pod up"),
    )?;
    ip(
        "bringing up pod eth0",
        pod,
        &format!("-n {pod} link set eth0 up"),
    )?;
    if family.has(Family::V4) {
        ip(
            "routing pod",
            pod,
            &format!(
                "-n {pod} route add default via {} dev eth0",
                node.gateway_ip
            ),
        )?;
    }
    if let Some(v6) = node.ipv6.as_ref().filter(|_| family.has(Family::V6)) {
        ip(
            "routing pod",
            pod,
            &format!(
                "-n {pod} -6 route add default via {} dev eth0",
                v6.gateway_ip
            ),
        )?;
    }
    Ok(())
}

/// (pod CIDR, underlay address of the node that has it) for each of the lab's families.
fn pod_paths(to: &NodeState, family: IpFamily) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if family.has(Family::V4) {
        out.push((to.pod_cidr.to_string(), to.underlay_ip.to_string()));
    }
    if let Some(v6) = to.ipv6.as_ref().filter(|_| family.has(Family::V6)) {
        out.push((v6.pod_cidr.to_string(), v6.underlay_ip.to_string()));
    }
    out
}

/// The clear-text path to `to`'s pod CIDRs on `from`, via `to`'s underlay addresses;
/// WireGuard's policy routing overrides it when encryption is on.
pub fn add_pod_route(from: &NodeState, to: &NodeState, family: IpFamily) -> Result<(), LabError> {
    for (cidr, via) in pod_paths(to, family) {
        ip(
            "adding pod route",
            &from.netns,
            &format!("-n {} route replace {cidr} via {via} dev eth0", from.netns),
        )?;
    }
    Ok(())
}

pub fn delete_pod_route(
    from: &NodeState,
    to: &NodeState,
    family: IpFamily,
) -> Result<(), LabError> {
    for (cidr, via) in pod_paths(to, family) {
        ip(
            "deleting pod route",
            &from.netns,
            &format!("-n {} route del {cidr} via {via} dev eth0", from.netns),
        )?;
    }
    Ok(())
}

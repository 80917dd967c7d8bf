//! Namespaces, links and routes of the lab: a hub with the underlay bridge, nodes on it, one
//! pod behind each node.

use super::sys::{ip, run};
use super::{HUB_ADDRESS, LabError, NodeState};

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

/// The hub: a namespace holding the underlay bridge (and, later, etcd).
pub fn create_hub(hub: &str) -> Result<(), LabError> {
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
    ip(
        "bringing up bridge",
        hub,
        &format!("-n {hub} link set {BRIDGE} up"),
    )?;
    Ok(())
}

/// Node namespace with `eth0` on the bridge, and its pod namespace behind `veth-pod`, routed
/// by the node as a CNI plugin would (so pod traffic is forwarded, not local, on the node).
pub fn create_node(hub: &str, node: &NodeState) -> Result<(), LabError> {
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
    let gateway = node.gateway_ip;
    let prefix = node.pod_cidr.prefix_len();
    ip(
        "addressing veth-pod",
        ns,
        &format!("-n {ns} addr add {gateway}/{prefix} dev veth-pod"),
    )?;
    ip(
        "bringing up veth-pod",
        ns,
        &format!("-n {ns} link set veth-pod up"),
    )?;
    ip(
        "addressing pod",
        pod,
        &format!("-n {pod} addr add {}/{prefix} dev eth0", node.pod_ip),
    )?;
    ip(
        "bringing up pod eth0",
        pod,
        &format!("-n {pod} link set eth0 up"),
    )?;
    ip(
        "routing pod",
        pod,
        &format!("-n {pod} route add default via {gateway} dev eth0"),
    )?;
    Ok(())
}

/// The clear-text path to `to`'s pod CIDR on `from`, via `to`'s underlay address; WireGuard's
/// policy routing overrides it when encryption is on.
pub fn add_pod_route(from: &NodeState, to: &NodeState) -> Result<(), LabError> {
    ip(
        "adding pod route",
        &from.netns,
        &format!(
            "-n {} route replace {} via {} dev eth0",
            from.netns, to.pod_cidr, to.underlay_ip
        ),
    )?;
    Ok(())
}

pub fn delete_pod_route(from: &NodeState, to: &NodeState) -> Result<(), LabError> {
    ip(
        "deleting pod route",
        &from.netns,
        &format!(
            "-n {} route del {} via {} dev eth0",
            from.netns, to.pod_cidr, to.underlay_ip
        ),
    )?;
    Ok(())
}

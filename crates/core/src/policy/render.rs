//! Rendering a [`Program`] into a [`FilterSpec`] (pure data: sets with elements, chains with
//! rule text) and that into `nft -f` input for our one table, `inet wiremesh`.
//!
//! Layout (docs/policy.md has the full picture):
//! - base chains `raw-prerouting`/`raw-output` (priority raw, doNotTrack), `mangle-prerouting`
//!   (priority mangle, preDNAT), `filter-input`/`filter-output`/`filter-forward` (priority
//!   filter: normal policy and applyOnForward);
//! - dispatch chains `<hook>-from-hep`/`<hook>-to-hep` (interface -> endpoint chain, `"*"`
//!   last, workload interfaces excluded);
//! - endpoint chains `<hook>-fh-<iface>`/`<hook>-th-<iface>` (conntrack, failsafe, tiers);
//! - policy chains `pi-<id>`/`po-<id>` shared by every endpoint, referring to named sets
//!   `sel4-<selector id>`/`sel6-<selector id>`, so a set change never rewrites a rule;
//! - an empty chain `hash-<hex>` whose name carries a hash of the rule part (everything but set
//!   elements), so that an observer can tell "only elements changed" from "rules changed";
//! - for the node's pods: dispatch chains `wl-from-dispatch`/`wl-to-dispatch` (a verdict map
//!   keyed by the host-side interface, then drop: an unknown workload interface gets nothing)
//!   and `wl-from-addr-dispatch`/`wl-to-addr-dispatch` (verdict maps keyed by the pod's
//!   address, for interfaces without a workload prefix), pod chains `fw-<ns>/<pod>` (egress:
//!   from the pod) and `tw-<ns>/<pod>` (ingress: to the pod) with tiers then profiles, and
//!   `wl-to-host` (a pod's traffic to its own host);
//! - named counters, one per policy rule (`<policy id>/<in|out><index>`), per tier default
//!   (`tier/<tier>/<in|out>`) and for the host endpoints' default deny
//!   (`endpoint-default/<in|out>`): a rule rendered into several chains (both families, every
//!   endpoint) counts into one counter. [`FilterSpec::counters`] maps each name to the labels of
//!   the `wiremesh_policy_rule_*` metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::model::{Action, Direction, Entity, PortRange, Protocol, Rule, TierDefault};
use super::program::{
    EndpointProgram, EndpointToHostAction, FailsafePort, Hook, Iface, Program, TierProgram,
    WorkloadProgram, named_port_set_id, rule_families,
};
use crate::model::Family;
use crate::selector::Selector;

/// Our table: `inet wiremesh`.
pub const TABLE: &str = "wiremesh";
pub const TABLE_FAMILY: &str = "inet";

/// Mark bit: "accepted by an earlier stage / by a policy" (Felix's Accept bit).
pub const MARK_ACCEPT: u32 = 0x0001_0000;
/// Mark bit: "a Pass rule matched; skip the rest of this tier" (Felix's Pass bit).
pub const MARK_PASS: u32 = 0x0002_0000;

/// Set element as nft prints it: `10.0.0.1` for a host, `10.0.0.0/24` otherwise.
pub fn element_text(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// Element `address . protocol . port` of a named-port set, as nft prints it
/// (`10.0.0.1 . tcp . 22`).
pub fn named_port_element_text(addr: IpAddr, protocol: u8, port: u16) -> String {
    format!(
        "{addr} . {} . {port}",
        proto_text(Protocol::from_number(protocol))
    )
}

/// What a set holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum SetKind {
    /// Addresses and prefixes (`ipv4_addr`, `flags interval`): selector sets.
    #[default]
    Addr,
    /// `address . inet_proto . inet_service`: named-port sets.
    NamedPort,
    /// Addresses and prefixes whose elements may expire (`flags interval, timeout`): the
    /// encryption guard's shutdown hold.
    TimedAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SetSpec {
    pub family: Family,
    pub kind: SetKind,
    /// Canonical selector, for humans.
    pub comment: String,
    pub elements: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BaseHook {
    /// `prerouting`, `input`, `forward`, `output`.
    pub hook: &'static str,
    /// `raw`, `mangle`, `filter`.
    pub priority: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainSpec {
    pub name: String,
    pub base: Option<BaseHook>,
    pub rules: Vec<String>,
}

/// What one named counter counts: the labels of its metric series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct CounterLabels {
    /// Tier name; empty for the host endpoints' default deny.
    pub tier: String,
    /// Policy ID (`gnp/<name>`, `np/<namespace>/<name>`); empty for tier and endpoint defaults.
    pub policy: String,
    /// `ingress` or `egress`.
    pub direction: &'static str,
    /// Rule index in the policy's rule list for that direction, `end-of-tier` or
    /// `endpoint-default`.
    pub rule: String,
    /// `allow`, `deny`, `pass` or `log`.
    pub action: &'static str,
}

/// What a verdict map is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MapKey {
    /// Interface name (`ifname`).
    Interface,
    Addr(Family),
}

/// A verdict map: key (as nft prints it: `"cali1234"`, `10.0.0.5`) -> chain to go to.
/// Its elements are part of the rule part (they name chains).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapSpec {
    pub key: MapKey,
    pub comment: String,
    pub elements: BTreeMap<String, String>,
}

/// The table as pure data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct FilterSpec {
    pub sets: BTreeMap<String, SetSpec>,
    /// Verdict maps (pod dispatch).
    pub maps: BTreeMap<String, MapSpec>,
    /// Named counters (`counter <name> {}` in the table, `counter name "<name>"` in rules).
    pub counters: BTreeMap<String, CounterLabels>,
    /// Named counters of the encryption guard (`crate::guard`), not of a policy rule.
    pub guard_counters: BTreeSet<String>,
    pub chains: Vec<ChainSpec>,
}

impl FilterSpec {
    /// Hash of everything but set elements (set names and types, chains, rules).
    pub fn rules_hash(&self) -> String {
        let mut h = Sha256::new();
        for (name, s) in &self.sets {
            match s.kind {
                SetKind::Addr => h.update(format!("set {name} {:?}\n", s.family)),
                SetKind::NamedPort | SetKind::TimedAddr => {
                    h.update(format!("set {name} {:?} {:?}\n", s.family, s.kind))
                }
            }
        }
        for (name, m) in &self.maps {
            h.update(format!("map {name} {:?}\n", m.key));
            for (k, v) in &m.elements {
                h.update(format!("{k} : {v}\n"));
            }
        }
        for name in self.counters.keys().chain(&self.guard_counters) {
            h.update(format!("counter {name}\n"));
        }
        for c in self.chains.iter().filter(|c| !c.name.starts_with("hash-")) {
            h.update(format!("chain {} {:?}\n", c.name, c.base));
            for r in &c.rules {
                h.update(r.as_bytes());
                h.update(b"\n");
            }
        }
        h.finalize()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The marker chain's name.
    fn hash_chain(&self) -> String {
        format!("hash-{}", self.rules_hash())
    }

    /// The `nft -f` text defining the whole table (without delete/flush).
    pub fn to_nft(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "table {TABLE_FAMILY} {TABLE} {{");
        for (name, s) in &self.sets {
            let _ = writeln!(out, "\tset {name} {{");
            for line in set_lines(s) {
                let _ = writeln!(out, "\t\t{line}");
            }
            let _ = writeln!(out, "\t}}");
        }
        for (name, m) in &self.maps {
            let _ = writeln!(out, "\tmap {name} {{");
            for line in map_lines(m) {
                let _ = writeln!(out, "\t\t{line}");
            }
            let _ = writeln!(out, "\t}}");
        }
        for name in self.counters.keys().chain(&self.guard_counters) {
            let _ = writeln!(out, "\tcounter {name} {{");
            let _ = writeln!(out, "\t}}");
        }
        let _ = writeln!(out, "\tchain {} {{", self.hash_chain());
        let _ = writeln!(out, "\t}}");
        for c in &self.chains {
            let _ = writeln!(out, "\tchain {} {{", c.name);
            if let Some(b) = &c.base {
                let _ = writeln!(
                    out,
                    "\t\ttype filter hook {} priority {}; policy accept;",
                    b.hook, b.priority
                );
            }
            for r in &c.rules {
                let _ = writeln!(out, "\t\t{r}");
            }
            let _ = writeln!(out, "\t}}");
        }
        out.push_str("}\n");
        out
    }

    /// One atomic transaction replacing our table (creates it if absent).
    pub fn replace_script(&self) -> String {
        format!(
            "add table {TABLE_FAMILY} {TABLE}\ndelete table {TABLE_FAMILY} {TABLE}\n{}",
            self.to_nft()
        )
    }
}

/// The lines of a set's declaration (type, flags, comment, elements).
fn set_lines(s: &SetSpec) -> Vec<String> {
    let ty = match s.family {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    };
    let mut lines = match s.kind {
        SetKind::Addr => vec![format!("type {ty}"), "flags interval".to_string()],
        SetKind::NamedPort => vec![format!("type {ty} . inet_proto . inet_service")],
        SetKind::TimedAddr => vec![format!("type {ty}"), "flags interval, timeout".to_string()],
    };
    lines.push(format!("comment {}", quote(&s.comment)));
    if !s.elements.is_empty() {
        let elems: Vec<&str> = s.elements.iter().map(String::as_str).collect();
        lines.push(format!("elements = {{ {} }}", elems.join(", ")));
    }
    lines
}

/// The lines of a verdict map's declaration.
fn map_lines(m: &MapSpec) -> Vec<String> {
    let key = match m.key {
        MapKey::Interface => "ifname",
        MapKey::Addr(Family::V4) => "ipv4_addr",
        MapKey::Addr(Family::V6) => "ipv6_addr",
    };
    let mut lines = vec![
        format!("type {key} : verdict"),
        format!("comment {}", quote(&m.comment)),
    ];
    if !m.elements.is_empty() {
        let elems: Vec<String> = m
            .elements
            .iter()
            .map(|(k, chain)| format!("{k} : goto {chain}"))
            .collect();
        lines.push(format!("elements = {{ {} }}", elems.join(", ")));
    }
    lines
}

/// `{ type ...; flags ...; comment ...; elements = ... }`, for `add set`.
pub fn set_declaration(s: &SetSpec) -> String {
    format!("{{ {}; }}", set_lines(s).join("; "))
}

/// `{ type ... : verdict; comment ...; }`, for `add map`.
pub fn map_declaration(m: &MapSpec) -> String {
    format!("{{ {}; }}", map_lines(m).join("; "))
}

/// `nft -f` commands for one chain of our table: declare it (`rules == false`; a base chain
/// with its hook), or write it whole (`rules == true`: flush, then add each rule).
pub fn chain_script(c: &ChainSpec, rules: bool) -> String {
    let t = format!("{TABLE_FAMILY} {TABLE}");
    if !rules {
        return match &c.base {
            Some(b) => format!(
                "add chain {t} {} {{ type filter hook {} priority {}; policy accept; }}\n",
                c.name, b.hook, b.priority
            ),
            None => format!("add chain {t} {}\n", c.name),
        };
    }
    let mut out = format!("flush chain {t} {}\n", c.name);
    for r in &c.rules {
        let _ = writeln!(out, "add rule {t} {} {r}", c.name);
    }
    out
}

/// Removes our table (a no-op if absent), as one transaction.
pub fn delete_script() -> String {
    format!("add table {TABLE_FAMILY} {TABLE}\ndelete table {TABLE_FAMILY} {TABLE}\n")
}

/// nft string literal. Names we render are DNS labels, so quotes never need escaping; any
/// other character outside `[A-Za-z0-9 ._/:=|-]` is replaced to keep the script well formed.
fn quote(s: &str) -> String {
    let clean: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " ._/:=|-()!&,{}'".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("\"{clean}\"")
}

pub fn set_name(sel: &Selector, family: Family) -> String {
    let id = sel.unique_id();
    let id = id.strip_prefix("s:").unwrap_or(&id);
    match family {
        Family::V4 => format!("sel4-{id}"),
        Family::V6 => format!("sel6-{id}"),
    }
}

/// Name of a named-port set (`np4-`/`np6-` and the ID without its `n:`).
fn named_port_set_name(id: &str, family: Family) -> String {
    let id = id.strip_prefix("n:").unwrap_or(id);
    match family {
        Family::V4 => format!("np4-{id}"),
        Family::V6 => format!("np6-{id}"),
    }
}

fn mark_is(bit: u32) -> String {
    format!("meta mark & {bit:#010x} == {bit:#010x}")
}

fn mark_clear(bit: u32) -> String {
    format!("meta mark & {bit:#010x} == 0x00000000")
}

fn clear_marks(bits: u32) -> String {
    format!("meta mark set meta mark & {:#010x}", !bits)
}

fn iface_chain_part(iface: &Iface) -> String {
    match iface {
        Iface::Named(n) => n.clone(),
        Iface::Any => "any-interface-at-all".into(),
    }
}

/// Name of an endpoint chain.
fn endpoint_chain(hook: Hook, dir: Direction, iface: &Iface) -> String {
    let d = match dir {
        Direction::Ingress => "fh",
        Direction::Egress => "th",
    };
    format!("{}-{d}-{}", hook.short(), iface_chain_part(iface))
}

/// Name of a policy chain.
fn policy_chain(id: &str, dir: Direction) -> String {
    match dir {
        Direction::Ingress => format!("pi-{id}"),
        Direction::Egress => format!("po-{id}"),
    }
}

fn dir_short(dir: Direction) -> &'static str {
    match dir {
        Direction::Ingress => "in",
        Direction::Egress => "out",
    }
}

fn dir_label(dir: Direction) -> &'static str {
    match dir {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

fn action_label(action: Action) -> &'static str {
    match action {
        Action::Allow => "allow",
        Action::Deny => "deny",
        Action::Log => "log",
        Action::Pass => "pass",
    }
}

/// The longest counter name we render; nft object names are limited to 255 bytes.
const COUNTER_NAME_MAX: usize = 200;

/// A valid, stable nft object name for `raw`: characters outside `[A-Za-z0-9/_.-]` become `_`
/// (Kubernetes names never have any), it starts with a letter (every prefix we use does), and a
/// name longer than [`COUNTER_NAME_MAX`] is cut and ends in `.h` + 16 hex digits of its hash.
pub fn counter_name(raw: &str) -> String {
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "/_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        name.insert_str(0, "c-");
    }
    if name.len() > COUNTER_NAME_MAX {
        let digest: String = Sha256::digest(raw.as_bytes())[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        name.truncate(COUNTER_NAME_MAX - 18);
        name.push_str(".h");
        name.push_str(&digest);
    }
    name
}

/// Counter of rule `idx` of policy `id` in direction `dir`: `gnp/allow-ssh/in0`.
pub fn rule_counter(id: &str, dir: Direction, idx: usize) -> String {
    counter_name(&format!("{id}/{}{idx}", dir_short(dir)))
}

/// Counter of a tier's end-of-tier drop in direction `dir`: `tier/default/in`.
pub fn tier_counter(tier: &str, dir: Direction) -> String {
    counter_name(&format!("tier/{tier}/{}", dir_short(dir)))
}

/// Counter of the host endpoints' default deny in direction `dir`: `endpoint-default/in`.
fn endpoint_default_counter(dir: Direction) -> String {
    format!("endpoint-default/{}", dir_short(dir))
}

fn count(name: &str) -> String {
    format!("counter name {}", quote(name))
}

fn proto_text(p: Protocol) -> String {
    match p.number() {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "ipv6-icmp".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        n => n.to_string(),
    }
}

fn list<T: ToString>(items: &[T]) -> String {
    if items.len() == 1 {
        items[0].to_string()
    } else {
        format!(
            "{{ {} }}",
            items
                .iter()
                .map(T::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

fn ports_text(ports: &[PortRange]) -> String {
    list(ports)
}

/// The alternatives for one side's positive `ports` (OR-ed): numeric ports, and the named-port
/// set. One `[""]` entry when the side has no ports. The named alternative excludes the
/// numeric ports, so no packet matches two copies of a rule (a Log rule logs once).
fn port_alternatives(
    rule: &Rule,
    e: &Entity,
    fam: Option<Family>,
    src: bool,
) -> Vec<Option<String>> {
    let (addr, port) = if src {
        ("saddr", "sport")
    } else {
        ("daddr", "dport")
    };
    let named = match (named_port_set_id(rule, e, false), fam) {
        (Some(id), Some(f)) => Some(format!(
            "{} {addr} . meta l4proto . th {port} @{}",
            family_kw(f),
            named_port_set_name(&id, f)
        )),
        _ => None,
    };
    match (e.ports.is_empty(), named) {
        (true, None) => vec![None],
        (false, None) => vec![Some(format!("th {port} {}", ports_text(&e.ports)))],
        (true, Some(n)) => vec![Some(n)],
        (false, Some(n)) => vec![
            Some(format!("th {port} {}", ports_text(&e.ports))),
            Some(format!("th {port} != {} {n}", ports_text(&e.ports))),
        ],
    }
}

fn family_kw(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

fn entity_matches(
    rule: &Rule,
    e: &Entity,
    fam: Option<Family>,
    src: bool,
    ports_alt: Option<&str>,
    out: &mut Vec<String>,
) {
    let (addr, port) = if src {
        ("saddr", "sport")
    } else {
        ("daddr", "dport")
    };
    if let Some(f) = fam {
        let p = family_kw(f);
        let nets: Vec<String> = e
            .nets
            .iter()
            .filter(|n| Family::of_net(n) == f)
            .map(element_text)
            .collect();
        if !nets.is_empty() {
            out.push(format!("{p} {addr} {}", list(&nets)));
        }
        let not_nets: Vec<String> = e
            .not_nets
            .iter()
            .filter(|n| Family::of_net(n) == f)
            .map(element_text)
            .collect();
        if !not_nets.is_empty() {
            out.push(format!("{p} {addr} != {}", list(&not_nets)));
        }
        if let Some(s) = &e.selector {
            out.push(format!("{p} {addr} @{}", set_name(s, f)));
        }
        if let Some(s) = &e.not_selector {
            out.push(format!("{p} {addr} != @{}", set_name(s, f)));
        }
    }
    if let Some(alt) = ports_alt {
        out.push(alt.to_string());
    }
    if !e.not_ports.is_empty() {
        out.push(format!("th {port} != {}", ports_text(&e.not_ports)));
    }
    if let (Some(id), Some(f)) = (named_port_set_id(rule, e, true), fam) {
        out.push(format!(
            "{} {addr} . meta l4proto . th {port} != @{}",
            family_kw(f),
            named_port_set_name(&id, f)
        ));
    }
}

fn needs_family(rule: &Rule) -> bool {
    rule.ip_version.is_some()
        || rule.icmp.is_some()
        || rule.not_icmp.is_some()
        || [&rule.source, &rule.destination].iter().any(|e| {
            !e.nets.is_empty()
                || !e.not_nets.is_empty()
                || e.selector.is_some()
                || e.not_selector.is_some()
                || !e.named_ports.is_empty()
                || !e.not_named_ports.is_empty()
        })
}

/// The match part of a rule, once per family it needs and per alternative of its ports
/// (numeric or named; empty list = dropped everywhere).
pub fn rule_matches(rule: &Rule) -> Vec<String> {
    let fams = rule_families(rule);
    let families: Vec<Option<Family>> = if fams.len() == 2 && !needs_family(rule) {
        vec![None]
    } else {
        fams.into_iter().map(Some).collect()
    };
    let mut copies = Vec::new();
    for fam in families {
        for s in port_alternatives(rule, &rule.source, fam, true) {
            for d in port_alternatives(rule, &rule.destination, fam, false) {
                copies.push((fam, s.clone(), d));
            }
        }
    }
    copies
        .into_iter()
        .map(|(fam, src_ports, dst_ports)| {
            let mut m = Vec::new();
            match fam {
                Some(Family::V4) => m.push("meta nfproto ipv4".to_string()),
                Some(Family::V6) => m.push("meta nfproto ipv6".to_string()),
                None => {}
            }
            if let Some(p) = rule.protocol {
                m.push(format!("meta l4proto {}", proto_text(p)));
            }
            if let Some(p) = rule.not_protocol {
                m.push(format!("meta l4proto != {}", proto_text(p)));
            }
            entity_matches(rule, &rule.source, fam, true, src_ports.as_deref(), &mut m);
            entity_matches(
                rule,
                &rule.destination,
                fam,
                false,
                dst_ports.as_deref(),
                &mut m,
            );
            let icmp_kw = match rule.protocol.map(Protocol::number) {
                Some(58) => "icmpv6",
                _ => "icmp",
            };
            if let Some(i) = &rule.icmp {
                m.push(format!("{icmp_kw} type {}", i.type_));
                if let Some(c) = i.code {
                    m.push(format!("{icmp_kw} code {c}"));
                }
            }
            if let Some(i) = &rule.not_icmp {
                // "not (type and code)", iptables' meaning; see docs/policy.md.
                match i.code {
                    None => m.push(format!("{icmp_kw} type != {}", i.type_)),
                    Some(c) => m.push(format!(
                        "{icmp_kw} type . {icmp_kw} code != {{ {} . {c} }}",
                        i.type_
                    )),
                }
            }
            m.join(" ")
        })
        .collect()
}

fn log_prefix(
    settings_prefix: &str,
    tier: &str,
    policy: &str,
    dir: Direction,
    idx: usize,
) -> String {
    let d = match dir {
        Direction::Ingress => "in",
        Direction::Egress => "out",
    };
    let mut p = format!("{settings_prefix}|{tier}|{policy}|{d}{idx}: ");
    // The kernel keeps 127 characters of an nft log prefix.
    if p.len() > 127 {
        p.truncate(125);
        p.push_str(": ");
    }
    p
}

fn policy_rules(
    program: &Program,
    id: &str,
    tier: &str,
    dir: Direction,
    rules: &[Rule],
    counters: &mut BTreeMap<String, CounterLabels>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let matches = rule_matches(rule);
        if matches.is_empty() {
            continue;
        }
        let counter = rule_counter(id, dir, i);
        counters.insert(
            counter.clone(),
            CounterLabels {
                tier: tier.to_string(),
                policy: id.to_string(),
                direction: dir_label(dir),
                rule: i.to_string(),
                action: action_label(rule.action),
            },
        );
        let verdict = match rule.action {
            Action::Allow => format!("meta mark set meta mark | {MARK_ACCEPT:#010x} return"),
            Action::Pass => format!("meta mark set meta mark | {MARK_PASS:#010x} return"),
            Action::Deny => "drop".to_string(),
            Action::Log => format!(
                "log prefix {} level info",
                quote(&log_prefix(&program.settings.log_prefix, tier, id, dir, i))
            ),
        };
        let verdict = format!("{} {verdict}", count(&counter));
        for m in matches {
            if m.is_empty() {
                out.push(verdict.clone());
            } else {
                out.push(format!("{m} {verdict}"));
            }
        }
    }
    out
}

fn failsafe_rules(list: &[FailsafePort], port_field: &str, peer_field: &str) -> Vec<String> {
    let mut out = Vec::new();
    for f in list {
        let proto = proto_text(f.protocol);
        match f.net {
            None => out.push(format!("{proto} {port_field} {} accept", f.port)),
            Some(n) => {
                let p = match n {
                    IpNet::V4(_) => "ip",
                    IpNet::V6(_) => "ip6",
                };
                out.push(format!(
                    "{p} {peer_field} {} {proto} {port_field} {} accept",
                    element_text(&n),
                    f.port
                ));
            }
        }
    }
    out
}

/// The tiers of an endpoint chain: each policy's chain in turn (a Pass skips the rest of its
/// tier), `on_allow` once a policy allowed, and the tier's end-of-tier drop where it has one.
fn tier_rules(
    tiers: &[TierProgram],
    dir: Direction,
    on_allow: &str,
    tier_default: bool,
    counters: &mut BTreeMap<String, CounterLabels>,
) -> Vec<String> {
    let mut r = Vec::new();
    for tier in tiers {
        r.push(format!(
            "{} comment {}",
            clear_marks(MARK_PASS),
            quote(&format!("tier {}", tier.name))
        ));
        for pid in &tier.policies {
            r.push(format!(
                "{} jump {}",
                mark_clear(MARK_PASS),
                policy_chain(pid, dir)
            ));
            r.push(format!("{} {on_allow}", mark_is(MARK_ACCEPT)));
        }
        if tier_default && tier.default_action == TierDefault::Deny {
            let counter = tier_counter(&tier.name, dir);
            r.push(format!(
                "{} {} drop comment {}",
                mark_clear(MARK_PASS),
                count(&counter),
                quote(&format!("end of tier {}", tier.name))
            ));
            counters.insert(
                counter,
                CounterLabels {
                    tier: tier.name.clone(),
                    policy: String::new(),
                    direction: dir_label(dir),
                    rule: "end-of-tier".into(),
                    action: "deny",
                },
            );
        }
    }
    r
}

/// Name of a pod's chain: `tw-<ns>/<pod>` (ingress: to the workload), `fw-<ns>/<pod>`
/// (egress: from it).
pub fn workload_chain(dir: Direction, wl: &WorkloadProgram) -> String {
    let d = match dir {
        Direction::Ingress => "tw",
        Direction::Egress => "fw",
    };
    counter_name(&format!("{d}-{}", wl.id()))
}

/// Counter of the pods' default deny (no profile allowed) in direction `dir`.
fn workload_default_counter(dir: Direction) -> String {
    format!("workload-default/{}", dir_short(dir))
}

/// An endpoint's final drop, counted in `counter` (labelled `endpoint-default`).
fn default_deny(
    counter: String,
    comment: &str,
    dir: Direction,
    counters: &mut BTreeMap<String, CounterLabels>,
) -> String {
    let rule = format!("{} drop comment {}", count(&counter), quote(comment));
    counters.insert(
        counter,
        CounterLabels {
            tier: String::new(),
            policy: String::new(),
            direction: dir_label(dir),
            rule: "endpoint-default".into(),
            action: "deny",
        },
    );
    rule
}

/// A pod's chain for `dir`, as Felix orders it: conntrack, tiers, profiles, drop. Allowed
/// returns with the accept mark set; the caller decides.
fn workload_body(
    wl: &WorkloadProgram,
    dir: Direction,
    counters: &mut BTreeMap<String, CounterLabels>,
) -> Vec<String> {
    let allow = format!("meta mark set meta mark | {MARK_ACCEPT:#010x} return");
    let mut r = vec![
        "ct state established,related accept".to_string(),
        "ct state invalid drop".to_string(),
        clear_marks(MARK_ACCEPT | MARK_PASS),
    ];
    r.extend(tier_rules(wl.tiers(dir), dir, "return", true, counters));
    for p in &wl.profiles {
        let allows = match dir {
            Direction::Ingress => p.allow_ingress,
            Direction::Egress => p.allow_egress,
        };
        if allows {
            r.push(format!(
                "{allow} comment {}",
                quote(&format!("profile {}", p.name))
            ));
        }
    }
    r.push(default_deny(
        workload_default_counter(dir),
        &format!("no profile of pod {} allowed it", wl.id()),
        dir,
        counters,
    ));
    r
}

fn endpoint_body(
    ep: &EndpointProgram,
    hook: Hook,
    dir: Direction,
    counters: &mut BTreeMap<String, CounterLabels>,
) -> Vec<String> {
    let mut r = Vec::new();
    if matches!(hook, Hook::Normal | Hook::Forward) {
        r.push("ct state established,related accept".into());
        r.push("ct state invalid drop".into());
    }
    match (hook, dir) {
        (Hook::Forward, _) => {}
        (Hook::Untracked, Direction::Ingress) => r.push("jump untracked-failsafe-in".into()),
        (Hook::Untracked, Direction::Egress) => r.push("jump untracked-failsafe-out".into()),
        (_, Direction::Ingress) => r.push("jump failsafe-in".into()),
        (_, Direction::Egress) => r.push("jump failsafe-out".into()),
    }
    r.push(clear_marks(MARK_ACCEPT | MARK_PASS));
    let on_allow = match hook {
        Hook::Normal => "accept",
        Hook::Untracked => "notrack return",
        Hook::PreDnat | Hook::Forward => "return",
    };
    r.extend(tier_rules(
        ep.tiers(hook, dir),
        dir,
        on_allow,
        hook.has_tier_default(),
        counters,
    ));
    if hook == Hook::Normal {
        if ep.default_allow() {
            r.push(format!(
                "accept comment {}",
                quote("profile projectcalico-default-allow")
            ));
        } else {
            r.push(default_deny(
                endpoint_default_counter(dir),
                &format!("default deny of host endpoint {}", ep.hep),
                dir,
                counters,
            ));
        }
    }
    r
}

/// Whether an endpoint gets a chain for this hook and direction.
fn has_chain(ep: &EndpointProgram, hook: Hook, dir: Direction) -> bool {
    match hook {
        Hook::Normal | Hook::Forward => true,
        Hook::Untracked | Hook::PreDnat => !ep.tiers(hook, dir).is_empty(),
    }
}

/// Renders the program. An empty program renders an empty spec (the table should be removed).
pub fn render(program: &Program) -> FilterSpec {
    let mut spec = FilterSpec::default();
    if program.is_empty() {
        return spec;
    }
    // Sets.
    for set in program.sets.values() {
        let Ok(sel) = Selector::parse(&set.selector) else {
            continue;
        };
        for fam in Family::ALL {
            let elements: BTreeSet<String> = match fam {
                Family::V4 => set
                    .v4
                    .iter()
                    .map(|n| element_text(&IpNet::V4(*n)))
                    .collect(),
                Family::V6 => set
                    .v6
                    .iter()
                    .map(|n| element_text(&IpNet::V6(*n)))
                    .collect(),
            };
            spec.sets.insert(
                set_name(&sel, fam),
                SetSpec {
                    family: fam,
                    kind: SetKind::Addr,
                    comment: set.selector.clone(),
                    elements,
                },
            );
        }
    }
    for (id, set) in &program.named_port_sets {
        for fam in Family::ALL {
            let elements: BTreeSet<String> = match fam {
                Family::V4 => set
                    .v4
                    .iter()
                    .map(|(a, p, n)| named_port_element_text(IpAddr::V4(*a), *p, *n))
                    .collect(),
                Family::V6 => set
                    .v6
                    .iter()
                    .map(|(a, p, n)| named_port_element_text(IpAddr::V6(*a), *p, *n))
                    .collect(),
            };
            let proto = set
                .protocol
                .map_or("any".to_string(), |p| proto_text(Protocol::from_number(p)));
            spec.sets.insert(
                named_port_set_name(id, fam),
                SetSpec {
                    family: fam,
                    kind: SetKind::NamedPort,
                    comment: format!(
                        "{} ports {} proto {proto}",
                        set.selector,
                        set.names.join(",")
                    ),
                    elements,
                },
            );
        }
    }
    let s = &program.settings;
    let workload: Vec<String> = s
        .workload_prefixes
        .iter()
        .map(|p| format!("\"{p}*\""))
        .collect();
    let wg: Vec<u16> = s.wireguard_ports.clone();
    let pods = !program.workloads.is_empty();
    let mut chains = Vec::new();
    let base =
        |name: &str, hook: &'static str, priority: &'static str, rules: Vec<String>| ChainSpec {
            name: name.into(),
            base: Some(BaseHook { hook, priority }),
            rules,
        };
    let any = |hook: Hook, dir: Direction| {
        program
            .endpoints
            .iter()
            .any(|e| hook_dir_applies(e, hook, dir))
    };
    // raw
    let mut raw_pre = vec![clear_marks(MARK_ACCEPT | MARK_PASS)];
    if any(Hook::Untracked, Direction::Ingress) {
        raw_pre.push("jump untracked-from-hep".into());
        raw_pre.push(format!("{} accept", mark_is(MARK_ACCEPT)));
    }
    chains.push(base("raw-prerouting", "prerouting", "raw", raw_pre));
    let mut raw_out = vec![clear_marks(MARK_ACCEPT | MARK_PASS)];
    if any(Hook::Untracked, Direction::Egress) {
        raw_out.push("jump untracked-to-hep".into());
        raw_out.push(format!("{} accept", mark_is(MARK_ACCEPT)));
    }
    chains.push(base("raw-output", "output", "raw", raw_out));
    // mangle
    let mut mangle = vec![
        "ct state established,related accept".to_string(),
        format!("{} accept", mark_is(MARK_ACCEPT)),
    ];
    if any(Hook::PreDnat, Direction::Ingress) {
        mangle.push("jump prednat-from-hep".into());
        mangle.push(format!("{} accept", mark_is(MARK_ACCEPT)));
    }
    chains.push(base("mangle-prerouting", "prerouting", "mangle", mangle));
    // filter
    let mut input = Vec::new();
    if !wg.is_empty() {
        input.push(format!(
            "udp dport {} fib daddr type local accept",
            list(&wg)
        ));
    }
    input.push(format!("{} accept", mark_is(MARK_ACCEPT)));
    input.push(clear_marks(MARK_ACCEPT | MARK_PASS));
    if pods {
        input.push("jump wl-to-host".into());
    }
    input.push("jump filter-from-hep".into());
    chains.push(base("filter-input", "input", "filter", input));
    let mut output = vec![format!("{} accept", mark_is(MARK_ACCEPT))];
    if !wg.is_empty() {
        output.push(format!("udp sport {} accept", list(&wg)));
        output.push(format!("udp dport {} accept", list(&wg)));
    }
    output.push(clear_marks(MARK_ACCEPT | MARK_PASS));
    output.push("jump filter-to-hep".into());
    chains.push(base("filter-output", "output", "filter", output));
    let mut forward = vec![
        clear_marks(MARK_PASS),
        format!("{} jump forward-from-hep", mark_clear(MARK_ACCEPT)),
    ];
    if pods {
        // A pod's egress, then (same node) the other pod's ingress: each returns only when it
        // allowed, with the accept mark set.
        forward.extend(by_interface_or_address(&workload, "iifname", "wl-from"));
        forward.extend(by_interface_or_address(&workload, "oifname", "wl-to"));
    }
    forward.push("jump forward-to-hep".into());
    if pods {
        forward.push(format!(
            "{} accept comment {}",
            mark_is(MARK_ACCEPT),
            quote("allowed by policy")
        ));
    }
    chains.push(base("filter-forward", "forward", "filter", forward));

    // Dispatch chains.
    for hook in Hook::ALL {
        for dir in [Direction::Ingress, Direction::Egress] {
            let (name, field) = match dir {
                Direction::Ingress => (format!("{}-from-hep", hook.short()), "iifname"),
                Direction::Egress => (format!("{}-to-hep", hook.short()), "oifname"),
            };
            let used = match hook {
                Hook::Normal | Hook::Forward => true,
                _ => any(hook, dir),
            };
            if !used {
                continue;
            }
            let mut rules = Vec::new();
            if !workload.is_empty() {
                rules.push(format!("{field} {} return", list(&workload)));
            }
            for ep in &program.endpoints {
                if !has_chain(ep, hook, dir) {
                    continue;
                }
                let target = endpoint_chain(hook, dir, &ep.iface);
                match &ep.iface {
                    Iface::Named(n) => rules.push(format!("{field} {} goto {target}", quote(n))),
                    Iface::Any => rules.push(format!("goto {target}")),
                }
            }
            chains.push(ChainSpec {
                name,
                base: None,
                rules,
            });
        }
    }
    if pods {
        render_workloads(program, &workload, &mut spec, &mut chains);
    }
    // Failsafe chains.
    chains.push(ChainSpec {
        name: "failsafe-in".into(),
        base: None,
        rules: failsafe_rules(&s.failsafe_inbound, "dport", "saddr"),
    });
    chains.push(ChainSpec {
        name: "failsafe-out".into(),
        base: None,
        rules: failsafe_rules(&s.failsafe_outbound, "dport", "daddr"),
    });
    if any(Hook::Untracked, Direction::Ingress) || any(Hook::Untracked, Direction::Egress) {
        let mut fin = failsafe_rules(&s.failsafe_inbound, "dport", "saddr");
        fin.extend(failsafe_rules(&s.failsafe_outbound, "sport", "saddr"));
        let mut fout = failsafe_rules(&s.failsafe_outbound, "dport", "daddr");
        fout.extend(failsafe_rules(&s.failsafe_inbound, "sport", "daddr"));
        chains.push(ChainSpec {
            name: "untracked-failsafe-in".into(),
            base: None,
            rules: fin,
        });
        chains.push(ChainSpec {
            name: "untracked-failsafe-out".into(),
            base: None,
            rules: fout,
        });
    }
    // Endpoint chains.
    for ep in &program.endpoints {
        for hook in Hook::ALL {
            for dir in [Direction::Ingress, Direction::Egress] {
                if hook == Hook::PreDnat && dir == Direction::Egress {
                    continue;
                }
                if !has_chain(ep, hook, dir) {
                    continue;
                }
                chains.push(ChainSpec {
                    name: endpoint_chain(hook, dir, &ep.iface),
                    base: None,
                    rules: endpoint_body(ep, hook, dir, &mut spec.counters),
                });
            }
        }
    }
    // Policy chains, for the directions some endpoint uses.
    let mut used: BTreeSet<(String, Direction)> = BTreeSet::new();
    for ep in &program.endpoints {
        for ((_, dir), tiers) in &ep.chains {
            for t in tiers {
                for p in &t.policies {
                    used.insert((p.clone(), *dir));
                }
            }
        }
    }
    for wl in &program.workloads {
        for dir in [Direction::Ingress, Direction::Egress] {
            for t in wl.tiers(dir) {
                for p in &t.policies {
                    used.insert((p.clone(), dir));
                }
            }
        }
    }
    for (id, dir) in used {
        let Some(p) = program.policies.get(&id) else {
            continue;
        };
        chains.push(ChainSpec {
            name: policy_chain(&id, dir),
            base: None,
            rules: policy_rules(program, &id, &p.tier, dir, p.rules(dir), &mut spec.counters),
        });
    }
    spec.chains = chains;
    spec
}

/// Jumps to the interface dispatch chain `<stem>-dispatch` for workload interfaces, and to the
/// address dispatch chain `<stem>-addr-dispatch` for every other interface.
fn by_interface_or_address(workload: &[String], field: &str, stem: &str) -> Vec<String> {
    if workload.is_empty() {
        return vec![format!("jump {stem}-addr-dispatch")];
    }
    vec![
        format!("{field} {} jump {stem}-dispatch", list(workload)),
        format!("{field} != {} jump {stem}-addr-dispatch", list(workload)),
    ]
}

/// The pods' maps and chains: dispatch by interface and by address, each pod's two chains,
/// and `wl-to-host`.
fn render_workloads(
    program: &Program,
    workload: &[String],
    spec: &mut FilterSpec,
    chains: &mut Vec<ChainSpec>,
) {
    // Keys: the first pod (by namespace and name) to claim an interface or address has it.
    for (dir, stem, what) in [
        (Direction::Egress, "wl-from", "packets from the pod"),
        (Direction::Ingress, "wl-to", "packets to the pod"),
    ] {
        let mut by_iface = BTreeMap::new();
        for wl in &program.workloads {
            if let Some(iface) = &wl.interface {
                by_iface
                    .entry(quote(iface))
                    .or_insert_with(|| workload_chain(dir, wl));
            }
        }
        spec.maps.insert(
            format!("{stem}-iface"),
            MapSpec {
                key: MapKey::Interface,
                comment: format!("host-side interface -> pod chain, {what}"),
                elements: by_iface,
            },
        );
        for (fam, suffix) in [(Family::V4, "4"), (Family::V6, "6")] {
            let mut by_addr = BTreeMap::new();
            for wl in &program.workloads {
                for ip in wl.ips.iter().filter(|ip| Family::of_net(ip) == fam) {
                    by_addr
                        .entry(ip.addr().to_string())
                        .or_insert_with(|| workload_chain(dir, wl));
                }
            }
            spec.maps.insert(
                format!("{stem}-addr{suffix}"),
                MapSpec {
                    key: MapKey::Addr(fam),
                    comment: format!("pod address -> pod chain, {what}"),
                    elements: by_addr,
                },
            );
        }
        let (iface_field, addr_field) = match dir {
            Direction::Egress => ("iifname", "saddr"),
            Direction::Ingress => ("oifname", "daddr"),
        };
        chains.push(ChainSpec {
            name: format!("{stem}-dispatch"),
            base: None,
            rules: vec![
                format!("{iface_field} vmap @{stem}-iface"),
                format!("drop comment {}", quote("unknown workload interface")),
            ],
        });
        chains.push(ChainSpec {
            name: format!("{stem}-addr-dispatch"),
            base: None,
            rules: vec![
                format!("ip {addr_field} vmap @{stem}-addr4"),
                format!("ip6 {addr_field} vmap @{stem}-addr6"),
            ],
        });
    }

    // A pod's traffic to its own host: IPv6 neighbour discovery and MLD first (Felix), then
    // the pod's egress, then defaultEndpointToHostAction. Host to pod is never policed.
    let mut to_host = vec!["icmpv6 type { 130, 131, 132, 133, 135, 136 } accept".to_string()];
    to_host.extend(by_interface_or_address(workload, "iifname", "wl-from"));
    let action = match program.settings.endpoint_to_host {
        EndpointToHostAction::Accept => "accept",
        EndpointToHostAction::Return => "return",
        EndpointToHostAction::Drop => "drop",
    };
    to_host.push(format!(
        "{} {action} comment {}",
        mark_is(MARK_ACCEPT),
        quote("defaultEndpointToHostAction")
    ));
    chains.push(ChainSpec {
        name: "wl-to-host".into(),
        base: None,
        rules: to_host,
    });
    for wl in &program.workloads {
        for dir in [Direction::Egress, Direction::Ingress] {
            chains.push(ChainSpec {
                name: workload_chain(dir, wl),
                base: None,
                rules: workload_body(wl, dir, &mut spec.counters),
            });
        }
    }
}

fn hook_dir_applies(ep: &EndpointProgram, hook: Hook, dir: Direction) -> bool {
    !ep.tiers(hook, dir).is_empty()
}

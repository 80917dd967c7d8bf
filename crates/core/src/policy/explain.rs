//! A pure evaluator of a [`Program`] for one packet: which stage, tier, policy and rule decide,
//! and the verdict. It follows the same chain structure the renderer emits (docs/policy.md), so
//! it doubles as an oracle for the nft rendering in tests.

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use super::model::{Action, Direction, Entity, Protocol, Rule, TierDefault};
use super::program::{
    EndpointProgram, FailsafePort, Hook, PolicyInputs, PolicySettings, Program, TierProgram,
    WorkloadProgram, compile, named_port_set_id, rule_families,
};
use super::resources::PolicyResources;
use crate::model::Family;

/// Which path the packet takes through the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PacketPath {
    /// Arriving on `iface`, for this host (INPUT).
    Input,
    /// Sent by this host through `iface` (OUTPUT).
    Output,
    /// Arriving on `iface`, forwarded out of `out_iface` (FORWARD).
    Forward,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Packet {
    pub path: PacketPath,
    /// Input interface (Input, Forward) or output interface (Output).
    pub iface: String,
    /// Output interface of a forwarded packet.
    pub out_iface: Option<String>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Outcome {
    Accept,
    Drop,
}

/// Why the verdict was reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Reason {
    /// A rule's action.
    Rule,
    /// The WireGuard listening port is always accepted.
    WireguardPort,
    Failsafe,
    /// No policy gave a verdict in a tier whose default action is Deny.
    EndOfTier,
    /// No tier allowed it and no profile allows: the host endpoint's default deny.
    EndpointDefaultDeny,
    /// A profile (`projectcalico-default-allow`) allowed it.
    Profile(String),
    /// Forwarded traffic with no applyOnForward verdict is allowed.
    ForwardDefaultAllow,
    /// No host endpoint covers the interface (or it is a workload interface): not policed.
    NotPoliced,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub outcome: Outcome,
    pub reason: Reason,
    pub hook: Option<Hook>,
    pub direction: Option<Direction>,
    pub endpoint: Option<String>,
    pub tier: Option<String>,
    pub policy: Option<String>,
    pub rule: Option<usize>,
    /// Log rules hit on the way, as `tier/policy/rule`.
    pub logged: Vec<String>,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ({:?}", self.outcome, self.reason)?;
        if let Some(h) = self.hook {
            write!(f, " in {h}")?;
        }
        if let Some(d) = self.direction {
            write!(f, " {d}")?;
        }
        if let Some(e) = &self.endpoint {
            write!(f, " of host endpoint {e}")?;
        }
        if let Some(t) = &self.tier {
            write!(f, ", tier {t}")?;
        }
        if let Some(p) = &self.policy {
            write!(f, ", policy {p}")?;
        }
        if let Some(r) = self.rule {
            write!(f, ", rule {r}")?;
        }
        write!(f, ")")?;
        for l in &self.logged {
            write!(f, "\n  logged by {l}")?;
        }
        Ok(())
    }
}

enum ChainResult {
    Accept(Verdict),
    Drop(Verdict),
    Continue,
}

struct Ctx<'a> {
    program: &'a Program,
    packet: &'a Packet,
    logged: Vec<String>,
}

/// Evaluates the program for a new flow's first packet (established traffic is accepted by
/// conntrack before any policy).
pub fn explain(program: &Program, packet: &Packet) -> Verdict {
    let mut cx = Ctx {
        program,
        packet,
        logged: Vec::new(),
    };
    let verdict = cx.run();
    Verdict {
        logged: cx.logged,
        ..verdict
    }
}

fn plain(outcome: Outcome, reason: Reason) -> Verdict {
    Verdict {
        outcome,
        reason,
        hook: None,
        direction: None,
        endpoint: None,
        tier: None,
        policy: None,
        rule: None,
        logged: Vec::new(),
    }
}

impl Ctx<'_> {
    fn run(&mut self) -> Verdict {
        let p = self.packet;
        let ep_in = self.program.endpoint_for(&p.iface);
        match p.path {
            PacketPath::Input => {
                if let Some(ep) = ep_in {
                    for hook in [Hook::Untracked, Hook::PreDnat] {
                        match self.chain(ep, hook, Direction::Ingress) {
                            // An accept in raw or mangle skips the normal ingress policy.
                            ChainResult::Drop(v) | ChainResult::Accept(v) => return v,
                            ChainResult::Continue => {}
                        }
                    }
                }
                if p.protocol == Protocol::Udp
                    && p.dport
                        .is_some_and(|d| self.program.settings.wireguard_ports.contains(&d))
                {
                    return plain(Outcome::Accept, Reason::WireguardPort);
                }
                match ep_in {
                    None => plain(Outcome::Accept, Reason::NotPoliced),
                    Some(ep) => match self.chain(ep, Hook::Normal, Direction::Ingress) {
                        ChainResult::Accept(v) | ChainResult::Drop(v) => v,
                        ChainResult::Continue => plain(Outcome::Accept, Reason::NotPoliced),
                    },
                }
            }
            PacketPath::Output => {
                if let Some(ep) = ep_in {
                    match self.chain(ep, Hook::Untracked, Direction::Egress) {
                        ChainResult::Drop(v) | ChainResult::Accept(v) => return v,
                        ChainResult::Continue => {}
                    }
                }
                if p.protocol == Protocol::Udp
                    && [p.dport, p.sport]
                        .iter()
                        .flatten()
                        .any(|d| self.program.settings.wireguard_ports.contains(d))
                {
                    return plain(Outcome::Accept, Reason::WireguardPort);
                }
                match ep_in {
                    None => plain(Outcome::Accept, Reason::NotPoliced),
                    Some(ep) => match self.chain(ep, Hook::Normal, Direction::Egress) {
                        ChainResult::Accept(v) | ChainResult::Drop(v) => v,
                        ChainResult::Continue => plain(Outcome::Accept, Reason::NotPoliced),
                    },
                }
            }
            PacketPath::Forward => {
                let mut skip_ingress = false;
                if let Some(ep) = ep_in {
                    for hook in [Hook::Untracked, Hook::PreDnat] {
                        match self.chain(ep, hook, Direction::Ingress) {
                            ChainResult::Drop(v) => return v,
                            ChainResult::Accept(_) => {
                                skip_ingress = true;
                                break;
                            }
                            ChainResult::Continue => {}
                        }
                    }
                    if !skip_ingress
                        && let ChainResult::Drop(v) =
                            self.chain(ep, Hook::Forward, Direction::Ingress)
                    {
                        return v;
                    }
                }
                if let Some(out) = p
                    .out_iface
                    .as_deref()
                    .and_then(|o| self.program.endpoint_for(o))
                    && let ChainResult::Drop(v) = self.chain(out, Hook::Forward, Direction::Egress)
                {
                    return v;
                }
                plain(Outcome::Accept, Reason::ForwardDefaultAllow)
            }
        }
    }

    fn verdict(
        &self,
        outcome: Outcome,
        reason: Reason,
        ep: &EndpointProgram,
        hook: Hook,
        dir: Direction,
    ) -> Verdict {
        Verdict {
            outcome,
            reason,
            hook: Some(hook),
            direction: Some(dir),
            endpoint: Some(ep.hep.clone()),
            tier: None,
            policy: None,
            rule: None,
            logged: Vec::new(),
        }
    }

    fn failsafe(&self, hook: Hook, dir: Direction) -> bool {
        if hook == Hook::Forward {
            return false;
        }
        let s = &self.program.settings;
        let p = self.packet;
        let hit = |list: &[FailsafePort], port: Option<u16>, peer: IpAddr| {
            list.iter().any(|f| {
                f.protocol == p.protocol
                    && Some(f.port) == port
                    && f.net.is_none_or(|n| n.contains(&peer))
            })
        };
        match dir {
            Direction::Ingress => {
                hit(&s.failsafe_inbound, p.dport, p.src)
                    || (hook == Hook::Untracked && hit(&s.failsafe_outbound, p.sport, p.src))
            }
            Direction::Egress => {
                hit(&s.failsafe_outbound, p.dport, p.dst)
                    || (hook == Hook::Untracked && hit(&s.failsafe_inbound, p.sport, p.dst))
            }
        }
    }

    fn chain(&mut self, ep: &EndpointProgram, hook: Hook, dir: Direction) -> ChainResult {
        let tiers = ep.tiers(hook, dir);
        let renders = match hook {
            Hook::Normal | Hook::Forward => true,
            Hook::Untracked | Hook::PreDnat => !tiers.is_empty(),
        };
        if !renders {
            return ChainResult::Continue;
        }
        if self.failsafe(hook, dir) {
            return ChainResult::Accept(self.verdict(
                Outcome::Accept,
                Reason::Failsafe,
                ep,
                hook,
                dir,
            ));
        }
        let base = self.verdict(Outcome::Accept, Reason::Rule, ep, hook, dir);
        if let Some(result) = self.run_tiers(tiers, dir, hook.has_tier_default(), &base) {
            return result;
        }
        match hook {
            Hook::Normal => {
                if ep.default_allow() {
                    ChainResult::Accept(self.verdict(
                        Outcome::Accept,
                        Reason::Profile(super::program::DEFAULT_ALLOW_PROFILE.into()),
                        ep,
                        hook,
                        dir,
                    ))
                } else {
                    ChainResult::Drop(self.verdict(
                        Outcome::Drop,
                        Reason::EndpointDefaultDeny,
                        ep,
                        hook,
                        dir,
                    ))
                }
            }
            _ => ChainResult::Continue,
        }
    }

    /// The tiers of one chain, in order: `Some` when a rule or an end-of-tier drop decides,
    /// `None` when every tier passed or did not apply. `base` carries the stage's fields.
    fn run_tiers(
        &mut self,
        tiers: &[TierProgram],
        dir: Direction,
        tier_default: bool,
        base: &Verdict,
    ) -> Option<ChainResult> {
        for tier in tiers {
            let mut passed = false;
            'policies: for pid in &tier.policies {
                let Some(policy) = self.program.policies.get(pid) else {
                    continue;
                };
                for (i, rule) in policy.rules(dir).iter().enumerate() {
                    if !self.rule_matches(rule) {
                        continue;
                    }
                    let mut v = Verdict {
                        tier: Some(tier.name.clone()),
                        policy: Some(pid.clone()),
                        rule: Some(i),
                        ..base.clone()
                    };
                    match rule.action {
                        Action::Allow => return Some(ChainResult::Accept(v)),
                        Action::Deny => {
                            v.outcome = Outcome::Drop;
                            return Some(ChainResult::Drop(v));
                        }
                        Action::Pass => {
                            passed = true;
                            break 'policies;
                        }
                        Action::Log => self.logged.push(format!("{}/{pid}/{dir}[{i}]", tier.name)),
                    }
                }
            }
            if !passed && tier_default && tier.default_action == TierDefault::Deny {
                return Some(ChainResult::Drop(Verdict {
                    outcome: Outcome::Drop,
                    reason: Reason::EndOfTier,
                    tier: Some(tier.name.clone()),
                    ..base.clone()
                }));
            }
        }
        None
    }

    /// A pod's chain for `dir` (Felix's workload chain): tiers, then its profiles in order,
    /// then drop.
    fn workload_chain(&mut self, wl: &WorkloadProgram, dir: Direction) -> Verdict {
        let base = Verdict {
            direction: Some(dir),
            ..plain(Outcome::Accept, Reason::Rule)
        };
        match self.run_tiers(wl.tiers(dir), dir, true, &base) {
            Some(ChainResult::Accept(v) | ChainResult::Drop(v)) => return v,
            Some(ChainResult::Continue) | None => {}
        }
        let allowing = wl.profiles.iter().find(|p| match dir {
            Direction::Ingress => p.allow_ingress,
            Direction::Egress => p.allow_egress,
        });
        match allowing {
            Some(p) => Verdict {
                reason: Reason::Profile(p.name.clone()),
                ..base
            },
            None => Verdict {
                outcome: Outcome::Drop,
                reason: Reason::EndpointDefaultDeny,
                ..base
            },
        }
    }

    fn set_contains(&self, sel: &crate::selector::Selector, addr: IpAddr) -> bool {
        self.program
            .sets
            .get(&sel.unique_id())
            .is_some_and(|s| s.contains(addr))
    }

    fn rule_matches(&self, rule: &Rule) -> bool {
        let p = self.packet;
        let family = Family::of_addr(&p.src);
        if !rule_families(rule).contains(&family) {
            return false;
        }
        let proto = p.protocol.number();
        if rule.protocol.is_some_and(|r| r.number() != proto) {
            return false;
        }
        if rule.not_protocol.is_some_and(|r| r.number() == proto) {
            return false;
        }
        // ICMP matches apply to the ICMP flavour of the packet's family.
        let icmp_ok = |m: &super::model::IcmpMatch| {
            p.icmp_type == Some(m.type_) && m.code.is_none_or(|c| p.icmp_code == Some(c))
        };
        if let Some(m) = &rule.icmp
            && !icmp_ok(m)
        {
            return false;
        }
        if let Some(m) = &rule.not_icmp
            && icmp_ok(m)
        {
            return false;
        }
        self.entity_matches(rule, &rule.source, p.src, p.sport, family)
            && self.entity_matches(rule, &rule.destination, p.dst, p.dport, family)
    }

    /// Whether `(addr, packet protocol, port)` is in the side's named-port set.
    fn named_port_hit(
        &self,
        rule: &Rule,
        e: &Entity,
        negated: bool,
        addr: IpAddr,
        port: Option<u16>,
    ) -> bool {
        let (Some(id), Some(port)) = (named_port_set_id(rule, e, negated), port) else {
            return false;
        };
        self.program
            .named_port_sets
            .get(&id)
            .is_some_and(|s| s.contains(addr, self.packet.protocol.number(), port))
    }

    fn entity_matches(
        &self,
        rule: &Rule,
        e: &Entity,
        addr: IpAddr,
        port: Option<u16>,
        family: Family,
    ) -> bool {
        let nets: Vec<_> = e
            .nets
            .iter()
            .filter(|n| Family::of_net(n) == family)
            .collect();
        if !e.nets.is_empty() && !nets.iter().any(|n| n.contains(&addr)) {
            return false;
        }
        if e.not_nets
            .iter()
            .filter(|n| Family::of_net(n) == family)
            .any(|n| n.contains(&addr))
        {
            return false;
        }
        if let Some(s) = &e.selector
            && !self.set_contains(s, addr)
        {
            return false;
        }
        if let Some(s) = &e.not_selector
            && self.set_contains(s, addr)
        {
            return false;
        }
        // Numeric and named ports are OR-ed; notPorts excludes both.
        if e.has_ports()
            && !port.is_some_and(|p| e.ports.iter().any(|r| r.contains(p)))
            && !self.named_port_hit(rule, e, false, addr, port)
        {
            return false;
        }
        if port.is_some_and(|p| e.not_ports.iter().any(|r| r.contains(p)))
            || self.named_port_hit(rule, e, true, addr, port)
        {
            return false;
        }
        true
    }
}

/// One stage of a pod-to-pod connection: the source pod's egress on its node, or the
/// destination pod's ingress on its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodStage {
    pub node: String,
    /// `namespace/pod`.
    pub pod: String,
    pub verdict: Verdict,
}

impl fmt::Display for PodStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = match self.verdict.direction {
            Some(Direction::Ingress) => "ingress of",
            _ => "egress of",
        };
        write!(
            f,
            "node {}, {dir} pod {}: {}",
            self.node, self.pod, self.verdict
        )
    }
}

/// Why a pod-to-pod explanation could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodExplainError {
    #[error("no pod {0} (a WorkloadEndpoint, or a Pod that runs and has an IP)")]
    NoSuchPod(String),
    #[error("pods {0} and {1} have no address of the same IP family")]
    NoCommonFamily(String, String),
}

/// How Calico decides a new connection from pod `from` to pod `to` (`namespace/pod` each) on
/// `protocol`/`dport`, as the agents of their nodes would: the source's egress on its node,
/// then (if allowed) the destination's ingress on its node. Host-endpoint forward policy on
/// the way is not included. The stages in order; the last one decides.
pub fn explain_pods(
    res: &PolicyResources,
    settings: &PolicySettings,
    from: &str,
    to: &str,
    protocol: Protocol,
    dport: Option<u16>,
) -> Result<Vec<PodStage>, PodExplainError> {
    let find = |id: &str| {
        res.workload_endpoints
            .iter()
            .find(|w| format!("{}/{}", w.namespace, w.pod) == id)
            .ok_or_else(|| PodExplainError::NoSuchPod(id.to_string()))
    };
    let (src_wep, dst_wep) = (find(from)?, find(to)?);
    let (src, dst) = [Family::V4, Family::V6]
        .into_iter()
        .find_map(|fam| {
            let addr = |w: &super::workload::WorkloadEndpoint| {
                w.ips
                    .iter()
                    .find(|n| Family::of_net(n) == fam)
                    .map(|n| n.addr())
            };
            Some((addr(src_wep)?, addr(dst_wep)?))
        })
        .ok_or_else(|| PodExplainError::NoCommonFamily(from.into(), to.into()))?;
    let packet = Packet {
        path: PacketPath::Forward,
        iface: String::new(),
        out_iface: None,
        src,
        dst,
        protocol,
        sport: dport.map(|_| 40000),
        dport,
        icmp_type: None,
        icmp_code: None,
    };
    let mut stages = Vec::new();
    for (wep, dir) in [(src_wep, Direction::Egress), (dst_wep, Direction::Ingress)] {
        let program = compile(&PolicyInputs {
            node: &wep.node,
            resources: Some(res),
            settings: settings.clone(),
            ..Default::default()
        });
        let id = format!("{}/{}", wep.namespace, wep.pod);
        let Some(wl) = program.workloads.iter().find(|w| w.id() == id) else {
            return Err(PodExplainError::NoSuchPod(id));
        };
        let mut cx = Ctx {
            program: &program,
            packet: &packet,
            logged: Vec::new(),
        };
        let verdict = cx.workload_chain(wl, dir);
        let verdict = Verdict {
            logged: cx.logged,
            ..verdict
        };
        let dropped = verdict.outcome == Outcome::Drop;
        stages.push(PodStage {
            node: wep.node.clone(),
            pod: id,
            verdict,
        });
        if dropped {
            break;
        }
    }
    Ok(stages)
}

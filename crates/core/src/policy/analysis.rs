//! Findings about a set of policy resources that never change a verdict: policies that apply
//! to no host endpoint and no pod, unreachable tiers, fully shadowed policies, rules that can never match
//! (`wiremesh policy unused`, docs/policy.md).

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;

use super::model::Direction;
use super::program::{
    EndpointProgram, Hook, PolicyInputs, Program, TierProgram, compile, named_port_members,
    selector_members,
};
use super::resources::PolicyResources;
use super::workload::{effective_labels, selects};
use crate::selector::Scope;

/// One finding: what (`<policy>` or `tier <name>`) and why it never changes a verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub subject: String,
    pub reason: String,
}

impl Finding {
    fn new(subject: impl Into<String>, reason: impl Into<String>) -> Finding {
        Finding {
            subject: subject.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.subject, self.reason)
    }
}

/// Every finding, in a stable order.
pub fn unused(res: &PolicyResources) -> Vec<Finding> {
    let mut out = Vec::new();
    let pod_labels: Vec<_> = res
        .workload_endpoints
        .iter()
        .map(|w| effective_labels(w, &res.profiles))
        .collect();
    for p in &res.policies {
        let mut why = Vec::new();
        // doNotTrack and preDNAT policies apply to host endpoints only.
        let selects_a_pod = !p.do_not_track
            && !p.pre_dnat
            && res
                .workload_endpoints
                .iter()
                .zip(&pod_labels)
                .any(|(w, labels)| selects(p, w, labels));
        let selects_a_hep = p.selects_host_endpoints
            && res
                .host_endpoints
                .iter()
                .any(|h| p.selector.matches_in(&h.labels, Scope::Global));
        if !selects_a_hep && !selects_a_pod {
            why.push(if p.selects_host_endpoints {
                "its selector matches no host endpoint and no pod".to_string()
            } else {
                "it can select pods only, and selects none".to_string()
            });
        } else if selects_a_hep
            && p.do_not_track
            && res.host_endpoints.iter().all(|h| {
                h.interface_name.as_deref() == Some("*")
                    || !p.selector.matches_in(&h.labels, Scope::Global)
            })
        {
            why.push("doNotTrack but selects only \"*\" host endpoints".into());
        }
        if !res.tiers.contains_key(&p.tier) {
            why.push(format!(
                "its tier {:?} does not exist (runs last, as Deny)",
                p.tier
            ));
        }
        for w in &why {
            out.push(Finding::new(p.display_name(), w.clone()));
        }
        for (dir, rules) in [
            (Direction::Ingress, &p.ingress),
            (Direction::Egress, &p.egress),
        ] {
            for (i, r) in rules.iter().flatten().enumerate() {
                for (side, e) in [("source", &r.source), ("destination", &r.destination)] {
                    if let Some(sel) = &e.selector {
                        let m = selector_members(sel, res);
                        if m.v4.is_empty() && m.v6.is_empty() {
                            out.push(Finding::new(
                                p.display_name(),
                                format!("{dir} rule {i}: {side} selector {sel} matches no address (the rule never matches)"),
                            ));
                        }
                    }
                    // Only named ports: an empty named-port set means no match.
                    if e.ports.is_empty()
                        && !e.named_ports.is_empty()
                        && named_port_members(r, e, false, res).is_empty()
                    {
                        out.push(Finding::new(
                            p.display_name(),
                            format!(
                                "{dir} rule {i}: {side} named port(s) {} match no port of a host endpoint with expectedIPs (the rule never matches)",
                                e.named_ports.join(", ")
                            ),
                        ));
                    }
                }
            }
        }
    }
    let unreachable = unreachable_tiers(res);
    for (id, why) in &unreachable {
        out.push(Finding::new(id.clone(), why.clone()));
    }
    for (id, why) in shadowed(res) {
        // An unreachable policy is also shadowed; one reason is enough.
        if unreachable.iter().any(|(u, _)| *u == id) {
            continue;
        }
        out.push(Finding::new(id, why));
    }
    let used: BTreeSet<&str> = res.policies.iter().map(|p| p.tier.as_str()).collect();
    for t in res.tiers.keys() {
        if !used.contains(t.as_str())
            && !["default", "kube-admin", "kube-baseline"].contains(&t.as_str())
        {
            out.push(Finding::new(format!("tier {t}"), "holds no policy"));
        }
    }
    out
}

/// A rule with no match field: it decides every packet that reaches it.
fn unconditional(r: &super::model::Rule) -> bool {
    let empty = |e: &super::model::Entity| {
        e.nets.is_empty()
            && e.not_nets.is_empty()
            && e.selector.is_none()
            && e.not_selector.is_none()
            && !e.has_ports()
            && !e.has_not_ports()
    };
    r.ip_version.is_none()
        && r.protocol.is_none()
        && r.not_protocol.is_none()
        && r.icmp.is_none()
        && r.not_icmp.is_none()
        && empty(&r.source)
        && empty(&r.destination)
}

/// For each policy: on how many endpoint chains it is programmed, on how many a check flagged
/// it, and the last reason given.
#[derive(Default)]
struct Tally(std::collections::BTreeMap<String, (usize, usize, String)>);

impl Tally {
    fn appears(&mut self, policy: &str, flagged: Option<String>) {
        let entry = self.0.entry(policy.to_string()).or_default();
        entry.0 += 1;
        if let Some(why) = flagged {
            entry.1 += 1;
            entry.2 = why;
        }
    }

    /// The policies flagged on every chain they appear on, with the reason.
    fn everywhere(self) -> Vec<(String, String)> {
        self.0
            .into_iter()
            .filter(|(_, (n, flagged, _))| *n > 0 && n == flagged)
            .map(|(id, (_, _, why))| (id, why))
            .collect()
    }
}

/// Calls `visit` with every endpoint chain (hook and direction) of every node's program.
fn each_chain(
    res: &PolicyResources,
    mut visit: impl FnMut(&Program, &EndpointProgram, Hook, Direction, &[TierProgram]),
) {
    let nodes: BTreeSet<&str> = res.host_endpoints.iter().map(|h| h.node.as_str()).collect();
    for node in nodes {
        let program = compile(&PolicyInputs {
            node,
            resources: Some(res),
            ..Default::default()
        });
        for ep in &program.endpoints {
            for ((hook, dir), tiers) in &ep.chains {
                visit(&program, ep, *hook, *dir, tiers);
            }
        }
    }
}

/// Policies that are fully shadowed (§5, 76e): on every endpoint chain where they appear, an
/// earlier policy already decides every packet (an unconditional Allow or Deny earlier in the
/// same or an earlier tier, or an unconditional Pass earlier in the same tier).
pub fn shadowed(res: &PolicyResources) -> Vec<(String, String)> {
    use super::model::Action;
    let mut tally = Tally::default();
    each_chain(res, |program, ep, hook, dir, tiers| {
        let mut blocked_by: Option<String> = None;
        for tier in tiers {
            let mut tier_blocked_by: Option<String> = None;
            for pid in &tier.policies {
                if let Some(w) = blocked_by.as_ref().or(tier_blocked_by.as_ref()) {
                    let why = format!(
                        "fully shadowed: {w} decides first ({hook} {dir} of {})",
                        ep.hep
                    );
                    tally.appears(pid, Some(why));
                    continue;
                }
                tally.appears(pid, None);
                let Some(p) = program.policies.get(pid) else {
                    continue;
                };
                for r in p.rules(dir) {
                    if !unconditional(r) {
                        continue;
                    }
                    match r.action {
                        Action::Allow | Action::Deny => {
                            blocked_by = Some(pid.clone());
                            break;
                        }
                        Action::Pass => {
                            tier_blocked_by = Some(pid.clone());
                            break;
                        }
                        Action::Log => {}
                    }
                }
            }
        }
    });
    tally.everywhere()
}

/// Policies whose tier is never reached (docs/policy.md, "policy unused"). On one endpoint's
/// chain (hook and direction), a tier *ends evaluation* when the tier applies there (a policy
/// of it selects the endpoint), its end-of-tier action is a drop (defaultAction Deny, in a
/// hook that has tier defaults: filter input/output/forward) and none of its policies there
/// has a Pass rule: every packet then gets Allow or Deny in that tier. Later tiers on that
/// chain are unreachable. A policy is reported when it is unreachable on every chain it is
/// programmed into.
pub fn unreachable_tiers(res: &PolicyResources) -> Vec<(String, String)> {
    use super::model::{Action, TierDefault};
    let mut tally = Tally::default();
    each_chain(res, |program, ep, hook, dir, tiers| {
        let mut ended_by: Option<&str> = None;
        for tier in tiers {
            for pid in &tier.policies {
                let why = ended_by.map(|t| {
                    format!(
                        "tier {:?} is never reached: the earlier tier {t:?} ends in a default Deny and has no Pass rule ({hook} {dir} of {})",
                        tier.name, ep.hep
                    )
                });
                tally.appears(pid, why);
            }
            if ended_by.is_some() {
                continue;
            }
            let can_pass = tier.policies.iter().any(|pid| {
                program
                    .policies
                    .get(pid)
                    .is_none_or(|p| p.rules(dir).iter().any(|r| r.action == Action::Pass))
            });
            if hook.has_tier_default() && tier.default_action == TierDefault::Deny && !can_pass {
                ended_by = Some(&tier.name);
            }
        }
    });
    tally.everywhere()
}

//! Our nftables table's model: what the kernel holds of it ([`NftState`]), the operations that
//! change it ([`NftOp`]), the pure [`plan`] from the rendered [`FilterSpec`] to those ops, and the
//! one `nft -f` transaction they make ([`script`]). The adapter that lists and writes the table
//! is `wiremesh_dataplane::nft`.
//!
//! Three ways to converge, cheapest first:
//! - only set elements differ: element additions and deletions;
//! - the rule part differs and we know what the kernel holds of it (what we last wrote, while
//!   the marker chain still names its hash): a [`RuleUpdate`] that adds, rewrites (flush and
//!   add) and deletes only the chains, sets, maps and counters that differ, so a pod start or
//!   a policy edit touches its own chains and map entries, and named counters keep counting;
//! - otherwise (a new table, an agent restarted with other rules, drift behind our back): the
//!   whole table is replaced, atomically.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use crate::policy::render::{
    ChainSpec, FilterSpec, MapSpec, SetSpec, TABLE, TABLE_FAMILY, chain_script, delete_script,
    map_declaration, set_declaration,
};

/// What our table holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftState {
    pub present: bool,
    /// From the marker chain's name; `None` if the table has none (not rendered by us).
    pub rules_hash: Option<String>,
    /// Set name -> elements, as [`element_text`] prints them.
    pub sets: BTreeMap<String, BTreeSet<String>>,
    /// Rules per chain (chains with rules only), when the rules were listed: a full observe
    /// detects rules flushed or added behind our back even though the hash chain is intact.
    pub rule_counts: Option<BTreeMap<String, usize>>,
    /// A full listing found our rules different from the kernel's listing taken after our last
    /// table replacement (a rule edited in place): the table must be replaced.
    pub edited: bool,
    /// The rule part the kernel holds, as we rendered it, when we know it: what we last wrote,
    /// while the marker chain still names its hash. Lets [`plan`] change only what differs.
    pub rules: Option<KnownRules>,
}

/// A rule part we wrote, with its hash (worked out once: it covers every rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownRules {
    pub hash: String,
    pub spec: Arc<FilterSpec>,
}

impl NftState {
    /// The state after `ops` succeeded (what the kernel then holds).
    pub fn apply_ops(&mut self, ops: &[NftOp]) {
        for op in ops {
            match op {
                NftOp::ReplaceTable(spec) => {
                    *self = NftState {
                        present: true,
                        rules_hash: Some(spec.rules_hash()),
                        sets: spec
                            .sets
                            .iter()
                            .map(|(n, set)| (n.clone(), set.elements.clone()))
                            .collect(),
                        rule_counts: None,
                        edited: false,
                        rules: Some(KnownRules {
                            hash: spec.rules_hash(),
                            spec: Arc::new((**spec).clone()),
                        }),
                    };
                }
                NftOp::UpdateRules(update) => {
                    self.rules_hash = Some(update.new_hash.clone());
                    self.rules = Some(KnownRules {
                        hash: update.new_hash.clone(),
                        spec: Arc::clone(&update.target),
                    });
                    self.rule_counts = None;
                    for (name, set) in &update.add_sets {
                        self.sets.insert(name.clone(), set.elements.clone());
                    }
                    for name in &update.delete_sets {
                        self.sets.remove(name);
                    }
                }
                NftOp::DeleteTable => *self = NftState::default(),
                NftOp::AddElements { set, elements } => {
                    self.sets
                        .entry(set.clone())
                        .or_default()
                        .extend(elements.iter().cloned());
                }
                NftOp::DeleteElements { set, elements } => {
                    if let Some(have) = self.sets.get_mut(set) {
                        for e in elements {
                            have.remove(e);
                        }
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NftOp {
    /// Replace the whole table atomically (the table is new, or what it holds is not known).
    ReplaceTable(Box<FilterSpec>),
    /// Change only the parts of the rule part that differ (see [`RuleUpdate`]).
    UpdateRules(Box<RuleUpdate>),
    DeleteElements {
        set: String,
        elements: Vec<String>,
    },
    AddElements {
        set: String,
        elements: Vec<String>,
    },
    /// Remove our table (cleanup: no host endpoint applies, or policy is disabled).
    DeleteTable,
}

impl NftOp {
    pub fn kind(&self) -> &'static str {
        match self {
            NftOp::ReplaceTable(_) => "replace_table",
            NftOp::UpdateRules(_) => "update_rules",
            NftOp::DeleteElements { .. } => "delete_elements",
            NftOp::AddElements { .. } => "add_elements",
            NftOp::DeleteTable => "delete_table",
        }
    }
}

impl fmt::Display for NftOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NftOp::ReplaceTable(spec) => write!(
                f,
                "replace table {TABLE_FAMILY} {TABLE} ({} chains, {} sets, rules {})",
                spec.chains.len(),
                spec.sets.len(),
                spec.rules_hash()
            ),
            NftOp::UpdateRules(u) => {
                write!(f, "update rules {} -> {} ({u})", u.old_hash, u.new_hash)
            }
            NftOp::DeleteElements { set, elements } => {
                write!(f, "delete element {set} {{ {} }}", elements.join(", "))
            }
            NftOp::AddElements { set, elements } => {
                write!(f, "add element {set} {{ {} }}", elements.join(", "))
            }
            NftOp::DeleteTable => write!(f, "delete table {TABLE_FAMILY} {TABLE}"),
        }
    }
}

/// Packets and bytes of one named counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

/// Changes to the rule part (chains, set, map and counter declarations, map elements) against
/// a known rule part, in the order one transaction needs them: new objects; new and changed
/// chains written (flushed, then their rules); map elements; then what is gone (chains flushed
/// before any is deleted, so jumps between them do not matter), and the marker chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleUpdate {
    pub old_hash: String,
    pub new_hash: String,
    /// The rule part afterwards (what the kernel then holds, for the next plan).
    pub target: Arc<FilterSpec>,
    /// New sets, declared with their elements.
    pub add_sets: Vec<(String, SetSpec)>,
    /// New maps, declared empty (their elements are in `map_adds`).
    pub add_maps: Vec<(String, MapSpec)>,
    pub add_counters: Vec<String>,
    /// New chains (declared empty; their rules are in `write_chains`).
    pub add_chains: Vec<ChainSpec>,
    /// New and changed chains, written whole.
    pub write_chains: Vec<ChainSpec>,
    /// Per map: keys to remove (changed ones are removed, then added).
    pub map_deletes: Vec<(String, Vec<String>)>,
    /// Per map: `(key, chain)` to add.
    pub map_adds: Vec<(String, Vec<(String, String)>)>,
    pub delete_chains: Vec<String>,
    pub delete_maps: Vec<String>,
    pub delete_sets: Vec<String>,
    pub delete_counters: Vec<String>,
}

impl fmt::Display for RuleUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let written: Vec<&str> = self.write_chains.iter().map(|c| c.name.as_str()).collect();
        write!(
            f,
            "chains +{} -{} written [{}], sets +{} -{}, maps +{} -{}, map keys +{} -{}, counters +{} -{}",
            self.add_chains.len(),
            self.delete_chains.len(),
            written.join(", "),
            self.add_sets.len(),
            self.delete_sets.len(),
            self.add_maps.len(),
            self.delete_maps.len(),
            self.map_adds.iter().map(|(_, e)| e.len()).sum::<usize>(),
            self.map_deletes.iter().map(|(_, k)| k.len()).sum::<usize>(),
            self.add_counters.len(),
            self.delete_counters.len(),
        )
    }
}

/// Per chain with rules, how many (what a full listing counts).
fn rule_counts(spec: &FilterSpec) -> BTreeMap<String, usize> {
    spec.chains
        .iter()
        .filter(|c| !c.rules.is_empty())
        .map(|c| (c.name.clone(), c.rules.len()))
        .collect()
}

/// The update from rule part `have` to `want`; `None` when only a replacement can do it (a
/// base chain, set or map declaration that changed in place).
fn rule_update(want: &FilterSpec, have: &FilterSpec, old_hash: &str) -> Option<RuleUpdate> {
    let mut u = RuleUpdate {
        old_hash: old_hash.to_string(),
        new_hash: want.rules_hash(),
        target: Arc::new(want.clone()),
        add_sets: Vec::new(),
        add_maps: Vec::new(),
        add_counters: Vec::new(),
        add_chains: Vec::new(),
        write_chains: Vec::new(),
        map_deletes: Vec::new(),
        map_adds: Vec::new(),
        delete_chains: Vec::new(),
        delete_maps: Vec::new(),
        delete_sets: Vec::new(),
        delete_counters: Vec::new(),
    };
    let same_declaration =
        |a: &SetSpec, b: &SetSpec| (a.family, a.kind, &a.comment) == (b.family, b.kind, &b.comment);
    for (name, set) in &want.sets {
        match have.sets.get(name) {
            None => u.add_sets.push((name.clone(), set.clone())),
            Some(old) if !same_declaration(old, set) => return None,
            Some(_) => {}
        }
    }
    u.delete_sets = have
        .sets
        .keys()
        .filter(|n| !want.sets.contains_key(*n))
        .cloned()
        .collect();
    for (name, map) in &want.maps {
        let old_elements = match have.maps.get(name) {
            None => {
                u.add_maps.push((
                    name.clone(),
                    MapSpec {
                        elements: BTreeMap::new(),
                        ..map.clone()
                    },
                ));
                BTreeMap::new()
            }
            Some(old) if (old.key, &old.comment) != (map.key, &map.comment) => return None,
            Some(old) => old.elements.clone(),
        };
        let deletes: Vec<String> = old_elements
            .iter()
            .filter(|(k, v)| map.elements.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .collect();
        let adds: Vec<(String, String)> = map
            .elements
            .iter()
            .filter(|(k, v)| old_elements.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !deletes.is_empty() {
            u.map_deletes.push((name.clone(), deletes));
        }
        if !adds.is_empty() {
            u.map_adds.push((name.clone(), adds));
        }
    }
    u.delete_maps = have
        .maps
        .keys()
        .filter(|n| !want.maps.contains_key(*n))
        .cloned()
        .collect();
    let counters = |spec: &FilterSpec| -> BTreeSet<String> {
        spec.counters
            .keys()
            .chain(&spec.guard_counters)
            .cloned()
            .collect()
    };
    let (want_counters, have_counters) = (counters(want), counters(have));
    u.add_counters = want_counters.difference(&have_counters).cloned().collect();
    u.delete_counters = have_counters.difference(&want_counters).cloned().collect();
    let old_chains: BTreeMap<&str, &ChainSpec> =
        have.chains.iter().map(|c| (c.name.as_str(), c)).collect();
    let new_names: BTreeSet<&str> = want.chains.iter().map(|c| c.name.as_str()).collect();
    for chain in &want.chains {
        match old_chains.get(chain.name.as_str()) {
            None => {
                u.add_chains.push(ChainSpec {
                    rules: Vec::new(),
                    ..chain.clone()
                });
                if !chain.rules.is_empty() {
                    u.write_chains.push(chain.clone());
                }
            }
            Some(old) if old.base != chain.base => return None,
            Some(old) if old.rules != chain.rules => u.write_chains.push(chain.clone()),
            Some(_) => {}
        }
    }
    u.delete_chains = have
        .chains
        .iter()
        .filter(|c| !new_names.contains(c.name.as_str()))
        .map(|c| c.name.clone())
        .collect();
    Some(u)
}

/// The minimal ops that turn `actual` into `desired`. An empty `desired` (no chains) means
/// "no table". `plan(d, observed(d))` is empty.
pub fn plan(desired: &FilterSpec, actual: &NftState) -> Vec<NftOp> {
    if desired.chains.is_empty() {
        return if actual.present {
            vec![NftOp::DeleteTable]
        } else {
            Vec::new()
        };
    }
    let replace = || vec![NftOp::ReplaceTable(Box::new(desired.clone()))];
    if !actual.present || actual.edited {
        return replace();
    }
    let want_hash = desired.rules_hash();
    // What the kernel holds of the rule part: the desired one when the marker says so, else
    // the one we last wrote if the marker names it.
    let known: Option<&FilterSpec> = match actual.rules_hash.as_deref() {
        Some(h) if h == want_hash => Some(desired),
        Some(h) => actual
            .rules
            .as_ref()
            .filter(|r| r.hash == h)
            .map(|r| r.spec.as_ref()),
        None => None,
    };
    let Some(known) = known else {
        return replace();
    };
    // A full listing also counts rules: chains flushed or added behind our back.
    if actual
        .rule_counts
        .as_ref()
        .is_some_and(|have| *have != rule_counts(known))
        || !known.sets.keys().eq(actual.sets.keys())
    {
        return replace();
    }
    let mut ops = Vec::new();
    let mut created: BTreeSet<&str> = BTreeSet::new();
    if !std::ptr::eq(known, desired) {
        let Some(update) = rule_update(desired, known, actual.rules_hash.as_deref().unwrap_or(""))
        else {
            return replace();
        };
        ops.push(NftOp::UpdateRules(Box::new(update)));
    }
    if let Some(NftOp::UpdateRules(u)) = ops.first() {
        created.extend(u.add_sets.iter().map(|(n, _)| n.as_str()));
    }
    let mut deletes = Vec::new();
    let mut adds = Vec::new();
    for (name, want) in desired
        .sets
        .iter()
        .filter(|(n, _)| !created.contains(n.as_str()))
    {
        let have = actual.sets.get(name).cloned().unwrap_or_default();
        let del: Vec<String> = have.difference(&want.elements).cloned().collect();
        let add: Vec<String> = want.elements.difference(&have).cloned().collect();
        if !del.is_empty() {
            deletes.push(NftOp::DeleteElements {
                set: name.clone(),
                elements: del,
            });
        }
        if !add.is_empty() {
            adds.push(NftOp::AddElements {
                set: name.clone(),
                elements: add,
            });
        }
    }
    // Deletes first, so an interval that changes shape never overlaps its old self.
    ops.extend(deletes);
    ops.extend(adds);
    ops
}

/// The `nft -f` script for a batch of ops (one transaction).
pub fn script(ops: &[NftOp]) -> String {
    let mut out = String::new();
    for op in ops {
        match op {
            NftOp::ReplaceTable(spec) => out.push_str(&spec.replace_script()),
            NftOp::UpdateRules(u) => out.push_str(&update_script(u)),
            NftOp::DeleteTable => out.push_str(&delete_script()),
            NftOp::DeleteElements { set, elements } => out.push_str(&format!(
                "delete element {TABLE_FAMILY} {TABLE} {set} {{ {} }}\n",
                elements.join(", ")
            )),
            NftOp::AddElements { set, elements } => out.push_str(&format!(
                "add element {TABLE_FAMILY} {TABLE} {set} {{ {} }}\n",
                elements.join(", ")
            )),
        }
    }
    out
}

/// The `nft -f` text of a [`RuleUpdate`].
fn update_script(u: &RuleUpdate) -> String {
    let t = format!("{TABLE_FAMILY} {TABLE}");
    let mut out = String::new();
    for (name, set) in &u.add_sets {
        out.push_str(&format!("add set {t} {name} {}\n", set_declaration(set)));
    }
    for (name, map) in &u.add_maps {
        out.push_str(&format!("add map {t} {name} {}\n", map_declaration(map)));
    }
    for name in &u.add_counters {
        out.push_str(&format!("add counter {t} {name}\n"));
    }
    for chain in &u.add_chains {
        out.push_str(&chain_script(chain, false));
    }
    for chain in &u.write_chains {
        out.push_str(&chain_script(chain, true));
    }
    for (map, keys) in &u.map_deletes {
        out.push_str(&format!(
            "delete element {t} {map} {{ {} }}\n",
            keys.join(", ")
        ));
    }
    for (map, elements) in &u.map_adds {
        let elements: Vec<String> = elements
            .iter()
            .map(|(k, chain)| format!("{k} : goto {chain}"))
            .collect();
        out.push_str(&format!(
            "add element {t} {map} {{ {} }}\n",
            elements.join(", ")
        ));
    }
    for name in &u.delete_chains {
        out.push_str(&format!("flush chain {t} {name}\n"));
    }
    for name in &u.delete_chains {
        out.push_str(&format!("delete chain {t} {name}\n"));
    }
    for name in &u.delete_maps {
        out.push_str(&format!("delete map {t} {name}\n"));
    }
    for name in &u.delete_sets {
        out.push_str(&format!("delete set {t} {name}\n"));
    }
    for name in &u.delete_counters {
        out.push_str(&format!("delete counter {t} {name}\n"));
    }
    out.push_str(&format!("add chain {t} hash-{}\n", u.new_hash));
    if !u.old_hash.is_empty() && u.old_hash != u.new_hash {
        out.push_str(&format!("delete chain {t} hash-{}\n", u.old_hash));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Family;
    use crate::policy::render::SetSpec;

    fn spec(elements: &[&str]) -> FilterSpec {
        FilterSpec {
            sets: BTreeMap::from([(
                "sel4-x".to_string(),
                SetSpec {
                    family: Family::V4,
                    kind: crate::policy::render::SetKind::Addr,
                    comment: "a == \"b\"".into(),
                    elements: elements.iter().map(|e| e.to_string()).collect(),
                },
            )]),
            chains: vec![crate::policy::render::ChainSpec {
                name: "filter-input".into(),
                base: None,
                rules: vec!["ip saddr @sel4-x drop".into()],
            }],
            ..FilterSpec::default()
        }
    }

    fn observed(s: &FilterSpec) -> NftState {
        NftState {
            present: true,
            rules_hash: Some(s.rules_hash()),
            sets: s
                .sets
                .iter()
                .map(|(n, x)| (n.clone(), x.elements.clone()))
                .collect(),
            rule_counts: None,
            edited: false,
            rules: None,
        }
    }

    #[test]
    fn plan_is_minimal() {
        let a = spec(&["10.0.0.1", "10.1.0.0/16"]);
        assert!(plan(&a, &observed(&a)).is_empty());
        assert!(matches!(
            plan(&a, &NftState::default()).as_slice(),
            [NftOp::ReplaceTable(_)]
        ));
        let b = spec(&["10.0.0.2", "10.1.0.0/16"]);
        assert_eq!(
            plan(&b, &observed(&a)),
            [
                NftOp::DeleteElements {
                    set: "sel4-x".into(),
                    elements: vec!["10.0.0.1".into()]
                },
                NftOp::AddElements {
                    set: "sel4-x".into(),
                    elements: vec!["10.0.0.2".into()]
                },
            ]
        );
        let mut c = a.clone();
        c.chains[0].rules[0] = "ip saddr @sel4-x accept".into();
        assert!(matches!(
            plan(&c, &observed(&a)).as_slice(),
            [NftOp::ReplaceTable(_)]
        ));
        assert_eq!(
            plan(&FilterSpec::default(), &observed(&a)),
            [NftOp::DeleteTable]
        );
        assert!(plan(&FilterSpec::default(), &NftState::default()).is_empty());
        assert_eq!(
            script(&plan(&b, &observed(&a))),
            "delete element inet wiremesh sel4-x { 10.0.0.1 }\nadd element inet wiremesh sel4-x { 10.0.0.2 }\n"
        );
    }

    proptest::proptest! {
        /// From any element state, applying plan(d, a) leaves nothing to do, and never replaces
        /// the table when only elements differ.
        #[test]
        fn plan_then_apply_converges(a in proptest::collection::btree_set(0u8..40, 0..20),
                                     b in proptest::collection::btree_set(0u8..40, 0..20)) {
            let elems = |s: &BTreeSet<u8>| s.iter().map(|i| format!("10.0.{i}.0/24")).collect::<Vec<_>>();
            let ea = elems(&a);
            let eb = elems(&b);
            let sa = spec(&ea.iter().map(String::as_str).collect::<Vec<_>>());
            let sb = spec(&eb.iter().map(String::as_str).collect::<Vec<_>>());
            let mut state = observed(&sa);
            let ops = plan(&sb, &state);
            proptest::prop_assert!(ops.iter().all(|o| !matches!(o, NftOp::ReplaceTable(_))));
            proptest::prop_assert!(ops.len() <= 2);
            state.apply_ops(&ops);
            proptest::prop_assert_eq!(&state, &observed(&sb));
            proptest::prop_assert!(plan(&sb, &state).is_empty());
        }
    }

    #[test]
    fn an_edited_table_is_replaced() {
        let a = spec(&["10.0.0.1"]);
        let mut state = observed(&a);
        assert!(plan(&a, &state).is_empty());
        state.edited = true;
        assert!(matches!(
            plan(&a, &state).as_slice(),
            [NftOp::ReplaceTable(_)]
        ));
        state.apply_ops(&plan(&a, &state));
        assert!(!state.edited);
        assert!(plan(&a, &state).is_empty());
    }
}

//! Our nftables table's model: what the kernel holds of it ([`NftState`]), the operations that
//! change it ([`NftOp`]), the pure [`plan`] from the rendered [`FilterSpec`] to those ops, and the
//! one `nft -f` transaction they make ([`script`]). The adapter that lists and writes the table
//! is `wiremesh_dataplane::nft`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::policy::render::{FilterSpec, TABLE, TABLE_FAMILY, delete_script};

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
                    };
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
    /// Replace the whole table atomically (rules changed, or the table is new).
    ReplaceTable(Box<FilterSpec>),
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
    let same_sets = desired.sets.keys().eq(actual.sets.keys());
    let same_rules = actual.rule_counts.as_ref().is_none_or(|have| {
        let want: BTreeMap<String, usize> = desired
            .chains
            .iter()
            .filter(|c| !c.rules.is_empty())
            .map(|c| (c.name.clone(), c.rules.len()))
            .collect();
        *have == want
    });
    if !actual.present
        || actual.rules_hash.as_deref() != Some(&desired.rules_hash())
        || !same_sets
        || !same_rules
        || actual.edited
    {
        return vec![NftOp::ReplaceTable(Box::new(desired.clone()))];
    }
    let mut deletes = Vec::new();
    let mut adds = Vec::new();
    for (name, want) in &desired.sets {
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
    deletes.extend(adds);
    deletes
}

/// The `nft -f` script for a batch of ops (one transaction).
pub fn script(ops: &[NftOp]) -> String {
    let mut out = String::new();
    for op in ops {
        match op {
            NftOp::ReplaceTable(spec) => out.push_str(&spec.replace_script()),
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

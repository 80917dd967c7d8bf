//! The selector syntax tree, its canonical printing and its evaluation
//! (`libcalico-go/lib/selector/parser/ast.go`).

use std::collections::BTreeSet;
use std::fmt;

use super::{Labels, Scope};

/// One node of a parsed selector.
///
/// The parser keeps two invariants that make the canonical form re-parse to the same tree:
/// `And`/`Or` have at least two operands, and `Not` never directly wraps `Not` (use
/// [`Expr::negated`] or `!`). Trees built by hand should keep them too.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Expr {
    /// `all()`: matches everything.
    All,
    /// `global()`: matches non-namespaced objects (see [`Scope`]).
    Global,
    /// `has(label)`: the label is present, with any value (even `""`).
    Has(String),
    /// `label == "value"`: present and equal.
    Eq(String, String),
    /// `label != "value"`: absent, or present with another value.
    Ne(String, String),
    /// `label contains "s"`: present and the value contains `s`.
    Contains(String, String),
    /// `label starts with "s"`.
    StartsWith(String, String),
    /// `label ends with "s"`.
    EndsWith(String, String),
    /// `label in {...}`: present and the value is in the set (never true for `{}`).
    In(String, BTreeSet<String>),
    /// `label not in {...}`: absent, or the value is not in the set (always true for `{}`).
    NotIn(String, BTreeSet<String>),
    /// `!x`.
    Not(Box<Expr>),
    /// `a && b && ...`.
    And(Vec<Expr>),
    /// `a || b || ...`.
    Or(Vec<Expr>),
}

impl Expr {
    /// Negation that cancels a double negation, so `Not(Not(_))` never appears. Also `!expr`.
    pub fn negated(self) -> Expr {
        match self {
            Expr::Not(inner) => *inner,
            other => Expr::Not(Box::new(other)),
        }
    }

    pub(crate) fn eval(&self, labels: &(impl Labels + ?Sized), scope: Scope) -> bool {
        let value = |label: &str| labels.get(label);
        match self {
            Expr::All => true,
            Expr::Global => scope != Scope::Namespaced,
            Expr::Has(l) => value(l).is_some(),
            Expr::Eq(l, v) => value(l) == Some(v.as_str()),
            Expr::Ne(l, v) => value(l) != Some(v.as_str()),
            Expr::Contains(l, v) => value(l).is_some_and(|x| x.contains(v.as_str())),
            Expr::StartsWith(l, v) => value(l).is_some_and(|x| x.starts_with(v.as_str())),
            Expr::EndsWith(l, v) => value(l).is_some_and(|x| x.ends_with(v.as_str())),
            Expr::In(l, set) => value(l).is_some_and(|x| set.contains(x)),
            Expr::NotIn(l, set) => value(l).is_none_or(|x| !set.contains(x)),
            Expr::Not(e) => !e.eval(labels, scope),
            Expr::And(es) => es.iter().all(|e| e.eval(labels, scope)),
            Expr::Or(es) => es.iter().any(|e| e.eval(labels, scope)),
        }
    }

    /// The label a leaf refers to, mutably (for prefixing).
    fn label_mut(&mut self) -> Option<&mut String> {
        match self {
            Expr::Has(l)
            | Expr::Eq(l, _)
            | Expr::Ne(l, _)
            | Expr::Contains(l, _)
            | Expr::StartsWith(l, _)
            | Expr::EndsWith(l, _)
            | Expr::In(l, _)
            | Expr::NotIn(l, _) => Some(l),
            Expr::All | Expr::Global | Expr::Not(_) | Expr::And(_) | Expr::Or(_) => None,
        }
    }

    fn children_mut(&mut self) -> &mut [Expr] {
        match self {
            Expr::Not(e) => std::slice::from_mut(&mut **e),
            Expr::And(es) | Expr::Or(es) => es,
            _ => &mut [],
        }
    }

    fn children(&self) -> &[Expr] {
        match self {
            Expr::Not(e) => std::slice::from_ref(&**e),
            Expr::And(es) | Expr::Or(es) => es,
            _ => &[],
        }
    }

    /// Calls `f` on every label referenced, in canonical order.
    pub(crate) fn for_each_label<'a>(&'a self, f: &mut impl FnMut(&'a str)) {
        match self {
            Expr::Has(l)
            | Expr::Eq(l, _)
            | Expr::Ne(l, _)
            | Expr::Contains(l, _)
            | Expr::StartsWith(l, _)
            | Expr::EndsWith(l, _)
            | Expr::In(l, _)
            | Expr::NotIn(l, _) => f(l),
            _ => self.children().iter().for_each(|c| c.for_each_label(f)),
        }
    }

    /// Calico's `PrefixVisitor`: prepends `prefix` to every label.
    pub(crate) fn prefix_labels(&mut self, prefix: &str) {
        if let Some(l) = self.label_mut() {
            l.insert_str(0, prefix);
        }
        for c in self.children_mut() {
            c.prefix_labels(prefix);
        }
    }

    /// Replaces every `all()` or `global()` leaf (chosen by `target`) with `with`.
    pub(crate) fn replace_leaf(&mut self, target: &Expr, with: &Expr) {
        if self == target {
            *self = with.clone();
            return;
        }
        for c in self.children_mut() {
            c.replace_leaf(target, with);
        }
        // A replacement may have put a Not directly under a Not; restore the invariant.
        if let Expr::Not(inner) = self
            && let Expr::Not(_) = **inner
        {
            let taken = std::mem::replace(&mut **inner, Expr::All);
            *self = taken.negated();
        }
    }
}

impl std::ops::Not for Expr {
    type Output = Expr;
    fn not(self) -> Expr {
        self.negated()
    }
}

/// Calico's quoting: double quotes unless the value contains one.
fn write_quoted(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    let q = if s.contains('"') { '\'' } else { '"' };
    write!(f, "{q}{s}{q}")
}

fn write_set(
    f: &mut fmt::Formatter<'_>,
    label: &str,
    op: &str,
    set: &BTreeSet<String>,
) -> fmt::Result {
    write!(f, "{label} {op} {{")?;
    for (i, item) in set.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write_quoted(f, item)?;
    }
    f.write_str("}")
}

fn write_joined(f: &mut fmt::Formatter<'_>, es: &[Expr], sep: &str) -> fmt::Result {
    f.write_str("(")?;
    for (i, e) in es.iter().enumerate() {
        if i > 0 {
            f.write_str(sep)?;
        }
        write!(f, "{e}")?;
    }
    f.write_str(")")
}

/// The canonical form, exactly as Calico's `String()` prints it.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = |f: &mut fmt::Formatter<'_>, l: &str, op: &str, v: &str| {
            write!(f, "{l} {op} ")?;
            write_quoted(f, v)
        };
        match self {
            Expr::All => f.write_str("all()"),
            Expr::Global => f.write_str("global()"),
            Expr::Has(l) => write!(f, "has({l})"),
            Expr::Eq(l, v) => op(f, l, "==", v),
            Expr::Ne(l, v) => op(f, l, "!=", v),
            Expr::Contains(l, v) => op(f, l, "contains", v),
            Expr::StartsWith(l, v) => op(f, l, "starts with", v),
            Expr::EndsWith(l, v) => op(f, l, "ends with", v),
            Expr::In(l, set) => write_set(f, l, "in", set),
            Expr::NotIn(l, set) => write_set(f, l, "not in", set),
            Expr::Not(e) => write!(f, "!{e}"),
            // Hand-built empty nodes (never produced by the parser) print as their identity.
            Expr::And(es) if es.is_empty() => f.write_str("all()"),
            Expr::Or(es) if es.is_empty() => f.write_str("!all()"),
            Expr::And(es) => write_joined(f, es, " && "),
            Expr::Or(es) => write_joined(f, es, " || "),
        }
    }
}

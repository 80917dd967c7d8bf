//! Calico's label selector language: parsing, evaluation, canonical form and selector IDs.
//!
//! Accepts exactly what Calico's `libcalico-go/lib/selector` accepts and prints the same
//! canonical form and IDs; see `docs/selectors.md` for the grammar, the quirks kept on purpose
//! and the few deliberate differences.
//!
//! ```
//! use std::collections::BTreeMap;
//! use wiremesh_core::selector::Selector;
//!
//! let sel: Selector = "role == 'db' && env in {'prod', 'staging'}".parse().unwrap();
//! assert_eq!(sel.to_string(), r#"(role == "db" && env in {"prod", "staging"})"#);
//! let labels = BTreeMap::from([("role".to_string(), "db".to_string()),
//!                              ("env".to_string(), "prod".to_string())]);
//! assert!(sel.matches(&labels));
//! ```

mod ast;
mod error;
mod lexer;
mod parser;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

pub use ast::Expr;
pub use error::SelectorError;
pub use lexer::MAX_LABEL_LEN;
pub use parser::MAX_DEPTH;

/// A set of labels a selector can be evaluated against.
///
/// Implemented for `BTreeMap`/`HashMap` of strings; implement it for a view that layers an
/// endpoint's own labels over inherited profile labels.
pub trait Labels {
    fn get(&self, key: &str) -> Option<&str>;
}

impl Labels for BTreeMap<String, String> {
    fn get(&self, key: &str) -> Option<&str> {
        BTreeMap::get(self, key).map(String::as_str)
    }
}

impl<S: std::hash::BuildHasher> Labels for HashMap<String, String, S> {
    fn get(&self, key: &str) -> Option<&str> {
        HashMap::get(self, key).map(String::as_str)
    }
}

impl<L: Labels + ?Sized> Labels for &L {
    fn get(&self, key: &str) -> Option<&str> {
        (**self).get(key)
    }
}

/// What kind of object a selector is evaluated against; only `global()` looks at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Scope {
    /// Calico's plain evaluation: `global()` is true, like `all()`.
    #[default]
    Any,
    /// A non-namespaced object (HostEndpoint, GlobalNetworkSet): `global()` is true.
    Global,
    /// A namespaced object (pod, NetworkSet): `global()` is false.
    Namespaced,
}

/// A parsed selector. Equality is structural, which is the same as equal canonical forms and
/// equal [`unique_id`](Selector::unique_id)s.
///
/// `Default` is `all()`, like an empty selector. Serialises as its canonical string;
/// deserialises from a string and fails on an invalid selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    root: Expr,
}

impl Default for Selector {
    fn default() -> Self {
        Selector { root: Expr::All }
    }
}

impl Selector {
    /// Parses a selector; the empty (or all-space) string is `all()`.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        parser::parse(input).map(|root| Selector { root })
    }

    /// `all()`.
    pub fn all() -> Self {
        Self::default()
    }

    /// Wraps a hand-built tree (see [`Expr`] for the invariants it should keep).
    pub fn from_expr(root: Expr) -> Self {
        Selector { root }
    }

    pub fn expr(&self) -> &Expr {
        &self.root
    }

    pub fn into_expr(self) -> Expr {
        self.root
    }

    /// Calico's `Evaluate`: `global()` counts as true.
    pub fn matches(&self, labels: &(impl Labels + ?Sized)) -> bool {
        self.root.eval(labels, Scope::Any)
    }

    /// Evaluation that knows whether the object is namespaced, for `global()`.
    pub fn matches_in(&self, labels: &(impl Labels + ?Sized), scope: Scope) -> bool {
        self.root.eval(labels, scope)
    }

    /// The canonical form, as Calico's `String()`: `(a && b)`, `!x`, `l == "v"`,
    /// `l in {"a", "b"}`, `has(l)`, `all()`.
    pub fn canonical(&self) -> String {
        self.root.to_string()
    }

    /// Calico's `UniqueID()`: `"s:" + base64url_nopad(SHA-224("s:" + canonical))`, for example
    /// `s:5y5I3VdRZfDU01O--xXAPx2yxCQQqMf0M6IWug` for `all()`. Used to name IP sets.
    pub fn unique_id(&self) -> String {
        use sha2::Digest as _;
        let digest = sha2::Sha224::digest(format!("s:{}", self.root).as_bytes());
        format!("s:{}", URL_SAFE_NO_PAD.encode(digest))
    }

    /// Every label key the selector mentions, for indexing endpoints by the labels that can
    /// change a selector's result. `all()` and `global()` mention none.
    pub fn label_keys(&self) -> BTreeSet<&str> {
        let mut keys = BTreeSet::new();
        self.root.for_each_label(&mut |l| {
            keys.insert(l);
        });
        keys
    }

    /// Calico's `PrefixVisitor`: prepends `prefix` to every label (namespaceSelector gets
    /// `pcns.`, serviceAccountSelector `pcsa.`).
    pub fn with_label_prefix(mut self, prefix: &str) -> Self {
        self.root.prefix_labels(prefix);
        self
    }

    /// Replaces every `all()` with `with` (e.g. `has(projectcalico.org/namespace)`).
    pub fn replace_all(mut self, with: &Expr) -> Self {
        self.root.replace_leaf(&Expr::All, with);
        self
    }

    /// Replaces every `global()` with `with` (e.g. `!has(projectcalico.org/namespace)`).
    pub fn replace_global(mut self, with: &Expr) -> Self {
        self.root.replace_leaf(&Expr::Global, with);
        self
    }

    /// True if `global()` appears anywhere (validation rejects it in most fields).
    pub fn uses_global(&self) -> bool {
        fn walk(e: &Expr) -> bool {
            match e {
                Expr::Global => true,
                Expr::Not(x) => walk(x),
                Expr::And(xs) | Expr::Or(xs) => xs.iter().any(walk),
                _ => false,
            }
        }
        walk(&self.root)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.root.fmt(f)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

impl TryFrom<&str> for Selector {
    type Error = SelectorError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Selector::parse(s)
    }
}

impl TryFrom<String> for Selector {
    type Error = SelectorError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Selector::parse(&s)
    }
}

impl From<Selector> for String {
    fn from(s: Selector) -> String {
        s.canonical()
    }
}

impl serde::Serialize for Selector {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.root)
    }
}

impl<'de> serde::Deserialize<'de> for Selector {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Selector;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a Calico label selector string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Selector, E> {
                Selector::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

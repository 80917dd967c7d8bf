//! The nftables subsystem: our one table `inet wiremesh`, and nothing else.
//!
//! `observe()` lists our table (`nft -j list table inet wiremesh`): its sets with their elements
//! and the hash of its rule part (the name of the empty marker chain `hash-<hex>`, see
//! [`crate::policy::render`]). `plan()` is pure: when the rule part differs it replaces the whole
//! table in one transaction (`add table; delete table; table { ... }`), otherwise it emits only
//! set-element additions and deletions. `apply()` runs all ops as one `nft -f -` transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::process::Stdio;

use async_trait::async_trait;
use ipnet::IpNet;
use tokio::io::AsyncWriteExt as _;

use super::DataplaneError;
use crate::policy::render::{FilterSpec, TABLE, TABLE_FAMILY, delete_script, element_text};

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

#[async_trait]
pub trait FilterDataplane: Send {
    async fn observe(&mut self) -> Result<NftState, DataplaneError>;
    /// Applies every op in one transaction.
    async fn apply(&mut self, ops: &[NftOp]) -> Result<(), DataplaneError>;
    /// This host's interfaces and their addresses, for host endpoints identified by
    /// `expectedIPs` only. Asked only when such an endpoint exists.
    async fn local_interfaces(
        &mut self,
    ) -> Result<BTreeMap<String, BTreeSet<IpAddr>>, DataplaneError> {
        Ok(BTreeMap::new())
    }
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

/// Removes our table if present (policy disabled).
pub async fn remove_table(filter: &mut dyn FilterDataplane) -> Result<(), DataplaneError> {
    let actual = filter.observe().await?;
    filter.apply(&plan(&FilterSpec::default(), &actual)).await
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

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("running nft: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft failed ({status}): {stderr}")]
    Failed { status: String, stderr: String },
    #[error("nft -j output: {0}")]
    Json(String),
}

/// Parses `nft -j list ...` outputs (a table listing, or `list chains inet` plus `list sets
/// inet`) into our state; objects of other tables are ignored.
pub fn parse_listing(json: &str) -> Result<NftState, NftError> {
    parse_listings(&[json])
}

pub fn parse_listings(jsons: &[&str]) -> Result<NftState, NftError> {
    let mut state = NftState::default();
    for json in jsons {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| NftError::Json(e.to_string()))?;
        let items = value
            .get("nftables")
            .and_then(|v| v.as_array())
            .ok_or_else(|| NftError::Json("no \"nftables\" array".into()))?;
        for item in items {
            let ours = |obj: &serde_json::Value, field: &str| {
                obj.get("family").and_then(|f| f.as_str()) == Some(TABLE_FAMILY)
                    && obj.get(field).and_then(|t| t.as_str()) == Some(TABLE)
            };
            if let Some(table) = item.get("table") {
                if ours(table, "name") {
                    state.present = true;
                }
            } else if let Some(rule) = item.get("rule") {
                if !ours(rule, "table") {
                    continue;
                }
                if let Some(chain) = rule.get("chain").and_then(|c| c.as_str()) {
                    *state
                        .rule_counts
                        .get_or_insert_with(BTreeMap::new)
                        .entry(chain.to_string())
                        .or_default() += 1;
                }
            } else if let Some(chain) = item.get("chain") {
                if !ours(chain, "table") {
                    continue;
                }
                state.present = true;
                if let Some(hash) = chain
                    .get("name")
                    .and_then(|n| n.as_str())
                    .and_then(|n| n.strip_prefix("hash-"))
                {
                    state.rules_hash = Some(hash.to_string());
                }
            } else if let Some(set) = item.get("set") {
                if !ours(set, "table") {
                    continue;
                }
                state.present = true;
                let Some(name) = set.get("name").and_then(|n| n.as_str()) else {
                    continue;
                };
                let mut elements = BTreeSet::new();
                for e in set
                    .get("elem")
                    .and_then(|e| e.as_array())
                    .into_iter()
                    .flatten()
                {
                    elements.insert(element_from_json(e)?);
                }
                state.sets.insert(name.to_string(), elements);
            }
        }
    }
    Ok(state)
}

fn element_from_json(e: &serde_json::Value) -> Result<String, NftError> {
    let bad = || NftError::Json(format!("unexpected set element {e}"));
    if let Some(s) = e.as_str() {
        let addr: IpAddr = s.parse().map_err(|_| bad())?;
        return Ok(element_text(&IpNet::from(addr)));
    }
    if let Some(inner) = e.get("elem").and_then(|x| x.get("val")) {
        return element_from_json(inner);
    }
    if let Some(p) = e.get("prefix") {
        let addr: IpAddr = p
            .get("addr")
            .and_then(|a| a.as_str())
            .and_then(|a| a.parse().ok())
            .ok_or_else(bad)?;
        let len = p
            .get("len")
            .and_then(|l| l.as_u64())
            .and_then(|l| u8::try_from(l).ok())
            .ok_or_else(bad)?;
        let net = IpNet::new(addr, len).map_err(|_| bad())?;
        return Ok(element_text(&net));
    }
    if let Some(r) = e.get("range").and_then(|r| r.as_array()) {
        // We never write ranges; keep it verbatim so plan() deletes it.
        let parts: Vec<String> = r
            .iter()
            .map(|x| x.as_str().unwrap_or("?").to_string())
            .collect();
        return Ok(parts.join("-"));
    }
    Err(bad())
}

/// The real implementation: the `nft` binary, optionally inside a named network namespace.
#[derive(Debug, Clone, Default)]
pub struct KernelNft {
    netns: Option<String>,
    /// What we last applied (or fully observed), and when it was fully observed last.
    cache: Option<(std::time::Instant, NftState)>,
}

/// How long set elements may be taken from the cache before a full listing (drift in the
/// rule part is seen at every observe through the hash chain).
pub const FULL_OBSERVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(300);

impl KernelNft {
    pub fn new() -> Self {
        KernelNft {
            netns: None,
            cache: None,
        }
    }

    /// Runs `nft` through `ip netns exec <name>` (tests, the lab, the bench).
    pub fn in_netns(name: &str) -> Self {
        KernelNft {
            netns: Some(name.to_string()),
            cache: None,
        }
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns, "nft"]);
                c
            }
            None => tokio::process::Command::new("nft"),
        };
        cmd.args(args);
        cmd.kill_on_drop(true);
        cmd
    }

    /// Runs `nft -f -` with `text` on standard input.
    pub async fn run_script(&self, text: &str) -> Result<(), NftError> {
        let mut child = self
            .command(&["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(NftError::Spawn)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(text.as_bytes())
                .await
                .map_err(NftError::Spawn)?;
        }
        let out = child.wait_with_output().await.map_err(NftError::Spawn)?;
        if !out.status.success() {
            return Err(NftError::Failed {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// `nft args...`; its standard output.
    pub async fn run(&self, args: &[&str]) -> Result<String, NftError> {
        let out = self
            .command(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(NftError::Spawn)?;
        if !out.status.success() {
            return Err(NftError::Failed {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

#[async_trait]
impl FilterDataplane for KernelNft {
    async fn observe(&mut self) -> Result<NftState, DataplaneError> {
        // `list chains` is cheap even with thousands of rules and shows the hash chain. Listing
        // sets or rules is not (nft fetches every anonymous set too), so set elements come from
        // what we last applied while the hash is unchanged, with a full listing (elements and
        // rule counts) at start-up, after a failure or hash change, and every
        // FULL_OBSERVE_INTERVAL.
        let what = || format!("nft table {TABLE_FAMILY} {TABLE}");
        let chains = self
            .run(&["-j", "list", "chains", TABLE_FAMILY])
            .await
            .map_err(|e| DataplaneError::observe(what(), e))?;
        let quick = parse_listings(&[&chains]).map_err(|e| DataplaneError::observe(what(), e))?;
        if let Some((at, cached)) = &self.cache
            && at.elapsed() < FULL_OBSERVE_INTERVAL
            && cached.present == quick.present
            && cached.rules_hash == quick.rules_hash
        {
            return Ok(cached.clone());
        }
        if !quick.present {
            self.cache = Some((std::time::Instant::now(), quick.clone()));
            return Ok(quick);
        }
        // The full listing: sets with elements, and the rules (counted per chain).
        let table = match self
            .run(&["-j", "list", "table", TABLE_FAMILY, TABLE])
            .await
        {
            Ok(t) => t,
            Err(NftError::Failed { stderr, .. }) if stderr.contains("No such file") => {
                self.cache = None;
                return Ok(NftState::default());
            }
            Err(e) => return Err(DataplaneError::observe(what(), e)),
        };
        let mut full =
            parse_listings(&[&chains, &table]).map_err(|e| DataplaneError::observe(what(), e))?;
        full.rule_counts.get_or_insert_with(BTreeMap::new);
        self.cache = Some((std::time::Instant::now(), full.clone()));
        Ok(full)
    }

    async fn local_interfaces(
        &mut self,
    ) -> Result<BTreeMap<String, BTreeSet<IpAddr>>, DataplaneError> {
        let mut cmd = tokio::process::Command::new("ip");
        if let Some(ns) = &self.netns {
            cmd.args(["-n", ns]);
        }
        let out = cmd
            .args(["-j", "addr", "show"])
            .output()
            .await
            .map_err(|e| DataplaneError::observe("interface addresses", e))?;
        if !out.status.success() {
            return Err(DataplaneError::observe(
                "interface addresses",
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        parse_ip_addr_json(&out.stdout)
            .map_err(|e| DataplaneError::observe("interface addresses", e))
    }

    async fn apply(&mut self, ops: &[NftOp]) -> Result<(), DataplaneError> {
        if ops.is_empty() {
            return Ok(());
        }
        let summary = ops.iter().map(NftOp::kind).collect::<Vec<_>>().join(", ");
        let result = self
            .run_script(&script(ops))
            .await
            .map_err(|e| DataplaneError::apply(format!("nft transaction ({summary})"), e));
        match (&result, self.cache.as_mut()) {
            (Ok(()), Some((_, state))) => state.apply_ops(ops),
            // After a failure (or without a baseline) the next observe lists everything.
            _ => self.cache = None,
        }
        result
    }
}

/// Parses `ip -j addr show` into interface -> addresses.
pub fn parse_ip_addr_json(
    json: &[u8],
) -> Result<BTreeMap<String, BTreeSet<IpAddr>>, serde_json::Error> {
    let links: Vec<serde_json::Value> = serde_json::from_slice(json)?;
    let mut out = BTreeMap::new();
    for link in links {
        let Some(name) = link.get("ifname").and_then(|n| n.as_str()) else {
            continue;
        };
        let addrs: BTreeSet<IpAddr> = link
            .get("addr_info")
            .and_then(|a| a.as_array())
            .into_iter()
            .flatten()
            .filter_map(|a| a.get("local")?.as_str()?.parse().ok())
            .collect();
        out.insert(name.to_string(), addrs);
    }
    Ok(out)
}

/// In-memory fake: keeps the state `plan()` reasons about and records every op.
#[cfg(any(test, feature = "fake"))]
#[derive(Debug, Clone, Default)]
pub struct FakeNft {
    pub state: std::sync::Arc<std::sync::Mutex<FakeNftState>>,
}

#[cfg(any(test, feature = "fake"))]
#[derive(Debug, Clone, Default)]
pub struct FakeNftState {
    pub table: NftState,
    /// The last full table written.
    pub spec: Option<FilterSpec>,
    pub log: Vec<String>,
    pub fail_next_apply: Option<String>,
    /// What `local_interfaces` reports.
    pub interfaces: BTreeMap<String, BTreeSet<IpAddr>>,
}

#[cfg(any(test, feature = "fake"))]
impl FakeNft {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, FakeNftState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().log)
    }
}

#[cfg(any(test, feature = "fake"))]
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Injected(String);

#[cfg(any(test, feature = "fake"))]
#[async_trait]
impl FilterDataplane for FakeNft {
    async fn observe(&mut self) -> Result<NftState, DataplaneError> {
        Ok(self.lock().table.clone())
    }

    async fn local_interfaces(
        &mut self,
    ) -> Result<BTreeMap<String, BTreeSet<IpAddr>>, DataplaneError> {
        Ok(self.lock().interfaces.clone())
    }

    async fn apply(&mut self, ops: &[NftOp]) -> Result<(), DataplaneError> {
        let mut s = self.lock();
        if let Some(msg) = s.fail_next_apply.take() {
            return Err(DataplaneError::apply("injected failure", Injected(msg)));
        }
        for op in ops {
            s.log.push(format!("{}: {op}", op.kind()));
            match op {
                NftOp::ReplaceTable(spec) => s.spec = Some((**spec).clone()),
                NftOp::DeleteTable => s.spec = None,
                _ => {}
            }
        }
        s.table.apply_ops(ops);
        Ok(())
    }
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

    #[test]
    fn parses_listing() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "wiremesh", "handle": 1}},
            {"set": {"family": "inet", "name": "sel4-x", "table": "wiremesh", "type": "ipv4_addr", "handle": 4,
                     "flags": ["interval"], "elem": [{"prefix": {"addr": "10.0.0.0", "len": 24}}, "10.1.0.1",
                     {"elem": {"val": "10.2.0.1", "comment": "x"}}]}},
            {"chain": {"family": "inet", "table": "wiremesh", "name": "hash-abc", "handle": 1}}]}"#;
        let s = parse_listing(json).expect("parse");
        assert_eq!(s.rules_hash.as_deref(), Some("abc"));
        assert_eq!(
            s.sets["sel4-x"]
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            ["10.0.0.0/24", "10.1.0.1", "10.2.0.1"]
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
    fn parses_ip_addr_json() {
        let json = br#"[{"ifindex":1,"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
                        {"ifindex":2,"ifname":"eth0","addr_info":[{"family":"inet","local":"172.30.0.1","prefixlen":24},
                                                                 {"family":"inet6","local":"fe80::1","prefixlen":64}]}]"#;
        let m = parse_ip_addr_json(json).expect("parse");
        assert_eq!(m.len(), 2);
        assert_eq!(m["eth0"].len(), 2);
    }

    #[tokio::test]
    async fn fake_converges() {
        let mut fake = FakeNft::default();
        let a = spec(&["10.0.0.1"]);
        let ops = plan(&a, &fake.observe().await.expect("observe"));
        fake.apply(&ops).await.expect("apply");
        assert!(plan(&a, &fake.observe().await.expect("observe")).is_empty());
        assert_eq!(fake.take_log().len(), 1);
    }
}

//! The dependency rules of docs/architecture.md, checked.
//!
//! Between crates the compiler holds them (a crate can only use what its Cargo.toml lists);
//! this test holds the Cargo.toml files to the rules: which of our crates each may depend on,
//! and that the pure core's whole dependency tree has no async runtime, datastore client,
//! netlink or process-control crate. Inside each crate, the modules form layers: a module may
//! use only modules listed before it, so there is no import circle and nothing imports upward.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(root())
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("metadata JSON")
}

/// Our crates and the crates of ours each depends on (normal dependencies).
const CRATE_RULES: &[(&str, &[&str])] = &[
    ("wiremesh-core", &[]),
    ("wiremesh-datastore", &["wiremesh-core"]),
    ("wiremesh-dataplane", &["wiremesh-core"]),
    (
        "wiremesh-agent",
        &["wiremesh-core", "wiremesh-datastore", "wiremesh-dataplane"],
    ),
    (
        "wiremesh",
        &[
            "wiremesh-core",
            "wiremesh-datastore",
            "wiremesh-dataplane",
            "wiremesh-agent",
        ],
    ),
];

/// Crates that must never be in the core's dependency tree.
const NOT_IN_CORE: &[&str] = &[
    "tokio",
    "kube",
    "kube-client",
    "kube-runtime",
    "etcd-client",
    "tonic",
    "hyper",
    "axum",
    "rtnetlink",
    "netlink-packet-route",
    "netlink-sys",
    "defguard_wireguard_rs",
    "nix",
    "prometheus-client",
    "tracing",
];

#[test]
fn crates_depend_only_as_the_rules_say() {
    let meta = metadata();
    let packages = meta["packages"].as_array().expect("packages");
    for (name, allowed) in CRATE_RULES {
        let package = packages
            .iter()
            .find(|p| p["name"] == *name)
            .unwrap_or_else(|| panic!("no package {name}"));
        let ours: BTreeSet<&str> = package["dependencies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["kind"].is_null())
            .filter_map(|d| d["name"].as_str())
            .filter(|d| d.starts_with("wiremesh"))
            .collect();
        let allowed: BTreeSet<&str> = allowed.iter().copied().collect();
        assert_eq!(ours, allowed, "{name}'s dependencies on our crates");
    }
}

#[test]
fn the_core_is_pure() {
    let meta = metadata();
    let nodes = meta["resolve"]["nodes"].as_array().expect("resolve");
    let by_id: BTreeMap<&str, &Value> = nodes
        .iter()
        .filter_map(|n| Some((n["id"].as_str()?, n)))
        .collect();
    let name_of = |id: &str| -> String {
        meta["packages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["id"] == id)
            .and_then(|p| p["name"].as_str())
            .unwrap_or(id)
            .to_string()
    };
    let core = nodes
        .iter()
        .find(|n| name_of(n["id"].as_str().unwrap_or_default()) == "wiremesh-core")
        .expect("core in the resolve graph");
    // Everything the core's library needs to build and run (normal dependencies only).
    let mut seen = BTreeSet::new();
    let mut stack = vec![core["id"].as_str().unwrap_or_default()];
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        for dep in by_id[id]["deps"].as_array().into_iter().flatten() {
            let normal = dep["dep_kinds"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k["kind"].is_null());
            if normal && let Some(pkg) = dep["pkg"].as_str() {
                stack.push(pkg);
            }
        }
    }
    let names: BTreeSet<String> = seen.iter().map(|id| name_of(id)).collect();
    let forbidden: Vec<&&str> = NOT_IN_CORE.iter().filter(|n| names.contains(**n)).collect();
    assert!(
        forbidden.is_empty(),
        "wiremesh-core's dependency tree contains {forbidden:?}"
    );
}

/// The modules of one directory (files `x.rs` and folders `x/`), bottom layer first: each may
/// use only the ones before it.
const MODULE_LAYERS: &[(&str, &str, &[&str])] = &[
    (
        "crates/core/src",
        "crate",
        &[
            "selector",
            "wire",
            "model",
            "keys",
            "policy",
            "config",
            "mesh",
            "guard",
            "manifest",
            "dataplane",
        ],
    ),
    (
        "crates/core/src/policy",
        "crate::policy",
        &[
            "model",
            "workload",
            "resources",
            "program",
            "explain",
            "render",
            "analysis",
        ],
    ),
    (
        "crates/core/src/wire",
        "crate::wire",
        &[
            "common", "felix", "network", "policy", "workload", "knp", "crd",
        ],
    ),
    (
        "crates/datastore/src",
        "crate",
        &["etcd", "kube", "fake", "config"],
    ),
    (
        "crates/dataplane/src",
        "crate",
        &[
            "netlink",
            "link",
            "route",
            "events",
            "wireguard",
            "nft",
            "fake",
        ],
    ),
    (
        "crates/dataplane/src/wireguard",
        "crate::wireguard",
        &["kernel", "userspace", "backend"],
    ),
    (
        "crates/agent/src",
        "crate",
        &[
            "settings",
            "keystore",
            "status_file",
            "outcome",
            "report",
            "metrics",
            "admin",
            "mesh",
            "policy",
            "reconcile",
            "run",
        ],
    ),
    ("src", "crate", &["netns", "cli"]),
    (
        "src/cli",
        "crate::cli",
        &[
            "output",
            "datastore",
            "crds",
            "status",
            "graph",
            "policy",
            "rotate_key",
            "agent",
            "bench",
            "bench_policy",
            "lab",
        ],
    ),
];

/// Every `.rs` file of a module (a file, or a folder and everything in it), without the test
/// modules (`tests.rs`, and `mod tests` at the end of a file), which may use anything.
fn module_sources(dir: &Path, module: &str) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    let file = dir.join(format!("{module}.rs"));
    if file.exists() {
        files.push(file);
    }
    let folder = dir.join(module);
    let mut stack = vec![folder];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs")
                && path.file_name().is_some_and(|n| n != "tests.rs")
            {
                files.push(path);
            }
        }
    }
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).expect("read source");
            let code = match text.find("#[cfg(test)]\nmod tests") {
                Some(at) => text[..at].to_string(),
                None => text,
            };
            (f, code_only(&code))
        })
        .collect()
}

/// The sibling modules `code` (a file directly in the directory at `prefix`) refers to:
/// `prefix::x`, `use prefix::{x, y::z}`, and for a file directly in the directory, `super::x`.
fn references(code: &str, prefix: &str, direct: bool) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut heads = vec![format!("{prefix}::")];
    if direct && prefix != "crate" {
        heads.push("super::".into());
    }
    for head in heads {
        let mut rest = code;
        while let Some(at) = rest.find(&head) {
            let before = rest[..at].chars().last();
            rest = &rest[at + head.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                // The first path segment of each top-level item of the group.
                let mut depth = 0;
                let mut item = String::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            out.insert(first_segment(&item));
                            item.clear();
                            continue;
                        }
                        _ => {}
                    }
                    item.push(c);
                }
                out.insert(first_segment(&item));
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                out.insert(name);
            }
        }
    }
    out
}

fn first_segment(path: &str) -> String {
    path.trim()
        .split("::")
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `text` without comment lines (doc links name modules without using them).
fn code_only(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn modules_form_layers() {
    let mut problems = Vec::new();
    for (dir, prefix, layers) in MODULE_LAYERS {
        let dir = root().join(dir);
        // Every module of the directory is in the list (a new one must be placed).
        for entry in std::fs::read_dir(&dir).expect("module dir").flatten() {
            let path = entry.path();
            let name = path
                .file_stem()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let is_module = path.is_dir() || path.extension().is_some_and(|e| e == "rs");
            if is_module
                && !["lib", "main", "mod", "tests"].contains(&name.as_str())
                && !layers.contains(&name.as_str())
            {
                problems.push(format!("{}: module {name} has no layer", dir.display()));
            }
        }
        for (level, module) in layers.iter().enumerate() {
            for (file, code) in module_sources(&dir, module) {
                let direct = file.parent() == Some(dir.as_path());
                for used in references(&code, prefix, direct) {
                    let Some(used_level) = layers.iter().position(|m| *m == used) else {
                        continue; // a crate-root item (error type, re-export) or not a sibling
                    };
                    if used_level > level || (used_level == level && used != *module) {
                        problems.push(format!(
                            "{}: {module} uses {used}, which is above it",
                            file.strip_prefix(root()).unwrap_or(&file).display()
                        ));
                    }
                }
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_reference_scanner_reads_use_groups() {
    let code = "use crate::{model::Family, wire::{self, Kind}};\nlet x = crate::mesh::desired(&i);\nuse super::program::Program;";
    let found = references(code, "crate", false);
    assert_eq!(
        found,
        ["mesh", "model", "wire"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    let found = references(code, "crate::policy", true);
    assert_eq!(found, ["program"].iter().map(|s| s.to_string()).collect());
}

//! `wiremesh graph`: the mesh as a Graphviz DOT graph, drawn from `wiremesh status` reports
//! (one per node; each node only sees its own side). Nodes are boxes (red when their verdict is
//! not OK), tunnels are edges labelled with the handshake age seen from each end, an edge with
//! an agreement problem on either end is red, a skipped node is a dashed red edge.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::PathBuf;

use crate::cli::status::{Level, StatusReport};

/// One tunnel seen from both ends.
#[derive(Default)]
struct Edge {
    /// (from, handshake age text, agrees, first problem)
    views: Vec<(String, String, bool, Option<String>)>,
    skipped: Option<String>,
}

fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// DOT for the reports (deterministic: nodes and edges sorted).
pub fn render(reports: &[StatusReport]) -> String {
    let mut nodes: BTreeMap<String, Option<Level>> = BTreeMap::new();
    let mut edges: BTreeMap<(String, String), Edge> = BTreeMap::new();
    let pair = |a: &str, b: &str| {
        if a <= b {
            (a.to_string(), b.to_string())
        } else {
            (b.to_string(), a.to_string())
        }
    };
    for r in reports {
        nodes.insert(r.node.clone(), Some(r.verdict.level));
        for d in &r.devices {
            for p in &d.peers {
                nodes.entry(p.node.clone()).or_insert(None);
                let age = match p.handshake_age_seconds {
                    Some(a) => format!("{a}s"),
                    None => "never".into(),
                };
                edges
                    .entry(pair(&r.node, &p.node))
                    .or_default()
                    .views
                    .push((r.node.clone(), age, p.agrees, p.problems.first().cloned()));
            }
        }
        for s in &r.skipped {
            nodes.entry(s.node.clone()).or_insert(None);
            edges.entry(pair(&r.node, &s.node)).or_default().skipped =
                Some(format!("skipped: {}", s.reason));
        }
    }
    let mut out = String::from(
        "graph wiremesh {\n  layout=circo;\n  node [shape=box, style=rounded, fontname=\"sans\"];\n  edge [fontname=\"sans\", fontsize=10];\n",
    );
    for (name, level) in &nodes {
        let (color, note) = match level {
            Some(Level::Ok) => ("darkgreen", ""),
            Some(Level::Degraded) => ("red", "\\nDEGRADED"),
            Some(Level::Down) => ("red", "\\nDOWN"),
            None => ("gray", "\\n(no report)"),
        };
        out.push_str(&format!(
            "  {} [label=\"{}{note}\", color={color}];\n",
            quote(name),
            name.replace('"', "\\\"")
        ));
    }
    for ((a, b), e) in &edges {
        let mut label: Vec<String> = e
            .views
            .iter()
            .map(|(from, age, _, problem)| match problem {
                Some(p) => format!("{from}: {age}, {p}"),
                None => format!("{from}: {age}"),
            })
            .collect();
        if let Some(s) = &e.skipped {
            label.push(s.clone());
        }
        let bad = e.skipped.is_some() || e.views.iter().any(|(_, _, agrees, _)| !agrees);
        let style = match (&e.skipped, bad) {
            (Some(_), _) => "color=red, style=dashed",
            (None, true) => "color=red, penwidth=2",
            (None, false) => "color=darkgreen",
        };
        out.push_str(&format!(
            "  {} -- {} [label={}, {style}];\n",
            quote(a),
            quote(b),
            quote(&label.join("\n")).replace('\n', "\\n")
        ));
    }
    out.push_str("}\n");
    out
}

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a `wiremesh status --output json` report")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// `wiremesh graph`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  wiremesh status -o json > node1.json   # on every node, then:
  wiremesh graph node1.json node2.json node3.json | dot -Tsvg > mesh.svg
  wiremesh lab graph --svg mesh.svg      # the lab, in one step")]
pub struct GraphArgs {
    /// `wiremesh status --output json` reports, one per node (`-` or none: standard input;
    /// several reports may be concatenated).
    pub reports: Vec<PathBuf>,
}

/// Parses one or more concatenated JSON reports.
fn parse_reports(text: &str, path: &std::path::Path) -> Result<Vec<StatusReport>, GraphError> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<StatusReport>()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| GraphError::Decode {
            path: path.to_path_buf(),
            source,
        })
}

pub fn run(args: GraphArgs) -> Result<i32, GraphError> {
    let mut reports = Vec::new();
    let stdin = [PathBuf::from("-")];
    let paths = if args.reports.is_empty() {
        &stdin[..]
    } else {
        &args.reports[..]
    };
    for path in paths {
        let text = if path.as_os_str() == "-" {
            let mut t = String::new();
            std::io::stdin()
                .read_to_string(&mut t)
                .map_err(|source| GraphError::Read {
                    path: path.clone(),
                    source,
                })?;
            t
        } else {
            std::fs::read_to_string(path).map_err(|source| GraphError::Read {
                path: path.clone(),
                source,
            })?
        };
        reports.extend(parse_reports(&text, path)?);
    }
    crate::out!("{}", render(&reports));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::status::{Handshake, PeerReport, SkippedReport, Verdict};
    use wiremesh_core::model::{Family, WgKey};

    fn report(node: &str, peers: &[(&str, bool)], skipped: &[&str]) -> StatusReport {
        StatusReport {
            schema_version: 1,
            verdict: Verdict {
                level: if peers.iter().all(|p| p.1) {
                    Level::Ok
                } else {
                    Level::Degraded
                },
                summary: String::new(),
            },
            node: node.into(),
            backend: None,
            agent: None,
            devices: vec![crate::cli::status::DeviceReport {
                family: Family::V4,
                interface: "wireguard.cali".into(),
                present: true,
                listen_port: 51820,
                mtu: 1440,
                public_key: WgKey([1; 32]),
                peers: peers
                    .iter()
                    .map(|(n, ok)| PeerReport {
                        node: n.to_string(),
                        public_key: WgKey([2; 32]),
                        endpoint: None,
                        endpoint_learned: false,
                        allowed_ips: vec![],
                        latest_handshake: None,
                        handshake_age_seconds: if *ok { Some(5) } else { None },
                        handshake: Handshake::Fresh,
                        rx_bytes: 0,
                        tx_bytes: 0,
                        agrees: *ok,
                        problems: if *ok {
                            vec![]
                        } else {
                            vec!["no \"handshake\"".into()]
                        },
                    })
                    .collect(),
            }],
            skipped: skipped
                .iter()
                .map(|s| SkippedReport {
                    node: s.to_string(),
                    family: Family::V4,
                    reason: "no_key".into(),
                    detail: String::new(),
                })
                .collect(),
            problems: vec![],
        }
    }

    #[test]
    fn dot_has_nodes_edges_and_red_problems() {
        let dot = render(&[
            report("node1", &[("node2", true), ("node3", false)], &["node4"]),
            report("node2", &[("node1", true)], &[]),
        ]);
        assert!(dot.starts_with("graph wiremesh {"), "{dot}");
        assert!(
            dot.contains(
                "\"node1\" -- \"node2\" [label=\"node1: 5s\\nnode2: 5s\", color=darkgreen];"
            ),
            "{dot}"
        );
        assert!(dot.contains("\"node1\" -- \"node3\" [label=\"node1: never, no \\\"handshake\\\"\", color=red, penwidth=2];"), "{dot}");
        assert!(
            dot.contains(
                "\"node1\" -- \"node4\" [label=\"skipped: no_key\", color=red, style=dashed];"
            ),
            "{dot}"
        );
        assert!(
            dot.contains("\"node3\" [label=\"node3\\n(no report)\", color=gray];"),
            "{dot}"
        );
        assert!(
            dot.contains("\"node1\" [label=\"node1\\nDEGRADED\", color=red];"),
            "{dot}"
        );
        assert!(dot.trim_end().ends_with('}'));
    }

    #[test]
    fn concatenated_reports_parse() {
        let one = serde_json::to_string(&report("node1", &[], &[])).expect("json");
        let text = format!("{one}\n{one}");
        assert_eq!(
            parse_reports(&text, std::path::Path::new("-"))
                .expect("parse")
                .len(),
            2
        );
    }
}

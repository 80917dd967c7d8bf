//! projectcalico.org/v3 YAML (or JSON) manifests: multi-document files, `kind: List` items,
//! with positions (file:line) for parse errors and, best effort, for validation errors.

use serde::Deserialize as _;
use serde_json::Value;

use crate::config::check_object;
use crate::policy::{PolicyResources, ValidationError};
use crate::wire::{FelixConfigurationSpec, Kind, RawPolicyResources};

/// One object found in a manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestObject {
    /// A policy kind, or `None` for a FelixConfiguration.
    pub kind: Option<Kind>,
    /// `name`, or `namespace/name` for namespaced kinds (namespace `default` if unset).
    pub key: String,
    pub value: Value,
    /// `file:line` of the object's document.
    pub position: String,
    /// The document's text and first line, to position field errors.
    doc_text: String,
    doc_line: usize,
}

impl ManifestObject {
    /// `file:line` of a field path such as `spec.ingress[0].protocol`, best effort.
    fn field_position(&self, field: &str) -> String {
        let line = locate(&self.doc_text, field).map_or(self.doc_line, |l| self.doc_line + l);
        let file = self.position.rsplit_once(':').map_or("", |(f, _)| f);
        format!("{file}:{line}")
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Manifest {
    pub objects: Vec<ManifestObject>,
    /// Positioned problems that are not validation errors (YAML syntax, unknown kinds).
    pub errors: Vec<String>,
}

impl Manifest {
    /// Parses `text` (from `file`, for positions).
    pub fn parse(file: &str, text: &str) -> Manifest {
        let mut out = Manifest::default();
        // Split into documents on `---` lines ourselves, so each keeps its first line number.
        let mut docs: Vec<(usize, String)> = vec![(1, String::new())];
        for (i, line) in text.lines().enumerate() {
            if line.trim_end() == "---" || line.starts_with("--- ") {
                docs.push((i + 2, String::new()));
            } else if let Some((_, d)) = docs.last_mut() {
                d.push_str(line);
                d.push('\n');
            }
        }
        for (first_line, doc) in docs {
            if doc
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
            {
                continue;
            }
            let value = match serde_norway::Deserializer::from_str(&doc)
                .next()
                .map(Value::deserialize)
            {
                Some(Ok(v)) => v,
                Some(Err(e)) => {
                    let line = e
                        .location()
                        .map_or(first_line, |l| first_line + l.line() - 1);
                    out.errors.push(format!("{file}:{line}: YAML: {e}"));
                    continue;
                }
                None => continue,
            };
            out.add(file, first_line, &doc, value);
        }
        out
    }

    fn add(&mut self, file: &str, line: usize, doc: &str, value: Value) {
        let position = format!("{file}:{line}");
        let kind_name = value.get("kind").and_then(Value::as_str).unwrap_or("");
        if kind_name.ends_with("List") {
            for item in value
                .get("items")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                self.add(file, line, doc, item.clone());
            }
            return;
        }
        // Without an apiVersion, a Calico kind (as calicoctl reads them).
        let api = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("projectcalico.org/v3");
        let kind = match (Kind::from_api(api, kind_name), api, kind_name) {
            (Some(k), _, _) => Some(k),
            (None, "projectcalico.org/v3", "FelixConfiguration") => None,
            (None, "projectcalico.org/v3" | "networking.k8s.io/v1" | "v1", other) => {
                self.errors.push(format!(
                    "{position}: kind {other:?} of {api} is not one wiremesh reads (projectcalico.org/v3: GlobalNetworkPolicy, NetworkPolicy, Tier, HostEndpoint, GlobalNetworkSet, NetworkSet, FelixConfiguration; networking.k8s.io/v1: NetworkPolicy; v1: Pod, Namespace, ServiceAccount)"
                ));
                return;
            }
            (None, api, _) => {
                self.errors.push(format!(
                    "{position}: apiVersion {api:?} is not projectcalico.org/v3, networking.k8s.io/v1 or v1"
                ));
                return;
            }
        };
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if name.is_empty() {
            self.errors.push(format!(
                "{position}: {kind_name}: metadata.name is required"
            ));
            return;
        }
        let mut value = value;
        let key = if kind.is_some_and(Kind::namespaced) {
            let ns = value
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string();
            if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.insert("namespace".into(), Value::String(ns.clone()));
            }
            format!("{ns}/{name}")
        } else {
            name
        };
        self.objects.push(ManifestObject {
            kind,
            key,
            value,
            position,
            doc_text: doc.to_string(),
            doc_line: line,
        });
    }

    /// The policy objects as raw resources (FelixConfigurations left out).
    pub fn raw(&self) -> RawPolicyResources {
        let mut raw = RawPolicyResources::default();
        for o in &self.objects {
            if let Some(kind) = o.kind {
                raw.insert(kind, o.key.clone(), o.value.clone());
            }
        }
        raw
    }

    /// Validates every object as the agent would (policy kinds and FelixConfigurations);
    /// returns the policy resources and every problem, positioned.
    pub fn validate(&self) -> (PolicyResources, Vec<String>) {
        let res = PolicyResources::from_raw(&self.raw());
        let mut problems = self.errors.clone();
        for e in &res.errors {
            problems.push(self.position_error(e));
        }

        for o in self.objects.iter().filter(|o| o.kind.is_none()) {
            let stored = FelixConfigurationSpec::from_object(&o.value);
            for e in check_object(&o.key, &stored) {
                let at = match e.field.as_str() {
                    "spec" => o.position.clone(),
                    field => o.field_position(&format!("spec.{field}")),
                };
                problems.push(format!("{at}: {}", e.problem()));
            }
        }
        (res, problems)
    }

    /// The fields of `res` (from [`Manifest::validate`]) that have no effect, positioned:
    /// reported, not problems.
    pub fn warnings(&self, res: &PolicyResources) -> Vec<String> {
        res.warnings
            .iter()
            .map(|w| format!("{} (warning)", self.position_error(w)))
            .collect()
    }

    fn position_error(&self, e: &ValidationError) -> String {
        let pos = self
            .objects
            .iter()
            .find(|o| o.kind == Some(e.kind) && o.key.ends_with(&e.name))
            .map(|o| o.field_position(&e.field))
            .unwrap_or_default();
        format!("{pos}: {e}")
    }
}

/// The 0-based line within `doc` of a field path, walking keys and list indexes in order.
fn locate(doc: &str, field: &str) -> Option<usize> {
    let lines: Vec<&str> = doc.lines().collect();
    let mut at = 0usize;
    let mut found = None;
    for part in field.split('.') {
        let (name, indexes) = match part.split_once('[') {
            Some((n, rest)) => (
                n,
                rest.split('[')
                    .filter_map(|i| i.trim_end_matches(']').parse::<usize>().ok())
                    .collect::<Vec<_>>(),
            ),
            None => (part, Vec::new()),
        };
        if name == "object" {
            return found;
        }
        let key = format!("{name}:");
        let pos = (at..lines.len()).find(|&i| {
            let t = lines[i].trim_start().trim_start_matches("- ");
            t.starts_with(&key)
        })?;
        at = pos;
        found = Some(pos);
        for idx in indexes {
            let indent = lines[at].len() - lines[at].trim_start().len();
            let mut seen = 0usize;
            let mut hit = None;
            for (i, line) in lines.iter().enumerate().skip(at + 1) {
                let t = line.trim_start();
                let ind = line.len() - t.len();
                if !t.is_empty() && ind <= indent && !t.starts_with('-') {
                    break;
                }
                if t.starts_with('-') {
                    if seen == idx {
                        hit = Some(i);
                        break;
                    }
                    seen += 1;
                }
            }
            if let Some(h) = hit {
                at = h;
                found = Some(h);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: ok
spec:
  ingress:
    - action: Allow
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: bad
spec:
  ingress:
    - action: Allow
    - action: Allow
      protocol: tcp
---
kind: NetworkSet
metadata:
  name: ns-set
spec:
  nets: [10.0.0.0/8]
---
kind: GlobalNetworkPolicy
metadata: {name: broken
";

    #[test]
    fn positions_errors() {
        let m = Manifest::parse("f.yaml", TEXT);
        assert_eq!(m.objects.len(), 3);
        assert_eq!(m.objects[2].key, "default/ns-set");
        let (res, problems) = m.validate();
        assert_eq!(res.policies.len(), 1);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("f.yaml:27:"), "{problems:?}");
        assert!(problems[0].contains("YAML"), "{problems:?}");
        assert!(
            problems[1]
                .starts_with("f.yaml:17: GlobalNetworkPolicy \"bad\": spec.ingress[1].protocol:"),
            "{problems:?}"
        );
    }

    #[test]
    fn named_ports_example_passes_and_bad_ports_are_positioned() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/policy/named-ports.yaml"
        );
        let text = std::fs::read_to_string(path).expect("example");
        let (res, problems) = Manifest::parse("named-ports.yaml", &text).validate();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(res.host_endpoints[0].ports.len(), 3);
        let bad = "\
kind: HostEndpoint
metadata:
  name: h
spec:
  node: n1
  interfaceName: eth0
  ports:
    - name: web
      protocol: TCP
      port: 8080
    - name: dns
      protocol: ICMP
      port: 53
---
kind: GlobalNetworkPolicy
metadata:
  name: p
spec:
  ingress:
    - action: Allow
      destination:
        ports: [web, 80]
";
        let (_, problems) = Manifest::parse("b.yaml", bad).validate();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with(
                "b.yaml:22: GlobalNetworkPolicy \"p\": spec.ingress[0].destination.ports:"
            ),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("b.yaml:12: HostEndpoint \"h\": spec.ports[1].protocol:"),
            "{problems:?}"
        );
    }

    #[test]
    fn fields_without_effect_are_warnings_not_problems() {
        let text = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata: {name: saas, labels: {list: saas}}
spec:
  nets: [192.0.2.0/24]
  allowedEgressDomains: [api.example.com]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: p}
spec: {selector: all(), performanceHints: [AssumeNeededOnEveryNode], ingress: [{action: Allow}]}
";
        let m = Manifest::parse("w.yaml", text);
        let (res, problems) = m.validate();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(res.network_sets.len(), 1, "the set applies, by its nets");
        assert_eq!(res.policies.len(), 1);
        let warnings = m.warnings(&res);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings.iter().any(|w| w.starts_with(
                "w.yaml:6: GlobalNetworkSet \"saas\": spec.allowedEgressDomains: has no effect"
            ) && w.ends_with("(warning)")),
            "{warnings:?}"
        );
        // Any other unknown field still makes the object invalid.
        let (_, problems) = Manifest::parse(
            "u.yaml",
            &text.replace("allowedEgressDomains", "allowedEgressDomainz"),
        )
        .validate();
        assert_eq!(problems.len(), 1, "{problems:?}");
    }
}

//! `kubectl apply --dry-run=client -f crds/ -f deploy/` must parse and map every object.
//!
//! kubectl's client-side dry run still asks an API server for discovery (which kinds exist) and
//! for the live object (to know whether it would create or patch). No cluster exists here, so
//! the test points kubectl at the API stand-in (`support::apiserver`), which serves discovery
//! and has none of the objects. What is checked is kubectl's own parsing and mapping of our
//! YAML, nothing about a real cluster.
//!
//! The Helm chart cannot be rendered by helm here (helm is not packaged in Debian, PyPI or npm);
//! `helm_chart_renders_to_the_plain_manifests` does a minimal render of its templates and checks
//! the result with kubectl the same way.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use support::apiserver::ApiServer;

mod support;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `kubectl apply --dry-run=client` on `paths` against the API stand-in (its discovery is
/// all kubectl needs); returns stdout.
async fn dry_run(paths: &[&Path]) -> String {
    let server = ApiServer::start().await.url;
    let home = tempfile::tempdir().expect("temp dir");
    let mut command = Command::new("kubectl");
    command
        .args([
            "apply",
            "--dry-run=client",
            "--validate=false",
            "-o",
            "name",
        ])
        .args(["--server", &server, "--cache-dir"])
        .arg(home.path().join("cache"))
        .env("HOME", home.path())
        .env("KUBECONFIG", home.path().join("none"));
    for path in paths {
        command.arg("-f").arg(path);
    }
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .unwrap_or_else(|e| {
            panic!("running kubectl (needed for this test; it is on the dev and CI machines): {e}")
        });
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "kubectl apply --dry-run=client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn names(stdout: &str) -> Vec<String> {
    let mut names: Vec<String> = stdout.lines().map(str::to_string).collect();
    names.sort();
    names
}

#[tokio::test]
async fn kubectl_accepts_crds_and_deploy() {
    let crds = root().join("crds");
    let deploy = root().join("deploy");
    let stdout = dry_run(&[&crds, &deploy]).await;
    let names = names(&stdout);
    for expected in [
        "customresourcedefinition.apiextensions.k8s.io/felixconfigurations.projectcalico.org",
        "customresourcedefinition.apiextensions.k8s.io/hostendpoints.projectcalico.org",
        "namespace/wiremesh",
        "serviceaccount/wiremesh",
        "clusterrole.rbac.authorization.k8s.io/wiremesh",
        "clusterrolebinding.rbac.authorization.k8s.io/wiremesh",
        "daemonset.apps/wiremesh",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:#?}"
        );
    }
    assert_eq!(names.len(), 7 + 5, "{names:#?}");
    // kubectl applies a directory in file-name order: the Namespace must come before what
    // lives in it, or the first `kubectl apply -f deploy/` fails ("namespaces not found").
    let applied: Vec<&str> = stdout.lines().collect();
    let at = |name: &str| applied.iter().position(|n| *n == name).expect("listed");
    assert!(
        at("namespace/wiremesh") < at("serviceaccount/wiremesh"),
        "{applied:#?}"
    );
    assert!(
        at("namespace/wiremesh") < at("daemonset.apps/wiremesh"),
        "{applied:#?}"
    );
}

#[test]
fn kustomization_lists_every_manifest() {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join("deploy"))
        .output()
        .unwrap_or_else(|e| panic!("running kubectl kustomize: {e}"));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    for kind in [
        "kind: Namespace",
        "kind: ServiceAccount",
        "kind: ClusterRole",
        "kind: ClusterRoleBinding",
        "kind: DaemonSet",
    ] {
        assert!(
            text.contains(kind),
            "{kind} missing from kubectl kustomize output"
        );
    }
    assert!(text.contains("image: wiremesh:0.1.0"));
}

// ---------------------------------------------------------------------------------------------
// The Helm chart, rendered by a minimal stand-in for helm's templates
// ---------------------------------------------------------------------------------------------

/// Looks up `.Values.a.b`, `.Release.Name`, `.Release.Namespace`.
fn lookup(values: &Value, expression: &str) -> Value {
    match expression {
        ".Release.Name" => json!("wiremesh"),
        ".Release.Namespace" => json!("wiremesh"),
        other => {
            let path = other
                .strip_prefix(".Values.")
                .unwrap_or_else(|| panic!("unsupported template expression {other:?}"));
            let mut value = values;
            for part in path.split('.') {
                value = value
                    .get(part)
                    .unwrap_or_else(|| panic!("values.yaml has no {path}"));
            }
            value.clone()
        }
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Renders the subset of Go templates the chart uses: `{{ X }}`, `{{ X | quote }}`,
/// `{{- toYaml X | nindent N }}`, `{{- if X }}` ... `{{- end }}`; `{{-` trims the whitespace
/// before it. Anything else fails the test, so the chart stays within what is checked here.
fn render(template: &str, values: &Value) -> String {
    let mut out = String::new();
    let mut rest = template;
    let mut skipping: Vec<bool> = Vec::new();
    while let Some(start) = rest.find("{{") {
        let text = &rest[..start];
        if !skipping.iter().any(|s| *s) {
            out.push_str(text);
        }
        let end = rest[start..].find("}}").expect("unclosed {{") + start;
        let mut action = &rest[start + 2..end];
        rest = &rest[end + 2..];
        if let Some(trimmed) = action.strip_prefix('-') {
            action = trimmed;
            let kept = out.trim_end_matches([' ', '\t', '\n']).len();
            out.truncate(kept);
        }
        let action = action.trim();
        let active = !skipping.iter().any(|s| *s);
        if let Some(condition) = action.strip_prefix("if ") {
            let value = lookup(values, condition.trim());
            let truthy = !matches!(value, Value::Null | Value::Bool(false))
                && value != json!("")
                && value != json!({})
                && value != json!([]);
            skipping.push(!truthy);
            continue;
        }
        if action == "end" {
            skipping.pop().expect("end without if");
            continue;
        }
        if !active {
            continue;
        }
        let parts: Vec<&str> = action.split('|').map(str::trim).collect();
        let rendered = match parts.as_slice() {
            [expression] => scalar(&lookup(values, expression)),
            [expression, "quote"] => format!("{:?}", scalar(&lookup(values, expression))),
            [to_yaml, nindent] if to_yaml.starts_with("toYaml ") => {
                let value = lookup(values, to_yaml.trim_start_matches("toYaml ").trim());
                let n: usize = nindent
                    .strip_prefix("nindent ")
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or_else(|| panic!("unsupported pipeline {action:?}"));
                let yaml = serde_norway::to_string(&value).expect("YAML");
                let pad = " ".repeat(n);
                yaml.trim_end()
                    .lines()
                    .map(|l| format!("\n{pad}{l}"))
                    .collect()
            }
            _ => panic!("unsupported template action {action:?}"),
        };
        out.push_str(&rendered);
    }
    assert!(skipping.is_empty(), "if without end");
    out.push_str(rest);
    out
}

fn chart() -> PathBuf {
    root().join("deploy/helm/wiremesh")
}

/// Renders every template into `dir` with `values`; returns the written files.
fn render_chart(values: &Value, dir: &Path) -> Vec<PathBuf> {
    let mut written = Vec::new();
    let mut templates: Vec<PathBuf> = std::fs::read_dir(chart().join("templates"))
        .expect("templates/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    templates.sort();
    for template in templates {
        let text = std::fs::read_to_string(&template).expect("template");
        let rendered = render(&text, values);
        // Every rendered document must be YAML.
        for doc in serde_norway::Deserializer::from_str(&rendered) {
            let parsed: Result<Value, _> = serde::Deserialize::deserialize(doc);
            if let Err(e) = parsed {
                panic!(
                    "{} renders to invalid YAML: {e}\n{rendered}",
                    template.display()
                );
            }
        }
        if rendered
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            continue;
        }
        let path = dir.join(template.file_name().expect("file name"));
        std::fs::write(&path, rendered).expect("write rendered template");
        written.push(path);
    }
    written
}

fn chart_values() -> Value {
    let text = std::fs::read_to_string(chart().join("values.yaml")).expect("values.yaml");
    serde_norway::from_str(&text).expect("values.yaml is YAML")
}

#[tokio::test]
async fn helm_chart_renders_to_the_plain_manifests() {
    let dir = tempfile::tempdir().expect("temp dir");
    let values = chart_values();
    render_chart(&values, dir.path());
    let crds = chart().join("crds");
    let stdout = dry_run(&[&crds, dir.path()]).await;
    let chart_names = names(&stdout);

    // The chart installs the same objects as deploy/ (bar the namespace, Helm's own).
    let plain = names(&dry_run(&[&root().join("crds"), &root().join("deploy")]).await);
    let expected: Vec<String> = plain
        .into_iter()
        .filter(|n| n != "namespace/wiremesh")
        .collect();
    assert_eq!(chart_names, expected);

    // And the same DaemonSet: compare the rendered pod spec with deploy/daemonset.yaml.
    let rendered: Value = serde_norway::from_str(
        &std::fs::read_to_string(dir.path().join("daemonset.yaml")).expect("rendered"),
    )
    .expect("YAML");
    let plain: Value = serde_norway::from_str(
        &std::fs::read_to_string(root().join("deploy/daemonset.yaml")).expect("plain"),
    )
    .expect("YAML");
    let container = |v: &Value| v.pointer("/spec/template/spec/containers/0").cloned();
    assert_eq!(container(&rendered), container(&plain));
    for field in ["hostNetwork", "tolerations", "volumes", "priorityClassName"] {
        let pointer = format!("/spec/template/spec/{field}");
        assert_eq!(
            rendered.pointer(&pointer),
            plain.pointer(&pointer),
            "{field}"
        );
    }
}

#[tokio::test]
async fn helm_chart_can_create_the_default_felix_configuration() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut values = chart_values();
    values["felixConfiguration"]["create"] = json!(true);
    values["felixConfiguration"]["wireguardListeningPort"] = json!(51900);
    let files = render_chart(&values, dir.path());
    let felix = files
        .iter()
        .find(|p| p.ends_with("felixconfiguration.yaml"))
        .expect("rendered FelixConfiguration");
    let object: Value =
        serde_norway::from_str(&std::fs::read_to_string(felix).expect("read")).expect("YAML");
    assert_eq!(object["spec"]["wireguardEnabled"], json!(true));
    assert_eq!(object["spec"]["wireguardListeningPort"], json!(51900));
    assert_eq!(
        object["spec"]["wireguardInterfaceName"],
        json!("wireguard.cali")
    );
    let stdout = dry_run(&[&chart().join("crds"), dir.path()]).await;
    assert!(
        names(&stdout)
            .iter()
            .any(|n| n == "felixconfiguration.projectcalico.org/default"),
        "{stdout}"
    );
    // Off by default.
    let off = tempfile::tempdir().expect("temp dir");
    let files = render_chart(&chart_values(), off.path());
    assert!(!files.iter().any(|p| p.ends_with("felixconfiguration.yaml")));
}

/// The ClusterRole's rules in a (multi-document) YAML file.
fn cluster_role_rules(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("RBAC manifest");
    for doc in serde_norway::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(doc).expect("YAML");
        if value["kind"] == "ClusterRole" {
            return value["rules"].clone();
        }
    }
    panic!("no ClusterRole in {}", path.display())
}

#[test]
fn rbac_grants_exactly_what_the_agent_reads_and_writes() {
    use wiremesh_core::wire::Kind;
    let plain = cluster_role_rules(&root().join("deploy/rbac.yaml"));
    // The six policy kinds the Kubernetes adapter watches: read-only, nothing else; for pod
    // policy only list and watch of Pods, Namespaces, ServiceAccounts and NetworkPolicies.
    let policy: Vec<&str> = Kind::CALICO.iter().map(|k| k.plural()).collect();
    assert_eq!(
        plain,
        json!([
            { "apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "patch"] },
            { "apiGroups": ["projectcalico.org"], "resources": ["felixconfigurations"],
              "verbs": ["get", "list", "watch", "create"] },
            { "apiGroups": ["projectcalico.org"],
              "resources": ["hostendpoints", "globalnetworkpolicies", "networkpolicies", "tiers",
                            "globalnetworksets", "networksets"],
              "verbs": ["get", "list", "watch"] },
            { "apiGroups": [""], "resources": ["pods", "namespaces", "serviceaccounts"],
              "verbs": ["list", "watch"] },
            { "apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
              "verbs": ["list", "watch"] },
            { "apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"] }
        ])
    );
    let mut granted: Vec<&str> = plain[2]["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    granted.sort_unstable();
    let mut watched = policy.clone();
    watched.sort_unstable();
    assert_eq!(granted, watched);
    // Every kind the adapter watches has its rule: (group, plural) of each granted pair.
    let mut rules: Vec<(String, String)> = Vec::new();
    for rule in plain.as_array().expect("rules") {
        for group in rule["apiGroups"].as_array().into_iter().flatten() {
            for resource in rule["resources"].as_array().into_iter().flatten() {
                rules.push((
                    group.as_str().unwrap_or_default().to_string(),
                    resource.as_str().unwrap_or_default().to_string(),
                ));
            }
        }
    }
    for kind in Kind::KUBERNETES {
        let group = match kind.api_version().split_once('/') {
            Some((group, _)) => group,
            None => "",
        };
        let plural = match kind {
            Kind::KubernetesNetworkPolicy => "networkpolicies",
            other => other.plural(),
        };
        assert!(
            rules.iter().any(|(g, r)| g == group && r == plural),
            "{kind}: no rule for {group}/{plural}"
        );
    }

    // The chart grants the same.
    let dir = tempfile::tempdir().expect("temp dir");
    render_chart(&chart_values(), dir.path());
    assert_eq!(cluster_role_rules(&dir.path().join("rbac.yaml")), plain);
}

/// `hostPolicy: false` turns the agent's policy engine off and drops the RBAC it no longer
/// needs; the ports reach the agent through its environment, so probes and metrics follow them.
#[tokio::test]
async fn helm_chart_values_reach_the_agent() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut values = chart_values();
    values["hostPolicy"] = json!(false);
    values["adminPort"] = json!(9199);
    values["metricsPort"] = json!(9191);
    let files = render_chart(&values, dir.path());
    let find = |suffix: &str| {
        files
            .iter()
            .find(|p| p.ends_with(suffix))
            .unwrap_or_else(|| panic!("rendered {suffix}"))
            .clone()
    };
    let rules = cluster_role_rules(&find("rbac.yaml"));
    let text = rules.to_string();
    assert!(!text.contains("globalnetworkpolicies"), "{text}");
    assert!(!text.contains("pods"), "{text}");
    assert!(!text.contains("networking.k8s.io"), "{text}");
    assert!(text.contains("felixconfigurations"), "{text}");
    let daemonset: Value =
        serde_norway::from_str(&std::fs::read_to_string(find("daemonset.yaml")).expect("read"))
            .expect("YAML");
    let agent = &daemonset["spec"]["template"]["spec"]["containers"][0];
    let env = |name: &str| {
        agent["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
            .unwrap_or_else(|| panic!("env {name}"))
    };
    assert_eq!(env("WIREMESH_HOST_POLICY"), json!("false"));
    assert_eq!(env("WIREMESH_HEALTH_PORT"), json!("9199"));
    assert_eq!(env("WIREMESH_METRICS_PORT"), json!("9191"));
    assert_eq!(agent["livenessProbe"]["httpGet"]["port"], json!(9199));
    // Still what the API server accepts.
    let stdout = dry_run(&[&chart().join("crds"), dir.path()]).await;
    assert!(
        names(&stdout)
            .iter()
            .any(|n| n == "daemonset.apps/wiremesh"),
        "{stdout}"
    );
}

//! What every lab test needs: the root check, a guard that removes the lab even when the test
//! fails, starting a lab with this crate's binary as the agents, and bounded waiting.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use wiremesh::cli::lab::probe::{self, ProbePod, TruthTable};
use wiremesh::cli::lab::{self, Lab, UpOptions};
use wiremesh_core::manifest::Manifest;

/// Removes the lab on drop, so a failing test leaves nothing behind.
pub struct Guard(pub String);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = lab::down(&self.0, None) {
            eprintln!("cleanup of lab {} failed: {e}", self.0);
        }
    }
}

/// A 3-node lab named `<prefix><pid>` whose agents run this crate's binary.
pub async fn start_lab(prefix: &str, encryption: bool) -> (Lab, Guard) {
    start_lab_with(prefix, |o| o.encryption = encryption).await
}

/// As [`start_lab`], with the options changed by `change` first.
pub async fn start_lab_with(prefix: &str, change: impl FnOnce(&mut UpOptions)) -> (Lab, Guard) {
    let name = format!("{prefix}{}", std::process::id() % 100_000);
    let guard = Guard(name.clone());
    let mut options = UpOptions::new(&name, 3);
    options.binary = Some(PathBuf::from(env!("CARGO_BIN_EXE_wiremesh")));
    change(&mut options);
    let lab = Lab::up(options).await.expect("lab up");
    (lab, guard)
}

/// Polls `condition` until it holds; fails the test after `limit`.
pub async fn wait_within(limit: Duration, what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// The value of one series (its full name and labels, as printed) in a `/metrics` body.
pub fn metric_value(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse::<f64>()
            .ok()
    })
}

/// The body of the heredoc `cat > NAME <<'EOF'` ... `EOF` in a doc: the files a tutorial has
/// its reader write are the ones its test applies, so the two cannot drift.
pub fn doc_file(doc: &str, name: &str) -> String {
    let opening = format!("cat > {name} <<'EOF'\n");
    let mut found = doc.match_indices(&opening);
    let (at, _) = found
        .next()
        .unwrap_or_else(|| panic!("the doc writes no file {name}"));
    assert!(found.next().is_none(), "the doc writes {name} twice");
    let body = &doc[at + opening.len()..];
    let end = body
        .find("\nEOF\n")
        .unwrap_or_else(|| panic!("{name}: no EOF line"));
    body[..end].to_string()
}

/// The fenced code block right after the line `<!-- MARKER -->` in a doc (for what the doc
/// shows but the reader does not write to a file).
pub fn doc_block(doc: &str, marker: &str) -> String {
    let comment = format!("<!-- {marker} -->\n");
    let (_, rest) = doc
        .split_once(&comment)
        .unwrap_or_else(|| panic!("no {comment:?} in the doc"));
    let rest = rest
        .strip_prefix("```")
        .and_then(|r| r.split_once('\n'))
        .map(|(_, r)| r)
        .unwrap_or_else(|| panic!("{marker}: no code block right after the marker"));
    let (block, _) = rest
        .split_once("\n```")
        .unwrap_or_else(|| panic!("{marker}: the block does not end"));
    block.to_string()
}

/// Tables in `lab probe` format, parsed; the test fails on a format error.
pub fn tables(what: &str, text: &str) -> Vec<TruthTable> {
    probe::parse_tables(what, text).unwrap_or_else(|e| panic!("{e}"))
}

/// A manifest that must validate cleanly.
pub fn manifest(file: &str, yaml: &str) -> Manifest {
    let m = Manifest::parse(file, yaml);
    let (_, problems) = m.validate();
    assert!(problems.is_empty(), "{file}: {problems:?}");
    m
}

/// How long policy may take to reach every node and show in a probe.
pub const POLICY_CONVERGE: Duration = Duration::from_secs(30);

/// Probes the lab's pods (as `lab probe --expect` does) until the tables are `want`; fails with
/// the differing cells after [`POLICY_CONVERGE`].
pub async fn wait_for_tables(lab: &Lab, what: &str, want: &[TruthTable]) {
    let keys = probe::keys_of(want, &lab.state.ip_family.families());
    wait_until_same(what, want, async || {
        lab.probe(keys.clone(), Duration::from_secs(1))
            .await
            .expect("probe")
    })
    .await;
}

/// Probes `target` (something outside the pods, see [`serve_beside_the_pods`]) from every lab
/// pod until the result is `want`: a table whose rows are the pods and whose one column is
/// `target.name`.
pub async fn wait_for_reach(lab: &Lab, what: &str, target: &ProbePod, want: &[TruthTable]) {
    let keys = probe::keys_of(want, &lab.state.ip_family.families());
    let pods = lab.probe_pods();
    let mut sources = pods.clone();
    sources.push(target.clone());
    wait_until_same(what, want, async || {
        let (sources, keys) = (sources.clone(), keys.clone());
        let probed = tokio::task::spawn_blocking(move || {
            probe::probe(&sources, &keys, Duration::from_secs(1))
        })
        .await
        .expect("probe thread")
        .expect("probe");
        // Only pod -> target: the probe also tried target -> pods and pod -> pod.
        probed
            .into_iter()
            .map(|t| TruthTable {
                reachable: pods
                    .iter()
                    .map(|p| vec![t.get(&p.name, &target.name).flatten()])
                    .collect(),
                from: pods.iter().map(|p| p.name.clone()).collect(),
                to: vec![target.name.clone()],
                key: t.key,
            })
            .collect()
    })
    .await;
}

async fn wait_until_same(
    what: &str,
    want: &[TruthTable],
    mut probe_once: impl AsyncFnMut() -> Vec<TruthTable>,
) {
    let deadline = Instant::now() + POLICY_CONVERGE;
    loop {
        let differences = probe::compare(&probe_once().await, want);
        if differences.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            let lines: Vec<String> = differences.iter().map(ToString::to_string).collect();
            panic!(
                "{what}: after {POLICY_CONVERGE:?} still different:\n{}",
                lines.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Serves TCP `ports` on `address` in the lab's hub namespace, standing in for a service
/// outside the cluster (a cloud's metadata address) without any traffic leaving the lab: the
/// address goes on the hub's bridge, every node routes it to the hub, the hub routes each
/// node's pod CIDR back (pods are not masqueraded). Returns the server process and the probe
/// target (named by the address); `lab down` removes all of it with the hub.
pub fn serve_beside_the_pods(lab: &Lab, address: Ipv4Addr, ports: &[u16]) -> (Child, ProbePod) {
    let hub = lab.hub_netns().to_string();
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().expect("ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ip(&[
        "-n",
        &hub,
        "addr",
        "add",
        &format!("{address}/32"),
        "dev",
        "br0",
    ]);
    for node in lab.state.nodes.values() {
        let hub_address = lab::HUB_ADDRESS.to_string();
        ip(&[
            "-n",
            &node.netns,
            "route",
            "add",
            &format!("{address}/32"),
            "via",
            &hub_address,
        ]);
        let (cidr, via) = (node.pod_cidr.to_string(), node.underlay_ip.to_string());
        ip(&["-n", &hub, "route", "add", &cidr, "via", &via]);
    }
    let ready = lab.state.dir.join(format!("serve-{address}.ready"));
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let server = Command::new("ip")
        .args(["netns", "exec", &hub, env!("CARGO_BIN_EXE_wiremesh")])
        .args(["lab", "serve", "--tcp", &ports.join(",")])
        .arg("--ready-file")
        .arg(&ready)
        .spawn()
        .expect("lab serve in the hub");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        assert!(
            Instant::now() < deadline,
            "the server in the hub is not ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let target = ProbePod {
        name: address.to_string(),
        netns: hub,
        v4: Some(address),
        v6: None,
    };
    (server, target)
}

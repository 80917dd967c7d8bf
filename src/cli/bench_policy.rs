//! `wiremesh bench-policy`: render and apply 1,000 policies / 10,000 rules in a throw-away
//! network namespace, next to `nft -f` of the same text (and `nft -j -f` of the same table as
//! JSON), then a one-address network-set change; then 1,000 local pods under 1,000
//! NetworkPolicies: a pod added, a policy edited. Root only.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::netns::Netns;
use wiremesh_core::dataplane::filter::{NftOp, plan};
use wiremesh_core::policy::program::{PolicyInputs, compile};
use wiremesh_core::policy::render::{FilterSpec, render};
use wiremesh_core::policy::resources::PolicyResources;
use wiremesh_core::wire::{Kind, RawPolicyResources};
use wiremesh_dataplane::nft::{FilterDataplane, KernelNft};

#[derive(Debug, Clone, clap::Args)]
pub struct PolicyBenchArgs {
    #[arg(long, default_value_t = 1000)]
    pub policies: usize,
    #[arg(long, default_value_t = 10)]
    pub rules_per_policy: usize,
    /// Repetitions per measurement (the median is shown).
    #[arg(long, default_value_t = 5)]
    pub iterations: usize,
    /// Local pods of the pod part (0 skips it); as many NetworkPolicies select them.
    #[arg(long, default_value_t = 1000)]
    pub pods: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyBenchError {
    #[error("the policy benchmark needs root (network namespaces, nftables)")]
    NotRoot,
    #[error("namespace")]
    Netns(#[from] crate::netns::NetnsError),
    #[error("nft")]
    Nft(#[from] wiremesh_dataplane::nft::NftError),
    #[error("dataplane")]
    Dataplane(#[from] wiremesh_dataplane::DataplaneError),
    #[error("temporary file")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Check(String),
}

const SETS: usize = 50;

/// The synthetic cluster: one host endpoint on `eth0` of node `bench`, `SETS` global network
/// sets, and `policies` GNPs of `rules` ingress rules each, spread over two tiers.
pub fn synthetic(policies: usize, rules: usize, extra_address: bool) -> RawPolicyResources {
    let mut raw = RawPolicyResources::default();
    raw.insert(
        Kind::HostEndpoint,
        "bench-eth0".into(),
        json!({"metadata": {"name": "bench-eth0", "labels": {"bench": "true"}},
               "spec": {"node": "bench", "interfaceName": "eth0", "expectedIPs": ["10.255.0.1"]}}),
    );
    raw.insert(
        Kind::Tier,
        "platform".into(),
        json!({"metadata": {"name": "platform"}, "spec": {"order": 100, "defaultAction": "Pass"}}),
    );
    for s in 0..SETS {
        let mut nets = vec![format!("10.{}.{}.0/24", 100 + s / 200, s % 200)];
        if extra_address && s == 0 {
            nets.push("192.0.2.77".into());
        }
        raw.insert(
            Kind::GlobalNetworkSet,
            format!("set-{s}"),
            json!({"metadata": {"name": format!("set-{s}"), "labels": {"set": format!("s{s}")}},
                   "spec": {"nets": nets}}),
        );
    }
    for p in 0..policies {
        let rules: Vec<Value> = (0..rules)
            .map(|r| {
                let n = p * rules + r;
                match r % 5 {
                    0 => json!({"action": "Allow", "protocol": "TCP",
                                "source": {"nets": [format!("10.{}.{}.0/24", n / 256 % 256, n % 256)]},
                                "destination": {"ports": [1000 + (n % 5000), "20000:20100"]}}),
                    1 => json!({"action": "Deny", "protocol": "UDP",
                                "source": {"selector": format!("set == 's{}'", (p + r) % SETS)}}),
                    2 => json!({"action": "Log", "protocol": "TCP", "destination": {"ports": [n % 60000 + 1]}}),
                    3 => json!({"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8}}),
                    _ => json!({"action": "Pass", "notProtocol": "SCTP",
                                "source": {"notSelector": format!("set == 's{}'", (p + r + 7) % SETS)}}),
                }
            })
            .collect();
        raw.insert(
            Kind::GlobalNetworkPolicy,
            format!("p{p:04}"),
            json!({"metadata": {"name": format!("p{p:04}")},
                   "spec": {"tier": if p % 2 == 0 { "platform" } else { "default" }, "order": p,
                            "selector": "bench == 'true'", "types": ["Ingress"], "ingress": rules}}),
        );
    }
    raw
}

/// Namespaces of the pod part.
const NAMESPACES: usize = 20;
/// Distinct `app` labels of the pod part.
const APPS: usize = 50;

/// The pod part's cluster: `pods` pods on node `bench` (plus `bench-extra` when
/// `extra_pod`), in `NAMESPACES` namespaces with their profiles, and `pods` NetworkPolicies,
/// each selecting one app and allowing another app on one port. `edited` changes the port of
/// the first policy.
pub fn synthetic_pods(pods: usize, extra_pod: bool, edited: bool) -> RawPolicyResources {
    let mut raw = RawPolicyResources::default();
    for n in 0..NAMESPACES {
        let name = format!("kns.ns-{n}");
        raw.insert(
            Kind::Profile,
            name.clone(),
            json!({"metadata": {"name": name},
                   "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}],
                            "labelsToApply": {"pcns.projectcalico.org/name": format!("ns-{n}")}}}),
        );
    }
    let mut pod = |i: usize, name: String| {
        let ns = format!("ns-{}", i % NAMESPACES);
        let wep = format!("bench-k8s-{}-eth0", name.replace('-', "--"));
        raw.insert(
            Kind::WorkloadEndpoint,
            format!("{ns}/{wep}"),
            json!({"metadata": {"name": wep, "namespace": ns,
                                "labels": {"app": format!("app-{}", i % APPS)}},
                   "spec": {"node": "bench", "pod": name, "endpoint": "eth0",
                            "ipNetworks": [format!("10.{}.{}.{}/32", 200 + i / 65536, i / 256 % 256, i % 256)],
                            "profiles": [format!("kns.{ns}")]}}),
        );
    };
    for i in 0..pods {
        pod(i, format!("pod-{i}"));
    }
    if extra_pod {
        pod(pods, "bench-extra".into());
    }
    for p in 0..pods {
        let ns = format!("ns-{}", p % NAMESPACES);
        let port = if edited && p == 0 {
            9999
        } else {
            8000 + p % 100
        };
        raw.insert(
            Kind::NetworkPolicy,
            format!("{ns}/np-{p}"),
            json!({"metadata": {"name": format!("np-{p}"), "namespace": ns},
                   "spec": {"selector": format!("app == 'app-{}'", p % APPS),
                            "ingress": [{"action": "Allow", "protocol": "TCP",
                                         "source": {"selector": format!("app == 'app-{}'", (p + 1) % APPS)},
                                         "destination": {"ports": [port]}}]}}),
        );
    }
    raw
}

fn spec_of(raw: &RawPolicyResources) -> Result<(FilterSpec, Duration), PolicyBenchError> {
    let started = Instant::now();
    let res = PolicyResources::from_raw(raw);
    if let Some(e) = res.errors.first() {
        return Err(PolicyBenchError::Check(e.to_string()));
    }
    let program = compile(&PolicyInputs {
        node: "bench",
        resources: Some(&res),
        ..Default::default()
    });
    let spec = render(&program);
    Ok((spec, started.elapsed()))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

pub async fn run(args: PolicyBenchArgs) -> Result<(), PolicyBenchError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(PolicyBenchError::NotRoot);
    }
    let raw = synthetic(args.policies, args.rules_per_policy, false);
    let (spec, render_time) = spec_of(&raw)?;
    let text = spec.replace_script();
    let rule_lines: usize = spec.chains.iter().map(|c| c.rules.len()).sum();
    crate::outln!(
        "policy bench: {} policies x {} rules -> {} chains, {} nft rules, {} sets, {} counters, {} KiB of nft text",
        args.policies,
        args.rules_per_policy,
        spec.chains.len(),
        rule_lines,
        spec.sets.len(),
        spec.counters.len(),
        text.len() / 1024
    );
    crate::outln!(
        "  validate + compile + render (pure)      {}",
        ms(render_time)
    );

    let ns = Netns::new("wmb-pol")?;
    let mut nft = KernelNft::in_netns(ns.name());
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), &text)?;
    let path = file.path().display().to_string();
    let drop_table = |nft: KernelNft| async move {
        nft.run_script(&wiremesh_core::policy::render::delete_script())
            .await
    };

    // Cold: table absent. After each replacement the dataplane lists the table once in the
    // background (the drift baseline); it is waited for outside the measurements and shown
    // on its own.
    let mut baselines = Vec::new();
    let (mut ours, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..args.iterations {
        drop_table(nft.clone()).await?;
        let t = Instant::now();
        nft.run(&["-f", &path]).await?;
        plain.push(t.elapsed());
        drop_table(nft.clone()).await?;
        let t = Instant::now();
        let actual = nft.observe().await?;
        let ops = plan(&spec, &actual);
        nft.apply(&ops).await?;
        ours.push(t.elapsed());
        baselines.extend(nft.settle().await.map(|b| b.took));
    }
    let (o, p) = (median(ours), median(plain));
    crate::outln!(
        "  cold apply: wiremesh (observe+plan+apply) {}   nft -f {}   ratio {:.2}",
        ms(o),
        ms(p),
        o.as_secs_f64() / p.as_secs_f64()
    );

    // Rule change with the table present: only the policy's chain is rewritten.
    let mut changed = raw.clone();
    if let Some(v) = changed
        .objects
        .get_mut(&Kind::GlobalNetworkPolicy)
        .and_then(|m| m.get_mut("p0000"))
    {
        v["spec"]["ingress"][0]["action"] = json!("Deny");
    }
    let (spec2, _) = spec_of(&changed)?;
    let file2 = tempfile::NamedTempFile::new()?;
    std::fs::write(file2.path(), spec2.replace_script())?;
    let path2 = file2.path().display().to_string();
    let (mut ours, mut plain) = (Vec::new(), Vec::new());
    for i in 0..args.iterations {
        // Start from `spec` each time: the agent's path, where the table is what it last
        // applied, next to `nft -f` of the new text.
        nft.run(&["-f", &path]).await?;
        let t = Instant::now();
        nft.run(&["-f", &path2]).await?;
        plain.push(t.elapsed());
        let actual = nft.observe().await?;
        nft.apply(&plan(&spec, &actual)).await?;
        nft.settle().await;
        let t = Instant::now();
        let actual = nft.observe().await?;
        let ops = plan(&spec2, &actual);
        if i == 0
            && !matches!(ops.as_slice(), [NftOp::UpdateRules(u)]
                if u.write_chains.len() == 1 && u.write_chains[0].name == "pi-gnp/p0000")
        {
            return Err(PolicyBenchError::Check(format!(
                "a rule change planned {}",
                ops.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        nft.apply(&ops).await?;
        ours.push(t.elapsed());
        baselines.extend(nft.settle().await.map(|b| b.took));
    }
    let (o, p) = (median(ours), median(plain));
    crate::outln!(
        "  rule change (rewrites its chain): wiremesh {}   nft -f of the whole table {}   ratio {:.2}",
        ms(o),
        ms(p),
        o.as_secs_f64() / p.as_secs_f64()
    );

    crate::outln!(
        "  drift baseline (one full listing, in the background after each replacement): {} ({} taken)",
        ms(median(baselines.clone())),
        baselines.len()
    );

    // The same table as JSON (what the `nftables` crate would feed `nft -j -f`).
    let json_text = nft
        .run(&["-j", "list", "table", "inet", "wiremesh"])
        .await?;
    let jfile = tempfile::NamedTempFile::new()?;
    std::fs::write(jfile.path(), &json_text)?;
    let jpath = jfile.path().display().to_string();
    let mut json_times = Vec::new();
    let mut json_ok = true;
    for _ in 0..args.iterations {
        drop_table(nft.clone()).await?;
        let t = Instant::now();
        if let Err(e) = nft.run(&["-j", "-f", &jpath]).await {
            crate::outln!("  nft -j -f of the listed table failed: {e}");
            json_ok = false;
            break;
        }
        json_times.push(t.elapsed());
    }
    if json_ok {
        crate::outln!(
            "  same table as JSON: nft -j -f {} ({} KiB of JSON vs {} KiB of text)",
            ms(median(json_times)),
            json_text.len() / 1024,
            text.len() / 1024
        );
    }

    // One address added to one network set: element operations only.
    drop_table(nft.clone()).await?;
    let actual = nft.observe().await?;
    nft.apply(&plan(&spec, &actual)).await?;
    nft.settle().await;
    let (spec3, _) = spec_of(&synthetic(args.policies, args.rules_per_policy, true))?;
    let t = Instant::now();
    let actual = nft.observe().await?;
    let ops = plan(&spec3, &actual);
    let planned = t.elapsed();
    nft.apply(&ops).await?;
    let total = t.elapsed();
    let elements: usize = ops
        .iter()
        .map(|o| match o {
            NftOp::AddElements { elements, .. } | NftOp::DeleteElements { elements, .. } => {
                elements.len()
            }
            _ => 0,
        })
        .sum();
    crate::outln!(
        "  one-address set change: {} op(s), {} element(s), {} ({} observe+plan); ops: {}",
        ops.len(),
        elements,
        ms(total),
        ms(planned),
        ops.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    );
    if ops.is_empty() || ops.iter().any(|o| matches!(o, NftOp::ReplaceTable(_))) {
        return Err(PolicyBenchError::Check(format!(
            "a one-address set change should be element operations, got {ops:?}"
        )));
    }
    let listed = nft.run(&["list", "table", "inet", "wiremesh"]).await?;
    if !listed.contains("192.0.2.77") {
        return Err(PolicyBenchError::Check(
            "the new address is not in the kernel's set".into(),
        ));
    }
    if args.pods > 0 {
        pod_part(&args, &nft).await?;
    }
    Ok(())
}

/// One change measured from the table holding `from`: the pure part (validate, compile,
/// render), and observe + plan + apply, which must be one rule update writing exactly
/// `expect_written`.
async fn measure_update(
    nft: &mut KernelNft,
    from: &FilterSpec,
    to_raw: &RawPolicyResources,
    expect_written: &[String],
    iterations: usize,
) -> Result<(Duration, Duration, String), PolicyBenchError> {
    let (mut pure, mut kernel) = (Vec::new(), Vec::new());
    let mut summary = String::new();
    for _ in 0..iterations {
        let actual = nft.observe().await?;
        nft.apply(&plan(from, &actual)).await?;
        nft.settle().await;
        let (to, took) = spec_of(to_raw)?;
        pure.push(took);
        let t = Instant::now();
        let actual = nft.observe().await?;
        let ops = plan(&to, &actual);
        nft.apply(&ops).await?;
        kernel.push(t.elapsed());
        nft.settle().await;
        let updates: Vec<&wiremesh_core::dataplane::filter::RuleUpdate> = ops
            .iter()
            .filter_map(|o| match o {
                NftOp::UpdateRules(u) => Some(u.as_ref()),
                _ => None,
            })
            .collect();
        let [update] = updates.as_slice() else {
            return Err(PolicyBenchError::Check(format!(
                "expected one rule update, got {}",
                ops.iter().map(NftOp::kind).collect::<Vec<_>>().join(", ")
            )));
        };
        let written: Vec<String> = update.write_chains.iter().map(|c| c.name.clone()).collect();
        if written != expect_written {
            return Err(PolicyBenchError::Check(format!(
                "expected to write {expect_written:?}, wrote {written:?}"
            )));
        }
        summary = update.to_string();
    }
    Ok((median(pure), median(kernel), summary))
}

/// Pods: the table for `args.pods` local pods and as many policies, then one pod added and
/// one policy edited, each next to `nft -f` of the whole new table.
async fn pod_part(args: &PolicyBenchArgs, nft: &KernelNft) -> Result<(), PolicyBenchError> {
    let mut nft = nft.clone();
    let base_raw = synthetic_pods(args.pods, false, false);
    let (base, pure_cold) = spec_of(&base_raw)?;
    let text = base.replace_script();
    let rule_lines: usize = base.chains.iter().map(|c| c.rules.len()).sum();
    crate::outln!(
        "pod bench: {} local pods, {} NetworkPolicies -> {} chains, {} nft rules, {} sets, {} KiB of nft text",
        args.pods,
        args.pods,
        base.chains.len(),
        rule_lines,
        base.sets.len(),
        text.len() / 1024
    );
    crate::outln!(
        "  validate + compile + render (pure)      {}",
        ms(pure_cold)
    );
    let file = tempfile::NamedTempFile::new()?;
    let plain_time = |spec: &FilterSpec| -> Result<String, PolicyBenchError> {
        std::fs::write(file.path(), spec.replace_script())?;
        Ok(file.path().display().to_string())
    };
    let path = plain_time(&base)?;
    let t = Instant::now();
    nft.run(&["-f", &path]).await?;
    let plain_cold = t.elapsed();
    nft.run_script(&wiremesh_core::policy::render::delete_script())
        .await?;
    let t = Instant::now();
    let actual = nft.observe().await?;
    nft.apply(&plan(&base, &actual)).await?;
    crate::outln!(
        "  cold apply: wiremesh (observe+plan+apply) {}   nft -f {}",
        ms(t.elapsed()),
        ms(plain_cold)
    );
    nft.settle().await;

    let changes = [
        (
            "pod add",
            synthetic_pods(args.pods, true, false),
            vec![
                format!("fw-ns-{}/bench-extra", args.pods % NAMESPACES),
                format!("tw-ns-{}/bench-extra", args.pods % NAMESPACES),
            ],
        ),
        (
            "policy edit",
            synthetic_pods(args.pods, false, true),
            vec!["pi-np/ns-0/np-0".to_string()],
        ),
    ];
    for (what, raw, expect) in changes {
        let (to, _) = spec_of(&raw)?;
        let path = plain_time(&to)?;
        let t = Instant::now();
        nft.run(&["-f", &path]).await?;
        let plain = t.elapsed();
        let (pure, kernel, summary) =
            measure_update(&mut nft, &base, &raw, &expect, args.iterations).await?;
        crate::outln!(
            "  {what}: pure {}, observe+plan+apply {} (one transaction: {summary}); nft -f of the whole table {}",
            ms(pure),
            ms(kernel),
            ms(plain)
        );
    }
    Ok(())
}

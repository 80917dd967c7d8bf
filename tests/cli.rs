//! The binary's behaviour at its edges: output into a closed pipe, one line per failure, and
//! the datastore choice shared by every command.

use std::process::{Command, Stdio};

fn wiremesh() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wiremesh"));
    command.env_remove("WIREMESH_DATASTORE");
    command.env_remove("WIREMESH_ETCD_ENDPOINTS");
    command
}

/// `wiremesh ... | head` used to panic ("failed printing to stdout: Broken pipe"): a reader
/// that goes away ends the command quietly, with status 0.
#[test]
fn a_closed_pipe_ends_the_command_quietly() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/policy/tunnel-deny.yaml"
    );
    for args in [
        vec!["crds"],
        vec!["policy", "check", "-f", example],
        vec!["policy", "unused", "-f", example, "-o", "yaml"],
    ] {
        let mut child = wiremesh()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        // Close the reading end before the command writes anything.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    }
}

/// A failed command says what failed once, on one line of stderr.
#[test]
fn an_error_is_printed_once() {
    let out = wiremesh()
        .args(["policy", "unused", "-f", "/nonexistent/policy.yaml"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [
            "wiremesh policy: reading /nonexistent/policy.yaml: No such file or directory (os error 2)"
        ],
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
}

/// The tools pick a datastore with the agent's flags: `--datastore etcd` without endpoints is
/// a usage error naming the flags, not a silent default.
#[test]
fn tools_share_the_datastore_flags() {
    let out = wiremesh()
        .args(["status", "--cluster", "--datastore", "etcd"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--etcd-endpoints"), "{stderr}");
    assert_eq!(out.status.code(), Some(2));
    let help = wiremesh()
        .args(["policy", "explain", "--help"])
        .output()
        .expect("help");
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--datastore",
        "--etcd-endpoints",
        "--kubeconfig",
        "--context",
        "--output",
    ] {
        assert!(help.contains(flag), "policy explain --help lacks {flag}");
    }
}

/// The agent refuses a node name it cannot be (`NODENAME=` in a manifest) before it touches
/// anything, instead of running as node "".
#[test]
fn the_agent_refuses_an_empty_node_name() {
    let out = wiremesh()
        .args([
            "agent",
            "--node-name",
            "",
            "--etcd-endpoints",
            "http://127.0.0.1:1",
        ])
        .env_remove("WIREMESH_NODE_NAME")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--node-name is empty"), "{stderr}");
    assert_ne!(out.status.code(), Some(0));
}

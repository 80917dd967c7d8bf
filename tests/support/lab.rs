//! What every lab test needs: the root check, a guard that removes the lab even when the test
//! fails, starting a lab with this crate's binary as the agents, and bounded waiting.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use wiremesh::cli::lab::{self, Lab, UpOptions};

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

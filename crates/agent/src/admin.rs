//! The admin HTTP endpoints: `/metrics` (Prometheus, OpenMetrics text), `/healthz` (the
//! reconcile loop is alive) and `/readyz` (initial datastore sync done and applied once).
//!
//! The agent binds the metrics port (Felix's `prometheusMetricsPort`, 9091) and the health port
//! (Felix's `healthPort`, 9099); each serves all three paths, so one port is enough when both
//! are set to the same value.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tracing::{info, warn};

use crate::metrics::{CONTENT_TYPE, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("binding the admin endpoint on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The router serving `/metrics`, `/healthz` and `/readyz` from `metrics`.
fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(metrics)
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> Response {
    // WireGuard statistics and nftables counters are read now (at most SCRAPE_CACHE old).
    metrics.refresh().await;
    match metrics.encode() {
        Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding: {e}\n"),
        )
            .into_response(),
    }
}

async fn healthz(State(metrics): State<Arc<Metrics>>) -> Response {
    match metrics.health.live() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response(),
    }
}

async fn readyz(State(metrics): State<Arc<Metrics>>) -> Response {
    match metrics.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

/// Binds every address in `addrs` (duplicates once) and serves the admin router on each in a
/// background task. Binding happens before this returns, so a busy port is an error at start.
pub async fn serve(
    addrs: &[SocketAddr],
    metrics: Arc<Metrics>,
) -> Result<Vec<SocketAddr>, AdminError> {
    let mut bound = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for addr in addrs {
        if !seen.insert(*addr) {
            continue;
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind {
                addr: *addr,
                source,
            })?;
        let local = listener.local_addr().unwrap_or(*addr);
        let app = router(Arc::clone(&metrics));
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                warn!(addr = %local, error = %e, "admin endpoint stopped");
            }
        });
        info!(addr = %local, "serving /metrics, /healthz and /readyz");
        bound.push(local);
    }
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, out)
    }

    #[tokio::test]
    async fn endpoints_on_loopback() {
        let metrics = Arc::new(Metrics::new(Duration::from_secs(60)));
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let bound = serve(&[loopback], Arc::clone(&metrics))
            .await
            .expect("serve");
        let addr = bound[0];
        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/readyz").await.0, 503);
        metrics.set_ready();
        assert_eq!(get(addr, "/readyz").await.0, 200);
        // A datastore that cannot be reached makes the agent not ready, and says so.
        let health = wiremesh_datastore::SyncHealth::default();
        health.synced();
        health.failed("connection refused");
        metrics.set_datastore(&health.state());
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(
            body.contains("unreachable") && body.contains("connection refused"),
            "{body}"
        );
        health.synced();
        metrics.set_datastore(&health.state());
        assert_eq!(get(addr, "/readyz").await.0, 200);
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("wiremesh_ready 1"), "{body}");
        assert!(body.contains("wiremesh_datastore_up 1"), "{body}");
        assert!(body.contains("# EOF"), "{body}");
        assert_eq!(get(addr, "/nope").await.0, 404);
    }
}

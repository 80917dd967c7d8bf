//! Talking to the lab's etcd, which listens only inside the hub namespace: each call runs on a
//! thread of its own that first enters that namespace, so every socket it opens lives there.

use std::fs::File;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use tokio::sync::oneshot;

use super::LabError;
use super::sys::NETNS_DIR;
use wiremesh_datastore::etcd::{EtcdWriter, WriteError, connect_client};

/// How long to keep retrying the first connection (etcd may still be starting).
const CONNECT_WITHIN: Duration = Duration::from_secs(15);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `f` with a writer connected to `endpoint` from inside namespace `hub`.
pub async fn with_store<T, F, Fut>(
    hub: &str,
    endpoint: &str,
    step: &str,
    f: F,
) -> Result<T, LabError>
where
    T: Send + 'static,
    F: FnOnce(EtcdWriter) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, WriteError>>,
{
    let (tx, rx) = oneshot::channel();
    let (hub_name, endpoint) = (hub.to_string(), endpoint.to_string());
    let store_err = {
        let step = step.to_string();
        let endpoint = endpoint.clone();
        move |source| LabError::Store {
            step: step.clone(),
            object: endpoint.clone(),
            source,
        }
    };
    let step_name = step.to_string();
    let spawned = std::thread::Builder::new()
        .name("lab-hub".into())
        .spawn(move || {
            let result = (|| {
                let handle =
                    File::open(Path::new(NETNS_DIR).join(&hub_name)).map_err(|source| {
                        LabError::Io {
                            step: "opening hub namespace".into(),
                            path: Path::new(NETNS_DIR).join(&hub_name),
                            source,
                        }
                    })?;
                setns(&handle, CloneFlags::CLONE_NEWNET).map_err(|source| LabError::Netns {
                    step: "entering hub namespace".into(),
                    ns: hub_name.clone(),
                    source,
                })?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| LabError::Spawn {
                        step: "starting hub runtime".into(),
                        object: hub_name.clone(),
                        source,
                    })?;
                runtime.block_on(async {
                    let writer = connect(&endpoint).await.map_err(&store_err)?;
                    match tokio::time::timeout(REQUEST_TIMEOUT, f(writer)).await {
                        Ok(result) => result.map_err(&store_err),
                        Err(_) => Err(LabError::Timeout {
                            step: step_name.clone(),
                            object: endpoint.clone(),
                        }),
                    }
                })
            })();
            let _ = tx.send(result);
        })
        .map_err(|source| LabError::Spawn {
            step: step.to_string(),
            object: hub.to_string(),
            source,
        })?;
    let result = rx.await.unwrap_or_else(|_| {
        Err(LabError::Timeout {
            step: format!("{step} (hub thread ended)"),
            object: hub.to_string(),
        })
    });
    let _ = spawned.join();
    result
}

/// Connects and proves etcd answers (the adapter's [`connect_client`], each attempt bounded by
/// its timeout), retrying while etcd starts.
async fn connect(endpoint: &str) -> Result<EtcdWriter, WriteError> {
    let endpoints = [endpoint.to_string()];
    let deadline = tokio::time::Instant::now() + CONNECT_WITHIN;
    loop {
        match connect_client(&endpoints).await {
            Ok(client) => return Ok(EtcdWriter::from_client(client)),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(WriteError::Etcd {
                    key: endpoint.to_string(),
                    source: Box::new(e),
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

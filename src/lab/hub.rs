//! Talking to the lab's etcd, which listens only inside the hub namespace: each call runs on a
//! thread of its own that first enters that namespace, so every socket it opens lives there.

use std::fs::File;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use etcd_client::Client;
use nix::sched::{CloneFlags, setns};
use tokio::sync::oneshot;

use super::LabError;
use super::store::{self, StoreError};
use super::sys::NETNS_DIR;

/// How long to keep retrying the first connection (etcd may still be starting).
const CONNECT_WITHIN: Duration = Duration::from_secs(15);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `f` with a client connected to `endpoint` from inside namespace `hub`.
pub async fn with_store<T, F, Fut>(
    hub: &str,
    endpoint: &str,
    step: &str,
    f: F,
) -> Result<T, LabError>
where
    T: Send + 'static,
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, StoreError>>,
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
                    let client = connect(&endpoint).await.map_err(&store_err)?;
                    match tokio::time::timeout(REQUEST_TIMEOUT, f(client)).await {
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

/// Connects and proves etcd answers, retrying while it starts.
async fn connect(endpoint: &str) -> Result<Client, StoreError> {
    let deadline = tokio::time::Instant::now() + CONNECT_WITHIN;
    loop {
        let attempt = async {
            let mut client = store::connect(endpoint).await?;
            client.status().await.map_err(|source| StoreError::Etcd {
                key: endpoint.to_string(),
                source,
            })?;
            Ok::<_, StoreError>(client)
        };
        let outcome = tokio::time::timeout(Duration::from_secs(2), attempt).await;
        match outcome {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(e)) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) if tokio::time::Instant::now() >= deadline => {
                return store::connect(endpoint).await;
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

//! `wiremesh lab apply -f FILE`: projectcalico.org/v3 manifests into the lab's datastore: etcd
//! in Calico's key layout, or the Kubernetes API of a `lab up --kubeconfig` lab (policy kinds,
//! and FelixConfiguration for failsafe ports).

use std::path::Path;

use super::{Lab, LabError};
use wiremesh_core::manifest::Manifest;
use wiremesh_datastore::etcd::{felix_configuration_key, policy_key};

/// Reads and validates `files`; on any problem nothing is written.
pub fn read_manifests(files: &[impl AsRef<Path>]) -> Result<Manifest, LabError> {
    let mut all = Manifest::default();
    for f in files {
        let path = f.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| LabError::Io {
            step: "reading manifest".into(),
            path: path.to_path_buf(),
            source,
        })?;
        let m = Manifest::parse(&path.display().to_string(), &text);
        let (_, problems) = m.validate();
        if !problems.is_empty() {
            return Err(LabError::InvalidArgument {
                what: format!("manifest {}", path.display()),
                reason: problems.join("; "),
            });
        }
        all.objects.extend(m.objects);
    }
    Ok(all)
}

impl Lab {
    /// Writes (or with `delete`, removes) every object of `manifest`; returns the keys touched.
    pub async fn apply_manifest(
        &self,
        manifest: &Manifest,
        delete: bool,
    ) -> Result<Vec<String>, LabError> {
        // Pods, Namespaces and ServiceAccounts are for the policy tools so far: the lab has no
        // pods of that kind yet, and etcd keeps pods as WorkloadEndpoints, not as Pods.
        if let Some(o) = manifest
            .objects
            .iter()
            .find(|o| o.kind.is_some_and(|k| !k.stored()))
        {
            return Err(LabError::InvalidArgument {
                what: format!("{} ({})", o.key, o.position),
                reason: format!(
                    "the lab does not take {} objects yet (use them with `wiremesh policy which-endpoints -f`)",
                    o.kind.map_or("", |k| k.kind_name())
                ),
            });
        }
        if let Some(kubeconfig) = &self.state.kubeconfig {
            let client = super::k8s::client(kubeconfig).await?;
            return super::k8s::apply_manifest(&client, manifest, delete).await;
        }
        let items: Vec<(String, Vec<u8>)> = manifest
            .objects
            .iter()
            .map(|o| {
                let key = match o.kind {
                    Some(kind) => policy_key(kind, &o.key),
                    None => felix_configuration_key(&o.key),
                };
                (key, serde_json::to_vec(&o.value).unwrap_or_default())
            })
            .collect();
        let keys: Vec<String> = items.iter().map(|(k, _)| k.clone()).collect();
        self.with_store("applying manifests", move |mut w| async move {
            for (key, body) in items {
                if delete {
                    w.delete_raw(&key).await?;
                } else {
                    w.put_raw(&key, body).await?;
                }
            }
            Ok(())
        })
        .await?;
        Ok(keys)
    }
}

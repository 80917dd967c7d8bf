//! `wiremesh lab apply -f FILE`: projectcalico.org/v3 manifests into the lab's datastore: etcd
//! in Calico's key layout, or the Kubernetes API of a `lab up --kubeconfig` lab (policy kinds,
//! and FelixConfiguration for failsafe ports). `v1` Namespaces and Pods become real lab pods
//! with their WorkloadEndpoints and profiles (etcd labs; see `pods`).

use std::path::Path;

use std::collections::BTreeSet;

use super::pods::namespace_request;
use super::{Lab, LabError};
use wiremesh_core::manifest::{Manifest, ManifestObject};
use wiremesh_core::wire::Kind;
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
    /// Writes (or with `delete`, removes) every object of `manifest`; returns what was touched.
    /// Works on the lab as lab.json has it now (so `self` may be stale); [`Lab::apply`] on a
    /// `&mut Lab` keeps the caller's copy up to date.
    pub async fn apply_manifest(
        &self,
        manifest: &Manifest,
        delete: bool,
    ) -> Result<Vec<String>, LabError> {
        let mut current = Lab::load_from(&self.state.name, &self.state.dir)?;
        current.apply(manifest, delete).await
    }

    /// Writes (or with `delete`, removes) every object of `manifest`; returns what was touched.
    /// `v1` Namespaces and Pods become the lab's own (see `pods`): Namespaces first, then Pods,
    /// then the rest (on delete: Pods, Namespaces, the rest). Everything is checked before
    /// anything is written.
    pub async fn apply(
        &mut self,
        manifest: &Manifest,
        delete: bool,
    ) -> Result<Vec<String>, LabError> {
        let of_kind = |kind: Kind| -> Vec<&ManifestObject> {
            manifest
                .objects
                .iter()
                .filter(|o| o.kind == Some(kind))
                .collect()
        };
        // The lab has no ServiceAccount objects (each pod's `ksa.` profile carries the name only).
        if let Some(o) = of_kind(Kind::ServiceAccount).first() {
            return Err(LabError::InvalidArgument {
                what: format!("ServiceAccount {} ({})", o.key, o.position),
                reason: "the lab does not take ServiceAccount objects yet (use them with `wiremesh policy which-endpoints -f`)".into(),
            });
        }
        let (pods, namespaces) = (of_kind(Kind::Pod), of_kind(Kind::Namespace));
        if let Some(kubeconfig) = &self.state.kubeconfig {
            if let Some(o) = pods.iter().chain(&namespaces).next() {
                return Err(LabError::InvalidArgument {
                    what: format!("{} {} ({})", o.kind.map_or("", Kind::kind_name), o.key, o.position),
                    reason: "pods and namespaces are not supported yet in a Kubernetes lab (`lab up --kubeconfig`): apply them with kubectl; the lab runs pods only with its etcd".into(),
                });
            }
            let client = super::k8s::client(kubeconfig).await?;
            return super::k8s::apply_manifest(&client, manifest, delete).await;
        }
        let mut namespace_labels = Vec::new();
        for o in &namespaces {
            namespace_labels.push(namespace_request(o)?);
        }
        let mut touched = Vec::new();
        if delete {
            // A pod is named by namespace/name (the manifest's key); its spec does not matter.
            for o in &pods {
                touched.extend(self.delete_pod(&o.key).await?);
            }
            for (name, _) in &namespace_labels {
                touched.extend(self.delete_namespace(name).await?);
            }
        } else {
            let created: BTreeSet<String> =
                namespace_labels.iter().map(|(n, _)| n.clone()).collect();
            let requests = self.check_pods(&pods, &created)?;
            for (name, labels) in namespace_labels {
                touched.push(self.put_namespace(&name, labels).await?);
            }
            for request in requests {
                touched.extend(self.put_pod(request).await?);
            }
        }
        let items: Vec<(String, Vec<u8>)> = manifest
            .objects
            .iter()
            .filter(|o| o.kind.is_none_or(Kind::stored))
            .map(|o| {
                let key = match o.kind {
                    Some(kind) => policy_key(kind, &o.key),
                    None => felix_configuration_key(&o.key),
                };
                (key, serde_json::to_vec(&o.value).unwrap_or_default())
            })
            .collect();
        if items.is_empty() {
            return Ok(touched);
        }
        touched.extend(items.iter().map(|(k, _)| k.clone()));
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
        Ok(touched)
    }
}

//! `wiremesh lab apply -f FILE`: projectcalico.org/v3 manifests into the lab's datastore: etcd
//! in Calico's key layout, or the Kubernetes API of a `lab up --kubeconfig` lab (policy kinds,
//! and FelixConfiguration for failsafe ports). `v1` Namespaces and Pods become real lab pods,
//! published as WorkloadEndpoints and profiles (etcd labs) or as Namespace and Pod objects
//! (Kubernetes labs; see `pods`).

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
        let (pods, namespaces) = (of_kind(Kind::Pod), of_kind(Kind::Namespace));
        if self.state.kubeconfig.is_some() {
            return self.apply_kube(manifest, &pods, &namespaces, delete).await;
        }
        // The etcd lab has no ServiceAccount objects (each pod's `ksa.` profile carries the
        // name only).
        if let Some(o) = of_kind(Kind::ServiceAccount).first() {
            return Err(LabError::InvalidArgument {
                what: format!("ServiceAccount {} ({})", o.key, o.position),
                reason: "the lab does not take ServiceAccount objects yet (use them with `wiremesh policy which-endpoints -f`)".into(),
            });
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
                touched.extend(self.put_namespace(&name, labels).await?);
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

    /// [`Lab::apply`] in a Kubernetes lab: Namespaces (with their `default` ServiceAccount),
    /// ServiceAccounts, Pods (plumbed here, published as objects), then the rest through the
    /// API; on delete Pods, the rest, then Namespaces (after their pods).
    async fn apply_kube(
        &mut self,
        manifest: &Manifest,
        pods: &[&ManifestObject],
        namespaces: &[&ManifestObject],
        delete: bool,
    ) -> Result<Vec<String>, LabError> {
        let client = self
            .kube_client()
            .await?
            .ok_or_else(|| LabError::InvalidArgument {
                what: "lab".into(),
                reason: "not a Kubernetes lab".into(),
            })?;
        let mut namespace_labels = Vec::new();
        for o in namespaces {
            namespace_labels.push(namespace_request(o)?);
        }
        let subset = |wanted: &dyn Fn(Option<Kind>) -> bool| Manifest {
            objects: manifest
                .objects
                .iter()
                .filter(|o| wanted(o.kind))
                .cloned()
                .collect(),
            errors: Vec::new(),
        };
        let accounts = subset(&|k| k == Some(Kind::ServiceAccount));
        let rest =
            subset(&|k| !matches!(k, Some(Kind::ServiceAccount | Kind::Pod | Kind::Namespace)));
        let mut touched = Vec::new();
        if delete {
            for o in pods {
                touched.extend(self.delete_pod(&o.key).await?);
            }
            touched.extend(super::k8s::apply_manifest(&client, &rest, true).await?);
            touched.extend(super::k8s::apply_manifest(&client, &accounts, true).await?);
            for (name, _) in &namespace_labels {
                touched.extend(self.delete_namespace(name).await?);
            }
            return Ok(touched);
        }
        let created: BTreeSet<String> = namespace_labels.iter().map(|(n, _)| n.clone()).collect();
        // A pod's namespace may exist in the cluster already: take its labels from there.
        let mut existing = Vec::new();
        for o in pods {
            let namespace = o.key.split_once('/').map_or("default", |(ns, _)| ns);
            if created.contains(namespace) || existing.iter().any(|(n, _)| n == namespace) {
                continue;
            }
            if let Some(labels) = super::k8s::namespace_labels(&client, namespace).await? {
                existing.push((namespace.to_string(), labels));
            }
        }
        for (name, labels) in &existing {
            self.state.namespaces.insert(name.clone(), labels.clone());
        }
        let requests = self.check_pods(pods, &created)?;
        // Known namespaces too: their `default` ServiceAccount may be missing.
        for (name, labels) in namespace_labels.into_iter().chain(existing) {
            touched.extend(self.put_namespace(&name, labels).await?);
        }
        touched.extend(super::k8s::apply_manifest(&client, &accounts, false).await?);
        for request in requests {
            touched.extend(self.put_pod(request).await?);
        }
        touched.extend(super::k8s::apply_manifest(&client, &rest, false).await?);
        Ok(touched)
    }
}

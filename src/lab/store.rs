//! The lab's writes to etcd, in Calico's v3 key layout. Kept thin on purpose: these become
//! calls into the etcd adapter's writer functions once that exists.

use std::collections::BTreeMap;

use etcd_client::Client;
use ipnet::Ipv4Net;
use serde_json::{Value, json};

const NODES: &str = "/calico/resources/v3/projectcalico.org/nodes/";
const FELIX_CONFIGURATIONS: &str = "/calico/resources/v3/projectcalico.org/felixconfigurations/";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd request on {key}")]
    Etcd {
        key: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("{key} holds no valid JSON object")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{key} holds JSON that is not an object")]
    NotAnObject { key: String },
}

fn etcd_err(key: &str) -> impl FnOnce(etcd_client::Error) -> StoreError + '_ {
    move |source| StoreError::Etcd {
        key: key.to_string(),
        source,
    }
}

pub fn node_key(name: &str) -> String {
    format!("{NODES}{name}")
}

pub fn block_affinity_key(node: &str, cidr: &Ipv4Net) -> String {
    format!(
        "/calico/ipam/v2/host/{node}/ipv4/block/{}-{}",
        cidr.network(),
        cidr.prefix_len()
    )
}

pub fn felix_configuration_key(name: &str) -> String {
    format!("{FELIX_CONFIGURATIONS}{name}")
}

pub async fn connect(endpoint: &str) -> Result<Client, StoreError> {
    Client::connect([endpoint], None)
        .await
        .map_err(etcd_err(endpoint))
}

/// Writes a Calico v3 Node with its underlay address (`spec.bgp.ipv4Address`).
pub async fn put_node(
    client: &mut Client,
    name: &str,
    ipv4_address: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), StoreError> {
    let node = json!({
        "kind": "Node",
        "apiVersion": "projectcalico.org/v3",
        "metadata": { "name": name, "labels": labels },
        "spec": { "bgp": { "ipv4Address": ipv4_address } },
    });
    put_raw(client, &node_key(name), &node.to_string()).await
}

pub async fn delete_node(client: &mut Client, name: &str) -> Result<(), StoreError> {
    delete_raw(client, &node_key(name)).await
}

pub async fn put_block_affinity(
    client: &mut Client,
    node: &str,
    cidr: &Ipv4Net,
) -> Result<(), StoreError> {
    let value = json!({ "state": "confirmed" });
    put_raw(client, &block_affinity_key(node, cidr), &value.to_string()).await
}

pub async fn delete_block_affinity(
    client: &mut Client,
    node: &str,
    cidr: &Ipv4Net,
) -> Result<(), StoreError> {
    delete_raw(client, &block_affinity_key(node, cidr)).await
}

/// Replaces FelixConfiguration `name` with one holding exactly `spec`.
pub async fn put_felix_configuration(
    client: &mut Client,
    name: &str,
    spec: Value,
) -> Result<(), StoreError> {
    let object = json!({
        "kind": "FelixConfiguration",
        "apiVersion": "projectcalico.org/v3",
        "metadata": { "name": name },
        "spec": spec,
    });
    put_raw(client, &felix_configuration_key(name), &object.to_string()).await
}

/// Sets one `spec` field of FelixConfiguration `name` (creating the object if needed);
/// `Value::Null` removes the field. Other fields are kept.
pub async fn patch_felix_configuration(
    client: &mut Client,
    name: &str,
    field: &str,
    value: Value,
) -> Result<(), StoreError> {
    let key = felix_configuration_key(name);
    let mut object = match get_raw(client, &key).await? {
        Some(text) => {
            serde_json::from_str::<Value>(&text).map_err(|source| StoreError::Decode {
                key: key.clone(),
                source,
            })?
        }
        None => json!({
            "kind": "FelixConfiguration",
            "apiVersion": "projectcalico.org/v3",
            "metadata": { "name": name },
            "spec": {},
        }),
    };
    let root = object
        .as_object_mut()
        .ok_or_else(|| StoreError::NotAnObject { key: key.clone() })?;
    let spec = root.entry("spec").or_insert_with(|| json!({}));
    let spec = spec
        .as_object_mut()
        .ok_or_else(|| StoreError::NotAnObject {
            key: format!("{key} (spec)"),
        })?;
    if value.is_null() {
        spec.remove(field);
    } else {
        spec.insert(field.to_string(), value);
    }
    put_raw(client, &key, &object.to_string()).await
}

/// Reads FelixConfiguration `name`'s spec, if the object exists.
pub async fn get_felix_configuration(
    client: &mut Client,
    name: &str,
) -> Result<Option<Value>, StoreError> {
    let key = felix_configuration_key(name);
    match get_raw(client, &key).await? {
        None => Ok(None),
        Some(text) => {
            let object: Value =
                serde_json::from_str(&text).map_err(|source| StoreError::Decode {
                    key: key.clone(),
                    source,
                })?;
            Ok(Some(
                object.get("spec").cloned().unwrap_or_else(|| json!({})),
            ))
        }
    }
}

pub async fn put_raw(client: &mut Client, key: &str, value: &str) -> Result<(), StoreError> {
    client.put(key, value, None).await.map_err(etcd_err(key))?;
    Ok(())
}

pub async fn get_raw(client: &mut Client, key: &str) -> Result<Option<String>, StoreError> {
    let response = client.get(key, None).await.map_err(etcd_err(key))?;
    Ok(response
        .kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
}

pub async fn delete_raw(client: &mut Client, key: &str) -> Result<(), StoreError> {
    client.delete(key, None).await.map_err(etcd_err(key))?;
    Ok(())
}

//! etcd v3 with Calico's key layout.
//!
//! Keys read (and written by [`EtcdWriter`]):
//!
//! | what | key | value |
//! |---|---|---|
//! | Node | `/calico/resources/v3/projectcalico.org/nodes/<name>` | Calico `Node` JSON |
//! | FelixConfiguration | `/calico/resources/v3/projectcalico.org/felixconfigurations/<name>` | Calico `FelixConfiguration` JSON |
//! | IPAM block affinity | `/calico/ipam/v2/host/<node>/ipv<4\|6>/block/<cidr, first '/' as '-'>` | `{"state":"confirmed","deleted":false}` (the writer leaves out `deleted`) |
//!
//! The block-affinity layout follows libcalico-go (`lib/backend/model/block_affinity.go`):
//! written as `/calico/ipam/v2/host/%s/ipv%d/block/%s` with the CIDR's first `/` replaced by `-`,
//! read back with `^/?calico/ipam/v2/host/([^/]+)/ipv./block/([^/]+)$`; the value holds
//! `state` (`confirmed`, `pending`, `pendingDeletion`) and `deleted`. Where we differ:
//! - libcalico-go's reader accepts any character after `ipv` and never checks it against the
//!   CIDR's family; we require `ipv4`/`ipv6` to match the CIDR (Calico's writer always produces
//!   that), and report other keys as malformed.
//! - libcalico-go dereferences a nil CIDR when the key's CIDR does not parse; we report it.
//! - An affinity counts as a pod CIDR of its node when its state is `confirmed` or absent/empty
//!   (older Calico values carry no state) and `deleted` is not true; an empty value counts as
//!   confirmed. A value that is not JSON is reported and left out.
//! - Like Go's `net.ParseCIDR`, a CIDR with host bits set is reduced to its network.
//!
//! The adapter lists the three prefixes in one transaction (one revision), then keeps one watch
//! per prefix, each resuming from the last revision it delivered. A watch that falls behind a
//! compaction triggers a full re-list that replaces the snapshot in one step.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, Txn, TxnOp,
    TxnOpResponse, WatchOptions, WatchResponse, WatchStream,
};
use futures::stream::{BoxStream, SelectAll, StreamExt};
use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{Map, Value};
use tracing::{debug, info, warn};

use super::{Datastore, DatastoreError, ReadScope, SnapshotSender, SyncHealth};
use wiremesh_core::config::EffectiveConfig;
use wiremesh_core::model::{
    ClusterSnapshot, Family, FelixConfigurations, NodeResource, PublishedWireguard,
};
use wiremesh_core::wire::FelixConfigurationSpec;
use wiremesh_core::wire::felix::DecodedFelix;
use wiremesh_core::wire::json_kind;

/// Prefix of Calico Node resources.
pub const NODES_PREFIX: &str = "/calico/resources/v3/projectcalico.org/nodes/";
/// Prefix of Calico FelixConfiguration resources.
pub const FELIX_CONFIGURATIONS_PREFIX: &str =
    "/calico/resources/v3/projectcalico.org/felixconfigurations/";
/// Prefix of Calico IPAM block affinities (per host).
/// Policy resources, one prefix per kind: `<prefix><name>` or `<prefix><namespace>/<name>`.
pub const POLICY_PREFIXES: [&str; 9] = [
    "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/",
    "/calico/resources/v3/projectcalico.org/networkpolicies/",
    "/calico/resources/v3/projectcalico.org/tiers/",
    "/calico/resources/v3/projectcalico.org/hostendpoints/",
    "/calico/resources/v3/projectcalico.org/globalnetworksets/",
    "/calico/resources/v3/projectcalico.org/networksets/",
    "/calico/resources/v3/projectcalico.org/kubernetesnetworkpolicies/",
    "/calico/resources/v3/projectcalico.org/workloadendpoints/",
    "/calico/resources/v3/projectcalico.org/profiles/",
];

/// The etcd key of a policy resource (`name` is `namespace/name` for namespaced kinds).
pub fn policy_key(kind: wiremesh_core::wire::Kind, name: &str) -> String {
    format!(
        "/calico/resources/v3/projectcalico.org/{}/{name}",
        kind.plural()
    )
}

/// The kind and name (`namespace/name` for namespaced kinds) of a policy resource key.
pub fn decode_policy_key(key: &str) -> Option<(wiremesh_core::wire::Kind, String)> {
    let rest = key.strip_prefix("/calico/resources/v3/projectcalico.org/")?;
    let (plural, name) = rest.split_once('/')?;
    let kind = wiremesh_core::wire::Kind::from_plural(plural)?;
    let parts = name.split('/').count();
    let want = if kind.namespaced() { 2 } else { 1 };
    (parts == want && name.split('/').all(|p| !p.is_empty())).then(|| (kind, name.to_string()))
}

pub const AFFINITIES_PREFIX: &str = "/calico/ipam/v2/host/";

/// How long connecting (and each list/publish request) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts of the compare-and-swap in `publish` before giving up with `Conflict`.
const PUBLISH_ATTEMPTS: u32 = 5;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

pub fn node_key(name: &str) -> String {
    format!("{NODES_PREFIX}{name}")
}

pub fn felix_configuration_key(name: &str) -> String {
    format!("{FELIX_CONFIGURATIONS_PREFIX}{name}")
}

/// Calico's block-affinity key for `cidr` on `node` (see the module docs).
pub fn affinity_key(node: &str, cidr: &IpNet) -> String {
    let version = match Family::of_net(cidr) {
        Family::V4 => 4,
        Family::V6 => 6,
    };
    format!(
        "{AFFINITIES_PREFIX}{node}/ipv{version}/block/{}",
        cidr.trunc().to_string().replacen('/', "-", 1)
    )
}

// ---------------------------------------------------------------------------------------------
// Pure decoding
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawNode {
    spec: Option<RawNodeSpec>,
    status: Option<RawNodeStatus>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawNodeSpec {
    bgp: Option<RawBgp>,
    addresses: Option<Vec<RawAddress>>,
    wireguard: Option<RawWireguardSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawBgp {
    ipv4_address: Option<String>,
    ipv6_address: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawAddress {
    address: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawWireguardSpec {
    #[serde(rename = "interfaceIPv4Address")]
    interface_ipv4_address: Option<String>,
    #[serde(rename = "interfaceIPv6Address")]
    interface_ipv6_address: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawNodeStatus {
    #[serde(rename = "wireguardPublicKey")]
    wireguard_public_key: Option<String>,
    #[serde(rename = "wireguardPublicKeyV6")]
    wireguard_public_key_v6: Option<String>,
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

/// The family of an address written as `a.b.c.d`, `a.b.c.d/len` or the IPv6 equivalents.
fn address_family(text: &str) -> Option<Family> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Some(Family::of_addr(&addr));
    }
    text.parse::<IpNet>().ok().map(|net| Family::of_net(&net))
}

/// Decodes a Calico Node object stored under `name`. Never fails: a value that cannot be decoded
/// gives a node with only `name` and `decode_error` set, so that it is reported rather than lost.
/// `pod_cidrs` is left empty (it comes from block affinities).
pub fn decode_node(name: &str, value: &[u8]) -> NodeResource {
    let raw: RawNode = match serde_json::from_slice::<Value>(value) {
        Ok(Value::Object(object)) => match serde_json::from_value(Value::Object(object)) {
            Ok(raw) => raw,
            Err(e) => return node_with_error(name, format!("Node object does not decode: {e}")),
        },
        Ok(other) => {
            return node_with_error(
                name,
                format!("Node value is not a JSON object but {}", json_kind(&other)),
            );
        }
        Err(e) => return node_with_error(name, format!("Node value is not valid JSON: {e}")),
    };
    let spec = raw.spec.unwrap_or_default();
    let status = raw.status.unwrap_or_default();
    let bgp = spec.bgp.unwrap_or_default();
    let addresses = spec.addresses.unwrap_or_default();
    let from_addresses = |family: Family| -> Option<String> {
        ["InternalIP", "ExternalIP"].iter().find_map(|wanted| {
            addresses.iter().find_map(|a| {
                let address = a.address.as_deref()?;
                (a.kind.as_deref() == Some(*wanted) && address_family(address) == Some(family))
                    .then(|| address.trim().to_string())
            })
        })
    };
    let wireguard = spec.wireguard.unwrap_or_default();
    NodeResource {
        name: name.to_string(),
        ipv4_address: non_empty(bgp.ipv4_address).or_else(|| from_addresses(Family::V4)),
        ipv6_address: non_empty(bgp.ipv6_address).or_else(|| from_addresses(Family::V6)),
        pod_cidrs: Vec::new(),
        pod_cidr_claimed_at: BTreeMap::new(),
        wireguard_public_key: non_empty(status.wireguard_public_key),
        wireguard_public_key_v6: non_empty(status.wireguard_public_key_v6),
        wireguard_interface_ipv4_address: non_empty(wireguard.interface_ipv4_address),
        wireguard_interface_ipv6_address: non_empty(wireguard.interface_ipv6_address),
        decode_error: None,
    }
}

fn node_with_error(name: &str, error: String) -> NodeResource {
    NodeResource {
        name: name.to_string(),
        decode_error: Some(error),
        ..NodeResource::default()
    }
}

/// Parses a block-affinity key into (node, family, CIDR). `None` for anything that is not exactly
/// `/calico/ipam/v2/host/<node>/ipv<4|6>/block/<cidr>` with a CIDR of that family.
fn decode_affinity_key(key: &str) -> Option<(String, Family, IpNet)> {
    // libcalico-go's regex allows the leading '/' to be missing.
    let rest = key
        .strip_prefix('/')
        .unwrap_or(key)
        .strip_prefix(&AFFINITIES_PREFIX[1..])?;
    let mut parts = rest.split('/');
    let (node, version, block, cidr) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || node.is_empty() || block != "block" || cidr.is_empty() {
        return None;
    }
    let family = match version {
        "ipv4" => Family::V4,
        "ipv6" => Family::V6,
        _ => return None,
    };
    let net: IpNet = cidr.replacen('-', "/", 1).parse().ok()?;
    (Family::of_net(&net) == family).then(|| (node.to_string(), family, net.trunc()))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawAffinity {
    state: Option<String>,
    deleted: Option<bool>,
}

/// Whether a block-affinity value makes the block one of its node's pod CIDRs: state
/// `confirmed` or absent, and not `deleted`. An empty value counts as confirmed.
fn decode_affinity_value(value: &[u8]) -> Result<bool, String> {
    if value.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(true);
    }
    let raw: RawAffinity = serde_json::from_slice(value)
        .map_err(|e| format!("block affinity value does not decode: {e}"))?;
    let confirmed = matches!(raw.state.as_deref(), None | Some("") | Some("confirmed"));
    Ok(confirmed && raw.deleted != Some(true))
}

/// Decodes a Calico FelixConfiguration object into its spec (unknown fields ignored; a missing
/// spec is an empty spec).
pub fn decode_felix_configuration(value: &[u8]) -> Result<DecodedFelix, String> {
    match serde_json::from_slice::<Value>(value) {
        Ok(object) => FelixConfigurationSpec::from_object(&object),
        Err(e) => Err(format!("is not valid JSON: {e}")),
    }
}

/// Writes `published` into a Calico Node JSON value, touching only
/// `status.wireguardPublicKey{,V6}` and `spec.wireguard.interfaceIPv{4,6}Address`. `None` removes
/// a field; an emptied `spec.wireguard` is removed. Returns whether anything changed.
fn apply_published_json(node: &mut Value, published: &PublishedWireguard) -> Result<bool, String> {
    let object = node
        .as_object_mut()
        .ok_or("Node value is not a JSON object")?;
    let mut changed = false;
    {
        let status = child_object(
            object,
            "status",
            published.public_key_v4.is_some() || published.public_key_v6.is_some(),
        )?;
        if let Some(status) = status {
            changed |= set_field(
                status,
                "wireguardPublicKey",
                published.public_key_v4.map(|k| k.to_string()),
            );
            changed |= set_field(
                status,
                "wireguardPublicKeyV6",
                published.public_key_v6.map(|k| k.to_string()),
            );
        }
    }
    let want_wireguard =
        published.interface_ipv4_address.is_some() || published.interface_ipv6_address.is_some();
    if let Some(spec) = child_object(object, "spec", want_wireguard)?
        && let Some(wireguard) = child_object(spec, "wireguard", want_wireguard)?
    {
        changed |= set_field(
            wireguard,
            "interfaceIPv4Address",
            published.interface_ipv4_address.map(|a| a.to_string()),
        );
        changed |= set_field(
            wireguard,
            "interfaceIPv6Address",
            published.interface_ipv6_address.map(|a| a.to_string()),
        );
        if wireguard.is_empty() {
            spec.remove("wireguard");
            changed = true;
        }
    }
    Ok(changed)
}

/// The object under `name`, created when `create` (a JSON null counts as absent); an error if
/// the field holds something other than an object.
fn child_object<'a>(
    parent: &'a mut Map<String, Value>,
    name: &str,
    create: bool,
) -> Result<Option<&'a mut Map<String, Value>>, String> {
    let present = matches!(parent.get(name), Some(v) if !v.is_null());
    if !present {
        if !create {
            return Ok(None);
        }
        parent.insert(name.to_string(), Value::Object(Map::new()));
    }
    match parent.get_mut(name) {
        Some(Value::Object(object)) => Ok(Some(object)),
        Some(other) => Err(format!(
            "field {name} is {}, not an object",
            json_kind(other)
        )),
        None => Ok(None),
    }
}

fn set_field(object: &mut Map<String, Value>, name: &str, value: Option<String>) -> bool {
    match value {
        Some(v) => {
            let v = Value::String(v);
            if object.get(name) == Some(&v) {
                false
            } else {
                object.insert(name.to_string(), v);
                true
            }
        }
        None => object.remove(name).is_some(),
    }
}

// ---------------------------------------------------------------------------------------------
// The cache: raw state per key, and the snapshot built from it
// ---------------------------------------------------------------------------------------------

/// Everything read from etcd, by key, from which the snapshot is built.
#[derive(Debug, Default)]
struct State {
    /// Node objects by node name (without pod CIDRs).
    nodes: BTreeMap<String, NodeResource>,
    /// Counting block affinities: key -> (node, CIDR, the key's create revision).
    affinities: BTreeMap<String, (String, IpNet, i64)>,
    felix: BTreeMap<String, Result<DecodedFelix, String>>,
    policy: wiremesh_core::wire::RawPolicyResources,
}

/// What a single key change touched, so only that part of the snapshot is recomputed.
enum Touched {
    Node(String),
    Felix(String),
    Policy,
    Nothing,
}

impl State {
    /// `created` is the key's create revision (the order of pod-CIDR claims).
    fn apply_put(&mut self, key: &str, value: &[u8], created: i64) -> Touched {
        if let Some(name) = key.strip_prefix(NODES_PREFIX) {
            if name.is_empty() || name.contains('/') {
                warn!(
                    key,
                    "ignoring a key under the nodes prefix that is not a node name"
                );
                return Touched::Nothing;
            }
            let node = decode_node(name, value);
            if let Some(error) = &node.decode_error {
                warn!(node = name, %error, "node object does not decode; the node is skipped");
            }
            self.nodes.insert(name.to_string(), node);
            Touched::Node(name.to_string())
        } else if let Some(name) = key.strip_prefix(FELIX_CONFIGURATIONS_PREFIX) {
            if name.is_empty() || name.contains('/') {
                warn!(
                    key,
                    "ignoring a key under the felixconfigurations prefix that is not a name"
                );
                return Touched::Nothing;
            }
            let spec = decode_felix_configuration(value);
            if let Err(error) = &spec {
                warn!(felixconfiguration = name, %error, "FelixConfiguration does not decode");
            }
            self.felix.insert(name.to_string(), spec);
            Touched::Felix(name.to_string())
        } else if POLICY_PREFIXES.iter().any(|p| key.starts_with(p)) {
            let Some((kind, name)) = decode_policy_key(key) else {
                warn!(key, "ignoring a malformed policy resource key");
                return Touched::Nothing;
            };
            // Undecodable JSON is kept as a string so validation reports it.
            let value = serde_json::from_slice::<Value>(value)
                .unwrap_or_else(|e| Value::String(format!("not valid JSON: {e}")));
            self.policy.insert(kind, name, value);
            Touched::Policy
        } else if key.starts_with(AFFINITIES_PREFIX) {
            let Some((node, _family, cidr)) = decode_affinity_key(key) else {
                warn!(key, "malformed block affinity key; ignored");
                return self.forget_affinity(key);
            };
            match decode_affinity_value(value) {
                Ok(true) => {
                    self.affinities
                        .insert(key.to_string(), (node.clone(), cidr, created));
                    Touched::Node(node)
                }
                Ok(false) => {
                    debug!(key, "block affinity not confirmed; not a pod CIDR yet");
                    self.affinities.remove(key);
                    Touched::Node(node)
                }
                Err(error) => {
                    warn!(key, %error, "block affinity value does not decode; ignored");
                    self.affinities.remove(key);
                    Touched::Node(node)
                }
            }
        } else {
            Touched::Nothing
        }
    }

    fn apply_delete(&mut self, key: &str) -> Touched {
        if let Some(name) = key.strip_prefix(NODES_PREFIX) {
            self.nodes.remove(name);
            Touched::Node(name.to_string())
        } else if let Some(name) = key.strip_prefix(FELIX_CONFIGURATIONS_PREFIX) {
            self.felix.remove(name);
            Touched::Felix(name.to_string())
        } else if let Some((kind, name)) = decode_policy_key(key) {
            if let Some(objects) = self.policy.objects.get_mut(&kind) {
                objects.remove(&name);
            }
            Touched::Policy
        } else {
            self.forget_affinity(key)
        }
    }

    fn forget_affinity(&mut self, key: &str) -> Touched {
        match self.affinities.remove(key) {
            Some((node, _, _)) => Touched::Node(node),
            None => Touched::Nothing,
        }
    }

    /// The merged node as the snapshot shows it: its object plus its pod CIDRs. A node without an
    /// object (affinities only) is not shown.
    fn node_entry(&self, name: &str) -> Option<NodeResource> {
        let mut node = self.nodes.get(name)?.clone();
        let mut claims: BTreeMap<IpNet, u64> = BTreeMap::new();
        for (_, cidr, created) in self.affinities.values().filter(|(n, _, _)| n == name) {
            let created = u64::try_from(*created).unwrap_or_default();
            let claimed = claims.entry(*cidr).or_insert(created);
            *claimed = (*claimed).min(created);
        }
        node.pod_cidrs = claims.keys().map(IpNet::to_string).collect();
        node.pod_cidr_claimed_at = claims
            .into_iter()
            .map(|(cidr, created)| (cidr.to_string(), created))
            .collect();
        Some(node)
    }

    fn snapshot(&self) -> ClusterSnapshot {
        ClusterSnapshot {
            nodes: self
                .nodes
                .keys()
                .filter_map(|name| Some((name.clone(), self.node_entry(name)?)))
                .collect(),
            felix_configurations: self.felix.clone(),
            synced: true,
            policy: self.policy.clone(),
        }
    }

    /// Brings the part of `snap` that `touched` concerns up to date; true if it changed.
    fn update_snapshot(&self, snap: &mut ClusterSnapshot, touched: &Touched) -> bool {
        match touched {
            Touched::Node(name) => replace_entry(&mut snap.nodes, name, self.node_entry(name)),
            Touched::Felix(name) => replace_entry(
                &mut snap.felix_configurations,
                name,
                self.felix.get(name).cloned(),
            ),
            Touched::Policy => {
                let changed = snap.policy != self.policy;
                if changed {
                    snap.policy = self.policy.clone();
                }
                changed
            }
            Touched::Nothing => false,
        }
    }
}

fn replace_entry<V: PartialEq>(
    map: &mut BTreeMap<String, V>,
    name: &str,
    value: Option<V>,
) -> bool {
    match value {
        Some(v) => {
            if map.get(name) == Some(&v) {
                false
            } else {
                map.insert(name.to_string(), v);
                true
            }
        }
        None => map.remove(name).is_some(),
    }
}

// ---------------------------------------------------------------------------------------------
// The adapter
// ---------------------------------------------------------------------------------------------

/// The etcd datastore adapter.
pub struct EtcdDatastore {
    endpoints: Vec<String>,
    client: Client,
    health: std::sync::Arc<SyncHealth>,
}

fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
}

fn boxed(
    e: impl std::error::Error + Send + Sync + 'static,
) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

/// Connects to `endpoints` and checks that etcd answers within [`CONNECT_TIMEOUT`].
pub async fn connect_client(endpoints: &[String]) -> Result<Client, DatastoreError> {
    let endpoint = endpoints.join(",");
    let connect_error =
        |source: Box<dyn std::error::Error + Send + Sync>| DatastoreError::Connect {
            endpoint: endpoint.clone(),
            source,
        };
    let attempt = async {
        let mut client = Client::connect(endpoints, Some(connect_options()))
            .await
            .map_err(boxed)?;
        client
            .get(
                AFFINITIES_PREFIX,
                Some(GetOptions::new().with_keys_only().with_limit(1)),
            )
            .await
            .map_err(boxed)?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(client)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(connect_error(e)),
        Err(_) => Err(connect_error(
            format!("no answer within {CONNECT_TIMEOUT:?}").into(),
        )),
    }
}

/// Runs `fut` with [`REQUEST_TIMEOUT`], folding a timeout into the etcd error type.
async fn bounded<T>(
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, Box<dyn std::error::Error + Send + Sync>> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(result) => result.map_err(boxed),
        Err(_) => Err(format!("etcd did not answer within {REQUEST_TIMEOUT:?}").into()),
    }
}

/// The watched prefixes, in a fixed order (the index names a watch).
const PREFIXES: [&str; 12] = [
    NODES_PREFIX,
    AFFINITIES_PREFIX,
    FELIX_CONFIGURATIONS_PREFIX,
    POLICY_PREFIXES[0],
    POLICY_PREFIXES[1],
    POLICY_PREFIXES[2],
    POLICY_PREFIXES[3],
    POLICY_PREFIXES[4],
    POLICY_PREFIXES[5],
    POLICY_PREFIXES[6],
    POLICY_PREFIXES[7],
    POLICY_PREFIXES[8],
];
type Revisions = [i64; PREFIXES.len()];

/// Why a watch session ended.
enum WatchEnd {
    /// A watch fell behind a compaction: re-list.
    Compacted,
    /// Disconnect or error: reconnect and resume.
    Error(DatastoreError),
}

type WatchItem = (usize, Result<Option<WatchResponse>, etcd_client::Error>);

impl EtcdDatastore {
    /// Connects to etcd (bounded by [`CONNECT_TIMEOUT`]); fails if etcd does not answer.
    pub async fn connect(endpoints: Vec<String>) -> Result<Self, DatastoreError> {
        let client = connect_client(&endpoints).await?;
        Ok(EtcdDatastore {
            endpoints,
            client,
            health: Default::default(),
        })
    }

    /// A writer sharing this adapter's connection.
    pub fn writer(&self) -> EtcdWriter {
        EtcdWriter {
            client: self.client.clone(),
        }
    }

    fn what(&self) -> String {
        format!("etcd {} ({})", self.endpoints.join(","), PREFIXES.join(" "))
    }

    /// Lists the three prefixes in one transaction; returns the state and its revision.
    async fn list(&self, client: &mut Client) -> Result<(State, i64), DatastoreError> {
        let txn = Txn::new().and_then(
            PREFIXES
                .iter()
                .map(|p| TxnOp::get(*p, Some(GetOptions::new().with_prefix())))
                .collect::<Vec<_>>(),
        );
        let response = bounded(client.txn(txn))
            .await
            .map_err(|source| DatastoreError::List {
                what: self.what(),
                source,
            })?;
        let revision = response.header().map(|h| h.revision()).unwrap_or_default();
        let mut state = State::default();
        for op in response.op_responses() {
            if let TxnOpResponse::Get(get) = op {
                for kv in get.kvs() {
                    match kv.key_str() {
                        Ok(key) => {
                            state.apply_put(key, kv.value(), kv.create_revision());
                        }
                        Err(_) => {
                            warn!(key = ?String::from_utf8_lossy(kv.key()), "key is not UTF-8; ignored")
                        }
                    }
                }
            }
        }
        Ok((state, revision))
    }

    /// Opens one watch per prefix from its next revision; waits for each to be created.
    async fn open_watches(
        &self,
        client: &mut Client,
        next_revision: &Revisions,
    ) -> Result<SelectAll<BoxStream<'static, WatchItem>>, WatchEnd> {
        let mut all = SelectAll::new();
        for (index, prefix) in PREFIXES.iter().enumerate() {
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(next_revision[index])
                .with_progress_notify();
            let watch_error = |source| {
                WatchEnd::Error(DatastoreError::Watch {
                    what: prefix.to_string(),
                    source,
                })
            };
            let mut stream = bounded(client.watch(*prefix, Some(options)))
                .await
                .map_err(watch_error)?;
            // The first message is the `created` response (or a cancel, e.g. compacted).
            match bounded(stream.message()).await.map_err(watch_error)? {
                Some(first) if first.canceled() => return Err(canceled(prefix, &first)),
                Some(first) if first.created() => {}
                Some(_) => return Err(watch_error("unexpected first watch response".into())),
                None => return Err(watch_error("watch stream closed at once".into())),
            }
            // Yields every message, and stops after the first end or error (which is yielded).
            let tagged = futures::stream::unfold(
                Some(stream),
                move |state: Option<WatchStream>| async move {
                    let mut stream = state?;
                    let item = stream.message().await;
                    let next = matches!(item, Ok(Some(_))).then_some(stream);
                    Some(((index, item), next))
                },
            );
            all.push(tagged.boxed());
        }
        Ok(all)
    }

    /// Watches until an error or a compaction, applying every event to `state` and `cache`.
    async fn watch(
        &self,
        client: &mut Client,
        state: &mut State,
        next_revision: &mut Revisions,
        cache: &SnapshotSender,
        backoff: &mut Duration,
    ) -> WatchEnd {
        let mut streams = match self.open_watches(client, next_revision).await {
            Ok(streams) => streams,
            Err(end) => return end,
        };
        info!(revisions = ?next_revision, "etcd watches established");
        self.health.synced();
        *backoff = BACKOFF_MIN;
        while let Some((index, item)) = streams.next().await {
            let prefix = PREFIXES[index];
            let response = match item {
                Ok(Some(response)) => response,
                Ok(None) => {
                    return WatchEnd::Error(DatastoreError::Watch {
                        what: prefix.to_string(),
                        source: "watch stream ended".into(),
                    });
                }
                Err(e) => {
                    return WatchEnd::Error(DatastoreError::Watch {
                        what: prefix.to_string(),
                        source: boxed(e),
                    });
                }
            };
            if response.canceled() {
                return canceled(prefix, &response);
            }
            if response.created() {
                continue;
            }
            if response.events().is_empty() {
                // A progress notification: everything up to the header revision was delivered.
                if let Some(revision) = response.header().map(|h| h.revision()) {
                    next_revision[index] = next_revision[index].max(revision + 1);
                }
                continue;
            }
            let mut touched = Vec::with_capacity(response.events().len());
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                next_revision[index] = next_revision[index].max(kv.mod_revision() + 1);
                touched.push(apply_event(state, event.event_type(), kv));
            }
            cache.send_if_modified(|snap| {
                let mut changed = false;
                for t in &touched {
                    changed |= state.update_snapshot(snap, t);
                }
                changed
            });
        }
        WatchEnd::Error(DatastoreError::Watch {
            what: self.what(),
            source: "all watch streams ended".into(),
        })
    }
}

fn apply_event(state: &mut State, event_type: EventType, kv: &KeyValue) -> Touched {
    let Ok(key) = kv.key_str() else {
        warn!(key = ?String::from_utf8_lossy(kv.key()), "key is not UTF-8; ignored");
        return Touched::Nothing;
    };
    debug!(key, ?event_type, revision = kv.mod_revision(), "etcd event");
    match event_type {
        EventType::Put => state.apply_put(key, kv.value(), kv.create_revision()),
        EventType::Delete => state.apply_delete(key),
    }
}

fn canceled(prefix: &str, response: &WatchResponse) -> WatchEnd {
    if response.compact_revision() > 0 || response.cancel_reason().contains("compacted") {
        warn!(
            prefix,
            compact_revision = response.compact_revision(),
            "watch revision was compacted; re-listing"
        );
        WatchEnd::Compacted
    } else {
        WatchEnd::Error(DatastoreError::Watch {
            what: prefix.to_string(),
            source: format!("watch canceled by etcd: {}", response.cancel_reason()).into(),
        })
    }
}

#[async_trait]
impl Datastore for EtcdDatastore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    async fn read_once(&self, scope: ReadScope) -> Result<ClusterSnapshot, DatastoreError> {
        let (state, _) = self.list(&mut self.client.clone()).await?;
        let mut snapshot = state.snapshot();
        if !scope.nodes {
            snapshot.nodes.clear();
        }
        if !scope.configuration {
            snapshot.felix_configurations.clear();
        }
        if !scope.policy {
            snapshot.policy = Default::default();
        }
        Ok(snapshot)
    }

    async fn run(&self, cache: SnapshotSender) -> Result<(), DatastoreError> {
        let mut client = self.client.clone();
        let mut backoff = BACKOFF_MIN;
        let mut listed: Option<(State, Revisions)> = None;
        loop {
            let (mut state, mut next_revision) = match listed.take() {
                Some(done) => done,
                None => match self.list(&mut client).await {
                    Ok((state, revision)) => {
                        let snapshot = state.snapshot();
                        info!(
                            revision,
                            nodes = snapshot.nodes.len(),
                            affinities = state.affinities.len(),
                            felix_configurations = snapshot.felix_configurations.len(),
                            "etcd listed"
                        );
                        self.health.synced();
                        // One atomic replacement: readers never see a partial list.
                        cache.send_if_modified(|snap| {
                            if *snap == snapshot {
                                false
                            } else {
                                *snap = snapshot;
                                true
                            }
                        });
                        (state, [revision + 1; PREFIXES.len()])
                    }
                    Err(error) => {
                        self.health.failed(&wiremesh_core::error_chain(&error));
                        warn!(error = %error, source = ?std::error::Error::source(&error), ?backoff, "etcd list failed; retrying");
                        sleep_backoff(&mut backoff).await;
                        client = self.reconnect(client).await;
                        continue;
                    }
                },
            };
            match self
                .watch(
                    &mut client,
                    &mut state,
                    &mut next_revision,
                    &cache,
                    &mut backoff,
                )
                .await
            {
                WatchEnd::Compacted => {
                    // `listed` stays None: re-list at the top of the loop.
                }
                WatchEnd::Error(error) => {
                    self.health.failed(&wiremesh_core::error_chain(&error));
                    warn!(error = %error, source = ?std::error::Error::source(&error), ?backoff, revisions = ?next_revision, "etcd watch failed; resuming");
                    sleep_backoff(&mut backoff).await;
                    client = self.reconnect(client).await;
                    listed = Some((state, next_revision));
                }
            }
        }
    }

    async fn publish(
        &self,
        node: &str,
        published: &PublishedWireguard,
    ) -> Result<(), DatastoreError> {
        let mut client = self.client.clone();
        publish_on(&mut client, node, published).await
    }

    fn sync_health(&self) -> std::sync::Arc<SyncHealth> {
        std::sync::Arc::clone(&self.health)
    }
}

impl EtcdDatastore {
    /// A fresh client after a failure (the old one is kept if connecting fails; the next attempt
    /// retries).
    async fn reconnect(&self, old: Client) -> Client {
        match Client::connect(&self.endpoints, Some(connect_options())).await {
            Ok(client) => client,
            Err(e) => {
                debug!(error = %e, "reconnecting to etcd failed");
                old
            }
        }
    }
}

async fn sleep_backoff(backoff: &mut Duration) {
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
}

/// The read-modify-write behind [`Datastore::publish`], guarded by the key's `mod_revision`.
async fn publish_on(
    client: &mut Client,
    node: &str,
    published: &PublishedWireguard,
) -> Result<(), DatastoreError> {
    let key = node_key(node);
    let publish_error = |source| DatastoreError::Publish {
        node: node.to_string(),
        source,
    };
    for attempt in 1..=PUBLISH_ATTEMPTS {
        let response = bounded(client.get(key.as_str(), None))
            .await
            .map_err(publish_error)?;
        let Some(kv) = response.kvs().first() else {
            return Err(DatastoreError::NodeNotFound {
                node: node.to_string(),
            });
        };
        let mut value: Value = serde_json::from_slice(kv.value())
            .map_err(|e| publish_error(format!("stored Node is not JSON: {e}").into()))?;
        let changed =
            apply_published_json(&mut value, published).map_err(|e| publish_error(e.into()))?;
        if !changed {
            debug!(node, "published WireGuard fields already current");
            return Ok(());
        }
        let body = serde_json::to_vec(&value).map_err(|e| publish_error(boxed(e)))?;
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                kv.mod_revision(),
            )])
            .and_then([TxnOp::put(key.as_str(), body, None)]);
        let result = bounded(client.txn(txn)).await.map_err(publish_error)?;
        if result.succeeded() {
            info!(node, attempt, "published WireGuard fields");
            return Ok(());
        }
        debug!(node, attempt, "node changed while publishing; retrying");
    }
    Err(DatastoreError::Conflict {
        node: node.to_string(),
        attempts: PUBLISH_ATTEMPTS,
    })
}

// ---------------------------------------------------------------------------------------------
// Writing resources (the lab and tests)
// ---------------------------------------------------------------------------------------------

/// A node to register: its name, underlay addresses (as Calico's `spec.bgp` holds them, e.g.
/// `172.30.0.1/24`) and labels (`metadata.labels`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeRegistration {
    pub name: String,
    pub ipv4_address: Option<String>,
    pub ipv6_address: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// Errors of [`EtcdWriter`].
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("etcd request on {key}")]
    Etcd {
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("stored value at {key} is not usable: {reason}")]
    Value { key: String, reason: String },
    #[error("{key} kept changing while we updated it")]
    Conflict { key: String },
}

/// Writes Calico resources in the etcd layout (for `wiremesh lab` and tests).
#[derive(Clone)]
pub struct EtcdWriter {
    client: Client,
}

impl EtcdWriter {
    pub async fn connect(endpoints: &[String]) -> Result<Self, DatastoreError> {
        Ok(EtcdWriter {
            client: connect_client(endpoints).await?,
        })
    }

    pub fn from_client(client: Client) -> Self {
        EtcdWriter { client }
    }

    /// The underlying client (e.g. to compact in tests).
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    pub async fn put_raw(
        &mut self,
        key: &str,
        value: impl Into<Vec<u8>>,
    ) -> Result<(), WriteError> {
        bounded(self.client.put(key, value, None))
            .await
            .map_err(|source| WriteError::Etcd {
                key: key.into(),
                source,
            })?;
        Ok(())
    }

    /// Deletes `key`; deleting a missing key is success.
    pub async fn delete_raw(&mut self, key: &str) -> Result<(), WriteError> {
        bounded(self.client.delete(key, None))
            .await
            .map_err(|source| WriteError::Etcd {
                key: key.into(),
                source,
            })?;
        Ok(())
    }

    pub async fn get_raw(&mut self, key: &str) -> Result<Option<Vec<u8>>, WriteError> {
        let response = bounded(self.client.get(key, None))
            .await
            .map_err(|source| WriteError::Etcd {
                key: key.into(),
                source,
            })?;
        Ok(response.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// The stored JSON of `key`, if any.
    pub async fn get_json(&mut self, key: &str) -> Result<Option<Value>, WriteError> {
        match self.get_raw(key).await? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| WriteError::Value {
                        key: key.into(),
                        reason: e.to_string(),
                    })
            }
        }
    }

    /// Creates the node, or sets `spec.bgp` addresses and the given labels on an existing one
    /// (keeping everything else, including other labels and published keys).
    pub async fn put_node(&mut self, node: &NodeRegistration) -> Result<(), WriteError> {
        let name = node.name.clone();
        let (v4, v6) = (node.ipv4_address.clone(), node.ipv6_address.clone());
        let labels = node.labels.clone();
        self.update_json(&node_key(&node.name), move |current| {
            let mut value = current.unwrap_or_else(|| {
                serde_json::json!({
                    "kind": "Node",
                    "apiVersion": "projectcalico.org/v3",
                    "metadata": {"name": name.clone()},
                    "spec": {},
                })
            });
            let object = value
                .as_object_mut()
                .ok_or("Node value is not a JSON object")?;
            if !labels.is_empty() {
                let metadata = child_object(object, "metadata", true)?.ok_or("no metadata")?;
                let existing = child_object(metadata, "labels", true)?.ok_or("no labels")?;
                for (label, text) in &labels {
                    set_field(existing, label, Some(text.clone()));
                }
            }
            let spec = child_object(object, "spec", true)?.ok_or("no spec")?;
            let bgp = child_object(spec, "bgp", v4.is_some() || v6.is_some())?;
            if let Some(bgp) = bgp {
                set_field(bgp, "ipv4Address", v4.clone());
                set_field(bgp, "ipv6Address", v6.clone());
                if bgp.is_empty() {
                    spec.remove("bgp");
                }
            }
            Ok(Some(value))
        })
        .await
    }

    pub async fn delete_node(&mut self, name: &str) -> Result<(), WriteError> {
        self.delete_raw(&node_key(name)).await
    }

    /// Writes a confirmed block affinity of `cidr` to `node` (`{"state":"confirmed"}`; a missing
    /// `deleted` reads as false).
    pub async fn put_block_affinity(&mut self, node: &str, cidr: &IpNet) -> Result<(), WriteError> {
        self.put_raw(&affinity_key(node, cidr), r#"{"state":"confirmed"}"#)
            .await
    }

    pub async fn delete_block_affinity(
        &mut self,
        node: &str,
        cidr: &IpNet,
    ) -> Result<(), WriteError> {
        self.delete_raw(&affinity_key(node, cidr)).await
    }

    /// Writes a FelixConfiguration with exactly `spec`.
    pub async fn put_felix_configuration(
        &mut self,
        name: &str,
        spec: &Value,
    ) -> Result<(), WriteError> {
        let value = serde_json::json!({
            "kind": "FelixConfiguration",
            "apiVersion": "projectcalico.org/v3",
            "metadata": {"name": name},
            "spec": spec,
        });
        self.put_raw(&felix_configuration_key(name), value.to_string())
            .await
    }

    /// FelixConfiguration `name` decoded as the adapter decodes it: `None` when there is no such
    /// object, `Some(Err(reason))` when it is stored but does not decode.
    pub async fn get_felix_configuration(
        &mut self,
        name: &str,
    ) -> Result<Option<Result<DecodedFelix, String>>, WriteError> {
        let value = self.get_raw(&felix_configuration_key(name)).await?;
        Ok(value.map(|bytes| decode_felix_configuration(&bytes)))
    }

    /// The configuration agent `node` runs with: FelixConfiguration `default`, then
    /// `node.<node>`, layered as the agent layers them (an object that does not decode and an
    /// invalid field are reported and left out).
    pub async fn effective_config(&mut self, node: &str) -> Result<EffectiveConfig, WriteError> {
        Ok(EffectiveConfig::for_node(
            node,
            &self.node_felix_configurations(node).await?,
        ))
    }

    /// The FelixConfiguration objects agent `node` reads: `default` and `node.<node>`.
    pub async fn node_felix_configurations(
        &mut self,
        node: &str,
    ) -> Result<FelixConfigurations, WriteError> {
        let mut configs = BTreeMap::new();
        for name in ["default".to_string(), format!("node.{node}")] {
            if let Some(spec) = self.get_felix_configuration(&name).await? {
                configs.insert(name, spec);
            }
        }
        Ok(configs)
    }

    /// Sets one field of a FelixConfiguration's spec (creating the object when missing), as a
    /// JSON merge patch `{"spec":{key:value}}` would: `Value::Null` removes the field.
    pub async fn patch_felix_configuration(
        &mut self,
        name: &str,
        key: &str,
        value: Value,
    ) -> Result<(), WriteError> {
        let config_name = name.to_string();
        let field = key.to_string();
        self.update_json(&felix_configuration_key(name), move |current| {
            let mut object = current.unwrap_or_else(|| {
                serde_json::json!({
                    "kind": "FelixConfiguration",
                    "apiVersion": "projectcalico.org/v3",
                    "metadata": {"name": config_name},
                    "spec": {},
                })
            });
            let map = object
                .as_object_mut()
                .ok_or("FelixConfiguration value is not a JSON object")?;
            let spec = child_object(map, "spec", true)?.ok_or("no spec")?;
            if value.is_null() {
                spec.remove(&field);
            } else {
                spec.insert(field.clone(), value.clone());
            }
            Ok(Some(object))
        })
        .await
    }

    /// Compare-and-swap update of a JSON value (`None` from `f`: leave it).
    async fn update_json(
        &mut self,
        key: &str,
        f: impl Fn(Option<Value>) -> Result<Option<Value>, String>,
    ) -> Result<(), WriteError> {
        let etcd_error = |source| WriteError::Etcd {
            key: key.to_string(),
            source,
        };
        for _ in 0..PUBLISH_ATTEMPTS {
            let response = bounded(self.client.get(key, None))
                .await
                .map_err(etcd_error)?;
            let (current, compare) = match response.kvs().first() {
                Some(kv) => {
                    let current =
                        serde_json::from_slice(kv.value()).map_err(|e| WriteError::Value {
                            key: key.into(),
                            reason: e.to_string(),
                        })?;
                    (
                        Some(current),
                        Compare::mod_revision(key, CompareOp::Equal, kv.mod_revision()),
                    )
                }
                None => (None, Compare::create_revision(key, CompareOp::Equal, 0)),
            };
            let Some(new) = f(current).map_err(|reason| WriteError::Value {
                key: key.into(),
                reason,
            })?
            else {
                return Ok(());
            };
            let txn = Txn::new()
                .when([compare])
                .and_then([TxnOp::put(key, new.to_string(), None)]);
            if bounded(self.client.txn(txn))
                .await
                .map_err(etcd_error)?
                .succeeded()
            {
                return Ok(());
            }
        }
        Err(WriteError::Conflict {
            key: key.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use wiremesh_core::model::WgKey;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test CIDR")
    }

    /// Every kind that may be stored in etcd is watched, and nothing else (pods, WEPs,
    /// profiles and Kubernetes NetworkPolicies were once stored but never read).
    #[test]
    fn every_stored_kind_is_watched() {
        let stored: Vec<String> = wiremesh_core::wire::Kind::STORED
            .iter()
            .map(|k| policy_key(*k, ""))
            .collect();
        let mut watched: Vec<String> = POLICY_PREFIXES.iter().map(|p| p.to_string()).collect();
        let mut want = stored.clone();
        want.sort();
        watched.sort();
        assert_eq!(watched, want);
        for p in POLICY_PREFIXES {
            assert!(PREFIXES.contains(&p), "{p} is not watched");
        }
    }

    #[test]
    fn decodes_a_full_node() {
        let json = br#"{"kind":"Node","apiVersion":"projectcalico.org/v3",
            "metadata":{"name":"n1","labels":{"a":"b"}},
            "spec":{"bgp":{"ipv4Address":"172.30.0.1/24","ipv6Address":"fd00::1/64"},
                    "addresses":[{"address":"10.0.0.1","type":"InternalIP"}],
                    "wireguard":{"interfaceIPv4Address":"10.244.1.1","interfaceIPv6Address":"fd10::1"},
                    "unknown":42},
            "status":{"wireguardPublicKey":"k4","wireguardPublicKeyV6":"k6","other":true}}"#;
        let node = decode_node("n1", json);
        assert_eq!(node.decode_error, None);
        assert_eq!(node.ipv4_address.as_deref(), Some("172.30.0.1/24"));
        assert_eq!(node.ipv6_address.as_deref(), Some("fd00::1/64"));
        assert_eq!(node.wireguard_public_key.as_deref(), Some("k4"));
        assert_eq!(node.wireguard_public_key_v6.as_deref(), Some("k6"));
        assert_eq!(
            node.wireguard_interface_ipv4_address.as_deref(),
            Some("10.244.1.1")
        );
        assert_eq!(
            node.wireguard_interface_ipv6_address.as_deref(),
            Some("fd10::1")
        );
        assert!(node.pod_cidrs.is_empty());
    }

    #[test]
    fn underlay_falls_back_to_addresses_internal_then_external() {
        let json = br#"{"spec":{"addresses":[
            {"address":"203.0.113.5","type":"ExternalIP"},
            {"address":"fd00::9","type":"InternalIP"},
            {"address":"10.0.0.7/24","type":"InternalIP"},
            {"address":"10.0.0.8","type":"InternalIP"}]}}"#;
        let node = decode_node("n", json);
        assert_eq!(node.ipv4_address.as_deref(), Some("10.0.0.7/24"));
        assert_eq!(node.ipv6_address.as_deref(), Some("fd00::9"));

        let json = br#"{"spec":{"bgp":{"ipv4Address":""},"addresses":[{"address":"203.0.113.5","type":"ExternalIP"},{"address":"x","type":"InternalIP"}]}}"#;
        let node = decode_node("n", json);
        assert_eq!(node.ipv4_address.as_deref(), Some("203.0.113.5"));
        assert_eq!(node.ipv6_address, None);
    }

    #[test]
    fn minimal_node_decodes_to_empty_fields() {
        let node = decode_node("n", br#"{"kind":"Node","spec":null,"status":{}}"#);
        assert_eq!(
            node,
            NodeResource {
                name: "n".into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn malformed_nodes_keep_their_name_and_an_error() {
        for bad in [
            &b"not json"[..],
            b"[]",
            b"\"s\"",
            b"{\"spec\":{\"bgp\":{\"ipv4Address\":5}}}",
            b"{\"spec\":7}",
            b"",
            b"\xff",
        ] {
            let node = decode_node("bad", bad);
            assert_eq!(node.name, "bad");
            assert!(
                node.decode_error.is_some(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn affinity_keys() {
        assert_eq!(
            decode_affinity_key("/calico/ipam/v2/host/n1/ipv4/block/10.244.1.0-26"),
            Some(("n1".into(), Family::V4, net("10.244.1.0/26")))
        );
        assert_eq!(
            decode_affinity_key("calico/ipam/v2/host/n1/ipv6/block/fd00:10:244::-122"),
            Some(("n1".into(), Family::V6, net("fd00:10:244::/122")))
        );
        // Host bits are masked, as Go's ParseCIDR does.
        assert_eq!(
            decode_affinity_key("/calico/ipam/v2/host/n1/ipv4/block/10.244.1.5-24"),
            Some(("n1".into(), Family::V4, net("10.244.1.0/24")))
        );
        for bad in [
            "/calico/ipam/v2/host/n1/ipv4/block/10.244.1.0/26",
            "/calico/ipam/v2/host/n1/ipv6/block/10.244.1.0-26",
            "/calico/ipam/v2/host/n1/ipv4/block/fd00::-64",
            "/calico/ipam/v2/host/n1/ipvx/block/10.244.1.0-26",
            "/calico/ipam/v2/host//ipv4/block/10.244.1.0-26",
            "/calico/ipam/v2/host/n1/ipv4/blocks/10.244.1.0-26",
            "/calico/ipam/v2/host/n1/ipv4/block/",
            "/calico/ipam/v2/host/n1/ipv4/block/garbage",
            "/calico/ipam/v2/host/n1/ipv4/block/10.244.1.0-33",
            "/calico/ipam/v2/host/n1",
            "/calico/ipam/v2/assignment/ipv4/block/10.244.1.0-26",
            "",
        ] {
            assert_eq!(decode_affinity_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn affinity_key_round_trips() {
        for cidr in ["10.244.1.0/26", "fd00:10:244:1::/64"] {
            let key = affinity_key("node-a", &net(cidr));
            let (node, family, parsed) = decode_affinity_key(&key).expect("round trip");
            assert_eq!(
                (node.as_str(), family, parsed),
                ("node-a", Family::of_net(&net(cidr)), net(cidr))
            );
        }
        assert_eq!(
            affinity_key("n", &net("10.0.0.0/24")),
            "/calico/ipam/v2/host/n/ipv4/block/10.0.0.0-24"
        );
    }

    #[test]
    fn affinity_values() {
        assert_eq!(
            decode_affinity_value(br#"{"state":"confirmed","deleted":false}"#),
            Ok(true)
        );
        assert_eq!(decode_affinity_value(br#"{"deleted":false}"#), Ok(true));
        assert_eq!(decode_affinity_value(b""), Ok(true));
        assert_eq!(decode_affinity_value(br#"{"state":"pending"}"#), Ok(false));
        assert_eq!(
            decode_affinity_value(br#"{"state":"pendingDeletion"}"#),
            Ok(false)
        );
        assert_eq!(
            decode_affinity_value(br#"{"state":"confirmed","deleted":true}"#),
            Ok(false)
        );
        assert!(decode_affinity_value(b"nope").is_err());
        assert!(decode_affinity_value(br#"{"state":3}"#).is_err());
    }

    #[test]
    fn felix_configurations() {
        let spec = decode_felix_configuration(
            br#"{"kind":"FelixConfiguration","metadata":{"name":"default"},"spec":{"wireguardEnabled":true,"logSeverityScreen":"Info"}}"#,
        )
        .expect("decodes");
        assert_eq!(spec.spec.wireguard_enabled, Some(true));
        assert_eq!(
            decode_felix_configuration(br#"{"metadata":{}}"#),
            Ok(DecodedFelix::default())
        );
        let decoded = decode_felix_configuration(br#"{"spec":{"wireguardEnabled":"yes"}}"#)
            .expect("a bad field costs that field");
        assert_eq!(decoded.invalid[0].field, "wireguardEnabled");
        assert!(decode_felix_configuration(b"{").is_err());
        assert!(decode_felix_configuration(b"[1]").is_err());
    }

    #[test]
    fn publish_touches_only_our_fields() {
        let mut value = serde_json::json!({
            "kind": "Node", "metadata": {"name": "n", "x": 1},
            "spec": {"bgp": {"ipv4Address": "10.0.0.1/24"}, "wireguard": {"other": "keep"}, "u": [1]},
            "status": {"podCIDRs": ["a"]},
        });
        let published = PublishedWireguard {
            public_key_v4: Some(WgKey([1; 32])),
            public_key_v6: None,
            interface_ipv4_address: Some("10.244.0.1".parse().expect("ip")),
            interface_ipv6_address: None,
        };
        assert_eq!(apply_published_json(&mut value, &published), Ok(true));
        assert_eq!(
            value,
            serde_json::json!({
                "kind": "Node", "metadata": {"name": "n", "x": 1},
                "spec": {"bgp": {"ipv4Address": "10.0.0.1/24"},
                         "wireguard": {"other": "keep", "interfaceIPv4Address": "10.244.0.1"}, "u": [1]},
                "status": {"podCIDRs": ["a"], "wireguardPublicKey": WgKey([1; 32]).to_string()},
            })
        );
        assert_eq!(apply_published_json(&mut value, &published), Ok(false));
        // Clearing removes fields and leaves the unknown wireguard field.
        assert_eq!(
            apply_published_json(&mut value, &PublishedWireguard::default()),
            Ok(true)
        );
        assert_eq!(
            value["spec"]["wireguard"],
            serde_json::json!({"other": "keep"})
        );
        assert_eq!(value["status"], serde_json::json!({"podCIDRs": ["a"]}));
    }

    #[test]
    fn publish_removes_empty_wireguard_and_creates_missing_parents() {
        let mut value = serde_json::json!({"metadata": {"name": "n"}});
        let published = PublishedWireguard {
            interface_ipv6_address: Some("fd00::1".parse().expect("ip")),
            ..Default::default()
        };
        assert_eq!(apply_published_json(&mut value, &published), Ok(true));
        assert_eq!(
            value["spec"]["wireguard"]["interfaceIPv6Address"],
            "fd00::1"
        );
        assert_eq!(value.get("status"), None);
        assert_eq!(
            apply_published_json(&mut value, &PublishedWireguard::default()),
            Ok(true)
        );
        assert_eq!(
            value,
            serde_json::json!({"metadata": {"name": "n"}, "spec": {}})
        );
        assert!(apply_published_json(&mut serde_json::json!([]), &published).is_err());
        assert!(apply_published_json(&mut serde_json::json!({"spec": "x"}), &published).is_err());
    }

    #[test]
    fn state_merges_affinities_and_ignores_bad_keys() {
        let mut state = State::default();
        state.apply_put(
            &node_key("n1"),
            br#"{"spec":{"bgp":{"ipv4Address":"172.30.0.1/24"}}}"#,
            1,
        );
        state.apply_put(
            &affinity_key("n1", &net("10.244.1.0/26")),
            br#"{"state":"confirmed"}"#,
            2,
        );
        state.apply_put(&affinity_key("n1", &net("10.244.0.0/26")), br#"{}"#, 3);
        state.apply_put(
            &affinity_key("n1", &net("10.244.2.0/26")),
            br#"{"state":"pending"}"#,
            4,
        );
        state.apply_put("/calico/ipam/v2/host/n1/ipv4/block/bogus", br#"{}"#, 5);
        state.apply_put(&affinity_key("ghost", &net("10.244.9.0/26")), br#"{}"#, 6);
        let snap = state.snapshot();
        assert_eq!(snap.nodes.len(), 1);
        assert_eq!(
            snap.nodes["n1"].pod_cidrs,
            vec!["10.244.0.0/26", "10.244.1.0/26"]
        );
        // Each claim carries its key's create revision (older claims win overlaps).
        assert_eq!(
            snap.nodes["n1"].pod_cidr_claimed_at,
            [
                ("10.244.0.0/26".to_string(), 3),
                ("10.244.1.0/26".to_string(), 2)
            ]
            .into()
        );
        let mut snap2 = snap.clone();
        let touched = state.apply_delete(&affinity_key("n1", &net("10.244.1.0/26")));
        assert!(state.update_snapshot(&mut snap2, &touched));
        assert_eq!(snap2.nodes["n1"].pod_cidrs, vec!["10.244.0.0/26"]);
        let touched = state.apply_delete(&affinity_key("n1", &net("10.244.1.0/26")));
        assert!(!state.update_snapshot(&mut snap2, &touched));
    }

    proptest! {
        #[test]
        fn decoders_never_panic_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let node = decode_node("n", &bytes);
            prop_assert_eq!(node.name.as_str(), "n");
            let _ = decode_affinity_value(&bytes);
            let _ = decode_felix_configuration(&bytes);
            let mut state = State::default();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            state.apply_put(&text, &bytes, 1);
            state.apply_delete(&text);
        }

        #[test]
        fn affinity_key_never_panics(suffix in "\\PC{0,64}", node in "[a-z0-9./-]{0,12}") {
            let _ = decode_affinity_key(&suffix);
            let _ = decode_affinity_key(&format!("{AFFINITIES_PREFIX}{node}/ipv4/block/{suffix}"));
            if let Some((n, family, cidr)) = decode_affinity_key(&format!("{AFFINITIES_PREFIX}{node}/ipv6/block/{suffix}")) {
                prop_assert_eq!(family, Family::V6);
                prop_assert_eq!(Family::of_net(&cidr), Family::V6);
                prop_assert!(!n.contains('/'));
            }
        }

        #[test]
        fn node_json_shapes_never_panic(
            v4 in proptest::option::of("\\PC{0,20}"),
            kind in proptest::option::of("(InternalIP|ExternalIP|\\PC{0,5})"),
            addr in proptest::option::of("\\PC{0,20}"),
        ) {
            let json = serde_json::json!({"spec": {"bgp": {"ipv4Address": v4}, "addresses": [{"address": addr, "type": kind}]}});
            let node = decode_node("n", json.to_string().as_bytes());
            prop_assert!(node.decode_error.is_none());
        }
    }
}

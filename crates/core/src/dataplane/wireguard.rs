//! The WireGuard device subsystem's model: what a device holds, the operations that change it,
//! and the pure plan from desired to actual.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;

use crate::keys::PrivateKey;
use crate::mesh::{DataplaneSpec, PeerSpec};
use crate::model::WgKey;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: BTreeSet<IpNet>,
    pub keepalive: u16,
    /// `None` when no handshake ever happened.
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// What a WireGuard device holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    pub name: String,
    /// Public key derived from the device's private key; `None` when no key is set.
    pub public_key: Option<WgKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: BTreeMap<WgKey, PeerState>,
}

/// WireGuard's REJECT_AFTER_TIME: no session outlives it. A peer that sends (host encryption
/// gives every peer a keepalive) hands-hakes again every REKEY_AFTER_TIME (120 s), so a last
/// handshake older than this means the sessions with that peer are dead.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(180);

/// The peers of `device` proven to hold `our_key`: the device runs with it, and a handshake with
/// the peer completed at or after the key was written (`key_written`) and less than
/// [`SESSION_LIFETIME`] before `now`. A peer that lost our key (it restarted from an old view,
/// or cannot reach the datastore) stops handshaking and drops out within that lifetime, so the
/// host traffic routed by this set can never stay locked in a dead tunnel.
pub fn confirmed_peers(
    device: &DeviceState,
    our_key: &WgKey,
    key_written: SystemTime,
    now: SystemTime,
) -> BTreeSet<WgKey> {
    if device.public_key.as_ref() != Some(our_key) {
        return BTreeSet::new();
    }
    device
        .peers
        .iter()
        .filter(|(_, p)| {
            p.last_handshake.is_some_and(|at| {
                at >= key_written
                    && now.duration_since(at).unwrap_or(Duration::ZERO) < SESSION_LIFETIME
            })
        })
        .map(|(key, _)| *key)
        .collect()
}

#[derive(Clone, PartialEq)]
pub enum WgOp {
    CreateDevice {
        name: String,
    },
    DeleteDevice {
        name: String,
    },
    /// Private key, listen port and fwmark; never touches peers.
    ConfigureDevice {
        name: String,
        private_key: PrivateKey,
        listen_port: u16,
        fwmark: u32,
    },
    /// Adds the peer or updates it in place, replacing its allowed IPs.
    SetPeer {
        name: String,
        public_key: WgKey,
        peer: PeerSpec,
    },
    RemovePeer {
        name: String,
        public_key: WgKey,
    },
}

impl WgOp {
    pub fn kind(&self) -> &'static str {
        match self {
            WgOp::CreateDevice { .. } => "create_device",
            WgOp::DeleteDevice { .. } => "delete_device",
            WgOp::ConfigureDevice { .. } => "configure_device",
            WgOp::SetPeer { .. } => "set_peer",
            WgOp::RemovePeer { .. } => "remove_peer",
        }
    }
}

impl fmt::Display for WgOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WgOp::CreateDevice { name } => write!(f, "create WireGuard device {name}"),
            WgOp::DeleteDevice { name } => write!(f, "delete WireGuard device {name}"),
            WgOp::ConfigureDevice {
                name,
                private_key,
                listen_port,
                fwmark,
            } => write!(
                f,
                "configure {name}: public key {}, listen port {listen_port}, fwmark {fwmark:#x}",
                private_key.public_key()
            ),
            WgOp::SetPeer {
                name,
                public_key,
                peer,
            } => write!(
                f,
                "set peer {public_key} ({}) on {name}: endpoint {}, allowed IPs {}",
                peer.node,
                peer.endpoint,
                peer.allowed_ips
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            WgOp::RemovePeer { name, public_key } => {
                write!(f, "remove peer {public_key} from {name}")
            }
        }
    }
}

impl fmt::Debug for WgOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// How long after a handshake a session counts as live: WireGuard rekeys every 120 s while
/// traffic flows and rejects a session after 180 s (`REJECT_AFTER_TIME`).
pub const LIVE_SESSION: Duration = Duration::from_secs(180);

/// What `plan` needs to keep endpoints WireGuard learned by roaming (a peer behind NAT, or one
/// that answered from another address): the time, and the datastore endpoint of each peer as
/// of our last successful apply.
#[derive(Debug, Clone, Copy)]
pub struct Learned<'a> {
    pub now: SystemTime,
    /// (device, peer) -> the endpoint the datastore gave when we last applied.
    pub programmed: &'a BTreeMap<(String, WgKey), SocketAddr>,
}

impl Learned<'_> {
    /// The endpoint to keep instead of `want.endpoint`, if any: the device's own endpoint
    /// differs, its session is live (so that address demonstrably works), and the datastore
    /// has not moved the peer since we last programmed it (a moved peer, e.g. a new port,
    /// propagates at once). After a restart nothing was programmed yet; a live session is
    /// kept then too, as it works.
    fn keep(
        &self,
        device: &str,
        key: &WgKey,
        want: &PeerSpec,
        have: &PeerState,
    ) -> Option<SocketAddr> {
        let learned = have.endpoint.filter(|e| *e != want.endpoint)?;
        let live = have.last_handshake.is_some_and(|at| {
            self.now
                .duration_since(at)
                .is_ok_and(|age| age < LIVE_SESSION)
        });
        let moved = self
            .programmed
            .get(&(device.to_string(), *key))
            .is_some_and(|before| *before != want.endpoint);
        (live && !moved).then_some(learned)
    }
}

fn peer_matches(want: &PeerSpec, have: &PeerState) -> bool {
    have.endpoint == Some(want.endpoint)
        && have.allowed_ips == want.allowed_ips
        && have.keepalive == want.keepalive
}

/// Minimal operations taking `actual` to `desired`, always setting the datastore's endpoint.
/// Devices we own but no longer want are deleted; existing peers are updated in place, never
/// replaced wholesale.
pub fn plan(desired: &DataplaneSpec, actual: &BTreeMap<String, DeviceState>) -> Vec<WgOp> {
    plan_with(desired, actual, None)
}

/// [`plan`], keeping endpoints WireGuard learned while their session is live (see
/// [`Learned::keep`]) when `learned` is given.
pub fn plan_with(
    desired: &DataplaneSpec,
    actual: &BTreeMap<String, DeviceState>,
    learned: Option<Learned<'_>>,
) -> Vec<WgOp> {
    let mut ops = Vec::new();
    let wanted: BTreeSet<&str> = desired.devices.values().map(|d| d.name.as_str()).collect();
    for name in actual.keys() {
        if desired.owned_interfaces.contains(name) && !wanted.contains(name.as_str()) {
            ops.push(WgOp::DeleteDevice { name: name.clone() });
        }
    }
    for device in desired.devices.values() {
        let name = &device.name;
        let configure = WgOp::ConfigureDevice {
            name: name.clone(),
            private_key: device.private_key.clone(),
            listen_port: device.listen_port,
            fwmark: device.fwmark,
        };
        let empty = BTreeMap::new();
        let have_peers = match actual.get(name) {
            None => {
                ops.push(WgOp::CreateDevice { name: name.clone() });
                ops.push(configure);
                &empty
            }
            Some(state) => {
                if state.public_key != Some(device.private_key.public_key())
                    || state.listen_port != device.listen_port
                    || state.fwmark != device.fwmark
                {
                    ops.push(configure);
                }
                &state.peers
            }
        };
        // Removals first: a key that changed is a new peer; the old one goes before the new
        // one is added, so an allowed IP never sits on two peers.
        for key in have_peers.keys() {
            if !device.peers.contains_key(key) {
                ops.push(WgOp::RemovePeer {
                    name: name.clone(),
                    public_key: *key,
                });
            }
        }
        for (key, want) in &device.peers {
            let have = have_peers.get(key);
            let kept = have
                .zip(learned)
                .and_then(|(have, learned)| learned.keep(name, key, want, have));
            let want = match kept {
                Some(endpoint) => &PeerSpec {
                    endpoint,
                    ..want.clone()
                },
                None => want,
            };
            if have.is_none_or(|have| !peer_matches(want, have)) {
                ops.push(WgOp::SetPeer {
                    name: name.clone(),
                    public_key: *key,
                    peer: want.clone(),
                });
            }
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn public(seed: u8) -> WgKey {
        PrivateKey::from_bytes([seed; 32]).public_key()
    }

    fn peer(handshake: Option<SystemTime>) -> PeerState {
        PeerState {
            endpoint: None,
            allowed_ips: BTreeSet::new(),
            keepalive: 25,
            last_handshake: handshake,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    #[test]
    fn a_peer_is_confirmed_by_a_live_handshake_made_with_our_current_key() {
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let written = at(1_000);
        let device = DeviceState {
            name: "wireguard.cali".into(),
            public_key: Some(public(1)),
            listen_port: 51820,
            fwmark: 0,
            peers: BTreeMap::from([
                (public(2), peer(Some(at(1_010)))), // after our key: confirmed
                (public(3), peer(Some(at(999)))),   // with our previous key
                (public(4), peer(None)),            // never
                (public(5), peer(Some(at(1_000)))), // the same instant counts
            ]),
        };
        let now = at(1_100);
        let confirmed = confirmed_peers(&device, &public(1), written, now);
        assert_eq!(confirmed, BTreeSet::from([public(2), public(5)]));
        // A device running another key (a rotation not applied yet) confirms nobody.
        assert!(confirmed_peers(&device, &public(9), written, now).is_empty());
        // No handshake for a session lifetime: the peer lost our key (or is gone).
        let later = at(1_010) + SESSION_LIFETIME;
        assert_eq!(
            confirmed_peers(&device, &public(1), written, later),
            BTreeSet::new()
        );
        let just_before = later - Duration::from_secs(1);
        assert!(confirmed_peers(&device, &public(1), written, just_before).contains(&public(2)));
        // A handshake stamped in the future (clock step) is not held against the peer.
        assert!(confirmed_peers(&device, &public(1), written, at(1_005)).contains(&public(2)));
    }
}

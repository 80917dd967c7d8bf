//! A WireGuard private key (x25519): generated, shown only as its public key, never logged.
//! Where the agent keeps it (0600 in its state directory) is `wiremesh_agent::keystore`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::model::WgKey;

/// A private key. Its `Debug` never shows the secret.
#[derive(Clone)]
pub struct PrivateKey(StaticSecret);

impl PrivateKey {
    pub fn generate() -> Self {
        PrivateKey(StaticSecret::random())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PrivateKey(StaticSecret::from(bytes))
    }

    pub fn public_key(&self) -> WgKey {
        WgKey(PublicKey::from(&self.0).to_bytes())
    }

    /// Lowercase hex, as the WireGuard UAPI wants it. Only for writing to the device.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(
            self.0
                .as_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        )
    }

    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// Standard base64, as `wg genkey` prints it. Only for the key file.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(BASE64.encode(self.0.as_bytes()))
    }

    /// Parses the key file's text (`wg genkey`'s form: base64 of 32 bytes, not all zero).
    /// The error says what is wrong without showing the text.
    pub fn from_base64(text: &str) -> Result<Self, String> {
        let decoded = Zeroizing::new(
            BASE64
                .decode(text.trim())
                .map_err(|e| format!("not base64: {e}"))?,
        );
        let array: [u8; 32] = decoded
            .as_slice()
            .try_into()
            .map_err(|_| format!("{} bytes, expected 32", decoded.len()))?;
        if array == [0u8; 32] {
            return Err("all-zero key".into());
        }
        Ok(PrivateKey::from_bytes(array))
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey(<redacted>, public {})", self.public_key())
    }
}

impl PartialEq for PrivateKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes() == other.0.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret() {
        let key = PrivateKey::generate();
        let shown = format!("{key:?}");
        assert!(!shown.contains(key.to_base64().as_str()));
        assert!(!shown.contains(key.to_hex().as_str()));
    }

    #[test]
    fn base64_round_trip() {
        let key = PrivateKey::generate();
        let parsed = PrivateKey::from_base64(&key.to_base64()).expect("parses");
        assert_eq!(parsed, key);
        assert!(PrivateKey::from_base64("AAAA").is_err());
    }
}

//! `wiremesh rotate-key`: this node switches to a new WireGuard key. A new key is written next
//! to the current one in the agent's state directory; the agent picks it up within a second,
//! programs it on the device and publishes it in the same pass, and peers follow at their next
//! datastore event (docs/encryption.md).

use std::path::PathBuf;

use wiremesh_agent::keystore::{KeyError, KeyStore};
use wiremesh_core::model::Family;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  wiremesh rotate-key\n  kubectl -n wiremesh exec ds/wiremesh -- wiremesh rotate-key\n  wiremesh lab exec node2 -- wiremesh rotate-key"
)]
pub struct RotateKeyArgs {
    /// The agent's state directory (where its keys are).
    #[arg(long, env = "WIREMESH_STATE_DIR", default_value = "/var/lib/wiremesh")]
    pub state_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum RotateKeyError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("no WireGuard key in {0}: is this the agent's --state-dir, and is encryption on?")]
    NoKey(PathBuf),
}

/// Requests a new key for every family that has one; prints the new public keys.
pub fn run(args: &RotateKeyArgs) -> Result<(), RotateKeyError> {
    let store = KeyStore::new(&args.state_dir);
    let mut requested = 0;
    for family in Family::ALL {
        if !store.path(family).exists() {
            continue;
        }
        let key = store.request_rotation(family)?;
        requested += 1;
        crate::outln!(
            "{family}: new public key {}; the agent switches to it within a second and publishes it",
            key.public_key()
        );
    }
    if requested == 0 {
        return Err(RotateKeyError::NoKey(args.state_dir.clone()));
    }
    Ok(())
}

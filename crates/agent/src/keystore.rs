//! The node's WireGuard private keys in the agent's state directory: generated once, kept
//! 0600 in a 0700 directory, reused on every start, never logged or published.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use wiremesh_core::keys::PrivateKey;
use wiremesh_core::model::Family;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("creating state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "key file {path} is corrupt ({reason}); refusing to replace it with a new key. \
         Move it away to generate a new one (peers will then see a new key)"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("writing key file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Key files in the agent's state directory.
#[derive(Debug, Clone)]
pub struct KeyStore {
    dir: PathBuf,
}

impl KeyStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        KeyStore { dir: dir.into() }
    }

    pub fn path(&self, family: Family) -> PathBuf {
        self.dir.join(match family {
            Family::V4 => "wireguard.key",
            Family::V6 => "wireguard-v6.key",
        })
    }

    /// Returns the stored key, generating and storing one on first use. A file that exists but
    /// does not hold a valid key is an error, never silently replaced.
    pub fn load_or_generate(&self, family: Family) -> Result<(PrivateKey, bool), KeyError> {
        ensure_private_dir(&self.dir)?;
        let path = self.path(family);
        match fs::read(&path) {
            Ok(bytes) => Ok((parse_key_file(&path, &bytes)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = PrivateKey::generate();
                write_key_file(&path, &key)?;
                Ok((key, true))
            }
            Err(source) => Err(KeyError::Read { path, source }),
        }
    }

    /// Replaces the stored key (used by tests and by key rotation).
    pub fn store(&self, family: Family, key: &PrivateKey) -> Result<(), KeyError> {
        ensure_private_dir(&self.dir)?;
        write_key_file(&self.path(family), key)
    }

    /// Where a requested next key waits for the agent (`wireguard.key.next`).
    fn next_path(&self, family: Family) -> PathBuf {
        let mut name = self.path(family).into_os_string();
        name.push(".next");
        PathBuf::from(name)
    }

    /// Asks the agent to rotate: a new key is written beside the current one (0600), and the
    /// agent switches to it on its next pass. Returns the new key.
    pub fn request_rotation(&self, family: Family) -> Result<PrivateKey, KeyError> {
        ensure_private_dir(&self.dir)?;
        let key = PrivateKey::generate();
        write_key_file(&self.next_path(family), &key)?;
        Ok(key)
    }

    /// Whether a rotation waits for the agent.
    pub fn rotation_pending(&self, family: Family) -> bool {
        self.next_path(family).exists()
    }

    /// A requested next key, made the current one (renamed over the key file, so the old key
    /// is gone from disk); `None` when no rotation was requested.
    pub fn take_rotation(&self, family: Family) -> Result<Option<PrivateKey>, KeyError> {
        let next = self.next_path(family);
        let bytes = match fs::read(&next) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(KeyError::Read { path: next, source }),
        };
        let key = parse_key_file(&next, &bytes)?;
        // Stamped now, when the key goes into use (it was written when requested): handshakes
        // before this instant were made with the old key (host encryption's confirmations).
        let stamped = fs::File::options()
            .write(true)
            .open(&next)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        if let Err(e) = stamped {
            tracing::debug!(error = %e, path = %next.display(), "could not stamp the key file");
        }
        fs::rename(&next, self.path(family)).map_err(|source| KeyError::Write {
            path: self.path(family),
            source,
        })?;
        Ok(Some(key))
    }

    /// When the current key was written, or taken into use by a rotation (the schedule; host
    /// encryption counts only handshakes made since).
    pub fn written_at(&self, family: Family) -> Option<std::time::SystemTime> {
        fs::metadata(self.path(family))
            .and_then(|m| m.modified())
            .ok()
    }
}

fn ensure_private_dir(dir: &Path) -> Result<(), KeyError> {
    let wrap = |source| KeyError::CreateDir {
        path: dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(wrap)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(wrap)
}

fn parse_key_file(path: &Path, bytes: &[u8]) -> Result<PrivateKey, KeyError> {
    let corrupt = |reason: String| KeyError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::str::from_utf8(bytes).map_err(|_| corrupt("not UTF-8 text".into()))?;
    PrivateKey::from_base64(text).map_err(corrupt)
}

/// Writes atomically: a 0600 temporary file in the same directory, fsync, rename.
fn write_key_file(path: &Path, key: &PrivateKey) -> Result<(), KeyError> {
    let wrap = |source| KeyError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("key.tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(wrap)?;
    let mut text = key.to_base64();
    text.push('\n');
    file.write_all(text.as_bytes()).map_err(wrap)?;
    file.sync_all().map_err(wrap)?;
    fs::rename(&tmp, path).map_err(wrap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_requested_rotation_replaces_the_key_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = KeyStore::new(dir.path().join("state"));
        let (old, _) = store.load_or_generate(Family::V4).expect("generate");
        assert_eq!(store.take_rotation(Family::V4).expect("none"), None);
        let next = store.request_rotation(Family::V4).expect("request");
        assert!(store.rotation_pending(Family::V4));
        let mode = fs::metadata(store.next_path(Family::V4))
            .expect("next key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            store.take_rotation(Family::V4).expect("take"),
            Some(next.clone())
        );
        assert!(!store.rotation_pending(Family::V4));
        let (current, created) = store.load_or_generate(Family::V4).expect("reload");
        assert!(!created);
        assert_eq!(current, next);
        assert_ne!(current, old);
        assert_eq!(store.take_rotation(Family::V4).expect("none"), None);
    }

    #[test]
    fn generates_once_then_reuses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = KeyStore::new(dir.path().join("state"));
        let (first, created) = store.load_or_generate(Family::V4).expect("generate");
        assert!(created);
        let (again, created) = store.load_or_generate(Family::V4).expect("reload");
        assert!(!created);
        assert_eq!(first, again);
        let (v6, _) = store.load_or_generate(Family::V6).expect("v6");
        assert_ne!(first, v6, "each family has its own key");
    }

    #[test]
    fn file_and_directory_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let store = KeyStore::new(&state);
        store.load_or_generate(Family::V4).expect("generate");
        let file_mode = fs::metadata(store.path(Family::V4))
            .expect("meta")
            .permissions()
            .mode();
        let dir_mode = fs::metadata(&state).expect("meta").permissions().mode();
        assert_eq!(file_mode & 0o777, 0o600);
        assert_eq!(dir_mode & 0o777, 0o700);
    }

    #[test]
    fn corrupt_file_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = KeyStore::new(dir.path());
        for bad in [&b"not base64!!"[..], b"AAAA", b"\xff\xfe", &[b'A'; 44][..]] {
            fs::write(store.path(Family::V4), bad).expect("write");
            let err = store.load_or_generate(Family::V4).expect_err("corrupt");
            assert!(matches!(err, KeyError::Corrupt { .. }), "{err}");
            assert_eq!(
                fs::read(store.path(Family::V4)).expect("read"),
                bad,
                "file kept"
            );
        }
    }

    #[test]
    fn reads_wg_genkey_format_and_matches_wg_pubkey() {
        // Test vector from `wg genkey | tee k | wg pubkey`.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = KeyStore::new(dir.path());
        fs::write(
            store.path(Family::V4),
            "oH6fpWhjl8Qa1t8imvuSQsBMyPQjG3zyUp1LAaxKi0w=\n",
        )
        .expect("write");
        let (key, created) = store.load_or_generate(Family::V4).expect("load");
        assert!(!created);
        assert_eq!(
            key.public_key().to_base64(),
            "nT0rj1mFVY/XoLpDAJc1Lpwh6GAu7aKSp6PySRnzwTQ="
        );
    }
}

//! A plugin's private key-value store: a small map, optionally kept in a file (written
//! atomically, 0600), with a size quota so a plugin cannot fill the disk.
//!
//! With a [`StoreKey`] (the client gives its bots the key that seals history), the file is
//! AES-256-GCM sealed and bound to the plugin's name, like the rest of the client's state at
//! rest: what a bot remembers about people is not readable from the disk, and one bot's store
//! copied over another's is refused. A plaintext store an older version left at `<file>.json`
//! is read once and removed after the sealed one is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use syncra_core::crypto::local_box::LocalKey;

/// The key that seals a plugin's store at rest.
#[derive(Clone, Debug)]
pub struct StoreKey(pub LocalKey);

impl PartialEq for StoreKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes() == other.0.as_bytes()
    }
}

impl Eq for StoreKey {}

fn label(name: &str) -> Vec<u8> {
    format!("syncra/v1/plugin-store/{name}").into_bytes()
}

fn legacy_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".json");
    PathBuf::from(p)
}

fn invalid(path: &Path, why: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!(
            "{} is not this plugin's store ({why}); it was left untouched",
            path.display()
        ),
    )
}

/// The most a plugin may keep, keys and values together.
pub const QUOTA_BYTES: usize = 1024 * 1024;

/// The store.
#[derive(Debug, Default)]
pub struct KvStore {
    path: Option<PathBuf>,
    /// The key and the label (naming the plugin) that seal the file, if it is sealed.
    seal: Option<(LocalKey, Vec<u8>)>,
    map: BTreeMap<String, Vec<u8>>,
    used: usize,
}

impl KvStore {
    /// Opens (or starts) a store kept in plaintext; in memory only without a path.
    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        Self::open_as(path, None, "")
    }

    /// Opens (or starts) plugin `name`'s store, sealed with `key` when one is given.
    pub fn open_as(
        path: Option<&Path>,
        key: Option<&StoreKey>,
        name: &str,
    ) -> std::io::Result<Self> {
        let mut s = KvStore {
            path: path.map(Path::to_path_buf),
            seal: key.map(|k| (k.0.clone(), label(name))),
            ..KvStore::default()
        };
        let Some(p) = path else {
            return Ok(s);
        };
        let plaintext = match (std::fs::read(p), &s.seal) {
            (Ok(bytes), Some((key, label))) => key
                .open(label, &bytes)
                .map_err(|_| invalid(p, "damaged, or sealed by another identity or plugin"))?
                .to_vec(),
            (Ok(bytes), None) => bytes,
            (Err(e), Some(_)) if e.kind() == std::io::ErrorKind::NotFound => {
                match std::fs::read(legacy_path(p)) {
                    Ok(bytes) => bytes,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(s),
                    Err(e) => return Err(e),
                }
            }
            (Err(e), None) if e.kind() == std::io::ErrorKind::NotFound => return Ok(s),
            (Err(e), _) => return Err(e),
        };
        s.map = serde_json::from_slice(&plaintext).map_err(|e| invalid(p, e))?;
        s.used = s.map.iter().map(|(k, v)| k.len() + v.len()).sum();
        Ok(s)
    }

    /// A value.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.map.get(key).cloned()
    }

    /// Sets a value within the quota.
    pub fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        let old = self.map.get(&key).map(|v| key.len() + v.len()).unwrap_or(0);
        let new_used = self.used - old + key.len() + value.len();
        if new_used > QUOTA_BYTES {
            return Err(format!(
                "the plugin store is full ({QUOTA_BYTES} bytes); delete something first"
            ));
        }
        self.map.insert(key, value);
        self.used = new_used;
        self.persist()
    }

    /// Removes a value.
    pub fn delete(&mut self, key: &str) {
        if let Some(v) = self.map.remove(key) {
            self.used -= key.len() + v.len();
            let _ = self.persist();
        }
    }

    fn persist(&self) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let json =
            zeroize::Zeroizing::new(serde_json::to_vec(&self.map).map_err(|e| e.to_string())?);
        let bytes = match &self.seal {
            Some((key, label)) => key.seal(label, &json),
            None => json.to_vec(),
        };
        syncra_core::crypto::keyfile::write_private(path, &bytes).map_err(|e| e.to_string())?;
        if self.seal.is_some() {
            // The plaintext an older version kept goes once its sealed replacement is on disk.
            match std::fs::remove_file(legacy_path(path)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.json");
        let mut kv = KvStore::open(Some(&path)).unwrap();
        kv.set("a".into(), vec![1; 10]).unwrap();
        assert!(kv.set("big".into(), vec![0; QUOTA_BYTES]).is_err());
        let kv2 = KvStore::open(Some(&path)).unwrap();
        assert_eq!(kv2.get("a"), Some(vec![1; 10]));
    }

    #[test]
    fn a_sealed_store_is_unreadable_on_disk_and_bound_to_its_plugin() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("echo.kv");
        let key = StoreKey(LocalKey::generate());
        let mut kv = KvStore::open_as(Some(&path), Some(&key), "echo").unwrap();
        kv.set("alice".into(), b"likes tea".to_vec()).unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert!(
            !on_disk.windows(5).any(|w| w == b"alice"),
            "the key is on disk in clear"
        );
        assert!(
            !on_disk.windows(9).any(|w| w == b"likes tea"),
            "the value is on disk in clear"
        );
        let back = KvStore::open_as(Some(&path), Some(&key), "echo").unwrap();
        assert_eq!(back.get("alice"), Some(b"likes tea".to_vec()));
        // Another plugin's name, or another identity's key: refused, and the file is untouched.
        let err = KvStore::open_as(Some(&path), Some(&key), "other").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        let stranger = StoreKey(LocalKey::generate());
        assert!(KvStore::open_as(Some(&path), Some(&stranger), "echo").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), on_disk);
    }

    #[test]
    fn a_plaintext_store_from_an_older_version_is_sealed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("echo.kv");
        let legacy = dir.path().join("echo.kv.json");
        let mut old = KvStore::open(Some(&legacy)).unwrap();
        old.set("n".into(), vec![7]).unwrap();
        let key = StoreKey(LocalKey::generate());
        let mut kv = KvStore::open_as(Some(&path), Some(&key), "echo").unwrap();
        assert_eq!(kv.get("n"), Some(vec![7]));
        kv.set("m".into(), vec![8]).unwrap();
        assert!(!legacy.exists(), "the plaintext copy is left behind");
        let back = KvStore::open_as(Some(&path), Some(&key), "echo").unwrap();
        assert_eq!(back.get("n"), Some(vec![7]));
    }
}

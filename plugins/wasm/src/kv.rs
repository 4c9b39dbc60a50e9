//! A plugin's private key-value store: a small map, optionally kept in a JSON file (written
//! atomically, 0600), with a size quota so a plugin cannot fill the disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The most a plugin may keep, keys and values together.
pub const QUOTA_BYTES: usize = 1024 * 1024;

/// The store.
#[derive(Debug, Default)]
pub struct KvStore {
    path: Option<PathBuf>,
    map: BTreeMap<String, Vec<u8>>,
    used: usize,
}

impl KvStore {
    /// Opens (or starts) a store; in memory only without a path.
    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        let mut s = KvStore {
            path: path.map(Path::to_path_buf),
            ..KvStore::default()
        };
        if let Some(p) = path {
            match std::fs::read(p) {
                Ok(bytes) => {
                    s.map = serde_json::from_slice(&bytes).map_err(|e| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("{} is not a plugin store: {e}", p.display()),
                        )
                    })?;
                    s.used = s.map.iter().map(|(k, v)| k.len() + v.len()).sum();
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
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
        let json = serde_json::to_vec(&self.map).map_err(|e| e.to_string())?;
        syncra_core::crypto::keyfile::write_private(path, &json).map_err(|e| e.to_string())
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
}

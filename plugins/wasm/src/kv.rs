//! A plugin's private key-value store: a small map, optionally kept in a file (written
//! atomically, 0600), with a size quota so a plugin cannot fill the disk.
//!
//! # When it is written
//!
//! `set` and `delete` change the map in memory only; [`KvStore::flush`] writes the whole map
//! once, if it changed. The runner flushes once after every guest call, whatever its outcome
//! ([`SharedKv::flush`]), so a guest that sets a key a thousand times in one call costs one
//! write and one fsync, not a thousand, and the writes a call made before it trapped or was
//! stopped are kept, as they were when each one went to the disk at once. A store is flushed
//! when it is dropped too. What a crash loses: the writes of the calls that were running, which
//! had not returned to their callers.
//!
//! The map is serialised under the store's lock; the file is written and synced outside it, so
//! the guests of other instances read and write the map meanwhile. Flushes take a lock of their
//! own, so snapshots reach the disk in the order they were taken.
//!
//! With a [`StoreKey`] (the client gives its bots the key that seals history), the file is
//! AES-256-GCM sealed and bound to the plugin's name, like the rest of the client's state at
//! rest: what a bot remembers about people is not readable from the disk, and one bot's store
//! copied over another's is refused. A plaintext store an older version left at `<file>.json`
//! is read once and removed after the sealed one is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

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
    /// Counts the changes to the map; `durable` is the count the file holds. Counts rather
    /// than a flag, so that a flush that finds its changes written by another knows it.
    version: u64,
    durable: u64,
    /// How many times the file was written.
    writes: u64,
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
            map: BTreeMap::new(),
            used: 0,
            version: 0,
            durable: 0,
            writes: 0,
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

    /// Sets a value within the quota, in memory: [`KvStore::flush`] writes it to the file.
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
        self.version += 1;
        Ok(())
    }

    /// Removes a value, in memory: [`KvStore::flush`] writes the change to the file.
    pub fn delete(&mut self, key: &str) {
        if let Some(v) = self.map.remove(key) {
            self.used -= key.len() + v.len();
            self.version += 1;
        }
    }

    /// Writes the store to its file if it changed since it was last written.
    pub fn flush(&mut self) -> Result<(), String> {
        if self.version == self.durable {
            return Ok(());
        }
        let version = self.version;
        if let Some(pending) = self.snapshot()? {
            pending.write()?;
            self.writes += 1;
        }
        self.durable = version;
        Ok(())
    }

    /// How many times the store was written to its file.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// The file's new contents, sealed if the store is; `None` for a store in memory only.
    fn snapshot(&self) -> Result<Option<Pending>, String> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let json =
            zeroize::Zeroizing::new(serde_json::to_vec(&self.map).map_err(|e| e.to_string())?);
        let bytes = match &self.seal {
            Some((key, label)) => key.seal(label, &json),
            None => json.to_vec(),
        };
        Ok(Some(Pending {
            path: path.clone(),
            bytes: zeroize::Zeroizing::new(bytes),
            sealed: self.seal.is_some(),
        }))
    }
}

impl Drop for KvStore {
    fn drop(&mut self) {
        if let Err(why) = self.flush() {
            let path = self.path.as_deref().unwrap_or(Path::new("")).display();
            tracing::error!(
                "writing the plugin store {path} at shutdown failed: {why}; its last changes are \
                 lost"
            );
        }
    }
}

/// A snapshot of a store, to be written.
struct Pending {
    path: PathBuf,
    /// Plaintext for an unsealed store: wiped once written.
    bytes: zeroize::Zeroizing<Vec<u8>>,
    sealed: bool,
}

impl Pending {
    fn write(&self) -> Result<(), String> {
        syncra_core::crypto::keyfile::write_private(&self.path, &self.bytes)
            .map_err(|e| e.to_string())?;
        if self.sealed {
            // The plaintext an older version kept goes once its sealed replacement is on disk.
            match std::fs::remove_file(legacy_path(&self.path)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }
}

/// A store shared by all the instances of one plugin.
#[derive(Debug)]
pub(crate) struct SharedKv {
    store: Mutex<KvStore>,
    /// Held through a whole flush: snapshots are written in the order they were taken, and two
    /// writes never share `write_private`'s temporary file.
    writing: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SharedKv {
    pub(crate) fn new(store: KvStore) -> Self {
        SharedKv {
            store: Mutex::new(store),
            writing: Mutex::new(()),
        }
    }

    /// The store, for a guest's `kv_*` call: held only while the map is read or changed.
    pub(crate) fn lock(&self) -> MutexGuard<'_, KvStore> {
        lock(&self.store)
    }

    /// Writes the store if it changed, serialising it under the store's lock and writing the
    /// file outside it. Returns once every change made before the call is on disk, whoever
    /// wrote it. A failed write leaves the changes to be written by the next flush.
    pub(crate) fn flush(&self) -> Result<(), String> {
        {
            let store = self.lock();
            if store.version == store.durable {
                return Ok(());
            }
        }
        let _writing = lock(&self.writing);
        let (pending, version) = {
            let store = self.lock();
            // Another flush may have written these changes while this one waited.
            if store.version == store.durable {
                return Ok(());
            }
            (store.snapshot()?, store.version)
        };
        let written = match &pending {
            Some(pending) => {
                pending.write()?;
                1
            }
            None => 0,
        };
        let mut store = self.lock();
        store.durable = version;
        store.writes += written;
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
        kv.flush().unwrap();
        let kv2 = KvStore::open(Some(&path)).unwrap();
        assert_eq!(kv2.get("a"), Some(vec![1; 10]));
    }

    /// Sets and deletes change the map only: a thousand of them cost one write at the flush,
    /// and a flush with nothing new writes nothing.
    #[test]
    fn a_thousand_sets_are_written_once_at_the_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.json");
        let mut kv = KvStore::open(Some(&path)).unwrap();
        for n in 0..1000u32 {
            kv.set("n".into(), n.to_le_bytes().to_vec()).unwrap();
            kv.set(format!("gone{n}"), vec![1]).unwrap();
            kv.delete(&format!("gone{n}"));
        }
        assert_eq!(kv.writes(), 0);
        assert!(!path.exists(), "written before the flush");
        kv.flush().unwrap();
        assert_eq!(kv.writes(), 1);
        kv.flush().unwrap();
        assert_eq!(kv.writes(), 1);
        let back = KvStore::open(Some(&path)).unwrap();
        assert_eq!(back.get("n"), Some(999u32.to_le_bytes().to_vec()));
        assert_eq!(back.get("gone999"), None);
    }

    /// Changes not yet flushed are written when the store is dropped.
    #[test]
    fn a_dropped_store_writes_what_it_has_not_yet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.json");
        let shared = SharedKv::new(KvStore::open(Some(&path)).unwrap());
        shared.lock().set("a".into(), vec![1]).unwrap();
        shared.flush().unwrap();
        shared.lock().set("a".into(), vec![2]).unwrap();
        drop(shared);
        let back = KvStore::open(Some(&path)).unwrap();
        assert_eq!(back.get("a"), Some(vec![2]));
    }

    #[test]
    fn a_sealed_store_is_unreadable_on_disk_and_bound_to_its_plugin() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("echo.kv");
        let key = StoreKey(LocalKey::generate());
        let mut kv = KvStore::open_as(Some(&path), Some(&key), "echo").unwrap();
        kv.set("alice".into(), b"likes tea".to_vec()).unwrap();
        kv.flush().unwrap();
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
        old.flush().unwrap();
        let key = StoreKey(LocalKey::generate());
        let mut kv = KvStore::open_as(Some(&path), Some(&key), "echo").unwrap();
        assert_eq!(kv.get("n"), Some(vec![7]));
        kv.set("m".into(), vec![8]).unwrap();
        kv.flush().unwrap();
        assert!(!legacy.exists(), "the plaintext copy is left behind");
        let back = KvStore::open_as(Some(&path), Some(&key), "echo").unwrap();
        assert_eq!(back.get("n"), Some(vec![7]));
    }
}

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

/// The most a plugin may keep, keys and values together, counted as [`entry_cost`] does.
pub const QUOTA_BYTES: usize = 1024 * 1024;

/// What holding one entry costs the host beyond its bytes (the map's node, two buffers).
const ENTRY_OVERHEAD: usize = 64;

/// What an entry counts against the quota: its size in the file — the key as a JSON string
/// (a control character escaped takes up to six bytes), the value as a JSON array of numbers
/// (up to four bytes per byte) — plus [`ENTRY_OVERHEAD`]. So the quota bounds the file the
/// host writes after every changing call and the memory the map takes, not just the bytes
/// the guest gave: counted as given, one key of control characters made a file six times the
/// quota, and a third of a million empty entries took some 35 MB of the host's memory.
pub fn entry_cost(key: &str, value: &[u8]) -> usize {
    let key_len: usize = key
        .chars()
        .map(|c| match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if u32::from(c) < 0x20 => 6,
            c => c.len_utf8(),
        })
        .sum();
    let value_len: usize = value
        .iter()
        .map(|&b| match b {
            0..=9 => 2,
            10..=99 => 3,
            _ => 4,
        })
        .sum();
    // Quotes, colon, brackets, comma.
    key_len + value_len + 6 + ENTRY_OVERHEAD
}

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
        s.used = s.map.iter().map(|(k, v)| entry_cost(k, v)).sum();
        Ok(s)
    }

    /// A value.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.map.get(key).cloned()
    }

    /// Sets a value within the quota, in memory: [`KvStore::flush`] writes it to the file.
    pub fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        let old = self.map.get(&key).map_or(0, |v| entry_cost(&key, v));
        let new_used = self.used - old + entry_cost(&key, &value);
        // Only growth is refused: a store over the quota (one written before it was counted
        // this way) can still be rewritten in place and shrunk.
        if new_used > QUOTA_BYTES && new_used > self.used {
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
            self.used -= entry_cost(key, &v);
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
    ///
    /// Flushes that wait for one another share writes: a flush returns at once when a write
    /// made while it waited holds every change made before it began, even if other changes
    /// came since (theirs are their callers' to wait for). Under a steady stream of changing
    /// calls, each caller waits for at most the write in progress and one more, not for one
    /// write per caller ahead of it.
    pub(crate) fn flush(&self) -> Result<(), String> {
        let target = {
            let store = self.lock();
            if store.version == store.durable {
                return Ok(());
            }
            store.version
        };
        self.flush_to(target)
    }

    /// Returns once the file holds at least the store's `target`-th change.
    fn flush_to(&self, target: u64) -> Result<(), String> {
        let _writing = lock(&self.writing);
        let (pending, version) = {
            let store = self.lock();
            // Another flush may have written these changes while this one waited.
            if store.durable >= target {
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
    /// A flush that waited while another wrote its changes returns without writing again,
    /// though changes came since: those are their own callers' to wait for (before, every
    /// waiting caller wrote the whole store again, one write per caller ahead of it).
    #[test]
    fn a_flush_whose_changes_another_wrote_does_not_write_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv");
        let kv = SharedKv::new(KvStore::open(Some(&path)).unwrap());
        kv.lock().set("a".into(), vec![1]).unwrap();
        // This call's flush begins: it needs the first change on disk; it waits meanwhile.
        let mine = kv.lock().version;
        kv.lock().set("b".into(), vec![2]).unwrap();
        kv.flush().unwrap(); // another call's flush writes both changes
        assert_eq!(kv.lock().writes(), 1);
        kv.lock().set("c".into(), vec![3]).unwrap(); // a third call, still running
        kv.flush_to(mine).unwrap();
        assert_eq!(
            kv.lock().writes(),
            1,
            "written again for changes already on disk"
        );
        // The third call's own flush writes its change.
        kv.flush().unwrap();
        assert_eq!(kv.lock().writes(), 2);
        drop(kv);
        assert_eq!(KvStore::open(Some(&path)).unwrap().get("c"), Some(vec![3]));
    }

    /// Calls on many threads, each changing the store and flushing: every change is on disk
    /// when its flush returns, however the writes were shared.
    #[test]
    fn concurrent_flushes_keep_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv");
        let kv = std::sync::Arc::new(SharedKv::new(KvStore::open(Some(&path)).unwrap()));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let kv = kv.clone();
                let path = path.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        let key = format!("{t}-{i}");
                        kv.lock().set(key.clone(), vec![t; 1000]).unwrap();
                        kv.flush().unwrap();
                        // Opened unchanged, it writes nothing when dropped.
                        let on_disk = KvStore::open(Some(&path)).unwrap();
                        assert_eq!(on_disk.get(&key), Some(vec![t; 1000]), "{key}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    /// The quota bounds the file and the entries, whatever the guest puts in them: a key of
    /// control characters, values of large bytes, or many empty entries each stop short of a
    /// file over the quota (before, the first made a file six times the quota and the last
    /// some 350 000 entries).
    #[test]
    fn the_quota_bounds_the_file_and_the_number_of_entries() {
        let dir = tempfile::tempdir().unwrap();
        // The cost of an entry is its share of the file, exactly.
        for (key, value) in [
            ("k", vec![]),
            ("a\"\\\n\u{1}é", vec![0, 9, 10, 99, 100, 255]),
        ] {
            let mut one = BTreeMap::new();
            one.insert(key.to_owned(), value.clone());
            let json = serde_json::to_vec(&one).unwrap();
            // The map's braces, less the comma the last entry does not have; a value's
            // last byte has no comma either.
            let share = json.len() - 1 + usize::from(!value.is_empty());
            assert_eq!(entry_cost(key, &value), share + ENTRY_OVERHEAD, "{key:?}");
        }
        let fills: [&dyn Fn(usize) -> (String, Vec<u8>); 3] = [
            &|i| (format!("{i}{}", "\u{1}".repeat(QUOTA_BYTES / 16)), vec![]),
            &|i| (format!("v{i}"), vec![255; 10_000]),
            &|i| (format!("{i}"), vec![]),
        ];
        for (n, fill) in fills.iter().enumerate() {
            let path = dir.path().join(format!("kv{n}"));
            let mut kv = KvStore::open(Some(&path)).unwrap();
            let mut entries = 0;
            for i in 0.. {
                let (key, value) = fill(i);
                if kv.set(key, value).is_err() {
                    break;
                }
                entries += 1;
            }
            kv.flush().unwrap();
            let size = std::fs::metadata(&path).unwrap().len() as usize;
            assert!(size <= QUOTA_BYTES + 1, "fill {n}: a file of {size} bytes");
            assert!(
                entries <= QUOTA_BYTES / ENTRY_OVERHEAD,
                "fill {n}: {entries}"
            );
            assert!(entries > 0, "fill {n}: nothing fitted");
        }
    }

    /// A store over the quota (kept before entries were counted as they are now) still opens,
    /// reads, and takes a value of the same size or smaller in place; only growth is refused.
    #[test]
    fn a_store_over_the_quota_can_be_rewritten_and_shrunk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv");
        let mut old = BTreeMap::new();
        old.insert("state".to_owned(), vec![200u8; 500_000]);
        std::fs::write(&path, serde_json::to_vec(&old).unwrap()).unwrap();
        let mut kv = KvStore::open(Some(&path)).unwrap();
        assert_eq!(kv.get("state"), Some(vec![200u8; 500_000]));
        assert!(kv.set("state".into(), vec![201u8; 500_000]).is_ok());
        assert!(kv.set("state".into(), vec![99u8; 400_000]).is_ok()); // still over
        assert!(
            kv.set("more".into(), vec![1]).is_err(),
            "growth over the quota"
        );
        assert!(kv.set("state".into(), vec![9u8; 100]).is_ok());
        assert!(kv.set("more".into(), vec![1]).is_ok());
    }

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

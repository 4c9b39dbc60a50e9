//! MLS state as bytes, for the client to seal at rest.
//!
//! openmls keeps a group's state (tree, epoch secrets, the message-key ratchets) and the
//! private halves of KeyPackages in a storage provider: here a memory storage, a map from
//! openmls's keys to openmls's values. This module writes that map out and reads it back; the
//! client seals the bytes with its storage key (`local_box`), like history.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! magic "syncra/mls-state" || version u8 (1) || kind u8 (1 conversation, 2 key store)
//! || header_len u32 || header (the group id of a conversation, empty for a key store)
//! || count u32 || count × (key_len u32 || key || value_len u32 || value)
//! ```
//!
//! Entries are written sorted by key, so equal states give equal bytes. Reading checks every
//! length against what is left, refuses duplicate keys and trailing bytes, and never panics:
//! the bytes come from a file, and files get damaged.
//!
//! The state must be written (and sealed) after every call that changed it and before what it
//! produced leaves the device: restoring an older state after sending would reuse a message
//! key.

use std::collections::HashMap;
use std::sync::RwLock;

use openmls_memory_storage::MemoryStorage;
use zeroize::Zeroizing;

use super::error::MlsError;

const MAGIC: &[u8] = b"syncra/mls-state";
const VERSION: u8 = 1;

/// What a state blob holds; a conversation's bytes never load as a key store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Conversation = 1,
    KeyStore = 2,
}

/// A decoded blob.
pub(crate) struct Decoded {
    pub(crate) header: Vec<u8>,
    pub(crate) storage: MemoryStorage,
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Entries are openmls records (a group's tree at most a few MB); never near 4 GiB.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Writes `storage` with its header. The result holds secrets: it is wiped when dropped.
pub(crate) fn encode(kind: Kind, header: &[u8], storage: &MemoryStorage) -> Zeroizing<Vec<u8>> {
    // A poisoned lock means a panic elsewhere while holding it; the map itself is still whole
    // (openmls writes each entry in one insert).
    let values = storage
        .values
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut entries: Vec<(&Vec<u8>, &Vec<u8>)> = values.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let size = entries
        .iter()
        .map(|(k, v)| 8 + k.len() + v.len())
        .sum::<usize>();
    let mut out = Zeroizing::new(Vec::with_capacity(MAGIC.len() + 10 + header.len() + size));
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(kind as u8);
    put_bytes(&mut out, header);
    let count = u32::try_from(entries.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for (key, value) in entries {
        put_bytes(&mut out, key);
        put_bytes(&mut out, value);
    }
    out
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MlsError> {
        if self.rest.len() < n {
            return Err(bad());
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u32(&mut self) -> Result<usize, MlsError> {
        let b: [u8; 4] = self.take(4)?.try_into().map_err(|_| bad())?;
        usize::try_from(u32::from_be_bytes(b)).map_err(|_| bad())
    }

    fn bytes(&mut self) -> Result<&'a [u8], MlsError> {
        let n = self.u32()?;
        self.take(n)
    }
}

fn bad() -> MlsError {
    MlsError::Malformed { expected: "state" }
}

/// Reads what [`encode`] wrote, refusing another kind.
pub(crate) fn decode(kind: Kind, bytes: &[u8]) -> Result<Decoded, MlsError> {
    let mut r = Reader { rest: bytes };
    if r.take(MAGIC.len())? != MAGIC || r.take(1)? != [VERSION] || r.take(1)? != [kind as u8] {
        return Err(bad());
    }
    let header = r.bytes()?.to_vec();
    let count = r.u32()?;
    // Each entry takes at least 8 bytes: a count the bytes cannot hold is refused before any
    // allocation sized by it.
    if count > r.rest.len() / 8 {
        return Err(bad());
    }
    let mut map = HashMap::with_capacity(count);
    for _ in 0..count {
        let key = r.bytes()?.to_vec();
        let value = r.bytes()?.to_vec();
        if map.insert(key, value).is_some() {
            return Err(bad());
        }
    }
    if !r.rest.is_empty() {
        return Err(bad());
    }
    Ok(Decoded {
        header,
        storage: MemoryStorage {
            values: RwLock::new(map),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(entries: &[(&[u8], &[u8])]) -> MemoryStorage {
        let map = entries
            .iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        MemoryStorage {
            values: RwLock::new(map),
        }
    }

    fn values(s: &MemoryStorage) -> HashMap<Vec<u8>, Vec<u8>> {
        s.values
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    #[test]
    fn round_trip_is_exact_and_deterministic() {
        let s = storage(&[(b"b", b"2"), (b"a", b""), (b"", b"zero")]);
        let bytes = encode(Kind::Conversation, b"group-id", &s);
        assert_eq!(*bytes, *encode(Kind::Conversation, b"group-id", &s));
        let back = decode(Kind::Conversation, &bytes).expect("decodes");
        assert_eq!(back.header, b"group-id");
        assert_eq!(values(&back.storage), values(&s));
    }

    #[test]
    fn damage_is_refused_not_panicked_on() {
        let s = storage(&[(b"key", b"value"), (b"k2", b"v2")]);
        let bytes = encode(Kind::Conversation, b"g", &s);
        // Another kind, every truncation and a trailing byte are all refused.
        assert!(decode(Kind::KeyStore, &bytes).is_err());
        for cut in 0..bytes.len() {
            assert!(
                decode(Kind::Conversation, &bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(decode(Kind::Conversation, &longer).is_err());
        // A huge count with no bytes behind it.
        let mut huge = bytes[..MAGIC.len() + 2 + 4 + 1].to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(Kind::Conversation, &huge).is_err());
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[VERSION, Kind::KeyStore as u8]);
        put_bytes(&mut bytes, b"");
        bytes.extend_from_slice(&2u32.to_be_bytes());
        for _ in 0..2 {
            put_bytes(&mut bytes, b"k");
            put_bytes(&mut bytes, b"v");
        }
        assert!(decode(Kind::KeyStore, &bytes).is_err());
    }
}

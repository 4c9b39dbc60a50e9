//! MLS state as bytes, for the client to seal at rest.
//!
//! openmls keeps a group's state (tree, epoch secrets, the message-key ratchets) and the
//! private halves of KeyPackages in a storage provider: here [`Storage`], a map from keys to
//! values in postcard (its module documents both). This module writes that map out and reads
//! it back; the client seals the bytes with its storage key (`local_box`), like history.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! magic "syncra/mls-state" || version u8 (2) || kind u8 (1 conversation, 2 key store)
//! || header_len u32 || header (the group id of a conversation, empty for a key store)
//! || count u32 || count × (key_len u32 || key || value_len u32 || value)
//! ```
//!
//! Version 1 held the same map with openmls's JSON values; it is refused, not converted.
//!
//! Entries are written in strictly increasing key order, so equal states give equal bytes.
//! Reading checks every length against what is left, refuses keys out of order (and so
//! duplicates), another kind and trailing bytes, and never panics: the bytes come from a file,
//! and files get damaged. A value is checked when openmls reads it, against the type it asks
//! for ([`super::storage`]).
//!
//! The state must be written (and sealed) after every call that changed it and before what it
//! produced leaves the device: restoring an older state after sending would reuse a message
//! key.

use zeroize::Zeroizing;

use super::error::MlsError;
use super::storage::{Entries, Storage};

const MAGIC: &[u8] = b"syncra/mls-state";
const VERSION: u8 = 2;

/// What a state blob holds; a conversation's bytes never load as a key store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Conversation = 1,
    KeyStore = 2,
}

/// A decoded blob.
pub(crate) struct Decoded {
    pub(crate) header: Vec<u8>,
    pub(crate) storage: Storage,
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Entries are openmls records (a group's tree at most a few MB); never near 4 GiB.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Writes `storage` with its header. The result holds secrets: it is wiped when dropped.
pub(crate) fn encode(kind: Kind, header: &[u8], storage: &Storage) -> Zeroizing<Vec<u8>> {
    // The map is sorted by key.
    let entries = storage.entries();
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
    for (key, value) in entries.iter() {
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
    let mut map = Entries::new();
    let mut last: Option<&[u8]> = None;
    for _ in 0..count {
        let key = r.bytes()?;
        // Strictly increasing: one encoding per state, and no key twice.
        if last.is_some_and(|last| last >= key) {
            return Err(bad());
        }
        last = Some(key);
        let value = Zeroizing::new(r.bytes()?.to_vec());
        map.insert(key.to_vec(), value);
    }
    if !r.rest.is_empty() {
        return Err(bad());
    }
    Ok(Decoded {
        header,
        storage: Storage::from_entries(map),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(entries: &[(&[u8], &[u8])]) -> Storage {
        let map = entries
            .iter()
            .map(|(k, v)| (k.to_vec(), Zeroizing::new(v.to_vec())))
            .collect();
        Storage::from_entries(map)
    }

    fn values(s: &Storage) -> Vec<(Vec<u8>, Vec<u8>)> {
        s.entries()
            .iter()
            .map(|(k, v)| (k.clone(), v.to_vec()))
            .collect()
    }

    /// A blob with these entries, in this order, whatever the order.
    fn raw(version: u8, kind: Kind, entries: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[version, kind as u8]);
        put_bytes(&mut bytes, b"");
        bytes.extend_from_slice(&u32::try_from(entries.len()).unwrap().to_be_bytes());
        for (k, v) in entries {
            put_bytes(&mut bytes, k);
            put_bytes(&mut bytes, v);
        }
        bytes
    }

    #[test]
    fn round_trip_is_exact_and_deterministic() {
        let s = storage(&[(b"b", b"2"), (b"a", b""), (b"", b"zero")]);
        let bytes = encode(Kind::Conversation, b"group-id", &s);
        assert_eq!(*bytes, *encode(Kind::Conversation, b"group-id", &s));
        let back = decode(Kind::Conversation, &bytes).expect("decodes");
        assert_eq!(back.header, b"group-id");
        assert_eq!(values(&back.storage), values(&s));
        assert_eq!(
            *encode(Kind::Conversation, b"group-id", &back.storage),
            *bytes
        );
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
    fn duplicate_and_unordered_keys_are_refused() {
        let ordered = raw(VERSION, Kind::KeyStore, &[(b"a", b"1"), (b"b", b"2")]);
        assert!(decode(Kind::KeyStore, &ordered).is_ok());
        let twice = raw(VERSION, Kind::KeyStore, &[(b"k", b"v"), (b"k", b"v")]);
        assert!(decode(Kind::KeyStore, &twice).is_err());
        let unordered = raw(VERSION, Kind::KeyStore, &[(b"b", b"2"), (b"a", b"1")]);
        assert!(decode(Kind::KeyStore, &unordered).is_err());
    }

    #[test]
    fn the_json_era_version_is_refused() {
        let old = raw(1, Kind::KeyStore, &[(b"a", b"[1,2,3]")]);
        assert!(decode(Kind::KeyStore, &old).is_err());
    }
}

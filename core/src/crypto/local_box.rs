//! Authenticated encryption for data at rest on the client (history lines, the outbox).
//!
//! AES-256-GCM under a random 32-byte key that lives in the key file, with a fresh random nonce
//! per item and an associated-data label that names where the item belongs (for example the
//! conversation's file), so an item cannot be moved to another file unnoticed.
//! Layout: `nonce [12] || ciphertext+tag`.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

/// Bytes of overhead per item (nonce and tag).
pub const OVERHEAD: usize = 12 + 16;

/// A key for data at rest.
#[derive(Clone)]
pub struct LocalKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for LocalKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalKey(..)")
    }
}

/// An item failed to decrypt: it was damaged, or belongs elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the item is damaged or does not belong here")]
pub struct Damaged;

impl LocalKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        super::fill_random(k.as_mut());
        LocalKey(k)
    }

    /// A key from stored bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 32 {
            return None;
        }
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(bytes);
        Some(LocalKey(key))
    }

    /// The key bytes, for sealing into the key file.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Encrypts `plaintext`, bound to `label`.
    pub fn seal(&self, label: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        super::fill_random(&mut nonce);
        let cipher = Aes256Gcm::new(&(*self.0).into());
        let ct = cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: label,
                },
            )
            // AES-GCM encryption only fails for inputs beyond 64 GiB.
            .unwrap_or_default();
        let mut out = Vec::with_capacity(12 + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Decrypts an item sealed with the same key and label.
    pub fn open(&self, label: &[u8], item: &[u8]) -> Result<Zeroizing<Vec<u8>>, Damaged> {
        if item.len() < OVERHEAD {
            return Err(Damaged);
        }
        let nonce: [u8; 12] = item[..12].try_into().map_err(|_| Damaged)?;
        let cipher = Aes256Gcm::new(&(*self.0).into());
        cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &item[12..],
                    aad: label,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| Damaged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding() {
        let k = LocalKey::generate();
        let item = k.seal(b"chats/a.log", b"hello");
        assert_eq!(k.open(b"chats/a.log", &item).unwrap().as_slice(), b"hello");
        assert_eq!(k.open(b"chats/b.log", &item), Err(Damaged));
        let mut bad = item.clone();
        bad[20] ^= 1;
        assert_eq!(k.open(b"chats/a.log", &bad), Err(Damaged));
        assert_eq!(k.open(b"chats/a.log", &item[..10]), Err(Damaged));
        assert_eq!(
            LocalKey::generate().open(b"chats/a.log", &item),
            Err(Damaged)
        );
    }
}

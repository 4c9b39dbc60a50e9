//! The identity record: the public material a relay stores and hands out for a user.

use crate::crypto::keys::{IdentityPublicKey, SignedPrekey};
use crate::error::CryptoError;
use crate::id::{Handle, UserId};

/// What a relay knows about a user: handle, identity key and current signed prekey. Public
/// material only; clients verify it themselves ([`IdentityRecord::verify`]) and never trust the
/// relay's word for it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdentityRecord {
    /// The self-certifying id (must equal the hash of `identity_key`).
    pub user_id: UserId,
    /// The handle registered for this identity.
    pub handle: Handle,
    /// The Ed25519 identity key.
    #[serde(with = "crate::serde_b64::fixed")]
    pub identity_key: IdentityPublicKey,
    /// The current signed prekey.
    pub prekey: SignedPrekey,
}

impl IdentityRecord {
    /// Checks that the id belongs to the key and the prekey is signed by it.
    pub fn verify(&self) -> Result<(), CryptoError> {
        let actual = UserId::from_identity_key(&self.identity_key);
        if actual != self.user_id {
            return Err(CryptoError::IdKeyMismatch {
                claimed: self.user_id,
                actual,
            });
        }
        self.prekey.verify(&self.identity_key)
    }
}

/// A record's columns as a store keeps them, not yet checked: what a store reads from a row
/// before [`StoredColumns::check`] turns it into an [`IdentityRecord`] or says what is wrong.
/// One implementation for every store, so a damaged row is reported the same way by each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredColumns {
    /// `user_id`.
    pub user_id: Vec<u8>,
    /// `handle`.
    pub handle: String,
    /// `identity_key`.
    pub identity_key: Vec<u8>,
    /// `prekey_public`.
    pub prekey_public: Vec<u8>,
    /// `prekey_created_at` (seconds since the epoch).
    pub prekey_created_at: u64,
    /// `prekey_signature`.
    pub prekey_signature: Vec<u8>,
}

/// A stored row that is not a valid record: which row (`user <id>`, or the id in hex when the
/// id itself is damaged) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorruptRow {
    /// Which row.
    pub row: String,
    /// What is wrong with it.
    pub why: String,
}

impl StoredColumns {
    /// The row the columns came from, for an error about reading a column: `user <id>` when
    /// the id is whole.
    pub fn row_name(user_id: &[u8]) -> String {
        match <[u8; crate::id::USER_ID_LEN]>::try_from(user_id) {
            Ok(id) => format!("user {}", UserId::from_bytes(id)),
            Err(_) => format!("user id {}", data_encoding::HEXLOWER.encode(user_id)),
        }
    }

    /// Checks every length, the handle, and that the identity key belongs to the id (one hash;
    /// the prekey signature is left to clients, who verify every record they are handed).
    pub fn check(self) -> Result<IdentityRecord, CorruptRow> {
        let user_id = <[u8; crate::id::USER_ID_LEN]>::try_from(self.user_id.as_slice())
            .map(UserId::from_bytes)
            .map_err(|_| CorruptRow {
                row: Self::row_name(&self.user_id),
                why: format!(
                    "user_id is {} bytes, expected {}",
                    self.user_id.len(),
                    crate::id::USER_ID_LEN
                ),
            })?;
        let row = format!("user {user_id}");
        let corrupt = |why: String| CorruptRow {
            row: row.clone(),
            why,
        };
        fn fixed<const N: usize>(bytes: &[u8], name: &str) -> Result<[u8; N], String> {
            bytes
                .try_into()
                .map_err(|_| format!("{name} is {} bytes, expected {N}", bytes.len()))
        }
        let handle = Handle::parse(&self.handle).map_err(|e| corrupt(e.to_string()))?;
        let record = IdentityRecord {
            user_id,
            handle,
            identity_key: fixed(&self.identity_key, "identity_key").map_err(corrupt)?,
            prekey: SignedPrekey {
                public: fixed(&self.prekey_public, "prekey_public").map_err(corrupt)?,
                created_at: self.prekey_created_at,
                signature: fixed(&self.prekey_signature, "prekey_signature").map_err(corrupt)?,
            },
        };
        if UserId::from_identity_key(&record.identity_key) != record.user_id {
            return Err(corrupt("identity_key does not belong to user_id".into()));
        }
        Ok(record)
    }
}

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

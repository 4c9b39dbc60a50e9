//! The `IdentityStore` contract: public identity material by handle and by user id.
//!
//! Why this shape: stores differ in how they persist (SQLite, Postgres, a plugin), not in the
//! rules, so the rules live in provided methods here — a record is verified before it is stored,
//! a prekey replacement must be signed by the stored identity key and must not be older than the
//! current one — and each implementation only supplies raw storage with one hard requirement:
//! [`IdentityStore::insert`] must be atomic, so of two racing registrations of one handle exactly
//! one wins and the other gets [`StoreError::HandleTaken`]. Stores hold public material only.

use async_trait::async_trait;

use crate::crypto::keys::SignedPrekey;
use crate::error::StoreError;
use crate::health::Health;
use crate::id::{Handle, UserId};
use crate::record::IdentityRecord;

/// Where a relay keeps identity records.
#[async_trait]
pub trait IdentityStore: Send + Sync {
    /// The kind name this store registered under.
    fn kind(&self) -> &'static str;

    /// Stores a new record atomically. Fails with [`StoreError::HandleTaken`] if the handle is
    /// taken and [`StoreError::AlreadyRegistered`] if the user id exists. Does not verify; call
    /// [`IdentityStore::register`].
    async fn insert(&self, record: &IdentityRecord) -> Result<(), StoreError>;

    /// The record for a handle.
    async fn by_handle(&self, handle: &Handle) -> Result<Option<IdentityRecord>, StoreError>;

    /// The record for a user id.
    async fn by_id(&self, id: &UserId) -> Result<Option<IdentityRecord>, StoreError>;

    /// Overwrites the prekey of an existing user; [`StoreError::NotFound`] if there is none.
    /// Does not verify; call [`IdentityStore::replace_prekey`].
    async fn store_prekey(&self, id: &UserId, prekey: &SignedPrekey) -> Result<(), StoreError>;

    /// Deletes a user. Returns whether there was one.
    async fn delete(&self, id: &UserId) -> Result<bool, StoreError>;

    /// The user's registration generation, or `None` if the user is not registered. A store
    /// picks a fresh random generation whenever it inserts a record, so deleting a user and
    /// registering the same identity again gives another one. Resume tokens name the
    /// generation they were issued under: a changed or missing generation revokes them.
    async fn generation(&self, id: &UserId) -> Result<Option<u64>, StoreError>;

    /// Whether the store is reachable.
    async fn health(&self) -> Health {
        Health::Up
    }

    /// Verifies and registers a record.
    async fn register(&self, record: &IdentityRecord) -> Result<(), StoreError> {
        record.verify()?;
        self.insert(record).await
    }

    /// Replaces a user's prekey after checking it is signed by the stored identity key and is
    /// not older than the current one (an old signed prekey replayed would undo a rotation).
    async fn replace_prekey(&self, id: &UserId, prekey: &SignedPrekey) -> Result<(), StoreError> {
        let current = self.by_id(id).await?.ok_or(StoreError::NotFound(*id))?;
        prekey.verify(&current.identity_key)?;
        if prekey.created_at < current.prekey.created_at {
            return Err(StoreError::StalePrekey);
        }
        self.store_prekey(id, prekey).await
    }
}

/// A fresh registration generation, for [`IdentityStore::insert`] implementations: random, and
/// within `1..=i64::MAX` so every SQL database stores it in a signed 64-bit column.
pub fn new_generation() -> u64 {
    let mut bytes = [0u8; 8];
    crate::crypto::fill_random(&mut bytes);
    (u64::from_le_bytes(bytes) >> 1).max(1)
}

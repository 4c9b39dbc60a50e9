//! The `IdentityStore` contract: public identity material by handle and by user id.
//!
//! Why this shape: stores differ in how they persist (SQLite, Postgres, a plugin), not in the
//! rules, so the rules live in provided methods here — a record is verified before it is stored,
//! a prekey replacement must be signed by the stored identity key and must not be older than the
//! current one — and each implementation only supplies raw storage with one hard requirement:
//! [`IdentityStore::insert`] must be atomic, so of two racing registrations of one handle exactly
//! one wins and the other gets [`StoreError::HandleTaken`]. Stores hold public material only.
//!
//! The store is also the relay's half of MLS (docs/PROTOCOL.md §9): a **KeyPackage directory**
//! (one-time packages claimed once each, oldest first, and one last-resort package handed out
//! when those run out) and, per group, the **epoch and members** the last accepted commit set —
//! nothing else about a group. [`IdentityStore::advance_group`] must be atomic like `insert`:
//! of two commits for one epoch exactly one advances the group, on every node of a cluster.

use async_trait::async_trait;
use bytes::Bytes;

use crate::carriage::GroupId;
use crate::crypto::envelope::MessageId;
use crate::crypto::keys::SignedPrekey;
use crate::error::StoreError;
use crate::health::Health;
use crate::id::{Handle, UserId};
use crate::record::IdentityRecord;

/// The most KeyPackages a user may keep in the directory (one-time ones; the last-resort one is
/// extra). Enough for a user to be added to this many conversations while offline.
pub const MAX_KEY_PACKAGES: usize = 100;
/// The largest KeyPackage a store keeps, in bytes (a Syncra KeyPackage is about 300).
pub const MAX_KEY_PACKAGE_LEN: usize = 4096;

/// How many KeyPackages the directory holds for a user.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyPackageStock {
    /// One-time packages left.
    pub one_time: u32,
    /// Whether a last-resort package is published.
    pub last_resort: bool,
}

/// A KeyPackage handed out by [`IdentityStore::claim_key_package`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimedKeyPackage {
    /// The package, as its owner published it (the claimer verifies it).
    pub package: Bytes,
    /// Whether it is the last-resort package (kept, and possibly handed out again).
    pub last_resort: bool,
}

/// What the store knows about an MLS group: set by the last accepted commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupState {
    /// The group's current epoch.
    pub epoch: u64,
    /// The members that commit declared.
    pub members: Vec<UserId>,
    /// That commit's message id: the same commit sent again (to a member it did not reach) is
    /// recognised and routed, not refused as a conflict.
    pub last_commit: MessageId,
}

impl GroupState {
    /// A group row as the stores keep it (a signed 64-bit epoch, the members' ids back to back,
    /// the commit id), checked: the one decoding every store uses. The error says which column
    /// is wrong.
    pub fn from_columns(epoch: i64, members: &[u8], last_commit: &[u8]) -> Result<Self, String> {
        let last_commit = MessageId::try_from(last_commit)
            .map_err(|_| "last_commit: not a message id".to_owned())?;
        let members =
            decode_members(members).ok_or_else(|| "members: not a list of user ids".to_owned())?;
        let epoch = u64::try_from(epoch).map_err(|_| format!("epoch: {epoch} is negative"))?;
        Ok(GroupState {
            epoch,
            members,
            last_commit,
        })
    }
}

/// The answer of [`IdentityStore::advance_group`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EpochAdvance {
    /// The group moved from the given epoch to the next one.
    Advanced,
    /// The group is not at the given epoch (another commit won it, or the group is unknown and
    /// the epoch is not 0); it is at `current` (`None`: unknown).
    Conflict {
        /// The group's epoch now.
        current: Option<u64>,
    },
}

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

    /// Appends one-time KeyPackages for an existing user (claimed later in the order given) and,
    /// if `last_resort` is given, replaces the user's last-resort package. Fails with
    /// [`StoreError::NotFound`] for an unknown user and [`StoreError::KeyPackagesFull`] if more
    /// than [`MAX_KEY_PACKAGES`] one-time packages would be held (then nothing is stored).
    /// Does not check sizes; call [`IdentityStore::publish_key_packages`].
    async fn store_key_packages(
        &self,
        id: &UserId,
        one_time: &[Bytes],
        last_resort: Option<&Bytes>,
    ) -> Result<KeyPackageStock, StoreError>;

    /// Takes a user's oldest one-time KeyPackage out of the directory and returns it, or, when
    /// none is left, returns (and keeps) the last-resort one; `None` when there is neither.
    /// Atomic: two claims never get the same one-time package.
    async fn claim_key_package(&self, id: &UserId)
    -> Result<Option<ClaimedKeyPackage>, StoreError>;

    /// How many KeyPackages a user has left.
    async fn key_package_stock(&self, id: &UserId) -> Result<KeyPackageStock, StoreError>;

    /// What the last accepted commit of a group set, or `None` for a group no commit named.
    async fn group(&self, group: &GroupId) -> Result<Option<GroupState>, StoreError>;

    /// Moves a group from epoch `from` to `from + 1` and records the commit's members and
    /// message id, if and only if it is at `from` now — or, for a group the store does not know,
    /// if `from` is 0 (its first commit). Atomic across every relay sharing the store.
    async fn advance_group(
        &self,
        group: &GroupId,
        from: u64,
        members: &[UserId],
        commit: &MessageId,
    ) -> Result<EpochAdvance, StoreError>;

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

    /// Publishes KeyPackages after checking each is 1 to [`MAX_KEY_PACKAGE_LEN`] bytes. The relay
    /// cannot read a KeyPackage (it would need MLS); whoever claims one verifies it, including
    /// that it is bound to the user it was claimed for.
    async fn publish_key_packages(
        &self,
        id: &UserId,
        one_time: &[Bytes],
        last_resort: Option<&Bytes>,
    ) -> Result<KeyPackageStock, StoreError> {
        let bad = |p: &Bytes| p.is_empty() || p.len() > MAX_KEY_PACKAGE_LEN;
        if one_time.iter().any(bad) || last_resort.is_some_and(bad) {
            return Err(StoreError::BadKeyPackage {
                max: MAX_KEY_PACKAGE_LEN,
            });
        }
        if one_time.len() > MAX_KEY_PACKAGES {
            return Err(StoreError::KeyPackagesFull {
                max: MAX_KEY_PACKAGES,
            });
        }
        self.store_key_packages(id, one_time, last_resort).await
    }
}

/// Encodes a member list for a store column: the user ids back to back.
pub fn encode_members(members: &[UserId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(members.len() * crate::id::USER_ID_LEN);
    for m in members {
        out.extend_from_slice(m.as_bytes());
    }
    out
}

/// Decodes [`encode_members`]; `None` if the length is not a whole number of ids.
fn decode_members(bytes: &[u8]) -> Option<Vec<UserId>> {
    const LEN: usize = crate::id::USER_ID_LEN;
    if !bytes.len().is_multiple_of(LEN) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(LEN)
            .map(|c| {
                let mut id = [0u8; LEN];
                id.copy_from_slice(c);
                UserId::from_bytes(id)
            })
            .collect(),
    )
}

/// A fresh registration generation, for [`IdentityStore::insert`] implementations: random, and
/// within `1..=i64::MAX` so every SQL database stores it in a signed 64-bit column.
pub fn new_generation() -> u64 {
    let mut bytes = [0u8; 8];
    crate::crypto::fill_random(&mut bytes);
    (u64::from_le_bytes(bytes) >> 1).max(1)
}

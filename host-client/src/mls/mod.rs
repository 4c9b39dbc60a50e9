//! The MLS engine (RFC 9420): conversations as MLS groups, on openmls.
//!
//! Every conversation — a 1:1 chat is a group of two — is an MLS group. MLS gives what the
//! sealed envelope cannot: a fresh key per message (forward secrecy per message), healing after
//! a compromise at the next update of the compromised member (post-compromise security per
//! epoch), one membership every member agrees on (the roster), and a send cost that does not
//! grow with the group (one symmetric encryption and one signature, whatever the size).
//!
//! This module is the engine only: bytes in, bytes out, no network and no files. The client
//! will carry its output through the relay (KeyPackages to the directory, commits and
//! application messages to the group, Welcomes to joiners) and seal [`Conversation::to_bytes`]
//! with its storage key. What it does, in one place each:
//!
//! - [`identity`]: the MLS credential is bound to the Syncra identity. The signature key of a
//!   member's leaf *is* its Ed25519 identity key and the credential carries its user id, so
//!   `UserId::from_identity_key(signature_key) == claimed id` is checked for every member that
//!   enters a group ([`bound_user_id`]); safety numbers and key pinning apply unchanged.
//! - [`MlsIdentity`]: KeyPackages (one-time and last-resort), creating a conversation, joining
//!   one from a Welcome.
//! - [`Conversation`]: add, remove, self-update (each a commit), encrypt, process what arrives,
//!   the roster and the epoch, and the rebase of a commit that lost the race for an epoch.
//! - [`MlsError`]: one typed refusal per failure a caller must tell apart.
//!
//! What it must never do: accept a member whose credential is not bound to its key, let a
//! member change identity through an update, print a secret (the `Debug` impls show ids and
//! epochs only), or panic on bytes from a peer.
//!
//! The suite is fixed: [`CIPHERSUITE`], the primitives the project already names (X25519,
//! AES-128-GCM, SHA-256, Ed25519). Handshakes travel as `PrivateMessage`s too, so the relay
//! sees group id, epoch, content type and size, never who is added or removed.

mod conversation;
mod crypto;
mod error;
mod identity;
mod rejoin;
mod service;
mod state;
mod storage;

use openmls::prelude::{
    Ciphersuite, MlsGroupCreateConfig, MlsGroupJoinConfig, PURE_CIPHERTEXT_WIRE_FORMAT_POLICY,
    SenderRatchetConfiguration,
};
use openmls_rust_crypto::RustCrypto;
use openmls_traits::OpenMlsProvider;

pub use conversation::{
    CommitOutput, Conversation, ConversationId, FramedKind, Framing, Incoming, Intent,
    MemberKeyPackage, RosterEvent,
};
pub use error::{BindingError, MlsError};
pub use identity::{IdentitySigner, KeyPackageOutput, MlsIdentity, bound_user_id, credential_for};
pub use rejoin::RejoinRequest;
pub use service::{
    Arrival, Conversations, LEAF_UPDATE_INTERVAL_MS, ServiceError, SetAside, StateError,
};

/// The one ciphersuite Syncra speaks: DHKEM(X25519), AES-128-GCM, SHA-256, Ed25519.
///
/// Ed25519 is required: the leaf signature key is the Syncra identity key. X25519 and AES-GCM
/// are what the sealed envelope already uses, so no new primitive enters the product.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// Past epochs whose message keys a member keeps: none.
///
/// Keeping some would let an application message sent just before a commit still open after
/// it, but it costs on every message and grows with the group: openmls rewrites a kept
/// epoch's secret tree and member list to storage with each message sent or read (measured:
/// encrypting in a group of 100 went from flat to 5× slower with two epochs kept;
/// docs/BENCHMARKS.md). It also delays forward secrecy for those epochs. Instead the relay,
/// which knows each group's epoch, will refuse an application message made in an epoch the
/// group has left, and its sender encrypts it again after processing the commit; a message
/// from a left epoch that reaches a member anyway is refused as [`MlsError::OldEpoch`].
pub const PAST_EPOCHS_KEPT: usize = 0;

/// Application messages are padded to a multiple of this many bytes inside the ciphertext, so
/// the relay learns a size class, not a length (the sealed envelope's smallest bucket).
pub const PADDING: usize = 256;

/// How far out of order messages of one sender may arrive within an epoch, and how far ahead
/// of the last one a message may claim to be. The relay delivers in order, so the window is
/// for a member with several sessions, not for the network.
const OUT_OF_ORDER_TOLERANCE: u32 = 16;
const MAXIMUM_FORWARD_DISTANCE: u32 = 1000;

/// The bytes of a group id: 16 random bytes, chosen by the creator.
pub const GROUP_ID_LEN: usize = 16;

/// The crypto and the storage openmls works on: RustCrypto for the primitives (verification
/// through [`crypto::Crypto`], which keeps members' keys decoded) and one [`storage::Storage`]
/// per conversation (or per key-package store), which [`state`] serialises.
///
/// One storage per conversation, rather than one for everything, lets the client seal and
/// write each conversation on its own: a message in one chat rewrites that chat's state only.
#[derive(Default)]
pub(crate) struct Provider {
    crypto: crypto::Crypto,
    rand: RustCrypto,
    storage: storage::Storage,
}

impl Provider {
    pub(crate) fn with_storage(storage: storage::Storage) -> Self {
        Provider {
            storage,
            ..Provider::default()
        }
    }
}

impl OpenMlsProvider for Provider {
    type CryptoProvider = crypto::Crypto;
    type RandProvider = RustCrypto;
    type StorageProvider = storage::Storage;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        &self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        &self.rand
    }
}

fn sender_ratchet() -> SenderRatchetConfiguration {
    SenderRatchetConfiguration::new(OUT_OF_ORDER_TOLERANCE, MAXIMUM_FORWARD_DISTANCE)
}

/// The settings of a group this member creates.
pub(crate) fn create_config() -> MlsGroupCreateConfig {
    MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .padding_size(PADDING)
        .max_past_epochs(PAST_EPOCHS_KEPT)
        .sender_ratchet_configuration(sender_ratchet())
        // The Welcome carries the tree, so a joiner needs nothing but the Welcome.
        .use_ratchet_tree_extension(true)
        .build()
}

/// The same settings for a group this member joins.
pub(crate) fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .padding_size(PADDING)
        .max_past_epochs(PAST_EPOCHS_KEPT)
        .sender_ratchet_configuration(sender_ratchet())
        .use_ratchet_tree_extension(true)
        .build()
}

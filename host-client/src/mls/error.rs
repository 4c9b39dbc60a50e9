//! The refusals of the MLS engine, one variant for each thing a caller must tell apart.
//!
//! A caller decides by matching the variant, never by reading the words: a [`MlsError::FutureEpoch`]
//! means "fetch what you missed and retry", a [`MlsError::CommitLost`] means "drop it, the group
//! moved on", a [`MlsError::Tampered`] means "skip and report". Nothing from a peer is echoed
//! into a message except ids and epochs, which are printable by construction.

use syncra_core::id::UserId;

/// Why a credential is not accepted as a Syncra member.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BindingError {
    /// Only basic credentials carrying a user id are Syncra credentials.
    #[error("the credential is not a basic credential")]
    NotBasic,
    /// The basic credential's identity must be a 20-byte user id.
    #[error("the credential's identity is {0} bytes, a user id is 20")]
    IdentityLength(usize),
    /// The signature key must be a 32-byte Ed25519 key.
    #[error("the signature key is {0} bytes, an Ed25519 key is 32")]
    KeyLength(usize),
    /// The signature key belongs to another id than the credential claims.
    #[error("the credential claims user {claimed} but its signature key belongs to user {actual}")]
    KeyMismatch {
        /// The id in the credential.
        claimed: UserId,
        /// The id derived from the signature key.
        actual: UserId,
    },
}

/// Everything the engine refuses or fails at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MlsError {
    /// This member is not (or no longer) in the group: it was removed, or it never joined.
    #[error("not a member of this conversation (removed, or never joined)")]
    NotAMember,
    /// The message belongs to another group.
    #[error("the message is for another conversation")]
    WrongGroup,
    /// The message is from an epoch this member no longer has keys for (or never had: it joined
    /// later). Nothing to retry: the keys are gone on purpose.
    #[error(
        "the message is from epoch {message}, this conversation is at epoch {current} and keeps no keys for it"
    )]
    OldEpoch {
        /// The message's epoch.
        message: u64,
        /// This member's epoch.
        current: u64,
    },
    /// The message is from an epoch this member has not reached: commits are missing. Process
    /// the missing commits in order, then this message again.
    #[error(
        "the message is from epoch {message}, this conversation is only at epoch {current}; process the commits before it first"
    )]
    FutureEpoch {
        /// The message's epoch.
        message: u64,
        /// This member's epoch.
        current: u64,
    },
    /// A commit for an epoch the group already left: another commit won that epoch. Its author
    /// rebases ([`crate::mls::Conversation::retry`]); everyone else drops it.
    #[error(
        "a commit for epoch {commit_epoch} lost: the conversation already moved to epoch {current}"
    )]
    CommitLost {
        /// The epoch the commit was made in.
        commit_epoch: u64,
        /// This member's epoch.
        current: u64,
    },
    /// The message failed authentication: its ciphertext, header or signature was changed.
    #[error("the message was tampered with (authentication failed)")]
    Tampered,
    /// The message's key was already used (or discarded): a replay, or a copy delayed past the
    /// out-of-order window.
    #[error("the message was already received (replay)")]
    Replayed,
    /// The sender's leaf is not in the group's tree.
    #[error("the sender is not a member of this conversation")]
    UnknownSender,
    /// A member's credential is not bound to its key.
    #[error("a member's credential is not bound to its key: {0}")]
    Unbound(#[from] BindingError),
    /// A commit would change the identity behind an existing leaf; a person does not become
    /// someone else by updating their keys.
    #[error("a commit would change member {before} into {after}; refused")]
    IdentityChanged {
        /// Who held the leaf.
        before: UserId,
        /// Who the commit says holds it now.
        after: UserId,
    },
    /// The bytes are not an MLS message of the expected kind.
    #[error("not a valid MLS {expected}")]
    Malformed {
        /// What was expected (`message`, `Welcome`, `KeyPackage`, `state`).
        expected: &'static str,
    },
    /// A well-formed MLS message this engine does not accept here (a standalone proposal, an
    /// external commit, a message echoed back to its author).
    #[error("refused: {0}")]
    Unsupported(&'static str),
    /// The Welcome is not for any KeyPackage of this member (or that KeyPackage was already used).
    #[error("the Welcome is for none of this member's unused KeyPackages")]
    NoMatchingKeyPackage,
    /// The group, Welcome or KeyPackage uses a ciphersuite other than [`crate::mls::CIPHERSUITE`].
    #[error("unsupported ciphersuite {0}")]
    Ciphersuite(u16),
    /// A group id must be 16 bytes: it becomes a file name and a relay key.
    #[error("a conversation id must be 16 bytes, this one is {0}")]
    GroupIdLength(usize),
    /// A commit is already waiting for the relay's verdict; settle it first
    /// ([`crate::mls::Conversation::commit_accepted`] or
    /// [`crate::mls::Conversation::commit_rejected`]).
    #[error("a commit of this member is still waiting for the relay's verdict")]
    CommitPending,
    /// There is no commit of this member waiting.
    #[error("no commit of this member is waiting")]
    NoPendingCommit,
    /// The change asked for does nothing (adding members who are in, removing members who are
    /// not, an empty list).
    #[error("nothing to change: {0}")]
    NothingToDo(&'static str),
    /// Adding someone who is already a member (or twice in one commit).
    #[error("user {0} is already a member of this conversation")]
    AlreadyMember(UserId),
    /// Removing someone who is not a member.
    #[error("user {0} is not a member of this conversation")]
    NotInConversation(UserId),
    /// A rejoin request that does not hold: a bad signature, or it names a leaf of the
    /// member that is not the one in the group now (made before a rejoin that already
    /// happened, or replayed), or it comes from a member whose copy is not behind.
    #[error("rejoin request refused: {0}")]
    BadRejoin(&'static str),
    /// A rejoin request naming a leaf of its member that the group no longer holds: made
    /// before a rejoin that already happened (another member answered it first), or replayed.
    #[error(
        "rejoin request refused: it names a leaf the member no longer has (answered already, or replayed)"
    )]
    StaleRejoin,
    /// The message is invalid for a reason MLS defines that none of the above names.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// The commit is invalid for a reason MLS defines (bad path, bad proposal).
    #[error("invalid commit: {0}")]
    InvalidCommit(String),
    /// The Welcome could not be used (bad signature, tree mismatch, unsupported extension).
    #[error("invalid Welcome: {0}")]
    InvalidWelcome(String),

    /// A Welcome that would replace this member's copy of a conversation was made by someone
    /// who was not a member of it: only a member can let someone back in. (A relay that knows
    /// a group's id could otherwise build a group of its own under that id, with the real
    /// members' published KeyPackages and a leaf of its own, and take the conversation over.)
    #[error(
        "a Welcome to conversation {conversation} from {sender}, who is not a member of it; \
         ignored (only a member can let someone back in)"
    )]
    WelcomeFromOutsider {
        /// The conversation it would have replaced.
        conversation: super::ConversationId,
        /// Who made it.
        sender: UserId,
    },
    /// The KeyPackage is invalid (bad signature, expired, wrong suite).
    #[error("invalid KeyPackage: {0}")]
    InvalidKeyPackage(String),
    /// openmls failed on our side (storage, codec, a library invariant).
    #[error("MLS engine failure while {op}: {detail}")]
    Internal {
        /// What the engine was doing.
        op: &'static str,
        /// The library's account of it.
        detail: String,
    },
}

impl MlsError {
    /// An internal failure, with the library's error kept as text: openmls errors are generic
    /// over the storage and would leak that type into every signature.
    pub(crate) fn internal(op: &'static str, e: impl std::fmt::Display) -> Self {
        MlsError::Internal {
            op,
            detail: e.to_string(),
        }
    }
}

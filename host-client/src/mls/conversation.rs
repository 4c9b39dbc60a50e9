//! One conversation: an MLS group as seen by one member.
//!
//! A conversation moves through epochs. Each commit (add, remove, self-update) ends an epoch;
//! application messages are encrypted under the current one. The relay accepts exactly one
//! commit per epoch, so the life of a commit this member makes is:
//!
//! ```text
//!   add / remove / update ──▶ pending ──relay accepts──▶ commit_accepted()  (epoch + 1)
//!                                │
//!                                ├──relay refuses (another commit won)──▶ commit_rejected()
//!                                │        ──▶ process the winner ──▶ retry(intent)
//!                                └──the winner arrives first──▶ process() reports the
//!                                         discarded intent ──▶ retry(intent)
//! ```
//!
//! While a commit is pending, this member still sends and receives in the current epoch; it
//! cannot make a second commit. [`Conversation::process`] checks the epoch before handing a
//! message to openmls, so a caller learns by the error's kind whether to wait for missing
//! commits ([`MlsError::FutureEpoch`]), drop a commit that lost ([`MlsError::CommitLost`]) or
//! give up on a message whose keys are gone ([`MlsError::OldEpoch`]).
//!
//! Identity checks happen before a commit is merged: every leaf it adds must be bound to its
//! key, and a leaf it replaces (an update) must stay the same user. Only add, remove and update
//! proposals are accepted, only from members.

use std::fmt;
use std::sync::Arc;

use data_encoding::BASE32_NOPAD;
use openmls::framing::errors::{MessageDecryptionError, SecretTreeError};
use openmls::prelude::{
    ContentType, GroupId, KeyPackage, LeafNode, LeafNodeIndex, LeafNodeParameters, MlsGroup,
    MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, ProcessMessageError, ProcessedMessageContent,
    Proposal, ProtocolVersion, Sender, StagedCommit, ValidationError, tls_codec::DeserializeBytes,
};
use openmls::prelude::{ExportSecretError, MlsGroupStateError};
use openmls::treesync::EncryptionKey;
use openmls_rust_crypto::RustCrypto;
use syncra_core::id::UserId;
use zeroize::Zeroizing;

use super::error::MlsError;
use super::identity::{IdentitySigner, MlsIdentity, bound_user_id};
use super::rejoin::RejoinRequest;
use super::storage::StorageError;
use super::{CIPHERSUITE, GROUP_ID_LEN, Provider, state};

/// A conversation's id: the MLS group id, 16 random bytes. Printed as 26 lowercase base32
/// characters, safe as a file name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConversationId([u8; GROUP_ID_LEN]);

impl ConversationId {
    /// The raw bytes (what the relay keys a group by).
    pub fn as_bytes(&self) -> &[u8; GROUP_ID_LEN] {
        &self.0
    }

    /// The id for raw bytes (as a carriage names a group).
    pub fn from_bytes(bytes: [u8; GROUP_ID_LEN]) -> Self {
        ConversationId(bytes)
    }

    /// Whether its creator made it as a named group rather than a 1:1 chat: the top bit of
    /// the first byte (docs/PROTOCOL.md §9.8). Part of the group id, so it is in the group
    /// context every member signs and agrees on; a 1:1 chat is treated as one only while its
    /// roster is exactly two people.
    pub fn is_group(&self) -> bool {
        self.0[0] & 0x80 != 0
    }

    /// As 32 lowercase hex characters (the client's group ids and history file names).
    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }

    /// From 32 lowercase hex characters.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let bytes = data_encoding::HEXLOWER.decode(hex.as_bytes()).ok()?;
        bytes.try_into().ok().map(ConversationId)
    }

    fn of(group_id: &GroupId) -> Result<Self, MlsError> {
        let bytes = group_id.as_slice();
        bytes
            .try_into()
            .map(ConversationId)
            .map_err(|_| MlsError::GroupIdLength(bytes.len()))
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE32_NOPAD.encode(&self.0).to_ascii_lowercase())
    }
}

impl fmt::Debug for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConversationId({self})")
    }
}

/// A validated KeyPackage of a Syncra user, ready to add to a conversation.
#[derive(Clone)]
pub struct MemberKeyPackage {
    user_id: UserId,
    key_package: KeyPackage,
}

impl MemberKeyPackage {
    /// Parses a KeyPackage from the directory and checks it: its signature, its suite, and
    /// that its credential is bound to its key. Pass the id the directory was asked for; a
    /// package for anyone else is refused.
    pub fn from_bytes(bytes: &[u8], expected: UserId) -> Result<Self, MlsError> {
        let package = Self::from_bytes_of_anyone(bytes)?;
        if package.user_id != expected {
            return Err(MlsError::InvalidKeyPackage(format!(
                "it belongs to user {}, not to {expected}",
                package.user_id
            )));
        }
        Ok(package)
    }

    /// [`MemberKeyPackage::from_bytes`] for a package whose owner is not known in advance
    /// (a rejoin request carries its sender's own): the same checks, whoever it belongs to.
    pub(crate) fn from_bytes_of_anyone(bytes: &[u8]) -> Result<Self, MlsError> {
        let message =
            MlsMessageIn::tls_deserialize_exact_bytes(bytes).map_err(|_| MlsError::Malformed {
                expected: "KeyPackage",
            })?;
        let MlsMessageBodyIn::KeyPackage(key_package) = message.extract() else {
            return Err(MlsError::Malformed {
                expected: "KeyPackage",
            });
        };
        let key_package = key_package
            .validate(&RustCrypto::default(), ProtocolVersion::Mls10)
            .map_err(|e| MlsError::InvalidKeyPackage(e.to_string()))?;
        if key_package.ciphersuite() != CIPHERSUITE {
            return Err(MlsError::Ciphersuite(key_package.ciphersuite().into()));
        }
        let user_id = leaf_user(key_package.leaf_node())?;
        Ok(MemberKeyPackage {
            user_id,
            key_package,
        })
    }

    /// Whose package it is.
    pub fn user_id(&self) -> UserId {
        self.user_id
    }

    /// Its signature key: its owner's Ed25519 identity key (bound to the id when parsed).
    pub(crate) fn signature_key(&self) -> &[u8] {
        self.key_package.leaf_node().signature_key().as_slice()
    }
}

impl fmt::Debug for MemberKeyPackage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemberKeyPackage({})", self.user_id)
    }
}

/// What a commit of this member meant to do, kept so that a commit that lost the race for an
/// epoch can be made again on top of the winner ([`Conversation::retry`]).
#[derive(Debug, Clone)]
pub enum Intent {
    /// Add these members.
    Add(Vec<MemberKeyPackage>),
    /// Remove these members.
    Remove(Vec<UserId>),
    /// Refresh this member's own leaf (post-compromise healing).
    Update,
    /// Let a member whose copy fell behind back in: its leaf (`leaf_key`, as its request
    /// named it) removed and `package` added, in one commit ([`super::rejoin`]).
    Readmit {
        /// The member's new KeyPackage.
        package: Box<MemberKeyPackage>,
        /// The encryption key of the leaf it replaces.
        leaf_key: Vec<u8>,
    },
}

/// A commit this member made, to hand to the relay.
#[derive(Clone)]
pub struct CommitOutput {
    /// The commit, for every current member (the relay accepts one per epoch).
    pub commit: Vec<u8>,
    /// The Welcome for the members it adds, delivered only once the relay accepted the commit.
    pub welcome: Option<Vec<u8>>,
    /// The epoch the commit was made in: what the relay compares with its own.
    pub epoch: u64,
}

impl fmt::Debug for CommitOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommitOutput")
            .field("epoch", &self.epoch)
            .field("commit_len", &self.commit.len())
            .field("welcome_len", &self.welcome.as_ref().map(Vec::len))
            .finish()
    }
}

/// A change of membership, as the people in the conversation should see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RosterEvent {
    /// `by` added `member`.
    Added {
        /// Who committed the change.
        by: UserId,
        /// Who is new.
        member: UserId,
    },
    /// `by` removed `member`.
    Removed {
        /// Who committed the change.
        by: UserId,
        /// Who is gone.
        member: UserId,
    },
    /// `by` let `member` back in: its copy had fallen behind, its old leaf was replaced by a
    /// fresh one ([`super::rejoin`]).
    Rejoined {
        /// Who committed it.
        by: UserId,
        /// Who is back.
        member: UserId,
    },
    /// `member` replaced its leaf keys (nothing changes for the people, the keys heal).
    Updated {
        /// Whose keys changed.
        member: UserId,
    },
}

impl fmt::Display for RosterEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RosterEvent::Added { by, member } => write!(f, "{by} added {member}"),
            RosterEvent::Removed { by, member } => write!(f, "{by} removed {member}"),
            RosterEvent::Rejoined { by, member } => write!(f, "{by} let {member} back in"),
            RosterEvent::Updated { member } => write!(f, "{member} updated their keys"),
        }
    }
}

/// What an incoming message turned out to be.
pub enum Incoming {
    /// An application message.
    Message {
        /// Its sender, checked against the sender's leaf.
        sender: UserId,
        /// The plaintext (padding removed).
        plaintext: Zeroizing<Vec<u8>>,
        /// The epoch it was sent in.
        epoch: u64,
    },
    /// A commit, merged: the conversation is now at `epoch`.
    Commit {
        /// Who committed it.
        by: UserId,
        /// The membership changes it made, in order.
        events: Vec<RosterEvent>,
        /// The new epoch.
        epoch: u64,
        /// This member was removed: the conversation is over for it.
        removed_me: bool,
        /// This member's own pending commit, discarded because this one won the epoch; hand it
        /// to [`Conversation::retry`].
        discarded: Option<Intent>,
    },
    /// A member asked to leave (a proposal removing itself), kept until a commit: any member
    /// commits it with [`Conversation::commit_pending`]. A commit that does not include it
    /// drops it (the epoch it was made in is over); the member then asks again.
    LeaveRequest {
        /// Who wants to leave.
        member: UserId,
    },
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The plaintext stays out of logs.
            Incoming::Message {
                sender,
                plaintext,
                epoch,
            } => f
                .debug_struct("Message")
                .field("sender", sender)
                .field("len", &plaintext.len())
                .field("epoch", epoch)
                .finish(),
            Incoming::Commit {
                by,
                events,
                epoch,
                removed_me,
                discarded,
            } => f
                .debug_struct("Commit")
                .field("by", by)
                .field("events", events)
                .field("epoch", epoch)
                .field("removed_me", removed_me)
                .field("discarded", discarded)
                .finish(),
            Incoming::LeaveRequest { member } => f
                .debug_struct("LeaveRequest")
                .field("member", member)
                .finish(),
        }
    }
}

/// What an MLS message says about itself in the clear (RFC 9420 §6: group id, epoch and
/// content type are plaintext even in a `PrivateMessage`). A client compares it with what the
/// carriage declared to the relay before processing, so a commit cannot pass the relay's
/// one-commit-per-epoch rule under another name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// The group id.
    pub group: [u8; GROUP_ID_LEN],
    /// The epoch it was made in.
    pub epoch: u64,
    /// What it is.
    pub kind: FramedKind,
}

/// The content type of an MLS message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramedKind {
    /// An application message.
    Application,
    /// A commit.
    Commit,
    /// A proposal.
    Proposal,
}

impl Framing {
    /// Reads the clear framing of a group message (not a Welcome or KeyPackage).
    pub fn of(bytes: &[u8]) -> Result<Framing, MlsError> {
        let message =
            MlsMessageIn::tls_deserialize_exact_bytes(bytes).map_err(|_| MlsError::Malformed {
                expected: "message",
            })?;
        let message = message
            .try_into_protocol_message()
            .map_err(|_| MlsError::Unsupported("a Welcome, GroupInfo or KeyPackage here"))?;
        let group = ConversationId::of(message.group_id())?.0;
        Ok(Framing {
            group,
            epoch: message.epoch().as_u64(),
            kind: match message.content_type() {
                ContentType::Application => FramedKind::Application,
                ContentType::Commit => FramedKind::Commit,
                ContentType::Proposal => FramedKind::Proposal,
            },
        })
    }
}

/// The user behind a leaf node.
fn leaf_user(leaf: &LeafNode) -> Result<UserId, MlsError> {
    Ok(bound_user_id(
        leaf.credential(),
        leaf.signature_key().as_slice(),
    )?)
}

/// How many readmissions a conversation remembers ([`Readmitted`]).
const READMISSIONS_KEPT: usize = 32;

/// A member let back in ([`super::rejoin`]): the leaf key its stuck copy knew and the one it
/// came back with. Kept with the group's state, so that a member whose Welcome was lost can ask
/// again naming the leaf its copy still knows, while a request whose package was used (a
/// replay, or one answered already) stays stale.
#[derive(serde::Serialize, serde::Deserialize)]
struct Readmitted {
    user: UserId,
    from: Vec<u8>,
    to: Vec<u8>,
}

/// One MLS group as seen by this member: its state, its storage and the signer.
pub struct Conversation {
    id: ConversationId,
    group: MlsGroup,
    provider: Provider,
    signer: Arc<IdentitySigner>,
}

impl fmt::Debug for Conversation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conversation")
            .field("id", &self.id)
            .field("epoch", &self.epoch())
            .field("me", &self.signer.user_id())
            .finish()
    }
}

impl Conversation {
    pub(crate) fn new(group: MlsGroup, provider: Provider, signer: Arc<IdentitySigner>) -> Self {
        // Ids are checked where a group enters (created with 16 bytes, joined after a check).
        let mut id = [0u8; GROUP_ID_LEN];
        let raw = group.group_id().as_slice();
        if raw.len() == GROUP_ID_LEN {
            id.copy_from_slice(raw);
        }
        Conversation {
            id: ConversationId(id),
            group,
            provider,
            signer,
        }
    }

    /// The conversation's id.
    pub fn id(&self) -> ConversationId {
        self.id
    }

    /// The current epoch: how many commits the group has merged.
    pub fn epoch(&self) -> u64 {
        self.group.epoch().as_u64()
    }

    /// Whether this member is still in the group (false once a commit removed it).
    pub fn is_active(&self) -> bool {
        self.group.is_active()
    }

    /// The RFC 9420 exporter of the current epoch (§8.5, `MLS-Exporter(label, context, len)`):
    /// a value every member of this epoch derives alike from the epoch's key schedule and
    /// nobody else can compute. An application keys something of its own to the group with
    /// it (a distinct label for each use); tests compare it to show who holds an epoch's
    /// secrets. Every commit changes it.
    ///
    /// Refused with [`MlsError::NotAMember`] once a commit removed this member: openmls merges
    /// only the public tree of a commit that removes it (the path secrets are not encrypted to
    /// it), so its copy holds no secrets of the epoch that commit began.
    pub fn export_secret(
        &self,
        label: &str,
        context: &[u8],
        len: u16,
    ) -> Result<Zeroizing<Vec<u8>>, MlsError> {
        self.group
            .export_secret(&self.provider.crypto, label, context, len.into())
            .map(Zeroizing::new)
            .map_err(|e| match e {
                ExportSecretError::GroupStateError(MlsGroupStateError::UseAfterEviction) => {
                    MlsError::NotAMember
                }
                other => MlsError::internal("exporting a secret", other),
            })
    }

    /// The members, in leaf order: the membership every member agrees on.
    pub fn roster(&self) -> Result<Vec<UserId>, MlsError> {
        self.group
            .members()
            .map(|m| Ok(bound_user_id(&m.credential, &m.signature_key)?))
            .collect()
    }

    /// Whether `user` is a member.
    pub fn contains(&self, user: UserId) -> bool {
        self.leaf_of(user).is_some()
    }

    fn leaf_of(&self, user: UserId) -> Option<LeafNodeIndex> {
        self.group
            .members()
            .find(|m| bound_user_id(&m.credential, &m.signature_key) == Ok(user))
            .map(|m| m.index)
    }

    fn user_at(&self, leaf: LeafNodeIndex) -> Result<UserId, MlsError> {
        let member = self.group.member_at(leaf).ok_or(MlsError::UnknownSender)?;
        Ok(bound_user_id(&member.credential, &member.signature_key)?)
    }

    fn ensure_can_commit(&self) -> Result<(), MlsError> {
        if !self.group.is_active() {
            return Err(MlsError::NotAMember);
        }
        if self.group.pending_commit().is_some() {
            return Err(MlsError::CommitPending);
        }
        Ok(())
    }

    fn output(
        &self,
        epoch: u64,
        commit: MlsMessageOut,
        welcome: Option<MlsMessageOut>,
    ) -> Result<CommitOutput, MlsError> {
        let commit = commit
            .to_bytes()
            .map_err(|e| MlsError::internal("encoding a commit", e))?;
        let welcome = welcome
            .map(|w| w.to_bytes())
            .transpose()
            .map_err(|e| MlsError::internal("encoding a Welcome", e))?;
        Ok(CommitOutput {
            commit,
            welcome,
            epoch,
        })
    }

    /// Adds members from their KeyPackages: a commit for the group and a Welcome for them.
    ///
    /// The commit is pending until the relay's verdict ([`Conversation::commit_accepted`]).
    pub fn add(&mut self, members: &[MemberKeyPackage]) -> Result<CommitOutput, MlsError> {
        self.ensure_can_commit()?;
        if members.is_empty() {
            return Err(MlsError::NothingToDo("no one to add"));
        }
        for (i, m) in members.iter().enumerate() {
            if self.contains(m.user_id) || members[..i].iter().any(|o| o.user_id == m.user_id) {
                return Err(MlsError::AlreadyMember(m.user_id));
            }
        }
        let epoch = self.epoch();
        let packages: Vec<KeyPackage> = members.iter().map(|m| m.key_package.clone()).collect();
        let (commit, welcome, _) = self
            .group
            .add_members(&self.provider, self.signer.as_ref(), &packages)
            .map_err(|e| MlsError::InvalidCommit(e.to_string()))?;
        self.output(epoch, commit, Some(welcome))
    }

    /// Removes members: a commit that leaves them without the keys of every later epoch.
    ///
    /// Leaving oneself is not a commit one can make (MLS: another member commits the removal).
    pub fn remove(&mut self, members: &[UserId]) -> Result<CommitOutput, MlsError> {
        self.ensure_can_commit()?;
        if members.is_empty() {
            return Err(MlsError::NothingToDo("no one to remove"));
        }
        let me = self.signer.user_id();
        let mut leaves = Vec::with_capacity(members.len());
        for &user in members {
            if user == me {
                return Err(MlsError::Unsupported(
                    "removing oneself; another member commits a departure",
                ));
            }
            let leaf = self
                .leaf_of(user)
                .ok_or(MlsError::NotInConversation(user))?;
            if !leaves.contains(&leaf) {
                leaves.push(leaf);
            }
        }
        let epoch = self.epoch();
        let (commit, welcome, _) = self
            .group
            .remove_members(&self.provider, self.signer.as_ref(), &leaves)
            .map_err(|e| MlsError::InvalidCommit(e.to_string()))?;
        self.output(epoch, commit, welcome)
    }

    /// Replaces this member's leaf keys. After the group processed it, a copy of this member's
    /// earlier state no longer opens anything: the post-compromise healing step, to run on a
    /// schedule and after a key rotation.
    pub fn update(&mut self) -> Result<CommitOutput, MlsError> {
        self.ensure_can_commit()?;
        let epoch = self.epoch();
        let bundle = self
            .group
            .self_update(
                &self.provider,
                self.signer.as_ref(),
                LeafNodeParameters::default(),
            )
            .map_err(|e| MlsError::InvalidCommit(e.to_string()))?;
        let (commit, welcome, _) = bundle.into_contents();
        let welcome = welcome.map(|w| MlsMessageOut::from_welcome(w, ProtocolVersion::Mls10));
        self.output(epoch, commit, welcome)
    }

    /// Asks to leave: a proposal removing this member, for the others; one of them commits it
    /// ([`Conversation::commit_pending`]). Until then this member is still in.
    pub fn leave(&mut self) -> Result<Vec<u8>, MlsError> {
        if !self.group.is_active() {
            return Err(MlsError::NotAMember);
        }
        let proposal = self
            .group
            .leave_group(&self.provider, self.signer.as_ref())
            .map_err(|e| MlsError::internal("asking to leave", e))?;
        proposal
            .to_bytes()
            .map_err(|e| MlsError::internal("encoding a proposal", e))
    }

    /// Who asked to leave in this epoch and is not out yet.
    pub fn leave_requests(&self) -> Vec<UserId> {
        self.group
            .pending_proposals()
            .filter_map(|p| match p.proposal() {
                Proposal::Remove(remove) => self.user_at(remove.removed()).ok(),
                _ => None,
            })
            .collect()
    }

    /// Commits the leave requests received in this epoch: those members are out after it.
    pub fn commit_pending(&mut self) -> Result<CommitOutput, MlsError> {
        self.ensure_can_commit()?;
        let me = self.signer.user_id();
        let leaving = self.leave_requests();
        if leaving.is_empty() {
            return Err(MlsError::NothingToDo("no leave request to commit"));
        }
        if leaving.contains(&me) {
            return Err(MlsError::Unsupported(
                "committing one's own departure; another member commits it",
            ));
        }
        let epoch = self.epoch();
        let (commit, welcome, _) = self
            .group
            .commit_to_pending_proposals(&self.provider, self.signer.as_ref())
            .map_err(|e| MlsError::InvalidCommit(e.to_string()))?;
        self.output(epoch, commit, welcome)
    }

    /// What this member's pending commit meant to do, if one is pending.
    pub fn pending_intent(&self) -> Option<Intent> {
        self.group
            .pending_commit()
            .map(|staged| self.intent_of(staged))
    }

    /// Who is in the group once this member's pending commit is merged, in leaf order: the
    /// roster without the leaves the commit removes, then the members it adds. Read from the
    /// staged commit itself, so leave requests it carries beside an addition count too (what
    /// the relay is told; [`Self::pending_intent`] names only the change this member asked
    /// for). `None` when no commit is pending.
    pub fn roster_after_pending(&self) -> Result<Option<Vec<UserId>>, MlsError> {
        let Some(staged) = self.group.pending_commit() else {
            return Ok(None);
        };
        let removed: Vec<LeafNodeIndex> = staged
            .remove_proposals()
            .map(|p| p.remove_proposal().removed())
            .collect();
        let mut after = Vec::new();
        for member in self.group.members() {
            if !removed.contains(&member.index) {
                after.push(bound_user_id(&member.credential, &member.signature_key)?);
            }
        }
        for add in staged.add_proposals() {
            after.push(leaf_user(add.add_proposal().key_package().leaf_node())?);
        }
        Ok(Some(after))
    }

    fn intent_of(&self, staged: &StagedCommit) -> Intent {
        // The change this member asked for: one kind each (a readmission removes and adds the
        // same member). A commit also carries the leave requests queued when it was made; they
        // are not part of the intent (a rebase finds them queued again or gone) but are part of
        // its outcome ([`Self::roster_after_pending`]). The packages were validated when they
        // were added, so a failing one cannot occur and is skipped.
        let adds: Vec<MemberKeyPackage> = staged
            .add_proposals()
            .filter_map(|p| {
                let key_package = p.add_proposal().key_package().clone();
                leaf_user(key_package.leaf_node())
                    .ok()
                    .map(|user_id| MemberKeyPackage {
                        user_id,
                        key_package,
                    })
            })
            .collect();
        let removed_leaves: Vec<LeafNodeIndex> = staged
            .remove_proposals()
            .map(|p| p.remove_proposal().removed())
            .collect();
        if let ([package], [leaf]) = (adds.as_slice(), removed_leaves.as_slice())
            && let Some(member) = self.group.member_at(*leaf)
            && bound_user_id(&member.credential, &member.signature_key) == Ok(package.user_id)
        {
            return Intent::Readmit {
                package: Box::new(package.clone()),
                leaf_key: member.encryption_key,
            };
        }
        if !adds.is_empty() {
            return Intent::Add(adds);
        }
        let removes: Vec<UserId> = staged
            .remove_proposals()
            .filter_map(|p| self.user_at(p.remove_proposal().removed()).ok())
            .collect();
        if !removes.is_empty() {
            return Intent::Remove(removes);
        }
        Intent::Update
    }

    /// The relay accepted this member's pending commit: move to the next epoch.
    pub fn commit_accepted(&mut self) -> Result<u64, MlsError> {
        let Some(pending) = self.group.pending_commit() else {
            return Err(MlsError::NoPendingCommit);
        };
        let returns = self.readmissions_in(pending);
        self.group
            .merge_pending_commit(&self.provider)
            .map_err(|e| MlsError::internal("merging our commit", e))?;
        self.remember_readmissions(returns)?;
        Ok(self.epoch())
    }

    /// The relay refused this member's pending commit (another won the epoch): drop it and get
    /// back what it meant to do, to [`Conversation::retry`] once the winner is processed.
    pub fn commit_rejected(&mut self) -> Result<Intent, MlsError> {
        let intent = self.pending_intent().ok_or(MlsError::NoPendingCommit)?;
        self.group
            .clear_pending_commit(&self.provider.storage)
            .map_err(|e| MlsError::internal("dropping our commit", e))?;
        Ok(intent)
    }

    /// Makes a lost commit again on the current epoch, minus what the winner already did
    /// (members it added, members it removed). `None` when nothing is left to do.
    pub fn retry(&mut self, intent: Intent) -> Result<Option<CommitOutput>, MlsError> {
        match intent {
            Intent::Add(members) => {
                let left: Vec<MemberKeyPackage> = members
                    .into_iter()
                    .filter(|m| !self.contains(m.user_id))
                    .collect();
                if left.is_empty() {
                    return Ok(None);
                }
                self.add(&left).map(Some)
            }
            Intent::Remove(users) => {
                let left: Vec<UserId> = users.into_iter().filter(|u| self.contains(*u)).collect();
                if left.is_empty() {
                    return Ok(None);
                }
                self.remove(&left).map(Some)
            }
            Intent::Update => self.update().map(Some),
            Intent::Readmit { package, leaf_key } => match self.readmit_leaf(&package, &leaf_key) {
                Ok(out) => Ok(Some(out)),
                // The winner let them back in already (or removed them).
                Err(MlsError::StaleRejoin | MlsError::NotInConversation(_)) => Ok(None),
                Err(e) => Err(e),
            },
        }
    }

    /// The public encryption key of this member's own leaf (what a rejoin request names).
    pub fn own_leaf_key(&self) -> Option<Vec<u8>> {
        let me = self.group.own_leaf_index();
        self.group
            .members()
            .find(|m| m.index == me)
            .map(|m| m.encryption_key)
    }

    /// Whether a rejoin request holds against this copy of the conversation: for this group,
    /// from another member who is in it, whose copy is behind ours, naming the leaf the group
    /// holds for it now ([`super::rejoin`]).
    pub fn check_rejoin(&self, request: &RejoinRequest) -> Result<(), MlsError> {
        self.rejoin_leaf(request).map(drop)
    }

    /// [`Conversation::check_rejoin`], answering the leaf the request names.
    fn rejoin_leaf(&self, request: &RejoinRequest) -> Result<LeafNodeIndex, MlsError> {
        if request.group != self.id {
            return Err(MlsError::WrongGroup);
        }
        if !self.group.is_active() {
            return Err(MlsError::NotAMember);
        }
        let user = request.package.user_id();
        if user == self.signer.user_id() {
            return Err(MlsError::BadRejoin("it is this member's own"));
        }
        if request.epoch >= self.epoch() {
            return Err(MlsError::BadRejoin(
                "its sender's copy is not behind this one",
            ));
        }
        self.leaf_named(&request.package, &request.leaf_key)
    }

    /// The leaf of `package`'s owner, if `leaf_key` names it: its encryption key now, or one
    /// the owner left when let back in before while `package` was not used since — that
    /// return's Welcome never reached the owner, whose copy still knows the old leaf
    /// ([`super::rejoin`], "A lost Welcome").
    fn leaf_named(
        &self,
        package: &MemberKeyPackage,
        leaf_key: &[u8],
    ) -> Result<LeafNodeIndex, MlsError> {
        let user = package.user_id();
        let member = self
            .group
            .members()
            .find(|m| bound_user_id(&m.credential, &m.signature_key) == Ok(user))
            .ok_or(MlsError::NotInConversation(user))?;
        if member.encryption_key == leaf_key {
            return Ok(member.index);
        }
        let returns = self.readmissions()?;
        let left_before = returns
            .iter()
            .any(|r| r.user == user && r.from.as_slice() == leaf_key);
        let new_leaf = package.key_package.leaf_node().encryption_key();
        let is_new_leaf = |key: &[u8]| EncryptionKey::from(key.to_vec()) == *new_leaf;
        let used = is_new_leaf(&member.encryption_key)
            || returns.iter().any(|r| r.user == user && is_new_leaf(&r.to));
        if left_before && !used {
            return Ok(member.index);
        }
        Err(MlsError::StaleRejoin)
    }

    /// The members let back in, the last [`READMISSIONS_KEPT`], oldest first.
    fn readmissions(&self) -> Result<Vec<Readmitted>, MlsError> {
        Ok(self
            .provider
            .storage
            .readmissions(self.id.as_bytes())
            .map_err(|e| MlsError::internal("reading who was let back in", e))?
            .unwrap_or_default())
    }

    /// The readmissions a commit makes: each member it removes and adds back, with the leaf
    /// key removed. Read before the commit is merged (the removed leaves are still in the
    /// tree); [`Conversation::remember_readmissions`] adds the leaf keys added, once merged.
    fn readmissions_in(&self, staged: &StagedCommit) -> Vec<(UserId, Vec<u8>)> {
        let mut removed = Vec::new();
        let mut added = Vec::new();
        for queued in staged.queued_proposals() {
            match queued.proposal() {
                Proposal::Remove(remove) => {
                    if let Some(m) = self.group.member_at(remove.removed())
                        && let Ok(user) = bound_user_id(&m.credential, &m.signature_key)
                    {
                        removed.push((user, m.encryption_key));
                    }
                }
                Proposal::Add(add) => {
                    if let Ok(user) = leaf_user(add.key_package().leaf_node()) {
                        added.push(user);
                    }
                }
                _ => {}
            }
        }
        removed.retain(|(user, _)| added.contains(user));
        removed
    }

    /// Keeps the readmissions of a merged commit (the last [`READMISSIONS_KEPT`]), each with
    /// the leaf its member has now.
    fn remember_readmissions(&mut self, returns: Vec<(UserId, Vec<u8>)>) -> Result<(), MlsError> {
        if returns.is_empty() {
            return Ok(());
        }
        let mut all = self.readmissions()?;
        for (user, from) in returns {
            let to = self
                .group
                .members()
                .find(|m| bound_user_id(&m.credential, &m.signature_key) == Ok(user))
                .map(|m| m.encryption_key);
            if let Some(to) = to {
                all.push(Readmitted { user, from, to });
            }
        }
        let excess = all.len().saturating_sub(READMISSIONS_KEPT);
        all.drain(..excess);
        self.provider
            .storage
            .write_readmissions(self.id.as_bytes(), &all)
            .map_err(|e| MlsError::internal("keeping who was let back in", e))
    }

    /// Lets the member behind a valid rejoin request back in: one commit removing its stuck
    /// leaf and adding its new KeyPackage, and the Welcome for it. Pending until the relay's
    /// verdict, like every commit.
    pub fn readmit(&mut self, request: &RejoinRequest) -> Result<CommitOutput, MlsError> {
        let leaf = self.rejoin_leaf(request)?;
        self.commit_readmission(&request.package, leaf)
    }

    /// A readmission made again on the epoch that beat it: if the leaf is still the one named.
    fn readmit_leaf(
        &mut self,
        package: &MemberKeyPackage,
        leaf_key: &[u8],
    ) -> Result<CommitOutput, MlsError> {
        let leaf = self.leaf_named(package, leaf_key)?;
        self.commit_readmission(package, leaf)
    }

    /// One commit removing `leaf` and adding `package`.
    fn commit_readmission(
        &mut self,
        package: &MemberKeyPackage,
        leaf: LeafNodeIndex,
    ) -> Result<CommitOutput, MlsError> {
        self.ensure_can_commit()?;
        let epoch = self.epoch();
        let bundle = self
            .group
            .commit_builder()
            // Only the readmission: leave requests wait for their own commit.
            .consume_proposal_store(false)
            .propose_removals([leaf])
            .propose_adds([package.key_package.clone()])
            .load_psks(&self.provider.storage)
            .map_err(|e| MlsError::InvalidCommit(e.to_string()))?
            .build(
                &self.provider.rand,
                &self.provider.crypto,
                self.signer.as_ref(),
                |_| true,
            )
            .map_err(|e| MlsError::InvalidCommit(e.to_string()))?
            .stage_commit(&self.provider)
            .map_err(|e| MlsError::InvalidCommit(e.to_string()))?;
        let welcome = bundle.to_welcome_msg();
        let (commit, _, _) = bundle.into_contents();
        self.output(epoch, commit, welcome)
    }

    /// Encrypts an application message for every member, in the current epoch.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, MlsError> {
        if !self.group.is_active() {
            return Err(MlsError::NotAMember);
        }
        let message = self
            .group
            .create_message(&self.provider, self.signer.as_ref(), plaintext)
            .map_err(|e| MlsError::internal("encrypting", e))?;
        message
            .to_bytes()
            .map_err(|e| MlsError::internal("encoding a message", e))
    }

    /// Processes one message from the group, in the relay's order.
    ///
    /// Checks before openmls sees it: the group id, that this member is still in, and the
    /// epoch (a commit from an earlier epoch lost; anything from a later epoch means commits
    /// are missing). A commit is merged only after its new leaves passed the identity check.
    pub fn process(&mut self, bytes: &[u8]) -> Result<Incoming, MlsError> {
        let message =
            MlsMessageIn::tls_deserialize_exact_bytes(bytes).map_err(|_| MlsError::Malformed {
                expected: "message",
            })?;
        let message = message
            .try_into_protocol_message()
            .map_err(|_| MlsError::Unsupported("a Welcome, GroupInfo or KeyPackage here"))?;
        if message.group_id() != self.group.group_id() {
            return Err(MlsError::WrongGroup);
        }
        if !self.group.is_active() {
            return Err(MlsError::NotAMember);
        }
        let current = self.epoch();
        let epoch = message.epoch().as_u64();
        if epoch > current {
            return Err(MlsError::FutureEpoch {
                message: epoch,
                current,
            });
        }
        match message.content_type() {
            ContentType::Commit if epoch < current => {
                return Err(MlsError::CommitLost {
                    commit_epoch: epoch,
                    current,
                });
            }
            ContentType::Application | ContentType::Commit | ContentType::Proposal => {}
        }

        // Read before processing: a winning commit clears our pending one.
        let pending = self.pending_intent();
        let processed = self
            .group
            .process_message(&self.provider, message)
            .map_err(|e| classify(e, epoch, current))?;
        let Sender::Member(sender_leaf) = *processed.sender() else {
            return Err(MlsError::Unsupported("a message from outside the group"));
        };
        let sender = self.user_at(sender_leaf)?;
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => Ok(Incoming::Message {
                sender,
                plaintext: Zeroizing::new(app.into_bytes()),
                epoch,
            }),
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let events = self.check_commit(&staged, sender, sender_leaf)?;
                let removed_me = staged.self_removed();
                let returns = self.readmissions_in(&staged);
                self.group
                    .merge_staged_commit(&self.provider, *staged)
                    .map_err(|e| MlsError::internal("merging a commit", e))?;
                self.remember_readmissions(returns)?;
                Ok(Incoming::Commit {
                    by: sender,
                    events,
                    epoch: self.epoch(),
                    removed_me,
                    discarded: pending,
                })
            }
            ProcessedMessageContent::ProposalMessage(queued) => {
                // The one proposal a member sends on its own: leaving. Anything else (adding or
                // removing others, changing the group) is a commit's job.
                let leaving = matches!(
                    queued.proposal(),
                    Proposal::Remove(remove) if remove.removed() == sender_leaf
                );
                if !leaving {
                    return Err(MlsError::Unsupported(
                        "a standalone proposal other than leaving",
                    ));
                }
                self.group
                    .store_pending_proposal(&self.provider.storage, *queued)
                    .map_err(|e| MlsError::internal("keeping a leave request", e))?;
                Ok(Incoming::LeaveRequest { member: sender })
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(_) => {
                Err(MlsError::Unsupported("a proposal from outside the group"))
            }
            ProcessedMessageContent::OwnPendingCommit
            | ProcessedMessageContent::OwnPrivateMessage => Err(MlsError::Unsupported(
                "this member's own message, echoed back",
            )),
        }
    }

    /// The identity checks a commit must pass before it is merged, and the roster events it
    /// makes.
    fn check_commit(
        &self,
        staged: &StagedCommit,
        by: UserId,
        by_leaf: LeafNodeIndex,
    ) -> Result<Vec<RosterEvent>, MlsError> {
        let mut events = Vec::new();
        for queued in staged.queued_proposals() {
            match queued.proposal() {
                Proposal::Add(add) => {
                    let member = leaf_user(add.key_package().leaf_node())?;
                    events.push(RosterEvent::Added { by, member });
                }
                Proposal::Remove(remove) => {
                    let member = self.user_at(remove.removed())?;
                    events.push(RosterEvent::Removed { by, member });
                }
                Proposal::Update(update) => {
                    let Sender::Member(leaf) = *queued.sender() else {
                        return Err(MlsError::Unsupported("an update from outside the group"));
                    };
                    let before = self.user_at(leaf)?;
                    let after = leaf_user(update.leaf_node())?;
                    if before != after {
                        return Err(MlsError::IdentityChanged { before, after });
                    }
                    events.push(RosterEvent::Updated { member: before });
                }
                _ => {
                    return Err(MlsError::Unsupported(
                        "a commit with proposals other than add, remove and update",
                    ));
                }
            }
        }
        // A member removed and added in one commit was let back in (a rejoin).
        let removed: Vec<UserId> = events
            .iter()
            .filter_map(|e| match e {
                RosterEvent::Removed { member, .. } => Some(*member),
                _ => None,
            })
            .collect();
        let back: Vec<UserId> = events
            .iter()
            .filter_map(|e| match e {
                RosterEvent::Added { member, .. } if removed.contains(member) => Some(*member),
                _ => None,
            })
            .collect();
        if !back.is_empty() {
            events.retain(|e| match e {
                RosterEvent::Removed { member, .. } | RosterEvent::Added { member, .. } => {
                    !back.contains(member)
                }
                _ => true,
            });
            events.extend(
                back.into_iter()
                    .map(|member| RosterEvent::Rejoined { by, member }),
            );
        }
        if let Some(leaf) = staged.update_path_leaf_node() {
            let before = self.user_at(by_leaf)?;
            let after = leaf_user(leaf)?;
            if before != after {
                return Err(MlsError::IdentityChanged { before, after });
            }
            // Adds and removes refresh the committer's path too; only a commit that does
            // nothing else is news to the people in it.
            if events.is_empty() {
                events.push(RosterEvent::Updated { member: by });
            }
        }
        Ok(events)
    }

    /// This conversation's state, for sealing at rest. Write it after every call that changed
    /// the conversation and before its output leaves the device.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        state::encode(
            state::Kind::Conversation,
            &self.id.0,
            &self.provider.storage,
        )
    }

    /// A conversation of `identity` from [`Conversation::to_bytes`].
    pub fn from_bytes(bytes: &[u8], identity: &MlsIdentity) -> Result<Self, MlsError> {
        let decoded = state::decode(state::Kind::Conversation, bytes)?;
        let group_id = GroupId::from_slice(&decoded.header);
        ConversationId::of(&group_id)?;
        let provider = Provider::with_storage(decoded.storage);
        let group = MlsGroup::load(&provider.storage, &group_id)
            .map_err(|e| MlsError::internal("loading a conversation", e))?
            .ok_or(MlsError::Malformed { expected: "state" })?;
        let me = group.own_leaf_node().map(leaf_user).transpose()?;
        if group.is_active() && me != Some(identity.user_id()) {
            return Err(MlsError::Unsupported("another identity's conversation"));
        }
        Ok(Conversation::new(
            group,
            provider,
            identity.signer().clone(),
        ))
    }
}

/// Maps openmls's refusal to ours. `epoch` and `current` were checked before, so an epoch
/// refusal here is about the past epochs whose keys are gone.
fn classify(e: ProcessMessageError<StorageError>, epoch: u64, current: u64) -> MlsError {
    use ValidationError as V;
    match e {
        ProcessMessageError::ValidationError(v) => {
            match v {
                V::WrongGroupId => MlsError::WrongGroup,
                V::WrongEpoch | V::NoPastEpochData => MlsError::OldEpoch {
                    message: epoch,
                    current,
                },
                V::UnknownMember => MlsError::UnknownSender,
                V::InvalidSignature | V::InvalidMembershipTag | V::MissingMembershipTag => {
                    MlsError::Tampered
                }
                V::UnableToDecrypt(d) => match d {
                    // The key of that message was used already.
                    MessageDecryptionError::SecretTreeError(SecretTreeError::SecretReuseError) => {
                        MlsError::Replayed
                    }
                    // openmls says "too far in the past" both for an epoch it keeps no keys for
                    // and for a generation behind the out-of-order window. For a past epoch the
                    // keys are gone (or were never ours: we joined later); in the current epoch
                    // the message is older than what we already read: a replay, or a copy
                    // delayed beyond the window.
                    MessageDecryptionError::SecretTreeError(
                        SecretTreeError::TooDistantInThePast,
                    ) if epoch < current => MlsError::OldEpoch {
                        message: epoch,
                        current,
                    },
                    MessageDecryptionError::SecretTreeError(
                        SecretTreeError::TooDistantInThePast,
                    ) => MlsError::Replayed,
                    MessageDecryptionError::AeadError
                    | MessageDecryptionError::MalformedContent => MlsError::Tampered,
                    other => MlsError::Invalid(other.to_string()),
                },
                other => MlsError::Invalid(other.to_string()),
            }
        }
        ProcessMessageError::GroupStateError(MlsGroupStateError::UseAfterEviction) => {
            MlsError::NotAMember
        }
        ProcessMessageError::InvalidCommit(c) => MlsError::InvalidCommit(c.to_string()),
        ProcessMessageError::IncompatibleWireFormat => {
            MlsError::Unsupported("a handshake message in plaintext")
        }
        other => MlsError::internal("processing a message", other),
    }
}

#[cfg(test)]
mod tests {
    //! Forgeries that need openmls directly (the public API cannot make them): a group whose
    //! creator claims someone else's id, a commit adding a forged leaf, an update that swaps
    //! the identity behind a leaf. Each is refused before anything is merged.
    use openmls::prelude::{BasicCredential, CredentialWithKey, NewSignerBundle};
    use syncra_core::crypto::keys::IdentityKeyPair;

    use super::super::{BindingError, create_config, credential_for};
    use super::*;

    fn forged_credential(claimed: &IdentityKeyPair, key: &IdentityKeyPair) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(claimed.user_id().as_bytes().to_vec()).into(),
            signature_key: key.public().to_vec().into(),
        }
    }

    fn key_package_of(who: &MlsIdentity) -> MemberKeyPackage {
        let out = who.key_package().expect("key package");
        MemberKeyPackage::from_bytes(&out.bytes, who.user_id()).expect("valid")
    }

    /// Alice and bob in one conversation, bob's commit processing under test.
    fn pair() -> (MlsIdentity, Conversation, MlsIdentity, Conversation) {
        let alice = MlsIdentity::new(&IdentityKeyPair::generate());
        let bob = MlsIdentity::new(&IdentityKeyPair::generate());
        let mut a = alice.create_conversation().expect("create");
        let out = a.add(&[key_package_of(&bob)]).expect("add");
        a.commit_accepted().expect("accepted");
        let b = bob.join(&out.welcome.expect("welcome")).expect("join");
        (alice, a, bob, b)
    }

    #[test]
    fn a_welcome_from_a_creator_claiming_another_id_is_refused() {
        let alice = IdentityKeyPair::generate();
        let mallory = IdentityKeyPair::generate();
        let bob = MlsIdentity::new(&IdentityKeyPair::generate());
        let provider = Provider::default();
        let signer = IdentitySigner::new(&mallory);
        let mut group = MlsGroup::new_with_group_id(
            &provider,
            &signer,
            &create_config(),
            GroupId::from_slice(&[7; GROUP_ID_LEN]),
            forged_credential(&alice, &mallory),
        )
        .expect("openmls does not judge credentials; we do");
        let (_, welcome, _) = group
            .add_members(&provider, &signer, &[key_package_of(&bob).key_package])
            .expect("add");
        let welcome = welcome.to_bytes().expect("encode");
        match bob.join(&welcome) {
            Err(MlsError::Unbound(BindingError::KeyMismatch { claimed, actual })) => {
                assert_eq!(claimed, alice.user_id());
                assert_eq!(actual, mallory.user_id());
            }
            other => panic!("{other:?}"),
        }
    }

    /// A relay knows a conversation's id and can claim its members' published KeyPackages: it
    /// builds a group of its own under that id, as mallory (a user of its own, honestly bound
    /// to her key), and sends bob the Welcome — a copy "behind" the Welcome's epoch would have
    /// been replaced by it, mallory inside. Replacing a copy takes a Welcome made by a member of
    /// it: refused before bob's KeyPackage is used up; alice's readmission of bob is taken.
    #[test]
    fn a_welcome_replacing_a_copy_must_come_from_a_member_of_it() {
        let (_alice, mut a, bob, b) = pair();
        let members = b.roster().expect("roster");
        let mallory_keys = IdentityKeyPair::generate();
        let mallory = MlsIdentity::new(&mallory_keys);
        let provider = Provider::default();
        let signer = IdentitySigner::new(&mallory_keys);
        let mut fake = MlsGroup::new_with_group_id(
            &provider,
            &signer,
            &create_config(),
            GroupId::from_slice(a.id().as_bytes()),
            credential_for(&mallory_keys),
        )
        .expect("create");
        let (_, welcome, _) = fake
            .add_members(&provider, &signer, &[key_package_of(&bob).key_package])
            .expect("add");
        let welcome = welcome.to_bytes().expect("encode");
        match bob.rejoin_from(&welcome, &members) {
            Err(MlsError::WelcomeFromOutsider {
                conversation,
                sender,
            }) => {
                assert_eq!(conversation, a.id());
                assert_eq!(sender, mallory.user_id());
            }
            other => panic!("{other:?}"),
        }
        // Refused before anything was used: as a first invitation the same Welcome still joins
        // (a new conversation shows its members; what was refused is the silent replacement).
        assert!(bob.join(&welcome).is_ok());

        // Bob's copy falls behind; he asks to be let back in, and alice, a member, does it.
        let _ = a.update().expect("update");
        a.commit_accepted().expect("accepted");
        let body = bob.rejoin_request(&b).expect("request");
        let request = RejoinRequest::from_bytes(&body, b.id(), b.epoch()).expect("request");
        a.check_rejoin(&request).expect("behind");
        let out = a.readmit(&request).expect("readmit");
        a.commit_accepted().expect("accepted");
        let back = bob
            .rejoin_from(&out.welcome.expect("welcome"), &members)
            .expect("a member's Welcome is taken");
        assert_eq!(back.epoch(), a.epoch());
    }

    #[test]
    fn a_commit_adding_a_leaf_not_bound_to_its_key_is_not_merged() {
        let (alice, mut a, _bob, mut b) = pair();
        let carol = IdentityKeyPair::generate();
        let mallory = IdentityKeyPair::generate();
        // Mallory's key under carol's id, signed by mallory: the KeyPackage verifies, the
        // binding does not.
        let forged = KeyPackage::builder()
            .build(
                CIPHERSUITE,
                &Provider::default(),
                &IdentitySigner::new(&mallory),
                forged_credential(&carol, &mallory),
            )
            .expect("build")
            .key_package()
            .clone();
        let (commit, _, _) = a
            .group
            .add_members(&a.provider, alice.signer().as_ref(), &[forged])
            .expect("add");
        let epoch = b.epoch();
        let err = b.process(&commit.to_bytes().expect("encode")).unwrap_err();
        assert!(matches!(
            err,
            MlsError::Unbound(BindingError::KeyMismatch { .. })
        ));
        assert_eq!(b.epoch(), epoch, "nothing merged");
        assert_eq!(b.roster().expect("roster").len(), 2);
    }

    #[test]
    fn an_update_that_swaps_the_identity_behind_a_leaf_is_refused() {
        let (alice, mut a, _bob, mut b) = pair();
        let eve = IdentityKeyPair::generate();
        let eve_signer = IdentitySigner::new(&eve);
        let bundle = a
            .group
            .self_update_with_new_signer(
                &a.provider,
                alice.signer().as_ref(),
                NewSignerBundle {
                    signer: &eve_signer,
                    credential_with_key: credential_for(&eve),
                },
                LeafNodeParameters::builder()
                    .with_credential_with_key(credential_for(&eve))
                    .build(),
            )
            .expect("openmls lets a member change its credential");
        let (commit, _, _) = bundle.into_contents();
        let err = b.process(&commit.to_bytes().expect("encode")).unwrap_err();
        match err {
            MlsError::IdentityChanged { before, after } => {
                assert_eq!(before, alice.user_id());
                assert_eq!(after, eve.user_id());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn debug_output_shows_ids_and_epochs_not_secrets() {
        let (_alice, a, _bob, _b) = pair();
        let shown = format!("{a:?}");
        assert!(shown.contains("epoch: 1"), "{shown}");
        assert!(shown.len() < 200, "{shown}");
    }
}

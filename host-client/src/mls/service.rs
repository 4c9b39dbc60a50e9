//! The client half of the MLS delivery service: the engine's output carried through the relay.
//!
//! [`Conversations`] holds this member's MLS identity and its conversations and speaks the
//! relay's side of docs/PROTOCOL.md §9:
//!
//! - **KeyPackages**: [`Conversations::replenish`] keeps the directory stocked (one-time
//!   packages and one last-resort package); creating a conversation claims one package per
//!   member and checks it is bound to the member asked for.
//! - **Commits**: every add, remove and update is a commit sent as a carriage naming the
//!   members after it. The relay accepts one per epoch: accepted, it is merged and its Welcome
//!   goes to the members it added; refused with `commit_conflict`, it is dropped and its intent
//!   kept — once the winning commit has been processed, [`Conversations::rebase`] makes it again
//!   on the new epoch, minus what the winner already did.
//! - **Messages**: encrypted in the current epoch and sent to every other member; refused with
//!   `wrong_epoch` when a commit this member has not processed yet moved the group on — the
//!   caller processes what arrived and sends the same text again ([`ServiceError::Behind`]).
//! - **Arrivals**: [`Conversations::receive`] takes a carriage from the relay, checks that the
//!   kind, group and epoch it declared match the MLS message inside, and processes it: a
//!   Welcome joins, a commit moves the conversation on (with the roster changes as events),
//!   an application message is decrypted with its authenticated sender.
//!
//! - **Rejoin**: a copy that fell behind for good asks the others to let it back in
//!   ([`Conversations::ask_to_rejoin`]); a member answers with one commit replacing its leaf
//!   ([`Conversations::readmit_pending`]); the Welcome replaces the stuck copy
//!   ([`super::rejoin`]).
//! - **Damage**: a conversation file that does not open is set aside when the home is opened
//!   ([`SetAside`]), so the others carry on.
//!
//! A 1:1 chat is [`Conversations::create`] with one other member followed by a message: the
//! commit claims the group's first epoch, then the Welcome and the first message leave one
//! after the other on the same ordered path, so the other side joins before it reads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use data_encoding::BASE32_NOPAD;
use syncra_core::UserId;
use syncra_core::carriage::{self, CarriageHeader, CarriageKind, GroupId};
use syncra_core::crypto::keys::IdentityKeyPair;
use syncra_core::crypto::local_box::LocalKey;
use syncra_core::error::OpenError;
use syncra_core::id::USER_ID_LEN;
use syncra_core::wire::{ErrorCode, RecipientOutcome};
use zeroize::Zeroizing;

use super::conversation::{
    CommitOutput, Conversation, ConversationId, FramedKind, Framing, Incoming, Intent,
    MemberKeyPackage, RosterEvent,
};
use super::error::MlsError;
use super::identity::MlsIdentity;
use super::rejoin::RejoinRequest;
use crate::net::{NetError, Session};

/// What a carriage from the relay turned out to be, once processed.
pub enum Arrival {
    /// A Welcome: this member joined a conversation.
    Joined {
        /// The conversation.
        conversation: ConversationId,
        /// Its members, this one included.
        roster: Vec<UserId>,
        /// The epoch it was joined in.
        epoch: u64,
        /// It replaced this member's copy of a conversation that had fallen behind: the
        /// others let it back in ([`super::rejoin`]).
        rejoined: bool,
    },
    /// A member whose copy fell behind asks to be let back in; any other member answers it
    /// ([`Conversations::readmit_pending`]).
    RejoinRequest {
        /// The conversation.
        conversation: ConversationId,
        /// Who asks.
        member: UserId,
    },
    /// An application message.
    Message {
        /// The conversation.
        conversation: ConversationId,
        /// Its sender, authenticated by MLS (not by anything the relay said).
        sender: UserId,
        /// The plaintext.
        plaintext: Zeroizing<Vec<u8>>,
        /// The epoch it was sent in.
        epoch: u64,
    },
    /// A member asked to leave; any other member commits it
    /// ([`Conversations::commit_departures`]).
    LeaveRequest {
        /// The conversation.
        conversation: ConversationId,
        /// Who wants to leave.
        member: UserId,
    },
    /// A commit of another member, merged.
    Commit {
        /// The conversation.
        conversation: ConversationId,
        /// Who committed it.
        by: UserId,
        /// The membership changes, in order.
        events: Vec<RosterEvent>,
        /// The conversation's epoch now.
        epoch: u64,
        /// It removed this member: the conversation is over for it.
        removed_me: bool,
        /// It won an epoch this member had also committed in: call
        /// [`Conversations::rebase`] to make that commit again.
        rebase: bool,
        /// The member list its author gave the relay, when it is not the roster the commit
        /// made (the relay decides who may send to the group by that list): someone the group
        /// holds is refused by the relay, or someone outside it is let through to the relay's
        /// checks (never into the conversation: that is the roster's).
        misdeclared: Option<Vec<UserId>>,
    },
}

impl std::fmt::Debug for Arrival {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Arrival::Joined {
                conversation,
                roster,
                epoch,
                rejoined,
            } => write!(
                f,
                "Joined({conversation}, {} members, epoch {epoch}, rejoined {rejoined})",
                roster.len()
            ),
            Arrival::RejoinRequest {
                conversation,
                member,
            } => write!(f, "RejoinRequest({conversation}, {member})"),
            // The plaintext stays out of logs.
            Arrival::Message {
                conversation,
                sender,
                plaintext,
                epoch,
            } => write!(
                f,
                "Message({conversation}, from {sender}, {} bytes, epoch {epoch})",
                plaintext.len()
            ),
            Arrival::LeaveRequest {
                conversation,
                member,
            } => write!(f, "LeaveRequest({conversation}, {member})"),
            Arrival::Commit {
                conversation,
                by,
                events,
                epoch,
                removed_me,
                rebase,
                misdeclared,
            } => write!(
                f,
                "Commit({conversation}, by {by}, {events:?}, epoch {epoch}, removed_me \
                 {removed_me}, rebase {rebase}, misdeclared {})",
                misdeclared.is_some()
            ),
        }
    }
}

/// Why a conversation operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The MLS engine refused (a tampered, replayed or out-of-epoch message has its own
    /// variant there).
    #[error(transparent)]
    Mls(#[from] MlsError),
    /// The relay could not be reached or refused.
    #[error(transparent)]
    Net(#[from] NetError),
    /// A carriage from the relay is malformed.
    #[error("malformed carriage: {0}")]
    Carriage(#[from] OpenError),
    /// What a carriage declared to the relay is not what the MLS message inside is.
    #[error("the carriage declared {declared}, but the MLS message inside is {actual}")]
    Mismatch {
        /// What the carriage said.
        declared: String,
        /// What the message is.
        actual: String,
    },
    /// No conversation with this id.
    #[error("no conversation {0}")]
    Unknown(ConversationId),
    /// Another member's commit won this epoch. Process what arrives (the winner is on its
    /// way), then [`Conversations::rebase`].
    #[error("another member's commit won epoch {epoch} of conversation {conversation}")]
    Conflict {
        /// The conversation.
        conversation: ConversationId,
        /// The epoch lost.
        epoch: u64,
    },
    /// The state on disk could not be read or written; nothing left the device.
    #[error(transparent)]
    State(#[from] StateError),
    /// This member's commit has no verdict yet: no answer came, or the relay refused it for a
    /// time (its store was unavailable). It stays pending and the same commit is sent again
    /// ([`Conversations::resend`]): the relay routes it if it already won its epoch, and
    /// decides now if it had not.
    #[error(
        "the relay has not taken the change to conversation {conversation} yet ({error}); it \
         is sent again by itself"
    )]
    Unanswered {
        /// The conversation.
        conversation: ConversationId,
        /// What happened instead of a verdict.
        error: NetError,
    },
    /// The group moved past the epoch this message was made in. Process what arrives, then
    /// send the same text again.
    #[error("conversation {conversation} moved past epoch {epoch}; send again once caught up")]
    Behind {
        /// The conversation.
        conversation: ConversationId,
        /// The epoch the message was made in.
        epoch: u64,
    },
}

/// The file of the KeyPackage store, in the MLS state directory.
const KEY_STORE_FILE: &str = "key-packages.state";
/// The file of when this member last refreshed its leaf in each conversation.
const UPDATES_FILE: &str = "leaf-updates.state";
/// The file of this member's commits that have no verdict yet ([`Unsent`]).
const UNSENT_FILE: &str = "unsent-commits";
/// A random stamp rewritten with every save, so a process sharing the directory knows when to
/// read it again (not secret).
const GENERATION_FILE: &str = "generation";
/// The lock every process of one home takes around a change of the MLS state.
const LOCK_FILE: &str = "mls.lock";
/// Present while the KeyPackages published from a KeyPackage store that was set aside still
/// wait to be withdrawn (holds nothing).
const WITHDRAW_FILE: &str = "withdraw-key-packages";

/// How often a member refreshes its own leaf in each conversation when nothing else did: a
/// stolen copy of its state stops reading at the next refresh, so this bounds how long a
/// compromise lasts (post-compromise security). Any commit of its own refreshes it too.
pub const LEAF_UPDATE_INTERVAL_MS: u64 = 24 * 60 * 60 * 1000;
/// The ending of a conversation's file (its name is the conversation id, base32).
const STATE_SUFFIX: &str = ".state";

/// Why the MLS state on disk could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A file does not open under this home's storage key, or does not decode.
    #[error("{path}: damaged or not this home's MLS state ({why})")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// The stamp of the last save in `dir` (`None`: nothing saved yet).
fn read_stamp(dir: &Path) -> Result<Option<[u8; 16]>, StateError> {
    let path = dir.join(GENERATION_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(bytes.try_into().ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Io { path, source }),
    }
}

fn label(file: &str) -> Vec<u8> {
    let mut label = b"syncra/mls/".to_vec();
    label.extend_from_slice(file.as_bytes());
    label
}

/// A commit of this member's that has no verdict from the relay yet: the carriage as sent (its
/// message id with it, so the relay knows it again), and the Welcome to send once it is
/// accepted. Kept on disk beside the pending commit it belongs to, and good only while the
/// conversation holds that commit pending in `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Unsent {
    epoch: u64,
    carriage: Vec<u8>,
    joiners: Vec<UserId>,
    welcome: Option<Vec<u8>>,
}

impl Unsent {
    /// The count, then each: conversation id, epoch, carriage, joiners, whether a Welcome
    /// follows, the Welcome (lengths as u32, big-endian).
    fn encode_all(all: &HashMap<ConversationId, Unsent>) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&u32::try_from(all.len()).unwrap_or(u32::MAX).to_be_bytes());
        for (id, u) in all {
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(&u.epoch.to_be_bytes());
            let put = |out: &mut Vec<u8>, bytes: &[u8]| {
                // A carriage is far below 4 GiB (the relay's frame limit).
                out.extend_from_slice(
                    &u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes(),
                );
                out.extend_from_slice(bytes);
            };
            put(&mut out, &u.carriage);
            let joiners: Vec<u8> = u.joiners.iter().flat_map(|j| *j.as_bytes()).collect();
            put(&mut out, &joiners);
            out.push(u8::from(u.welcome.is_some()));
            put(&mut out, u.welcome.as_deref().unwrap_or_default());
        }
        out
    }

    fn decode_all(mut bytes: &[u8]) -> Option<HashMap<ConversationId, Unsent>> {
        fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            let (head, rest) = bytes.split_at_checked(n)?;
            *bytes = rest;
            Some(head)
        }
        fn take_len<'a>(bytes: &mut &'a [u8]) -> Option<&'a [u8]> {
            let n = u32::from_be_bytes(take(bytes, 4)?.try_into().ok()?);
            take(bytes, usize::try_from(n).ok()?)
        }
        let mut all = HashMap::new();
        let count = u32::from_be_bytes(take(&mut bytes, 4)?.try_into().ok()?);
        for _ in 0..count {
            let id = ConversationId::from_bytes(take(&mut bytes, 16)?.try_into().ok()?);
            let epoch = u64::from_be_bytes(take(&mut bytes, 8)?.try_into().ok()?);
            let carriage = take_len(&mut bytes)?.to_vec();
            let joiners = take_len(&mut bytes)?;
            if !joiners.len().is_multiple_of(USER_ID_LEN) {
                return None;
            }
            let joiners = joiners
                .chunks_exact(USER_ID_LEN)
                .map(|j| j.try_into().ok().map(UserId::from_bytes))
                .collect::<Option<Vec<_>>>()?;
            let has_welcome = take(&mut bytes, 1)?[0] == 1;
            let welcome = take_len(&mut bytes)?.to_vec();
            let welcome = has_welcome.then_some(welcome);
            all.insert(
                id,
                Unsent {
                    epoch,
                    carriage,
                    joiners,
                    welcome,
                },
            );
        }
        bytes.is_empty().then_some(all)
    }
}

/// A commit's carriage with its recipients cut to the members it declares (the same message
/// id and MLS message); `None` when that leaves it as it was.
fn members_only(carriage: &[u8]) -> Option<Vec<u8>> {
    let parsed = carriage::parse(carriage).ok()?;
    let mut header = parsed.header;
    let before = header.recipients.len();
    let members = header.members.clone();
    header.recipients.retain(|r| members.contains(r));
    (header.recipients.len() < before).then(|| header.encode(parsed.body))
}

/// This member's MLS conversations and the relay protocol around them.
pub struct Conversations {
    identity: MlsIdentity,
    groups: HashMap<ConversationId, Conversation>,
    /// Commits that lost their epoch, to make again once the winner is processed.
    lost: HashMap<ConversationId, Intent>,
    /// Rejoin requests received and checked, to answer with a commit
    /// ([`Conversations::readmit_pending`]).
    rejoins: HashMap<ConversationId, Vec<RejoinRequest>>,
    /// When this member's leaf was last fresh in each conversation (joined, created, or one
    /// of its commits accepted), in ms since the epoch.
    refreshed: HashMap<ConversationId, u64>,
    /// Where the state is kept, when it is kept ([`Conversations::open`]).
    store: Option<Store>,
    /// What the relay answered for the last Welcome sent, per joiner.
    welcomed: Vec<RecipientOutcome>,
    /// The KeyPackage store or the leaf schedule changed since the last save (most changes
    /// touch one conversation only, and each file written is a disk sync).
    shared_dirty: bool,
    /// This member's commits with no verdict yet, to send again ([`Conversations::resend`]).
    unsent: HashMap<ConversationId, Unsent>,
    /// Conversations whose state file was damaged when the home was opened, set aside
    /// ([`Conversations::open`]): never used again. Also the KeyPackage store and the leaf
    /// schedule, when theirs was.
    set_aside: Vec<SetAside>,
    /// The KeyPackage store was set aside: the packages still published for this member have
    /// lost their private halves, and are withdrawn at the next [`Conversations::replenish`]
    /// (a marker file keeps this across a restart until it is done).
    withdraw_packages: bool,
}

/// A conversation whose state file did not open or decode: renamed to `<file>.damaged`
/// (nothing deleted) so that the other conversations carry on. It is never used again — a
/// restored older state would reuse message keys — and its members let this member back in by
/// adding it again; a 1:1 chat starts anew with the next message (docs/PROTOCOL.md §9.5).
///
/// The KeyPackage store and the leaf schedule are set aside the same way (`id` is `None`): a
/// new store takes the old one's place and the packages published from the old one are
/// withdrawn; an empty schedule makes every leaf due for a refresh.
#[derive(Debug, Clone)]
pub struct SetAside {
    /// The conversation, as its file name says; `None` for the KeyPackage store or the leaf
    /// schedule (`path` says which).
    pub id: Option<ConversationId>,
    /// Where its state is now.
    pub path: PathBuf,
    /// What was wrong with it.
    pub why: String,
}

/// Renames a damaged state file to `<file>.damaged` (nothing is deleted) and says so.
fn put_aside(
    id: Option<ConversationId>,
    path: PathBuf,
    why: String,
) -> Result<SetAside, StateError> {
    let mut aside = path.clone().into_os_string();
    aside.push(".damaged");
    let aside = PathBuf::from(aside);
    if let Err(source) = std::fs::rename(&path, &aside) {
        return Err(StateError::Io { path, source });
    }
    match id {
        Some(id) => tracing::warn!(
            "the state of conversation {id} was damaged ({why}); set aside as {}",
            aside.display()
        ),
        None => tracing::warn!(
            "{} was damaged ({why}); set aside as {}, started anew",
            path.display(),
            aside.display()
        ),
    }
    Ok(SetAside {
        id,
        path: aside,
        why,
    })
}

/// The directory the state is sealed into, and the stamp of what this process last read or
/// wrote there.
struct Store {
    dir: PathBuf,
    key: LocalKey,
    stamp: Option<[u8; 16]>,
}

/// Holds the MLS state's lock; dropping it releases the lock.
#[derive(Debug)]
#[must_use = "the lock is released when this is dropped"]
pub struct StateLock {
    _file: std::fs::File,
}

impl std::fmt::Debug for Conversations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conversations")
            .field("me", &self.identity.user_id())
            .field("conversations", &self.groups.len())
            .finish()
    }
}

/// Takes an exclusive lock on `file` without holding up the async runtime: at once when it
/// is free, otherwise by waiting on the blocking pool. Dropped before it is granted, the lock
/// is granted to the blocking thread and released at once.
async fn exclusive(file: std::fs::File) -> std::io::Result<std::fs::File> {
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
        Err(std::fs::TryLockError::WouldBlock) => {
            tokio::task::spawn_blocking(move || file.lock().map(|()| file))
                .await
                .map_err(std::io::Error::other)?
        }
    }
}

fn message_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    syncra_core::crypto::fill_random(&mut id);
    id
}

impl Conversations {
    /// No conversations yet, for this identity.
    pub fn new(identity: MlsIdentity) -> Self {
        Conversations {
            identity,
            groups: HashMap::new(),
            lost: HashMap::new(),
            rejoins: HashMap::new(),
            refreshed: HashMap::new(),
            store: None,
            welcomed: Vec::new(),
            unsent: HashMap::new(),
            shared_dirty: false,
            set_aside: Vec::new(),
            withdraw_packages: false,
        }
    }

    /// Opens the state kept in `dir` ([`Conversations::load`]) and keeps it there: from now on
    /// every change is sealed to disk before its output leaves the device (a restored older
    /// state would reuse message keys), and [`Conversations::lock`] picks up what other
    /// processes of the same home wrote.
    pub fn open(
        identity: &IdentityKeyPair,
        dir: &Path,
        key: &LocalKey,
    ) -> Result<Self, StateError> {
        syncra_core::crypto::keyfile::create_private_dir(dir).map_err(|source| StateError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let stamp = read_stamp(dir)?;
        let mut conversations = Self::load_with(identity, dir, key, true)?;
        conversations.store = Some(Store {
            dir: dir.to_owned(),
            key: key.clone(),
            stamp,
        });
        Ok(conversations)
    }

    /// Takes the lock every process of this home shares around a change (waiting for it), and
    /// reads the state again if another process changed it since. Hold it from before a change
    /// until its output is sent. Without a directory ([`Conversations::new`]) it is a no-op
    /// lock on nothing.
    ///
    /// Another process holds the lock across a network round trip (a send waits for the
    /// relay's answer), so the wait for it happens on tokio's blocking pool: the task that
    /// asks waits, the runtime's threads go on serving the rest of the client — its screen,
    /// its keepalives, its other conversations.
    pub async fn lock(
        &mut self,
        identity: &IdentityKeyPair,
    ) -> Result<Option<StateLock>, StateError> {
        let Some(store) = &self.store else {
            return Ok(None);
        };
        let path = store.dir.join(LOCK_FILE);
        let mut opts = std::fs::OpenOptions::new();
        opts.create(true).truncate(false).write(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let file = opts.open(&path).map_err(io)?;
        let file = exclusive(file).await.map_err(io)?;
        let stamp = read_stamp(&store.dir)?;
        if stamp != store.stamp {
            let fresh = Self::load_with(identity, &store.dir, &store.key, true)?;
            self.identity = fresh.identity;
            self.groups = fresh.groups;
            self.set_aside.extend(fresh.set_aside);
            self.withdraw_packages |= fresh.withdraw_packages;
            self.refreshed = fresh.refreshed;
            // Written by whichever process made the commit; sent again by whichever follows
            // up first (under this lock).
            self.unsent = fresh.unsent;
            // A lost commit's intent is only this process's to rebase.
            let groups = &self.groups;
            self.lost.retain(|id, _| groups.contains_key(id));
            self.rejoins.retain(|id, _| groups.contains_key(id));
            if let Some(store) = &mut self.store {
                store.stamp = stamp;
            }
        }
        Ok(Some(StateLock { _file: file }))
    }

    /// Seals the KeyPackage store, the leaf schedule and `changed` (every conversation if
    /// `None`) to disk, then a new stamp. Nothing to do without a directory.
    fn checkpoint(&mut self, changed: Option<ConversationId>) -> Result<(), StateError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let (dir, key) = (store.dir.clone(), store.key.clone());
        match changed {
            None => self.save(&dir, &key)?,
            Some(id) => {
                if self.shared_dirty {
                    self.save_shared(&dir, &key)?;
                }
                if let Some(conversation) = self.groups.get(&id) {
                    let file = format!("{id}{STATE_SUFFIX}");
                    self.save_file(&dir, &key, &file, &conversation.to_bytes())?;
                }
            }
        }
        self.shared_dirty = false;
        // The stamp only tells other running processes to read again: written, not synced
        // (after a crash every process starts by reading anyway). A torn stamp reads as
        // "changed", which costs one reload.
        let mut stamp = [0u8; 16];
        syncra_core::crypto::fill_random(&mut stamp);
        let path = dir.join(GENERATION_FILE);
        std::fs::write(&path, stamp).map_err(|source| StateError::Io {
            path: path.clone(),
            source,
        })?;
        if let Some(store) = &mut self.store {
            store.stamp = Some(stamp);
        }
        Ok(())
    }

    /// This member's MLS identity (its KeyPackage store is saved with it).
    pub fn identity(&self) -> &MlsIdentity {
        &self.identity
    }

    /// A conversation.
    pub fn get(&self, id: ConversationId) -> Option<&Conversation> {
        self.groups.get(&id)
    }

    /// Every conversation's id.
    pub fn ids(&self) -> impl Iterator<Item = ConversationId> + '_ {
        self.groups.keys().copied()
    }

    /// Adds a conversation restored from disk.
    pub fn insert(&mut self, conversation: Conversation) {
        self.groups.insert(conversation.id(), conversation);
    }

    /// Seals the KeyPackage store and every conversation into `dir` under the home's storage
    /// key (AES-256-GCM, each bound to its file name), each file written atomically with mode
    /// 0600: the same protection as the history. Call after every change and before the
    /// change's output leaves the device, so a crash never leaves the relay ahead of the disk.
    pub fn save(&self, dir: &Path, key: &LocalKey) -> Result<(), StateError> {
        self.save_shared(dir, key)?;
        for (id, conversation) in &self.groups {
            let file = format!("{id}{STATE_SUFFIX}");
            self.save_file(dir, key, &file, &conversation.to_bytes())?;
        }
        Ok(())
    }

    /// The KeyPackage store and the leaf schedule.
    fn save_shared(&self, dir: &Path, key: &LocalKey) -> Result<(), StateError> {
        self.save_file(
            dir,
            key,
            KEY_STORE_FILE,
            &self.identity.key_store_to_bytes(),
        )?;
        let mut refreshed = Vec::with_capacity(self.refreshed.len() * 24);
        for (id, at) in &self.refreshed {
            refreshed.extend_from_slice(id.as_bytes());
            refreshed.extend_from_slice(&at.to_be_bytes());
        }
        self.save_file(dir, key, UPDATES_FILE, &refreshed)?;
        self.save_file(dir, key, UNSENT_FILE, &Unsent::encode_all(&self.unsent))
    }

    fn save_file(
        &self,
        dir: &Path,
        key: &LocalKey,
        file: &str,
        state: &[u8],
    ) -> Result<(), StateError> {
        let path = dir.join(file);
        let sealed = key.seal(&label(file), state);
        syncra_core::crypto::keyfile::write_private(&path, &sealed).map_err(|e| StateError::Io {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// Opens what [`Conversations::save`] wrote (an empty or missing directory: no
    /// conversations yet). A file that does not open under `key` or does not decode is an
    /// error naming it; nothing is skipped silently.
    pub fn load(
        identity: &IdentityKeyPair,
        dir: &Path,
        key: &LocalKey,
    ) -> Result<Self, StateError> {
        Self::load_with(identity, dir, key, false)
    }

    /// [`Conversations::load`]; with `set_aside`, a file that does not open or decode — a
    /// conversation's, the KeyPackage store, the leaf schedule — is renamed to
    /// `<file>.damaged` and listed ([`Conversations::set_aside`]) instead of failing the whole
    /// load ([`SetAside`]).
    fn load_with(
        identity: &IdentityKeyPair,
        dir: &Path,
        key: &LocalKey,
        set_aside: bool,
    ) -> Result<Self, StateError> {
        let open = |file: &str| -> Result<Option<Zeroizing<Vec<u8>>>, StateError> {
            let path = dir.join(file);
            match std::fs::read(&path) {
                Ok(sealed) => {
                    key.open(&label(file), &sealed)
                        .map(Some)
                        .map_err(|e| StateError::Damaged {
                            path,
                            why: e.to_string(),
                        })
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(StateError::Io { path, source }),
            }
        };
        let damaged = |file: &str, e: MlsError| StateError::Damaged {
            path: dir.join(file),
            why: e.to_string(),
        };
        let mut aside = Vec::new();
        let restored = open(KEY_STORE_FILE).and_then(|store| {
            store
                .map(|s| MlsIdentity::restore(identity, &s).map_err(|e| damaged(KEY_STORE_FILE, e)))
                .transpose()
        });
        let withdraw_marker = dir.join(WITHDRAW_FILE);
        let mls = match restored {
            Ok(Some(mls)) => mls,
            Ok(None) => MlsIdentity::new(identity),
            Err(StateError::Damaged { path, why }) if set_aside => {
                // The marker first: a crash after the rename still withdraws at the next start.
                std::fs::write(&withdraw_marker, b"").map_err(|source| StateError::Io {
                    path: withdraw_marker.clone(),
                    source,
                })?;
                aside.push(put_aside(None, path, why)?);
                MlsIdentity::new(identity)
            }
            Err(e) => return Err(e),
        };
        let mut conversations = Conversations::new(mls);
        conversations.set_aside = aside;
        conversations.withdraw_packages = withdraw_marker.exists();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(conversations),
            Err(source) => {
                return Err(StateError::Io {
                    path: dir.to_owned(),
                    source,
                });
            }
        };
        for entry in entries {
            let entry = entry.map_err(|source| StateError::Io {
                path: dir.to_owned(),
                source,
            })?;
            let name = entry.file_name();
            let Some(file) = name.to_str() else { continue };
            if file == KEY_STORE_FILE || file == UPDATES_FILE || !file.ends_with(STATE_SUFFIX) {
                continue;
            }
            let loaded = open(file).and_then(|state| {
                let Some(state) = state else { return Ok(None) };
                let conversation = Conversation::from_bytes(&state, &conversations.identity)
                    .map_err(|e| damaged(file, e))?;
                if format!("{}{STATE_SUFFIX}", conversation.id()) != file {
                    return Err(StateError::Damaged {
                        path: dir.join(file),
                        why: format!("it holds conversation {}", conversation.id()),
                    });
                }
                Ok(Some(conversation))
            });
            match loaded {
                Ok(Some(conversation)) => conversations.insert(conversation),
                Ok(None) => {}
                Err(StateError::Damaged { path, why }) if set_aside => {
                    let Some(id) = file
                        .strip_suffix(STATE_SUFFIX)
                        .and_then(|name| {
                            BASE32_NOPAD
                                .decode(name.to_ascii_uppercase().as_bytes())
                                .ok()
                        })
                        .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok())
                        .map(ConversationId::from_bytes)
                    else {
                        // Not named as a conversation: not ours to rename.
                        return Err(StateError::Damaged { path, why });
                    };
                    conversations
                        .set_aside
                        .push(put_aside(Some(id), path, why)?);
                }
                Err(e) => return Err(e),
            }
        }
        let schedule = open(UPDATES_FILE).and_then(|refreshed| match refreshed {
            Some(r) if !r.len().is_multiple_of(24) => Err(StateError::Damaged {
                path: dir.join(UPDATES_FILE),
                why: "not a list of (conversation, time) pairs".into(),
            }),
            other => Ok(other),
        });
        let schedule = match schedule {
            Ok(schedule) => schedule,
            Err(StateError::Damaged { path, why }) if set_aside => {
                // Without it every leaf is due for a refresh: one update commit each.
                conversations.set_aside.push(put_aside(None, path, why)?);
                None
            }
            Err(e) => return Err(e),
        };
        let unsent = open(UNSENT_FILE).and_then(|unsent| match unsent {
            Some(bytes) => {
                Unsent::decode_all(&bytes)
                    .map(Some)
                    .ok_or_else(|| StateError::Damaged {
                        path: dir.join(UNSENT_FILE),
                        why: "not a list of unanswered commits".into(),
                    })
            }
            None => Ok(None),
        });
        match unsent {
            Ok(unsent) => conversations.unsent = unsent.unwrap_or_default(),
            // Without it a commit whose answer was lost stays pending until another member's
            // commit ends its epoch, as before such commits were sent again.
            Err(StateError::Damaged { path, why }) if set_aside => {
                conversations.set_aside.push(put_aside(None, path, why)?);
            }
            Err(e) => return Err(e),
        }
        if let Some(refreshed) = schedule {
            for entry in refreshed.chunks_exact(24) {
                let mut id = [0u8; 16];
                id.copy_from_slice(&entry[..16]);
                let mut at = [0u8; 8];
                at.copy_from_slice(&entry[16..]);
                conversations
                    .refreshed
                    .insert(ConversationId::from_bytes(id), u64::from_be_bytes(at));
            }
        }
        Ok(conversations)
    }

    /// Tops the directory up to `target` one-time KeyPackages and publishes a last-resort one
    /// if none is there. Answers what the directory holds afterwards. Save the identity's key
    /// store before the next call that may use a package.
    pub async fn replenish(
        &mut self,
        session: &Session,
        target: u32,
    ) -> Result<(u32, bool), ServiceError> {
        if self.withdraw_packages {
            self.withdraw_published(session).await?;
        }
        let (held, has_last_resort) = session.publish_key_packages(None, Vec::new()).await?;
        let one_time = (held..target)
            .map(|_| self.identity.key_package().map(|k| k.bytes))
            .collect::<Result<Vec<_>, _>>()?;
        let last_resort = if has_last_resort {
            None
        } else {
            Some(self.identity.last_resort_key_package()?.bytes)
        };
        if one_time.is_empty() && last_resort.is_none() {
            return Ok((held, has_last_resort));
        }
        // Their private halves are on disk before anyone can claim them.
        self.checkpoint(None)?;
        Ok(session.publish_key_packages(last_resort, one_time).await?)
    }

    /// After the KeyPackage store was set aside: takes this member's one-time packages out of
    /// the directory (by claiming them, as an adder would: their private halves are gone, so a
    /// Welcome made with one could never be read) and replaces the last-resort one. Then
    /// [`Conversations::replenish`] publishes fresh ones from the new store.
    async fn withdraw_published(&mut self, session: &Session) -> Result<(), ServiceError> {
        let me = self.identity.user_id();
        let mut withdrawn = 0;
        // One claim per package held, and one more that answers the last-resort package.
        for _ in 0..=syncra_core::store::MAX_KEY_PACKAGES {
            match session.claim_key_package(me).await {
                Ok((_, false)) => withdrawn += 1,
                Ok((_, true)) => break,
                Err(NetError::Refused {
                    code: ErrorCode::NotFound,
                    ..
                }) => break,
                Err(e) => return Err(e.into()),
            }
        }
        let last_resort = self.identity.last_resort_key_package()?.bytes;
        self.checkpoint(None)?;
        session
            .publish_key_packages(Some(last_resort), Vec::new())
            .await?;
        if let Some(store) = &self.store {
            let marker = store.dir.join(WITHDRAW_FILE);
            match std::fs::remove_file(&marker) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(StateError::Io {
                        path: marker,
                        source,
                    }
                    .into());
                }
            }
        }
        self.withdraw_packages = false;
        tracing::info!(
            "withdrew {withdrawn} KeyPackages published from the KeyPackage store that was set \
             aside, and replaced the last-resort one"
        );
        Ok(())
    }

    /// Claims and checks a member's KeyPackage.
    async fn claim(
        &self,
        session: &Session,
        user: UserId,
    ) -> Result<MemberKeyPackage, ServiceError> {
        let (bytes, _last_resort) = session.claim_key_package(user).await?;
        Ok(MemberKeyPackage::from_bytes(&bytes, user)?)
    }

    /// Creates a conversation with `members` (a 1:1 chat: one member): claims their
    /// KeyPackages, commits the adds (claiming epoch 0 at the relay) and sends them the Welcome.
    pub async fn create(
        &mut self,
        session: &Session,
        members: &[UserId],
    ) -> Result<ConversationId, ServiceError> {
        let mut first = [0u8; 1];
        syncra_core::crypto::fill_random(&mut first);
        self.create_as(session, members, first[0] & 0x80 != 0).await
    }

    /// [`Conversations::create`], as a named group or a 1:1 chat
    /// ([`ConversationId::is_group`]).
    pub async fn create_as(
        &mut self,
        session: &Session,
        members: &[UserId],
        group: bool,
    ) -> Result<ConversationId, ServiceError> {
        let mut packages = Vec::with_capacity(members.len());
        for &user in members {
            packages.push(self.claim(session, user).await?);
        }
        // A new 1:1 chat gets an id below every set-aside one, so that a peer who still holds
        // a set-aside chat with this member sends in the new one (the smaller id wins, §9.8).
        let below = if group {
            None
        } else {
            self.set_aside
                .iter()
                .filter_map(|s| s.id)
                .filter(|id| !id.is_group())
                .min()
        };
        let mut conversation = self.identity.create_conversation_below(group, below)?;
        let id = conversation.id();
        let out = conversation.add(&packages)?;
        self.groups.insert(id, conversation);
        self.refreshed.insert(id, syncra_core::now_ms());
        self.shared_dirty = true;
        match self.commit(session, id, out).await {
            Ok(_) => Ok(id),
            Err(ServiceError::Unanswered { error, .. }) => {
                // Nobody joined it yet: dropped rather than kept pending, and the next try
                // starts another (if this commit did reach the relay, its group is never
                // joined: the Welcome goes only after the verdict).
                self.forget(id)?;
                Err(error.into())
            }
            Err(e) => Err(e),
        }
    }

    /// Adds members to a conversation (a commit, then a Welcome for them).
    pub async fn add(
        &mut self,
        session: &Session,
        id: ConversationId,
        members: &[UserId],
    ) -> Result<u64, ServiceError> {
        let mut packages = Vec::with_capacity(members.len());
        for &user in members {
            packages.push(self.claim(session, user).await?);
        }
        let out = self.conversation(id)?.add(&packages)?;
        self.commit(session, id, out).await
    }

    /// Removes members from a conversation: they cannot read anything after this commit.
    pub async fn remove(
        &mut self,
        session: &Session,
        id: ConversationId,
        members: &[UserId],
    ) -> Result<u64, ServiceError> {
        let out = self.conversation(id)?.remove(members)?;
        self.commit(session, id, out).await
    }

    /// Replaces this member's leaf keys: a copy of its earlier state stops opening anything.
    pub async fn update(
        &mut self,
        session: &Session,
        id: ConversationId,
    ) -> Result<u64, ServiceError> {
        let out = self.conversation(id)?.update()?;
        self.commit(session, id, out).await
    }

    /// The conversations this member is in whose leaf was last refreshed `every_ms` or more
    /// before `now_ms` (or never, as far as this device knows).
    pub fn updates_due(&self, now_ms: u64, every_ms: u64) -> Vec<ConversationId> {
        let mut due: Vec<ConversationId> = self
            .groups
            .iter()
            .filter(|(_, c)| c.is_active())
            .map(|(id, _)| *id)
            .filter(|id| {
                self.refreshed
                    .get(id)
                    .is_none_or(|at| now_ms.saturating_sub(*at) >= every_ms)
            })
            .collect();
        due.sort();
        due
    }

    /// After the identity's keys were rotated (or a device may have been exposed): every
    /// conversation's leaf is due for a refresh at the next [`Conversations::update_due`].
    pub fn all_due(&mut self) {
        self.refreshed.clear();
        self.shared_dirty = true;
    }

    /// Refreshes this member's leaf in every conversation where it is due
    /// ([`Conversations::updates_due`]): one update commit each. A conversation whose update
    /// lost its epoch stays due (rebase it after processing the winner, or try again later).
    pub async fn update_due(
        &mut self,
        session: &Session,
        now_ms: u64,
        every_ms: u64,
    ) -> Vec<(ConversationId, Result<u64, ServiceError>)> {
        let mut done = Vec::new();
        for id in self.updates_due(now_ms, every_ms) {
            let result = self.update(session, id).await;
            done.push((id, result));
        }
        done
    }

    /// Asks to leave a conversation: a proposal to the other members, one of whom commits it.
    /// This member is out once that commit arrives (`removed_me`); a commit that does not
    /// include it ends the epoch the request was made in, so ask again after it.
    pub async fn leave(
        &mut self,
        session: &Session,
        id: ConversationId,
    ) -> Result<(), ServiceError> {
        let recipients = self.others(id)?;
        if recipients.is_empty() {
            return Err(MlsError::NothingToDo("nobody else is in the conversation").into());
        }
        let conversation = self.conversation(id)?;
        let epoch = conversation.epoch();
        let body = conversation.leave()?;
        self.checkpoint(Some(id))?;
        self.carry(
            session,
            id,
            CarriageKind::Proposal,
            epoch,
            recipients,
            &body,
        )
        .await
        .map(drop)
    }

    /// Commits the leave requests this member received in the conversation's current epoch.
    pub async fn commit_departures(
        &mut self,
        session: &Session,
        id: ConversationId,
    ) -> Result<u64, ServiceError> {
        let out = self.conversation(id)?.commit_pending()?;
        self.commit(session, id, out).await
    }

    /// Asks the other members to let this member back into a conversation whose copy fell
    /// behind for good ([`super::rejoin`]): a rejoin request, signed, with a fresh KeyPackage
    /// (on disk before it leaves), sent to each other member this copy knows of. One who has
    /// left the group since is skipped (the relay refuses them as recipients). Answers how
    /// many members the request reached.
    pub async fn ask_to_rejoin(
        &mut self,
        session: &Session,
        id: ConversationId,
    ) -> Result<usize, ServiceError> {
        let recipients = self.others(id)?;
        let conversation = self.groups.get(&id).ok_or(ServiceError::Unknown(id))?;
        let epoch = conversation.epoch();
        let body = self.identity.rejoin_request(conversation)?;
        // The KeyPackage's private half is in the key store, on disk before anyone can use it.
        self.shared_dirty = true;
        self.checkpoint(Some(id))?;
        let mut reached = 0;
        for member in recipients {
            match self
                .carry(
                    session,
                    id,
                    CarriageKind::Rejoin,
                    epoch,
                    vec![member],
                    &body,
                )
                .await
            {
                Ok(_) => reached += 1,
                Err(ServiceError::Net(NetError::Refused {
                    code: ErrorCode::NotAMember,
                    ..
                })) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(reached)
    }

    /// Whether rejoin requests wait for an answer in this conversation.
    pub fn has_rejoin_requests(&self, id: ConversationId) -> bool {
        self.rejoins.get(&id).is_some_and(|r| !r.is_empty())
    }

    /// Answers the rejoin requests received in a conversation: each member still behind is let
    /// back in with one commit (its stuck leaf removed, its new KeyPackage added) and the
    /// Welcome. A request another member answered first is stale by then and dropped. Answers
    /// who was let back in, and what failed.
    pub async fn readmit_pending(
        &mut self,
        session: &Session,
        id: ConversationId,
    ) -> (Vec<UserId>, Vec<ServiceError>) {
        let mut back = Vec::new();
        let mut failed = Vec::new();
        for request in self.rejoins.remove(&id).unwrap_or_default() {
            let member = request.package.user_id();
            let out = match self.conversation(id).and_then(|c| Ok(c.readmit(&request)?)) {
                Ok(out) => out,
                Err(ServiceError::Mls(MlsError::StaleRejoin)) => continue,
                Err(e) => {
                    failed.push(e);
                    continue;
                }
            };
            match self.commit(session, id, out).await {
                Ok(_) => back.push(member),
                Err(e) => failed.push(e),
            }
        }
        (back, failed)
    }

    /// Makes a commit that lost its epoch again, on the epoch the winner moved the group to.
    /// `None` when nothing was lost or the winner already did it all.
    pub async fn rebase(
        &mut self,
        session: &Session,
        id: ConversationId,
    ) -> Result<Option<u64>, ServiceError> {
        let Some(intent) = self.lost.remove(&id) else {
            return Ok(None);
        };
        match self.conversation(id)?.retry(intent)? {
            Some(out) => self.commit(session, id, out).await.map(Some),
            None => Ok(None),
        }
    }

    /// Encrypts `plaintext` for every other member and sends it.
    pub async fn send(
        &mut self,
        session: &Session,
        id: ConversationId,
        plaintext: &[u8],
    ) -> Result<Vec<RecipientOutcome>, ServiceError> {
        let Some((carriage, epoch)) = self.seal(id, plaintext)? else {
            return Ok(Vec::new());
        };
        self.send_carriage(session, id, epoch, carriage).await
    }

    /// Encrypts `plaintext` for every other member into a carriage, without sending it
    /// (`None`: nobody else is in the conversation). With a directory the used message key is
    /// on disk when this returns. Answers the carriage and the epoch it was made in.
    pub fn seal(
        &mut self,
        id: ConversationId,
        plaintext: &[u8],
    ) -> Result<Option<(Vec<u8>, u64)>, ServiceError> {
        let recipients = self.others(id)?;
        if recipients.is_empty() {
            return Ok(None);
        }
        let conversation = self.conversation(id)?;
        let epoch = conversation.epoch();
        let body = conversation.encrypt(plaintext)?;
        self.checkpoint(Some(id))?;
        let carriage = CarriageHeader {
            message_id: message_id(),
            kind: CarriageKind::Application,
            group_id: GroupId(*id.as_bytes()),
            epoch,
            recipients,
            members: Vec::new(),
        }
        .encode(&body);
        Ok(Some((carriage, epoch)))
    }

    /// Sends a carriage made by [`Conversations::seal`]; `wrong_epoch` becomes
    /// [`ServiceError::Behind`].
    pub async fn send_carriage(
        &self,
        session: &Session,
        id: ConversationId,
        epoch: u64,
        carriage: Vec<u8>,
    ) -> Result<Vec<RecipientOutcome>, ServiceError> {
        match session.send(carriage).await {
            Ok(outcomes) => Ok(outcomes),
            Err(NetError::Refused {
                code: ErrorCode::WrongEpoch,
                ..
            }) => Err(ServiceError::Behind {
                conversation: id,
                epoch,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Every member of a conversation but this one.
    fn others(&mut self, id: ConversationId) -> Result<Vec<UserId>, ServiceError> {
        let me = self.identity.user_id();
        Ok(self
            .conversation(id)?
            .roster()?
            .into_iter()
            .filter(|u| *u != me)
            .collect())
    }

    /// Sends an MLS message made in `epoch` that is not a commit; the relay's `wrong_epoch` (the
    /// group moved on meanwhile) becomes [`ServiceError::Behind`].
    async fn carry(
        &self,
        session: &Session,
        id: ConversationId,
        kind: CarriageKind,
        epoch: u64,
        recipients: Vec<UserId>,
        body: &[u8],
    ) -> Result<Vec<RecipientOutcome>, ServiceError> {
        let carriage = CarriageHeader {
            message_id: message_id(),
            kind,
            group_id: GroupId(*id.as_bytes()),
            epoch,
            recipients,
            members: Vec::new(),
        }
        .encode(body);
        self.send_carriage(session, id, epoch, carriage).await
    }

    fn conversation(&mut self, id: ConversationId) -> Result<&mut Conversation, ServiceError> {
        self.groups.get_mut(&id).ok_or(ServiceError::Unknown(id))
    }

    /// Sends a commit this member made: merged once the relay accepts it (then the Welcome goes
    /// to the members it added), dropped with its intent kept when another commit won.
    async fn commit(
        &mut self,
        session: &Session,
        id: ConversationId,
        out: CommitOutput,
    ) -> Result<u64, ServiceError> {
        let me = self.identity.user_id();
        let conversation = self.conversation(id)?;
        let before = conversation.roster()?;
        // What the relay is told the group is after this commit: the staged commit's own
        // outcome (a leave request it carries beside an addition included), never a guess
        // from the change asked for.
        let after = conversation
            .roster_after_pending()?
            .unwrap_or_else(|| before.clone());
        let joiners: Vec<UserId> = match conversation.pending_intent() {
            Some(Intent::Add(added)) => added.iter().map(MemberKeyPackage::user_id).collect(),
            // The one let back in gets the Welcome.
            Some(Intent::Readmit { package, .. }) => vec![package.user_id()],
            Some(Intent::Remove(_) | Intent::Update) | None => Vec::new(),
        };
        // Everyone in the group before the commit gets it, the removed included (so they learn
        // they are out); the added — and a member let back in, whose copy could not process
        // it — get the Welcome instead.
        let recipients: Vec<UserId> = before
            .iter()
            .copied()
            .filter(|u| *u != me && !joiners.contains(u))
            .collect();
        let carriage = CarriageHeader {
            message_id: message_id(),
            kind: CarriageKind::Commit,
            group_id: GroupId(*id.as_bytes()),
            epoch: out.epoch,
            recipients,
            members: after.clone(),
        }
        .encode(&out.commit);
        // The pending commit, and the commit as sent, are on disk before the relay can accept
        // it: if no verdict comes, the same commit goes again.
        self.unsent.insert(
            id,
            Unsent {
                epoch: out.epoch,
                carriage,
                joiners,
                welcome: out.welcome,
            },
        );
        self.shared_dirty = true;
        self.checkpoint(Some(id))?;
        self.settle(session, id).await
    }

    /// Sends this member's unanswered commit in `id` and acts on the verdict: merged once the
    /// relay accepts it (then the Welcome goes to the members it added), dropped with its
    /// intent kept when another commit won, dropped when refused for good. With no verdict
    /// (no answer, or a refusal that may pass) it stays pending, to be sent again.
    async fn settle(&mut self, session: &Session, id: ConversationId) -> Result<u64, ServiceError> {
        let Some(unsent) = self.unsent.get(&id).cloned() else {
            return Err(ServiceError::Unknown(id));
        };
        let mut verdict = session.send(unsent.carriage.clone()).await;
        if let Err(NetError::Refused {
            code: ErrorCode::NotAMember,
            ..
        }) = &verdict
            && let Some(narrowed) = members_only(&unsent.carriage)
        {
            // A commit that won its epoch already is routed again to the group's members only
            // (the relay knows it by its message id, not who it removed): those it removed had
            // it when it won.
            verdict = session.send(narrowed).await;
        }
        let for_now = match &verdict {
            Ok(_) => false,
            Err(NetError::Refused { code, .. }) => code.is_transient(),
            Err(_) => true,
        };
        if for_now && let Err(error) = verdict {
            return Err(ServiceError::Unanswered {
                conversation: id,
                error,
            });
        }
        // The conversation is written before the commit as sent is dropped: a crash between
        // the two leaves a copy of a commit no longer pending, which `resend` drops, never a
        // pending commit without its copy.
        let outcome = match verdict {
            Ok(_) => {
                let epoch = self.conversation(id)?.commit_accepted()?;
                // Every commit of ours carries a fresh path for our leaf.
                self.refreshed.insert(id, syncra_core::now_ms());
                Ok(epoch)
            }
            Err(NetError::Refused {
                code: ErrorCode::CommitConflict,
                ..
            }) => {
                let intent = self.conversation(id)?.commit_rejected()?;
                self.lost.insert(id, intent);
                Err(ServiceError::Conflict {
                    conversation: id,
                    epoch: unsent.epoch,
                })
            }
            Err(e) => {
                // Refused for good (not a member, a malformed carriage): the commit never
                // happened.
                self.conversation(id)?.commit_rejected()?;
                Err(e.into())
            }
        };
        self.checkpoint(Some(id))?;
        self.unsent.remove(&id);
        self.shared_dirty = true;
        self.checkpoint(Some(id))?;
        let epoch = outcome?;
        if let Some(welcome) = unsent.welcome
            && !unsent.joiners.is_empty()
        {
            self.welcomed = self
                .carry(
                    session,
                    id,
                    CarriageKind::Welcome,
                    epoch,
                    unsent.joiners,
                    &welcome,
                )
                .await?;
        }
        Ok(epoch)
    }

    /// Processes one carriage the relay delivered, in the relay's order. With a directory
    /// ([`Conversations::open`]) the change is on disk when this returns.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Arrival, ServiceError> {
        let arrival = self.process_carriage(bytes)?;
        let id = match &arrival {
            Arrival::Joined { conversation, .. }
            | Arrival::RejoinRequest { conversation, .. }
            | Arrival::Message { conversation, .. }
            | Arrival::LeaveRequest { conversation, .. }
            | Arrival::Commit { conversation, .. } => *conversation,
        };
        self.checkpoint(Some(id))?;
        Ok(arrival)
    }

    /// What the relay answered for the last Welcome this member sent, per joiner (`offline`
    /// on a relay without a mailbox: that joiner will never be in the conversation).
    pub fn welcome_outcomes(&self) -> &[RecipientOutcome] {
        &self.welcomed
    }

    /// Drops a conversation this member made but nobody else joined (its Welcome reached no
    /// one), with its state on disk.
    pub fn forget(&mut self, id: ConversationId) -> Result<(), StateError> {
        self.groups.remove(&id);
        self.lost.remove(&id);
        self.refreshed.remove(&id);
        self.unsent.remove(&id);
        if let Some(store) = &self.store {
            let path = store.dir.join(format!("{id}{STATE_SUFFIX}"));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(StateError::Io { path, source }),
            }
        }
        self.checkpoint(None)
    }

    /// The conversations set aside because their state was damaged ([`SetAside`]).
    pub fn set_aside(&self) -> &[SetAside] {
        &self.set_aside
    }

    /// What a commit to make again ([`Conversations::rebase`]) meant to do, if there is one.
    pub fn lost_intent(&self, id: ConversationId) -> Option<Intent> {
        self.lost.get(&id).cloned()
    }

    /// The conversations with a commit of this member's that has no verdict yet
    /// ([`ServiceError::Unanswered`]).
    pub fn unanswered(&self) -> Vec<ConversationId> {
        self.unsent.keys().copied().collect()
    }

    /// Sends this member's commit in `id` that has no verdict yet again: the same commit, with
    /// the same message id, so the relay routes it if it won its epoch already and decides now
    /// if it had not. Answers the epoch it reached; `None` when there is no such commit, or it
    /// is no longer pending (another commit ended its epoch meanwhile: then it is dropped).
    pub async fn resend(
        &mut self,
        session: &Session,
        id: ConversationId,
    ) -> Result<Option<u64>, ServiceError> {
        let Some(unsent) = self.unsent.get(&id) else {
            return Ok(None);
        };
        let still_pending = self
            .groups
            .get(&id)
            .is_some_and(|c| c.pending_intent().is_some() && c.epoch() == unsent.epoch);
        if !still_pending {
            self.unsent.remove(&id);
            self.shared_dirty = true;
            self.checkpoint(Some(id))?;
            return Ok(None);
        }
        self.settle(session, id).await.map(Some)
    }

    fn process_carriage(&mut self, bytes: &[u8]) -> Result<Arrival, ServiceError> {
        let carried = carriage::parse(bytes)?;
        let header = carried.header;
        let id = ConversationId::from_bytes(header.group_id.0);
        if header.kind == CarriageKind::Rejoin {
            let request = RejoinRequest::from_bytes(carried.body, id, header.epoch)?;
            let member = request.package.user_id();
            self.conversation(id)?.check_rejoin(&request)?;
            let pending = self.rejoins.entry(id).or_default();
            pending.retain(|r| r.package.user_id() != member);
            pending.push(request);
            return Ok(Arrival::RejoinRequest {
                conversation: id,
                member,
            });
        }
        if header.kind == CarriageKind::Welcome {
            // A Welcome to a conversation this member is in is one already processed — unless
            // its copy is behind the Welcome's epoch or out of the group: then the others let
            // it back in (a removal and an addition in one commit, which only a member can
            // make), and the copy is replaced.
            // Only a member of the copy it replaces can have made it: the Welcome's signer must
            // be in that copy's roster (a relay knows group ids and can claim KeyPackages, but
            // cannot sign as a member).
            let replaced = match self.groups.get(&id) {
                None => None,
                Some(old) if !old.is_active() || old.epoch() < header.epoch => Some(old.roster()?),
                Some(_) => {
                    return Err(MlsError::Unsupported(
                        "a Welcome to a conversation already joined",
                    )
                    .into());
                }
            };
            let rejoined = replaced.is_some();
            let conversation = match &replaced {
                None => self.identity.join(carried.body)?,
                Some(members) => self.identity.rejoin_from(carried.body, members)?,
            };
            if conversation.id() != id || conversation.epoch() != header.epoch {
                return Err(ServiceError::Mismatch {
                    declared: format!("a Welcome to {id} in epoch {}", header.epoch),
                    actual: format!(
                        "a Welcome to {} in epoch {}",
                        conversation.id(),
                        conversation.epoch()
                    ),
                });
            }
            let roster = conversation.roster()?;
            let epoch = conversation.epoch();
            self.groups.insert(id, conversation);
            self.lost.remove(&id);
            // Joined with a fresh KeyPackage: the leaf is as fresh as that package. The package
            // left the store.
            self.refreshed.insert(id, syncra_core::now_ms());
            self.shared_dirty = true;
            return Ok(Arrival::Joined {
                conversation: id,
                roster,
                epoch,
                rejoined,
            });
        }
        let framing = Framing::of(carried.body)?;
        let kind = match framing.kind {
            FramedKind::Application => CarriageKind::Application,
            FramedKind::Commit => CarriageKind::Commit,
            FramedKind::Proposal => CarriageKind::Proposal,
        };
        if kind != header.kind
            || framing.group != header.group_id.0
            || framing.epoch != header.epoch
        {
            return Err(ServiceError::Mismatch {
                declared: format!("a {} in epoch {} of {id}", header.kind.name(), header.epoch),
                actual: format!(
                    "a {} in epoch {} of {}",
                    kind.name(),
                    framing.epoch,
                    ConversationId::from_bytes(framing.group)
                ),
            });
        }
        let conversation = self.conversation(id)?;
        match conversation.process(carried.body)? {
            Incoming::Message {
                sender,
                plaintext,
                epoch,
            } => Ok(Arrival::Message {
                conversation: id,
                sender,
                plaintext,
                epoch,
            }),
            Incoming::LeaveRequest { member } => Ok(Arrival::LeaveRequest {
                conversation: id,
                member,
            }),
            Incoming::Commit {
                by,
                events,
                epoch,
                removed_me,
                discarded,
            } => {
                let rebase = discarded.is_some() || self.lost.contains_key(&id);
                if let Some(intent) = discarded {
                    self.lost.insert(id, intent);
                }
                // The relay keeps the member list that came beside the commit (unsigned: its
                // author's word, or the relay's): compared with the roster the commit made.
                // A commit that removed this member: only its own absence can be checked.
                let wrong = if removed_me {
                    header.members.contains(&self.identity.user_id())
                } else {
                    let mut declared = header.members.clone();
                    let mut actual = self.conversation(id)?.roster()?;
                    declared.sort_unstable();
                    actual.sort_unstable();
                    declared != actual
                };
                let misdeclared = wrong.then(|| header.members.clone());
                if let Some(declared) = &misdeclared {
                    tracing::warn!(
                        "conversation {id}: the member list that came with {by}'s commit ({} \
                         people) is not the roster the commit made",
                        declared.len()
                    );
                }
                Ok(Arrival::Commit {
                    conversation: id,
                    by,
                    events,
                    epoch,
                    removed_me,
                    rebase,
                    misdeclared,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A removal sent again goes to the members it declares only, the same message id and MLS
    /// message; a carriage already addressed to members only is left as it is.
    #[test]
    fn a_commit_sent_again_to_members_only_keeps_its_id_and_message() {
        let [a, b, gone] = [1u8, 2, 3].map(|n| UserId::from_identity_key(&[n; 32]));
        let header = CarriageHeader {
            message_id: [4; 16],
            kind: CarriageKind::Commit,
            group_id: GroupId([5; 16]),
            epoch: 9,
            recipients: vec![b, gone],
            members: vec![a, b],
        };
        let narrowed = members_only(&header.encode(b"mls")).unwrap();
        let parsed = carriage::parse(&narrowed).unwrap();
        assert_eq!(parsed.body, b"mls");
        assert_eq!(
            parsed.header,
            CarriageHeader {
                recipients: vec![b],
                ..header.clone()
            }
        );
        assert_eq!(members_only(&narrowed), None);
    }

    /// The unanswered commits read back as written, with or without a Welcome; a list cut
    /// short anywhere, or with bytes after it, is refused whole (the file is then set aside).
    #[test]
    fn unanswered_commits_read_back_as_written_and_damage_is_refused() {
        let joiner = UserId::from_identity_key(&[5; 32]);
        let mut all = HashMap::new();
        all.insert(
            ConversationId::from_bytes([1; 16]),
            Unsent {
                epoch: 7,
                carriage: vec![1, 2, 3],
                joiners: vec![joiner],
                welcome: Some(vec![9; 40]),
            },
        );
        all.insert(
            ConversationId::from_bytes([2; 16]),
            Unsent {
                epoch: u64::MAX,
                carriage: Vec::new(),
                joiners: Vec::new(),
                welcome: None,
            },
        );
        let bytes = Unsent::encode_all(&all);
        assert_eq!(Unsent::decode_all(&bytes), Some(all));
        assert_eq!(
            Unsent::decode_all(&Unsent::encode_all(&HashMap::new())),
            Some(HashMap::new())
        );
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Unsent::decode_all(&longer), None);
        for cut in 0..bytes.len() {
            assert_eq!(Unsent::decode_all(&bytes[..cut]), None, "cut at {cut}");
        }
    }
}

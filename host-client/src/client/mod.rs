//! The client engine: everything the headless commands, the terminal UI and the bot runner
//! share — keys, contacts, groups, history, the outbox and the relay connection.
//!
//! It is a plain struct driven by one task (`&mut self` methods): the TUI and the bot runner put
//! it behind an actor loop; the headless commands call it directly.

use std::sync::Arc;

use anyhow::{Context, bail};
use data_encoding::HEXLOWER;
use syncra_core::crypto::envelope::{AcceptWindow, MESSAGE_ID_LEN, MessageId, ReplayGuard};
use syncra_core::crypto::keyfile::KdfParams;
use syncra_core::crypto::safety::{fingerprint, safety_number};
use syncra_core::wire::{ErrorCode, Outcome, RecipientOutcome};
use syncra_core::{Handle, IdentityRecord, UserId};
use syncra_transport_ws::WsTransport;
use tokio::sync::mpsc;

use crate::contacts::{Book, Contact, Group, PinOutcome};
use crate::history::{Delivery, History, StoredMessage};
use crate::home::{Home, Settings};
use crate::keystore::KeyStore;
use crate::message::Content;
use crate::mls::{Arrival, ConversationId, Conversations};
use crate::net::{Dial, Login, NetError, Push, Session};
use crate::outbox::{Outbox, Pending};

mod conversations;
mod groups;
mod receive;
mod send;
mod spool;

pub use conversations::KEY_PACKAGE_TARGET;

/// Where a message goes: a contact or a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A contact, by user id.
    Direct(UserId),
    /// A group, by id.
    Group(String),
}

impl Target {
    /// The history file name of this conversation.
    pub fn conversation(&self) -> String {
        match self {
            Target::Direct(id) => id.to_string(),
            Target::Group(g) => format!("group-{g}"),
        }
    }

    /// Parses a history file name back.
    pub fn from_conversation(name: &str) -> Option<Target> {
        match name.strip_prefix("group-") {
            Some(g) if crate::contacts::valid_group_id(g) => Some(Target::Group(g.to_owned())),
            Some(_) => None,
            None => name.parse().ok().map(Target::Direct),
        }
    }

    /// As the UI contract's conversation id.
    pub fn to_ui(&self) -> syncra_core::ui::ConversationId {
        match self {
            Target::Direct(id) => syncra_core::ui::ConversationId::Direct(*id),
            Target::Group(g) => syncra_core::ui::ConversationId::Group(g.clone()),
        }
    }
}

/// What happened to a send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendReport {
    /// The message id (hex).
    pub id: String,
    /// The overall state.
    pub state: SendState,
    /// Per-recipient outcomes, if the relay answered.
    pub outcomes: Vec<RecipientOutcome>,
}

/// What went wrong in a call of the client engine, by kind: a frontend decides what to do (and
/// a command its exit code) by matching the kind, never by reading the words.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The call needs a connection to the relay and there is none.
    #[error("not connected to the relay; check `syncra status`")]
    NotConnected,
    /// The relay refused the request or could not be reached.
    #[error(transparent)]
    Relay(NetError),
    /// No contact, group or person by that name (or nobody registered under it).
    #[error("{0}")]
    Unknown(String),
    /// Not allowed as things stand: sending to a contact whose key changed before it is
    /// re-verified, changing a group one did not create, adding oneself.
    #[error("{0}")]
    Refused(String),
    /// What was asked for is not valid: an empty message, a bad group name, nothing to change.
    #[error("{0}")]
    Invalid(String),
    /// The relay's answer contradicts what is pinned (another key for a contact).
    #[error("{0}")]
    Untrusted(String),
    /// A local failure: the disk, a damaged or locked file, a wrong passphrase.
    #[error("{0:#}")]
    Local(anyhow::Error),
}

impl From<anyhow::Error> for ClientError {
    /// A kind raised deep inside keeps its kind; anything else is local.
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<ClientError>() {
            Ok(kind) => kind,
            Err(e) => match e.downcast::<NetError>() {
                Ok(net) => ClientError::Relay(net),
                Err(e) => ClientError::Local(e),
            },
        }
    }
}

impl From<NetError> for ClientError {
    fn from(e: NetError) -> Self {
        ClientError::Relay(e)
    }
}

/// Why a registration failed, by what the person has to change.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The handle: taken, invalid, or this identity already registered under another.
    #[error("{0}")]
    Handle(String),
    /// The relay: unreachable, refused, or not a Syncra relay.
    #[error("{0}")]
    Relay(String),
    /// Local state (saving the settings).
    #[error("{0:#}")]
    Local(anyhow::Error),
}

/// The overall state of a send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendState {
    /// Every recipient's live session took it.
    Delivered,
    /// At least one recipient was offline (the relay keeps no mailbox).
    Offline,
    /// No recipient was offline, and at least one was not connected: the relay holds the
    /// sealed message in their mailbox until they log in.
    Stored,
    /// The relay refused it for at least one recipient.
    Failed(String),
    /// The relay could not be reached; the message waits in the outbox.
    Queued(String),
}

impl SendState {
    fn delivery(&self) -> Delivery {
        match self {
            SendState::Delivered => Delivery::Delivered,
            SendState::Offline => Delivery::Offline,
            SendState::Stored => Delivery::Stored,
            SendState::Failed(_) => Delivery::Failed,
            SendState::Queued(_) => Delivery::Sending,
        }
    }
}

/// Something that arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A message to show.
    Message {
        /// The conversation it belongs to.
        target: Target,
        /// The group's local name, for a group message.
        group_name: Option<String>,
        /// The sender.
        from: UserId,
        /// The sender's handle (or short id).
        from_name: String,
        /// The text.
        text: String,
        /// The sender's timestamp.
        timestamp_ms: u64,
        /// The message id (hex).
        id: String,
        /// The sender is not a contact: this is a message request.
        request: bool,
        /// Group events this message carried, oldest first ("alice added eve"); shown before
        /// the text. A membership-only message has an empty text.
        events: Vec<String>,
    },
    /// A message from a new key for a pinned handle: held until the person re-verifies.
    Held {
        /// The handle whose key changed.
        handle: String,
        /// The new identity's id.
        from: UserId,
    },
    /// A delivery that did not open (tampered, not for me, too old...) or that was refused
    /// (a post from a non-member, an invalid group id...). It was skipped.
    Rejected {
        /// Why.
        reason: String,
    },
    /// A relay notice not tied to a request.
    Notice(String),
}

/// What [`Client::open_delivery`] found.
#[derive(Debug)]
pub enum Opening {
    /// Nothing more to do: refused (said why), or a repeat already shown (`None`).
    Done(Option<Incoming>),
    /// Opened; file it with [`Client::file_delivery`].
    Opened(Opened),
}

/// How long a conversation's copy must stay behind a later epoch before its members are asked
/// to let it back in: longer than the 30 s ping at which a mailbox entry stored during a login
/// race arrives, so a commit that is merely late is not mistaken for one that is lost.
pub const REJOIN_GRACE: std::time::Duration = std::time::Duration::from_secs(45);

/// How long a copy still behind waits for an answer to its rejoin request before asking again
/// (the request, or the Welcome that answered it, can be lost like any commit); doubled after
/// each unanswered request, up to [`REJOIN_RETRY_MAX`].
pub const REJOIN_RETRY: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// The longest wait between two rejoin requests of a copy still behind.
pub const REJOIN_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(6 * 60 * 60);

/// A rejoin request this process sent for a conversation ([`Client::follow_up`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Asked {
    /// The epoch the copy was stuck in.
    epoch: u64,
    /// When the request went out.
    at: std::time::Instant,
    /// How long to wait for an answer before asking again.
    wait: std::time::Duration,
}

/// Deliveries from a later epoch than their conversation's copy reached, held at most (they
/// wait for a commit that is late; beyond this the oldest is refused).
pub const HELD_FUTURE_MAX: usize = 256;

/// A delivery MLS processed (its sender authenticated, its state saved) that is not filed
/// yet. Only [`Client::file_delivery`] can use it. If it was spooled ([`Client::spool`]) while
/// it waits, the file's path: removed once it is filed.
#[derive(Debug)]
pub struct Opened(Box<Arrival>, Option<std::path::PathBuf>);

impl Opened {
    /// Who it is from, as MLS authenticated it (a commit: its committer; a Welcome: the first
    /// member of the roster it brings).
    pub fn sender(&self) -> UserId {
        match &*self.0 {
            Arrival::Message { sender, .. } => *sender,
            Arrival::Commit { by, .. } => *by,
            Arrival::LeaveRequest { member, .. } | Arrival::RejoinRequest { member, .. } => *member,
            Arrival::Joined { roster, .. } => roster
                .first()
                .copied()
                .unwrap_or_else(|| UserId::from_identity_key(&[0; 32])),
        }
    }
}

/// One line a frontend shows for an incoming message — the one place that turns what arrived
/// into what `listen` prints, the TUI draws and a bot is given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shown {
    /// A group event ("alice added eve") rather than something a person wrote.
    pub event: bool,
    /// From someone who is not a contact: a message request.
    pub request: bool,
    /// The conversation.
    pub target: Target,
    /// The group's local name, for a group message.
    pub group_name: Option<String>,
    /// The sender.
    pub from: UserId,
    /// The sender's handle (or short id).
    pub from_name: String,
    /// The message id (hex; events get `<id>-event-<n>`).
    pub id: String,
    /// The sender's timestamp.
    pub timestamp_ms: u64,
    /// The text (untrusted: escape it before a terminal sees it).
    pub text: String,
}

impl Incoming {
    /// The lines to show for a message, events first; nothing for other kinds.
    pub fn shown(&self) -> Vec<Shown> {
        let Incoming::Message {
            target,
            group_name,
            from,
            from_name,
            text,
            timestamp_ms,
            id,
            request,
            events,
        } = self
        else {
            return Vec::new();
        };
        let line = |event: bool, id: String, text: &str| Shown {
            event,
            request: *request && !event,
            target: target.clone(),
            group_name: group_name.clone(),
            from: *from,
            from_name: from_name.clone(),
            id,
            timestamp_ms: *timestamp_ms,
            text: text.to_owned(),
        };
        let mut lines: Vec<Shown> = events
            .iter()
            .enumerate()
            .map(|(n, e)| line(true, format!("{id}-event-{n}"), e))
            .collect();
        if !text.is_empty() {
            lines.push(line(false, id.clone(), text));
        }
        lines
    }
}

/// Safety-number information about a contact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SafetyInfo {
    /// The contact's handle.
    pub handle: String,
    /// The identity the number is for (the new one if the key changed).
    pub user_id: UserId,
    /// The 60 digits.
    pub number: String,
    /// Whether it is marked verified (after this call).
    pub verified: bool,
    /// Whether this is a changed key that was waiting for re-verification.
    pub key_changed: bool,
}

fn hex_id(id: &MessageId) -> String {
    HEXLOWER.encode(id)
}

fn new_message_id() -> MessageId {
    let mut id = [0u8; MESSAGE_ID_LEN];
    syncra_core::crypto::fill_random(&mut id);
    id
}

/// The client engine.
pub struct Client {
    home: Home,
    settings: Settings,
    keys: KeyStore,
    book: Book,
    history: History,
    outbox: Outbox,
    /// The MLS conversations (shared with other processes of this home under a lock).
    mls: Conversations,
    /// Conversations with something to do that needs the relay ([`Client::follow_up`]).
    follow_ups: std::collections::BTreeSet<ConversationId>,
    /// When this member's commits with no verdict are next sent again (`None`: at the next
    /// follow-up; a login resets it).
    resend_at: Option<std::time::Instant>,
    /// Conversations whose copy met a message from a later epoch than it can reach (a commit
    /// was lost for it), with that epoch and when it was first met: asked to be let back in
    /// once it has stayed behind for `rejoin_grace`.
    behind: std::collections::BTreeMap<ConversationId, (u64, std::time::Instant)>,
    /// How long a copy must stay behind before asking ([`Client::rejoin_after`]).
    rejoin_grace: std::time::Duration,
    /// Events follow-ups noted, for a long-running session to show ([`Client::note_live`]).
    shown_later: Vec<Incoming>,
    /// Deliveries from a later epoch than their conversation's copy reached (conversation,
    /// epoch, carriage), in arrival order: processed once the commits before them are, refused
    /// if the copy is let back in instead.
    held_future: std::collections::VecDeque<(ConversationId, u64, Vec<u8>)>,
    /// Conversations a filed commit moved to a later epoch (conversation, epoch), whose held
    /// deliveries are processed next ([`Client::file_delivery`]).
    moved_on: std::collections::VecDeque<(ConversationId, u64)>,
    /// The last rejoin request per conversation still behind: asked again if no answer came
    /// in its wait (a restart asks again at once; the members find a request stale once one of
    /// them answered it).
    asked_rejoin: std::collections::BTreeMap<ConversationId, Asked>,
    /// The first wait for an answer to a rejoin request ([`Client::rejoin_again_after`]).
    rejoin_retry: std::time::Duration,
    /// Message ids already filed, per sender: a message sent twice shows once.
    guard: ReplayGuard,
    replay_log: crate::replay::ReplayLog,
    transport: Arc<WsTransport>,
    session: Option<Arc<Session>>,
    token: Option<String>,
    pushes_tx: mpsc::Sender<Push>,
    pushes_rx: Option<mpsc::Receiver<Push>>,
    /// Deliveries refused or skipped since this process started.
    rejected: u64,
    /// `--insecure-plaintext` was given: not to be saved into settings.toml.
    insecure_flag: bool,
    /// The prekey this process has seen the relay accept (see `rotate_prekey_if_due`).
    published: Option<syncra_core::crypto::keys::PrekeyPublic>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("home", &self.home.root())
            .field("user", &self.keys.user_id())
            .finish_non_exhaustive()
    }
}

/// Options for creating an identity.
#[derive(Clone, Copy, Debug)]
pub struct InitOptions {
    /// Argon2id parameters.
    pub kdf: KdfParams,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            kdf: KdfParams::DEFAULT,
        }
    }
}

impl Client {
    /// Creates a new identity in `home`. Refuses to overwrite an existing one.
    pub fn init(home: Home, passphrase: &str, options: InitOptions) -> anyhow::Result<Client> {
        home.ensure()?;
        if home.has_identity() {
            bail!(
                "{} already has an identity; refusing to overwrite it (use another SYNCRA_HOME)",
                home.root().display()
            );
        }
        let mut keys = KeyStore::create(passphrase.as_bytes(), options.kdf, now_secs())?;
        keys.save(&home.key_file())?;
        if !home.settings_file().exists() {
            home.save_settings(&Settings::default())?;
        }
        Self::assemble(home, keys)
    }

    /// Unlocks the identity in `home`.
    pub fn open(home: Home, passphrase: &str) -> anyhow::Result<Client> {
        home.require_identity()?;
        let keys = KeyStore::unlock(&home.key_file(), passphrase.as_bytes(), false)?;
        Self::assemble(home, keys)
    }

    fn assemble(home: Home, keys: KeyStore) -> anyhow::Result<Client> {
        let settings = home.settings()?;
        let book = Book::load(
            home.contacts_file(),
            home.groups_file(),
            keys.storage.clone(),
        )?;
        let history = History::new(home.chats_dir(), keys.storage.clone(), settings.fsync);
        let outbox = Outbox::new(home.outbox_dir(), keys.storage.clone());
        let mls = Conversations::open(&keys.identity, &home.mls_dir(), &keys.storage)
            .context("opening the MLS conversations")?;
        let transport =
            crate::net::transport(settings.ca_file.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (pushes_tx, pushes_rx) = mpsc::channel(1024);
        let mut guard = ReplayGuard::new(AcceptWindow::default(), 100_000);
        let replay_log =
            crate::replay::ReplayLog::new(home.root().join("replay.log"), keys.storage.clone());
        replay_log.load_into(&mut guard, syncra_core::now_ms())?;
        let mut client = Client {
            home,
            settings,
            keys,
            book,
            history,
            outbox,
            mls,
            follow_ups: Default::default(),
            resend_at: None,
            behind: Default::default(),
            rejoin_grace: REJOIN_GRACE,
            shown_later: Vec::new(),
            held_future: Default::default(),
            moved_on: Default::default(),
            asked_rejoin: Default::default(),
            rejoin_retry: REJOIN_RETRY,
            guard,
            replay_log,
            transport,
            session: None,
            token: None,
            pushes_tx,
            pushes_rx: Some(pushes_rx),
            rejected: 0,
            insecure_flag: false,
            published: None,
        };
        // Messages a crash left between opening and filing (client/spool.rs).
        let filed = client
            .file_spooled()
            .context("filing the messages a crash left unfiled")?;
        if filed > 0 {
            tracing::info!("filed {filed} messages a previous run had opened but not filed");
        }
        Ok(client)
    }

    /// My user id.
    pub fn user_id(&self) -> UserId {
        self.keys.user_id()
    }

    /// The key that seals the private stores of this identity's bots and extensions at rest
    /// (the storage key that seals history; each store is bound to its plugin's name).
    pub fn plugin_store_key(&self) -> syncra_plugin_wasm::StoreKey {
        syncra_plugin_wasm::StoreKey(self.keys.storage.clone())
    }

    /// My fingerprint (my half of every safety number).
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.keys.identity.public())
    }

    /// Allows plaintext `ws://` to a relay that is not loopback for this process
    /// (`--insecure-plaintext`); settings.toml is not changed.
    pub fn allow_insecure_plaintext(&mut self) {
        self.settings.insecure_plaintext = true;
        self.insecure_flag = true;
    }

    /// Saves the settings; a `--insecure-plaintext` given for this process is not saved.
    fn save_settings(&self) -> anyhow::Result<()> {
        let mut settings = self.settings.clone();
        if self.insecure_flag {
            settings.insecure_plaintext = self.home.settings()?.insecure_plaintext;
        }
        self.home.save_settings(&settings)
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The home directory.
    pub fn home(&self) -> &Home {
        &self.home
    }

    /// Contacts and groups.
    pub fn book(&self) -> &Book {
        &self.book
    }

    /// The local history.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Takes the channel of pushes (deliveries, notices) from the relay. Only one consumer.
    pub fn take_pushes(&mut self) -> Option<mpsc::Receiver<Push>> {
        self.pushes_rx.take()
    }

    /// Tells the relay a mailbox entry is handled (see [`Push::Pending`]). A failure only means
    /// the entry comes again at the next login, so it is logged, not returned.
    pub async fn acknowledge(&self, entry_id: u64) {
        if let Some(session) = self.session()
            && let Err(e) = session.acknowledge(entry_id).await
        {
            tracing::debug!("acknowledging mailbox entry {entry_id}: {e}");
        }
    }

    /// Whether a connection is up.
    pub fn is_connected(&self) -> bool {
        self.session.as_ref().is_some_and(|s| !s.is_closed())
    }

    /// The current session, if connected.
    pub fn session(&self) -> Option<Arc<Session>> {
        self.session.clone().filter(|s| !s.is_closed())
    }

    fn relay_url(&self) -> anyhow::Result<String> {
        self.settings
            .relay
            .clone()
            .context("no relay configured; run `syncra register --relay URL --handle NAME` first")
    }

    /// Registers this identity on a relay under a handle and remembers both.
    pub async fn register(&mut self, relay: &str, handle: &str) -> Result<(), RegisterError> {
        let parsed = Handle::parse(handle)
            .map_err(|e| RegisterError::Handle(format!("{e}; pick another with --handle")))?;
        let session = Session::connect(
            &self.transport,
            Dial {
                url: relay,
                relay_id: None,
                identity: &self.keys.identity,
                insecure_plaintext: self.settings.insecure_plaintext,
                pushes_unread: self.pushes_rx.is_some(),
            },
            Login::Register {
                handle: parsed.as_str().to_owned(),
                prekey: self.keys.ring.current().signed().clone(),
            },
            None,
            self.pushes_tx.clone(),
        )
        .await
        .map_err(|e| match e {
            NetError::Refused {
                code: ErrorCode::HandleTaken,
                ..
            } => RegisterError::Handle(format!(
                "handle {:?} is taken; pick another with --handle",
                parsed.as_str()
            )),
            NetError::Refused {
                code: ErrorCode::HandleInvalid,
                message,
            } => RegisterError::Handle(format!("{message}; pick another with --handle")),
            NetError::Refused {
                code: ErrorCode::AlreadyRegistered,
                ..
            } => RegisterError::Handle(format!(
                "this identity is already registered on {relay} (under another handle)"
            )),
            other => RegisterError::Relay(format!("registering on {relay}: {other}")),
        })?;
        self.settings.relay = Some(relay.to_owned());
        self.settings.relay_id = Some(session.relay_id.clone());
        self.settings.handle = Some(parsed.as_str().to_owned());
        self.save_settings().map_err(RegisterError::Local)?;
        self.token = Some(session.token.clone());
        self.session = Some(session);
        if let Err(e) = self.maintain_mls().await {
            tracing::warn!("publishing MLS KeyPackages failed (will retry): {e:#}");
        }
        Ok(())
    }

    /// Connects (or reconnects) to the configured relay, then does the key upkeep that needs
    /// it ([`Client::upkeep`]).
    pub async fn connect(&mut self) -> Result<(), NetError> {
        if self.is_connected() {
            return Ok(());
        }
        self.login().await?;
        self.upkeep().await;
        Ok(())
    }

    /// Connects (or reconnects) to the configured relay and logs in, nothing more: a session
    /// that reads its deliveries ([`Serve`]) reads the login's backlog before anything that
    /// waits for an answer (an answer can sit behind a backlog larger than the deliveries
    /// channel), then calls [`Client::upkeep`].
    pub async fn login(&mut self) -> Result<(), NetError> {
        if self.is_connected() {
            return Ok(());
        }
        let url = self
            .relay_url()
            .map_err(|e| NetError::Unreachable(e.to_string()))?;
        let session = Session::connect(
            &self.transport,
            Dial {
                url: &url,
                relay_id: self.settings.relay_id.as_deref(),
                identity: &self.keys.identity,
                insecure_plaintext: self.settings.insecure_plaintext,
                pushes_unread: self.pushes_rx.is_some(),
            },
            Login::Auth,
            self.token.take(),
            self.pushes_tx.clone(),
        )
        .await?;
        if self.settings.relay_id.is_none() {
            // Registered before relay ids were pinned: pin the id of this first login.
            self.settings.relay_id = Some(session.relay_id.clone());
            if let Err(e) = self.save_settings() {
                tracing::warn!("could not save the relay id to settings.toml: {e:#}");
            }
        }
        self.token = Some(session.token.clone());
        self.session = Some(session);
        // A commit left without a verdict goes again at the first follow-up.
        self.resend_at = None;
        Ok(())
    }

    /// What a fresh connection does for the keys: rotates the prekey if due, stocks the
    /// KeyPackage directory and refreshes leaves that are due. A failure is logged and tried
    /// again later.
    pub async fn upkeep(&mut self) {
        // Before the leaf updates: a commit still without a verdict would hold them back.
        self.resend_unanswered().await;
        if let Err(e) = self.rotate_prekey_if_due().await {
            // A long-running session (`Serve`) retries with backoff; a one-shot command
            // retries at its next connection.
            tracing::warn!("prekey rotation failed (will retry): {e:#}");
        }
        if let Err(e) = self.maintain_mls().await {
            tracing::warn!("MLS upkeep failed (will retry): {e:#}");
        }
    }

    /// Rotates the signed prekey if it is due and erases retired ones past their grace, saving
    /// the key file and publishing the new prekey. Long-running sessions call it on a timer
    /// ([`Serve`]), so forward secrecy does not depend on reconnecting.
    pub async fn maintain_keys(&mut self) -> Result<(), ClientError> {
        self.rotate_prekey_if_due().await?;
        self.maintain_mls().await
    }

    /// Disconnects politely. A one-shot command first files what the relay delivered to it
    /// meanwhile: a commit taken by this session and dropped would leave the conversation
    /// behind.
    pub async fn disconnect(&mut self) {
        if self.is_connected()
            && let Err(e) = self.settle_deliveries().await
        {
            tracing::warn!("filing what arrived before disconnecting: {e:#}");
        }
        if let Some(s) = self.session.take() {
            s.close().await;
        }
    }

    async fn rotate_prekey_if_due(&mut self) -> anyhow::Result<()> {
        let day = 24 * 3600;
        let rotation = self.settings.prekey_rotation_days.max(1) * day;
        let grace = self.settings.prekey_grace_days * day;
        // Under the key file's lock, on what it holds now: another process on this home may
        // have rotated already (then it is not due here) or erased a retired prekey.
        // Saved before publishing: the new private prekey must exist on disk before anyone can
        // seal to it.
        let rotated = self.keys.update(&self.home.key_file(), |keys| {
            let before = keys.ring.retired().len();
            let new = keys.rotate_if_due(now_secs(), rotation, grace);
            let changed = new.is_some() || keys.ring.retired().len() != before;
            (new.is_some(), changed)
        })?;
        if rotated {
            // After a key rotation every conversation's leaf is refreshed too.
            let _lock = self.mls.lock(&self.keys.identity).await?;
            self.mls.all_due();
        }
        // Published whenever the relay may not have it yet: a rotation made while offline, or
        // whose publication failed, or made by another process on this home, is published at
        // the next chance instead of never.
        let current = self.keys.ring.current().signed().clone();
        if self.published != Some(current.public)
            && let Some(session) = self.session()
        {
            session.rotate_prekey(current.clone()).await?;
            self.published = Some(current.public);
            if rotated {
                tracing::info!("rotated the signed prekey");
            }
        }
        Ok(())
    }

    fn require_session(&self) -> anyhow::Result<Arc<Session>> {
        self.session()
            .ok_or_else(|| ClientError::NotConnected.into())
    }

    /// Looks up `query` (a handle or a user id) and pins it as a contact.
    pub async fn add_contact(&mut self, query: &str) -> Result<(Contact, PinOutcome), ClientError> {
        let session = self.require_session()?;
        let record = match query.parse::<UserId>() {
            Ok(id) => session.lookup_id(id).await,
            Err(_) => session.lookup_handle(query).await,
        }
        .map_err(|e| match e {
            NetError::Refused {
                code: ErrorCode::NotFound,
                ..
            } => ClientError::Unknown(format!("nobody is registered as {query:?} on this relay")),
            NetError::Refused {
                code: ErrorCode::HandleInvalid,
                message,
            } => ClientError::Invalid(message),
            other => ClientError::Relay(other),
        })?;
        if record.user_id == self.user_id() {
            return Err(ClientError::Refused("that is you".into()));
        }
        let _lock = self.book.lock()?;
        let outcome = self.book.pin(record.clone(), false, syncra_core::now_ms());
        self.book.save()?;
        let contact = match &outcome {
            PinOutcome::KeyChanged(c) => (**c).clone(),
            _ => self
                .book
                .by_id(&record.user_id)
                .cloned()
                .context("contact vanished")?,
        };
        Ok((contact, outcome))
    }

    /// The safety number with a contact; with `mark`, marks it verified (and accepts a changed
    /// key, which is the only way to unblock a contact whose key changed).
    pub fn verify(&mut self, handle: &str, mark: bool) -> Result<SafetyInfo, ClientError> {
        let _lock = self.book.lock()?;
        let contact = self.book.by_handle(handle).cloned().ok_or_else(|| {
            ClientError::Unknown(format!(
                "{handle:?} is not a contact; add it with `syncra contact add`"
            ))
        })?;
        let mine = self.keys.identity.public();
        if let Some(new) = &contact.key_changed {
            let number = safety_number(&mine, &new.identity_key);
            if mark {
                self.book
                    .accept_key_change(handle, syncra_core::now_ms())
                    .context("no pending key change")?;
                self.book.save()?;
            }
            return Ok(SafetyInfo {
                handle: contact.handle,
                user_id: new.user_id,
                number,
                verified: mark,
                key_changed: true,
            });
        }
        if mark && let Some(c) = self.book.contacts.get_mut(&contact.record.user_id) {
            c.verified = true;
            c.request = false;
            self.book.save()?;
        }
        Ok(SafetyInfo {
            handle: contact.handle.clone(),
            user_id: contact.record.user_id,
            number: safety_number(&mine, &contact.record.identity_key),
            verified: mark || contact.verified,
            key_changed: false,
        })
    }

    /// Resolves `to`: `@name` is a group, anything else a contact handle or user id.
    pub fn resolve(&self, to: &str) -> Result<Target, ClientError> {
        if let Some(name) = to.strip_prefix('@') {
            let g = self.book.group(name).ok_or_else(|| {
                ClientError::Unknown(format!("no group named {name:?}; see `syncra group list`"))
            })?;
            return Ok(Target::Group(g.id.clone()));
        }
        if let Ok(id) = to.parse::<UserId>()
            && self.book.by_id(&id).is_some()
        {
            return Ok(Target::Direct(id));
        }
        let c = self.book.by_handle(to).ok_or_else(|| {
            ClientError::Unknown(format!(
                "{to:?} is not a contact; add it with `syncra contact add {to}`"
            ))
        })?;
        Ok(Target::Direct(c.record.user_id))
    }

    /// History of a conversation (visible messages only), oldest first, the last `limit`.
    pub fn history_of(
        &self,
        to: &str,
        limit: Option<usize>,
    ) -> Result<Vec<StoredMessage>, ClientError> {
        let target = self.resolve(to)?;
        let (mut messages, _) = self.history.read(&target.conversation())?;
        // Messages held because a key changed show once that key was accepted (re-verified).
        let accepted = match &target {
            Target::Direct(id) => self.book.by_id(id).is_some_and(|c| c.key_changed.is_none()),
            Target::Group(_) => true,
        };
        messages.retain(|m| !m.held || accepted);
        if let Some(n) = limit
            && messages.len() > n
        {
            messages.drain(..messages.len() - n);
        }
        Ok(messages)
    }

    /// A display name for a user id.
    pub fn name_of(&self, id: &UserId) -> String {
        if *id == self.user_id() {
            return self.settings.handle.clone().unwrap_or_else(|| "me".into());
        }
        self.book.name_of(id)
    }
}

/// Whether a recipient's outcome is a refusal that may not be repeated: a rejection that is
/// not transient ([`ErrorCode::is_transient`]).
fn is_final_rejection(o: &Outcome) -> bool {
    matches!(o, Outcome::Rejected(code) if !code.is_transient())
}

/// The overall state from per-recipient outcomes: failed if any was rejected, offline if any
/// was offline, stored if any waits in a mailbox, delivered if all were delivered.
pub fn overall(outcomes: &[RecipientOutcome]) -> SendState {
    let rejected: Vec<String> = outcomes
        .iter()
        .filter_map(|o| match o.outcome {
            Outcome::Rejected(code) => Some(format!("{}: {code}", o.user_id.short())),
            _ => None,
        })
        .collect();
    if !rejected.is_empty() {
        return SendState::Failed(format!("refused by the relay ({})", rejected.join(", ")));
    }
    if outcomes.iter().any(|o| o.outcome == Outcome::Offline) {
        return SendState::Offline;
    }
    if outcomes.iter().any(|o| o.outcome == Outcome::Stored) {
        return SendState::Stored;
    }
    SendState::Delivered
}

/// What happened per member of a group send, in words: `delivered to 3 of 5, held for 2`.
/// Empty for a send to one recipient (the overall state says it all).
pub fn outcome_summary(outcomes: &[RecipientOutcome]) -> String {
    if outcomes.len() < 2 {
        return String::new();
    }
    let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(&o.outcome)).count();
    let parts = [
        (count(|o| *o == Outcome::Delivered), "delivered to"),
        (count(|o| *o == Outcome::Stored), "held for"),
        (count(|o| *o == Outcome::Offline), "offline:"),
        (count(|o| matches!(o, Outcome::Rejected(_))), "refused for"),
    ];
    let mut words: Vec<String> = Vec::new();
    for (n, what) in parts {
        if n > 0 {
            words.push(if words.is_empty() {
                format!("{what} {n} of {}", outcomes.len())
            } else {
                format!("{what} {n}")
            });
        }
    }
    words.join(", ")
}

fn now_secs() -> u64 {
    syncra_core::now_ms() / 1000
}

pub use crate::serve::{KEY_CHECK_EVERY, Serve, ServeEvent, Wake};

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes(list: &[Outcome]) -> Vec<RecipientOutcome> {
        list.iter()
            .enumerate()
            .map(|(i, o)| RecipientOutcome {
                user_id: UserId::from_identity_key(&[i as u8; 32]),
                outcome: *o,
            })
            .collect()
    }

    #[test]
    fn a_group_send_says_what_happened_per_member() {
        use Outcome::*;
        let check = |list: &[Outcome], want: &str| {
            assert_eq!(outcome_summary(&outcomes(list)), want, "{list:?}");
        };
        check(&[Delivered], "");
        check(&[Delivered, Delivered], "delivered to 2 of 2");
        check(
            &[Delivered, Stored, Delivered, Stored, Delivered],
            "delivered to 3 of 5, held for 2",
        );
        check(&[Stored, Stored], "held for 2 of 2");
        check(
            &[Delivered, Offline, Rejected(ErrorCode::MailboxFull)],
            "delivered to 1 of 3, offline: 1, refused for 1",
        );
        assert_eq!(
            overall(&outcomes(&[Delivered, Stored])),
            SendState::Stored,
            "a group send held for some is stored"
        );
    }
}

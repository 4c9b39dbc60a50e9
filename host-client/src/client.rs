//! The client engine: everything the headless commands, the terminal UI and the bot runner
//! share — keys, contacts, groups, history, the outbox and the relay connection.
//!
//! It is a plain struct driven by one task (`&mut self` methods): the TUI and the bot runner put
//! it behind an actor loop; the headless commands call it directly.

use std::sync::Arc;

use anyhow::{Context, bail};
use data_encoding::HEXLOWER;
use syncra_core::crypto::envelope::{
    AcceptWindow, MESSAGE_ID_LEN, MessageId, Opener, Recipient, ReplayGuard, seal_with_id,
};
use syncra_core::crypto::keyfile::KdfParams;
use syncra_core::crypto::safety::{fingerprint, safety_number};
use syncra_core::error::OpenError;
use syncra_core::wire::{ErrorCode, Outcome, RecipientOutcome};
use syncra_core::{Handle, IdentityRecord, UserId};
use syncra_transport_ws::WsTransport;
use tokio::sync::mpsc;

use crate::contacts::{Book, Contact, Group, PinOutcome};
use crate::history::{Delivery, History, StoredMessage};
use crate::home::{Home, Settings};
use crate::keystore::KeyStore;
use crate::message::{Content, GroupInfo};
use crate::net::{Dial, Login, NetError, Push, Session};
use crate::outbox::{Outbox, Pending};

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

/// A delivery that opened (signature, pinned key and replay window checked) and is not filed
/// yet. Only [`Client::file_delivery`] can use it.
#[derive(Debug)]
pub struct Opened(Box<syncra_core::crypto::envelope::OpenedMessage>);

impl Opened {
    /// Who sent it (authenticated by their signature).
    pub fn sender(&self) -> UserId {
        self.0.sender
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

fn parse_hex_id(s: &str) -> Option<MessageId> {
    let bytes = HEXLOWER.decode(s.as_bytes()).ok()?;
    bytes.try_into().ok()
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
        let transport =
            crate::net::transport(settings.ca_file.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (pushes_tx, pushes_rx) = mpsc::channel(1024);
        let mut guard = ReplayGuard::new(AcceptWindow::default(), 100_000);
        let replay_log =
            crate::replay::ReplayLog::new(home.root().join("replay.log"), keys.storage.clone());
        replay_log.load_into(&mut guard, syncra_core::now_ms())?;
        Ok(Client {
            home,
            settings,
            keys,
            book,
            history,
            outbox,
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
        })
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
        Ok(())
    }

    /// Connects (or reconnects) to the configured relay, then rotates the prekey if due and
    /// sends what waits in the outbox.
    pub async fn connect(&mut self) -> Result<(), NetError> {
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
        if let Err(e) = self.rotate_prekey_if_due().await {
            // A long-running session (`Serve`) retries with backoff; a one-shot command
            // retries at its next connection.
            tracing::warn!("prekey rotation failed (will retry): {e:#}");
        }
        Ok(())
    }

    /// Rotates the signed prekey if it is due and erases retired ones past their grace, saving
    /// the key file and publishing the new prekey. Long-running sessions call it on a timer
    /// ([`Serve`]), so forward secrecy does not depend on reconnecting.
    pub async fn maintain_keys(&mut self) -> Result<(), ClientError> {
        Ok(self.rotate_prekey_if_due().await?)
    }

    /// Disconnects politely.
    pub async fn disconnect(&mut self) {
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

    fn blocked_reason(&self, contact: &Contact) -> Option<String> {
        contact.key_changed.as_ref().map(|new| {
            format!(
                "the identity key of {handle} CHANGED (was {old}, now {new}). This happens when \
                 {handle} reinstalled Syncra — or when someone is impersonating them. Sending is \
                 blocked until you compare safety numbers: run `syncra verify {handle}` and, if \
                 they match what {handle} sees, `syncra verify {handle} --mark-verified`",
                handle = contact.handle,
                old = contact.record.user_id.short(),
                new = new.user_id.short(),
            )
        })
    }

    /// Writes a message to the outbox and history, then tries to send it.
    pub async fn send_text(&mut self, to: &str, text: &str) -> Result<SendReport, ClientError> {
        self.book.refresh()?;
        let target = self.resolve(to)?;
        let pending = self.queue(&target, text)?;
        self.send_queued(&pending).await
    }

    /// Checks that sending is allowed, then writes the message to the outbox and to history
    /// (durably) before anything goes on the network. Returns the outbox entry.
    pub fn queue(&mut self, target: &Target, text: &str) -> Result<Pending, ClientError> {
        self.book.refresh()?;
        if let Target::Direct(id) = target
            && let Some(c) = self.book.by_id(id)
            && let Some(why) = self.blocked_reason(c)
        {
            return Err(ClientError::Refused(why));
        }
        if text.trim().is_empty() {
            return Err(ClientError::Invalid(
                "nothing to send: the message is empty".into(),
            ));
        }
        let id = hex_id(&new_message_id());
        let pending = Pending {
            id: id.clone(),
            conversation: target.conversation(),
            text: text.to_owned(),
            created_ms: syncra_core::now_ms(),
            notify: Vec::new(),
        };
        // Durable before anything else: from here on, nothing typed can be lost.
        self.outbox.put(&pending)?;
        self.history.append(
            &pending.conversation,
            &StoredMessage {
                id: id.clone(),
                sender: self.user_id(),
                outgoing: true,
                timestamp_ms: pending.created_ms,
                text: text.to_owned(),
                delivery: Some(Delivery::Sending),
                reach: None,
                held: false,
                event: false,
            },
        )?;
        Ok(pending)
    }

    /// Sends a queued message (connecting first if needed).
    pub async fn send_queued(&mut self, pending: &Pending) -> Result<SendReport, ClientError> {
        let id = pending.id.clone();
        if !self.is_connected()
            && let Err(e) = self.connect().await
        {
            if e.is_transient() {
                return Ok(SendReport {
                    id,
                    state: SendState::Queued(e.to_string()),
                    outcomes: Vec::new(),
                });
            }
            return Err(ClientError::Relay(e));
        }
        Ok(self.deliver_pending(pending).await?)
    }

    /// Sends every outbox entry. Returns the reports of those that got a final answer.
    ///
    /// An entry that can never be sent (it names no conversation of ours, sealing it fails...)
    /// is moved aside to `outbox/failed/` and marked failed in history; the entries behind it
    /// still leave. Only a lost connection stops the drain.
    pub async fn drain_outbox(&mut self) -> Result<Vec<SendReport>, ClientError> {
        let mut done = Vec::new();
        for pending in self.outbox.list()? {
            let report = match self.deliver_pending(&pending).await {
                Ok(report) => report,
                Err(e) => {
                    let why = format!("{e:#}");
                    tracing::warn!(
                        "outbox entry {} cannot be sent and was moved to outbox/failed: {}",
                        pending.id,
                        syncra_core::text::escape_untrusted(&why)
                    );
                    self.outbox.set_aside_entry(&pending.id, &why)?;
                    if Target::from_conversation(&pending.conversation).is_some() {
                        let _ = self.history.set_delivery(
                            &pending.conversation,
                            &pending.id,
                            Delivery::Failed,
                        );
                    }
                    done.push(SendReport {
                        id: pending.id.clone(),
                        state: SendState::Failed(why),
                        outcomes: Vec::new(),
                    });
                    continue;
                }
            };
            if matches!(report.state, SendState::Queued(_)) {
                break;
            }
            done.push(report);
        }
        Ok(done)
    }

    /// Entries moved aside because they could not be sent (`outbox/failed/`).
    pub fn outbox_failed_len(&self) -> usize {
        std::fs::read_dir(self.outbox.failed_dir())
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "msg"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Entries waiting in the outbox.
    pub fn outbox_len(&self) -> usize {
        self.outbox.list().map(|l| l.len()).unwrap_or(0)
    }

    async fn recipients_for(
        &self,
        target: &Target,
        notify: &[UserId],
    ) -> anyhow::Result<(Vec<Recipient>, Option<GroupInfo>)> {
        let session = self.require_session()?;
        match target {
            Target::Direct(id) => {
                let contact = self
                    .book
                    .by_id(id)
                    .cloned()
                    .context("the contact of this outbox entry is gone")?;
                if let Some(why) = self.blocked_reason(&contact) {
                    bail!(why);
                }
                let record = self.fresh_record(&session, &contact).await?;
                Ok((
                    vec![Recipient {
                        user_id: record.user_id,
                        prekey: record.prekey.public,
                    }],
                    None,
                ))
            }
            Target::Group(gid) => {
                let group = self
                    .book
                    .groups
                    .get(gid)
                    .cloned()
                    .context("the group of this outbox entry is gone")?;
                if !group.members.contains(&self.user_id()) {
                    bail!("you are no longer a member of @{}", group.name);
                }
                let mut recipients = Vec::new();
                let mut everyone = group.members.clone();
                everyone.extend(notify.iter().filter(|m| !group.members.contains(m)));
                for member in everyone.iter().filter(|m| **m != self.user_id()) {
                    if let Some(c) = self.book.by_id(member)
                        && let Some(why) = self.blocked_reason(c)
                    {
                        bail!(why);
                    }
                    let record = session.lookup_id(*member).await.map_err(|e| {
                        anyhow::anyhow!("looking up group member {}: {e}", member.short())
                    })?;
                    recipients.push(Recipient {
                        user_id: record.user_id,
                        prekey: record.prekey.public,
                    });
                }
                if recipients.is_empty() {
                    bail!("the group has no other members");
                }
                Ok((
                    recipients,
                    Some(GroupInfo {
                        id: group.id.clone(),
                        name: group.name.clone(),
                        members: group.members.clone(),
                        creator: group.creator,
                    }),
                ))
            }
        }
    }

    /// The contact's current record, checked: the handle must still point at the pinned
    /// identity (else the contact is blocked) and the prekey must be signed by it.
    async fn fresh_record(
        &self,
        session: &Session,
        contact: &Contact,
    ) -> anyhow::Result<IdentityRecord> {
        let by_id = session
            .lookup_id(contact.record.user_id)
            .await
            .map_err(|e| anyhow::anyhow!("looking up {}: {e}", contact.handle))?;
        if by_id.identity_key != contact.record.identity_key {
            return Err(ClientError::Untrusted(format!(
                "the relay returned a different key for {}",
                contact.handle
            ))
            .into());
        }
        Ok(by_id)
    }

    async fn deliver_pending(&mut self, pending: &Pending) -> anyhow::Result<SendReport> {
        self.book.refresh()?;
        let target = Target::from_conversation(&pending.conversation)
            .context("outbox entry names an unknown conversation")?;
        let queued = |e: String| SendReport {
            id: pending.id.clone(),
            state: SendState::Queued(e),
            outcomes: Vec::new(),
        };
        if !self.is_connected() {
            return Ok(queued("not connected".into()));
        }
        // Key changes are detected by handle before sending to a contact.
        if let Target::Direct(id) = &target
            && let Some(contact) = self.book.by_id(id).cloned()
            && let Some(session) = self.session()
        {
            match session.lookup_handle(&contact.handle).await {
                Ok(record) if record.user_id != contact.record.user_id => {
                    let _lock = self.book.lock()?;
                    self.book.pin(record, false, syncra_core::now_ms());
                    self.book.save()?;
                }
                Ok(_) => {}
                Err(e) if e.is_transient() => return Ok(queued(e.to_string())),
                Err(_) => {}
            }
        }
        let (recipients, group) = match self.recipients_for(&target, &pending.notify).await {
            Ok(r) => r,
            Err(e) => {
                if !self.is_connected() {
                    return Ok(queued(e.to_string()));
                }
                // Blocked or gone: a final answer; the entry leaves the outbox as failed.
                return self.finish(pending, SendState::Failed(format!("{e:#}")), Vec::new());
            }
        };
        let content = Content {
            v: 1,
            text: pending.text.clone(),
            group,
        };
        let message_id = parse_hex_id(&pending.id).unwrap_or_else(new_message_id);
        let sealed = seal_with_id(
            &self.keys.identity,
            &recipients,
            &content.encode(),
            syncra_core::now_ms(),
            message_id,
        )
        .map_err(|e| anyhow::anyhow!("sealing: {e}"))?;
        let session = match self.session() {
            Some(s) => s,
            None => return Ok(queued("not connected".into())),
        };
        match session.send(sealed.bytes).await {
            Ok(outcomes) => {
                let state = overall(&outcomes);
                if let SendState::Failed(why) = &state
                    && outcomes.iter().all(|o| is_transient_rejection(&o.outcome))
                {
                    return Ok(queued(why.clone()));
                }
                self.finish(pending, state, outcomes)
            }
            Err(e) if e.is_transient() => Ok(queued(e.to_string())),
            Err(e) => self.finish(pending, SendState::Failed(e.to_string()), Vec::new()),
        }
    }

    fn finish(
        &mut self,
        pending: &Pending,
        state: SendState,
        outcomes: Vec<RecipientOutcome>,
    ) -> anyhow::Result<SendReport> {
        let reach = Some(outcome_summary(&outcomes)).filter(|s| !s.is_empty());
        self.history.set_delivery_with_reach(
            &pending.conversation,
            &pending.id,
            state.delivery(),
            reach,
        )?;
        self.outbox.remove(&pending.id)?;
        Ok(SendReport {
            id: pending.id.clone(),
            state,
            outcomes,
        })
    }

    /// Deliveries refused or skipped since this process started (bad, replayed messages
    /// aside).
    pub fn rejected_count(&self) -> u64 {
        self.rejected
    }

    /// Opens a delivery, files it in history and says what to show. The sender, if not a
    /// contact yet, is looked up on the relay first (one round trip): a long-running session
    /// uses [`Serve`] instead, which runs those lookups beside other deliveries.
    ///
    /// Nothing in a delivery is trusted: a message that does not open or breaks a rule (an
    /// invalid group id, a post from a non-member) comes back as [`Incoming::Rejected`], is
    /// counted and changes nothing. An `Err` is a local failure (the disk), never a peer's doing.
    pub async fn receive(&mut self, envelope: &[u8]) -> anyhow::Result<Option<Incoming>> {
        let opened = match self.open_delivery(envelope)? {
            Opening::Done(incoming) => return Ok(incoming),
            Opening::Opened(opened) => opened,
        };
        let record = match self.lookup_needed(&opened) {
            Some(session) => session.lookup_id(opened.sender()).await.ok(),
            None => None,
        };
        self.file_delivery(opened, record)
    }

    /// The first half of [`receive`](Self::receive): opens the envelope (checking signature,
    /// pinned key and replay window). Nothing is written yet.
    pub fn open_delivery(&mut self, envelope: &[u8]) -> anyhow::Result<Opening> {
        // Another process on this home may have changed contacts or groups since.
        self.book.refresh()?;
        let mut result = self.open_envelope(envelope);
        if matches!(result, Err(OpenError::UnknownPrekey)) {
            // Another process on this home may have rotated the prekey this was sealed to:
            // read the key file again (no passphrase needed) and try once more.
            match self.keys.reload(&self.home.key_file()) {
                Ok(()) => result = self.open_envelope(envelope),
                Err(e) => tracing::warn!("reading the key file again: {e:#}"),
            }
        }
        match result {
            Ok(m) => Ok(Opening::Opened(Opened(Box::new(m)))),
            // A repeat of something already shown (a retried send): shown once.
            Err(OpenError::Replayed) => Ok(Opening::Done(None)),
            Err(e) => Ok(Opening::Done(Some(
                self.rejected(format!("a delivery did not open: {e}")),
            ))),
        }
    }

    /// The session to look the sender of `opened` up on, if they are not a contact yet and I
    /// am connected. Their id is self-certifying; the lookup only learns their handle.
    pub fn lookup_needed(&self, opened: &Opened) -> Option<Arc<Session>> {
        if self.book.by_id(&opened.sender()).is_some() {
            return None;
        }
        self.session()
    }

    /// The second half of [`receive`](Self::receive): files an opened delivery in history,
    /// with the sender's directory record if it was looked up, and says what to show.
    pub fn file_delivery(
        &mut self,
        opened: Opened,
        looked_up: Option<IdentityRecord>,
    ) -> anyhow::Result<Option<Incoming>> {
        let opened = *opened.0;
        let (sender, message_id) = (opened.sender, opened.message_id);
        let incoming = self.file_opened(opened, looked_up)?;
        // Remembered at rest once filed, so a replay after a restart is refused. (Filed first:
        // a crash in between shows the message once more, by id once, rather than losing it.)
        self.replay_log
            .record(sender, &message_id, syncra_core::now_ms())?;
        Ok(incoming)
    }

    /// Counts and logs a refused delivery.
    fn rejected(&mut self, reason: String) -> Incoming {
        self.rejected = self.rejected.saturating_add(1);
        tracing::warn!(
            "skipped a delivery: {}",
            syncra_core::text::escape_untrusted(&reason)
        );
        Incoming::Rejected { reason }
    }

    /// Opens a sealed envelope with my prekeys and pinned keys (in its own function: the opener
    /// borrows non-Send state that must not live across an await).
    fn open_envelope(
        &mut self,
        envelope: &[u8],
    ) -> Result<syncra_core::crypto::envelope::OpenedMessage, OpenError> {
        let book = &self.book;
        let pinned = |id: &UserId| book.pinned_key(id);
        let opener = Opener {
            me: self.keys.user_id(),
            prekeys: &self.keys.ring,
            pinned: &pinned,
        };
        opener.open(envelope, &mut self.guard, syncra_core::now_ms())
    }

    fn file_opened(
        &mut self,
        opened: syncra_core::crypto::envelope::OpenedMessage,
        looked_up: Option<IdentityRecord>,
    ) -> anyhow::Result<Option<Incoming>> {
        let content = Content::decode(&opened.body);
        let id = hex_id(&opened.message_id);
        let from = opened.sender;
        if let Some(info) = &content.group
            && !crate::contacts::valid_group_id(&info.id)
        {
            let reason = format!(
                "a group message from {} with an invalid group id was refused",
                self.book.name_of(&from)
            );
            return Ok(Some(self.rejected(reason)));
        }

        // Who is it? An unknown sender's looked-up record is pinned if it is the key that
        // signed (their id is self-certifying, so a lookup cannot name anyone else).
        if self.book.by_id(&from).is_none()
            && let Some(record) = looked_up
            && record.user_id == from
            && record.identity_key == opened.sender_key
        {
            let _lock = self.book.lock()?;
            let outcome = self.book.pin(record, true, syncra_core::now_ms());
            self.book.save()?;
            if let PinOutcome::KeyChanged(old) = outcome {
                let conv = Target::Direct(from).conversation();
                self.history.append(
                    &conv,
                    &StoredMessage {
                        id,
                        sender: from,
                        outgoing: false,
                        timestamp_ms: opened.timestamp_ms,
                        text: content.text,
                        delivery: None,
                        reach: None,
                        held: true,
                        event: false,
                    },
                )?;
                return Ok(Some(Incoming::Held {
                    handle: old.handle,
                    from,
                }));
            }
        }
        let accepted = self.book.is_accepted(&from);

        // A group message from someone I did not accept is a message request like any other
        // first message: it creates no group and names no members.
        let mut events = Vec::new();
        let target = match &content.group {
            Some(info) if self.book.groups.contains_key(&info.id) => {
                let group = &self.book.groups[&info.id];
                if !group.members.contains(&from) {
                    let reason = format!(
                        "a message from {} to @{}, of which they are not a member, was refused",
                        self.book.name_of(&from),
                        group.name
                    );
                    return Ok(Some(self.rejected(reason)));
                }
                if group.creator == Some(from) {
                    events = self.apply_membership(info, from, opened.timestamp_ms)?;
                }
                Target::Group(info.id.clone())
            }
            Some(info) if accepted => match self.join_group(info, from, opened.timestamp_ms) {
                Ok(joined) => {
                    events = joined;
                    Target::Group(info.id.clone())
                }
                Err(reason) => return Ok(Some(self.rejected(reason))),
            },
            _ => Target::Direct(from),
        };
        let request = matches!(target, Target::Direct(_)) && !accepted;
        let conversation = target.conversation();
        for text in &events {
            self.history.append(
                &conversation,
                &StoredMessage {
                    id: hex_id(&new_message_id()),
                    sender: from,
                    outgoing: false,
                    timestamp_ms: opened.timestamp_ms,
                    text: text.clone(),
                    delivery: None,
                    reach: None,
                    held: false,
                    event: true,
                },
            )?;
        }
        let text = match (&content.group, request) {
            (Some(_), true) if content.text.is_empty() => "(invited you to a group)".to_owned(),
            _ => content.text,
        };
        if !text.is_empty() {
            self.history.append(
                &conversation,
                &StoredMessage {
                    id: id.clone(),
                    sender: from,
                    outgoing: false,
                    timestamp_ms: opened.timestamp_ms,
                    text: text.clone(),
                    delivery: None,
                    reach: None,
                    held: false,
                    event: false,
                },
            )?;
        }
        let group_name = match &target {
            Target::Group(g) => self.book.groups.get(g).map(|g| g.name.clone()),
            Target::Direct(_) => None,
        };
        Ok(Some(Incoming::Message {
            target,
            group_name,
            from,
            from_name: self.book.name_of(&from),
            text,
            timestamp_ms: opened.timestamp_ms,
            id,
            request,
            events,
        }))
    }

    /// A group I do not have yet, from an accepted contact: only its creator may bring me in,
    /// and only to a list that has me and them. Returns the events to show, or why not.
    fn join_group(
        &mut self,
        info: &GroupInfo,
        from: UserId,
        ts: u64,
    ) -> Result<Vec<String>, String> {
        let _lock = self
            .book
            .lock()
            .map_err(|e| format!("locking contacts: {e:#}"))?;
        let me = self.user_id();
        let who = self.book.name_of(&from);
        if info.creator != Some(from) {
            return Err(format!(
                "a message from {who} to a group I am not in was refused: only a group's creator \
                 can add members"
            ));
        }
        if !info.members.contains(&me) || !info.members.contains(&from) {
            return Err(format!(
                "a group message from {who} whose member list lacks me or them was refused"
            ));
        }
        let mut members = Vec::new();
        for m in &info.members {
            if !members.contains(m) {
                members.push(*m);
            }
        }
        let name = self
            .book
            .unique_group_name(&crate::contacts::local_group_name(&info.name));
        let others: Vec<String> = members
            .iter()
            .filter(|m| **m != from)
            .map(|m| self.member_name(m))
            .collect();
        self.book.groups.insert(
            info.id.clone(),
            Group {
                id: info.id.clone(),
                name: name.clone(),
                members,
                updated_ms: ts,
                creator: Some(from),
            },
        );
        self.book
            .save()
            .map_err(|e| format!("saving groups: {e:#}"))?;
        Ok(vec![format!(
            "{who} created @{name} with {}",
            others.join(", ")
        )])
    }

    /// A member list from the group's creator: applied if newer, and every change becomes an
    /// event ("alice added eve", "alice removed you").
    fn apply_membership(
        &mut self,
        info: &GroupInfo,
        from: UserId,
        ts: u64,
    ) -> anyhow::Result<Vec<String>> {
        let _lock = self.book.lock()?;
        let Some(group) = self.book.groups.get(&info.id) else {
            return Ok(Vec::new());
        };
        if ts <= group.updated_ms || group.members == info.members {
            return Ok(Vec::new());
        }
        let old = group.members.clone();
        let mut new = Vec::new();
        for m in &info.members {
            if !new.contains(m) {
                new.push(*m);
            }
        }
        let who = self.book.name_of(&from);
        let added: Vec<String> = new
            .iter()
            .filter(|m| !old.contains(m))
            .map(|m| self.member_name(m))
            .collect();
        let removed: Vec<String> = old
            .iter()
            .filter(|m| !new.contains(m))
            .map(|m| self.member_name(m))
            .collect();
        let mut events = Vec::new();
        if !added.is_empty() {
            events.push(format!("{who} added {}", added.join(", ")));
        }
        if !removed.is_empty() {
            events.push(format!("{who} removed {}", removed.join(", ")));
        }
        if let Some(g) = self.book.groups.get_mut(&info.id) {
            g.members = new;
            g.updated_ms = ts;
        }
        self.book.save()?;
        Ok(events)
    }

    /// A member's name in an event: `you` for me.
    fn member_name(&self, id: &UserId) -> String {
        if *id == self.user_id() {
            "you".into()
        } else {
            self.book.name_of(id)
        }
    }

    /// Creates a group with contacts (by handle); I am a member and its creator.
    pub fn group_create(&mut self, name: &str, members: &[String]) -> Result<Group, ClientError> {
        let _lock = self.book.lock()?;
        if !crate::contacts::valid_group_name(name) {
            return Err(ClientError::Invalid(
                "a group name is one word of at most 32 letters, digits, - or _ (without the @)"
                    .into(),
            ));
        }
        if self.book.group(name).is_some() {
            return Err(ClientError::Invalid(format!(
                "a group named {name:?} exists already"
            )));
        }
        let mut ids = vec![self.user_id()];
        for m in members {
            let c = self.book.by_handle(m).ok_or_else(|| {
                ClientError::Unknown(format!("{m:?} is not a contact; add it first"))
            })?;
            if !ids.contains(&c.record.user_id) {
                ids.push(c.record.user_id);
            }
        }
        let group = Group {
            id: crate::contacts::new_group_id(),
            name: name.to_owned(),
            members: ids,
            updated_ms: syncra_core::now_ms(),
            creator: Some(self.user_id()),
        };
        self.book.groups.insert(group.id.clone(), group.clone());
        self.book.save()?;
        Ok(group)
    }

    /// Adds or removes members; only the group's creator may. The change is recorded as an
    /// event and queued as a membership message to everyone in the old and the new list (a
    /// removed member learns it and gets no wrap for any later message). Returns the group and
    /// the outbox entry to send.
    pub fn group_update(
        &mut self,
        name: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<(Group, Pending), ClientError> {
        let _lock = self.book.lock()?;
        let group = self
            .book
            .group(name)
            .ok_or_else(|| {
                ClientError::Unknown(format!("no group named {name:?}; see `syncra group list`"))
            })?
            .clone();
        let me = self.user_id();
        if let Some(creator) = group.creator
            && creator != me
        {
            return Err(ClientError::Refused(format!(
                "only the creator of @{name} ({}) can change its members",
                self.book.name_of(&creator)
            )));
        }
        let mut add_ids = Vec::new();
        for h in add {
            add_ids.push(
                self.book
                    .by_handle(h)
                    .ok_or_else(|| {
                        ClientError::Unknown(format!("{h:?} is not a contact; add it first"))
                    })?
                    .record
                    .user_id,
            );
        }
        let mut remove_ids = Vec::new();
        for h in remove {
            let id = match self.book.by_handle(h) {
                Some(c) => c.record.user_id,
                None => h.parse::<UserId>().map_err(|_| {
                    ClientError::Unknown(format!("{h:?} is not a contact or a user id"))
                })?,
            };
            remove_ids.push(id);
        }
        let old = group.members.clone();
        let mut members = old.clone();
        for id in add_ids {
            if !members.contains(&id) {
                members.push(id);
            }
        }
        members.retain(|m| *m == me || !remove_ids.contains(m));
        let added: Vec<String> = members
            .iter()
            .filter(|m| !old.contains(m))
            .map(|m| self.book.name_of(m))
            .collect();
        let removed: Vec<UserId> = old
            .iter()
            .filter(|m| !members.contains(m))
            .copied()
            .collect();
        let mut events = Vec::new();
        if !added.is_empty() {
            events.push(format!("you added {}", added.join(", ")));
        }
        if !removed.is_empty() {
            let names: Vec<String> = removed.iter().map(|m| self.book.name_of(m)).collect();
            events.push(format!("you removed {}", names.join(", ")));
        }
        if events.is_empty() {
            return Err(ClientError::Invalid(
                "nothing changed: check the member names with `syncra group list`".into(),
            ));
        }
        let now = syncra_core::now_ms();
        let g = {
            let entry = self
                .book
                .groups
                .get_mut(&group.id)
                .context("group vanished")?;
            entry.members = members;
            entry.updated_ms = now;
            if entry.creator.is_none() {
                entry.creator = Some(me);
            }
            entry.clone()
        };
        self.book.save()?;
        let target = Target::Group(g.id.clone());
        for text in events {
            self.history.append(
                &target.conversation(),
                &StoredMessage {
                    id: hex_id(&new_message_id()),
                    sender: me,
                    outgoing: true,
                    timestamp_ms: now,
                    text,
                    delivery: None,
                    reach: None,
                    held: false,
                    event: true,
                },
            )?;
        }
        let pending = Pending {
            id: hex_id(&new_message_id()),
            conversation: target.conversation(),
            text: String::new(),
            created_ms: now,
            notify: removed,
        };
        self.outbox.put(&pending)?;
        Ok((g, pending))
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

fn is_transient_rejection(o: &Outcome) -> bool {
    matches!(
        o,
        Outcome::Rejected(ErrorCode::BrokerUnavailable | ErrorCode::RateLimited)
    )
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

pub use crate::serve::{KEY_CHECK_EVERY, Serve, ServeEvent};

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

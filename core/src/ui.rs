//! The `UiFrontend` contract: the client's user interface.
//!
//! Why this shape: the client logic must not know whether a person is looking at a full-screen
//! terminal, a line-mode prompt or a test harness, so the frontend is driven by a closed set of
//! [`AppEvent`]s and answers with a closed set of [`UserAction`]s over channels. Closed enums are
//! matched exhaustively, so adding an event forces every frontend to decide what to do with it.
//! The frontend owns the terminal for as long as `run` runs and must restore it when it returns.

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::error::Error;
use crate::id::UserId;

/// The largest message text, in bytes, a person (or a bot) may send in one message. It keeps
/// the sealed message well under the relay's frame limit: a longer text could never leave the
/// outbox. Frontends check it before they clear what was typed, and the client refuses a
/// longer text with a clear error before anything is written.
pub const MAX_MESSAGE_TEXT: usize = 200 * 1024;

/// A conversation: one contact or one group.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConversationId {
    /// A one-to-one conversation with a contact.
    Direct(UserId),
    /// A client-side group, by its group id (hex).
    Group(String),
}

/// The onboarding step a failure is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnboardingStep {
    /// The relay address (unreachable, refused, not a Syncra relay).
    Relay,
    /// The handle (taken, invalid, this identity already has another).
    Handle,
    /// The passphrase or the local files (creating or opening the identity).
    Passphrase,
}

/// Delivery state of an outgoing message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryState {
    /// Waiting in the outbox or in flight.
    Sending,
    /// A live session of every recipient took it.
    Delivered,
    /// The recipient was offline; it was not delivered.
    Offline,
    /// The recipient was not connected; the relay holds it in their mailbox.
    Stored,
    /// The relay refused it or it could not be sent.
    Failed,
}

/// Connection state shown in the status bar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connecting or reconnecting (attempt number).
    Connecting(u32),
    /// Connected and authenticated.
    Online,
    /// Disconnected; retrying after the given number of seconds.
    Offline {
        /// Seconds until the next attempt.
        retry_in_secs: u64,
        /// Why the last attempt failed.
        reason: String,
    },
}

/// A message as the interface shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatLine {
    /// The conversation it belongs to.
    pub conversation: ConversationId,
    /// The message id (hex), for delivery updates.
    pub message_id: String,
    /// Who wrote it.
    pub sender: UserId,
    /// The sender's handle or local name, if known.
    pub sender_name: Option<String>,
    /// Whether I wrote it.
    pub outgoing: bool,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The text.
    pub text: String,
    /// For outgoing messages, the delivery state.
    pub delivery: Option<DeliveryState>,
}

/// A conversation as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConversationSummary {
    /// Which conversation.
    pub id: ConversationId,
    /// Its display name.
    pub name: String,
    /// Unread messages.
    pub unread: u32,
    /// Preview of the last message.
    pub last_preview: Option<String>,
    /// Time of the last activity, ms since the epoch.
    pub last_activity_ms: u64,
    /// Whether the contact's safety number was verified.
    pub verified: bool,
    /// Whether the contact's key changed and sending is blocked until re-verification.
    pub key_changed: bool,
    /// Whether this is a request from someone not in the contacts.
    pub request: bool,
}

/// A conversation's name as `list` shows it; a short form of its id when it is not listed.
pub fn conversation_name(list: &[ConversationSummary], id: &ConversationId) -> String {
    list.iter()
        .find(|c| &c.id == id)
        .map(|c| c.name.clone())
        .unwrap_or_else(|| match id {
            ConversationId::Direct(u) => u.short(),
            ConversationId::Group(g) => g.chars().take(8).collect(),
        })
}

/// A secret typed by the person (a passphrase). Its `Debug` never shows it and it is wiped from
/// memory when dropped, so it can travel in actions without leaking into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(zeroize::Zeroizing<String>);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(zeroize::Zeroizing::new(s.into()))
    }

    /// The secret text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// What I know about myself once unlocked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Me {
    /// My user id.
    pub user_id: UserId,
    /// My handle, if registered.
    pub handle: Option<String>,
    /// My relay, if registered.
    pub relay: Option<String>,
    /// My fingerprint (my half of every safety number).
    pub fingerprint: String,
}

/// A command a plugin or the client offers in the command palette.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandInfo {
    /// The name, without the slash.
    pub name: String,
    /// One line of help.
    pub help: String,
}

/// Everything the client tells the interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppEvent {
    /// There is no identity: walk the person through creating one.
    Onboarding {
        /// The relay to offer by default.
        default_relay: String,
    },
    /// An identity exists and must be unlocked with its passphrase.
    Locked {
        /// Whose identity.
        user_id: UserId,
        /// Its handle, if registered.
        handle: Option<String>,
    },
    /// Unlocking failed (wrong passphrase, damaged file); the text says what to do.
    UnlockFailed(String),
    /// Creating or registering the identity failed: which onboarding step it is about (the
    /// front end goes back there) and what to do.
    OnboardingFailed {
        /// The step to go back to.
        step: OnboardingStep,
        /// What happened and what to do.
        message: String,
    },
    /// The result of checking a relay address (reachable, TLS) during onboarding.
    RelayCheck {
        /// The address checked.
        url: String,
        /// What was found, or why it is not usable.
        result: Result<String, String>,
    },
    /// Unlocked (or just created): the main screen can open.
    Ready(Me),
    /// Commands offered by plugins, for the palette.
    Commands(Vec<CommandInfo>),
    /// The connection state changed.
    Connection(ConnectionState),
    /// The conversation list changed.
    Conversations(Vec<ConversationSummary>),
    /// History for a conversation, oldest first.
    History {
        /// Which conversation.
        conversation: ConversationId,
        /// The lines.
        lines: Vec<ChatLine>,
    },
    /// A new message, incoming or outgoing.
    Message(ChatLine),
    /// An outgoing message's delivery state changed.
    Delivery {
        /// Which conversation.
        conversation: ConversationId,
        /// Which message (hex id).
        message_id: String,
        /// The new state.
        state: DeliveryState,
    },
    /// A message the client refused before storing it (over the size limit, the contact's key
    /// changed, the outbox could not be written): nothing of it was kept or sent, so the text
    /// comes back for the front end to give to the person again, with the reason.
    NotSent {
        /// Where it was to go.
        conversation: ConversationId,
        /// The text, exactly as it was handed over.
        text: String,
        /// Why, and what to do.
        reason: String,
    },
    /// A pinned contact's identity key changed: sending is blocked until re-verification.
    KeyChanged {
        /// The contact.
        contact: UserId,
        /// Their handle.
        handle: String,
    },
    /// The safety number for a contact, on request.
    SafetyNumber {
        /// The contact.
        contact: UserId,
        /// The 60 digits.
        number: String,
        /// Whether it is marked verified.
        verified: bool,
    },
    /// Whether a handle is free on the relay (onboarding).
    HandleAvailability {
        /// The handle checked.
        handle: String,
        /// Whether it is free.
        available: bool,
    },
    /// Something the person should know.
    Notice(String),
    /// Something failed; the text says what to do.
    Error(String),
    /// The client is shutting down; the interface should return.
    Shutdown,
}

/// Everything the person can ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserAction {
    /// Send text to a conversation.
    Send {
        /// Where.
        conversation: ConversationId,
        /// What.
        text: String,
    },
    /// Load history of a conversation.
    LoadHistory {
        /// Which conversation.
        conversation: ConversationId,
        /// How many lines at most.
        limit: usize,
    },
    /// The conversation was opened (read up to now).
    MarkRead(ConversationId),
    /// Add a contact by handle or user id.
    AddContact(String),
    /// Show the safety number of a contact, optionally marking it verified.
    Verify {
        /// The contact.
        contact: UserId,
        /// Whether to mark it verified.
        mark_verified: bool,
    },
    /// Check whether a relay is reachable (onboarding).
    CheckRelay(String),
    /// Check whether a handle is free on a relay (onboarding).
    CheckHandle {
        /// The relay.
        relay: String,
        /// The handle.
        handle: String,
    },
    /// Create the identity and register it (onboarding).
    CreateIdentity {
        /// The relay.
        relay: String,
        /// The handle.
        handle: String,
        /// The passphrase protecting the identity and history.
        passphrase: Secret,
    },
    /// Unlock the identity.
    Unlock(Secret),
    /// A slash command from a plugin or the palette.
    Command {
        /// The command name without the slash.
        name: String,
        /// The rest of the line.
        args: String,
    },
    /// Send the current state again (connection, conversations): the interface just opened
    /// a screen that shows it.
    Refresh,
    /// Quit.
    Quit,
}

/// A user interface.
#[async_trait]
pub trait UiFrontend: Send {
    /// The kind name this frontend registered under.
    fn kind(&self) -> &'static str;
    /// Runs until the person quits or [`AppEvent::Shutdown`] arrives.
    async fn run(
        &mut self,
        events: mpsc::Receiver<AppEvent>,
        actions: mpsc::Sender<UserAction>,
    ) -> Result<(), Error>;
}

//! Errors of `syncra-core`.
//!
//! Each contract or pipeline has its own enum so that callers can match on exactly the failures
//! that can happen there (an `OpenError` never says "handle taken"), and [`Error`] gathers them
//! for code that just wants to propagate. Every variant is something a caller may act on, and
//! every message says what happened in words a user can read.

use std::path::PathBuf;

use crate::id::UserId;

/// Any error of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A user id or handle was invalid.
    #[error(transparent)]
    Id(#[from] IdError),
    /// A signature or key check failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// Sealing failed.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// Opening failed.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The key file could not be used.
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// A frame could not be decoded.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The identity store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A plugin could not be created.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The user interface failed.
    #[error("user interface: {0}")]
    Ui(String),
}

/// Invalid identifiers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// Not a user id.
    #[error("{0:?} is not a user id (expected 32 base32 characters)")]
    BadUserId(String),
    /// A handle that breaks the rules.
    #[error("handle {handle:?} is not allowed: {why}")]
    BadHandle {
        /// The handle as given.
        handle: String,
        /// Which rule it breaks.
        why: &'static str,
    },
}

/// Signature and key checks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The bytes are not a valid public key.
    #[error("not a valid public key")]
    BadPublicKey,
    /// A signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// A signed prekey's signature does not verify under the identity key.
    #[error("the signed prekey is not signed by this identity")]
    BadPrekeySignature,
    /// A stored private prekey does not match its public half.
    #[error("the private prekey does not match its public key")]
    PrekeyMismatch,
    /// The user id does not belong to the identity key.
    #[error("user id {claimed} does not belong to this identity key (it belongs to {actual})")]
    IdKeyMismatch {
        /// The id that was claimed.
        claimed: UserId,
        /// The id the key hashes to.
        actual: UserId,
    },
}

/// Failures while sealing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// No recipients were given.
    #[error("a message needs at least one recipient")]
    NoRecipients,
    /// Too many recipients.
    #[error("{count} recipients is more than the {max} one message may have")]
    TooManyRecipients {
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A recipient appears twice.
    #[error("recipient {0} is listed twice")]
    DuplicateRecipient(UserId),
    /// The body is too large.
    #[error("message of {size} bytes is larger than the {max}-byte limit")]
    BodyTooLarge {
        /// The body size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A recipient's prekey is not a usable X25519 key.
    #[error("the prekey of {0} is not a usable key")]
    BadPrekey(UserId),
    /// The AEAD refused to encrypt (cannot happen with valid sizes).
    #[error("encryption failed")]
    Encrypt,
}

/// Why an envelope did not open. One variant per check, so tests and logs can tell them apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The bytes are not a well-formed envelope.
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
    /// The envelope names more recipients than allowed.
    #[error("the envelope names {0} recipients, more than allowed")]
    TooManyRecipients(usize),
    /// The envelope has a version this build does not speak.
    #[error("envelope version {0} is not supported")]
    UnsupportedVersion(u8),
    /// My user id is not among the recipients.
    #[error("this message is not addressed to me")]
    NotARecipient,
    /// The wrap for me names a prekey I do not have (rotated out, or never mine).
    #[error("the message is wrapped to a prekey I do not hold")]
    UnknownPrekey,
    /// The wrapped key does not decrypt with my prekey.
    #[error("the wrapped key does not open with my prekey")]
    WrapFailed,
    /// The header was changed after sealing.
    #[error("the envelope header was altered")]
    HeaderTampered,
    /// The ciphertext fails its authentication tag.
    #[error("the ciphertext was altered (bad authentication tag)")]
    BadCiphertext,
    /// The sender's key does not belong to the sender id, or is not the pinned one.
    #[error("the sender's key is not the one pinned for this sender")]
    SenderKeyMismatch,
    /// The sender's signature does not verify.
    #[error("the sender's signature does not verify")]
    BadSignature,
    /// The sender signed this for other recipients: it was forwarded or re-wrapped.
    #[error("the sender did not address this message to these recipients (forwarded?)")]
    NotBoundRecipient,
    /// The same message was seen before.
    #[error("this message was already received (replay)")]
    Replayed,
    /// The timestamp is older than the accept window.
    #[error("the message is too old ({age_ms} ms)")]
    TooOld {
        /// How old it is.
        age_ms: u64,
    },
    /// The timestamp is too far in the future.
    #[error("the message is dated {ahead_ms} ms in the future")]
    FromTheFuture {
        /// How far ahead it is.
        ahead_ms: u64,
    },
}

/// Key file failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The passphrase does not open the file.
    #[error("wrong passphrase")]
    WrongPassphrase,
    /// An empty passphrase was offered for a new file.
    #[error("the passphrase must not be empty")]
    EmptyPassphrase,
    /// The file is damaged or not a key file.
    #[error("the key file is corrupt: {0}")]
    Corrupt(String),
    /// The file is of a format version this build does not read.
    #[error("key file version {0} is not supported by this build")]
    UnsupportedVersion(u32),
    /// The file asks for Argon2id parameters weaker than the minimum.
    #[error("the key file's passphrase protection is weaker than allowed (tampered with?)")]
    WeakKdf,
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Frame decoding failures. None of them panics; each maps to a protocol error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The frame is larger than allowed.
    #[error("frame of {size} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The frame size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The frame ended early.
    #[error("truncated frame: {0}")]
    Truncated(&'static str),
    /// The protocol version byte is not one this build speaks.
    #[error("protocol version {0} is not supported")]
    UnsupportedVersion(u8),
    /// The frame type byte is unknown.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// A field has an invalid value.
    #[error("invalid field {field}: {why}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// Bytes were left after the frame's last field.
    #[error("{0} trailing bytes after the frame")]
    Trailing(usize),
}

/// Identity store failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The handle already belongs to someone.
    #[error("handle {0:?} is taken")]
    HandleTaken(String),
    /// This identity is already registered (under another handle).
    #[error("user {0} is already registered")]
    AlreadyRegistered(UserId),
    /// No such user.
    #[error("user {0} is not registered")]
    NotFound(UserId),
    /// The new prekey is older than the stored one.
    #[error("the new prekey is older than the current one")]
    StalePrekey,
    /// A record failed validation (id/key mismatch, bad prekey signature).
    #[error("invalid identity record: {0}")]
    Invalid(#[from] CryptoError),
    /// The store cannot be reached or failed.
    #[error("identity store unavailable: {0}")]
    Unavailable(String),
    /// Publishing these KeyPackages would hold more than a user may keep.
    #[error("at most {max} KeyPackages are kept per user")]
    KeyPackagesFull {
        /// The limit.
        max: usize,
    },
    /// A KeyPackage is empty or larger than allowed.
    #[error("a KeyPackage must be 1 to {max} bytes")]
    BadKeyPackage {
        /// The limit.
        max: usize,
    },
}

/// Broker failures.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The broker cannot be reached now; the caller should report "broker unavailable".
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The topic name is not acceptable to this broker.
    #[error("invalid topic {0:?}")]
    BadTopic(String),
    /// The payload is larger than this broker accepts.
    #[error("payload of {size} bytes exceeds the broker's {max}-byte limit")]
    TooLarge {
        /// The payload size.
        size: usize,
        /// The limit.
        max: usize,
    },
}

/// Transport failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Binding or connecting failed.
    #[error("{action} {address}: {source}")]
    Io {
        /// What was attempted ("bind", "connect").
        action: &'static str,
        /// Where.
        address: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// TLS or WebSocket handshake failed.
    #[error("handshake with {peer} failed: {why}")]
    Handshake {
        /// The peer.
        peer: String,
        /// What went wrong.
        why: String,
    },
    /// The configuration is unsafe or unusable.
    #[error("transport configuration: {0}")]
    Config(String),
    /// The peer closed the connection.
    #[error("connection closed: {0}")]
    Closed(String),
    /// A frame exceeded the transport's limit.
    #[error("frame of {size} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The frame size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The peer broke the transport's framing rules: nothing more can be read from the
    /// connection.
    #[error("{0}")]
    Protocol(String),
    /// Any other I/O failure on an established connection.
    #[error("connection error: {0}")]
    Other(String),
}

/// Plugin selection and creation failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// Nobody has ever shipped a plugin of this kind.
    #[error("unknown {category} kind {kind:?}; available kinds: {available}")]
    UnknownKind {
        /// "broker", "store", ...
        category: &'static str,
        /// The kind asked for.
        kind: String,
        /// The kinds this build has, comma-separated.
        available: String,
    },
    /// A first-party kind that this binary was built without.
    #[error(
        "{category} kind {kind:?} exists but is not compiled into this build; rebuild with the {feature:?} feature"
    )]
    NotCompiled {
        /// "broker", "store", ...
        category: &'static str,
        /// The kind asked for.
        kind: String,
        /// The cargo feature that adds it.
        feature: String,
    },
    /// Two plugins registered under one name.
    #[error("{category} kind {kind:?} is registered twice")]
    Duplicate {
        /// "broker", "store", ...
        category: &'static str,
        /// The kind.
        kind: String,
    },
    /// The plugin's configuration section is invalid.
    #[error("invalid configuration for {category} kind {kind:?}: {message}")]
    Config {
        /// "broker", "store", ...
        category: &'static str,
        /// The kind.
        kind: String,
        /// What is wrong, naming the key.
        message: String,
    },
    /// The plugin failed to start.
    #[error("{category} kind {kind:?} failed to start: {message}")]
    Start {
        /// "broker", "store", ...
        category: &'static str,
        /// The kind.
        kind: String,
        /// What went wrong.
        message: String,
    },
}

//! The wire protocol between client and relay: versioned binary frames.
//!
//! One WebSocket binary message carries exactly one frame. Every frame starts with the protocol
//! version byte and a type byte; fields follow in a fixed order, integers big-endian, strings
//! and byte strings with a length prefix. The format is written by hand (no serializer) so that
//! it is stable, specified byte for byte in `docs/PROTOCOL.md`, and decodable without panics or
//! unbounded allocation: every length is checked against the bytes actually present and against
//! a per-field limit before anything is allocated.
//!
//! Envelopes travel inside `Send` and `Deliver` as opaque bytes; decoding a frame never looks
//! inside them, and they are borrowed from the input buffer rather than copied.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::crypto::envelope::{MESSAGE_ID_LEN, MessageId};
use crate::crypto::keys::SignedPrekey;
use crate::error::WireError;
use crate::id::{Handle, USER_ID_LEN, UserId};
use crate::record::IdentityRecord;

/// The protocol version this build speaks. Version 2 added the dialled URL to `Auth` and to the
/// signed login statement; a relay answers frames of any other version `unsupported_version`.
pub const PROTOCOL_VERSION: u8 = 2;
/// The default frame limit, in bytes (a relay may configure 1 KiB to 16 MiB and announces its
/// limit in `Challenge`).
pub const DEFAULT_MAX_FRAME: usize = 1024 * 1024;
/// Longest token, in bytes.
pub const MAX_TOKEN_LEN: usize = 2048;
/// Longest error message, in bytes.
pub const MAX_MESSAGE_LEN: usize = 1024;
/// Longest relay id, in bytes.
pub const MAX_RELAY_ID_LEN: usize = 255;
/// Longest relay URL in an `Auth` frame, in bytes.
pub const MAX_URL_LEN: usize = 1024;
/// Most outcomes in one send result (matches the envelope's recipient limit).
pub const MAX_OUTCOMES: usize = crate::crypto::envelope::MAX_RECIPIENTS;
/// Longest handle field in requests, in bytes. Longer than a valid handle so the relay can
/// answer `handle_invalid` with a reason instead of `malformed`.
pub const MAX_HANDLE_FIELD: usize = 128;
/// Bytes in an authentication nonce.
pub const NONCE_LEN: usize = 32;
/// Longest KeyPackage in a frame, in bytes (the directory's limit).
pub const MAX_KEY_PACKAGE_LEN: usize = crate::store::MAX_KEY_PACKAGE_LEN;
/// Most one-time KeyPackages in one `PublishKeyPackages` frame.
pub const MAX_KEY_PACKAGES_PER_FRAME: usize = 100;

/// A request id chosen by the client; replies carry it back. 0 means "not tied to a request".
pub type RequestId = u32;

/// Error codes carried by [`Frame::Error`], rejected send outcomes and WebSocket close frames
/// (close code = 4000 + error code).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame could not be decoded.
    Malformed,
    /// The protocol version is not supported.
    UnsupportedVersion,
    /// The frame exceeds the size limit.
    FrameTooLarge,
    /// The frame needs an authenticated session.
    NotAuthenticated,
    /// The authentication proof did not verify, or the nonce was already used.
    AuthFailed,
    /// The resume token has expired.
    TokenExpired,
    /// The resume token is not valid.
    TokenInvalid,
    /// The handle belongs to someone else.
    HandleTaken,
    /// The handle breaks the handle rules.
    HandleInvalid,
    /// No such user.
    NotFound,
    /// Too many requests; slow down.
    RateLimited,
    /// Too many connections from this address.
    TooManyConnections,
    /// The signed prekey does not verify.
    BadPrekey,
    /// The session's outbound queue overflowed; messages were dropped.
    QueueOverflow,
    /// The broker is unavailable, so the message could not reach other nodes.
    BrokerUnavailable,
    /// The identity store is unavailable.
    StoreUnavailable,
    /// The relay failed internally.
    Internal,
    /// A handshake or idle timeout expired.
    Timeout,
    /// The session is already authenticated.
    AlreadyAuthenticated,
    /// A relay hook denied the operation.
    HookDenied,
    /// The envelope is malformed.
    BadEnvelope,
    /// This identity is already registered.
    AlreadyRegistered,
    /// The relay is shutting down.
    ShuttingDown,
    /// The frame is not valid in this direction or state.
    Unexpected,
    /// More recipients than allowed.
    TooManyRecipients,
    /// The recipient's mailbox holds as many messages or bytes as its quota allows.
    MailboxFull,
    /// The mailbox could not store the message (its backend is down or did not answer).
    MailboxUnavailable,
    /// A commit for an epoch the group has already left: another member's commit won it. The
    /// author processes the winning commit (it is on its way) and commits again.
    CommitConflict,
    /// An MLS message made in an epoch other than the group's current one.
    WrongEpoch,
    /// The sender is not a member of the group as its last accepted commit declared it.
    NotAMember,
    /// A KeyPackage was refused (empty, too large, or more than a user may keep).
    BadKeyPackage,
    /// A code this build does not know (from a newer peer).
    Other(u16),
}

impl ErrorCode {
    const TABLE: &'static [(u16, ErrorCode)] = &[
        (1, ErrorCode::Malformed),
        (2, ErrorCode::UnsupportedVersion),
        (3, ErrorCode::FrameTooLarge),
        (4, ErrorCode::NotAuthenticated),
        (5, ErrorCode::AuthFailed),
        (6, ErrorCode::TokenExpired),
        (7, ErrorCode::TokenInvalid),
        (8, ErrorCode::HandleTaken),
        (9, ErrorCode::HandleInvalid),
        (10, ErrorCode::NotFound),
        (11, ErrorCode::RateLimited),
        (12, ErrorCode::TooManyConnections),
        (13, ErrorCode::BadPrekey),
        (14, ErrorCode::QueueOverflow),
        (15, ErrorCode::BrokerUnavailable),
        (16, ErrorCode::StoreUnavailable),
        (17, ErrorCode::Internal),
        (18, ErrorCode::Timeout),
        (19, ErrorCode::AlreadyAuthenticated),
        (20, ErrorCode::HookDenied),
        (21, ErrorCode::BadEnvelope),
        (22, ErrorCode::AlreadyRegistered),
        (23, ErrorCode::ShuttingDown),
        (24, ErrorCode::Unexpected),
        (25, ErrorCode::TooManyRecipients),
        (26, ErrorCode::MailboxFull),
        (27, ErrorCode::MailboxUnavailable),
        (28, ErrorCode::CommitConflict),
        (29, ErrorCode::WrongEpoch),
        (30, ErrorCode::NotAMember),
        (31, ErrorCode::BadKeyPackage),
    ];

    /// Whether the same request may succeed later unchanged: the relay or a backend behind it
    /// is busy, restarting or down, or the sender went too fast. A client keeps a message that
    /// met one of these in its outbox and sends it again; any other refusal is final.
    /// `queue_overflow` is final: a recipient that never reads would otherwise hold the head of
    /// every sender's outbox for good.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorCode::RateLimited
                | ErrorCode::BrokerUnavailable
                | ErrorCode::StoreUnavailable
                | ErrorCode::MailboxUnavailable
                | ErrorCode::Timeout
                | ErrorCode::ShuttingDown
        )
    }

    /// The numeric code.
    pub fn as_u16(self) -> u16 {
        if let ErrorCode::Other(n) = self {
            return n;
        }
        Self::TABLE
            .iter()
            .find(|(_, c)| *c == self)
            .map(|(n, _)| *n)
            .unwrap_or(17)
    }

    /// The code for a number; unknown numbers are kept as [`ErrorCode::Other`].
    pub fn from_u16(n: u16) -> Self {
        Self::TABLE
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, c)| *c)
            .unwrap_or(ErrorCode::Other(n))
    }

    /// The stable snake_case name used in logs, metrics and JSON output.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::NotAuthenticated => "not_authenticated",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::HandleTaken => "handle_taken",
            ErrorCode::HandleInvalid => "handle_invalid",
            ErrorCode::NotFound => "not_found",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::BadPrekey => "bad_prekey",
            ErrorCode::QueueOverflow => "queue_overflow",
            ErrorCode::BrokerUnavailable => "broker_unavailable",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Timeout => "timeout",
            ErrorCode::AlreadyAuthenticated => "already_authenticated",
            ErrorCode::HookDenied => "hook_denied",
            ErrorCode::BadEnvelope => "bad_envelope",
            ErrorCode::AlreadyRegistered => "already_registered",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Unexpected => "unexpected",
            ErrorCode::TooManyRecipients => "too_many_recipients",
            ErrorCode::MailboxFull => "mailbox_full",
            ErrorCode::MailboxUnavailable => "mailbox_unavailable",
            ErrorCode::CommitConflict => "commit_conflict",
            ErrorCode::WrongEpoch => "wrong_epoch",
            ErrorCode::NotAMember => "not_a_member",
            ErrorCode::BadKeyPackage => "bad_key_package",
            ErrorCode::Other(_) => "other",
        }
    }

    /// The WebSocket close code that carries this error.
    pub fn close_code(self) -> u16 {
        4000u16.saturating_add(self.as_u16().min(999))
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorCode::Other(n) => write!(f, "error code {n}"),
            other => f.write_str(other.name()),
        }
    }
}

impl From<&WireError> for ErrorCode {
    fn from(e: &WireError) -> Self {
        match e {
            WireError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            WireError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            _ => ErrorCode::Malformed,
        }
    }
}

/// What happened to one recipient of a send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A live session of the recipient took the message.
    Delivered,
    /// No session of the recipient is connected anywhere; the message was not stored (the
    /// relay keeps no mailbox).
    Offline,
    /// No session of the recipient is connected; the sealed message waits in the recipient's
    /// mailbox until the recipient logs in and acknowledges it, or until it expires.
    Stored,
    /// The relay refused or could not deliver, with the reason.
    Rejected(ErrorCode),
}

/// One recipient's outcome in a [`Frame::SendResult`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecipientOutcome {
    /// The recipient.
    pub user_id: UserId,
    /// What happened.
    pub outcome: Outcome,
}

/// Every frame either side can send. See `docs/PROTOCOL.md` for the byte layout of each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    // Relay to client.
    /// First frame on every connection: who the relay is and a fresh nonce to sign.
    Challenge {
        /// The relay's (cluster's) id, bound into every proof so proofs cannot be replayed to
        /// another relay.
        relay_id: String,
        /// A fresh random nonce, used once.
        nonce: [u8; NONCE_LEN],
        /// The relay's clock, for the client to estimate skew.
        server_time_ms: u64,
        /// The largest frame the relay accepts.
        max_frame: u32,
    },
    /// The session is authenticated.
    AuthOk {
        /// The authenticated user.
        user_id: UserId,
        /// A short-lived token to resume on any node of the cluster.
        token: String,
        /// When the token expires.
        token_expires_ms: u64,
    },
    /// A looked-up identity record.
    Record {
        /// The lookup this answers.
        request_id: RequestId,
        /// The record (the client verifies it).
        record: IdentityRecord,
    },
    /// A request succeeded with nothing to return.
    Ack {
        /// The request this answers.
        request_id: RequestId,
    },
    /// What happened to each recipient of a send.
    SendResult {
        /// The send this answers.
        request_id: RequestId,
        /// The envelope's message id.
        message_id: MessageId,
        /// One outcome per recipient.
        outcomes: Vec<RecipientOutcome>,
    },
    /// A sealed envelope for this session's user.
    Deliver {
        /// The envelope bytes, untouched by the relay.
        envelope: Bytes,
    },
    /// A sealed envelope that waited in this user's mailbox. Sent after `AuthOk`, in the order
    /// the envelopes were stored, before any live `Deliver`. The client acknowledges it with
    /// [`Frame::Acknowledge`] once the message is durably in its history; until then the relay
    /// keeps it and sends it again at the next login.
    Pending {
        /// The mailbox entry, increasing per recipient.
        entry_id: u64,
        /// The envelope bytes, untouched by the relay.
        envelope: Bytes,
    },
    /// The mailbox backlog sent after this login is complete: `count` `Pending` frames came
    /// before it. Live deliveries follow.
    PendingEnd {
        /// How many `Pending` frames this login's backlog had.
        count: u32,
    },
    /// A claimed KeyPackage, for adding `user_id` to a group.
    KeyPackage {
        /// The claim this answers.
        request_id: RequestId,
        /// Whose it is (the claimer checks the package is bound to this user).
        user_id: UserId,
        /// Whether it is the user's last-resort package.
        last_resort: bool,
        /// The package.
        package: Bytes,
    },
    /// How many KeyPackages this user has in the directory (the answer to a publish).
    KeyPackages {
        /// The publish this answers.
        request_id: RequestId,
        /// One-time packages left.
        one_time: u32,
        /// Whether a last-resort package is published.
        last_resort: bool,
    },
    /// Something failed.
    Error {
        /// The request that failed, or 0.
        request_id: RequestId,
        /// What kind of failure.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },

    // Client to relay.
    /// Register a new identity under a handle, proving possession of the identity key.
    Register {
        /// The requested handle (validated by the relay, so a bad one gets its own code).
        handle: String,
        /// The Ed25519 identity key.
        identity_key: [u8; 32],
        /// The first signed prekey.
        prekey: SignedPrekey,
        /// Signature over the registration statement (see [`register_statement`]).
        signature: [u8; 64],
    },
    /// Log in by signing the challenge.
    Auth {
        /// Who is logging in.
        user_id: UserId,
        /// The URL the client dialled, as it dialled it; signed, so a login proof made for one
        /// address cannot be passed on by whoever answered there (see [`login_statement`]).
        url: String,
        /// Signature over the login statement (see [`login_statement`]).
        signature: [u8; 64],
    },
    /// Resume with a token from [`Frame::AuthOk`].
    Resume {
        /// The token.
        token: String,
    },
    /// Look up a record by handle.
    LookupHandle {
        /// Echoed in the reply.
        request_id: RequestId,
        /// The handle.
        handle: String,
    },
    /// Look up a record by user id.
    LookupId {
        /// Echoed in the reply.
        request_id: RequestId,
        /// The user id.
        user_id: UserId,
    },
    /// Replace this user's signed prekey.
    RotatePrekey {
        /// Echoed in the reply.
        request_id: RequestId,
        /// The new prekey.
        prekey: SignedPrekey,
    },
    /// Send a sealed envelope to the recipients named in its header.
    Send {
        /// Echoed in the send result.
        request_id: RequestId,
        /// The envelope.
        envelope: Bytes,
    },
    /// Deletes this user's mailbox entries up to and including `entry_id` (they are durably
    /// in the client's history). No reply.
    Acknowledge {
        /// The last entry handled.
        entry_id: u64,
    },
    /// Empties this user's mailbox. Answered with `Ack`.
    ClearMailbox {
        /// Echoed in the reply.
        request_id: RequestId,
    },
    /// Adds one-time KeyPackages to this user's directory entry and, if given, replaces its
    /// last-resort package. Answered with `KeyPackages` (also with none, to ask for the count).
    PublishKeyPackages {
        /// Echoed in the reply.
        request_id: RequestId,
        /// The new last-resort package, if any.
        last_resort: Option<Bytes>,
        /// One-time packages.
        one_time: Vec<Bytes>,
    },
    /// Claims one of a user's KeyPackages. Answered with `KeyPackage`, or `not_found`.
    ClaimKeyPackage {
        /// Echoed in the reply.
        request_id: RequestId,
        /// Whose.
        user_id: UserId,
    },

    // Either direction.
    /// Liveness probe.
    Ping {
        /// Echoed in the pong.
        nonce: u64,
    },
    /// Answer to a ping.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
}

mod tag {
    pub const CHALLENGE: u8 = 0x01;
    pub const AUTH_OK: u8 = 0x02;
    pub const RECORD: u8 = 0x03;
    pub const ACK: u8 = 0x04;
    pub const SEND_RESULT: u8 = 0x05;
    pub const DELIVER: u8 = 0x06;
    pub const ERROR: u8 = 0x07;
    pub const PENDING: u8 = 0x08;
    pub const PENDING_END: u8 = 0x09;
    pub const KEY_PACKAGE: u8 = 0x0a;
    pub const KEY_PACKAGES: u8 = 0x0b;
    pub const REGISTER: u8 = 0x10;
    pub const AUTH: u8 = 0x11;
    pub const RESUME: u8 = 0x12;
    pub const LOOKUP_HANDLE: u8 = 0x13;
    pub const LOOKUP_ID: u8 = 0x14;
    pub const ROTATE_PREKEY: u8 = 0x15;
    pub const SEND: u8 = 0x16;
    pub const ACKNOWLEDGE: u8 = 0x17;
    pub const CLEAR_MAILBOX: u8 = 0x18;
    pub const PUBLISH_KEY_PACKAGES: u8 = 0x19;
    pub const CLAIM_KEY_PACKAGE: u8 = 0x1a;
    pub const PING: u8 = 0x20;
    pub const PONG: u8 = 0x21;
}

const OUTCOME_DELIVERED: u8 = 0;
const OUTCOME_OFFLINE: u8 = 1;
const OUTCOME_REJECTED: u8 = 2;
const OUTCOME_STORED: u8 = 3;

/// The statement a client signs to register: binds the relay, the challenge nonce, the handle,
/// the identity key and the prekey, so a registration proof cannot be replayed elsewhere or
/// reused with another handle or prekey.
pub fn register_statement(
    relay_id: &str,
    nonce: &[u8; NONCE_LEN],
    handle: &str,
    identity_key: &[u8; 32],
    prekey: &SignedPrekey,
) -> Vec<u8> {
    let mut t = crate::crypto::transcript::Transcript::new("syncra/v1/register");
    t.bytes(relay_id.as_bytes())
        .fixed(nonce)
        .bytes(handle.as_bytes())
        .fixed(identity_key)
        .fixed(&prekey.public)
        .u64(prekey.created_at)
        .fixed(&prekey.signature);
    t.finish()
}

/// The statement a client signs to log in: binds the relay id the client pinned, the URL it
/// dialled and the one-time nonce. A relay that passes another relay's challenge through gets a
/// proof naming its own URL (which the other relay refuses when it knows its public URLs), and
/// a client refuses a challenge whose relay id is not the one it registered with.
pub fn login_statement(
    relay_id: &str,
    url: &str,
    nonce: &[u8; NONCE_LEN],
    user_id: &UserId,
) -> Vec<u8> {
    let mut t = crate::crypto::transcript::Transcript::new("syncra/v2/login");
    t.bytes(relay_id.as_bytes())
        .bytes(url.as_bytes())
        .fixed(nonce)
        .fixed(user_id.as_bytes());
    t.finish()
}

impl Frame {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Challenge { .. } => "challenge",
            Frame::AuthOk { .. } => "auth_ok",
            Frame::Record { .. } => "record",
            Frame::Ack { .. } => "ack",
            Frame::SendResult { .. } => "send_result",
            Frame::Deliver { .. } => "deliver",
            Frame::Pending { .. } => "pending",
            Frame::PendingEnd { .. } => "pending_end",
            Frame::Acknowledge { .. } => "acknowledge",
            Frame::ClearMailbox { .. } => "clear_mailbox",
            Frame::KeyPackage { .. } => "key_package",
            Frame::KeyPackages { .. } => "key_packages",
            Frame::PublishKeyPackages { .. } => "publish_key_packages",
            Frame::ClaimKeyPackage { .. } => "claim_key_package",
            Frame::Error { .. } => "error",
            Frame::Register { .. } => "register",
            Frame::Auth { .. } => "auth",
            Frame::Resume { .. } => "resume",
            Frame::LookupHandle { .. } => "lookup_handle",
            Frame::LookupId { .. } => "lookup_id",
            Frame::RotatePrekey { .. } => "rotate_prekey",
            Frame::Send { .. } => "send",
            Frame::Ping { .. } => "ping",
            Frame::Pong { .. } => "pong",
        }
    }

    /// Encodes the frame.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len_hint());
        self.encode_into(&mut out);
        out.freeze()
    }

    fn encoded_len_hint(&self) -> usize {
        match self {
            Frame::Deliver { envelope }
            | Frame::Send { envelope, .. }
            | Frame::Pending { envelope, .. } => 16 + envelope.len(),
            Frame::SendResult { outcomes, .. } => send_result_len(outcomes),
            Frame::PublishKeyPackages {
                last_resort,
                one_time,
                ..
            } => {
                16 + last_resort.as_ref().map_or(0, |p| p.len())
                    + one_time.iter().map(|p| 2 + p.len()).sum::<usize>()
            }
            _ => 256,
        }
    }

    /// Encodes the frame into a buffer.
    pub fn encode_into(&self, out: &mut BytesMut) {
        out.put_u8(PROTOCOL_VERSION);
        match self {
            Frame::Challenge {
                relay_id,
                nonce,
                server_time_ms,
                max_frame,
            } => {
                out.put_u8(tag::CHALLENGE);
                put_str8(out, relay_id, MAX_RELAY_ID_LEN);
                out.put_slice(nonce);
                out.put_u64(*server_time_ms);
                out.put_u32(*max_frame);
            }
            Frame::AuthOk {
                user_id,
                token,
                token_expires_ms,
            } => {
                out.put_u8(tag::AUTH_OK);
                out.put_slice(user_id.as_bytes());
                put_str16(out, token, MAX_TOKEN_LEN);
                out.put_u64(*token_expires_ms);
            }
            Frame::Record { request_id, record } => {
                out.put_u8(tag::RECORD);
                out.put_u32(*request_id);
                out.put_slice(record.user_id.as_bytes());
                put_str8(out, record.handle.as_str(), crate::id::HANDLE_MAX_LEN);
                out.put_slice(&record.identity_key);
                put_prekey(out, &record.prekey);
            }
            Frame::Ack { request_id } => {
                out.put_u8(tag::ACK);
                out.put_u32(*request_id);
            }
            Frame::SendResult {
                request_id,
                message_id,
                outcomes,
            } => put_send_result(out, *request_id, message_id, outcomes),
            Frame::Deliver { envelope } => {
                out.put_u8(tag::DELIVER);
                put_bytes32(out, envelope);
            }
            Frame::Pending { entry_id, envelope } => {
                out.put_u8(tag::PENDING);
                out.put_u64(*entry_id);
                put_bytes32(out, envelope);
            }
            Frame::PendingEnd { count } => {
                out.put_u8(tag::PENDING_END);
                out.put_u32(*count);
            }
            Frame::KeyPackage {
                request_id,
                user_id,
                last_resort,
                package,
            } => {
                out.put_u8(tag::KEY_PACKAGE);
                out.put_u32(*request_id);
                out.put_slice(user_id.as_bytes());
                out.put_u8(u8::from(*last_resort));
                put_bytes16(out, package);
            }
            Frame::KeyPackages {
                request_id,
                one_time,
                last_resort,
            } => {
                out.put_u8(tag::KEY_PACKAGES);
                out.put_u32(*request_id);
                out.put_u32(*one_time);
                out.put_u8(u8::from(*last_resort));
            }
            Frame::PublishKeyPackages {
                request_id,
                last_resort,
                one_time,
            } => {
                out.put_u8(tag::PUBLISH_KEY_PACKAGES);
                out.put_u32(*request_id);
                put_bytes16(out, last_resort.as_deref().unwrap_or_default());
                let one_time = &one_time[..one_time.len().min(MAX_KEY_PACKAGES_PER_FRAME)];
                out.put_u16(one_time.len() as u16);
                for p in one_time {
                    put_bytes16(out, p);
                }
            }
            Frame::ClaimKeyPackage {
                request_id,
                user_id,
            } => {
                out.put_u8(tag::CLAIM_KEY_PACKAGE);
                out.put_u32(*request_id);
                out.put_slice(user_id.as_bytes());
            }
            Frame::Error {
                request_id,
                code,
                message,
            } => {
                out.put_u8(tag::ERROR);
                out.put_u32(*request_id);
                out.put_u16(code.as_u16());
                put_str16(out, message, MAX_MESSAGE_LEN);
            }
            Frame::Register {
                handle,
                identity_key,
                prekey,
                signature,
            } => {
                out.put_u8(tag::REGISTER);
                put_str8(out, handle, MAX_HANDLE_FIELD);
                out.put_slice(identity_key);
                put_prekey(out, prekey);
                out.put_slice(signature);
            }
            Frame::Auth {
                user_id,
                url,
                signature,
            } => {
                out.put_u8(tag::AUTH);
                out.put_slice(user_id.as_bytes());
                put_str16(out, url, MAX_URL_LEN);
                out.put_slice(signature);
            }
            Frame::Resume { token } => {
                out.put_u8(tag::RESUME);
                put_str16(out, token, MAX_TOKEN_LEN);
            }
            Frame::LookupHandle { request_id, handle } => {
                out.put_u8(tag::LOOKUP_HANDLE);
                out.put_u32(*request_id);
                put_str8(out, handle, MAX_HANDLE_FIELD);
            }
            Frame::LookupId {
                request_id,
                user_id,
            } => {
                out.put_u8(tag::LOOKUP_ID);
                out.put_u32(*request_id);
                out.put_slice(user_id.as_bytes());
            }
            Frame::RotatePrekey { request_id, prekey } => {
                out.put_u8(tag::ROTATE_PREKEY);
                out.put_u32(*request_id);
                put_prekey(out, prekey);
            }
            Frame::Send {
                request_id,
                envelope,
            } => {
                out.put_u8(tag::SEND);
                out.put_u32(*request_id);
                put_bytes32(out, envelope);
            }
            Frame::Acknowledge { entry_id } => {
                out.put_u8(tag::ACKNOWLEDGE);
                out.put_u64(*entry_id);
            }
            Frame::ClearMailbox { request_id } => {
                out.put_u8(tag::CLEAR_MAILBOX);
                out.put_u32(*request_id);
            }
            Frame::Ping { nonce } => {
                out.put_u8(tag::PING);
                out.put_u64(*nonce);
            }
            Frame::Pong { nonce } => {
                out.put_u8(tag::PONG);
                out.put_u64(*nonce);
            }
        }
    }

    /// Decodes one frame, refusing anything over `max_frame` bytes. Never panics; envelope bytes
    /// are shared with `input`, not copied.
    pub fn decode(input: &Bytes, max_frame: usize) -> Result<Frame, WireError> {
        Self::decode_with(input, max_frame, false).map(|(frame, _)| frame)
    }

    /// [`Frame::decode`] taking the frame by value, with the same results. The envelope of a
    /// `Send`, `Deliver` or `Pending` runs to the end of its frame, so it becomes the frame's
    /// own buffer advanced past the header instead of a second reference to it: a buffer that
    /// is referenced twice is first moved behind a shared header, one allocation per message
    /// on the relay's hottest path (docs/BENCHMARKS.md, allocations per message).
    pub fn decode_owned(input: Bytes, max_frame: usize) -> Result<Frame, WireError> {
        let (mut frame, tail) = Self::decode_with(&input, max_frame, true)?;
        let (Some(start), Some(envelope)) = (tail, frame.tail_envelope()) else {
            return Ok(frame);
        };
        let mut rest = input;
        rest.advance(start);
        *envelope = rest;
        Ok(frame)
    }

    /// The envelope field of the frames whose last field it is (those `decode_owned` fills).
    fn tail_envelope(&mut self) -> Option<&mut Bytes> {
        match self {
            Frame::Send { envelope, .. }
            | Frame::Deliver { envelope }
            | Frame::Pending { envelope, .. } => Some(envelope),
            _ => None,
        }
    }

    /// Decodes; with `defer_tail`, a `Send`'s, `Deliver`'s or `Pending`'s envelope is left empty
    /// and its offset returned, for [`Frame::decode_owned`] to fill.
    fn decode_with(
        input: &Bytes,
        max_frame: usize,
        defer_tail: bool,
    ) -> Result<(Frame, Option<usize>), WireError> {
        if input.len() > max_frame {
            return Err(WireError::TooLarge {
                size: input.len(),
                max: max_frame,
            });
        }
        let mut r = Reader {
            buf: input,
            pos: 0,
            defer_tail: false,
            tail: None,
        };
        let version = r.u8("version")?;
        if version != PROTOCOL_VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        let kind = r.u8("type")?;
        // Only for the frames whose envelope is their last field and is not looked into here.
        r.defer_tail = defer_tail && matches!(kind, tag::SEND | tag::DELIVER | tag::PENDING);
        let frame = match kind {
            tag::CHALLENGE => Frame::Challenge {
                relay_id: r.str8("relay_id", MAX_RELAY_ID_LEN)?,
                nonce: r.array("nonce")?,
                server_time_ms: r.u64("server_time_ms")?,
                max_frame: r.u32("max_frame")?,
            },
            tag::AUTH_OK => Frame::AuthOk {
                user_id: r.user_id("user_id")?,
                token: r.str16("token", MAX_TOKEN_LEN)?,
                token_expires_ms: r.u64("token_expires_ms")?,
            },
            tag::RECORD => {
                let request_id = r.u32("request_id")?;
                let user_id = r.user_id("user_id")?;
                let handle = r.str8("handle", crate::id::HANDLE_MAX_LEN)?;
                // Records carry canonical handles only, so a record re-encodes to the same bytes.
                let handle = Handle::parse(&handle)
                    .ok()
                    .filter(|h| h.as_str() == handle)
                    .ok_or(WireError::Invalid {
                        field: "handle",
                        why: "not a canonical handle",
                    })?;
                Frame::Record {
                    request_id,
                    record: IdentityRecord {
                        user_id,
                        handle,
                        identity_key: r.array("identity_key")?,
                        prekey: r.prekey()?,
                    },
                }
            }
            tag::ACK => Frame::Ack {
                request_id: r.u32("request_id")?,
            },
            tag::SEND_RESULT => {
                let request_id = r.u32("request_id")?;
                let message_id: [u8; MESSAGE_ID_LEN] = r.array("message_id")?;
                let count = r.u16("outcome_count")? as usize;
                if count > MAX_OUTCOMES {
                    return Err(WireError::Invalid {
                        field: "outcome_count",
                        why: "more outcomes than recipients allowed",
                    });
                }
                // 23 bytes per outcome must be present before we allocate for them.
                r.need(count * (USER_ID_LEN + 3), "outcomes")?;
                let mut outcomes = Vec::with_capacity(count);
                for _ in 0..count {
                    let user_id = r.user_id("outcome.user_id")?;
                    let kind = r.u8("outcome.kind")?;
                    let code = r.u16("outcome.code")?;
                    let outcome = match kind {
                        OUTCOME_DELIVERED | OUTCOME_OFFLINE | OUTCOME_STORED if code != 0 => {
                            return Err(WireError::Invalid {
                                field: "outcome.code",
                                why: "must be 0 unless rejected",
                            });
                        }
                        OUTCOME_DELIVERED => Outcome::Delivered,
                        OUTCOME_OFFLINE => Outcome::Offline,
                        OUTCOME_STORED => Outcome::Stored,
                        OUTCOME_REJECTED => Outcome::Rejected(ErrorCode::from_u16(code)),
                        _ => {
                            return Err(WireError::Invalid {
                                field: "outcome.kind",
                                why: "unknown outcome",
                            });
                        }
                    };
                    outcomes.push(RecipientOutcome { user_id, outcome });
                }
                Frame::SendResult {
                    request_id,
                    message_id,
                    outcomes,
                }
            }
            tag::DELIVER => Frame::Deliver {
                envelope: r.bytes32("envelope")?,
            },
            tag::PENDING => Frame::Pending {
                entry_id: r.u64("entry_id")?,
                envelope: r.bytes32("envelope")?,
            },
            tag::PENDING_END => Frame::PendingEnd {
                count: r.u32("count")?,
            },
            tag::KEY_PACKAGE => Frame::KeyPackage {
                request_id: r.u32("request_id")?,
                user_id: r.user_id("user_id")?,
                last_resort: r.flag("last_resort")?,
                package: r.key_package("package")?,
            },
            tag::KEY_PACKAGES => Frame::KeyPackages {
                request_id: r.u32("request_id")?,
                one_time: r.u32("one_time")?,
                last_resort: r.flag("last_resort")?,
            },
            tag::PUBLISH_KEY_PACKAGES => {
                let request_id = r.u32("request_id")?;
                let last_resort = r.bytes16("last_resort", MAX_KEY_PACKAGE_LEN)?;
                let last_resort = (!last_resort.is_empty()).then_some(last_resort);
                let count = r.u16("count")? as usize;
                if count > MAX_KEY_PACKAGES_PER_FRAME {
                    return Err(WireError::Invalid {
                        field: "count",
                        why: "more KeyPackages than one frame may carry",
                    });
                }
                // Each needs at least its 2-byte length: check before allocating.
                r.need(count * 2, "one_time")?;
                let mut one_time = Vec::with_capacity(count);
                for _ in 0..count {
                    one_time.push(r.key_package("one_time")?);
                }
                Frame::PublishKeyPackages {
                    request_id,
                    last_resort,
                    one_time,
                }
            }
            tag::CLAIM_KEY_PACKAGE => Frame::ClaimKeyPackage {
                request_id: r.u32("request_id")?,
                user_id: r.user_id("user_id")?,
            },
            tag::ERROR => Frame::Error {
                request_id: r.u32("request_id")?,
                code: ErrorCode::from_u16(r.u16("code")?),
                message: r.str16("message", MAX_MESSAGE_LEN)?,
            },
            tag::REGISTER => Frame::Register {
                handle: r.str8("handle", MAX_HANDLE_FIELD)?,
                identity_key: r.array("identity_key")?,
                prekey: r.prekey()?,
                signature: r.array("signature")?,
            },
            tag::AUTH => Frame::Auth {
                user_id: r.user_id("user_id")?,
                url: r.str16("url", MAX_URL_LEN)?,
                signature: r.array("signature")?,
            },
            tag::RESUME => Frame::Resume {
                token: r.str16("token", MAX_TOKEN_LEN)?,
            },
            tag::LOOKUP_HANDLE => Frame::LookupHandle {
                request_id: r.u32("request_id")?,
                handle: r.str8("handle", MAX_HANDLE_FIELD)?,
            },
            tag::LOOKUP_ID => Frame::LookupId {
                request_id: r.u32("request_id")?,
                user_id: r.user_id("user_id")?,
            },
            tag::ROTATE_PREKEY => Frame::RotatePrekey {
                request_id: r.u32("request_id")?,
                prekey: r.prekey()?,
            },
            tag::SEND => Frame::Send {
                request_id: r.u32("request_id")?,
                envelope: r.bytes32("envelope")?,
            },
            tag::ACKNOWLEDGE => Frame::Acknowledge {
                entry_id: r.u64("entry_id")?,
            },
            tag::CLEAR_MAILBOX => Frame::ClearMailbox {
                request_id: r.u32("request_id")?,
            },
            tag::PING => Frame::Ping {
                nonce: r.u64("nonce")?,
            },
            tag::PONG => Frame::Pong {
                nonce: r.u64("nonce")?,
            },
            other => return Err(WireError::UnknownType(other)),
        };
        let rest = input.len() - r.pos;
        if rest != 0 {
            return Err(WireError::Trailing(rest));
        }
        Ok((frame, r.tail))
    }
}

/// Encodes a `Deliver` frame around envelope bytes without building a [`Frame`] first. The relay
/// encodes each envelope once and shares the result between every session it goes to.
pub fn encode_deliver(envelope: &[u8]) -> Bytes {
    encode_deliver_after(&[], envelope)
}

/// Bytes of a [`Frame::SendResult`] with these outcomes, exactly (so its buffer is filled and
/// becomes a `Bytes` without a second allocation).
fn send_result_len(outcomes: &[RecipientOutcome]) -> usize {
    // Version, tag, request id, message id, count; then per outcome a user id, a kind and a
    // code.
    1 + 1 + 4 + MESSAGE_ID_LEN + 2 + outcomes.len().min(MAX_OUTCOMES) * (USER_ID_LEN + 1 + 2)
}

/// A [`Frame::SendResult`] encoded from a slice of outcomes: what the relay answers every send
/// with, built without collecting the outcomes into the frame's `Vec` first.
pub fn encode_send_result(
    request_id: RequestId,
    message_id: &MessageId,
    outcomes: &[RecipientOutcome],
) -> Bytes {
    let mut out = BytesMut::with_capacity(send_result_len(outcomes));
    out.put_u8(PROTOCOL_VERSION);
    put_send_result(&mut out, request_id, message_id, outcomes);
    out.freeze()
}

fn put_send_result(
    out: &mut BytesMut,
    request_id: RequestId,
    message_id: &MessageId,
    outcomes: &[RecipientOutcome],
) {
    out.put_u8(tag::SEND_RESULT);
    out.put_u32(request_id);
    out.put_slice(message_id);
    // More outcomes than recipients cannot happen; cut rather than write a frame the
    // peer would refuse.
    let outcomes = &outcomes[..outcomes.len().min(MAX_OUTCOMES)];
    out.put_u16(outcomes.len() as u16);
    for o in outcomes {
        out.put_slice(o.user_id.as_bytes());
        match o.outcome {
            Outcome::Delivered => {
                out.put_u8(OUTCOME_DELIVERED);
                out.put_u16(0);
            }
            Outcome::Offline => {
                out.put_u8(OUTCOME_OFFLINE);
                out.put_u16(0);
            }
            Outcome::Stored => {
                out.put_u8(OUTCOME_STORED);
                out.put_u16(0);
            }
            Outcome::Rejected(code) => {
                out.put_u8(OUTCOME_REJECTED);
                out.put_u16(code.as_u16());
            }
        }
    }
}

/// [`encode_deliver`] written after `prefix` in the same buffer, so a caller that needs both the
/// frame and the prefixed frame (the relay's broker payload is its node id, then the frame) gets
/// the frame as a slice of the whole without a second copy.
pub fn encode_deliver_after(prefix: &[u8], envelope: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(prefix.len() + 6 + envelope.len());
    out.put_slice(prefix);
    out.put_u8(PROTOCOL_VERSION);
    out.put_u8(tag::DELIVER);
    put_bytes32(&mut out, envelope);
    out.freeze()
}

/// The longest prefix of `s` that fits in `max` bytes without splitting a character. Encoders
/// cut to the same limits the decoder enforces, so an encoded frame always decodes.
fn fit(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_str8(out: &mut BytesMut, s: &str, max: usize) {
    let s = fit(s, max.min(u8::MAX as usize));
    out.put_u8(s.len() as u8);
    out.put_slice(s.as_bytes());
}

fn put_str16(out: &mut BytesMut, s: &str, max: usize) {
    let s = fit(s, max.min(u16::MAX as usize));
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn put_bytes32(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(b.len().min(u32::MAX as usize) as u32);
    out.put_slice(b);
}

fn put_bytes16(out: &mut BytesMut, b: &[u8]) {
    let b = &b[..b.len().min(MAX_KEY_PACKAGE_LEN)];
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}

fn put_prekey(out: &mut BytesMut, p: &SignedPrekey) {
    out.put_slice(&p.public);
    out.put_u64(p.created_at);
    out.put_slice(&p.signature);
}

struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    /// A `bytes32` that ends the input is not sliced but left empty, its start kept in `tail`.
    defer_tail: bool,
    tail: Option<usize>,
}

impl Reader<'_> {
    fn need(&self, n: usize, what: &'static str) -> Result<(), WireError> {
        if self.buf.len().saturating_sub(self.pos) < n {
            Err(WireError::Truncated(what))
        } else {
            Ok(())
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], WireError> {
        self.need(n, what)?;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn user_id(&mut self, what: &'static str) -> Result<UserId, WireError> {
        Ok(UserId::from_bytes(self.array(what)?))
    }

    fn string(&mut self, n: usize, what: &'static str) -> Result<String, WireError> {
        let bytes = self.take(n, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| WireError::Invalid {
                field: what,
                why: "not UTF-8",
            })
    }

    fn str8(&mut self, what: &'static str, max: usize) -> Result<String, WireError> {
        let n = self.u8(what)? as usize;
        if n > max {
            return Err(WireError::Invalid {
                field: what,
                why: "too long",
            });
        }
        self.string(n, what)
    }

    fn str16(&mut self, what: &'static str, max: usize) -> Result<String, WireError> {
        let n = self.u16(what)? as usize;
        if n > max {
            return Err(WireError::Invalid {
                field: what,
                why: "too long",
            });
        }
        self.string(n, what)
    }

    fn bytes32(&mut self, what: &'static str) -> Result<Bytes, WireError> {
        let n = self.u32(what)? as usize;
        self.need(n, what)?;
        let (start, end) = (self.pos, self.pos + n);
        self.pos = end;
        if self.defer_tail && end == self.buf.len() {
            self.tail = Some(start);
            return Ok(Bytes::new());
        }
        Ok(self.buf.slice(start..end))
    }

    fn bytes16(&mut self, what: &'static str, max: usize) -> Result<Bytes, WireError> {
        let n = self.u16(what)? as usize;
        if n > max {
            return Err(WireError::Invalid {
                field: what,
                why: "too long",
            });
        }
        self.need(n, what)?;
        let b = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }

    /// A KeyPackage: 1 to [`MAX_KEY_PACKAGE_LEN`] bytes.
    fn key_package(&mut self, what: &'static str) -> Result<Bytes, WireError> {
        let b = self.bytes16(what, MAX_KEY_PACKAGE_LEN)?;
        if b.is_empty() {
            return Err(WireError::Invalid {
                field: what,
                why: "empty KeyPackage",
            });
        }
        Ok(b)
    }

    fn flag(&mut self, what: &'static str) -> Result<bool, WireError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Invalid {
                field: what,
                why: "must be 0 or 1",
            }),
        }
    }

    fn prekey(&mut self) -> Result<SignedPrekey, WireError> {
        Ok(SignedPrekey {
            public: self.array("prekey.public")?,
            created_at: self.u64("prekey.created_at")?,
            signature: self.array("prekey.signature")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_round_trip() {
        for (n, code) in ErrorCode::TABLE {
            assert_eq!(code.as_u16(), *n);
            assert_eq!(ErrorCode::from_u16(*n), *code);
        }
        assert_eq!(ErrorCode::from_u16(999), ErrorCode::Other(999));
        assert_eq!(ErrorCode::Other(999).as_u16(), 999);
        assert_eq!(ErrorCode::RateLimited.close_code(), 4011);
    }

    #[test]
    fn encoders_cut_to_decoder_limits_on_char_boundaries() {
        let long = "é".repeat(MAX_MESSAGE_LEN);
        let f = Frame::Error {
            request_id: 1,
            code: ErrorCode::Internal,
            message: long,
        };
        let Frame::Error { message, .. } = Frame::decode(&f.encode(), DEFAULT_MAX_FRAME).unwrap()
        else {
            panic!("not an error frame")
        };
        assert!(message.len() <= MAX_MESSAGE_LEN);
        assert!(message.chars().all(|c| c == 'é'));
    }

    #[test]
    fn deliver_helper_matches_frame_encoding() {
        let env = Bytes::from_static(b"sealed bytes");
        assert_eq!(
            encode_deliver(&env),
            Frame::Deliver {
                envelope: env.clone()
            }
            .encode()
        );
    }

    #[test]
    fn send_result_helper_matches_frame_encoding_and_sizes_its_buffer_exactly() {
        let outcome = |n: u8, outcome| RecipientOutcome {
            user_id: UserId::from_bytes([n; USER_ID_LEN]),
            outcome,
        };
        let kinds = [
            Outcome::Delivered,
            Outcome::Offline,
            Outcome::Stored,
            Outcome::Rejected(ErrorCode::RateLimited),
        ];
        let many: Vec<_> = (0..MAX_OUTCOMES + 3)
            .map(|i| outcome(i as u8, kinds[i % kinds.len()]))
            .collect();
        for outcomes in [&[][..], &many[..1], &many[..4], &many[..]] {
            let frame = Frame::SendResult {
                request_id: 7,
                message_id: [3; MESSAGE_ID_LEN],
                outcomes: outcomes.to_vec(),
            };
            let helper = encode_send_result(7, &[3; MESSAGE_ID_LEN], outcomes);
            assert_eq!(helper, frame.encode());
            // Exactly the bytes written: the buffer becomes a `Bytes` without another
            // allocation, and a wrong size would make it grow mid-encoding.
            assert_eq!(send_result_len(outcomes), helper.len());
            let decoded = Frame::decode(&helper, usize::MAX).unwrap();
            let Frame::SendResult { outcomes: back, .. } = decoded else {
                panic!("{decoded:?}");
            };
            assert_eq!(back, outcomes[..outcomes.len().min(MAX_OUTCOMES)]);
        }
    }
}

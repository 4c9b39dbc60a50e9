//! The input of `relay_session`: a list of [`Action`]s derived from the fuzz bytes with
//! `arbitrary`. Kept apart from the harness so that `examples/gen_seeds.rs` can search for seeds
//! without building a relay.

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use syncra_core::wire::NONCE_LEN;

/// A fixed, pre-registered user.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// Registered at start-up.
    Alice,
    /// Registered at start-up.
    Bob,
}

/// A user id to put in a frame.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Pick {
    /// Alice (registered).
    Alice,
    /// Bob (registered).
    Bob,
    /// Carol (registered only if an input registered her).
    Carol,
    /// Any id.
    Other([u8; 20]),
}

/// A handle to put in a frame.
#[derive(Arbitrary, Debug, Clone)]
pub enum HandleArg {
    /// Alice's handle.
    Alice,
    /// Bob's handle.
    Bob,
    /// Carol's handle.
    Carol,
    /// Any string.
    Raw(String),
}

/// A signed prekey with fuzzed fields.
#[derive(Arbitrary, Debug, Clone)]
pub struct FuzzPrekey {
    /// Public key.
    pub public: [u8; 32],
    /// Creation time.
    pub created_at: u64,
    /// Signature.
    pub signature: [u8; 64],
}

/// Every frame of the protocol with fuzzed fields, including relay-to-client frames a client
/// must not send.
#[derive(Arbitrary, Debug, Clone)]
#[allow(missing_docs)]
pub enum FuzzFrame {
    Challenge {
        relay_id: String,
        nonce: [u8; NONCE_LEN],
        server_time_ms: u64,
        max_frame: u32,
    },
    AuthOk {
        user: Pick,
        token: String,
        token_expires_ms: u64,
    },
    Record {
        request_id: u32,
        user: Pick,
        handle: HandleArg,
        identity_key: [u8; 32],
        prekey: FuzzPrekey,
    },
    Ack {
        request_id: u32,
    },
    SendResult {
        request_id: u32,
        message_id: [u8; 16],
        outcomes: Vec<(Pick, u8, u16)>,
    },
    Deliver {
        envelope: Vec<u8>,
    },
    Error {
        request_id: u32,
        code: u16,
        message: String,
    },
    Register {
        handle: HandleArg,
        identity_key: [u8; 32],
        prekey: FuzzPrekey,
        signature: [u8; 64],
    },
    Auth {
        user: Pick,
        signature: [u8; 64],
    },
    Resume {
        token: String,
    },
    LookupHandle {
        request_id: u32,
        handle: HandleArg,
    },
    LookupId {
        request_id: u32,
        user: Pick,
    },
    RotatePrekey {
        request_id: u32,
        prekey: FuzzPrekey,
    },
    Send {
        request_id: u32,
        envelope: Vec<u8>,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
}

/// One step of an input.
#[derive(Arbitrary, Debug, Clone)]
pub enum Action {
    /// A frame with fuzzed fields, encoded canonically.
    Frame(FuzzFrame),
    /// Raw bytes as one WebSocket message (bad versions, unknown tags, truncated fields).
    Raw(Vec<u8>),
    /// A message over the relay's frame limit.
    Oversize {
        /// Bytes past the limit.
        extra: u16,
    },
    /// A valid login for the current challenge.
    Login(Who),
    /// A login signed for the previous challenge (a replayed proof).
    StaleLogin(Who),
    /// A valid registration of Carol under a fuzzed handle.
    Register(HandleArg),
    /// Resume with a valid token of Alice's.
    Resume,
    /// Resume with Alice's token with one byte changed.
    TamperedResume {
        /// Which byte (modulo the length).
        at: u16,
        /// Its new value.
        byte: u8,
    },
    /// A prekey properly signed by Alice, dated `offset_secs` from now.
    Rotate {
        /// Request id.
        request_id: u32,
        /// Creation time relative to now, in seconds.
        offset_secs: i32,
    },
    /// An envelope whose header is well formed (the relay reads nothing else) naming fuzzed
    /// recipients, with junk where the crypto goes.
    SendShaped {
        /// Request id.
        request_id: u32,
        /// Recipients.
        to: Vec<Pick>,
        /// Extra ciphertext bytes past the minimum.
        extra: u8,
    },
    /// A really sealed envelope from Alice.
    SendSealed {
        /// Request id.
        request_id: u32,
        /// Recipients (duplicates dropped).
        to: Vec<Who>,
        /// The body.
        body: Vec<u8>,
    },
    /// Wait until the relay has answered everything sent so far.
    Sync,
    /// Use the other connection from now on.
    Switch,
    /// Close the current connection and open a new one.
    Reconnect,
}

//! The sealed envelope: sign-then-encrypt with recipient binding, one ciphertext per message and
//! one HPKE wrap per recipient.
//!
//! Byte layout (all integers big-endian; see `docs/PROTOCOL.md`, "Envelope"):
//!
//! ```text
//! header (the AEAD associated data; the only part a relay reads)
//!   version            u8        = 1
//!   message_id         [16]
//!   recipient_count    u16       1..=MAX_RECIPIENTS
//!   recipients         recipient_count × (user_id [20], prekey [32])
//! wraps                recipient_count × (enc [32], wrapped [80])   HPKE, same order as recipients
//! nonce                [12]
//! ciphertext_len       u32
//! ciphertext           AES-256-GCM(content_key, nonce, inner, aad = header)
//!
//! wrapped key plaintext = content_key [32] || SHA-256(header) [32]
//! inner = sender_id [20] || sender_key [32] || timestamp_ms u64 || recipients_digest [32]
//!         || signature [64] || padded
//! padded = body_len u32 || body || zeros up to the bucket size
//! ```
//!
//! The signature covers `Transcript("syncra/v1/envelope")` of version, sender id,
//! recipients digest (SHA-256 over the length-prefixed list of every recipient id and prekey),
//! message id, timestamp and the padded plaintext. Because the recipients are signed, a recipient
//! who re-wraps a message to a third party (surreptitious forwarding) is caught: the third party
//! sees a signature that names other recipients.

use std::collections::{HashMap, VecDeque};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use rand::CryptoRng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::keys::{
    IdentityKeyPair, IdentityPublicKey, PrekeyPublic, PrekeyRing, WrapKem, verify_signature,
};
use super::transcript::Transcript;
use crate::error::{OpenError, SealError};
use crate::id::{USER_ID_LEN, UserId};

/// The envelope format version this build writes and reads.
pub const ENVELOPE_VERSION: u8 = 1;
/// The most recipients one envelope may name.
pub const MAX_RECIPIENTS: usize = 512;
/// The largest message body, in bytes.
pub const MAX_BODY: usize = 256 * 1024 - 4;
/// Bytes in a message id.
pub const MESSAGE_ID_LEN: usize = 16;

const HPKE_INFO: &[u8] = b"syncra/v1/wrap";
const ENC_LEN: usize = 32;
const WRAPPED_LEN: usize = 32 + 32 + 16;
const RECIPIENT_LEN: usize = USER_ID_LEN + 32;
const WRAP_LEN: usize = ENC_LEN + WRAPPED_LEN;
const NONCE_LEN: usize = 12;
const INNER_FIXED: usize = USER_ID_LEN + 32 + 8 + 32 + 64;

/// The smallest padding bucket. Every message is at least this long inside the ciphertext.
pub const MIN_BUCKET: usize = 256;
/// Buckets double up to this size and grow in steps of it afterwards.
pub const BUCKET_STEP: usize = 64 * 1024;

type WrapAead = hpke::aead::AesGcm256;
type WrapKdf = hpke::kdf::HkdfSha256;

/// A random message id. Unique per message; the replay guard keys on it.
pub type MessageId = [u8; MESSAGE_ID_LEN];

/// One recipient of an envelope: who, and which of their prekeys to wrap to.
///
/// Build these only from identity records whose prekey signature was verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recipient {
    /// The recipient's user id.
    pub user_id: UserId,
    /// The recipient's current signed prekey (public half).
    pub prekey: PrekeyPublic,
}

/// The part of an envelope a relay may read: enough to route, nothing more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvelopeHeader {
    /// Format version.
    pub version: u8,
    /// The message id.
    pub message_id: MessageId,
    /// Recipients in wrap order.
    pub recipients: Vec<Recipient>,
}

/// A parsed envelope, borrowed from its bytes.
struct ParsedEnvelope<'a> {
    header: EnvelopeHeader,
    header_bytes: &'a [u8],
    wraps: &'a [u8],
    nonce: &'a [u8],
    ciphertext: &'a [u8],
}

/// The size after padding for a body of `len` bytes (including the 4-byte length prefix).
pub fn padded_len(len: usize) -> usize {
    let need = len + 4;
    if need <= MIN_BUCKET {
        return MIN_BUCKET;
    }
    if need <= BUCKET_STEP {
        return need.next_power_of_two();
    }
    need.div_ceil(BUCKET_STEP) * BUCKET_STEP
}

fn pad(body: &[u8]) -> Zeroizing<Vec<u8>> {
    let total = padded_len(body.len());
    let mut out = Zeroizing::new(Vec::with_capacity(total));
    // Lengths are bounded by MAX_BODY, far below u32::MAX.
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out.resize(total, 0);
    out
}

fn unpad(padded: &[u8]) -> Result<&[u8], OpenError> {
    let len_bytes: [u8; 4] =
        padded
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or(OpenError::Malformed(
                "padding shorter than its length field",
            ))?;
    let len = u32::from_be_bytes(len_bytes) as usize;
    if len > MAX_BODY {
        return Err(OpenError::Malformed("body longer than allowed"));
    }
    if padded.len() != padded_len(len) {
        return Err(OpenError::Malformed(
            "padding does not match the bucket rule",
        ));
    }
    let body = padded
        .get(4..4 + len)
        .ok_or(OpenError::Malformed("body length beyond the padding"))?;
    if padded[4 + len..].iter().any(|&b| b != 0) {
        return Err(OpenError::Malformed("non-zero padding"));
    }
    Ok(body)
}

/// SHA-256 over the length-prefixed list of recipient ids and prekeys.
pub fn recipients_digest(recipients: &[Recipient]) -> [u8; 32] {
    let mut t = Transcript::new("syncra/v1/recipients");
    t.u32(recipients.len() as u32);
    for r in recipients {
        t.fixed(r.user_id.as_bytes()).fixed(&r.prekey);
    }
    Sha256::digest(t.as_bytes()).into()
}

/// The statement the sender signs.
fn signing_bytes(
    version: u8,
    sender: &UserId,
    recipients_digest: &[u8; 32],
    message_id: &MessageId,
    timestamp_ms: u64,
    padded: &[u8],
) -> Vec<u8> {
    let mut t = Transcript::new("syncra/v1/envelope");
    t.u8(version)
        .fixed(sender.as_bytes())
        .fixed(recipients_digest)
        .fixed(message_id)
        .u64(timestamp_ms)
        .bytes(padded);
    t.finish()
}

fn encode_header(message_id: &MessageId, recipients: &[Recipient]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + MESSAGE_ID_LEN + 2 + recipients.len() * RECIPIENT_LEN);
    out.push(ENVELOPE_VERSION);
    out.extend_from_slice(message_id);
    out.extend_from_slice(&(recipients.len() as u16).to_be_bytes());
    for r in recipients {
        out.extend_from_slice(r.user_id.as_bytes());
        out.extend_from_slice(&r.prekey);
    }
    out
}

/// A sealed envelope ready to send.
#[derive(Clone, Debug)]
pub struct SealedEnvelope {
    /// The message id (also inside the bytes).
    pub message_id: MessageId,
    /// The envelope bytes.
    pub bytes: Vec<u8>,
}

/// Seals `body` from `sender` to every recipient, with fresh randomness from the OS.
pub fn seal(
    sender: &IdentityKeyPair,
    recipients: &[Recipient],
    body: &[u8],
    timestamp_ms: u64,
) -> Result<SealedEnvelope, SealError> {
    seal_with_rng(sender, recipients, body, timestamp_ms, &mut super::os_rng())
}

/// Seals with the given generator. Use [`seal`] unless you need determinism (test vectors).
pub fn seal_with_rng<R: CryptoRng>(
    sender: &IdentityKeyPair,
    recipients: &[Recipient],
    body: &[u8],
    timestamp_ms: u64,
    rng: &mut R,
) -> Result<SealedEnvelope, SealError> {
    // Step 1: per-message randomness (the content key and nonce are drawn in `encrypt_and_wrap`).
    let mut message_id = [0u8; MESSAGE_ID_LEN];
    rng.fill_bytes(&mut message_id);
    seal_parts(sender, recipients, body, timestamp_ms, message_id, rng)
}

/// Seals with a message id chosen by the caller. A client that retries a send after losing the
/// connection reuses the id, so a recipient who got the first attempt drops the repeat as a
/// replay. Never reuse an id for a different message.
pub fn seal_with_id(
    sender: &IdentityKeyPair,
    recipients: &[Recipient],
    body: &[u8],
    timestamp_ms: u64,
    message_id: MessageId,
) -> Result<SealedEnvelope, SealError> {
    seal_parts(
        sender,
        recipients,
        body,
        timestamp_ms,
        message_id,
        &mut super::os_rng(),
    )
}

fn seal_parts<R: CryptoRng>(
    sender: &IdentityKeyPair,
    recipients: &[Recipient],
    body: &[u8],
    timestamp_ms: u64,
    message_id: MessageId,
    rng: &mut R,
) -> Result<SealedEnvelope, SealError> {
    check_seal_inputs(recipients, body)?;
    let digest = recipients_digest(recipients);

    // Step 2: sign.
    let inner = build_inner(
        &sender.user_id(),
        &sender.public(),
        sender,
        &digest,
        &message_id,
        timestamp_ms,
        body,
    );

    // Steps 3 and 4: encrypt once, wrap per recipient.
    let bytes = encrypt_and_wrap(&inner, &message_id, recipients, rng)?;
    Ok(SealedEnvelope { message_id, bytes })
}

fn check_seal_inputs(recipients: &[Recipient], body: &[u8]) -> Result<(), SealError> {
    if recipients.is_empty() {
        return Err(SealError::NoRecipients);
    }
    if recipients.len() > MAX_RECIPIENTS {
        return Err(SealError::TooManyRecipients {
            count: recipients.len(),
            max: MAX_RECIPIENTS,
        });
    }
    if body.len() > MAX_BODY {
        return Err(SealError::BodyTooLarge {
            size: body.len(),
            max: MAX_BODY,
        });
    }
    for (i, r) in recipients.iter().enumerate() {
        if recipients[..i].iter().any(|o| o.user_id == r.user_id) {
            return Err(SealError::DuplicateRecipient(r.user_id));
        }
    }
    Ok(())
}

/// Builds the signed inner plaintext. `claimed_sender` and `sender_key` are separate parameters
/// only so that tests can forge mismatches; [`seal`] always passes the signer's own.
fn build_inner(
    claimed_sender: &UserId,
    sender_key: &IdentityPublicKey,
    signer: &IdentityKeyPair,
    digest: &[u8; 32],
    message_id: &MessageId,
    timestamp_ms: u64,
    body: &[u8],
) -> Zeroizing<Vec<u8>> {
    let padded = pad(body);
    let to_sign = signing_bytes(
        ENVELOPE_VERSION,
        claimed_sender,
        digest,
        message_id,
        timestamp_ms,
        &padded,
    );
    let signature = signer.sign(&to_sign);
    let mut inner = Zeroizing::new(Vec::with_capacity(INNER_FIXED + padded.len()));
    inner.extend_from_slice(claimed_sender.as_bytes());
    inner.extend_from_slice(sender_key);
    inner.extend_from_slice(&timestamp_ms.to_be_bytes());
    inner.extend_from_slice(digest);
    inner.extend_from_slice(&signature);
    inner.extend_from_slice(&padded);
    inner
}

/// Encrypts an inner plaintext under a fresh content key with the header as associated data,
/// and wraps the content key (bound to the header by its hash) to every recipient's prekey.
fn encrypt_and_wrap<R: CryptoRng>(
    inner: &[u8],
    message_id: &MessageId,
    recipients: &[Recipient],
    rng: &mut R,
) -> Result<Vec<u8>, SealError> {
    let mut content_key = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(content_key.as_mut());
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);

    let header = encode_header(message_id, recipients);
    let header_hash: [u8; 32] = Sha256::digest(&header).into();
    let cipher = Aes256Gcm::new(&(*content_key).into());
    let ciphertext = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: inner,
                aad: &header,
            },
        )
        .map_err(|_| SealError::Encrypt)?;

    let mut wrap_plain = Zeroizing::new([0u8; 64]);
    wrap_plain[..32].copy_from_slice(content_key.as_ref());
    wrap_plain[32..].copy_from_slice(&header_hash);
    let mut out = Vec::with_capacity(
        header.len() + recipients.len() * WRAP_LEN + NONCE_LEN + 4 + ciphertext.len(),
    );
    out.extend_from_slice(&header);
    for r in recipients {
        let pk = <WrapKem as hpke::Kem>::PublicKey::from_bytes(&r.prekey)
            .map_err(|_| SealError::BadPrekey(r.user_id))?;
        let (enc, wrapped) = hpke::single_shot_seal_with_rng::<WrapAead, WrapKdf, WrapKem>(
            &OpModeS::Base,
            &pk,
            HPKE_INFO,
            wrap_plain.as_ref(),
            &[],
            rng,
        )
        .map_err(|_| SealError::BadPrekey(r.user_id))?;
        out.extend_from_slice(&enc.to_bytes());
        out.extend_from_slice(&wrapped);
    }
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&(ciphertext.len() as u32).to_be_bytes());
    out.extend_from_slice(&ciphertext);
    Ok(out)
}

/// Reads the routing header of an envelope without any key. This is all a relay ever does with
/// an envelope; it also checks that the rest of the envelope has the right shape and size.
pub fn parse_header(bytes: &[u8]) -> Result<EnvelopeHeader, OpenError> {
    parse(bytes).map(|p| p.header)
}

fn parse(bytes: &[u8]) -> Result<ParsedEnvelope<'_>, OpenError> {
    let version = *bytes
        .first()
        .ok_or(OpenError::Malformed("empty envelope"))?;
    if version != ENVELOPE_VERSION {
        return Err(OpenError::UnsupportedVersion(version));
    }
    let take = |at: usize, n: usize, what: &'static str| -> Result<&[u8], OpenError> {
        bytes
            .get(at..at.checked_add(n).ok_or(OpenError::Malformed(what))?)
            .ok_or(OpenError::Malformed(what))
    };
    let mut message_id = [0u8; MESSAGE_ID_LEN];
    message_id.copy_from_slice(take(1, MESSAGE_ID_LEN, "truncated message id")?);
    let count_at = 1 + MESSAGE_ID_LEN;
    let count_bytes = take(count_at, 2, "truncated recipient count")?;
    let count = u16::from_be_bytes([count_bytes[0], count_bytes[1]]) as usize;
    if count == 0 {
        return Err(OpenError::Malformed("no recipients"));
    }
    if count > MAX_RECIPIENTS {
        return Err(OpenError::TooManyRecipients(count));
    }
    let list_at = count_at + 2;
    let list = take(list_at, count * RECIPIENT_LEN, "truncated recipient list")?;
    let mut recipients = Vec::with_capacity(count);
    for chunk in list.chunks_exact(RECIPIENT_LEN) {
        let mut id = [0u8; USER_ID_LEN];
        id.copy_from_slice(&chunk[..USER_ID_LEN]);
        let mut prekey = [0u8; 32];
        prekey.copy_from_slice(&chunk[USER_ID_LEN..]);
        let user_id = UserId::from_bytes(id);
        if recipients.iter().any(|r: &Recipient| r.user_id == user_id) {
            return Err(OpenError::Malformed("duplicate recipient"));
        }
        recipients.push(Recipient { user_id, prekey });
    }
    let header_end = list_at + count * RECIPIENT_LEN;
    let wraps = take(header_end, count * WRAP_LEN, "truncated wraps")?;
    let nonce_at = header_end + count * WRAP_LEN;
    let nonce = take(nonce_at, NONCE_LEN, "truncated nonce")?;
    let len_bytes = take(nonce_at + NONCE_LEN, 4, "truncated ciphertext length")?;
    let ct_len =
        u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
    let ct_at = nonce_at + NONCE_LEN + 4;
    let ciphertext = take(ct_at, ct_len, "truncated ciphertext")?;
    if ct_at + ct_len != bytes.len() {
        return Err(OpenError::Malformed("trailing bytes after the ciphertext"));
    }
    if ct_len < INNER_FIXED + MIN_BUCKET + 16 {
        return Err(OpenError::Malformed(
            "ciphertext shorter than the smallest message",
        ));
    }
    Ok(ParsedEnvelope {
        header: EnvelopeHeader {
            version,
            message_id,
            recipients,
        },
        header_bytes: &bytes[..header_end],
        wraps,
        nonce,
        ciphertext,
    })
}

/// How old or how far in the future a message may be and still open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptWindow {
    /// Oldest accepted age in milliseconds.
    pub max_age_ms: u64,
    /// Largest accepted clock skew into the future, in milliseconds.
    pub max_future_ms: u64,
}

impl Default for AcceptWindow {
    /// One hour into the past (the relay is stateless, so messages are live; an hour covers slow
    /// links and suspended laptops) and five minutes of clock skew into the future.
    fn default() -> Self {
        AcceptWindow {
            max_age_ms: 60 * 60 * 1000,
            max_future_ms: 5 * 60 * 1000,
        }
    }
}

/// Remembers recently seen (sender, message id) pairs to refuse replays.
///
/// Entries are kept for the whole accept window, so a replay is refused either here or by the
/// timestamp check. Memory is bounded by `capacity`; when full, the oldest entry is forgotten
/// first (a replay of that message would then still have to pass the timestamp window).
#[derive(Debug)]
pub struct ReplayGuard {
    window: AcceptWindow,
    capacity: usize,
    seen: HashMap<(UserId, MessageId), u64>,
    order: VecDeque<(u64, UserId, MessageId)>,
}

impl ReplayGuard {
    /// A guard for the given window, remembering at most `capacity` messages.
    pub fn new(window: AcceptWindow, capacity: usize) -> Self {
        ReplayGuard {
            window,
            capacity: capacity.max(1),
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The accept window this guard enforces.
    pub fn window(&self) -> AcceptWindow {
        self.window
    }

    /// Whether a message was already seen.
    pub fn contains(&self, sender: &UserId, id: &MessageId) -> bool {
        self.seen.contains_key(&(*sender, *id))
    }

    /// Records a message as seen at `now_ms`, forgetting what is past the window.
    pub fn insert(&mut self, sender: UserId, id: MessageId, now_ms: u64) {
        let horizon = now_ms.saturating_sub(self.window.max_age_ms + self.window.max_future_ms);
        while let Some(&(t, s, m)) = self.order.front() {
            if t >= horizon && self.order.len() < self.capacity {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&(s, m));
        }
        if self.seen.insert((sender, id), now_ms).is_none() {
            self.order.push_back((now_ms, sender, id));
        }
    }

    /// Number of remembered messages.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Every remembered message as `(seen_at_ms, sender, id)`, oldest first: what a client
    /// persists so a replay is still refused after a restart.
    pub fn entries(&self) -> impl Iterator<Item = (u64, UserId, MessageId)> + '_ {
        self.order.iter().copied()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// What a recipient needs to open envelopes.
pub struct Opener<'a> {
    /// My user id.
    pub me: UserId,
    /// My prekeys, current and retired.
    pub prekeys: &'a PrekeyRing,
    /// The pinned identity key for a sender, if I have pinned one.
    pub pinned: &'a dyn Fn(&UserId) -> Option<IdentityPublicKey>,
}

/// An opened, verified message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenedMessage {
    /// Who sent it (verified: the signature checks out under a key that hashes to this id).
    pub sender: UserId,
    /// The sender's identity key.
    pub sender_key: IdentityPublicKey,
    /// The message id.
    pub message_id: MessageId,
    /// The sender's timestamp in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Every recipient the sender sealed this for (in header order).
    pub recipients: Vec<UserId>,
    /// The plaintext body.
    pub body: Vec<u8>,
}

impl Opener<'_> {
    /// Finds my wrap, unwraps the content key, checks the header binding and decrypts. Returns
    /// the parsed envelope and the inner plaintext, unverified.
    fn decrypt<'b>(
        &self,
        bytes: &'b [u8],
    ) -> Result<(ParsedEnvelope<'b>, Zeroizing<Vec<u8>>), OpenError> {
        let env = parse(bytes)?;

        // Which wrap is mine?
        let index = env
            .header
            .recipients
            .iter()
            .position(|r| r.user_id == self.me)
            .ok_or(OpenError::NotARecipient)?;
        let mine = &env.header.recipients[index];
        let prekey = self
            .prekeys
            .find(&mine.prekey)
            .ok_or(OpenError::UnknownPrekey)?;

        // Unwrap the content key.
        let wrap = &env.wraps[index * WRAP_LEN..(index + 1) * WRAP_LEN];
        let enc = <WrapKem as hpke::Kem>::EncappedKey::from_bytes(&wrap[..ENC_LEN])
            .map_err(|_| OpenError::WrapFailed)?;
        let sk = prekey.hpke_private().map_err(|_| OpenError::WrapFailed)?;
        let unwrapped = Zeroizing::new(
            hpke::single_shot_open::<WrapAead, WrapKdf, WrapKem>(
                &OpModeR::Base,
                &sk,
                &enc,
                HPKE_INFO,
                &wrap[ENC_LEN..],
                &[],
            )
            .map_err(|_| OpenError::WrapFailed)?,
        );
        if unwrapped.len() != 64 {
            return Err(OpenError::WrapFailed);
        }
        let header_hash: [u8; 32] = Sha256::digest(env.header_bytes).into();
        if !bool::from(unwrapped[32..].ct_eq(&header_hash)) {
            return Err(OpenError::HeaderTampered);
        }

        // Decrypt.
        let cipher =
            Aes256Gcm::new_from_slice(&unwrapped[..32]).map_err(|_| OpenError::WrapFailed)?;
        let nonce: [u8; NONCE_LEN] = env
            .nonce
            .try_into()
            .map_err(|_| OpenError::Malformed("nonce length"))?;
        let inner = Zeroizing::new(
            cipher
                .decrypt(
                    &Nonce::from(nonce),
                    Payload {
                        msg: env.ciphertext,
                        aad: env.header_bytes,
                    },
                )
                .map_err(|_| OpenError::BadCiphertext)?,
        );
        Ok((env, inner))
    }

    /// Opens and checks an envelope. Each failed check has its own error, in this order: shape,
    /// wrap for me, wrap decryption, header integrity, ciphertext integrity, sender key,
    /// signature, recipient binding, padding, timestamp, replay. A message that fails any check does not
    /// enter the replay guard.
    pub fn open(
        &self,
        bytes: &[u8],
        guard: &mut ReplayGuard,
        now_ms: u64,
    ) -> Result<OpenedMessage, OpenError> {
        let (env, inner) = self.decrypt(bytes)?;
        if inner.len() < INNER_FIXED + MIN_BUCKET {
            return Err(OpenError::Malformed("inner message too short"));
        }
        let mut sender_bytes = [0u8; USER_ID_LEN];
        sender_bytes.copy_from_slice(&inner[..USER_ID_LEN]);
        let sender = UserId::from_bytes(sender_bytes);
        let mut sender_key = [0u8; 32];
        sender_key.copy_from_slice(&inner[USER_ID_LEN..USER_ID_LEN + 32]);
        let mut at = USER_ID_LEN + 32;
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&inner[at..at + 8]);
        let timestamp_ms = u64::from_be_bytes(ts);
        at += 8;
        let mut signed_digest = [0u8; 32];
        signed_digest.copy_from_slice(&inner[at..at + 32]);
        at += 32;
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&inner[at..at + 64]);
        at += 64;
        let padded = &inner[at..];

        // The sender key must be the one behind the sender id, and the pinned one if pinned.
        if UserId::from_identity_key(&sender_key) != sender {
            return Err(OpenError::SenderKeyMismatch);
        }
        if let Some(pinned) = (self.pinned)(&sender)
            && pinned != sender_key
        {
            return Err(OpenError::SenderKeyMismatch);
        }

        let to_verify = signing_bytes(
            env.header.version,
            &sender,
            &signed_digest,
            &env.header.message_id,
            timestamp_ms,
            padded,
        );
        verify_signature(&sender_key, &to_verify, &signature)
            .map_err(|_| OpenError::BadSignature)?;

        // The sender signed for a specific recipient list; it must be the one on this envelope.
        if recipients_digest(&env.header.recipients) != signed_digest {
            return Err(OpenError::NotBoundRecipient);
        }

        let body = unpad(padded)?.to_vec();

        let window = guard.window();
        if timestamp_ms.saturating_add(window.max_age_ms) < now_ms {
            return Err(OpenError::TooOld {
                age_ms: now_ms - timestamp_ms,
            });
        }
        if timestamp_ms > now_ms.saturating_add(window.max_future_ms) {
            return Err(OpenError::FromTheFuture {
                ahead_ms: timestamp_ms - now_ms,
            });
        }
        if guard.contains(&sender, &env.header.message_id) {
            return Err(OpenError::Replayed);
        }

        guard.insert(sender, env.header.message_id, now_ms);
        Ok(OpenedMessage {
            sender,
            sender_key,
            message_id: env.header.message_id,
            timestamp_ms,
            recipients: env.header.recipients.iter().map(|r| r.user_id).collect(),
            body,
        })
    }
}

/// What a malicious *recipient* or *sender* can do with the format, exposed so that the
/// negative tests can build each forgery the open checks must catch. Nothing here gives more
/// power than holding a content key or an identity key already gives.
#[doc(hidden)]
pub mod forge {
    use super::*;

    /// Decrypts an envelope as a recipient, skipping every check after decryption.
    pub fn decrypt_inner(
        opener: &Opener<'_>,
        bytes: &[u8],
    ) -> Result<(EnvelopeHeader, Vec<u8>), OpenError> {
        let (env, inner) = opener.decrypt(bytes)?;
        Ok((env.header, inner.to_vec()))
    }

    /// Builds an inner plaintext claiming `claimed_sender`, carrying `sender_key`, signed by
    /// `signer`, bound to the given recipients.
    pub fn inner(
        claimed_sender: &UserId,
        sender_key: &IdentityPublicKey,
        signer: &IdentityKeyPair,
        signed_for: &[Recipient],
        message_id: &MessageId,
        timestamp_ms: u64,
        body: &[u8],
    ) -> Vec<u8> {
        build_inner(
            claimed_sender,
            sender_key,
            signer,
            &recipients_digest(signed_for),
            message_id,
            timestamp_ms,
            body,
        )
        .to_vec()
    }

    /// Encrypts an inner plaintext for a new recipient list, as someone holding it could.
    pub fn reencrypt(
        inner: &[u8],
        message_id: &MessageId,
        recipients: &[Recipient],
    ) -> Result<Vec<u8>, SealError> {
        encrypt_and_wrap(inner, message_id, recipients, &mut crate::crypto::os_rng())
    }

    /// Byte offset of the padded plaintext inside the inner plaintext.
    pub const PADDED_OFFSET: usize = INNER_FIXED;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_buckets() {
        for (len, want) in [
            (0, 256),
            (252, 256),
            (253, 512),
            (1000, 1024),
            (65532, 65536),
            (65533, 131072),
            (200_000, 262144),
            (MAX_BODY, 262144),
        ] {
            assert_eq!(padded_len(len), want, "len {len}");
            let p = pad(&vec![1u8; len]);
            assert_eq!(p.len(), want);
            assert_eq!(unpad(&p).unwrap().len(), len);
        }
    }

    #[test]
    fn unpad_rejects_bad_padding() {
        let mut p = pad(b"hello").to_vec();
        *p.last_mut().unwrap() = 1;
        assert!(matches!(unpad(&p), Err(OpenError::Malformed(_))));
        let mut p = pad(b"hello").to_vec();
        p[..4].copy_from_slice(&10_000u32.to_be_bytes());
        assert!(matches!(unpad(&p), Err(OpenError::Malformed(_))));
    }
}

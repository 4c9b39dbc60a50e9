//! `envelope_open`: the input format, the reference envelope and the oracle.
//!
//! Input: the first byte picks the mode.
//! - even: the rest is an envelope, opened as is (seeds are real envelopes and forgeries);
//! - odd: the rest is a list of [`Mutation`]s (via `arbitrary`) applied to the reference
//!   envelope, a real message from [`crate::sender`] to me and [`crate::other`].

use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use syncra_core::UserId;
use syncra_core::crypto::envelope::{
    AcceptWindow, OpenedMessage, Opener, Recipient, ReplayGuard, seal_with_rng,
};
use syncra_core::crypto::keys::{IdentityPublicKey, PrekeyRing};
use syncra_core::error::OpenError;

use crate::{NOW_MS, me, my_current_prekey, other, other_prekey, seeded, sender};

/// The body of the reference envelope.
pub const REFERENCE_BODY: &[u8] = b"the reference message from the fixed sender";

/// Me as a recipient (current prekey).
pub fn me_recipient() -> Recipient {
    Recipient {
        user_id: me().user_id(),
        prekey: *my_current_prekey().public(),
    }
}

/// The other recipient.
pub fn other_recipient() -> Recipient {
    Recipient {
        user_id: other().user_id(),
        prekey: *other_prekey().public(),
    }
}

/// The reference envelope: sealed deterministically by the sender to `[other, me]` at
/// [`NOW_MS`], so that mutations can hit the header, both wraps, the nonce and the ciphertext.
pub fn reference_envelope() -> Vec<u8> {
    seal_with_rng(
        &sender(),
        &[other_recipient(), me_recipient()],
        REFERENCE_BODY,
        NOW_MS,
        &mut seeded(42),
    )
    .expect("the reference envelope seals")
    .bytes
}

/// One edit of the reference envelope.
#[derive(Arbitrary, Debug)]
pub enum Mutation {
    /// XOR one byte.
    Flip {
        /// Where (modulo the length).
        at: u16,
        /// The mask.
        mask: u8,
    },
    /// Overwrite a range with bytes.
    Overwrite {
        /// Where (modulo the length).
        at: u16,
        /// The new bytes.
        bytes: Vec<u8>,
    },
    /// Insert bytes.
    Insert {
        /// Where (modulo the length + 1).
        at: u16,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Remove a range.
    Remove {
        /// Where (modulo the length).
        at: u16,
        /// How many bytes.
        len: u16,
    },
    /// Cut the envelope short.
    Truncate {
        /// The new length (modulo the length + 1).
        len: u16,
    },
    /// Copy a range of the envelope over another range of it (moves wraps, recipient entries).
    CopyWithin {
        /// Source (modulo the length).
        from: u16,
        /// Destination (modulo the length).
        to: u16,
        /// How many bytes.
        len: u16,
    },
}

impl Mutation {
    /// Applies the edit; every index is reduced into range, so no edit can panic.
    pub fn apply(&self, buf: &mut Vec<u8>) {
        let n = buf.len();
        match self {
            Mutation::Flip { at, mask } => {
                if n > 0 {
                    buf[usize::from(*at) % n] ^= mask;
                }
            }
            Mutation::Overwrite { at, bytes } => {
                if n > 0 {
                    let at = usize::from(*at) % n;
                    let end = (at + bytes.len()).min(n);
                    buf[at..end].copy_from_slice(&bytes[..end - at]);
                }
            }
            Mutation::Insert { at, bytes } => {
                let at = usize::from(*at) % (n + 1);
                buf.splice(at..at, bytes.iter().copied());
            }
            Mutation::Remove { at, len } => {
                if n > 0 {
                    let at = usize::from(*at) % n;
                    let end = (at + usize::from(*len)).min(n);
                    buf.drain(at..end);
                }
            }
            Mutation::Truncate { len } => buf.truncate(usize::from(*len) % (n + 1)),
            Mutation::CopyWithin { from, to, len } => {
                if n > 0 {
                    let from = usize::from(*from) % n;
                    let to = usize::from(*to) % n;
                    let len = usize::from(*len).min(n - from).min(n - to);
                    buf.copy_within(from..from + len, to);
                }
            }
        }
    }
}

/// Decodes mode-odd input into mutations (never fails: `arbitrary` takes what is there).
pub fn mutations(data: &[u8]) -> Vec<Mutation> {
    <Vec<Mutation> as Arbitrary>::arbitrary_take_rest(Unstructured::new(data)).unwrap_or_default()
}

/// The recipient's state: my ring, and the sender pinned.
pub struct Recipient0 {
    ring: PrekeyRing,
    me: UserId,
    sender_id: UserId,
    sender_key: IdentityPublicKey,
}

impl Default for Recipient0 {
    fn default() -> Self {
        Recipient0 {
            ring: crate::my_ring(),
            me: me().user_id(),
            sender_id: sender().user_id(),
            sender_key: sender().public(),
        }
    }
}

impl Recipient0 {
    /// Opens at [`NOW_MS`] with the given guard.
    pub fn open(&self, bytes: &[u8], guard: &mut ReplayGuard) -> Result<OpenedMessage, OpenError> {
        let (id, key) = (self.sender_id, self.sender_key);
        let pinned = move |who: &UserId| (*who == id).then_some(key);
        let opener = Opener {
            me: self.me,
            prekeys: &self.ring,
            pinned: &pinned,
        };
        opener.open(bytes, guard, NOW_MS)
    }

    /// The oracle: whatever opens was sealed by the pinned sender to me, and opening it again
    /// is refused as a replay.
    pub fn check(&self, bytes: &[u8]) -> Option<OpenedMessage> {
        let mut guard = ReplayGuard::new(AcceptWindow::default(), 64);
        let opened = self.open(bytes, &mut guard).ok()?;
        assert_eq!(
            opened.sender, self.sender_id,
            "an envelope opened as from someone other than the pinned sender"
        );
        assert_eq!(
            opened.sender_key, self.sender_key,
            "sender key not the pinned one"
        );
        assert!(
            opened.recipients.contains(&self.me),
            "an envelope opened that does not name me"
        );
        assert!(
            matches!(self.open(bytes, &mut guard), Err(OpenError::Replayed)),
            "an opened envelope opened a second time (replay not detected)"
        );
        Some(opened)
    }
}

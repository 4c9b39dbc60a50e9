//! One failing-input test per envelope rule in the design, each expecting its own error.
//!
//! The forgeries are built with `envelope::forge`, which can do exactly what a malicious
//! recipient (holding a content key) or a malicious sender (holding an identity key) can do.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use syncra_core::crypto::envelope::{
    self, AcceptWindow, OpenedMessage, Opener, Recipient, ReplayGuard, forge,
};
use syncra_core::crypto::keys::{IdentityKeyPair, IdentityPublicKey, PrekeyRing, PrekeySecret};
use syncra_core::error::OpenError;
use syncra_core::id::UserId;

const NOW: u64 = 1_800_000_000_000;

struct Person {
    id: IdentityKeyPair,
    ring: PrekeyRing,
}

impl Person {
    fn new() -> Self {
        let id = IdentityKeyPair::generate();
        let ring = PrekeyRing::new(PrekeySecret::generate(&id, NOW / 1000));
        Person { id, ring }
    }

    fn user_id(&self) -> UserId {
        self.id.user_id()
    }

    fn recipient(&self) -> Recipient {
        Recipient {
            user_id: self.user_id(),
            prekey: *self.ring.current().public(),
        }
    }

    fn open_with(
        &self,
        bytes: &[u8],
        guard: &mut ReplayGuard,
        now: u64,
        pinned: &dyn Fn(&UserId) -> Option<IdentityPublicKey>,
    ) -> Result<OpenedMessage, OpenError> {
        Opener {
            me: self.user_id(),
            prekeys: &self.ring,
            pinned,
        }
        .open(bytes, guard, now)
    }

    fn open(&self, bytes: &[u8]) -> Result<OpenedMessage, OpenError> {
        self.open_with(bytes, &mut guard(), NOW, &|_| None)
    }

    fn opener(&self) -> Opener<'_> {
        Opener {
            me: self.user_id(),
            prekeys: &self.ring,
            pinned: &|_| None,
        }
    }
}

fn guard() -> ReplayGuard {
    ReplayGuard::new(AcceptWindow::default(), 10_000)
}

fn seal(from: &Person, to: &[&Person], body: &[u8]) -> Vec<u8> {
    let recipients: Vec<Recipient> = to.iter().map(|p| p.recipient()).collect();
    envelope::seal(&from.id, &recipients, body, NOW)
        .unwrap()
        .bytes
}

#[test]
fn sealed_message_opens_for_every_recipient_and_names_the_sender() {
    let (alice, bob, carol) = (Person::new(), Person::new(), Person::new());
    let bytes = seal(&alice, &[&bob, &carol], b"hello both");
    for who in [&bob, &carol] {
        let m = who.open(&bytes).unwrap();
        assert_eq!(m.body, b"hello both");
        assert_eq!(m.sender, alice.user_id());
        assert_eq!(m.sender_key, alice.id.public());
        assert_eq!(m.timestamp_ms, NOW);
        assert_eq!(m.recipients, vec![bob.user_id(), carol.user_id()]);
    }
}

#[test]
fn relay_sees_recipients_but_not_sender_or_body() {
    let (alice, bob) = (Person::new(), Person::new());
    let body = b"the plaintext a relay must never see";
    let bytes = seal(&alice, &[&bob], body);
    let header = envelope::parse_header(&bytes).unwrap();
    assert_eq!(header.recipients, vec![bob.recipient()]);
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(body));
    assert!(!contains(alice.user_id().as_bytes()));
    assert!(!contains(&alice.id.public()));
}

#[test]
fn tampered_ciphertext_is_refused() {
    let (alice, bob) = (Person::new(), Person::new());
    let mut bytes = seal(&alice, &[&bob], b"hi");
    let last = bytes.len() - 20;
    bytes[last] ^= 1;
    assert_eq!(bob.open(&bytes), Err(OpenError::BadCiphertext));
}

#[test]
fn tampered_header_is_refused() {
    let (alice, bob) = (Person::new(), Person::new());
    let mut bytes = seal(&alice, &[&bob], b"hi");
    bytes[1] ^= 1; // first byte of the message id
    assert_eq!(bob.open(&bytes), Err(OpenError::HeaderTampered));
}

#[test]
fn adding_a_recipient_to_the_header_is_refused() {
    // A relay that rewrites the header (here: swaps the recipient's prekey for another valid
    // one) is caught before anything is decrypted with it.
    let (alice, bob) = (Person::new(), Person::new());
    let mut bytes = seal(&alice, &[&bob], b"hi");
    let other = PrekeySecret::generate(&bob.id, NOW / 1000);
    let mut bob2 = Person::new();
    bob2.id = bob.id.clone();
    bob2.ring = PrekeyRing::new(other);
    let at = 1 + 16 + 2 + 20;
    bytes[at..at + 32].copy_from_slice(bob2.ring.current().public());
    assert_eq!(bob.open(&bytes), Err(OpenError::UnknownPrekey));
    assert_eq!(bob2.open(&bytes), Err(OpenError::WrapFailed));
}

#[test]
fn wrong_recipient_is_refused() {
    let (alice, bob, carol) = (Person::new(), Person::new(), Person::new());
    let bytes = seal(&alice, &[&bob], b"for bob only");
    assert_eq!(carol.open(&bytes), Err(OpenError::NotARecipient));
}

#[test]
fn wrap_that_does_not_open_with_my_prekey_is_refused() {
    let (alice, bob) = (Person::new(), Person::new());
    let mut bytes = seal(&alice, &[&bob], b"hi");
    let wrap_at = 1 + 16 + 2 + 52;
    bytes[wrap_at + 40] ^= 1; // inside the wrapped key
    assert_eq!(bob.open(&bytes), Err(OpenError::WrapFailed));
}

#[test]
fn retired_prekey_past_grace_no_longer_opens() {
    let (alice, mut bob) = (Person::new(), Person::new());
    let bytes = seal(&alice, &[&bob], b"before rotation");
    let next = PrekeySecret::generate(&bob.id, NOW / 1000 + 10);
    bob.ring.rotate(next, NOW / 1000 + 10);
    assert!(
        bob.open(&bytes).is_ok(),
        "still opens during the grace period"
    );
    bob.ring
        .expire(NOW / 1000 + 10 + 8 * 24 * 3600, 7 * 24 * 3600);
    assert_eq!(bob.open(&bytes), Err(OpenError::UnknownPrekey));
}

#[test]
fn forwarded_message_rewrapped_to_a_third_party_is_refused() {
    // Bob got a message from Alice and re-wraps it, unchanged and with Alice's valid signature,
    // to Carol, hoping Carol believes Alice wrote to her.
    let (alice, bob, carol) = (Person::new(), Person::new(), Person::new());
    let bytes = seal(&alice, &[&bob], b"meet me at noon");
    let (header, inner) = forge::decrypt_inner(&bob.opener(), &bytes).unwrap();
    let forwarded = forge::reencrypt(&inner, &header.message_id, &[carol.recipient()]).unwrap();
    assert_eq!(carol.open(&forwarded), Err(OpenError::NotBoundRecipient));
}

#[test]
fn swapped_sender_key_is_refused() {
    // Mallory claims Alice's id but must carry her own key to sign.
    let (alice, bob, mallory) = (Person::new(), Person::new(), Person::new());
    let mid = [9u8; 16];
    let inner = forge::inner(
        &alice.user_id(),
        &mallory.id.public(),
        &mallory.id,
        &[bob.recipient()],
        &mid,
        NOW,
        b"it's alice, honest",
    );
    let bytes = forge::reencrypt(&inner, &mid, &[bob.recipient()]).unwrap();
    assert_eq!(bob.open(&bytes), Err(OpenError::SenderKeyMismatch));
}

#[test]
fn sender_key_that_differs_from_the_pinned_one_is_refused() {
    let (alice, bob, other) = (Person::new(), Person::new(), Person::new());
    let bytes = seal(&alice, &[&bob], b"hi");
    let alice_id = alice.user_id();
    let pinned_key = other.id.public();
    let pinned = move |id: &UserId| (*id == alice_id).then_some(pinned_key);
    assert_eq!(
        bob.open_with(&bytes, &mut guard(), NOW, &pinned),
        Err(OpenError::SenderKeyMismatch)
    );
    // With the right pin it opens.
    let right_key = alice.id.public();
    let pinned = move |id: &UserId| (*id == alice_id).then_some(right_key);
    assert!(bob.open_with(&bytes, &mut guard(), NOW, &pinned).is_ok());
}

#[test]
fn signature_by_another_key_is_refused() {
    // Alice's id and key, but Mallory's signature.
    let (alice, bob, mallory) = (Person::new(), Person::new(), Person::new());
    let mid = [3u8; 16];
    let inner = forge::inner(
        &alice.user_id(),
        &alice.id.public(),
        &mallory.id,
        &[bob.recipient()],
        &mid,
        NOW,
        b"forged",
    );
    let bytes = forge::reencrypt(&inner, &mid, &[bob.recipient()]).unwrap();
    assert_eq!(bob.open(&bytes), Err(OpenError::BadSignature));
}

#[test]
fn body_changed_by_a_co_recipient_is_refused() {
    // Bob holds the content key of a group message and edits the body for Carol.
    let (alice, bob, carol) = (Person::new(), Person::new(), Person::new());
    let bytes = seal(&alice, &[&bob, &carol], b"pay 10");
    let (header, mut inner) = forge::decrypt_inner(&bob.opener(), &bytes).unwrap();
    let body_at = forge::PADDED_OFFSET + 4;
    inner[body_at + 4] = b'9';
    let edited = forge::reencrypt(&inner, &header.message_id, &header.recipients).unwrap();
    assert_eq!(carol.open(&edited), Err(OpenError::BadSignature));
}

#[test]
fn replayed_message_is_refused() {
    let (alice, bob) = (Person::new(), Person::new());
    let bytes = seal(&alice, &[&bob], b"once");
    let mut g = guard();
    bob.open_with(&bytes, &mut g, NOW, &|_| None).unwrap();
    assert_eq!(
        bob.open_with(&bytes, &mut g, NOW + 1, &|_| None),
        Err(OpenError::Replayed)
    );
}

#[test]
fn failed_open_does_not_poison_the_replay_guard() {
    let (alice, bob) = (Person::new(), Person::new());
    let bytes = seal(&alice, &[&bob], b"once");
    let mut g = guard();
    let mut tampered = bytes.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert_eq!(
        bob.open_with(&tampered, &mut g, NOW, &|_| None)
            .unwrap_err(),
        OpenError::BadCiphertext
    );
    assert!(bob.open_with(&bytes, &mut g, NOW, &|_| None).is_ok());
}

#[test]
fn timestamp_outside_the_window_is_refused() {
    let (alice, bob) = (Person::new(), Person::new());
    let bytes = seal(&alice, &[&bob], b"hi");
    let w = AcceptWindow::default();
    let too_late = NOW + w.max_age_ms + 1;
    assert!(matches!(
        bob.open_with(&bytes, &mut guard(), too_late, &|_| None),
        Err(OpenError::TooOld { .. })
    ));
    let too_early = NOW - w.max_future_ms - 1;
    assert!(matches!(
        bob.open_with(&bytes, &mut guard(), too_early, &|_| None),
        Err(OpenError::FromTheFuture { .. })
    ));
    // The edges are inside the window.
    assert!(
        bob.open_with(&bytes, &mut guard(), NOW + w.max_age_ms, &|_| None)
            .is_ok()
    );
    assert!(
        bob.open_with(&bytes, &mut guard(), NOW - w.max_future_ms, &|_| None)
            .is_ok()
    );
}

#[test]
fn unknown_envelope_version_and_truncation_are_refused() {
    let (alice, bob) = (Person::new(), Person::new());
    let bytes = seal(&alice, &[&bob], b"hi");
    let mut v2 = bytes.clone();
    v2[0] = 2;
    assert_eq!(bob.open(&v2), Err(OpenError::UnsupportedVersion(2)));
    for cut in [0, 1, 10, 40, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            matches!(bob.open(&bytes[..cut]), Err(OpenError::Malformed(_))),
            "cut at {cut}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(bob.open(&longer), Err(OpenError::Malformed(_))));
}

#[test]
fn padding_hides_length_within_a_bucket() {
    let (alice, bob) = (Person::new(), Person::new());
    let short = seal(&alice, &[&bob], b"k");
    let longer = seal(&alice, &[&bob], &[b'x'; 200]);
    assert_eq!(short.len(), longer.len());
}

#[test]
fn seal_refuses_bad_inputs() {
    use syncra_core::error::SealError;
    let (alice, bob) = (Person::new(), Person::new());
    assert_eq!(
        envelope::seal(&alice.id, &[], b"x", NOW).unwrap_err(),
        SealError::NoRecipients
    );
    assert!(matches!(
        envelope::seal(
            &alice.id,
            &[bob.recipient()],
            &vec![0; envelope::MAX_BODY + 1],
            NOW
        ),
        Err(SealError::BodyTooLarge { .. })
    ));
    assert!(matches!(
        envelope::seal(&alice.id, &[bob.recipient(), bob.recipient()], b"x", NOW),
        Err(SealError::DuplicateRecipient(_))
    ));
    let many: Vec<Recipient> = (0..=envelope::MAX_RECIPIENTS)
        .map(|i| {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i as u64).to_be_bytes());
            Recipient {
                user_id: UserId::from_identity_key(&key),
                prekey: bob.recipient().prekey,
            }
        })
        .collect();
    assert!(matches!(
        envelope::seal(&alice.id, &many, b"x", NOW),
        Err(SealError::TooManyRecipients { .. })
    ));
}

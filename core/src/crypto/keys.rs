//! Identity keys (Ed25519) and signed prekeys (X25519).

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hpke::Deserializable;
use rand::CryptoRng;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::transcript::Transcript;
use crate::error::CryptoError;
use crate::id::UserId;

/// The KEM used to wrap content keys: DHKEM(X25519, HKDF-SHA256).
pub(crate) type WrapKem = hpke::kem::X25519HkdfSha256;

/// An Ed25519 public identity key.
pub type IdentityPublicKey = [u8; 32];
/// An X25519 public prekey.
pub type PrekeyPublic = [u8; 32];
/// An Ed25519 signature.
pub type SignatureBytes = [u8; 64];

/// Default prekey rotation interval: seven days, per the design.
pub const DEFAULT_PREKEY_ROTATION_SECS: u64 = 7 * 24 * 3600;
/// Default grace period during which a retired private prekey still opens late messages.
pub const DEFAULT_PREKEY_GRACE_SECS: u64 = 7 * 24 * 3600;

/// A person's long-term signing identity. The user id is derived from its public half.
#[derive(Clone)]
pub struct IdentityKeyPair {
    signing: SigningKey,
}

impl IdentityKeyPair {
    /// A fresh identity from the operating system's randomness.
    pub fn generate() -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        super::fill_random(seed.as_mut());
        Self::from_seed(&seed)
    }

    /// A fresh identity from the given generator (deterministic tests and vectors).
    pub fn generate_with<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        Self::from_seed(&seed)
    }

    /// Rebuilds an identity from its 32-byte secret seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        IdentityKeyPair {
            signing: SigningKey::from_bytes(seed),
        }
    }

    /// The 32-byte secret seed, for sealing into the key file.
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    /// The public identity key.
    pub fn public(&self) -> IdentityPublicKey {
        self.signing.verifying_key().to_bytes()
    }

    /// The self-certifying user id.
    pub fn user_id(&self) -> UserId {
        UserId::from_identity_key(&self.public())
    }

    /// Signs a transcript.
    pub fn sign(&self, message: &[u8]) -> SignatureBytes {
        self.signing.sign(message).to_bytes()
    }
}

impl fmt::Debug for IdentityKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret half.
        write!(f, "IdentityKeyPair({})", self.user_id())
    }
}

/// Verifies an Ed25519 signature in strict mode (no malleable or small-order keys).
pub fn verify_signature(
    public: &IdentityPublicKey,
    message: &[u8],
    signature: &SignatureBytes,
) -> Result<(), CryptoError> {
    let key = VerifyingKey::from_bytes(public).map_err(|_| CryptoError::BadPublicKey)?;
    let sig = Signature::from_bytes(signature);
    key.verify_strict(message, &sig)
        .map_err(|_| CryptoError::BadSignature)
}

/// The public half of a prekey plus the identity's signature over it.
///
/// The signature binds the prekey to the user id and its creation time, so a relay cannot hand
/// out a prekey of its own (it cannot sign), nor an old retired one under a new date.
#[derive(Clone, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct SignedPrekey {
    /// The X25519 public key that content keys are wrapped to.
    #[serde(with = "crate::serde_b64::fixed")]
    pub public: PrekeyPublic,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
    /// Ed25519 signature by the identity key over [`SignedPrekey::signing_bytes`].
    #[serde(with = "crate::serde_b64::fixed")]
    pub signature: SignatureBytes,
}

impl SignedPrekey {
    /// The statement an identity signs to vouch for a prekey.
    pub fn signing_bytes(owner: &UserId, public: &PrekeyPublic, created_at: u64) -> Vec<u8> {
        let mut t = Transcript::new("syncra/v1/signed-prekey");
        t.fixed(owner.as_bytes()).fixed(public).u64(created_at);
        t.finish()
    }

    /// Checks the signature against the owner's identity key.
    pub fn verify(&self, identity_key: &IdentityPublicKey) -> Result<(), CryptoError> {
        let owner = UserId::from_identity_key(identity_key);
        let msg = Self::signing_bytes(&owner, &self.public, self.created_at);
        verify_signature(identity_key, &msg, &self.signature).map_err(|e| match e {
            CryptoError::BadSignature => CryptoError::BadPrekeySignature,
            other => other,
        })
    }
}

/// A private prekey with its signed public half.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct PrekeySecret {
    secret: [u8; 32],
    #[zeroize(skip)]
    signed: SignedPrekey,
}

impl PrekeySecret {
    /// Creates and signs a new prekey.
    pub fn generate(identity: &IdentityKeyPair, created_at: u64) -> Self {
        let mut secret = Zeroizing::new([0u8; 32]);
        super::fill_random(secret.as_mut());
        Self::from_secret(identity, &secret, created_at)
    }

    /// Creates and signs a prekey from the given generator (deterministic tests and vectors).
    pub fn generate_with<R: CryptoRng + ?Sized>(
        identity: &IdentityKeyPair,
        created_at: u64,
        rng: &mut R,
    ) -> Self {
        let mut secret = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(secret.as_mut());
        Self::from_secret(identity, &secret, created_at)
    }

    fn from_secret(identity: &IdentityKeyPair, secret: &[u8; 32], created_at: u64) -> Self {
        let public = prekey_public_from_secret(secret);
        let msg = SignedPrekey::signing_bytes(&identity.user_id(), &public, created_at);
        let signature = identity.sign(&msg);
        PrekeySecret {
            secret: *secret,
            signed: SignedPrekey {
                public,
                created_at,
                signature,
            },
        }
    }

    /// Rebuilds a prekey from storage; the signature is checked against the identity.
    pub fn restore(
        identity_key: &IdentityPublicKey,
        secret: &[u8; 32],
        signed: SignedPrekey,
    ) -> Result<Self, CryptoError> {
        signed.verify(identity_key)?;
        if prekey_public_from_secret(secret) != signed.public {
            return Err(CryptoError::PrekeyMismatch);
        }
        Ok(PrekeySecret {
            secret: *secret,
            signed,
        })
    }

    /// The signed public half, to publish.
    pub fn signed(&self) -> &SignedPrekey {
        &self.signed
    }

    /// The public key.
    pub fn public(&self) -> &PrekeyPublic {
        &self.signed.public
    }

    /// The secret bytes, for sealing into the key file.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret)
    }

    pub(crate) fn hpke_private(&self) -> Result<<WrapKem as hpke::Kem>::PrivateKey, CryptoError> {
        <WrapKem as hpke::Kem>::PrivateKey::from_bytes(&self.secret)
            .map_err(|_| CryptoError::BadPublicKey)
    }

    /// Whether this prekey is due for rotation at `now` (seconds).
    pub fn due_for_rotation(&self, now: u64, interval_secs: u64) -> bool {
        now.saturating_sub(self.signed.created_at) >= interval_secs
    }
}

impl fmt::Debug for PrekeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrekeySecret(created_at={})", self.signed.created_at)
    }
}

fn prekey_public_from_secret(secret: &[u8; 32]) -> PrekeyPublic {
    let secret = x25519_dalek::StaticSecret::from(*secret);
    x25519_dalek::PublicKey::from(&secret).to_bytes()
}

/// The keys a person holds: identity plus current and retired prekeys.
///
/// Retired prekeys stay for a grace period so that messages sealed just before a rotation still
/// open, then are erased: that is the forward-secrecy boundary.
#[derive(Debug, Clone)]
pub struct PrekeyRing {
    current: PrekeySecret,
    retired: Vec<(PrekeySecret, u64)>,
}

impl PrekeyRing {
    /// A ring with one current prekey.
    pub fn new(current: PrekeySecret) -> Self {
        PrekeyRing {
            current,
            retired: Vec::new(),
        }
    }

    /// Rebuilds a ring from storage: the current prekey and each retired one with the time it
    /// was retired.
    pub fn from_parts(current: PrekeySecret, retired: Vec<(PrekeySecret, u64)>) -> Self {
        PrekeyRing { current, retired }
    }

    /// The prekey to publish.
    pub fn current(&self) -> &PrekeySecret {
        &self.current
    }

    /// Retired prekeys with their retirement times.
    pub fn retired(&self) -> &[(PrekeySecret, u64)] {
        &self.retired
    }

    /// Replaces the current prekey, keeping the old one until `now + grace`.
    pub fn rotate(&mut self, next: PrekeySecret, now: u64) {
        let old = std::mem::replace(&mut self.current, next);
        self.retired.push((old, now));
    }

    /// Erases retired prekeys whose grace period is over. Returns how many were erased.
    pub fn expire(&mut self, now: u64, grace_secs: u64) -> usize {
        let before = self.retired.len();
        self.retired
            .retain(|(_, retired_at)| now.saturating_sub(*retired_at) < grace_secs);
        before - self.retired.len()
    }

    /// The private prekey for a public one, current or retired.
    pub fn find(&self, public: &PrekeyPublic) -> Option<&PrekeySecret> {
        if self.current.public() == public {
            return Some(&self.current);
        }
        self.retired
            .iter()
            .map(|(k, _)| k)
            .find(|k| k.public() == public)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prekey_signature_verifies_and_rejects_other_identity() {
        let alice = IdentityKeyPair::generate();
        let mallory = IdentityKeyPair::generate();
        let pk = PrekeySecret::generate(&alice, 100);
        pk.signed().verify(&alice.public()).unwrap();
        assert_eq!(
            pk.signed().verify(&mallory.public()),
            Err(CryptoError::BadPrekeySignature)
        );
        let mut later = pk.signed().clone();
        later.created_at += 1;
        assert_eq!(
            later.verify(&alice.public()),
            Err(CryptoError::BadPrekeySignature)
        );
    }

    #[test]
    fn restore_rejects_secret_that_does_not_match() {
        let alice = IdentityKeyPair::generate();
        let a = PrekeySecret::generate(&alice, 1);
        let b = PrekeySecret::generate(&alice, 1);
        let err = PrekeySecret::restore(&alice.public(), &b.secret_bytes(), a.signed().clone());
        assert_eq!(err.err(), Some(CryptoError::PrekeyMismatch));
        PrekeySecret::restore(&alice.public(), &a.secret_bytes(), a.signed().clone()).unwrap();
    }

    #[test]
    fn rotation_keeps_old_prekey_for_grace_then_erases_it() {
        let alice = IdentityKeyPair::generate();
        let first = PrekeySecret::generate(&alice, 0);
        let first_pub = *first.public();
        let mut ring = PrekeyRing::new(first);
        assert!(
            ring.current()
                .due_for_rotation(DEFAULT_PREKEY_ROTATION_SECS, DEFAULT_PREKEY_ROTATION_SECS)
        );
        ring.rotate(PrekeySecret::generate(&alice, 1000), 1000);
        assert!(ring.find(&first_pub).is_some());
        assert_eq!(
            ring.expire(
                1000 + DEFAULT_PREKEY_GRACE_SECS - 1,
                DEFAULT_PREKEY_GRACE_SECS
            ),
            0
        );
        assert!(ring.find(&first_pub).is_some());
        assert_eq!(
            ring.expire(1000 + DEFAULT_PREKEY_GRACE_SECS, DEFAULT_PREKEY_GRACE_SECS),
            1
        );
        assert!(ring.find(&first_pub).is_none());
    }
}

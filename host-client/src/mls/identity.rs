//! The Syncra identity inside MLS: the signer, the credential binding, KeyPackages and joins.
//!
//! A member's MLS leaf carries a basic credential whose identity is the member's 20-byte
//! [`UserId`], and its signature key is the member's Ed25519 identity key. Because a user id
//! is a hash of that key, the pair is self-certifying: [`bound_user_id`] recomputes the id from
//! the key and refuses a leaf that claims another. Whoever trusts a key (pinned contact, safety
//! number) therefore trusts exactly that leaf, with no second key to verify or pin.
//!
//! Signing with the identity key inside MLS does not open a cross-protocol hole. MLS signs
//! only `SignContent` structures, which start with a one-byte length (8 to 63) followed by
//! `"MLS 1.0 "`; every Syncra transcript starts with a 32-bit big-endian length of its domain,
//! whose first byte is 0. [`IdentitySigner`] refuses to sign anything that is not MLS-labelled,
//! so no MLS signature can ever be a valid Syncra statement or the other way round.

use std::fmt;
use std::sync::Arc;

use openmls::prelude::{
    BasicCredential, Capabilities, Credential, CredentialType, CredentialWithKey, ExtensionType,
    KeyPackage, KeyPackageBundle, KeyPackageRef, MlsGroup, MlsMessageBodyIn, MlsMessageIn,
    MlsMessageOut, StagedWelcome, tls_codec::DeserializeBytes,
};
use openmls_traits::OpenMlsProvider;
use openmls_traits::signatures::{Signer, SignerError};
use openmls_traits::storage::StorageProvider;
use openmls_traits::types::SignatureScheme;
use syncra_core::crypto::keys::IdentityKeyPair;
use syncra_core::id::{USER_ID_LEN, UserId};
use zeroize::Zeroizing;

use super::conversation::{Conversation, ConversationId};
use super::error::{BindingError, MlsError};
use super::storage::Storage;
use super::{CIPHERSUITE, GROUP_ID_LEN, Provider, create_config, join_config, state};

/// The prefix every MLS label carries (RFC 9420, section 5.1.2).
const MLS_LABEL_PREFIX: &[u8] = b"MLS 1.0 ";

/// Signs MLS structures with the Syncra identity key.
///
/// It holds the decoded `ed25519_dalek` signing key (inside [`IdentityKeyPair`]), so a
/// signature costs one Ed25519 signature. openmls_basic_credential's `SignatureKeyPair` keeps
/// raw bytes and decodes them on every call, which recomputes the public key (one more
/// scalar multiplication, about as much as the signature itself).
#[derive(Clone)]
pub struct IdentitySigner {
    identity: IdentityKeyPair,
    public: [u8; 32],
}

impl IdentitySigner {
    /// A signer for this identity.
    pub fn new(identity: &IdentityKeyPair) -> Self {
        IdentitySigner {
            identity: identity.clone(),
            public: identity.public(),
        }
    }

    /// The Ed25519 public key, which is the MLS signature key.
    pub fn public(&self) -> &[u8; 32] {
        &self.public
    }

    /// The user id the key belongs to.
    pub fn user_id(&self) -> UserId {
        UserId::from_identity_key(&self.public)
    }

    /// Signs a Syncra transcript (its first byte is 0: never an MLS `SignContent`).
    pub(crate) fn sign_transcript(&self, transcript: &[u8]) -> [u8; 64] {
        self.identity.sign(transcript)
    }
}

impl fmt::Debug for IdentitySigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret half.
        write!(f, "IdentitySigner({})", self.user_id())
    }
}

/// Whether `payload` is an MLS `SignContent`: a one-byte variable-length label of at least
/// `"MLS 1.0 "`, then the content.
fn is_mls_sign_content(payload: &[u8]) -> bool {
    let Some((&len, rest)) = payload.split_first() else {
        return false;
    };
    // A one-byte QUIC varint has its two top bits clear; labels are far shorter than 64.
    let len = usize::from(len);
    len < 64
        && len >= MLS_LABEL_PREFIX.len()
        && rest.len() >= len
        && rest.starts_with(MLS_LABEL_PREFIX)
}

impl Signer for IdentitySigner {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        if !is_mls_sign_content(payload) {
            // The identity key signs Syncra transcripts too; it signs for MLS only what MLS
            // labels as its own.
            return Err(SignerError::SigningError);
        }
        Ok(self.identity.sign(payload).to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// The credential and signature key of a Syncra identity, as MLS carries them in a leaf.
pub fn credential_for(identity: &IdentityKeyPair) -> CredentialWithKey {
    CredentialWithKey {
        credential: BasicCredential::new(identity.user_id().as_bytes().to_vec()).into(),
        signature_key: identity.public().to_vec().into(),
    }
}

/// The Syncra user behind a member's credential and signature key, or why they do not belong
/// together.
///
/// This is the one check that ties MLS membership to Syncra identities; every member entering
/// a group passes through it (KeyPackages before an add, every leaf of a Welcome, every leaf a
/// commit adds or replaces).
pub fn bound_user_id(
    credential: &Credential,
    signature_key: &[u8],
) -> Result<UserId, BindingError> {
    if credential.credential_type() != CredentialType::Basic {
        return Err(BindingError::NotBasic);
    }
    // The basic credential's content is the identity, length-prefixed on the wire and bare here.
    let identity = credential.serialized_content();
    let claimed: [u8; USER_ID_LEN] = identity
        .try_into()
        .map_err(|_| BindingError::IdentityLength(identity.len()))?;
    let key: [u8; 32] = signature_key
        .try_into()
        .map_err(|_| BindingError::KeyLength(signature_key.len()))?;
    let claimed = UserId::from_bytes(claimed);
    let actual = UserId::from_identity_key(&key);
    if claimed != actual {
        return Err(BindingError::KeyMismatch { claimed, actual });
    }
    Ok(actual)
}

/// A KeyPackage this member published, ready for the directory.
#[derive(Clone)]
pub struct KeyPackageOutput {
    /// The KeyPackage as an MLS message (what the directory stores and hands out).
    pub bytes: Vec<u8>,
    /// Its hash reference: the key under which a Welcome names it.
    pub hash_ref: Vec<u8>,
    /// A last-resort package may be used by several adders; a one-time one only once.
    pub last_resort: bool,
}

impl fmt::Debug for KeyPackageOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPackageOutput")
            .field("len", &self.bytes.len())
            .field("last_resort", &self.last_resort)
            .finish()
    }
}

/// One Syncra identity as an MLS client: its signer and credential, and the private halves of
/// the KeyPackages it published.
///
/// The KeyPackage store is state of its own ([`MlsIdentity::key_store_to_bytes`]): the client
/// seals it like a conversation. Each conversation has its own storage; a Welcome moves the
/// one KeyPackage it consumes into the new conversation's storage.
pub struct MlsIdentity {
    signer: Arc<IdentitySigner>,
    credential: CredentialWithKey,
    keys: Provider,
}

impl fmt::Debug for MlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MlsIdentity({})", self.signer.user_id())
    }
}

impl MlsIdentity {
    /// This identity with an empty KeyPackage store.
    pub fn new(identity: &IdentityKeyPair) -> Self {
        Self::with_key_store(identity, Storage::default())
    }

    /// This identity with the KeyPackage store saved by [`MlsIdentity::key_store_to_bytes`].
    pub fn restore(identity: &IdentityKeyPair, key_store: &[u8]) -> Result<Self, MlsError> {
        let storage = state::decode(state::Kind::KeyStore, key_store)?.storage;
        Ok(Self::with_key_store(identity, storage))
    }

    fn with_key_store(identity: &IdentityKeyPair, storage: Storage) -> Self {
        MlsIdentity {
            signer: Arc::new(IdentitySigner::new(identity)),
            credential: credential_for(identity),
            keys: Provider::with_storage(storage),
        }
    }

    /// The private halves of the unused KeyPackages, for sealing at rest.
    pub fn key_store_to_bytes(&self) -> Zeroizing<Vec<u8>> {
        state::encode(state::Kind::KeyStore, &[], &self.keys.storage)
    }

    /// This member's user id.
    pub fn user_id(&self) -> UserId {
        self.signer.user_id()
    }

    pub(crate) fn signer(&self) -> &Arc<IdentitySigner> {
        &self.signer
    }

    /// A one-time KeyPackage: whoever claims it from the directory may add this member once.
    pub fn key_package(&self) -> Result<KeyPackageOutput, MlsError> {
        self.build_key_package(false)
    }

    /// A request to be let back into `conversation`, whose copy fell behind for good
    /// ([`super::rejoin`]): a fresh one-time KeyPackage (its private half joins the key store,
    /// so save that before sending), this member's leaf key and the epoch it is stuck in,
    /// signed with the identity key.
    pub fn rejoin_request(&self, conversation: &Conversation) -> Result<Vec<u8>, MlsError> {
        if !conversation.is_active() {
            return Err(MlsError::NotAMember);
        }
        let leaf_key = conversation.own_leaf_key().ok_or(MlsError::NotAMember)?;
        let package = self.key_package()?;
        Ok(super::rejoin::encode(
            &self.signer,
            conversation.id(),
            conversation.epoch(),
            &leaf_key,
            &package.bytes,
        ))
    }

    /// The last-resort KeyPackage, handed out when the one-time ones are used up. Joining with
    /// it does not consume it, so it should be replaced on a schedule.
    pub fn last_resort_key_package(&self) -> Result<KeyPackageOutput, MlsError> {
        self.build_key_package(true)
    }

    fn build_key_package(&self, last_resort: bool) -> Result<KeyPackageOutput, MlsError> {
        let mut builder = KeyPackage::builder();
        if last_resort {
            // A KeyPackage's extensions must be among its leaf's capabilities, or adders
            // refuse it.
            builder = builder.mark_as_last_resort().leaf_node_capabilities(
                Capabilities::builder()
                    .extensions(vec![ExtensionType::LastResort])
                    .build(),
            );
        }
        let bundle = builder
            .build(
                CIPHERSUITE,
                &self.keys,
                self.signer.as_ref(),
                self.credential.clone(),
            )
            .map_err(|e| MlsError::internal("creating a KeyPackage", e))?;
        let hash_ref = bundle
            .key_package()
            .hash_ref(self.keys.crypto())
            .map_err(|e| MlsError::internal("hashing a KeyPackage", e))?;
        let bytes = MlsMessageOut::from(bundle)
            .to_bytes()
            .map_err(|e| MlsError::internal("encoding a KeyPackage", e))?;
        Ok(KeyPackageOutput {
            bytes,
            hash_ref: hash_ref.as_slice().to_vec(),
            last_resort,
        })
    }

    /// A new conversation with this member alone in it (epoch 0). Add the others with
    /// [`Conversation::add`]; a 1:1 chat is a conversation of two.
    pub fn create_conversation(&self) -> Result<Conversation, MlsError> {
        let mut first = [0u8; 1];
        syncra_core::crypto::fill_random(&mut first);
        self.create_conversation_as(first[0] & 0x80 != 0)
    }

    /// A new conversation whose id says whether it is a named group or a 1:1 chat
    /// ([`ConversationId::is_group`](super::ConversationId::is_group)).
    pub fn create_conversation_as(&self, group: bool) -> Result<Conversation, MlsError> {
        self.create_conversation_below(group, None)
    }

    /// [`MlsIdentity::create_conversation_as`], with an id below `below` (a 1:1 chat that must
    /// win the smaller-id rule over one set aside; `None`: any id).
    pub(crate) fn create_conversation_below(
        &self,
        group: bool,
        below: Option<ConversationId>,
    ) -> Result<Conversation, MlsError> {
        let provider = Provider::default();
        let mut id = [0u8; GROUP_ID_LEN];
        syncra_core::crypto::fill_random(&mut id);
        id[0] = (id[0] & 0x7f) | if group { 0x80 } else { 0 };
        if let Some(bound) = below {
            let bound = u128::from_be_bytes(*bound.as_bytes());
            if bound > 0 {
                // Uniform below the bound; the bound's top bit is clear, so this one's is too.
                id = (u128::from_be_bytes(id) % bound).to_be_bytes();
            }
        }
        let group = MlsGroup::new_with_group_id(
            &provider,
            self.signer.as_ref(),
            &create_config(),
            openmls::prelude::GroupId::from_slice(&id),
            self.credential.clone(),
        )
        .map_err(|e| MlsError::internal("creating a group", e))?;
        Ok(Conversation::new(group, provider, self.signer.clone()))
    }

    /// Joins the conversation a Welcome invites this member to.
    ///
    /// Every member in the Welcome's tree must be bound to its key ([`bound_user_id`]),
    /// otherwise the join is refused before any state is kept. The KeyPackage used is deleted
    /// from the store, unless it is the last-resort one.
    pub fn join(&self, welcome: &[u8]) -> Result<Conversation, MlsError> {
        self.join_from(welcome, None)
    }

    /// [`Identity::join`], for a Welcome that would replace a copy this member has: refused
    /// unless the member who made it (the Welcome's signer, bound to its user) is one of
    /// `members`, before any state is kept or a KeyPackage used up.
    pub fn rejoin_from(
        &self,
        welcome: &[u8],
        members: &[UserId],
    ) -> Result<Conversation, MlsError> {
        self.join_from(welcome, Some(members))
    }

    fn join_from(
        &self,
        welcome: &[u8],
        members: Option<&[UserId]>,
    ) -> Result<Conversation, MlsError> {
        let message = MlsMessageIn::tls_deserialize_exact_bytes(welcome).map_err(|_| {
            MlsError::Malformed {
                expected: "Welcome",
            }
        })?;
        let MlsMessageBodyIn::Welcome(welcome) = message.extract() else {
            return Err(MlsError::Malformed {
                expected: "Welcome",
            });
        };
        if welcome.ciphersuite() != CIPHERSUITE {
            return Err(MlsError::Ciphersuite(welcome.ciphersuite().into()));
        }

        // Move the one KeyPackage the Welcome names into the new conversation's storage, where
        // openmls looks for it; the other unused ones stay out of that conversation's state.
        let provider = Provider::default();
        let mut used: Option<(KeyPackageRef, bool)> = None;
        for secrets in welcome.secrets() {
            let hash_ref = secrets.new_member();
            let bundle: Option<KeyPackageBundle> = self
                .keys
                .storage
                .key_package(&hash_ref)
                .map_err(|e| MlsError::internal("reading a KeyPackage", e))?;
            if let Some(bundle) = bundle {
                provider
                    .storage
                    .write_key_package(&hash_ref, &bundle)
                    .map_err(|e| MlsError::internal("staging a KeyPackage", e))?;
                used = Some((hash_ref, bundle.key_package().last_resort()));
                break;
            }
        }
        let (hash_ref, last_resort) = used.ok_or(MlsError::NoMatchingKeyPackage)?;

        let staged = StagedWelcome::new_from_welcome(&provider, &join_config(), welcome, None)
            .map_err(|e| MlsError::InvalidWelcome(e.to_string()))?;
        let id_len = staged.group_context().group_id().as_slice().len();
        if id_len != GROUP_ID_LEN {
            return Err(MlsError::GroupIdLength(id_len));
        }
        for member in staged.members() {
            bound_user_id(&member.credential, &member.signature_key)?;
        }
        if let Some(members) = members {
            // The signer of the Welcome's group info, verified by openmls against this leaf.
            let sender = staged
                .welcome_sender()
                .map_err(|e| MlsError::InvalidWelcome(e.to_string()))?;
            let sender = bound_user_id(sender.credential(), sender.signature_key().as_slice())?;
            if sender == self.user_id() || !members.contains(&sender) {
                return Err(MlsError::WelcomeFromOutsider {
                    conversation: ConversationId::from_bytes(
                        staged
                            .group_context()
                            .group_id()
                            .as_slice()
                            .try_into()
                            .map_err(|_| MlsError::GroupIdLength(id_len))?,
                    ),
                    sender,
                });
            }
        }
        let group = staged
            .into_group(&provider)
            .map_err(|e| MlsError::InvalidWelcome(e.to_string()))?;

        // A last-resort package is not consumed by openmls; the conversation must not carry a
        // copy of its private keys anyway.
        provider
            .storage
            .delete_key_package(&hash_ref)
            .map_err(|e| MlsError::internal("dropping a staged KeyPackage", e))?;
        if !last_resort {
            self.keys
                .storage
                .delete_key_package(&hash_ref)
                .map_err(|e| MlsError::internal("deleting a used KeyPackage", e))?;
        }
        Ok(Conversation::new(group, provider, self.signer.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_credential_is_bound_to_the_identity_key() {
        let alice = IdentityKeyPair::generate();
        let cred = credential_for(&alice);
        let id = bound_user_id(&cred.credential, cred.signature_key.as_slice());
        assert_eq!(id, Ok(alice.user_id()));
    }

    #[test]
    fn a_credential_claiming_another_key_is_refused() {
        let alice = IdentityKeyPair::generate();
        let mallory = IdentityKeyPair::generate();
        // Mallory's key under Alice's id: the pair a relay or a member would need to forge.
        let forged = BasicCredential::new(alice.user_id().as_bytes().to_vec()).into();
        let err = bound_user_id(&forged, &mallory.public());
        assert_eq!(
            err,
            Err(BindingError::KeyMismatch {
                claimed: alice.user_id(),
                actual: mallory.user_id()
            })
        );
    }

    #[test]
    fn malformed_credentials_are_refused_by_kind() {
        let alice = IdentityKeyPair::generate();
        let short: Credential = BasicCredential::new(b"alice".to_vec()).into();
        assert_eq!(
            bound_user_id(&short, &alice.public()),
            Err(BindingError::IdentityLength(5))
        );
        let cred = credential_for(&alice).credential;
        assert_eq!(
            bound_user_id(&cred, &alice.public()[..31]),
            Err(BindingError::KeyLength(31))
        );
        let x509 = Credential::new(CredentialType::X509, alice.user_id().as_bytes().to_vec());
        assert_eq!(
            bound_user_id(&x509, &alice.public()),
            Err(BindingError::NotBasic)
        );
    }

    #[test]
    fn the_signer_signs_mls_labels_only() {
        let alice = IdentityKeyPair::generate();
        let signer = IdentitySigner::new(&alice);
        let mut mls = vec![u8::try_from(MLS_LABEL_PREFIX.len() + 11).unwrap_or(0)];
        mls.extend_from_slice(MLS_LABEL_PREFIX);
        mls.extend_from_slice(b"LeafNodeTBS");
        mls.extend_from_slice(&[0x03, 1, 2, 3]);
        let sig = signer.sign(&mls).expect("an MLS SignContent is signed");
        // The same Ed25519 signature the identity makes: the MLS key is the identity key.
        assert_eq!(sig, alice.sign(&mls).to_vec());

        // A Syncra transcript (32-bit length, then the domain) is never signed here.
        let syncra = syncra_core::crypto::transcript::Transcript::new("syncra/v1/login").finish();
        assert_eq!(signer.sign(&syncra), Err(SignerError::SigningError));
        assert_eq!(signer.sign(&[]), Err(SignerError::SigningError));
        assert_eq!(signer.sign(b"\x08MLS 1.0"), Err(SignerError::SigningError));
    }

    #[test]
    fn the_signer_matches_the_basic_credential_key_pair() {
        // openmls_basic_credential built from the raw seed and public key signs the same bytes:
        // ours is the same key, held decoded.
        let alice = IdentityKeyPair::generate();
        let basic = openmls_basic_credential::SignatureKeyPair::from_raw(
            SignatureScheme::ED25519,
            alice.seed().to_vec(),
            alice.public().to_vec(),
        );
        let mut payload = vec![u8::try_from(MLS_LABEL_PREFIX.len() + 3).unwrap_or(0)];
        payload.extend_from_slice(b"MLS 1.0 abc");
        payload.push(0);
        assert_eq!(
            IdentitySigner::new(&alice).sign(&payload),
            basic.sign(&payload)
        );
    }
}
